"""Structured JSON logs. Only whitelisted fields are written, so nothing a
handler puts on a record by accident (a prompt, a key) reaches the log.

The message is written only when it is a plain string (never a %-formatted
record's arguments), and exception tracebacks are never written: an exception
message may quote a plaintext. Unexpected errors are logged by status.py as
their type, where they were raised and a correlation id.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_ALLOWED_EXTRA = (
    "correlation_id",
    "error_type",
    "where",
    "event",
    "address",
    "ak_fingerprint",
    "model_digest",
    "workload_pcr",
    "records",
    "seconds",
    "path",
    "tls",
    "metrics",
    "calls",
    "grace_seconds",
    "method",
    "code",
    "reason",
    "cause",
    "replica",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.msg if isinstance(record.msg, str) else "",
        }
        for key in _ALLOWED_EXTRA:
            if key in record.__dict__:
                entry[key] = record.__dict__[key]
        return json.dumps(entry, default=str)


def configure(level: str, access_log: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The access log is INFO whatever the level, unless turned off.
    logging.getLogger("encloud.access").setLevel(logging.INFO if access_log else logging.CRITICAL)
