"""The audit log: canonical chained lines, signed checkpoints, and what verification finds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from encloud.protocol.audit import (
    AuditLog,
    canonical,
    checkpoint_message,
    parse_line,
    verify_log,
)
from encloud.protocol.errors import AuditLogError

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key()


def _entry(n: int) -> dict:
    return {
        "event": "attestation",
        "server": "10.0.0.1:50051",
        "nonce_sha256": f"{n:064x}",
        "ak_fingerprint": "ab" * 32,
        "model_digest": "cd" * 32,
        "policy_sha256": "ef" * 32,
        "outcome": "pass" if n % 3 else "fail",
        "failed_check": None if n % 3 else "pcr_value",
    }


def _log(tmp_path: Path, n: int, *, every: int = 1, key=KEY) -> AuditLog:
    log = AuditLog(
        tmp_path / "audit.jsonl",
        checkpoint_key=key,
        checkpoints_path=tmp_path / "elsewhere" / "checkpoints",
        checkpoint_every=every,
    )
    for i in range(n):
        log.append(_entry(i))
    return log


def _lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines(keepends=True)


def _write(log: AuditLog, lines: list[bytes]) -> None:
    log.path.write_bytes(b"".join(lines))


def _verify(log: AuditLog):
    return verify_log(log.path, log.checkpoints_path, PUBLIC)


def _fails_at(log: AuditLog, seq: int | None, words: str) -> None:
    with pytest.raises(AuditLogError) as info:
        _verify(log)
    assert info.value.seq == seq
    assert words in str(info.value)


# --- format -------------------------------------------------------------------------------


def test_entries_are_canonical_chained_lines(tmp_path) -> None:
    log = _log(tmp_path, 3)
    lines = _lines(log)
    assert len(lines) == 4  # log_start + 3
    for i, line in enumerate(lines):
        body = line.rstrip(b"\n")
        assert canonical(json.loads(body)) == body
        assert parse_line(body)["seq"] == i
    assert json.loads(lines[0])["event"] == "log_start"
    result = _verify(log)
    assert (result.entries, result.anchored_through, result.checkpoints) == (4, 3, 3)


def test_canonical_json_follows_rfc8785_for_our_types() -> None:
    assert canonical({"b": [1, None, True], "a": "é\u0001\n"}) == (
        b'{"a":"\xc3\xa9\\u0001\\n","b":[1,null,true]}'
    )
    # Keys sort by UTF-16 code units: U+10000 (surrogates 0xD800 0xDC00) before U+E000,
    # the opposite of code point order.
    assert canonical({"\ue000": 2, "\U00010000": 1}).decode() == '{"\U00010000":1,"\ue000":2}'


@pytest.mark.parametrize("value", [1.5, 2**53, -(2**53), {1: "x"}, b"bytes"])
def test_values_outside_the_log_types_are_refused(tmp_path, value) -> None:
    with pytest.raises(ValueError):
        AuditLog(tmp_path / "a.jsonl").append({"event": "x", "value": value})


@pytest.mark.parametrize("field", ["dek", "session_key", "prompt", "secret", "seq", "prev"])
def test_keys_plaintext_and_reserved_fields_are_refused(tmp_path, field) -> None:
    with pytest.raises(ValueError):
        AuditLog(tmp_path / "a.jsonl").append({"event": "x", field: "v"})


def test_client_session_call_shape_still_works(tmp_path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")  # what client/session.py does
    written = log.append(_entry(1))
    assert written["seq"] == 1
    assert verify_log(log.path).anchored_through is None


def test_batch_durability_is_synced_before_a_checkpoint(tmp_path) -> None:
    log = AuditLog(
        tmp_path / "a.jsonl",
        durability="batch",
        batch_size=100,
        checkpoint_key=KEY,
        checkpoint_every=5,
    )
    for i in range(7):
        log.append(_entry(i))
    log.close()
    assert _verify(log).anchored_through == 5


def test_checkpoint_signature_covers_the_canonical_encoding(tmp_path) -> None:
    log = _log(tmp_path, 1)
    cp = json.loads(log.checkpoints_path.read_bytes().splitlines()[-1])
    import base64

    message = checkpoint_message(
        bytes.fromhex(cp["log_id"]), cp["seq"], bytes.fromhex(cp["head"]), cp["time"]
    )
    assert message.startswith(b"encloud/v1 audit checkpoint\x00\x00\x10")
    PUBLIC.verify(base64.b64decode(cp["signature"]), message)


# --- attacks on the log ------------------------------------------------------------------------


@pytest.mark.attack
def test_edited_entry_is_found_and_located(tmp_path) -> None:
    log = _log(tmp_path, 5)
    lines = _lines(log)
    lines[2] = lines[2].replace(b'"pass"', b'"fail"')
    _write(log, lines)
    _fails_at(log, 2, "entry 2 was edited")


@pytest.mark.attack
def test_edited_last_entry_is_found_by_its_checkpoint(tmp_path) -> None:
    log = _log(tmp_path, 5)
    lines = _lines(log)
    lines[-1] = lines[-1].replace(b'"pass"', b'"fail"')
    _write(log, lines)
    _fails_at(log, 5, "entry 5 differs from the one its signed checkpoint covers")


@pytest.mark.attack
def test_rewritten_chain_is_found_by_the_checkpoints(tmp_path) -> None:
    """Whoever holds the file edits entry 3 and recomputes every later prev: the chain is
    whole again, only the signed checkpoints show it."""
    import hashlib

    log = _log(tmp_path, 5)
    records = [json.loads(line) for line in _lines(log)]
    records[3]["outcome"] = "fail"
    prev = bytes(32)
    out = []
    for record in records:
        record["prev"] = prev.hex()
        line = canonical(record)
        out.append(line + b"\n")
        prev = hashlib.sha256(line).digest()
    _write(log, out)
    assert verify_log(log.path).entries == 6  # the chain alone cannot tell
    _fails_at(log, 3, "rewritten between entries 3 and 3")


@pytest.mark.attack
def test_inserted_entry_is_found_and_located(tmp_path) -> None:
    log = _log(tmp_path, 4)
    lines = _lines(log)
    lines.insert(3, lines[2])
    _write(log, lines)
    _fails_at(log, 3, "line 4 holds entry 2 again")


@pytest.mark.attack
def test_reordered_entries_are_found_and_located(tmp_path) -> None:
    log = _log(tmp_path, 4)
    lines = _lines(log)
    lines[2], lines[3] = lines[3], lines[2]
    _write(log, lines)
    _fails_at(log, 2, "entry 2 appears after entry 3: entries were reordered")


@pytest.mark.attack
def test_deleted_entry_is_found_and_located(tmp_path) -> None:
    log = _log(tmp_path, 4)
    lines = _lines(log)
    del lines[2]
    _write(log, lines)
    _fails_at(log, 2, "entries 2..2 are missing before entry 3: deleted")


@pytest.mark.attack
def test_forged_checkpoint_is_refused(tmp_path) -> None:
    log = _log(tmp_path, 2)
    other = Ed25519PrivateKey.generate()
    forger = AuditLog(log.path, checkpoint_key=other, checkpoints_path=log.checkpoints_path)
    forger.checkpoint()
    _fails_at(log, None, "invalid signature")


@pytest.mark.attack
def test_checkpoint_of_another_log_is_refused(tmp_path) -> None:
    log = _log(tmp_path, 2)
    other = _log(tmp_path / "other", 2)
    log.checkpoints_path.write_bytes(other.checkpoints_path.read_bytes())
    _fails_at(log, None, "for another log")


@pytest.mark.attack
def test_torn_last_line_is_found(tmp_path) -> None:
    log = _log(tmp_path, 3)
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-10])
    _fails_at(log, 3, "entry 3 is incomplete")


@pytest.mark.attack
def test_cut_off_tail_is_detectable_exactly_up_to_the_last_checkpoint(tmp_path) -> None:
    """Entries 0..9, checkpoints every 4 entries: the last signs entry 8 (seq 8)."""
    log = _log(tmp_path, 9, every=4)  # log_start + 9 = entries 0..9
    assert _verify(log).anchored_through == 8
    full = _lines(log)
    assert len(full) == 10
    # Cutting only entry 9 (after the last checkpoint) is not detectable, and the verifier
    # says so: the log is anchored through entry 8 and nothing after it is protected.
    _write(log, full[:9])
    result = _verify(log)
    assert (result.entries, result.anchored_through) == (9, 8)
    assert "anchored through entry 8" in result.summary()
    # Cutting into the checkpointed part is detected, for every cut point.
    for keep in range(1, 9):
        _write(log, full[:keep])
        with pytest.raises(AuditLogError) as info:
            _verify(log)
        assert f"entries {keep}..8 were cut off" in str(info.value)
        assert info.value.seq == keep
    # With the whole log back, the unanchored tail is named.
    _write(log, full)
    assert "the last 1 entry is not anchored yet" in _verify(log).summary()
