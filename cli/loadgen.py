"""A bounded load generator on grpc.aio: N clients, each its own attested session.

    python -m encloud.cli.loadgen --target 127.0.0.1:50051 --policy policy.json \\
        --clients 64 --requests 3 --max-new-tokens 16 --audit-log load-audit.jsonl
    encloud loadgen ... --embed-texts 8     # Embed requests of 8 texts instead of chat

Each client is an encloud.client.AsyncClient: it attests, verifies the evidence
against the policy, writes the outcome to the audit log, releases a fresh key,
checks the key confirmation, then sends its requests one after the other with
StreamInfer, each with a distinct prompt. Every frame is opened under that
client's own session key and the final frame's transcript hash is checked, so
an answer that decrypts is its own request's answer. By default nothing is
retried, so the report shows what the server answered. The run is bounded: a
fixed number of requests, and an optional wall-clock limit after which no new
request starts. It reports time-to-first-token and latency percentiles and
errors by status code. Loopback or a lab network only: it sends real prompts at
full speed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from encloud.cli.options import OneLineParser, add_target_args, channel_credentials, positive_int
from encloud.cli.stats import percentile
from encloud.client import NO_AUDIT, AsyncClient, RetryPolicy
from encloud.client._base import AuditArg
from encloud.protocol.audit import AuditLog
from encloud.protocol.errors import EncloudError, ServiceError
from encloud.protocol.policy import Policy, load_policy

NO_RETRIES = RetryPolicy(max_retries=0, max_reattests=0)


@dataclass(frozen=True)
class RequestResult:
    client: int
    index: int
    prompt: str
    text: str
    finish_reason: str
    session_id: bytes
    ttft_seconds: float
    latency_seconds: float


@dataclass
class LoadReport:
    clients: int
    requests_per_client: int
    results: list[RequestResult] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wall_seconds: float = 0.0

    @property
    def ttft(self) -> list[float]:
        return sorted(r.ttft_seconds for r in self.results)

    @property
    def latency(self) -> list[float]:
        return sorted(r.latency_seconds for r in self.results)

    def summary(self) -> dict[str, object]:
        return {
            "clients": self.clients,
            "requests_per_client": self.requests_per_client,
            "requests_ok": len(self.results),
            "errors": dict(self.errors),
            "sessions": len({r.session_id for r in self.results}),
            "wall_seconds": round(self.wall_seconds, 2),
            "requests_per_second": round(len(self.results) / self.wall_seconds, 2)
            if self.wall_seconds
            else 0.0,
            "ttft_ms": _percentiles(self.ttft),
            "latency_ms": _percentiles(self.latency),
        }


def _percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds (nearest rank, encloud.cli.stats)."""
    if not values:
        return {}
    out = {f"p{p}": round((percentile(values, p) or 0.0) * 1000, 1) for p in (50, 90, 99)}
    out["max"] = round(max(values) * 1000, 1)
    return out


def default_prompt(client: int, index: int) -> str:
    topics = ("the sea", "a mountain", "a city", "a forest", "the moon", "a river")
    return f"Client {client}, request {index}: write one short sentence about {topics[index % 6]}."


def _error_code(error: BaseException) -> str:
    if isinstance(error, ServiceError):
        return error.code
    if isinstance(error, EncloudError):
        return type(error).__name__
    return f"client:{type(error).__name__}"


async def _one_stream(
    client: AsyncClient, prompt: str, max_new_tokens: int
) -> tuple[str, str, float, float]:
    """(text, finish reason, ttft, latency) of one streamed answer, fully checked."""
    started = time.monotonic()
    first: float | None = None
    pieces: list[str] = []
    stream = client.stream([("user", prompt)], max_new_tokens=max_new_tokens)
    async for piece in stream:
        if first is None:
            first = time.monotonic()
        pieces.append(piece)
    ended = time.monotonic()
    assert stream.completion is not None
    return (
        "".join(pieces),
        stream.completion.finish_reason,
        (first or ended) - started,
        (ended - started),
    )


async def _one_embed(client: AsyncClient, prompt: str, texts: int) -> tuple[str, str, float, float]:
    """One Embed request of `texts` texts made from the prompt, fully checked (the client
    verifies the transcript, the count and the padding); its latency stands for the ttft."""
    started = time.monotonic()
    result = await client.embed([f"{prompt} (part {k})" for k in range(texts)])
    latency = time.monotonic() - started
    return f"{len(result.vectors)} vectors", "embedded", latency, latency


async def run_load(
    target: str,
    policy: Policy,
    *,
    clients: int,
    requests_per_client: int,
    audit_log: AuditArg,
    max_new_tokens: int = 16,
    embed_texts: int = 0,
    duration_seconds: float | None = None,
    prompt: Callable[[int, int], str] = default_prompt,
    credentials: grpc.ChannelCredentials | None = None,
    timeout_seconds: float = 300.0,
    retry: RetryPolicy = NO_RETRIES,
) -> LoadReport:
    """Run the bounded load; every client has its own channel and session. With
    `embed_texts`, each request is an Embed of that many texts instead of a chat stream."""
    report = LoadReport(clients, requests_per_client)
    started = time.monotonic()
    stop_at = started + duration_seconds if duration_seconds is not None else None
    audit = AuditLog(Path(audit_log)) if isinstance(audit_log, str | Path) else audit_log

    async def one_client(number: int) -> None:
        client = AsyncClient(
            target,
            policy,
            audit_log=audit,
            credentials=credentials,
            timeout=timeout_seconds,
            retry=retry,
        )
        try:
            try:
                await client.attest()
                await client.release_key()
            except EncloudError as error:
                report.errors[_error_code(error)] += 1
                return
            session_id = client.session_id or b""
            for index in range(requests_per_client):
                if stop_at is not None and time.monotonic() >= stop_at:
                    break
                text_prompt = prompt(number, index)
                try:
                    if embed_texts:
                        text, finish, ttft, latency = await _one_embed(
                            client, text_prompt, embed_texts
                        )
                    else:
                        text, finish, ttft, latency = await _one_stream(
                            client, text_prompt, max_new_tokens
                        )
                except EncloudError as error:
                    report.errors[_error_code(error)] += 1
                    continue
                report.results.append(
                    RequestResult(
                        number, index, text_prompt, text, finish, session_id, ttft, latency
                    )
                )
            try:
                await client.end_session()
            except ServiceError as error:
                report.errors[f"EndSession:{_error_code(error)}"] += 1
        finally:
            await client.close()

    await asyncio.gather(*(one_client(c) for c in range(clients)))
    report.wall_seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="encloud loadgen", description=__doc__.split("\n\n")[0])
    add_target_args(parser, required=True)
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--clients", type=positive_int, default=8)
    parser.add_argument("--requests", type=positive_int, default=4, help="requests per client")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16)
    parser.add_argument(
        "--embed-texts",
        type=positive_int,
        default=None,
        help="make each request an Embed of this many texts (latency stands for the ttft)",
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds; then stop")
    parser.add_argument(
        "--audit-log",
        type=Path,
        default=None,
        help="audit log of the attestations (required unless --no-audit)",
    )
    parser.add_argument("--no-audit", action="store_true", help="keep no audit log")
    args = parser.parse_args(argv)
    if (args.audit_log is None) == (not args.no_audit):
        parser.error("give --audit-log FILE or --no-audit (one)")
    try:
        credentials = channel_credentials(args)
        policy = load_policy(args.policy)
    except (OSError, ValueError, EncloudError) as error:
        detail = f"{error.strerror}: {error.filename}" if isinstance(error, OSError) else error
        print(f"encloud loadgen: {detail}", file=sys.stderr)
        return 2
    requests = args.requests if args.duration is None else 1_000_000_000
    report = asyncio.run(
        run_load(
            args.target,
            policy,
            clients=args.clients,
            requests_per_client=requests,
            max_new_tokens=args.max_new_tokens,
            embed_texts=args.embed_texts or 0,
            duration_seconds=args.duration,
            credentials=credentials,
            audit_log=NO_AUDIT if args.no_audit else args.audit_log,
        )
    )
    print(json.dumps(report.summary(), indent=2))
    return 0 if not report.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
