"""The batch jobs' protocol (protocol/job.py, docs/PROTOCOL.md "Jobs") against its vectors
(tests/vectors/jobs.json) and the inputs it must refuse: manifests, records, answers files,
the qualifying data and the end proof."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from encloud.protocol import errors, job
from encloud.protocol.handshake import SUITE_V1

pytestmark = pytest.mark.unit

VECTORS = json.loads((Path(__file__).parent / "vectors" / "jobs.json").read_text())
OWNER = Ed25519PublicKey.from_public_bytes(bytes.fromhex(VECTORS["owner_public_key"]))
NOW = VECTORS["now"]


def test_the_signed_manifest_verifies_and_has_its_digest() -> None:
    signed = VECTORS["manifest"]["signed"].encode()
    manifest = job.verify_manifest(signed, OWNER, now=NOW)
    assert manifest.signed_bytes().hex() == VECTORS["manifest"]["signed_message"]
    assert manifest.digest().hex() == VECTORS["manifest"]["digest"]
    assert (manifest.records, manifest.output) == (3, "answers-1.sealed")


@pytest.mark.parametrize(
    "case", VECTORS["negative_manifests"], ids=[c["name"] for c in VECTORS["negative_manifests"]]
)
def test_a_manifest_sentinel_refuses(case: dict[str, Any]) -> None:
    with pytest.raises(getattr(errors, case["error"])):
        job.verify_manifest(case["signed"].encode(), OWNER, now=NOW)


def test_the_qualifying_data_binds_each_of_its_fields() -> None:
    v = VECTORS["qualifying_data"]
    fields = [bytes.fromhex(v[k]) for k in ("nonce", "manifest_digest", "input_sha256")]
    public = bytes.fromhex(v["hpke_public_key"])
    assert job.job_qualifying_data(SUITE_V1, *fields, public).hex() == v["q"]
    for i in range(3):
        changed = list(fields)
        changed[i] = bytes(len(changed[i]))
        assert job.job_qualifying_data(SUITE_V1, *changed, public).hex() != v["q"]


def test_the_end_proofs() -> None:
    for case in VECTORS["end_proofs"]:
        args = (
            bytes.fromhex(case["key"]),
            bytes.fromhex(case["job_id"]),
            case["release_seq"],
            case["outcome"],
            bytes.fromhex(case["answers_sha256"]),
            case["records_done"],
        )
        assert job.end_proof(*args).hex() == case["proof"]
        # Each field is bound: the next release's number, or one more record, is another proof.
        assert job.end_proof(args[0], args[1], args[2] + 1, *args[3:]).hex() != case["proof"]
        assert job.end_proof(*args[:5], args[5] + 1).hex() != case["proof"]
    with pytest.raises(ValueError):
        job.end_proof(bytes(32), bytes(16), 1, "finished", b"", 0)


def test_the_answers_file_checks() -> None:
    digest = bytes.fromhex(VECTORS["manifest"]["digest"])
    checker = job.AnswersChecker(digest)
    for line in VECTORS["answers"]["lines"]:
        checker.feed(line.encode())
    assert checker.finish() == 3


@pytest.mark.parametrize(
    "case", VECTORS["answers"]["refused"], ids=[c["name"] for c in VECTORS["answers"]["refused"]]
)
def test_an_answers_file_refused(case: dict[str, Any]) -> None:
    checker = job.AnswersChecker(bytes.fromhex(VECTORS["manifest"]["digest"]))
    with pytest.raises(job.AnswersFileError):
        for line in case["lines"]:
            checker.feed(line.encode())
        checker.finish()


def test_answers_split_anywhere_check_the_same() -> None:
    data = "".join(VECTORS["answers"]["lines"]).encode()
    for cut in range(1, len(data), 37):
        checker = job.AnswersChecker()  # the job taken from the first line
        checker.feed(data[:cut])
        checker.feed(data[cut:])
        assert checker.finish() == 3


def test_a_file_cut_inside_a_line_is_refused() -> None:
    checker = job.AnswersChecker()
    checker.feed("".join(VECTORS["answers"]["lines"]).encode()[:-5])
    with pytest.raises(job.AnswersFileError):
        checker.finish()


def test_records_parse_and_their_errors_name_the_index_never_the_content() -> None:
    record = job.parse_record(job.record_line([{"role": "user", "content": "hi"}], seed=3), 0)
    assert record.messages == (("user", "hi"),) and record.seed == 3
    canary = "canary-41d2"
    bad = [
        canary.encode(),
        json.dumps({"messages": []}).encode(),
        json.dumps({"messages": [{"role": "robot", "content": canary}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": canary}], "seed": -1}).encode(),
        json.dumps({"messages": [{"role": "user", "content": canary}], "seed": True}).encode(),
        json.dumps({"messages": [{"role": "user", "content": canary}], "note": 1}).encode(),
        b'{"messages": [], "messages": []}',
    ]
    for line in bad:
        with pytest.raises(job.JobRecordError) as caught:
            job.parse_record(line, 17)
        assert "record 17" in str(caught.value) and canary not in str(caught.value)


@pytest.mark.parametrize(
    "params",
    [
        {"seed": 1},
        {"max_new_tokens": 0},
        {"max_new_tokens": True},
        {"temperature": -0.5},
        {"temperature": float("inf")},
        {"stop": "x"},
        {"stop": [""]},
        [],
    ],
    ids=str,
)
def test_decoding_parameters_a_manifest_refuses(params: Any) -> None:
    with pytest.raises(ValueError):
        job.check_params(params)


def test_a_new_manifest_refuses_what_it_could_not_sign() -> None:
    base: dict[str, Any] = {
        "key_id": "owner-1/data",
        "model_digest": bytes(32),
        "input_sha256": bytes(32),
        "records": 1,
        "output": "a.sealed",
        "params": {},
        "ttl_seconds": 60,
    }
    assert job.new_manifest(**base).records == 1
    for change in (
        {"output": "../a"},
        {"output": "dir/a"},
        {"records": 0},
        {"ttl_seconds": 0},
        {"model_digest": bytes(31)},
        {"key_id": "bad key id"},
    ):
        with pytest.raises(ValueError):
            job.new_manifest(**{**base, **change})


def test_prepare_job_seals_the_records_and_signs_a_manifest_for_exactly_them() -> None:
    import hashlib
    import io
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from encloud.protocol.sealed_file import open_stream

    key, signing = os.urandom(32), Ed25519PrivateKey.generate()
    records = [{"messages": [{"role": "user", "content": f"q{i}"}], "seed": i} for i in range(3)]
    prepared = job.prepare_job(
        records,
        key,
        "owner-1/data",
        model_digest=bytes(32),
        params={"max_new_tokens": 4},
        output="a.sealed",
        ttl_seconds=60,
        signing_key=signing,
    )
    manifest = job.verify_manifest(prepared.signed_manifest, signing.public_key(), now=0)
    assert manifest == prepared.manifest and manifest.records == 3
    assert manifest.input_sha256 == hashlib.sha256(prepared.sealed_input).digest()
    plain = io.BytesIO()
    open_stream(io.BytesIO(prepared.sealed_input), plain, key, expected_key_id="owner-1/data")
    lines = plain.getvalue().splitlines()
    assert [job.parse_record(line, i).seed for i, line in enumerate(lines)] == [0, 1, 2]
