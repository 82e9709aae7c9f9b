"""Tests of the policy format: round trip, stable digest, every invalid field named."""

from __future__ import annotations

import base64
import copy
import json

import pytest
import tpm_builders as b
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from encloud.protocol.errors import PolicyError
from encloud.protocol.policy import Policy, load_policy, parse_policy, policy_digest

pytestmark = pytest.mark.unit

_KEY = ec.generate_private_key(ec.SECP256R1())
_SPKI = base64.b64encode(b.spki(_KEY)).decode()
_HEX32 = "ab" * 32


def valid_obj() -> dict:
    return {
        "version": 1,
        "dev_only": False,
        "pcr_bank": "sha256",
        "pcr_selection": [0, 1, 2, 3, 4, 5, 6, 7, 14, 15],
        "pcr_values": {"0": "00" * 32, "7": "11" * 32},
        "workload_pcr": 15,
        "allowed_model_digests": [_HEX32, "cd" * 32],
        "allowed_runtime_events": ["ef" * 32],
        "ak": {"pinned_public_keys": [_SPKI]},
        "max_session_ttl_seconds": 3600,
    }


def dumps(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_parse_valid_policy():
    policy = parse_policy(dumps(valid_obj()))
    assert policy.version == 1
    assert policy.pcr_selection == (0, 1, 2, 3, 4, 5, 6, 7, 14, 15)
    assert policy.pcr_values == {0: bytes(32), 7: bytes.fromhex("11" * 32)}
    assert policy.workload_pcr == 15
    assert policy.pinned_public_keys == (b.spki(_KEY),)
    assert policy.pcr_bank_alg == 0x000B


def test_round_trip_and_stable_digest(tmp_path):
    policy = parse_policy(dumps(valid_obj()))
    again = parse_policy(policy.to_json())
    assert again == policy
    assert again.to_json() == policy.to_json()
    assert policy_digest(again) == policy_digest(policy)
    path = tmp_path / "policy.json"
    path.write_bytes(json.dumps(valid_obj(), indent=2).encode())
    assert policy_digest(load_policy(path)) == policy_digest(policy)


def test_digest_independent_of_key_and_list_order():
    obj = valid_obj()
    shuffled = dict(reversed(list(obj.items())))
    shuffled["allowed_model_digests"] = list(reversed(obj["allowed_model_digests"]))
    assert policy_digest(parse_policy(dumps(shuffled))) == policy_digest(parse_policy(dumps(obj)))


def test_digest_changes_with_content():
    obj = valid_obj()
    other = copy.deepcopy(obj)
    other["max_session_ttl_seconds"] = 60
    assert policy_digest(parse_policy(dumps(obj))) != policy_digest(parse_policy(dumps(other)))


def test_canonical_form_is_compact_sorted_ascii():
    text = parse_policy(dumps(valid_obj())).to_json()
    assert b" " not in text
    assert list(json.loads(text)) == sorted(json.loads(text))


def test_dev_only_round_trips():
    obj = valid_obj()
    obj["dev_only"] = True
    assert parse_policy(parse_policy(dumps(obj)).to_json()).dev_only is True


def _set(path: str, value: object):
    def mutate(obj: dict) -> None:
        *parents, last = path.split(".")
        target = obj
        for p in parents:
            target = target[p]
        target[last] = value

    return mutate


def _delete(path: str):
    def mutate(obj: dict) -> None:
        *parents, last = path.split(".")
        target = obj
        for p in parents:
            target = target[p]
        del target[last]

    return mutate


INVALID = [
    ("version", _set("version", 2)),
    ("version", _set("version", True)),
    ("version", _delete("version")),
    ("dev_only", _set("dev_only", "no")),
    ("pcr_bank", _set("pcr_bank", "sha1")),
    ("pcr_bank", _set("pcr_bank", "md5")),
    ("pcr_selection", _set("pcr_selection", [])),
    ("pcr_selection", _set("pcr_selection", [1, 0, 15])),
    ("pcr_selection", _set("pcr_selection", [0, 0, 15])),
    ("pcr_selection", _set("pcr_selection", [0, 24])),
    ("pcr_selection", _set("pcr_selection", "0,1")),
    ("pcr_values", _set("pcr_values", [])),
    ("pcr_values.8", _set("pcr_values", {"8": "00" * 32})),
    ("pcr_values.15", _set("pcr_values", {"15": "00" * 32})),
    ("pcr_values.07", _set("pcr_values", {"07": "00" * 32})),
    ("pcr_values.0", _set("pcr_values", {"0": "00" * 20})),
    ("pcr_values.0", _set("pcr_values", {"0": "AB" * 32})),
    ("workload_pcr", _set("workload_pcr", 16)),
    ("workload_pcr", _set("workload_pcr", "15")),
    ("allowed_model_digests", _set("allowed_model_digests", [])),
    ("allowed_model_digests", _set("allowed_model_digests", [_HEX32, _HEX32])),
    ("allowed_model_digests[1]", _set("allowed_model_digests", [_HEX32, "zz" * 32])),
    ("allowed_runtime_events[0]", _set("allowed_runtime_events", ["ab"])),
    ("allowed_runtime_events", _delete("allowed_runtime_events")),
    ("ak", _set("ak", [])),
    ("ak", _set("ak", {})),  # a gap: nothing establishes AK trust
    ("ak", _set("ak.pinned_public_keys", [])),  # and no roots
    ("ak.pinned_public_keys[0]", _set("ak.pinned_public_keys", ["not base64!"])),
    ("ak.pinned_public_keys[0]", _set("ak.pinned_public_keys", [base64.b64encode(b"x").decode()])),
    ("ak.pinned_public_keys", _set("ak.pinned_public_keys", [_SPKI, _SPKI])),
    ("ak.certificate_roots[0]", _set("ak.certificate_roots", ["-----BEGIN CERTIFICATE-----"])),
    ("ak.certificate_roots[0]", _set("ak.certificate_roots", [1])),
    ("ak.certificate_roots", _set("ak.certificate_roots", "pem")),
    ("ak.pinned_public_keys", _set("ak.pinned_public_keys", "key")),
    ("ak.hardware_report", _set("ak.hardware_report", {"kind": "sev-snp"})),
    ("ak.extra", _set("ak.extra", 1)),
    ("max_session_ttl_seconds", _set("max_session_ttl_seconds", 0)),
    ("max_session_ttl_seconds", _set("max_session_ttl_seconds", 2**32)),
    ("max_session_ttl_seconds", _set("max_session_ttl_seconds", 60.0)),
    ("surprise", _set("surprise", 1)),
]


@pytest.mark.parametrize(("field", "mutate"), INVALID, ids=[f for f, _ in INVALID])
def test_invalid_field_is_named(field, mutate):
    obj = valid_obj()
    mutate(obj)
    with pytest.raises(PolicyError) as info:
        parse_policy(dumps(obj))
    message = str(info.value)
    # A format error names the field in quotes; an incomplete policy lists "field: why".
    assert f"'{field}'" in message or f"incomplete: {field}: " in message


def test_unknown_key_refused():
    obj = valid_obj()
    obj["allow_everything"] = True
    with pytest.raises(PolicyError, match="'allow_everything': unknown key"):
        parse_policy(dumps(obj))


def test_sha1_bank_refused_by_name():
    obj = valid_obj()
    obj["pcr_bank"] = "sha1"
    with pytest.raises(PolicyError, match="sha1 is refused"):
        parse_policy(dumps(obj))


def test_certificate_roots_round_trip():
    root = b.ak_certificate_chain(_KEY).root
    pem = x509.load_der_x509_certificate(root).public_bytes(serialization.Encoding.PEM).decode()
    obj = valid_obj()
    obj["ak"] = {"pinned_public_keys": [], "certificate_roots": [pem]}
    policy = parse_policy(dumps(obj))
    assert policy.certificate_roots == (root,)
    assert policy.pinned_public_keys == ()
    assert parse_policy(policy.to_json()) == policy
    assert json.loads(policy.to_json())["ak"]["certificate_roots"] == [pem]


def test_duplicate_certificate_root_refused():
    root = b.ak_certificate_chain(_KEY).root
    pem = x509.load_der_x509_certificate(root).public_bytes(serialization.Encoding.PEM).decode()
    obj = valid_obj()
    obj["ak"]["certificate_roots"] = [pem, pem]
    with pytest.raises(PolicyError, match=r"'ak\.certificate_roots': has duplicates"):
        parse_policy(dumps(obj))


def test_empty_certificate_roots_left_out_of_canonical_form():
    obj = valid_obj()
    obj["ak"]["certificate_roots"] = []
    policy = parse_policy(dumps(obj))
    assert policy_digest(policy) == policy_digest(parse_policy(dumps(valid_obj())))


def test_duplicate_json_key_refused():
    text = dumps(valid_obj())[:-1] + b', "workload_pcr": 14}'
    with pytest.raises(PolicyError, match="duplicate key"):
        parse_policy(text)


@pytest.mark.parametrize("data", [b"", b"[]", b"not json", b"\xff"])
def test_not_a_json_object_refused(data):
    with pytest.raises(PolicyError):
        parse_policy(data)


def test_policy_is_frozen():
    policy = parse_policy(dumps(valid_obj()))
    assert isinstance(policy, Policy)
    with pytest.raises(AttributeError):
        policy.workload_pcr = 14  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.pcr_values[0] = bytes(32)  # type: ignore[index]
