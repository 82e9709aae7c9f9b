"""Property tests: on arbitrary bytes every parser raises only its typed error.

TPM structures (also mutated from valid ones in tests/test_verifier.py), the
workload event log, the policy, an audit line and a checkpoint line, the
evidence bundle, and the envelope's open path (OpeningKey.open, unpad). The CI
share is bounded by ENCLOUD_FUZZ_EXAMPLES (default 300 per property); a long run
sets it higher, e.g. ENCLOUD_FUZZ_EXAMPLES=100000 pytest -m fuzz.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import tpm_builders as b
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encloud.protocol import eventlog
from encloud.protocol.audit import AuditLog, parse_checkpoint, parse_line
from encloud.protocol.bundle import EvidenceBundle, parse_bundle
from encloud.protocol.embedding import embedding_request, embedding_response, open_embeddings
from encloud.protocol.envelope import (
    PAD_BUCKETS,
    MessageType,
    OpeningKey,
    Sealed,
    SealingKey,
    unpad,
)
from encloud.protocol.errors import (
    AuditLogError,
    BundleError,
    DecryptError,
    EmbeddingFormatError,
    EventLogFormatError,
    HeaderMismatchError,
    MalformedEvidenceError,
    PolicyError,
    TranscriptMismatchError,
)
from encloud.protocol.faults import InvalidArgumentError
from encloud.protocol.handshake import SUITE_V1
from encloud.protocol.policy import parse_policy
from encloud.protocol.tpm_structures import (
    parse_attest,
    parse_pcr_selection,
    parse_public,
    parse_signature,
)
from encloud.protocol.v2 import encloud_pb2 as pb

pytestmark = [pytest.mark.fuzz, pytest.mark.unit]

EXAMPLES = int(os.environ.get("ENCLOUD_FUZZ_EXAMPLES", "300"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

_SC = b.make_scenario(ec.generate_private_key(ec.SECP256R1()))
_EVIDENCE = _SC.evidence()
_LOG = eventlog.serialize(_SC.records)
_POLICY = _SC.policy.to_json()
_KEY = Ed25519PrivateKey.generate()
_SESSION = bytes(range(16))
_SEAL_KEY = bytes(range(32))


def _valid_audit_lines() -> tuple[bytes, bytes]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        log = AuditLog(Path(tmp) / "a.jsonl", checkpoint_key=_KEY)
        log.append({"event": "attestation", "outcome": "pass"})
        return (
            log.path.read_bytes().splitlines()[-1],
            log.checkpoints_path.read_bytes().splitlines()[-1],
        )


_AUDIT_LINE, _CHECKPOINT_LINE = _valid_audit_lines()


def _bundle() -> bytes:
    return EvidenceBundle(
        target="127.0.0.1:1",
        time=1,
        suite=SUITE_V1,
        nonce=bytes(32),
        client_commitment=bytes(32),
        session_id=bytes(16),
        session_public_key=bytes(32),
        ttl_seconds=600,
        policy_sha256=bytes(32),
        outcome="pass",
        failed_check=None,
        evidence=_EVIDENCE,
    ).to_json()


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and valid bytes truncated, with one byte changed, or extended."""
    return st.one_of(
        st.binary(max_size=600),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
            lambda t: valid[: t[0]] + bytes([t[1]]) + valid[t[0] + 1 :]
        ),
        st.binary(min_size=1, max_size=8).map(lambda extra: valid + extra),
    )


def json_mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Also JSON documents whose values were replaced by other JSON values."""
    obj = json.loads(valid)
    leaves = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=5), children, max_size=3)
        ),
        max_leaves=6,
    )

    def replace(pair: tuple[str, object]) -> bytes:
        key, value = pair
        changed = dict(obj)
        changed[key] = value
        return json.dumps(changed).encode()

    return st.one_of(
        mutations(valid),
        st.tuples(st.sampled_from(sorted(obj)), leaves).map(replace),
    )


def only(error: type[Exception], parse, data: bytes) -> None:
    with contextlib.suppress(error):
        parse(data)


# --- TPM structures -----------------------------------------------------------------------


@PROPERTY
@given(mutations(_SC.ak_public))
def test_tpmt_public(data: bytes) -> None:
    only(MalformedEvidenceError, parse_public, data)


@PROPERTY
@given(mutations(_EVIDENCE.quote_attest))
def test_tpms_attest(data: bytes) -> None:
    only(MalformedEvidenceError, parse_attest, data)


@PROPERTY
@given(mutations(_EVIDENCE.quote_signature))
def test_tpmt_signature(data: bytes) -> None:
    only(MalformedEvidenceError, parse_signature, data)


@PROPERTY
@given(mutations(b.pcr_selection([(b.SHA256, b.SELECTION)])))
def test_tpml_pcr_selection(data: bytes) -> None:
    only(MalformedEvidenceError, parse_pcr_selection, data)


# --- JSON formats ------------------------------------------------------------------------------


@PROPERTY
@given(mutations(_LOG))
def test_event_log(data: bytes) -> None:
    only(EventLogFormatError, eventlog.parse, data)


@PROPERTY
@given(json_mutations(_LOG.splitlines()[0]))
def test_event_log_record_values(data: bytes) -> None:
    only(EventLogFormatError, eventlog.parse, data + b"\n")


@PROPERTY
@given(json_mutations(_POLICY))
def test_policy(data: bytes) -> None:
    only(PolicyError, parse_policy, data)


@PROPERTY
@given(json_mutations(_AUDIT_LINE))
def test_audit_line(data: bytes) -> None:
    only(AuditLogError, parse_line, data)


@PROPERTY
@given(json_mutations(_CHECKPOINT_LINE))
def test_audit_checkpoint_line(data: bytes) -> None:
    only(AuditLogError, lambda d: parse_checkpoint(d, _KEY.public_key()), data)


@PROPERTY
@given(json_mutations(_bundle()))
def test_evidence_bundle(data: bytes) -> None:
    only(BundleError, parse_bundle, data)


# --- the envelope's open path -------------------------------------------------------------------


def _valid_sealed(message_type: MessageType) -> Sealed:
    return SealingKey(bytearray(_SEAL_KEY), _SESSION).seal(message_type, 7, 0, b"payload")


@PROPERTY
@given(
    st.sampled_from(list(MessageType)),
    st.integers(0, 10),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.data(),
)
def test_envelope_open(message_type, wire_type, request_id, seq, data) -> None:
    valid = _valid_sealed(message_type)
    sealed = Sealed(wire_type, request_id, seq, data.draw(mutations(valid.data)))
    opener = OpeningKey(bytearray(_SEAL_KEY), _SESSION)
    with contextlib.suppress(DecryptError, HeaderMismatchError):
        opener.open(sealed, message_type, request_id, seq)
    with contextlib.suppress(DecryptError):
        opener.open_unchecked_header(sealed)


@PROPERTY
@given(st.sampled_from(sorted(set(PAD_BUCKETS.values()))), st.binary(max_size=2100))
def test_unpad(bucket: int, data: bytes) -> None:
    only(DecryptError, lambda d: unpad(d, bucket), data)


# --- Embed payloads ------------------------------------------------------------------------------

_MODEL_EVENT = eventlog.model_event(eventlog.ROLE_EMBEDDINGS, bytes(range(32))).data


@PROPERTY
@given(json_mutations(_MODEL_EVENT))
def test_model_event(data: bytes) -> None:
    only(EventLogFormatError, eventlog.parse_model_event, data)


_EMBED_RESPONSE = embedding_response(bytes(2 * 4 * 4), 2, 4, 8, 9, bytes(32))


@PROPERTY
@given(mutations(_EMBED_RESPONSE))
def test_embedding_response(payload: bytes) -> None:
    """An authenticated payload of any shape: the client raises only its typed errors."""
    sealed = SealingKey(bytearray(_SEAL_KEY), _SESSION).seal(
        MessageType.EMBED_RESPONSE, 3, 0, payload
    )
    message = pb.SealedMessage(type=sealed.type, request_id=3, seq=0, sealed=sealed.data)
    opener = OpeningKey(bytearray(_SEAL_KEY), _SESSION)
    only(
        (EmbeddingFormatError, TranscriptMismatchError),
        lambda m: open_embeddings(m, opener, 3, bytes(32), 2, 4),
        message,
    )


@PROPERTY
@given(mutations(embedding_request(["a text", "another"], dimensions=8)))
def test_embedding_request_on_the_server(payload: bytes) -> None:
    from encloud.server.grpc_converters import embed_params_from_payload
    from encloud.server.settings import Settings

    only(InvalidArgumentError, lambda p: embed_params_from_payload(p, Settings()), payload)


_SIGNED_ORDER = json.loads((Path(__file__).parent / "vectors" / "sentinel.json").read_text())[
    "order"
]["signed"].encode()


@PROPERTY
@given(json_mutations(_SIGNED_ORDER))
def test_release_order(data: bytes) -> None:
    from encloud.protocol.errors import ReleaseOrderFormatError
    from encloud.protocol.release_order import parse_order

    only(ReleaseOrderFormatError, parse_order, data)
