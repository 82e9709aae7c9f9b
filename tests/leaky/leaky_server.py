"""The real server with three deliberate leaks, for the leak detector's positive control.

Run as `python -m leaky_server` (tests/leaky on PYTHONPATH). Every decrypted request whose
first message holds a marker leaks that message's text the way a real bug would:
- `LEAK-LOG`: through the server's own JSON logger (an f-string message, the usual bug;
  extra fields are whitelisted, so that path is closed);
- `LEAK-ERROR`: through an error message sent to the caller;
- `LEAK-METRIC`: through a metric label.
Nothing else differs from `python -m encloud.server.app`.
"""

from __future__ import annotations

import logging

from encloud.protocol.faults import InvalidArgumentError
from encloud.server import app, grpc_converters, metrics

_registry: list[metrics.Metrics] = []
_original_init = metrics.Metrics.__init__
_original_parse = grpc_converters.generation_params_from_payload


def _remembering_init(self: metrics.Metrics) -> None:
    _original_init(self)
    _registry.append(self)


def _leaking_parse(payload: bytes, settings: object) -> object:
    params = _original_parse(payload, settings)  # type: ignore[arg-type]
    text = params.messages[0].content  # type: ignore[attr-defined]
    if "LEAK-LOG" in text:
        logging.getLogger("encloud.server").info(f"request: {text}")
    if "LEAK-METRIC" in text:
        _registry[0].admission_rejected.labels(text).inc()
    if "LEAK-ERROR" in text:
        raise InvalidArgumentError(f"cannot answer {text}")
    return params


metrics.Metrics.__init__ = _remembering_init  # type: ignore[method-assign]
grpc_converters.generation_params_from_payload = _leaking_parse  # type: ignore[assignment]

if __name__ == "__main__":
    app.main()
