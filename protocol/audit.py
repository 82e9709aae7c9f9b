"""The client's audit log of attestation outcomes: hash-chained JSON lines, signed checkpoints.

The log (docs/PROTOCOL.md gives the format):

- One entry per line, in canonical JSON (RFC 8785 for the value types used
  here: objects with string keys sorted by their UTF-16 code units, strings,
  integers with |n| < 2^53, true, false, null, lists; no floats; no
  whitespace; UTF-8), each line ending in "\\n".
- Every entry has `seq` (0, 1, 2, ... without gaps), `prev` (hex SHA-256 of the
  exact bytes of the previous line without its newline; 64 zeros for the
  first) and `time` (Unix seconds from the local clock, informational).
- Entry 0 is `{"event": "log_start", "log_id": <32 hex>, ...}`: `log_id` is 16
  random bytes naming this log in its checkpoints.
- The other entries are what the caller appends: time, server address and
  identity, nonce digest, AK fingerprint, model digest, policy digest,
  outcome and failed check. Digests and outcomes only, never a key or a
  plaintext (`append` refuses a field whose name says key, secret, dek,
  prompt or plaintext).

Checkpoints go to a separate file, meant to be shipped elsewhere (another
host, a WORM bucket): each a JSON line holding `log_id`, `seq`, `head` (hex
SHA-256 of entry `seq`'s line), `time` and `signature`, an Ed25519 signature
over E("encloud/v1 audit checkpoint", log_id, seq_u64, head_hash, time_u64).
A hash chain alone cannot show a cut-off tail or a rewrite by whoever holds
the file; a checkpoint can, up to the entry it signs: `verify_log` says
"anchored through entry N", and entries after N are not protected.

Durability: "entry" fsyncs every entry before `append` returns; "batch"
fsyncs every `batch_size` entries, at each checkpoint and on `close` (a crash
may lose the unsynced tail, which no checkpoint covers yet).

Settings for callers that only pass a path (`AuditLog(path)`), from the
environment: ENCLOUD_AUDIT_DURABILITY (entry|batch), ENCLOUD_AUDIT_CHECKPOINT_KEY
(PEM PKCS#8 Ed25519 private key file; checkpoints on when set),
ENCLOUD_AUDIT_CHECKPOINTS (checkpoint file; default `<log>.checkpoints`),
ENCLOUD_AUDIT_CHECKPOINT_EVERY (entries between checkpoints; default 1).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from encloud.protocol.canonical import MAX_SAFE_INTEGER, rfc8785_dumps, strict_loads
from encloud.protocol.encoding import encode, u64
from encloud.protocol.errors import AuditLogError

GENESIS = bytes(32)
CHECKPOINT_LABEL = "encloud/v1 audit checkpoint"
LOG_ID_LENGTH = 16
RESERVED_FIELDS = frozenset({"seq", "prev", "time", "log_id"})
_FORBIDDEN_NAME_PARTS = ("key", "secret", "dek", "prompt", "plaintext", "password")
# Names, not keys: a key's id and versions (Sentinel's entries), the AK's fingerprint.
_ALLOWED_KEY_NAMES = frozenset({"ak_fingerprint", "key_id", "key_versions"})
_CHECKPOINT_KEYS = frozenset({"log_id", "seq", "head", "time", "signature"})

Durability = Literal["entry", "batch"]


# --- canonical JSON (RFC 8785 for strings, safe integers, booleans, null, lists, objects) ---


def canonical(value: Any) -> bytes:
    """The RFC 8785 canonical JSON of `value`; ValueError for anything outside the log's
    types (strings, safe integers, booleans, null, lists, objects: no floats)."""
    _check_types(value)
    return rfc8785_dumps(value)


def _check_types(value: Any) -> None:
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise ValueError("integers in the audit log must stay below 2^53")
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_types(item)
        return
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ValueError("object keys must be strings")
        for item in value.values():
            _check_types(item)
        return
    raise ValueError(f"{type(value).__name__} values are not allowed in the audit log")


def parse_line(line: bytes, seq_hint: int | None = None) -> dict[str, Any]:
    """Parse one entry line strictly (canonical JSON object with seq, prev and time)."""
    where = f"entry at line {seq_hint + 1}" if seq_hint is not None else "entry"
    try:
        obj = strict_loads(line, allow_floats=False)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise AuditLogError(f"{where} is not JSON", seq_hint) from err
    if not isinstance(obj, dict):
        raise AuditLogError(f"{where} is not a JSON object", seq_hint)
    try:
        if canonical(obj) != line:
            raise AuditLogError(f"{where} is not in canonical form", seq_hint)
    except (ValueError, RecursionError) as err:
        raise AuditLogError(f"{where} holds a value outside the log's types", seq_hint) from err
    seq, prev, stamp = obj.get("seq"), obj.get("prev"), obj.get("time")
    if not _is_uint(seq) or not _is_uint(stamp):
        raise AuditLogError(f"{where} lacks an integer seq or time", seq_hint)
    if not _is_hex(prev, 32):
        raise AuditLogError(f"{where} lacks a 64-hex-digit prev", seq_hint)
    return obj


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SAFE_INTEGER


def _is_hex(value: object, size: int) -> bool:
    if not isinstance(value, str) or len(value) != 2 * size or value != value.lower():
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def checkpoint_message(log_id: bytes, seq: int, head: bytes, stamp: int) -> bytes:
    """E("encloud/v1 audit checkpoint", log_id, seq_u64, head_hash, time_u64): what is signed."""
    return encode(CHECKPOINT_LABEL, log_id, u64(seq), head, u64(stamp))


# --- keys -------------------------------------------------------------------------------


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditLogError("the checkpoint key is not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except ValueError as err:
        raise AuditLogError("the checkpoint public key is not a PEM public key") from err
    if not isinstance(key, Ed25519PublicKey):
        raise AuditLogError("the checkpoint public key is not an Ed25519 key")
    return key


def generate_key_files(private_path: Path, public_path: Path) -> None:
    """Write a new Ed25519 checkpoint key pair (private key mode 0600)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


# --- the writer -------------------------------------------------------------------------


def attestation_entry(
    *,
    server: str,
    nonce: bytes,
    quote_attest: bytes,
    policy_digest: bytes,
    ak_fingerprint: str | None,
    model_digest: bytes | None,
    failed_check: str | None,
    embedding_model_digest: bytes | None = None,
) -> dict[str, Any]:
    """The entry for one attestation outcome: digests and the outcome, never a secret.
    `model_digest` is the chat model's; `embedding_model_digest` is added only for a server
    that serves embeddings.

    One function for every caller (encloud.protocol.attest.audit_entry), so all write the same.
    """
    extra = (
        {"embedding_model_digest": embedding_model_digest.hex()} if embedding_model_digest else {}
    )
    return {
        **extra,
        "event": "attestation",
        "server": server,
        "nonce_sha256": hashlib.sha256(nonce).hexdigest(),
        "attest_sha256": hashlib.sha256(quote_attest).hexdigest(),
        "ak_fingerprint": ak_fingerprint,
        "model_digest": model_digest.hex() if model_digest else None,
        "policy_sha256": policy_digest.hex(),
        "outcome": "pass" if failed_check is None else "fail",
        "failed_check": failed_check,
    }


class AuditLog:
    """Appends entries to a hash-chained log and, with a key, signs checkpoints of it.

    One writer per file (the lock serialises threads of one process)."""

    def __init__(
        self,
        path: Path | str,
        *,
        durability: Durability | None = None,
        batch_size: int = 16,
        checkpoint_key: Ed25519PrivateKey | None = None,
        checkpoints_path: Path | str | None = None,
        checkpoint_every: int | None = None,
    ) -> None:
        self.path = Path(path)
        env = os.environ
        if durability is None:
            durability = "batch" if env.get("ENCLOUD_AUDIT_DURABILITY") == "batch" else "entry"
        if durability not in ("entry", "batch"):
            raise ValueError("durability must be 'entry' or 'batch'")
        self.durability: Durability = durability
        self.batch_size = max(1, batch_size)
        if checkpoint_key is None and env.get("ENCLOUD_AUDIT_CHECKPOINT_KEY"):
            checkpoint_key = load_private_key(env["ENCLOUD_AUDIT_CHECKPOINT_KEY"])
        self._key = checkpoint_key
        if checkpoints_path is None and env.get("ENCLOUD_AUDIT_CHECKPOINTS"):
            checkpoints_path = env["ENCLOUD_AUDIT_CHECKPOINTS"]
        self.checkpoints_path = (
            Path(checkpoints_path)
            if checkpoints_path is not None
            else self.path.with_name(self.path.name + ".checkpoints")
        )
        if checkpoint_every is None:
            checkpoint_every = int(env.get("ENCLOUD_AUDIT_CHECKPOINT_EVERY", "1"))
        self.checkpoint_every = max(1, checkpoint_every)
        self._lock = threading.Lock()
        self._unsynced = 0
        self._since_checkpoint = 0

    def append(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Append one entry; return it as written (with seq, prev and time)."""
        _check_entry(entry)
        with self._lock:
            seq, prev, _ = self._tail()
            if seq == 0:
                start = {
                    "event": "log_start",
                    "log_id": os.urandom(LOG_ID_LENGTH).hex(),
                    "seq": 0,
                    "prev": GENESIS.hex(),
                    "time": int(time.time()),
                }
                prev = self._write(start)
                seq = 1
            record = {**entry, "seq": seq, "prev": prev.hex(), "time": int(time.time())}
            self._write(record)
            self._since_checkpoint += 1
            if self._key is not None and self._since_checkpoint >= self.checkpoint_every:
                self._checkpoint_locked()
            return record

    def checkpoint(self) -> dict[str, Any] | None:
        """Sign the current head now (needs a key); None if the log is empty."""
        if self._key is None:
            raise AuditLogError("no checkpoint key is configured")
        with self._lock:
            return self._checkpoint_locked()

    def flush(self) -> None:
        """fsync whatever batch durability has not synced yet."""
        with self._lock:
            self._fsync_log()

    def close(self) -> None:
        self.flush()

    # --- internals ---------------------------------------------------------------------------

    def _write(self, record: Mapping[str, Any]) -> bytes:
        line = canonical(dict(record))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as handle:
            handle.write(line + b"\n")
            handle.flush()
            self._unsynced += 1
            if self.durability == "entry" or self._unsynced >= self.batch_size:
                os.fsync(handle.fileno())
                self._unsynced = 0
        return hashlib.sha256(line).digest()

    def _fsync_log(self) -> None:
        if self._unsynced and self.path.exists():
            with self.path.open("ab") as handle:
                os.fsync(handle.fileno())
            self._unsynced = 0

    def _checkpoint_locked(self) -> dict[str, Any] | None:
        assert self._key is not None
        seq, _, last = self._tail()
        if seq == 0 or last is None:
            return None
        self._fsync_log()  # never sign entries a crash could still lose
        head_seq = seq - 1
        head = hashlib.sha256(last).digest()
        log_id = bytes.fromhex(parse_line(self._first_line())["log_id"])
        stamp = int(time.time())
        signature = self._key.sign(checkpoint_message(log_id, head_seq, head, stamp))
        record = {
            "log_id": log_id.hex(),
            "seq": head_seq,
            "head": head.hex(),
            "time": stamp,
            "signature": base64.b64encode(signature).decode("ascii"),
        }
        self.checkpoints_path.parent.mkdir(parents=True, exist_ok=True)
        with self.checkpoints_path.open("ab") as handle:
            handle.write(canonical(record) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._since_checkpoint = 0
        return record

    def _first_line(self) -> bytes:
        with self.path.open("rb") as handle:
            return handle.readline().rstrip(b"\n")

    def _tail(self) -> tuple[int, bytes, bytes | None]:
        """(next seq, hash of the last line, the last line) of the log on disk."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0, GENESIS, None
        last = _last_line(self.path)
        record = parse_line(last)
        return record["seq"] + 1, hashlib.sha256(last).digest(), last


def _last_line(path: Path, chunk: int = 4096) -> bytes:
    """The last line, read backwards from the end: appends stay O(1) as the log grows."""
    with path.open("rb") as handle:
        pos = handle.seek(0, os.SEEK_END)
        tail = b""  # the bytes from pos to the end of the file
        while pos > 0 and b"\n" not in tail[:-1]:
            step = min(chunk, pos)
            pos -= step
            handle.seek(pos)
            tail = handle.read(step) + tail
    if not tail.endswith(b"\n"):
        raise AuditLogError("the audit log's last entry is incomplete; refusing to append")
    return tail[:-1].rsplit(b"\n", 1)[-1]


def _check_entry(entry: Mapping[str, Any]) -> None:
    if not isinstance(entry, Mapping):
        raise TypeError("an audit entry is a mapping")
    reserved = RESERVED_FIELDS & set(entry)
    if reserved:
        raise ValueError(f"audit entries must not set {sorted(reserved)}")
    for name in entry:
        lowered = str(name).lower()
        if lowered not in _ALLOWED_KEY_NAMES and any(p in lowered for p in _FORBIDDEN_NAME_PARTS):
            raise ValueError(f"audit entries never hold keys or plaintext (field {name!r})")
    canonical(dict(entry))  # raises ValueError on floats, big integers, other types


# --- the verifier -----------------------------------------------------------------------


@dataclass(frozen=True)
class AuditVerification:
    """What `verify_log` established."""

    entries: int
    log_id: bytes | None
    checkpoints: int
    anchored_through: int | None
    """The highest entry a valid checkpoint signs; None without checkpoints."""

    def summary(self) -> str:
        if self.entries == 0:
            return "the audit log is empty"
        base = f"{self.entries} entries (0..{self.entries - 1}), hash chain intact"
        if self.anchored_through is None:
            return (
                base + "; NOT anchored: no checkpoint, so a cut-off tail or a rewrite by whoever "
                "holds the file would not show"
            )
        tail = self.entries - 1 - self.anchored_through
        return (
            base + f"; anchored through entry {self.anchored_through} by {self.checkpoints} signed "
            f"checkpoint(s)"
            + (
                f"; the last {tail} entr{'y is' if tail == 1 else 'ies are'} not anchored yet "
                "(a cut there would not show)"
                if tail
                else ""
            )
        )


def verify_log(
    path: Path | str,
    checkpoints_path: Path | str | None = None,
    public_key: Ed25519PublicKey | None = None,
) -> AuditVerification:
    """Verify the log's chain and, if given, its signed checkpoints.

    Raises AuditLogError at the first fault, naming where: an edited entry, an inserted,
    duplicated, reordered or deleted one, an incomplete last line, a checkpoint that does not
    match the entry it signs (a rewrite), or a checkpoint beyond the end (a cut-off tail).
    """
    data = Path(path).read_bytes()
    lines = data[:-1].split(b"\n") if data.endswith(b"\n") else data.split(b"\n")
    if data and not data.endswith(b"\n"):
        raise AuditLogError(
            f"entry {len(lines) - 1} is incomplete (a torn write or a cut inside the entry)",
            len(lines) - 1,
        )
    if not data:
        lines = []
    records = [parse_line(line, i) for i, line in enumerate(lines)]
    seqs = [r["seq"] for r in records]
    hashes = [hashlib.sha256(line).digest() for line in lines]
    for i, record in enumerate(records):
        seq = record["seq"]
        if seq > i:
            if i in seqs[i + 1 :]:
                raise AuditLogError(
                    f"entry {i} appears after entry {seq}: entries were reordered", i
                )
            raise AuditLogError(
                f"entries {i}..{seq - 1} are missing before entry {seq}: deleted", i
            )
        if seq < i:
            raise AuditLogError(
                f"line {i + 1} holds entry {seq} again: an entry was inserted, duplicated or "
                "moved there",
                i,
            )
        expected_prev = GENESIS if i == 0 else hashes[i - 1]
        if record["prev"] != expected_prev.hex():
            if i == 0:
                raise AuditLogError("entry 0 does not start the chain", 0)
            raise AuditLogError(
                f"entry {i} does not chain to entry {i - 1}: entry {i - 1} was edited", i - 1
            )
    log_id: bytes | None = None
    if records:
        first = records[0]
        if first.get("event") != "log_start" or not _is_hex(first.get("log_id"), LOG_ID_LENGTH):
            raise AuditLogError("entry 0 is not the log_start entry with a log_id", 0)
        log_id = bytes.fromhex(first["log_id"])

    if checkpoints_path is None:
        return AuditVerification(len(records), log_id, 0, None)
    if public_key is None:
        raise AuditLogError("checkpoints need the public key to verify them")
    checkpoints = _read_checkpoints(Path(checkpoints_path), public_key)
    anchored: int | None = None
    good: list[int] = []
    for cp in checkpoints:
        if log_id is None or cp.log_id != log_id:
            raise AuditLogError(f"the checkpoint of entry {cp.seq} is for another log")
    highest = max((cp.seq for cp in checkpoints), default=-1)
    if highest >= len(records):
        raise AuditLogError(
            f"the log ends at entry {len(records) - 1} but a signed checkpoint covers entry "
            f"{highest}: entries {len(records)}..{highest} were cut off",
            len(records),
        )
    for cp in sorted(checkpoints, key=lambda c: c.seq):
        if cp.head != hashes[cp.seq]:
            since = good[-1] + 1 if good else 0
            raise AuditLogError(
                f"entry {cp.seq} differs from the one its signed checkpoint covers: the log was "
                f"rewritten between entries {since} and {cp.seq}",
                cp.seq,
            )
        good.append(cp.seq)
        anchored = cp.seq
    return AuditVerification(len(records), log_id, len(checkpoints), anchored)


@dataclass(frozen=True)
class Checkpoint:
    log_id: bytes
    seq: int
    head: bytes
    time: int


def parse_checkpoint(line: bytes, public_key: Ed25519PublicKey, index: int = 0) -> Checkpoint:
    """Parse one checkpoint line strictly and verify its signature."""
    where = f"checkpoint {index + 1}"
    try:
        obj = strict_loads(line, allow_floats=False)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise AuditLogError(f"{where} is not JSON") from err
    if not isinstance(obj, dict) or set(obj) != _CHECKPOINT_KEYS:
        raise AuditLogError(f"{where} must have exactly {sorted(_CHECKPOINT_KEYS)}")
    if not _is_hex(obj["log_id"], LOG_ID_LENGTH) or not _is_hex(obj["head"], 32):
        raise AuditLogError(f"{where} has an invalid log_id or head")
    if not _is_uint(obj["seq"]) or not _is_uint(obj["time"]):
        raise AuditLogError(f"{where} has an invalid seq or time")
    try:
        signature = base64.b64decode(obj["signature"], validate=True)
    except (binascii.Error, ValueError, TypeError) as err:
        raise AuditLogError(f"{where} signature is not base64") from err
    cp = Checkpoint(
        bytes.fromhex(obj["log_id"]), obj["seq"], bytes.fromhex(obj["head"]), obj["time"]
    )
    try:
        public_key.verify(signature, checkpoint_message(cp.log_id, cp.seq, cp.head, cp.time))
    except InvalidSignature:
        raise AuditLogError(f"{where} (entry {cp.seq}) has an invalid signature") from None
    return cp


def _read_checkpoints(path: Path, public_key: Ed25519PublicKey) -> list[Checkpoint]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuditLogError(f"checkpoint file {path} does not exist") from None
    return [
        parse_checkpoint(line, public_key, i)
        for i, line in enumerate(data.splitlines())
        if line.strip()
    ]
