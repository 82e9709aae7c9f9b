"""The proxy's HTTP application (Starlette): OpenAI's chat completions over attested, sealed
encloud sessions, with the local-safety rules in front (docs/PROXY.md)."""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from encloud.client import AsyncClient
from encloud.proxy.openai_api import (
    OpenAIError,
    chunk,
    completion,
    completion_id,
    embeddings_response,
    error_from,
    finish_reason,
    parse_chat_request,
    parse_embeddings_request,
    usage,
)
from encloud.proxy.pool import SessionPool

log = logging.getLogger("encloud.proxy")

MODEL_ID = "encloud"
MODEL_IDS = frozenset({MODEL_ID})
EMBEDDINGS_MODEL_ID = "encloud-embeddings"
EMBEDDINGS_MODEL_IDS = frozenset({EMBEDDINGS_MODEL_ID})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
EVIDENCE_HEADER = "x-encloud-evidence"
MODEL_HEADER = "x-encloud-model-digest"
EMBEDDINGS_MODEL_HEADER = "x-encloud-embedding-model-digest"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class ProxyMetrics:
    """Counts and timings only (no sizes, no token counts: the server's rule)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "encloud_proxy_requests",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "encloud_proxy_time_to_first_token_seconds",
            "From a streamed request's arrival to its first content chunk.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.sessions = Gauge(
            "encloud_proxy_sessions", "Attested sessions with a key.", registry=self.registry
        )


@dataclass
class Safety:
    """Who may use the proxy: names in Host, origins, and an optional bearer token."""

    allowed_hosts: frozenset[str] = LOOPBACK_NAMES
    allowed_origins: frozenset[str] = frozenset()
    token: str | None = None

    def refusal(self, method: str, headers: dict[str, str]) -> OpenAIError | None:
        host = _hostname(headers.get("host", ""))
        if host not in self.allowed_hosts:
            return OpenAIError(403, "this Host is not allowed (DNS rebinding guard)", code="host")
        origin = headers.get("origin")
        if origin is not None and origin not in self.allowed_origins:
            return OpenAIError(403, "cross-origin requests are not allowed", code="origin")
        if self.token is not None:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return OpenAIError(
                    401, "a bearer token is required", "authentication_error", code="token"
                )
        if method == "POST":
            kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if kind != "application/json":
                return OpenAIError(415, "the body must be application/json", code="content_type")
        return None


def _hostname(host: str) -> str:
    """The name part of a Host header (no port; IPv6 without brackets)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SafetyMiddleware:
    """Every request passes the local-safety rules first; no CORS headers are ever sent."""

    def __init__(self, app: Any, safety: Safety) -> None:
        self.app = app
        self.safety = safety

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            refused = self.safety.refusal(scope["method"], headers)
            if refused is not None:
                response = JSONResponse(refused.body(), status_code=refused.status)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error(failure: BaseException) -> JSONResponse:
    err = error_from(failure)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _evidence_headers(client: AsyncClient) -> dict[str, str]:
    attestation = client.attestation
    if attestation is None:
        return {}
    headers = {EVIDENCE_HEADER: attestation.attest_digest.hex()}
    if attestation.model_digest:
        headers[MODEL_HEADER] = attestation.model_digest.hex()
    if "embeddings" in attestation.models:
        headers[EMBEDDINGS_MODEL_HEADER] = attestation.models["embeddings"].hex()
    return headers


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class Proxy:
    pool: SessionPool
    metrics: ProxyMetrics = field(default_factory=ProxyMetrics)

    async def chat(self, request: Request) -> Response:
        started = time.monotonic()
        try:
            try:
                body = await request.json()
            except ValueError:
                raise OpenAIError(400, "the body is not valid JSON", code="invalid_json") from None
            chat = parse_chat_request(body, MODEL_IDS)
            if chat.stream:
                return await self._stream(chat.messages, chat.params, chat.include_usage, started)
            async with self.pool.client() as client:
                answer = await client.infer(chat.messages, **chat.params)
                done = answer.completion
                out = completion(
                    completion_id(),
                    MODEL_ID,
                    answer.text,
                    done.finish_reason,
                    done.prompt_tokens,
                    done.completion_tokens,
                )
                headers = _evidence_headers(client)
            return self._answer(JSONResponse(out, headers=headers))
        except Exception as failure:  # every failure becomes an OpenAI error object
            return self._answer(_error(failure))

    async def _stream(
        self,
        messages: list[tuple[str, str]],
        params: dict[str, Any],
        include_usage: bool,
        started: float,
    ) -> Response:
        """Open the stream and take its first piece before answering, so that a failure
        before any text (attestation, quota) is a proper HTTP status, and the response's
        headers name the session that answers."""
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(self.pool.client())
        try:
            stream = client.stream(messages, **params)
            pieces = stream.__aiter__()
            try:
                first: str | None = await pieces.__anext__()
            except StopAsyncIteration:
                first = None
            self.metrics.ttft.observe(time.monotonic() - started)
        except BaseException:
            await stack.aclose()
            raise
        headers = _evidence_headers(client)

        async def events() -> AsyncIterator[bytes]:
            cid, created = completion_id(), int(time.time())

            def piece_chunk(delta: dict[str, Any], reason: str | None = None) -> bytes:
                return _sse(
                    chunk(cid, MODEL_ID, created, delta, reason, include_usage=include_usage)
                )

            try:
                head = {"role": "assistant", "content": ""}
                yield _sse(chunk(cid, MODEL_ID, created, head, include_usage=include_usage))
                if first is not None:
                    yield _sse(
                        chunk(
                            cid, MODEL_ID, created, {"content": first}, include_usage=include_usage
                        )
                    )
                    async for piece in pieces:
                        yield _sse(
                            chunk(
                                cid,
                                MODEL_ID,
                                created,
                                {"content": piece},
                                include_usage=include_usage,
                            )
                        )
                done = stream.completion  # the final frame and transcript verified
                if done is None:
                    raise OpenAIError(502, "the stream ended without its final frame")
                reason = finish_reason(done.finish_reason)
                yield _sse(chunk(cid, MODEL_ID, created, {}, reason, include_usage=include_usage))
                if include_usage:
                    totals = usage(done.prompt_tokens, done.completion_tokens)
                    yield _sse(
                        chunk(cid, MODEL_ID, created, None, include_usage=True, totals=totals)
                    )
                yield b"data: [DONE]\n\n"
            except Exception as failure:  # an error event, never [DONE]
                yield _sse(error_from(failure).body())
            finally:
                await stack.aclose()

        response = StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        response.headers["Cache-Control"] = "no-cache"
        return self._answer(response)

    async def embeddings(self, request: Request) -> Response:
        try:
            try:
                body = await request.json()
            except ValueError:
                raise OpenAIError(400, "the body is not valid JSON", code="invalid_json") from None
            wanted = parse_embeddings_request(body, EMBEDDINGS_MODEL_IDS)
            async with self.pool.client() as client:
                result = await client.embed(wanted.texts, dimensions=wanted.dimensions)
                headers = _evidence_headers(client)
            out = embeddings_response(
                EMBEDDINGS_MODEL_ID, result.vectors, result.prompt_tokens, wanted.base64
            )
            return self._answer(JSONResponse(out, headers=headers), "embeddings")
        except Exception as failure:  # every failure becomes an OpenAI error object
            return self._answer(_error(failure), "embeddings")

    def _answer(self, response: Response, route: str = "chat_completions") -> Response:
        self.metrics.requests.labels(route, str(response.status_code)).inc()
        self.metrics.sessions.set(self.pool.sessions)
        log.info("request", extra={"route": route, "status": response.status_code})
        return response

    async def models(self, request: Request) -> Response:
        latest = self.pool.report(None)
        policy = self.pool.policy
        entries = []
        for model_id, allowed, attested in (
            (MODEL_ID, policy.allowed_model_digests, "model_digest"),
            (EMBEDDINGS_MODEL_ID, policy.allowed_embedding_model_digests, "embedding_model_digest"),
        ):
            if not allowed:
                continue  # the policy accepts no model of this role: nothing to offer
            entries.append(
                {
                    "id": model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "encloud",
                    "encloud": {
                        "allowed_model_digests": [d.hex() for d in allowed],
                        "attested_model_digest": latest.get(attested) if latest else None,
                    },
                }
            )
        return JSONResponse({"object": "list", "data": entries})

    async def attestation(self, request: Request) -> Response:
        digest = request.query_params.get("evidence")
        report = self.pool.report(digest)
        if report is None:
            what = f"evidence {digest}" if digest else "any attestation"
            err = OpenAIError(404, f"no report of {what} here", code="not_found")
            return JSONResponse(err.body(), status_code=404)
        return JSONResponse(report)


def build_app(proxy: Proxy, safety: Safety, on_shutdown: Callable[[], Awaitable[None]]) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await on_shutdown()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", proxy.chat, methods=["POST"]),
            Route("/v1/embeddings", proxy.embeddings, methods=["POST"]),
            Route("/v1/models", proxy.models, methods=["GET"]),
            Route("/v1/encloud/attestation", proxy.attestation, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    return SafetyMiddleware(app, safety)
