"""The shared protocol v1 test vectors (tests/vectors) against the Python reference.

Two things are checked: the committed JSON is exactly what tests/vectors/generate.py
produces now (so a change that alters any byte on the wire fails here), and every
vector, positive and negative, holds for the real client code (encoding, handshake,
envelope, stream reader, event log, verifier), negative ones raising the named error.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from encloud.protocol import errors, eventlog, release_order, sealed_file
from encloud.protocol.embedding import (
    embedding_request,
    embedding_response,
    open_embeddings,
    padded_rows,
)
from encloud.protocol.encoding import encode, u8, u16, u32, u64
from encloud.protocol.envelope import (
    PAD_BUCKETS,
    MessageType,
    OpeningKey,
    Sealed,
    associated_data,
    pad,
    transcript_next,
    transcript_start,
    unpad,
)
from encloud.protocol.evidence import Evidence
from encloud.protocol.generation import StreamReader, check_final
from encloud.protocol.handshake import (
    SUITE_V1,
    KeyOpenError,
    client_commitment,
    derive_traffic_keys,
    handshake_hash,
    open_key,
    opens_commitment,
    quote_qualifying_data,
    release_info,
    sentinel_qualifying_data,
    split_enc,
)
from encloud.protocol.policy import parse_policy
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.verifier import _check_sequence, spki_der, verify
from encloud.server.inference.manifest import compute_model_digest

pytestmark = pytest.mark.unit

VECTORS = Path(__file__).resolve().parent / "vectors"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("encloud_vectors", VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / f"{name}.json").read_text())


def b(value: str) -> bytes:
    return bytes.fromhex(value)


def sealed(obj: dict[str, Any]) -> Sealed:
    return Sealed(obj["type"], int(obj["request_id"]), obj["seq"], b(obj["sealed"]))


def error_class(name: str) -> type[Exception]:
    if name == "KeyOpenError":
        return KeyOpenError
    return getattr(errors, name)


def test_committed_vectors_are_what_the_generator_makes() -> None:
    texts = _generator().build()
    assert sorted(texts) == sorted(p.stem for p in VECTORS.glob("*.json"))
    for name, text in texts.items():
        assert (VECTORS / f"{name}.json").read_text() == text, f"{name}.json is stale"


# --- encoding -------------------------------------------------------------------------


def _field(value: Any) -> bytes:
    return bytes(value["zeros"]) if isinstance(value, dict) else b(value)


def test_encoding() -> None:
    v = load("encoding")
    assert SUITE_V1.encoded() == b(v["suite_v1"])
    packers = {"u8": u8, "u16": u16, "u32": u32, "u64": u64}
    for case in v["integers"]:
        assert packers[case["name"]](int(case["value"])) == b(case["bytes"])
    for case in v["cases"]:
        encoded = encode(case["label"], *(_field(f) for f in case["fields"]))
        assert hashlib.sha256(encoded).hexdigest() == case["sha256"]
        if "encoded" in case:
            assert encoded == b(case["encoded"])
    assert encode("ab", b"\x01", b"\x02\x03") == b(v["cases"][0]["encoded"])
    for case in v["errors"]:
        with pytest.raises(ValueError):
            encode(case["label"], *(_field(f) for f in case["fields"]))


# --- handshake --------------------------------------------------------------------------


def test_handshake() -> None:
    v = load("handshake")
    nonce, pub, sid, ttl = b(v["nonce"]), b(v["session_public_key"]), b(v["session_id"]), 600
    assert v["ttl_seconds"] == ttl
    key = X25519PrivateKey.from_private_bytes(b(v["session_private_key"]))
    assert key.public_key().public_bytes_raw() == pub
    secret_c = b(v["client_secret"])
    commitment = client_commitment(secret_c)
    assert commitment == b(v["client_commitment"])
    assert commitment == hashlib.sha256(b(v["client_commitment_encoded"])).digest()
    q = quote_qualifying_data(SUITE_V1, nonce, commitment, pub, sid, ttl)
    assert q == b(v["qualifying_data"]) == hashlib.sha256(b(v["quote_encoded"])).digest()
    h_ev = hashlib.sha256(b(v["quote_attest"])).digest()
    assert h_ev == b(v["attest_digest"])
    info = release_info(SUITE_V1, sid, h_ev)
    assert info == b(v["release_info"])
    sealed_key = b(v["sealed_key"])
    assert split_enc(SUITE_V1, sealed_key) == b(v["enc"])
    dek, secret, opened_secret = open_key(SUITE_V1, key, sealed_key, info)
    assert bytes(dek) == b(v["dek"]) and bytes(secret) == b(v["session_secret"])
    assert bytes(dek + secret + opened_secret) == b(v["sealed_plaintext"])
    assert opens_commitment(commitment, opened_secret)
    h_hs = handshake_hash(SUITE_V1, nonce, pub, sid, ttl, h_ev, b(v["enc"]))
    assert h_hs == b(v["handshake_hash"]) == hashlib.sha256(b(v["handshake_encoded"])).digest()
    keys = derive_traffic_keys(dek, secret, h_hs)
    assert bytes(keys.c2s) == b(v["k_c2s"])
    assert bytes(keys.s2c) == b(v["k_s2c"])
    assert bytes(keys.kc) == b(v["k_kc"])
    opener = OpeningKey(bytearray(keys.kc), sid)
    assert opener.open(sealed(v["key_confirmation"]), MessageType.KEY_CONFIRM, 0, 0) == h_hs


@pytest.mark.parametrize("case", load("handshake")["hpke_negative"], ids=lambda c: c["name"])
def test_hpke_negative(case: dict[str, Any]) -> None:
    key = X25519PrivateKey.from_private_bytes(b(case["recipient_private_key"]))
    with pytest.raises(error_class(case["error"])):
        open_key(SUITE_V1, key, b(case["sealed_key"]), b(case["info"]))


@pytest.mark.parametrize("case", load("handshake")["commitment_negative"], ids=lambda c: c["name"])
def test_commitment_negative(case: dict[str, Any]) -> None:
    # It opens as HPKE, but its client secret does not open the session's commitment.
    key = X25519PrivateKey.from_private_bytes(b(case["recipient_private_key"]))
    _, _, opened = open_key(SUITE_V1, key, b(case["sealed_key"]), b(case["info"]))
    assert case["error"] == "KeyReleaseRefused"
    assert not opens_commitment(b(case["client_commitment"]), opened)


@pytest.mark.parametrize(
    "case", load("handshake")["key_confirmation_negative"], ids=lambda c: c["name"]
)
def test_key_confirmation_negative(case: dict[str, Any]) -> None:
    """What Client.release_key does with the reply, on the vector's bytes."""
    v = load("handshake")
    opener = OpeningKey(bytearray(b(v["k_kc"])), b(v["session_id"]))

    def confirm() -> None:
        try:
            proof = opener.open(sealed(case["key_confirmation"]), MessageType.KEY_CONFIRM, 0, 0)
        except errors.EnvelopeError as error:
            raise errors.KeyConfirmationError("no proof") from error
        if proof != b(v["handshake_hash"]):
            raise errors.KeyConfirmationError("other handshake")

    with pytest.raises(error_class(case["error"])):
        confirm()


# --- envelope ---------------------------------------------------------------------------------


def test_envelope_positive() -> None:
    v = load("envelope")
    sid = b(v["session_id"])
    assert {m.name: bucket for m, bucket in PAD_BUCKETS.items()} == v["pad_buckets"]
    for case in v["associated_data"]:
        aad = associated_data(case["type"], sid, int(case["request_id"]), case["seq"])
        assert aad == b(case["associated_data"])
    for case in v["padding"]:
        assert pad(b(case["payload"]), case["bucket"]) == b(case["padded"])
        assert unpad(b(case["padded"]), case["bucket"]) == b(case["payload"])
    for case in v["sealed"]:
        message_type = MessageType[case["name"]]
        assert case["type"] == message_type
        assert b(case["sealed"])[:12] == b(case["nonce"])
        assert pad(b(case["payload"]), PAD_BUCKETS[message_type]) == b(case["padded"])
        assert associated_data(message_type, sid, case["request_id"], case["seq"]) == b(
            case["associated_data"]
        )
        opener = OpeningKey(bytearray(b(v["keys"][case["key"]])), sid)
        payload = opener.open(sealed(case), message_type, case["request_id"], case["seq"])
        assert payload == b(case["payload"])


def test_envelope_unpad_negative() -> None:
    for case in load("envelope")["unpad_negative"]:
        with pytest.raises(error_class(case["error"])):
            unpad(b(case["padded"]), case["bucket"])


@pytest.mark.parametrize("case", load("envelope")["negative"], ids=lambda c: c["name"])
def test_envelope_negative(case: dict[str, Any]) -> None:
    v = load("envelope")
    opener = OpeningKey(bytearray(b(v["keys"][case["key"]])), b(v["session_id"]))
    expected = case["expected"]
    with pytest.raises(error_class(case["error"])):
        opener.open(
            sealed(case),
            MessageType(expected["type"]),
            expected["request_id"],
            expected["seq"],
        )


# --- stream and transcript ---------------------------------------------------------------------


def test_transcript() -> None:
    v = load("stream")
    sid = b(v["session_id"])
    request = sealed(v["request"])
    t = transcript_start(sid, v["request_id"], request.data)
    assert t == hashlib.sha256(b(v["transcript_encoded"])).digest()
    chain = [t]
    for seq, payload in enumerate(v["frame_payloads"]):
        chain.append(transcript_next(chain[-1], seq, b(payload)))
    assert [c.hex() for c in chain] == v["transcripts"]
    opener = OpeningKey(bytearray(b(v["keys"]["c2s"])), sid)
    assert opener.open(request, MessageType.REQUEST, v["request_id"], 0) == b(v["request_payload"])


def _run_stream(v: dict[str, Any], messages: list[dict[str, Any]]) -> tuple[list[str], Any]:
    opener = OpeningKey(bytearray(b(v["keys"]["s2c"])), b(v["session_id"]))
    responses = iter(
        pb.StreamInferResponse(
            frame=pb.SealedMessage(
                type=m["type"], request_id=m["request_id"], seq=m["seq"], sealed=b(m["sealed"])
            )
        )
        for m in messages
    )
    reader = StreamReader(opener, v["request_id"], b(v["transcripts"][0]))
    pieces = [text for r in responses if (text := reader.feed(r.frame)) is not None]
    return pieces, reader.finish()


@pytest.mark.parametrize("case", load("stream")["cases"], ids=lambda c: c["name"])
def test_stream_cases(case: dict[str, Any]) -> None:
    v = load("stream")
    if "error" in case:
        with pytest.raises(error_class(case["error"])):
            _run_stream(v, case["messages"])
        return
    pieces, completion = _run_stream(v, case["messages"])
    expect = case["expect"]
    assert pieces == expect["pieces"]
    assert completion.finish_reason == expect["finish_reason"]
    assert completion.prompt_tokens == expect["prompt_tokens"]
    assert completion.completion_tokens == expect["completion_tokens"]


def test_infer_response() -> None:
    v = load("stream")
    infer = v["infer"]
    sid = b(v["session_id"])
    request = sealed(infer["request"])
    t0 = transcript_start(sid, infer["request_id"], request.data)
    assert t0 == b(infer["transcript"])
    opener = OpeningKey(bytearray(b(v["keys"]["s2c"])), sid)
    payload = opener.open(sealed(infer["response"]), MessageType.RESPONSE, infer["request_id"], 0)
    assert payload == b(infer["response_payload"])
    response = pb.GenerationResponse.FromString(payload)
    completion = check_final(response.final, t0)
    assert response.text == infer["expect"]["text"]
    assert completion.finish_reason == infer["expect"]["finish_reason"]


# --- Embed -------------------------------------------------------------------------------------


def test_embed_request_and_buckets() -> None:
    v = load("embed")
    sid = b(v["session_id"])
    request = sealed(v["request"])
    assert transcript_start(sid, v["request_id"], request.data) == b(v["transcript"])
    opener = OpeningKey(bytearray(b(v["keys"]["c2s"])), sid)
    payload = opener.open(request, MessageType.EMBED_REQUEST, v["request_id"], 0)
    assert payload == b(v["request_payload"])
    assert payload == embedding_request(v["texts"], dimensions=v["dimensions"])
    parsed = pb.EmbeddingRequest.FromString(payload)
    assert list(parsed.texts) == v["texts"] and not parsed.unnormalized and not parsed.truncate
    for count, rows in v["row_buckets"].items():
        assert padded_rows(int(count), v["max_texts"]) == rows


def _open_embed(v: dict[str, Any], message: dict[str, Any]) -> Any:
    opener = OpeningKey(bytearray(b(v["keys"]["s2c"])), b(v["session_id"]))
    response = pb.SealedMessage(
        type=message["type"],
        request_id=message["request_id"],
        seq=message["seq"],
        sealed=b(message["sealed"]),
    )
    return open_embeddings(
        response, opener, v["request_id"], b(v["transcript"]), len(v["texts"]), v["dimensions"]
    )


@pytest.mark.parametrize("case", load("embed")["cases"], ids=lambda c: c["name"])
def test_embed_cases(case: dict[str, Any]) -> None:
    v = load("embed")
    if "error" in case:
        with pytest.raises(error_class(case["error"])):
            _open_embed(v, case["response"])
        return
    result = _open_embed(v, case["response"])
    assert result.vectors == v["expect"]["vectors"]
    assert result.dimensions == v["expect"]["dimensions"]
    assert result.prompt_tokens == v["expect"]["prompt_tokens"]


def test_embed_response_size_shows_only_the_bucket() -> None:
    """Every count in one bucket seals to the same size (docs/THREAT_MODEL.md)."""
    sizes = {
        count: len(
            pad(
                embedding_response(
                    bytes(count * 384 * 4),
                    count,
                    384,
                    padded_rows(count, 64),
                    7 + count * 300,
                    bytes(32),
                ),
                PAD_BUCKETS[MessageType.EMBED_RESPONSE],
            )
        )
        for count in range(1, 65)
    }
    by_bucket: dict[int, set[int]] = {}
    for count, size in sizes.items():
        by_bucket.setdefault(padded_rows(count, 64), set()).add(size)
    assert sorted(by_bucket) == [1, 8, 32, 64]
    assert all(len(found) == 1 for found in by_bucket.values()), by_bucket


# --- sealed files ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", load("sealed_file")["positive"], ids=lambda c: c["name"])
def test_sealed_file_opens_and_reseals_byte_for_byte(case: dict[str, Any]) -> None:
    v = load("sealed_file")
    key = b(v["key"])
    out = io.BytesIO()
    header = sealed_file.open_stream(io.BytesIO(b(case["sealed"])), out, key)
    assert out.getvalue() == b(case["plaintext"]) and header.key_id == case["key_id"]
    assert header.encode() == b(case["header"])
    again = io.BytesIO()
    sealed_file.seal_stream(
        io.BytesIO(b(case["plaintext"])),
        again,
        key,
        case["key_id"],
        salt=b(case["salt"]),
        nonce_prefix=b(case["nonce_prefix"]),
    )
    assert again.getvalue() == b(case["sealed"])


@pytest.mark.parametrize("case", load("sealed_file")["negative"], ids=lambda c: c["name"])
def test_sealed_file_refusals(case: dict[str, Any]) -> None:
    key = b(load("sealed_file")["key"])
    out = io.BytesIO()
    with pytest.raises(getattr(sealed_file, case["error"])):
        sealed_file.open_stream(io.BytesIO(b(case["sealed"])), out, key)


def test_sealed_file_under_another_key_id_than_expected() -> None:
    v = load("sealed_file")
    case = v["expected_key_id"]
    with pytest.raises(sealed_file.SealedFileKeyIdError):
        sealed_file.open_stream(
            io.BytesIO(b(case["sealed"])),
            io.BytesIO(),
            b(v["key"]),
            expected_key_id=case["expected"],
        )


# --- event log and model digest -----------------------------------------------------------------


def test_events_and_replay() -> None:
    v = load("eventlog")
    records = eventlog.parse(v["log"].encode("ascii"))
    assert len(records) == len(v["events"])
    pcr = bytes(32)
    for record, step in zip(records, v["events"], strict=True):
        event = eventlog.WorkloadEvent(step["event_type"], b(step["data"]))
        assert event.measured_bytes() == b(step["measured"])
        assert event.digest() == b(step["digest"]) == record.digest
        pcr = eventlog.extend(pcr, record.digest)
        assert pcr == b(step["pcr_after"])
        assert record.to_json_line().decode() == step["line"]
    assert eventlog.replay(records) == pcr


@pytest.mark.parametrize("case", load("eventlog")["sequences"], ids=lambda c: c["name"])
def test_startup_sequences(case: dict[str, Any]) -> None:
    records = eventlog.parse(case["log"].encode("ascii"))
    if "error" in case:
        with pytest.raises(error_class(case["error"])):
            _check_sequence(records)
        return
    startups = _check_sequence(records)
    assert [{r: d.hex() for r, d in models.items()} for models, _ in startups] == case["startups"]


def test_model_digest() -> None:
    md = load("eventlog")["model_digest"]
    files = {path: base64.b64decode(data) for path, data in md["files"].items()}
    digests = {path: hashlib.sha256(data).digest() for path, data in files.items()}
    assert {p: d.hex() for p, d in digests.items()} == md["file_sha256"]
    assert sorted(files, key=lambda p: p.encode()) == md["sorted_paths"]
    assert compute_model_digest(digests, md["chat_template"]) == b(md["model_digest"])
    assert hashlib.sha256(b(md["encoded"])).digest() == b(md["model_digest"])


def test_canonical_json() -> None:
    for case in load("eventlog")["canonical_json"]:
        value = json.loads(case["json"])
        assert (eventlog.canonical_json(value) == case["json"].encode()) is case["canonical"]


# --- evidence ---------------------------------------------------------------------


def _evidence(obj: dict[str, Any]) -> Evidence:
    return Evidence(
        quote_attest=b(obj["quote_attest"]),
        quote_signature=b(obj["quote_signature"]),
        ak_public=b(obj["ak_public"]),
        pcr_values={int(i): b(value) for i, value in obj["pcr_values"].items()},
        workload_event_log=b(obj["workload_event_log"]),
        pcr_hash_algorithm=obj["pcr_hash_algorithm"],
        ak_certificate_chain=tuple(b(c) for c in obj["ak_certificate_chain"]),
    )


def _verify(v: dict[str, Any], case: dict[str, Any]) -> Any:
    client = case["client"]
    q = quote_qualifying_data(
        SUITE_V1,
        b(client["nonce"]),
        b(client["client_commitment"]),
        b(client["session_public_key"]),
        b(client["session_id"]),
        client["ttl_seconds"],
    )
    policy = parse_policy(v["policies"][case["policy"]].encode())
    return verify(
        _evidence(case["evidence"]),
        policy,
        expected_qualifying_data=q,
        session_ttl_seconds=client["ttl_seconds"],
    )


def test_evidence_positive() -> None:
    v = load("evidence")
    for case in v["positive"]:
        verified = _verify(v, case)
        expect = case["expect"]
        assert verified.attest_digest == b(expect["attest_digest"])
        assert verified.ak_fingerprint == expect["ak_fingerprint"]
        assert spki_der(b(case["evidence"]["ak_public"])) == b(expect["ak_spki"])
        assert verified.model_digest == b(expect["model_digest"])
        assert verified.workload_pcr_value == b(expect["workload_pcr_value"])
        assert eventlog.canonical_json(verified.runtime_event) == b(expect["runtime_event"])


@pytest.mark.parametrize("case", load("evidence")["negative"], ids=lambda c: c["name"])
def test_evidence_negative(case: dict[str, Any]) -> None:
    v = load("evidence")
    with pytest.raises(errors.VerificationError) as refused:
        _verify(v, case)
    assert type(refused.value).__name__ == case["error"]


# --- Sentinel: release orders and the key broker's qualifying data ------------------------------


def _owner() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(b(load("sentinel")["owner_public_key"]))


def test_release_order_verifies_and_its_digest() -> None:
    v = load("sentinel")
    order = release_order.verify_order(v["order"]["signed"].encode(), _owner(), now=v["now"])
    assert order.signed_bytes() == b(v["order"]["signed_message"])
    assert order.digest() == b(v["order"]["digest"])
    with pytest.raises(errors.ReleaseOrderExpiredError):
        release_order.verify_order(v["order"]["signed"].encode(), _owner(), now=order.expires_at)


@pytest.mark.parametrize("case", load("sentinel")["negative_orders"], ids=lambda c: c["name"])
def test_release_order_refusals(case: dict[str, Any]) -> None:
    v = load("sentinel")
    with pytest.raises(getattr(errors, case["error"])):
        release_order.verify_order(case["signed"].encode(), _owner(), now=v["now"])


def test_sentinel_qualifying_data() -> None:
    q = load("sentinel")["qualifying_data"]
    got = sentinel_qualifying_data(
        SUITE_V1, b(q["nonce"]), b(q["order_digest"]), b(q["hpke_public_key"])
    )
    assert hashlib.sha256(b(q["encoded"])).digest() == got == b(q["q"])


def test_sentinel_import_and_release_infos_and_a_released_key() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from encloud.protocol import key_broker
    from encloud.protocol.handshake import KeyOpenError

    v = load("sentinel")
    imp = v["import_info"]
    assert key_broker.import_info(imp["key_id"], imp["version"]) == b(imp["encoded"])
    r = v["release"]
    info = key_broker.release_info(
        SUITE_V1, b(r["nonce"]), b(r["order_digest"]), r["key_id"], r["version"]
    )
    assert info == b(r["info"])
    private = X25519PrivateKey.from_private_bytes(b(r["workload_private_key"]))
    assert key_broker.open_data_key(SUITE_V1, private, b(r["sealed_key"]), info) == b(r["key"])
    other = key_broker.release_info(
        SUITE_V1, b(r["nonce"]), b(r["order_digest"]), r["key_id"], r["refused_as_version"]
    )
    with pytest.raises(KeyOpenError):
        key_broker.open_data_key(SUITE_V1, private, b(r["sealed_key"]), other)


@pytest.mark.parametrize("case", load("sentinel")["cross_use"], ids=lambda c: c["name"])
def test_a_quote_only_satisfies_its_own_label(case: dict[str, Any]) -> None:
    """A session quote never satisfies Sentinel; a Sentinel quote never opens a session."""
    v = load("sentinel")

    def run() -> Any:
        return verify(
            _evidence(case["evidence"]),
            parse_policy(v["policy"].encode()),
            expected_qualifying_data=b(case["expected_qualifying_data"]),
            session_ttl_seconds=v["ttl_seconds"],
        )

    if "error" in case:
        with pytest.raises(getattr(errors, case["error"])):
            run()
    else:
        assert run().attest_digest == hashlib.sha256(b(case["evidence"]["quote_attest"])).digest()


# --- policy completeness and the GCE identity (policy.json) -------------------------------


@pytest.mark.parametrize("case", load("policy")["policies"], ids=lambda c: c["name"])
def test_policy_vectors(case: dict[str, Any]) -> None:
    data = case["policy"].encode()
    if case["expect"] == "complete":
        parse_policy(data)
    elif case["expect"] == "incomplete":
        with pytest.raises(errors.PolicyIncompleteError) as info:
            parse_policy(data)
        assert info.value.gaps == case["gaps"]
    else:
        with pytest.raises(errors.PolicyError, match=re.escape(f"policy field '{case['field']}'")):
            parse_policy(data)


@pytest.mark.parametrize("case", load("policy")["gce_identity"], ids=lambda c: c["name"])
def test_gce_identity_vectors(case: dict[str, Any]) -> None:
    from encloud.protocol.policy import gce_pin_from_obj
    from encloud.protocol.verifier import check_gce_identity

    pin = gce_pin_from_obj(case["pin"]) if case["pin"] is not None else None
    if case["expect"] == "ok":
        check_gce_identity(b(case["leaf"]), pin)
    else:
        with pytest.raises(error_class(case["expect"])):
            check_gce_identity(b(case["leaf"]), pin)


@pytest.mark.parametrize("case", load("policy")["chains"], ids=lambda c: c["name"])
def test_ak_certificate_chain_vectors(case: dict[str, Any]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from encloud.protocol.verifier import check_certificate_chain

    root = x509.load_pem_x509_certificate(case["root"].encode()).public_bytes(
        serialization.Encoding.DER
    )
    chain = tuple(b(c) for c in case["chain"])
    args = (chain, (root,), b(case["ak_spki"]), case["gce_pinned"])
    if case["expect"] == "ok":
        check_certificate_chain(*args)
    else:
        with pytest.raises(error_class(case["expect"])):
            check_certificate_chain(*args)


# --- the audit log (audit.json) -----------------------------------------------------------------


def _audit_files(tmp_path: Path, log: str, checkpoints: str) -> tuple[Path, Path]:
    log_path, cp_path = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.checkpoints"
    log_path.write_bytes(log.encode("utf-8"))
    cp_path.write_bytes(checkpoints.encode("utf-8"))
    return log_path, cp_path


def test_audit_log_vector_verifies(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from encloud.protocol.audit import verify_log

    v = load("audit")
    key = load_pem_public_key(v["checkpoint_public_key"].encode())
    result = verify_log(*_audit_files(tmp_path, v["log"], v["checkpoints"]), key)  # type: ignore[arg-type]
    expect = v["expect"]
    assert (result.entries, result.anchored_through, result.checkpoints) == (
        expect["entries"],
        expect["anchored_through"],
        expect["checkpoints"],
    )
    lines = v["log"].splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(len(lines)))


@pytest.mark.parametrize("case", load("audit")["negative"], ids=lambda c: c["name"])
def test_audit_log_vector_faults(tmp_path: Path, case: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from encloud.protocol.audit import verify_log

    key = load_pem_public_key(load("audit")["checkpoint_public_key"].encode())
    with pytest.raises(errors.AuditLogError) as fault:
        verify_log(*_audit_files(tmp_path, case["log"], case["checkpoints"]), key)  # type: ignore[arg-type]
    if case["error_seq"] is not None:
        assert fault.value.seq == case["error_seq"]


def test_xwing_suite_both_ways() -> None:
    from encloud.protocol.handshake import SUITE_XWING, xwing_private_key

    h = load("handshake")
    v = h["xwing"]
    assert SUITE_XWING.encoded().hex() == v["suite"]["encoded"]
    public = b(v["session_public_key"])
    assert len(public) == 1216
    q = quote_qualifying_data(
        SUITE_XWING,
        b(h["nonce"]),
        b(h["client_commitment"]),
        public,
        b(h["session_id"]),
        h["ttl_seconds"],
    )
    assert q == b(v["qualifying_data"])
    key = xwing_private_key(b(v["session_private_seed"]))
    for who in ("sealed_by_python", "sealed_by_node"):
        parts = open_key(SUITE_XWING, key, b(v[who]), b(v["release_info"]))
        assert b"".join(bytes(p) for p in parts) == b(v["sealed_plaintext"]), who
