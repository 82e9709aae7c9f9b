"""Tests of the quote verifier: a valid quote passes, each broken piece fails with its error."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from dataclasses import replace

import pytest
import tpm_builders as b
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encloud.protocol import eventlog
from encloud.protocol.errors import (
    AkAttributesError,
    AkUntrustedError,
    AttestMagicError,
    AttestTypeError,
    EventDigestError,
    EventLogFormatError,
    EventLogReplayError,
    EventSequenceError,
    MalformedEvidenceError,
    ModelNotAllowedError,
    NonceMismatchError,
    PcrDigestError,
    PcrSelectionError,
    PcrValueError,
    QualifiedSignerError,
    RuntimeNotAllowedError,
    SessionTtlError,
    SignatureError,
    VerificationError,
)
from encloud.protocol.evidence import Evidence
from encloud.protocol.policy import build_policy
from encloud.protocol.tpm_structures import (
    parse_attest,
    parse_pcr_selection,
    parse_public,
    parse_signature,
)
from encloud.protocol.verifier import (
    ak_fingerprint,
    format_report,
    spki_der,
    verify,
    verify_with_report,
)

pytestmark = pytest.mark.unit

CHECK_ORDER = [
    "policy",
    "ak_parse",
    "ak_trust",
    "ak_attributes",
    "signature_parse",
    "signature",
    "attest_parse",
    "magic",
    "attest_type",
    "qualified_signer",
    "qualifying_data",
    "pcr_selection",
    "pcr_digest",
    "pcr_value",
    "event_log_format",
    "event_digest",
    "event_log_replay",
    "event_sequence",
    "model_digest",
    "runtime_event",
    "session_ttl",
]

_P256 = ec.generate_private_key(ec.SECP256R1())
_OTHER_P256 = ec.generate_private_key(ec.SECP256R1())
_RSA2048 = rsa.generate_private_key(65537, 2048)


def run(scenario: b.Scenario, evidence: Evidence | None = None, **kw):
    kw.setdefault("expected_qualifying_data", b.NONCE_Q)
    kw.setdefault("session_ttl_seconds", b.TTL)
    return verify(evidence or scenario.evidence(), scenario.policy, **kw)


def refused(error: type[VerificationError], scenario: b.Scenario, evidence=None, **kw):
    with pytest.raises(error) as info:
        run(scenario, evidence, **kw)
    assert type(info.value) is error
    return info.value


@pytest.fixture
def sc() -> b.Scenario:
    return b.make_scenario(_P256)


# --- passing -----------------------------------------------------------------------------


def test_valid_evidence_passes(sc):
    result = run(sc)
    assert [r.name for r in result.report] == CHECK_ORDER
    assert all(r.passed for r in result.report)
    assert result.model_digest == b.MODEL_DIGEST
    assert result.runtime_event == b.RUNTIME_EVENT
    assert result.workload_pcr == b.WORKLOAD_PCR
    assert result.workload_pcr_value == sc.pcr_values[b.WORKLOAD_PCR]
    attest = sc.attest()
    assert result.attest_digest == hashlib.sha256(attest).digest()
    assert (result.clock, result.reset_count, result.restart_count) == (123456, 1, 2)
    assert result.firmware_version == 0x2000_0001_0000_0000
    assert result.ak_fingerprint == hashlib.sha256(b.spki(_P256)).hexdigest()
    assert len(result.events) == 2


def test_helpers_fingerprint_and_spki(sc):
    assert spki_der(sc.ak_public) == b.spki(_P256)
    assert ak_fingerprint(sc.ak_public) == hashlib.sha256(b.spki(_P256)).hexdigest()


def test_several_startups_the_last_is_running():
    runtime2 = {**b.RUNTIME_EVENT, "known_answer": "cd" * 32}
    sc = b.make_scenario(_P256, startups=[(b.MODEL_DIGEST, b.RUNTIME_EVENT)] * 2)
    sc.policy = replace(
        sc.policy,
        allowed_runtime_events=(
            *sc.policy.allowed_runtime_events,
            hashlib.sha256(b.runtime_bytes(runtime2)).digest(),
        ),
    )
    sc.records = b.event_records([(b.MODEL_DIGEST, b.RUNTIME_EVENT), (b.MODEL_DIGEST, runtime2)])
    sc.pcr_values[b.WORKLOAD_PCR] = eventlog.replay(sc.records)
    result = run(sc)
    assert result.runtime_event == runtime2
    assert len(result.events) == 4


def test_qualified_name_of_a_primary_ak_is_accepted(sc):
    sc.attest_overrides["signer"] = b.qualified_name_of(sc.ak_public, b.TPM_RH_ENDORSEMENT)
    run(sc)


@pytest.mark.parametrize(
    ("key", "kwargs"),
    [
        pytest.param(ec.generate_private_key(ec.SECP384R1()), {"sig_hash": b.SHA384}, id="p384"),
        pytest.param(_RSA2048, {"sig_scheme": b.RSASSA}, id="rsa2048-rsassa"),
        pytest.param(_RSA2048, {"sig_scheme": b.RSAPSS}, id="rsa2048-rsapss"),
        pytest.param(
            _RSA2048, {"sig_scheme": b.RSASSA, "sig_hash": b.SHA384}, id="rsa2048-rsassa-sha384"
        ),
        pytest.param(
            rsa.generate_private_key(65537, 3072), {"sig_scheme": b.RSAPSS}, id="rsa3072-rsapss"
        ),
    ],
)
def test_other_key_types_verify(key, kwargs):
    sc = b.make_scenario(key, **kwargs)
    result = run(sc)
    assert result.ak_fingerprint == hashlib.sha256(b.spki(key)).hexdigest()


def test_rsa_explicit_exponent_verifies():
    sc = b.make_scenario(_RSA2048, ak_public=b.rsa_public(_RSA2048, exponent_field=65537))
    run(sc)


# Quotes made by swtpm with tpm2-tools (tpm2_createprimary + tpm2_quote over sha256:0,1,15,
# qualification "0123456789abcdef0123456789abcdef", PCRs all zero, no workload events).
SWTPM_QUOTES = {
    # ECC P-256, ECDSA-SHA256, primary in the endorsement hierarchy
    "k1": {
        "pub": (
            "0023000b00050072000000100018000b000300100020f0846ceca6d18628811be02f5aaedfe3688d"
            "96e38b78dd10ed46be9bfd34af430020bcedf04b3b4180040814251ebcd7b2d7df0aa6efd26219b3"
            "4f13e9b464a4b1d2"
        ),
        "msg": (
            "ff54434780180022000bd55a50e60e6884badfa934e9c17b4d0439b79e478f9311b21d605416eba3"
            "36f80020303132333435363738396162636465663031323334353637383961626364656600000000"
            "00000e12000000010000000001201910230016363600000001000b0303800000202ea9ab9198d163"
            "8007400cd2c3bef1cc745b864b76011a0e1bc52180ac6452d4"
        ),
        "sig": (
            "0018000b00201197239b2fd9cca1c65eb7626ac8186145f3ecdab8fad3ea9ef23d9db5119a990020"
            "a4ece84f67b7c878780464ec318594020ccc7fdb0c06b1b178b1555100c8f861"
        ),
    },
    # ECC P-384, ECDSA-SHA384, primary in the owner hierarchy
    "k2": {
        "pub": (
            "0023000b00050072000000100018000c000400100030bf45a93b93877e52480c9e586843d2f287a8"
            "e7b0be69674397f1b5b4d9be41281a5b6a2e1e20e8952804f9c8df642aa800308cd0cebe7bdf8fa1"
            "1e4cd7f57d61d6b7a4cb221c9dfb729dde86ef7e27f3964d9b657b2d0ce349682c6fe0ae22f031b9"
        ),
        "msg": (
            "ff54434780180022000bc9faddc487be6b5bbca9df1261a5ebf3e084a3eef44138eb8dd28303e47e"
            "584a0020303132333435363738396162636465663031323334353637383961626364656600000000"
            "000022374168d5f832bf285101732a3588b440a03a00000001000b030380000030f57bb7ed82c6ae"
            "4a29e6c9879338c592c7d42a39135583e8ccbe3940f2344b0eb6eb8503db0ffd6a39ddd00cd07d83"
            "17"
        ),
        "sig": (
            "0018000c00304ff3dbd3187525868d6474cb1807f1ed046aa8e9a01012d0ce8f11da3e74473dd6d2"
            "120d5e85921e5487e7d41274ab09003075a68f720e8a5dcdc09139ee4444215038884f2335224aed"
            "98c149e1330f04c76a38e066f15e76ffeaaa7be09dcb6c27"
        ),
    },
    # RSA 2048, RSAPSS-SHA256, primary in the endorsement hierarchy
    "k3": {
        "pub": (
            "0001000b00050072000000100016000b0800000000000100cb5b297ca9f700167160c169d0db5510"
            "b94c40b6394c3a17d3b7416e3e774e5f5fc4732969b6fba4543805e98fd838b968709a849791b372"
            "8eaeeb2b60ed90ddfe0807646e239a17452b457d5082421c84aef214e4c29eb5e1afd5339625e5cd"
            "23635ea9b6326c86116ebef7eebe5f0bc7121a70e9118949d0f03afed37f0187f65f1906d18d9b2c"
            "ba29966d67369a725f6617f443bafac04ae9c2e311c4acd424c3806553adb9c5e1986e82d9c81174"
            "0b857badc82ebe0308d63eefcbc9a3d9e1dbfddbfcfa0a944cc09e0bfb850a05fdc98bf99e43f66d"
            "11264e159b2567422d724633e46468f45c392db0ce567ed9ae7cbb1ebc99983043d37f857c8fd28d"
        ),
        "msg": (
            "ff54434780180022000b4d868a471dbeb855a862b8aea8d2cf89f41df193c09da64093b99bb4f325"
            "98880020303132333435363738396162636465663031323334353637383961626364656600000000"
            "0000226a000000010000000001201910230016363600000001000b0303800000202ea9ab9198d163"
            "8007400cd2c3bef1cc745b864b76011a0e1bc52180ac6452d4"
        ),
        "sig": (
            "0016000b010052ca5dadca3ac523547e99023e8338ac6d7f709c69b06e206c6b242048221e3eb199"
            "2ddcf31e4ec466a971504b6e5c3b0c572030cc902826e3cb5403c686212cb12aae3ba64d0c72968a"
            "23555588e9badbd8240b4990bf391c40d41a553121ba6a123e88672ed65664e1c9b0350b9e1e7343"
            "db9413a3051ebf4f53b20697727d209067ad0ac4e81699d3bcd26e0b065ddf008f134b1d5f75b537"
            "e93a9b0f39e3adad189b57456e159748ca386d6f5527613a5349a7f7991e30e7fa0b5523391d8655"
            "83338f8268f90500f65836440b0e4c87ee0fa7307a9deca8eacb707a6be81a43e8c1ce8f23807298"
            "cd206a63e416afbe0a32fdb3009ebea0ea3edf2f506a"
        ),
    },
}


@pytest.mark.parametrize("name", sorted(SWTPM_QUOTES))
def test_real_swtpm_quotes_pass_every_tpm_check(name):
    """Real TPM output: signature, qualified signer and pcrDigest as a TPM computes them."""
    vector = {k: bytes.fromhex("".join(v)) for k, v in SWTPM_QUOTES[name].items()}
    evidence = Evidence(
        quote_attest=vector["msg"],
        quote_signature=vector["sig"],
        ak_public=vector["pub"],
        pcr_values={0: bytes(32), 1: bytes(32), 15: bytes(32)},
        workload_event_log=b"",
    )
    policy = build_policy(
        pcr_selection=[0, 1, 15],
        workload_pcr=15,
        allowed_model_digests=[b.MODEL_DIGEST],
        allowed_runtime_events=[b.MODEL_DIGEST],
        pinned_public_keys=[spki_der(vector["pub"])],
        max_session_ttl_seconds=60,
    )
    attestation, report, error = verify_with_report(
        evidence,
        policy,
        expected_qualifying_data=b"0123456789abcdef0123456789abcdef",
        session_ttl_seconds=30,
    )
    # The log is empty, so only the event sequence (no start-up) fails.
    assert attestation is None
    assert isinstance(error, EventSequenceError)
    assert [r.name for r in report] == CHECK_ORDER[: CHECK_ORDER.index("event_sequence") + 1]
    assert all(r.passed for r in report[:-1])


# --- the attestation key ---------------------------------------------------------------------


@pytest.mark.attack
def test_foreign_ak_refused(sc):
    foreign = b.make_scenario(_OTHER_P256)
    foreign.policy = sc.policy
    refused(AkUntrustedError, foreign)


@pytest.mark.attack
@pytest.mark.parametrize(
    ("attributes", "what"),
    [
        (b.AK_ATTRIBUTES & ~b.RESTRICTED, "restricted"),
        (b.AK_ATTRIBUTES & ~b.SIGN, "sign"),
        (b.AK_ATTRIBUTES & ~b.FIXED_TPM, "fixedTPM"),
        (b.AK_ATTRIBUTES & ~b.FIXED_PARENT, "fixedParent"),
        (b.AK_ATTRIBUTES | b.DECRYPT, "decrypt"),
    ],
)
def test_ak_attributes_refused(attributes, what):
    sc = b.make_scenario(_P256, ak_public=b.ecc_public(_P256, attributes=attributes))
    err = refused(AkAttributesError, sc)
    assert what in str(err)


@pytest.mark.attack
def test_ak_with_symmetric_algorithm_refused():
    aes = b.u16(b.AES) + b.u16(128) + b.u16(b.CFB)
    sc = b.make_scenario(_P256, ak_public=b.ecc_public(_P256, symmetric=aes))
    refused(AkAttributesError, sc)


@pytest.mark.attack
def test_ak_without_scheme_refused():
    sc = b.make_scenario(_P256, ak_public=b.ecc_public(_P256, scheme=b.NULL))
    refused(AkAttributesError, sc)


@pytest.mark.attack
def test_trailing_bytes_in_tpmt_public_refused(sc):
    err = refused(MalformedEvidenceError, sc, sc.evidence(ak_public=sc.ak_public + b"\x00"))
    assert "TPMT_PUBLIC" in str(err)


# --- the signature ------------------------------------------------------------------------


@pytest.mark.attack
def test_signature_over_other_bytes_refused(sc):
    evidence = sc.evidence(quote_signature=b.sign(_P256, sc.attest() + b"x"))
    refused(SignatureError, sc, evidence)


@pytest.mark.attack
def test_signature_by_other_key_refused(sc):
    refused(SignatureError, sc, sc.evidence(quote_signature=b.sign(_OTHER_P256, sc.attest())))


@pytest.mark.attack
def test_signature_scheme_other_than_keys_refused():
    sc = b.make_scenario(_RSA2048, sig_scheme=b.RSASSA)
    pss = b.sign(_RSA2048, sc.attest(), scheme=b.RSAPSS)
    refused(SignatureError, sc, sc.evidence(quote_signature=pss))


@pytest.mark.attack
def test_signature_hash_other_than_keys_refused(sc):
    sig = b.sign(_P256, sc.attest(), hash_alg=b.SHA384)
    refused(SignatureError, sc, sc.evidence(quote_signature=sig))


@pytest.mark.attack
def test_sha1_signature_refused(sc):
    sig = b.sign(_P256, sc.attest(), hash_alg=b.SHA1)
    err = refused(MalformedEvidenceError, sc, sc.evidence(quote_signature=sig))
    assert "SHA-1" in str(err)


@pytest.mark.attack
def test_trailing_bytes_in_tpmt_signature_refused(sc):
    sig = b.sign(_P256, sc.attest()) + b"\x00"
    err = refused(MalformedEvidenceError, sc, sc.evidence(quote_signature=sig))
    assert "TPMT_SIGNATURE" in str(err)


# --- TPMS_ATTEST ---------------------------------------------------------------------------


@pytest.mark.attack
def test_trailing_bytes_in_tpms_attest_refused(sc):
    err = refused(MalformedEvidenceError, sc, sc.evidence(quote_attest=sc.attest() + b"\x00"))
    assert "TPMS_ATTEST" in str(err)


@pytest.mark.attack
def test_wrong_magic_refused(sc):
    sc.attest_overrides["magic"] = 0xFF544348
    refused(AttestMagicError, sc)


@pytest.mark.attack
def test_wrong_type_refused(sc):
    sc.attest_overrides["attest_type"] = 0x8017  # TPM_ST_ATTEST_CERTIFY
    refused(AttestTypeError, sc)


@pytest.mark.attack
def test_qualified_signer_of_another_key_refused(sc):
    sc.attest_overrides["signer"] = b.name_of(b.ecc_public(_OTHER_P256))
    refused(QualifiedSignerError, sc)


@pytest.mark.attack
def test_wrong_nonce_refused(sc):
    refused(NonceMismatchError, sc, expected_qualifying_data=hashlib.sha256(b"other").digest())


@pytest.mark.attack
def test_stale_quote_with_other_extra_data_refused(sc):
    sc.extra_data = hashlib.sha256(b"an earlier session").digest()
    refused(NonceMismatchError, sc)


# --- PCRs ------------------------------------------------------------------------------------


@pytest.mark.attack
def test_fewer_pcrs_than_policy_selects_refused(sc):
    del sc.pcr_values[7]
    refused(PcrSelectionError, sc)


@pytest.mark.attack
def test_sha1_bank_refused(sc):
    sc.attest_overrides["banks"] = [(b.SHA1, b.SELECTION)]
    err = refused(PcrSelectionError, sc)
    assert "SHA-1" in str(err)


@pytest.mark.attack
def test_extra_bank_refused(sc):
    sc.attest_overrides["banks"] = [(b.SHA256, b.SELECTION), (b.SHA384, [0])]
    refused(PcrSelectionError, sc)


@pytest.mark.attack
def test_evidence_bank_other_than_policy_refused(sc):
    refused(PcrSelectionError, sc, sc.evidence(pcr_hash_algorithm=b.SHA384))


@pytest.mark.attack
def test_pcr_digest_not_matching_values_refused(sc):
    sc.attest_overrides["pcr_digest"] = hashlib.sha256(b"other").digest()
    refused(PcrDigestError, sc)


@pytest.mark.attack
def test_shipped_value_edited_refused(sc):
    values = dict(sc.pcr_values)
    values[3] = hashlib.sha256(b"edited").digest()
    refused(PcrDigestError, sc, sc.evidence(pcr_values=values))


@pytest.mark.attack
def test_shipped_values_missing_one_refused(sc):
    values = dict(sc.pcr_values)
    del values[3]
    refused(PcrDigestError, sc, sc.evidence(pcr_values=values))


@pytest.mark.attack
def test_shipped_value_of_wrong_length_refused(sc):
    values = dict(sc.pcr_values)
    values[3] = values[3][:20]
    refused(PcrDigestError, sc, sc.evidence(pcr_values=values))


@pytest.mark.attack
def test_changed_pinned_pcr_value_refused(sc):
    sc.pcr_values[0] = hashlib.sha256(b"other firmware").digest()
    err = refused(PcrValueError, sc)
    assert "PCR 0" in str(err)


# --- the event log ---------------------------------------------------------------------------


@pytest.mark.attack
def test_malformed_event_log_refused(sc):
    refused(EventLogFormatError, sc, sc.evidence(workload_event_log=b"{}\n"))


@pytest.mark.attack
def test_edited_event_refused(sc):
    edited = eventlog.model_event(eventlog.ROLE_CHAT, hashlib.sha256(b"evil").digest())
    sc.records[0] = replace(sc.records[0], event=edited)
    refused(EventDigestError, sc)


@pytest.mark.attack
def test_event_for_other_pcr_refused(sc):
    sc.records[1] = replace(sc.records[1], pcr=14)
    refused(EventDigestError, sc)


@pytest.mark.attack
def test_reordered_log_refused(sc):
    log = eventlog.serialize(b.renumber(list(reversed(sc.records))))
    refused(EventLogReplayError, sc, sc.evidence(workload_event_log=log))


@pytest.mark.attack
def test_truncated_log_refused(sc):
    log = eventlog.serialize(sc.records[:1])
    refused(EventLogReplayError, sc, sc.evidence(workload_event_log=log))


@pytest.mark.attack
def test_truncated_to_earlier_startup_refused():
    sc = b.make_scenario(_P256, startups=[(b.MODEL_DIGEST, b.RUNTIME_EVENT)] * 2)
    log = eventlog.serialize(sc.records[:2])
    refused(EventLogReplayError, sc, sc.evidence(workload_event_log=log))


@pytest.mark.attack
def test_empty_log_refused(sc):
    refused(EventLogReplayError, sc, sc.evidence(workload_event_log=b""))


@pytest.mark.attack
def test_unlogged_extend_refused(sc):
    value = sc.pcr_values[b.WORKLOAD_PCR]
    sc.pcr_values[b.WORKLOAD_PCR] = eventlog.extend(value, hashlib.sha256(b"hidden").digest())
    refused(EventLogReplayError, sc)


@pytest.mark.attack
def test_events_extended_out_of_order_refused(sc):
    sc.records = b.renumber(list(reversed(sc.records)))
    sc.pcr_values[b.WORKLOAD_PCR] = eventlog.replay(sc.records)
    refused(EventSequenceError, sc)


@pytest.mark.attack
def test_startup_without_runtime_refused(sc):
    sc.records = sc.records[:1]
    sc.pcr_values[b.WORKLOAD_PCR] = eventlog.replay(sc.records)
    refused(EventSequenceError, sc)


@pytest.mark.attack
def test_no_startup_refused(sc):
    sc.records = []
    sc.pcr_values[b.WORKLOAD_PCR] = bytes(32)
    refused(EventSequenceError, sc)


@pytest.mark.attack
def test_non_canonical_runtime_event_refused(sc):
    event = eventlog.WorkloadEvent(eventlog.EVENT_RUNTIME, b'{"b": 1, "a": 2}')
    sc.records[1] = eventlog.EventRecord(1, b.WORKLOAD_PCR, event.digest(), event)
    sc.pcr_values[b.WORKLOAD_PCR] = eventlog.replay(sc.records)
    refused(EventSequenceError, sc)


@pytest.mark.attack
def test_model_not_allowed_refused():
    sc = b.make_scenario(_P256, startups=[(hashlib.sha256(b"evil").digest(), b.RUNTIME_EVENT)])
    refused(ModelNotAllowedError, sc)


@pytest.mark.attack
def test_earlier_startup_with_disallowed_model_refused():
    evil = hashlib.sha256(b"evil").digest()
    sc = b.make_scenario(
        _P256, startups=[(evil, b.RUNTIME_EVENT), (b.MODEL_DIGEST, b.RUNTIME_EVENT)]
    )
    refused(ModelNotAllowedError, sc)


@pytest.mark.attack
def test_runtime_not_allowed_refused():
    runtime = {**b.RUNTIME_EVENT, "decoding": {"temperature": 2.0, "top_p": 1.0}}
    sc = b.make_scenario(_P256, startups=[(b.MODEL_DIGEST, runtime)])
    refused(RuntimeNotAllowedError, sc)


# --- the session ------------------------------------------------------------------------------


@pytest.mark.attack
def test_ttl_too_long_refused(sc):
    refused(SessionTtlError, sc, session_ttl_seconds=3601)


@pytest.mark.attack
@pytest.mark.parametrize("ttl", [0, -1])
def test_ttl_not_positive_refused(sc, ttl):
    refused(SessionTtlError, sc, session_ttl_seconds=ttl)


def test_ttl_equal_to_maximum_passes(sc):
    run(sc, session_ttl_seconds=3600)


# --- order and report --------------------------------------------------------------------------


@pytest.mark.attack
def test_first_failed_check_wins(sc):
    foreign = b.make_scenario(_OTHER_P256)
    foreign.policy = sc.policy
    foreign.extra_data = b"\x00" * 32
    refused(AkUntrustedError, foreign)


def test_report_on_failure(sc):
    sc.attest_overrides["magic"] = 0
    attestation, report, error = verify_with_report(
        sc.evidence(), sc.policy, expected_qualifying_data=b.NONCE_Q, session_ttl_seconds=b.TTL
    )
    assert attestation is None
    assert isinstance(error, AttestMagicError)
    assert [r.name for r in report] == CHECK_ORDER[: CHECK_ORDER.index("magic") + 1]
    assert [r.passed for r in report] == [True] * (len(report) - 1) + [False]
    text = format_report(report)
    assert "FAIL  magic" in text
    assert "refused at check magic" in text


def test_report_on_success_has_no_nonce(sc):
    attestation, report, error = verify_with_report(
        sc.evidence(), sc.policy, expected_qualifying_data=b.NONCE_Q, session_ttl_seconds=b.TTL
    )
    assert error is None and attestation is not None
    text = format_report(report)
    assert text.endswith("verified: all checks passed")
    assert b.NONCE_Q.hex() not in text


def test_empty_expected_qualifying_data_is_a_programming_error(sc):
    with pytest.raises(ValueError):
        run(sc, expected_qualifying_data=b"")


# --- parsers on arbitrary and mutated bytes ---------------------------------------------------

_VALID = b.make_scenario(_P256)
_VALID_EVIDENCE = _VALID.evidence()
_PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
_PARSERS = [parse_public, parse_attest, parse_signature, parse_pcr_selection]


def _mutations(valid: bytes):
    return st.one_of(
        st.binary(max_size=400),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
            lambda t: valid[: t[0]] + bytes([t[1]]) + valid[t[0] + 1 :]
        ),
        st.binary(min_size=1, max_size=8).map(lambda extra: valid + extra),
    )


def _only_malformed(parser, data: bytes) -> None:
    with contextlib.suppress(MalformedEvidenceError):
        parser(data)


@_PROPERTY
@given(_mutations(_VALID.ak_public))
def test_parse_public_raises_only_malformed(data):
    _only_malformed(parse_public, data)


@_PROPERTY
@given(_mutations(_VALID_EVIDENCE.quote_attest))
def test_parse_attest_raises_only_malformed(data):
    _only_malformed(parse_attest, data)


@_PROPERTY
@given(_mutations(_VALID_EVIDENCE.quote_signature))
def test_parse_signature_raises_only_malformed(data):
    _only_malformed(parse_signature, data)


@_PROPERTY
@given(_mutations(b.pcr_selection([(b.SHA256, b.SELECTION)])))
def test_parse_pcr_selection_raises_only_malformed(data):
    _only_malformed(parse_pcr_selection, data)


@_PROPERTY
@given(
    st.sampled_from(["quote_attest", "quote_signature", "ak_public"]),
    st.integers(0, 10_000),
    st.integers(1, 255),
)
def test_any_flipped_byte_is_refused_with_a_verification_error(field, position, xor):
    valid = getattr(_VALID_EVIDENCE, field)
    i = position % len(valid)
    mutated = valid[:i] + bytes([valid[i] ^ xor]) + valid[i + 1 :]
    with pytest.raises(VerificationError):
        verify(
            replace(_VALID_EVIDENCE, **{field: mutated}),
            _VALID.policy,
            expected_qualifying_data=b.NONCE_Q,
            session_ttl_seconds=b.TTL,
        )


# --- cross-check with the server's vTPM layer on swtpm --------------------------------------


@pytest.mark.e2e
def test_server_attester_evidence_verifies_on_swtpm(tmp_path):
    """The server's own measurement and quote (swtpm, tpm2-pytss) pass this verifier."""
    pytest.importorskip("tpm2_pytss")
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed")
    from encloud.server.attestation.attester import TpmAttester
    from encloud.server.attestation.measure import measure_workload
    from encloud.server.attestation.swtpm import Swtpm
    from encloud.server.attestation.tpm import Tpm

    runtime = b.runtime_bytes(b.RUNTIME_EVENT)
    events = [
        eventlog.model_event(eventlog.ROLE_CHAT, b.MODEL_DIGEST),
        eventlog.WorkloadEvent(eventlog.EVENT_RUNTIME, runtime),
    ]
    with Swtpm(tmp_path / "state") as sw, Tpm.open(sw.tcti) as tpm:
        records = measure_workload(tpm, b.WORKLOAD_PCR, tmp_path / "workload.log", events)
        attester = TpmAttester(tpm, b.SELECTION, records)
        evidence = attester.evidence(b.NONCE_Q)
    policy = build_policy(
        pcr_selection=b.SELECTION,
        pcr_values={0: evidence.pcr_values[0]},
        workload_pcr=b.WORKLOAD_PCR,
        allowed_model_digests=[b.MODEL_DIGEST],
        allowed_runtime_events=[hashlib.sha256(runtime).digest()],
        pinned_public_keys=[spki_der(evidence.ak_public)],
        max_session_ttl_seconds=3600,
    )
    result = verify(evidence, policy, expected_qualifying_data=b.NONCE_Q, session_ttl_seconds=b.TTL)
    assert result.model_digest == b.MODEL_DIGEST
    assert result.runtime_event == b.RUNTIME_EVENT
    with pytest.raises(NonceMismatchError):
        verify(evidence, policy, expected_qualifying_data=bytes(32), session_ttl_seconds=b.TTL)


# --- AK certificate chains --------------------------------------------------------------------


def _chain_scenario(**leaf_kwargs) -> tuple[b.Scenario, b.CertificateChain]:
    sc = b.make_scenario(_P256)
    chain = b.ak_certificate_chain(_P256, **leaf_kwargs)
    sc.policy = replace(sc.policy, pinned_public_keys=(), certificate_roots=(chain.root,))
    return sc, chain


def test_ak_certified_by_chain_to_root_passes():
    sc, chain = _chain_scenario()
    result = run(sc, sc.evidence(ak_certificate_chain=chain.chain))
    assert (
        "certified by a chain to root CN=Test vTPM Root"
        in {r.name: r.detail for r in result.report}["ak_trust"]
    )


@pytest.mark.attack
def test_ak_without_chain_refused_when_only_roots_trusted():
    sc, _ = _chain_scenario()
    refused(AkUntrustedError, sc)


@pytest.mark.attack
def test_ak_chain_to_other_root_refused():
    sc, _ = _chain_scenario()
    other = b.ak_certificate_chain(_P256)
    refused(AkUntrustedError, sc, sc.evidence(ak_certificate_chain=other.chain))


@pytest.mark.attack
def test_ak_certificate_for_other_key_refused():
    sc, _ = _chain_scenario()
    other = b.ak_certificate_chain(_OTHER_P256)
    sc.policy = replace(sc.policy, certificate_roots=(other.root,))
    err = refused(AkUntrustedError, sc, sc.evidence(ak_certificate_chain=other.chain))
    assert "another key" in str(err)


@pytest.mark.attack
def test_expired_ak_certificate_refused():
    sc, chain = _chain_scenario(not_before_days=-10, not_after_days=-1)
    refused(AkUntrustedError, sc, sc.evidence(ak_certificate_chain=chain.chain))


@pytest.mark.attack
def test_ak_chain_missing_intermediate_refused():
    sc, chain = _chain_scenario()
    refused(AkUntrustedError, sc, sc.evidence(ak_certificate_chain=chain.chain[:1]))


@pytest.mark.attack
def test_ak_chain_garbage_refused():
    sc, _ = _chain_scenario()
    refused(AkUntrustedError, sc, sc.evidence(ak_certificate_chain=(b"\x30\x03abc",)))


# --- SHA-384 banks and the remaining strictness checks ----------------------------------------


def _sha384_bank_scenario() -> b.Scenario:
    """A quote of the SHA-384 bank: 48-byte PCR values, workload PCR replayed in SHA-384."""
    sc = b.make_scenario(_P256)
    value = bytes(48)
    for record in sc.records:
        value = hashlib.sha384(
            value + hashlib.sha384(record.event.measured_bytes()).digest()
        ).digest()
    sc.pcr_values = {i: hashlib.sha384(b"pcr %d" % i).digest() for i in b.SELECTION}
    sc.pcr_values[b.WORKLOAD_PCR] = value
    sc.attest_overrides["banks"] = [(b.SHA384, b.SELECTION)]
    sc.policy = replace(
        sc.policy, pcr_bank="sha384", pcr_values={0: sc.pcr_values[0], 7: sc.pcr_values[7]}
    )
    return sc


def test_sha384_bank_verifies():
    sc = _sha384_bank_scenario()
    result = run(sc, sc.evidence(pcr_hash_algorithm=b.SHA384))
    assert result.model_digest == b.MODEL_DIGEST
    assert len(result.workload_pcr_value) == 48


@pytest.mark.attack
def test_sha384_bank_with_unlogged_extend_refused():
    sc = _sha384_bank_scenario()
    sc.pcr_values[b.WORKLOAD_PCR] = hashlib.sha384(
        sc.pcr_values[b.WORKLOAD_PCR] + bytes(48)
    ).digest()
    refused(EventLogReplayError, sc, sc.evidence(pcr_hash_algorithm=b.SHA384))


@pytest.mark.attack
def test_trailing_bytes_in_tpml_pcr_selection_refused():
    valid = b.pcr_selection([(b.SHA256, b.SELECTION)])
    parse_pcr_selection(valid)
    with pytest.raises(MalformedEvidenceError, match="trailing"):
        parse_pcr_selection(valid + b"\x00")


@pytest.mark.attack
def test_sha1_name_algorithm_of_the_ak_refused():
    refused(
        MalformedEvidenceError,
        b.make_scenario(_P256, ak_public=b.ecc_public(_P256, name_alg=b.SHA1)),
    )


@pytest.mark.attack
def test_unknown_signature_algorithm_refused(sc):
    ev = sc.evidence()
    forged = b.u16(0x001A) + ev.quote_signature[2:]  # TPM_ALG_ECDAA
    refused(MalformedEvidenceError, sc, replace(ev, quote_signature=forged))
