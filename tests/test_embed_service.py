"""The Embed RPC through a real server on swtpm that serves the chat model and the embedding
model (all-MiniLM-L6-v2) side by side: the sealed round trip against the model run in this
process, both models in one verified event log, the policy per role, tampered and replayed
messages (one test per attack, each expecting its typed error), the limits, the response
padding, what the log, the metrics and the errors never show, and a server that serves
embeddings only."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from conftest import RecordingInterceptor, Wire, sealed_by_client
from stack import Stack, running_stack
from waiting import samples

from encloud.cli.reference import policy_from_manifest
from encloud.client import NO_AUDIT, Client
from encloud.client._status import service_error
from encloud.protocol.envelope import MessageType
from encloud.protocol.errors import (
    DecryptError,
    EmbeddingFormatError,
    HeaderMismatchError,
    ModelNotAllowedError,
    RoleNotAttestedError,
    ServiceError,
    TranscriptMismatchError,
)
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.v2 import encloud_pb2_grpc as pb_grpc
from encloud.server.inference.embedder import Embedder
from encloud.server.inference.manifest import verify_model_folder

pytestmark = [pytest.mark.embeddings, pytest.mark.e2e]

ENCLOUD = str(Path(sys.executable).with_name("encloud"))
TEXTS = [
    "The cat sleeps on the warm windowsill.",
    "Interest rates rose again this quarter.",
    "Le chat dort sur le rebord de la fenêtre.",
]
CANARY = "zebra-canary-7f3a91 my account number is 4417"
# Small limits so the limit tests are cheap; each is measured into the runtime event.
SETTINGS = {"embed_max_texts": 40, "embed_max_total_tokens": 2000}


@pytest.fixture(scope="module")
def stack(model_dir: Path, embeddings_model_dir: Path) -> Iterator[Stack]:
    """This module's server: chat and embeddings, in one start-up."""
    with (
        tempfile.TemporaryDirectory(prefix="encloud-embed-") as tmp,
        running_stack(
            Path(tmp), model_dir, embeddings_model_dir=embeddings_model_dir, **SETTINGS
        ) as running,
    ):
        yield running


@pytest.fixture(scope="module")
def reference(embeddings_model_dir: Path) -> Iterator[Embedder]:
    """The same model run in this process, for comparison."""
    embedder = Embedder.load(embeddings_model_dir, threads=2)
    yield embedder
    embedder.close()


def _bound(connect) -> Client:
    client = connect()
    client.attest()
    client.release_key()
    return client


def _stub(address: str) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(grpc.insecure_channel(address))


def _status(call) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = service_error(info.value)
    return info.value.code(), error.reason, str(error)


def _close(a: list[float], b: list[float], tolerance: float = 1e-5) -> bool:
    return all(math.isclose(x, y, abs_tol=tolerance) for x, y in zip(a, b, strict=True))


# --- the round trip ---------------------------------------------------------------------------


def test_sealed_embeddings_equal_the_model_run_here(connect, reference) -> None:
    client = _bound(connect)
    result = client.embed(TEXTS)
    expected = reference.embed(TEXTS)
    assert result.dimensions == reference.dimension == 384
    assert len(result.vectors) == len(TEXTS)
    for got, want in zip(result.vectors, expected.vectors.tolist(), strict=True):
        assert _close(got, want)
        assert math.isclose(sum(x * x for x in got), 1.0, abs_tol=1e-5)
    assert result.prompt_tokens == sum(reference.count_tokens(TEXTS))


def test_dimensions_and_normalisation_are_the_callers(connect, reference) -> None:
    client = _bound(connect)
    short = client.embed(TEXTS[:1], dimensions=64)
    raw = client.embed(TEXTS[:1], normalize=False)
    assert short.dimensions == 64 and len(short.vectors[0]) == 64
    assert math.isclose(sum(x * x for x in short.vectors[0]), 1.0, abs_tol=1e-5)
    assert _close(short.vectors[0], reference.embed(TEXTS[:1], dimensions=64).vectors[0].tolist())
    norm = math.sqrt(sum(x * x for x in raw.vectors[0]))
    assert abs(norm - 1.0) > 0.01  # the raw mean pool is not a unit vector
    full = client.embed(TEXTS[:1]).vectors[0]
    assert _close([x / norm for x in raw.vectors[0]], full)


def test_one_session_serves_chat_and_embeddings(connect, stack, embeddings_model_dir) -> None:
    client = _bound(connect)
    models = client.attestation.models
    assert models == {
        "chat": verify_model_folder(stack.model_dir).model_digest,
        "embeddings": verify_model_folder(embeddings_model_dir).model_digest,
    }
    event = client.attestation.runtime_event
    assert event["embedder"]["dimension"] == 384 and "engine" in event
    assert event["settings"]["embed_max_texts"] == SETTINGS["embed_max_texts"]
    assert client.infer([("user", "Say hi.")], max_new_tokens=4).text
    assert len(client.embed(["hello"]).vectors) == 1


def test_the_asyncio_client_embeds_concurrently(stack, reference) -> None:
    import asyncio

    from encloud.client import AsyncClient

    async def run() -> list[list[list[float]]]:
        async with AsyncClient(stack.address, stack.policy, audit_log=NO_AUDIT) as client:
            results = await asyncio.gather(*(client.embed([t]) for t in TEXTS))
            return [r.vectors for r in results]

    got = asyncio.run(run())
    want = reference.embed(TEXTS).vectors.tolist()
    assert all(_close(g[0], w) for g, w in zip(got, want, strict=True))


def test_concurrent_requests_all_answer_right(connect, reference) -> None:
    client = _bound(connect)
    texts = [f"Sentence number {i} is about topic {i % 5}." for i in range(16)]
    want = reference.embed(texts).vectors.tolist()
    results: dict[int, list[float]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = client.embed([texts[i]]).vectors[0]
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(_close(results[i], want[i]) for i in range(len(texts)))


# --- what the policy accepts ------------------------------------------------------------------


def test_a_policy_without_the_embedding_model_refuses_the_server(connect, stack) -> None:
    policy = replace(stack.policy, allowed_embedding_model_digests=())
    with pytest.raises(ModelNotAllowedError, match="embeddings model digest"):
        connect(policy=policy).attest()


def test_policy_from_manifest_names_both_models(connect, stack, embeddings_model_dir) -> None:
    runtime = _bound(connect).attestation.runtime_event
    pinned = list(stack.policy.pinned_public_keys)
    both = policy_from_manifest(
        [stack.model_dir],
        [runtime],
        embedding_model_dirs=[embeddings_model_dir],
        pinned_public_keys=pinned,
        pcr_selection=stack.policy.pcr_selection,
        workload_pcr=stack.policy.workload_pcr,
    )
    assert connect(policy=both).attest().models.keys() == {"chat", "embeddings"}
    chat_only = policy_from_manifest(
        [stack.model_dir],
        [runtime],
        pinned_public_keys=pinned,
        pcr_selection=stack.policy.pcr_selection,
        workload_pcr=stack.policy.workload_pcr,
    )
    with pytest.raises(ModelNotAllowedError):
        connect(policy=chat_only).attest()


# --- attacks on the envelope ------------------------------------------------------------------


def _last_sent(wire: Wire, method: str) -> bytes:
    return [data for name, data in wire.sent if name.endswith(method)][-1]


@pytest.mark.attack
def test_embed_request_replayed_with_the_same_id_is_refused(connect, wire, stack) -> None:
    _bound(connect).embed(TEXTS)
    request = pb.EmbedRequest.FromString(_last_sent(wire, "/Embed"))
    code, reason, _ = _status(lambda: _stub(stack.address).Embed(request))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")


@pytest.mark.attack
def test_embed_request_replayed_into_another_session_is_refused(connect, wire, stack) -> None:
    _bound(connect).embed(TEXTS)
    request = pb.EmbedRequest.FromString(_last_sent(wire, "/Embed"))
    request.session_id = _bound(connect)._session.session_id
    code, reason, _ = _status(lambda: _stub(stack.address).Embed(request))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ENVELOPE_REJECTED")


@pytest.mark.attack
def test_chat_request_presented_to_embed_is_refused(connect, wire, stack) -> None:
    client = _bound(connect)
    client.infer([("user", "Say hi.")], max_new_tokens=2)
    chat = pb.InferRequest.FromString(_last_sent(wire, "/Infer"))
    chat.request.request_id = 900
    request = pb.EmbedRequest(session_id=chat.session_id, request=chat.request)
    code, reason, _ = _status(lambda: _stub(stack.address).Embed(request))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ENVELOPE_REJECTED")


@pytest.mark.attack
def test_embed_request_relabelled_as_a_chat_request_is_refused(connect, wire, stack) -> None:
    client = _bound(connect)
    client.embed(TEXTS)
    sent = pb.EmbedRequest.FromString(_last_sent(wire, "/Embed"))
    forged = pb.SealedMessage()
    forged.CopyFrom(sent.request)
    forged.type = pb.MESSAGE_TYPE_REQUEST
    forged.request_id = 901
    request = pb.InferRequest(session_id=sent.session_id, request=forged)
    code, reason, _ = _status(lambda: _stub(stack.address).Infer(request))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ENVELOPE_REJECTED")


def _server_sealer(session):
    """A sealer with the server's key, copied from the client's opening key: a stand-in for
    a malicious server component that holds the session keys."""
    from encloud.protocol.envelope import SealingKey

    return SealingKey(bytearray(session.s2c._key), session.session_id)


def _tamper_embed(fn):
    def tamper(method, msg, _):
        if method.endswith("/Embed"):
            forged = pb.EmbedResponse()
            forged.CopyFrom(msg)
            fn(forged.response)
            return forged
        return msg

    return tamper


@pytest.mark.attack
def test_embed_response_bit_flipped_is_refused(connect, wire) -> None:
    client = _bound(connect)

    def flip(sealed: pb.SealedMessage) -> None:
        data = bytearray(sealed.sealed)
        data[40] ^= 1
        sealed.sealed = bytes(data)

    wire.tamper = _tamper_embed(flip)
    with pytest.raises(DecryptError):
        client.embed(TEXTS)


@pytest.mark.attack
def test_an_earlier_embed_response_replayed_is_refused(connect, wire) -> None:
    client = _bound(connect)
    client.embed(TEXTS)
    earlier = wire.received_of("/Embed")[-1].response

    def replay(sealed: pb.SealedMessage) -> None:
        sealed.CopyFrom(earlier)

    wire.tamper = _tamper_embed(replay)
    with pytest.raises(HeaderMismatchError):
        client.embed(TEXTS)


@pytest.mark.attack
def test_an_earlier_embed_response_relabelled_is_refused(connect, wire) -> None:
    client = _bound(connect)
    client.embed(TEXTS)
    earlier = wire.received_of("/Embed")[-1].response

    def relabel(sealed: pb.SealedMessage) -> None:
        request_id = sealed.request_id
        sealed.CopyFrom(earlier)
        sealed.request_id = request_id  # the header now matches; the tag binds the old id

    wire.tamper = _tamper_embed(relabel)
    with pytest.raises(DecryptError):
        client.embed(TEXTS)


@pytest.mark.attack
def test_a_chat_answer_presented_as_vectors_is_refused(connect, wire) -> None:
    client = _bound(connect)
    client.infer([("user", "Say hi.")], max_new_tokens=2)
    answer = wire.received_of("/Infer")[-1].response

    def swap(sealed: pb.SealedMessage) -> None:
        request_id = sealed.request_id
        sealed.CopyFrom(answer)
        sealed.request_id = request_id

    wire.tamper = _tamper_embed(swap)
    with pytest.raises(HeaderMismatchError):
        client.embed(TEXTS)


@pytest.mark.attack
def test_vectors_for_another_request_are_refused(connect, wire) -> None:
    """A server component holding the session keys answers with another request's vectors:
    the transcript hash binds each answer to the exact request it answers."""
    from encloud.protocol.embedding import embedding_response

    client = _bound(connect)
    session = client._session

    def other(sealed: pb.SealedMessage) -> None:
        payload = embedding_response(bytes(3 * 384 * 4), 3, 384, 8, 30, bytes(32))
        sealed.sealed = (
            _server_sealer(session)
            .seal(MessageType.EMBED_RESPONSE, sealed.request_id, 0, payload)
            .data
        )

    wire.tamper = _tamper_embed(other)
    with pytest.raises(TranscriptMismatchError):
        client.embed(TEXTS)


@pytest.mark.attack
def test_a_vector_dropped_by_a_key_holder_is_refused(connect, wire) -> None:
    from encloud.protocol.embedding import embedding_response
    from encloud.protocol.envelope import transcript_start

    client = _bound(connect)
    session = client._session

    def drop(sealed: pb.SealedMessage) -> None:
        request = pb.EmbedRequest.FromString(_last_sent(wire, "/Embed"))
        t0 = transcript_start(session.session_id, sealed.request_id, request.request.sealed)
        payload = embedding_response(bytes(2 * 384 * 4), 2, 384, 8, 30, t0)
        sealed.sealed = (
            _server_sealer(session)
            .seal(MessageType.EMBED_RESPONSE, sealed.request_id, 0, payload)
            .data
        )

    wire.tamper = _tamper_embed(drop)
    with pytest.raises(EmbeddingFormatError):
        client.embed(TEXTS)


# --- limits -----------------------------------------------------------------------------------


def test_too_many_texts_is_invalid_argument(connect) -> None:
    with pytest.raises(ServiceError) as refused:
        _bound(connect).embed(["x"] * (SETTINGS["embed_max_texts"] + 1))
    assert (refused.value.code, refused.value.reason) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
    assert "embed_max_texts" in str(refused.value)


def test_a_long_text_is_refused_by_index_unless_truncation_is_asked(connect, reference) -> None:
    client = _bound(connect)
    long_text = " ".join(["confidential"] * 400)
    assert reference.count_tokens([long_text])[0] > reference.max_tokens
    with pytest.raises(ServiceError) as refused:
        client.embed(["short", long_text])
    assert (refused.value.code, refused.value.reason) == ("INVALID_ARGUMENT", "TEXT_TOO_LONG")
    message = str(refused.value)
    assert "text 1" in message and "confidential" not in message
    assert str(reference.count_tokens([long_text])[0]) not in message
    cut = client.embed(["short", long_text], truncate=True)
    assert cut.prompt_tokens == reference.count_tokens(["short"])[0] + reference.max_tokens
    assert _close(cut.vectors[1], reference.embed([long_text]).vectors[0].tolist())


def test_dimensions_above_the_models_are_invalid_argument(connect) -> None:
    with pytest.raises(ServiceError) as refused:
        _bound(connect).embed(["x"], dimensions=385)
    assert refused.value.code == "INVALID_ARGUMENT"


def test_texts_above_the_total_token_limit_are_invalid_argument(connect) -> None:
    texts = [" ".join(["word"] * 100)] * 30  # about 3,000 tokens, limit 2,000
    with pytest.raises(ServiceError) as refused:
        _bound(connect).embed(texts)
    assert refused.value.code == "INVALID_ARGUMENT"
    assert "embed_max_total_tokens" in str(refused.value)


def test_an_empty_batch_never_leaves_the_client(connect, wire) -> None:
    client = _bound(connect)
    with pytest.raises(ValueError):
        client.embed([])
    with pytest.raises(TypeError):
        client.embed("one string, not a list")
    assert not [name for name, _ in wire.sent if name.endswith("/Embed")]


def test_invalid_utf8_in_a_text_is_invalid_request_payload(connect, stack) -> None:
    client = _bound(connect)
    session = client._session
    payload = b"\x0a\x02\xff\xfe"  # field 1 (texts), 2 bytes that are not UTF-8
    request = pb.EmbedRequest(
        session_id=session.session_id,
        request=sealed_by_client(session, MessageType.EMBED_REQUEST, payload),
    )
    code, reason, _ = _status(lambda: _stub(stack.address).Embed(request))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST_PAYLOAD")


# --- what an observer sees --------------------------------------------------------------------


def test_the_response_size_shows_the_bucket_not_the_count(connect, wire) -> None:
    client = _bound(connect)
    sizes = {}
    for count in (2, 5, 8, 9, 20):
        client.embed(TEXTS[:1] * count)
        sizes[count] = len(wire.received_of("/Embed")[-1].response.sealed)
    assert sizes[2] == sizes[5] == sizes[8]
    assert sizes[9] == sizes[20] > sizes[8]


def test_texts_and_vectors_never_reach_the_log_metrics_or_errors(connect, stack) -> None:
    client = _bound(connect)
    vector = client.embed([CANARY]).vectors[0]
    with pytest.raises(ServiceError) as refused:
        client.embed([CANARY, " ".join([CANARY] * 60)])
    shown = f"{vector[0]:.6f}"[2:]  # digits of the first component
    log = stack.server.log_text()
    metrics = "\n".join(f"{k} {v}" for k, v in samples(stack.server.metrics_address).items())
    for where in (log, metrics, str(refused.value)):
        assert "zebra-canary" not in where and "4417" not in where
    assert shown not in log
    completed = samples(stack.server.metrics_address)[
        ("encloud_embed_requests_total", (("outcome", "completed"),))
    ]
    assert completed >= 1


# --- the CLI and the proxy --------------------------------------------------------------------


def test_encloud_embed_prints_one_json_line_per_text(stack, reference) -> None:
    done = subprocess.run(
        [
            ENCLOUD,
            "embed",
            "--target",
            stack.address,
            "--policy",
            str(stack.server.policy_path),
            "--no-audit",
            "--dimensions",
            "8",
            *TEXTS[:2],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["index"] for line in lines] == [0, 1]
    want = reference.embed(TEXTS[:2], dimensions=8).vectors.tolist()
    assert all(_close(line["embedding"], w) for line, w in zip(lines, want, strict=True))
    assert "Attestation verified" in done.stderr and "embeddings model digest" in done.stderr


def test_the_openai_sdk_gets_embeddings_through_the_proxy(stack, tmp_path, reference) -> None:
    from test_proxy import _start_proxy, _stop

    proxy = _start_proxy(stack.address, stack.server.policy_path, tmp_path)
    try:
        sdk = proxy.sdk()
        listed = {m.id for m in sdk.models.list().data}
        assert listed == {"encloud", "encloud-embeddings"}
        got = sdk.embeddings.create(model="encloud-embeddings", input=TEXTS)  # base64 on the wire
        floats = sdk.embeddings.create(
            model="encloud-embeddings", input=TEXTS[0], encoding_format="float", dimensions=16
        )
        with pytest.raises(openai_error()) as wrong:
            sdk.embeddings.create(model="encloud", input="x")
    finally:
        _stop(proxy)
    want = reference.embed(TEXTS).vectors.tolist()
    assert [d.index for d in got.data] == [0, 1, 2]
    assert all(_close(d.embedding, w) for d, w in zip(got.data, want, strict=True))
    assert got.usage.prompt_tokens == sum(reference.count_tokens(TEXTS))
    assert _close(floats.data[0].embedding, reference.embed(TEXTS[:1], dimensions=16).vectors[0])
    assert wrong.value.status_code == 404


def openai_error() -> type[Exception]:
    import openai

    return openai.NotFoundError


# --- a server that serves embeddings only ------------------------------------------------------


def test_an_embeddings_only_server_refuses_chat_by_name(
    model_dir, embeddings_model_dir, tmp_path
) -> None:
    with running_stack(
        tmp_path,
        model_dir,
        serve_chat="false",
        embeddings_model_dir=embeddings_model_dir,
        embed_max_tokens_per_text=16,
    ) as only:
        assert only.policy.allowed_model_digests == ()
        channel = grpc.intercept_channel(
            grpc.insecure_channel(only.address), RecordingInterceptor(Wire())
        )
        with Client(only.address, only.policy, audit_log=NO_AUDIT, channel=channel) as client:
            attestation = client.attest()
            assert set(attestation.models) == {"embeddings"}
            assert "engine" not in attestation.runtime_event
            assert attestation.runtime_event["embedder"]["dimension"] == 384
            assert len(client.embed(["hello"]).vectors) == 1
            # The server's own per-text limit, below the model's 256, is where texts are cut.
            long_text = " ".join(["confidential"] * 40)
            with pytest.raises(ServiceError) as too_long:
                client.embed([long_text])
            assert too_long.value.reason == "TEXT_TOO_LONG"
            cut = client.embed([long_text], truncate=True)
            at_16 = Embedder.load(embeddings_model_dir, threads=2, max_tokens=16)
            try:
                want = at_16.embed([long_text]).vectors[0].tolist()
            finally:
                at_16.close()
            assert cut.prompt_tokens == 16 and _close(cut.vectors[0], want)
            with pytest.raises(RoleNotAttestedError, match="no chat model"):
                client.infer([("user", "hi")], max_new_tokens=2)
            session = client._session
            request = pb.InferRequest(
                session_id=session.session_id,
                request=sealed_by_client(session, MessageType.REQUEST),
            )
            code, reason, _ = _status(lambda: _stub(only.address).Infer(request))
        assert (code, reason) == (grpc.StatusCode.UNIMPLEMENTED, "MODEL_NOT_SERVED")


@pytest.mark.interop
def test_the_node_client_gets_the_same_vectors(stack, reference, node_client: str) -> None:
    """clients/node, written from docs/PROTOCOL.md: attests this two-model server under its
    policy, seals an Embed request and opens the vectors."""
    from conftest import NODE_DIR

    done = subprocess.run(
        [
            node_client,
            "bin/encloud-node.js",
            "embed",
            "--target",
            stack.address,
            "--policy",
            str(stack.server.policy_path),
            "--",
            *TEXTS,
        ],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    want = reference.embed(TEXTS).vectors.tolist()
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert all(_close(line["embedding"], w) for line, w in zip(lines, want, strict=True))


def test_encloud_loadgen_drives_embed_requests(stack) -> None:
    """`encloud loadgen --embed-texts N`: each client its own session, every answer checked."""
    done = subprocess.run(
        [
            ENCLOUD,
            "loadgen",
            "--target",
            stack.address,
            "--policy",
            str(stack.server.policy_path),
            "--no-audit",
            "--clients",
            "6",
            "--requests",
            "3",
            "--embed-texts",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["requests_ok"] == 18 and summary["errors"] == {}
    assert summary["sessions"] == 6 and summary["latency_ms"]["p50"] > 0
