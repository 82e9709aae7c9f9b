"""The runtime event: what the server measures, beside the model digest, before it serves.

    runtime_event = {"encloud": <package version>,
                     "settings": <every measured setting>,
                     "engine": <what the chat engine reports about itself>,
                     "embedder": <what the embedding model's runner reports>}

"engine" is there when the server serves chat, "embedder" when it serves embeddings; each
served model also has its own model event (role chat or embeddings) before this one.

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

from encloud.protocol.eventlog import (
    EVENT_RUNTIME,
    MODEL_ROLES,
    WorkloadEvent,
    canonical_json,
    model_event,
)
from encloud.server.inference.embedder import Embedder
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


def load_embedder(settings: Settings) -> Embedder | None:
    """The embedding model as the server loads it, or None when it serves no embeddings."""
    if settings.embeddings_model_dir is None:
        return None
    return Embedder.load(
        settings.embeddings_model_dir,
        threads=settings.threads,
        max_batch_texts=settings.embed_batch_texts,
        max_tokens=settings.embed_max_tokens_per_text,
    )


def encloud_version() -> str:
    try:
        return importlib.metadata.version("encloud")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def runtime_event(
    settings: Settings,
    engine_facts: Mapping[str, Any] | None,
    embedder_facts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    event: dict[str, Any] = {"encloud": encloud_version(), "settings": measured_settings(settings)}
    if engine_facts is not None:
        event["engine"] = dict(engine_facts)
    if embedder_facts is not None:
        event["embedder"] = dict(embedder_facts)
    return event


def workload_events(
    settings: Settings,
    models: Mapping[str, bytes],
    engine_facts: Mapping[str, Any] | None,
    embedder_facts: Mapping[str, Any] | None = None,
) -> list[WorkloadEvent]:
    """What every start-up measures: a model event per served model (role -> digest, in
    MODEL_ROLES order), then the runtime event."""
    if not models:
        raise ValueError("a start-up serves at least one model")
    events = [model_event(role, models[role]) for role in MODEL_ROLES if role in models]
    runtime = runtime_event(settings, engine_facts, embedder_facts)
    return [*events, WorkloadEvent(EVENT_RUNTIME, canonical_json(runtime))]
