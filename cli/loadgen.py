"""A bounded load generator on grpc.aio: N clients, each its own attested session.

    python -m encloud.cli.loadgen --target 127.0.0.1:50051 --policy policy.json \\
        --clients 64 --requests 3 --max-new-tokens 16

Each client attests, verifies the evidence against the policy, releases a
fresh key, checks the key confirmation, then sends its requests one after the
other with StreamInfer, each with a distinct prompt. Every frame is opened
under that client's own session key and the final frame's transcript hash is
checked, so an answer that decrypts is its own request's answer. The run is
bounded: a fixed number of requests, and an optional wall-clock limit after
which no new request starts. It reports time-to-first-token and latency
percentiles and errors by status code. Loopback or a lab network only: it
sends real prompts at full speed.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from encloud.client.session import (
    NONCE_LENGTH,
    _check_final,
    _generation_request,
)
from encloud.protocol.envelope import (
    MessageType,
    OpeningKey,
    SealingKey,
    transcript_next,
    transcript_start,
)
from encloud.protocol.errors import EncloudError, KeyConfirmationError, TruncatedStreamError
from encloud.protocol.handshake import (
    SESSION_SECRET_LENGTH,
    SUITE_V1,
    derive_traffic_keys,
    handshake_hash,
    new_dek,
    quote_qualifying_data,
    release_info,
    seal_key,
    split_enc,
)
from encloud.protocol.policy import Policy, load_policy
from encloud.protocol.v1 import encloud_pb2 as pb
from encloud.protocol.v1 import encloud_pb2_grpc as pb_grpc
from encloud.protocol.verifier import verify_with_report
from encloud.protocol.wire import evidence_from_proto, sealed_from_proto, sealed_to_proto


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
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1] * 1000, 1)}


def default_prompt(client: int, index: int) -> str:
    topics = ("the sea", "a mountain", "a city", "a forest", "the moon", "a river")
    return f"Client {client}, request {index}: write one short sentence about {topics[index % 6]}."


class AioSession:
    """One attested session on a grpc.aio channel (the async twin of EncloudClient)."""

    def __init__(self, stub: pb_grpc.InferenceServiceStub, policy: Policy, timeout: float) -> None:
        self._stub = stub
        self._policy = policy
        self._timeout = timeout
        self.session_id = b""
        self._c2s: SealingKey | None = None
        self._s2c: OpeningKey | None = None
        self._next_id = 1

    async def open(self) -> None:
        suite = SUITE_V1
        nonce = os.urandom(NONCE_LENGTH)
        reply = await self._stub.Attest(
            pb.AttestRequest(
                nonce=nonce,
                suite=pb.HpkeSuite(kem_id=suite.kem_id, kdf_id=suite.kdf_id, aead_id=suite.aead_id),
            ),
            timeout=self._timeout,
        )
        expected = quote_qualifying_data(
            suite, nonce, reply.session_public_key, reply.session_id, reply.ttl_seconds
        )
        verified, _report, failure = verify_with_report(
            evidence_from_proto(reply.evidence),
            self._policy,
            expected_qualifying_data=expected,
            session_ttl_seconds=reply.ttl_seconds,
        )
        if failure is not None:
            raise failure
        assert verified is not None
        dek, secret = new_dek(), bytearray(os.urandom(SESSION_SECRET_LENGTH))
        try:
            info = release_info(suite, reply.session_id, verified.attest_digest)
            sealed_key = seal_key(suite, reply.session_public_key, dek, secret, info)
            h_hs = handshake_hash(
                suite,
                nonce,
                reply.session_public_key,
                reply.session_id,
                reply.ttl_seconds,
                verified.attest_digest,
                split_enc(suite, sealed_key),
            )
            keys = derive_traffic_keys(dek, secret, h_hs)
        finally:
            dek[:] = bytes(len(dek))
            secret[:] = bytes(len(secret))
        release = await self._stub.ReleaseKey(
            pb.ReleaseKeyRequest(session_id=reply.session_id, sealed_key=sealed_key),
            timeout=self._timeout,
        )
        confirm = OpeningKey(keys.kc, reply.session_id)
        try:
            proof = confirm.open(
                sealed_from_proto(release.key_confirmation), MessageType.KEY_CONFIRM, 0, 0
            )
        finally:
            confirm.wipe()
        if not hmac.compare_digest(proof, h_hs):
            keys.wipe()
            raise KeyConfirmationError("the key confirmation is for another handshake")
        self.session_id = reply.session_id
        self._c2s = SealingKey(keys.c2s, reply.session_id)
        self._s2c = OpeningKey(keys.s2c, reply.session_id)

    async def stream(self, prompt: str, max_new_tokens: int) -> tuple[str, str, float, float]:
        """(text, finish reason, ttft, latency) of one streamed answer, fully checked."""
        assert self._c2s is not None and self._s2c is not None
        request_id = self._next_id
        self._next_id += 1
        body = _generation_request([("user", prompt)], {"max_new_tokens": max_new_tokens})
        sealed = self._c2s.seal(MessageType.REQUEST, request_id, 0, body.SerializeToString())
        transcript = transcript_start(self.session_id, request_id, sealed.data)
        started = time.monotonic()
        first: float | None = None
        pieces: list[str] = []
        seq = 0
        finish = ""
        call = self._stub.StreamInfer(
            pb.StreamInferRequest(session_id=self.session_id, request=sealed_to_proto(sealed)),
            timeout=self._timeout,
        )
        async for response in call:
            message = sealed_from_proto(response.frame)
            if finish:
                raise TruncatedStreamError("a frame arrived after the final frame")
            if message.type == MessageType.FRAME:
                payload = self._s2c.open(message, MessageType.FRAME, request_id, seq)
                transcript = transcript_next(transcript, seq, payload)
                seq += 1
                if first is None:
                    first = time.monotonic()
                pieces.append(pb.GenerationChunk.FromString(payload).text)
            else:
                payload = self._s2c.open(message, MessageType.FINAL, request_id, seq)
                finish = _check_final(
                    pb.GenerationFinal.FromString(payload), transcript
                ).finish_reason
        if not finish:
            raise TruncatedStreamError("the stream ended without its final frame")
        ended = time.monotonic()
        return "".join(pieces), finish, (first or ended) - started, ended - started

    async def end(self) -> None:
        if self._c2s is None:
            return
        request_id = self._next_id
        self._next_id += 1
        sealed = self._c2s.seal(MessageType.END, request_id, 0, b"")
        try:
            await self._stub.EndSession(
                pb.EndSessionRequest(session_id=self.session_id, end=sealed_to_proto(sealed)),
                timeout=self._timeout,
            )
        finally:
            self.wipe()

    def wipe(self) -> None:
        for key in (self._c2s, self._s2c):
            if key is not None:
                key.wipe()
        self._c2s = self._s2c = None


def _error_code(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name
    if isinstance(error, EncloudError):
        return type(error).__name__
    return f"client:{type(error).__name__}"


async def run_load(
    target: str,
    policy: Policy,
    *,
    clients: int,
    requests_per_client: int,
    max_new_tokens: int = 16,
    duration_seconds: float | None = None,
    prompt: Callable[[int, int], str] = default_prompt,
    credentials: grpc.ChannelCredentials | None = None,
    timeout_seconds: float = 300.0,
) -> LoadReport:
    """Run the bounded load; every client has its own channel and session."""
    report = LoadReport(clients, requests_per_client)
    started = time.monotonic()
    stop_at = started + duration_seconds if duration_seconds is not None else None

    async def one_client(client: int) -> None:
        channel = (
            grpc.aio.secure_channel(target, credentials)
            if credentials is not None
            else grpc.aio.insecure_channel(target)
        )
        session = AioSession(pb_grpc.InferenceServiceStub(channel), policy, timeout_seconds)
        try:
            try:
                await session.open()
            except (grpc.aio.AioRpcError, EncloudError) as error:
                report.errors[_error_code(error)] += 1
                return
            for index in range(requests_per_client):
                if stop_at is not None and time.monotonic() >= stop_at:
                    break
                text_prompt = prompt(client, index)
                try:
                    text, finish, ttft, latency = await session.stream(text_prompt, max_new_tokens)
                except (grpc.aio.AioRpcError, EncloudError) as error:
                    report.errors[_error_code(error)] += 1
                    continue
                report.results.append(
                    RequestResult(
                        client,
                        index,
                        text_prompt,
                        text,
                        finish,
                        session.session_id,
                        ttft,
                        latency,
                    )
                )
            try:
                await session.end()
            except grpc.aio.AioRpcError as error:
                report.errors[f"EndSession:{_error_code(error)}"] += 1
        finally:
            session.wipe()
            await channel.close()

    await asyncio.gather(*(one_client(c) for c in range(clients)))
    report.wall_seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--duration", type=float, default=None, help="seconds; then stop")
    parser.add_argument("--ca", type=Path, default=None, help="PEM CA of a TLS server")
    args = parser.parse_args(argv)
    credentials = (
        grpc.ssl_channel_credentials(root_certificates=args.ca.read_bytes()) if args.ca else None
    )
    requests = args.requests if args.duration is None else 1_000_000_000
    report = asyncio.run(
        run_load(
            args.target,
            load_policy(args.policy),
            clients=args.clients,
            requests_per_client=requests,
            max_new_tokens=args.max_new_tokens,
            duration_seconds=args.duration,
            credentials=credentials,
        )
    )
    print(json.dumps(report.summary(), indent=2))
    return 0 if not report.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
