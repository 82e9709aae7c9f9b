"""The runtime event: what the server measures, beside the model digest, before it serves.

    runtime_event = {"encloud": <package version>,
                     "settings": <every measured setting>,
                     "engine": <what the engine reports about itself>}

Every setting says whether it is measured, and why (server/settings.py); the measured ones
are those that change answers, the limits a request meets, or how long keys live. The
engine's part is what it found or derived: versions, the ONNX Runtime session options,
precision, the known-answer hash. Nothing else goes in, and no decoding default or limit
is defined anywhere but in the settings, so the event describes what actually runs: a
server started with another default or limit has another event, and a policy that pinned
the old one refuses it (tests/test_runtime_event.py).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

from encloud.protocol.eventlog import EVENT_MODEL, EVENT_RUNTIME, WorkloadEvent, canonical_json
from encloud.server.inference.engine import Engine
from encloud.server.settings import Settings, measured_settings


def load_engine(settings: Settings) -> Engine:
    """The engine as the server loads it: one call, so that a runtime event computed for a
    policy (`encloud policy from-manifest --compute-runtime`) comes from the same load."""
    return Engine.load(
        settings.model_dir,
        threads=settings.threads,
        provider=settings.provider,
        max_batch=settings.max_batch,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        kv_budget_tokens=settings.kv_budget_tokens,
        spinning=settings.engine_spinning,
    )


def encloud_version() -> str:
    try:
        return importlib.metadata.version("encloud")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def runtime_event(settings: Settings, engine_facts: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "encloud": encloud_version(),
        "settings": measured_settings(settings),
        "engine": dict(engine_facts),
    }


def workload_events(
    settings: Settings, model_digest: bytes, engine_facts: Mapping[str, Any]
) -> list[WorkloadEvent]:
    """The [model, runtime] pair measured at every start-up."""
    return [
        WorkloadEvent(EVENT_MODEL, model_digest),
        WorkloadEvent(EVENT_RUNTIME, canonical_json(runtime_event(settings, engine_facts))),
    ]
