"""Confidential batch jobs (docs/PROTOCOL.md, "Jobs"): the owner's signed job manifest, the
records of a job's input, the answers file, and the proof that ends a job's key release.

    manifest = {"expires_at": <unix seconds>, "input_sha256": "<64 hex>",
                "job_id": "<32 hex>", "key_id": "<key id>", "model_digest": "<64 hex>",
                "output": "<file name>", "params": {<decoding parameters>},
                "records": <count>, "version": 1}
    signed   = {"manifest": manifest, "signature": "<base64 Ed25519 signature>"}
    signature = Ed25519(owner key, E("encloud/v1 job manifest", canonical(manifest)))
    digest    = SHA-256(E("encloud/v1 job manifest", canonical(manifest)))

The input is a sealed file (sealed_file.py) of JSON lines, one chat request each:
{"messages": [{"role": ..., "content": ...}, ...], "seed": <optional int>}. The answers are a
sealed file under the same key of JSON lines, one per record in input order, then one end line:

    {"answer": {"completion_tokens": n, "finish_reason": "...", "prompt_tokens": n,
                "text": "..."}, "index": i, "job": "<manifest digest hex>"}
    {"end": {"records": n}, "job": "<manifest digest hex>"}

The streaming AEAD already refuses a segment moved, dropped or cut; the index and job on every
line refuse plaintext that was reordered or moved between jobs by anyone holding the key, and
the end line refuses one cut after a whole record. `AnswersChecker` is that check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encloud.protocol.canonical import strict_loads
from encloud.protocol.encoding import encode, sha256, u32, u64
from encloud.protocol.errors import (
    EncloudError,
    ReleaseOrderExpiredError,
    ReleaseOrderFormatError,
    ReleaseOrderSignatureError,
)
from encloud.protocol.handshake import HpkeSuiteId
from encloud.protocol.release_order import hex_field, parse_signed, seconds_field
from encloud.protocol.sealed_file import check_key_id, seal_stream

MANIFEST_VERSION = 1
MANIFEST_LABEL = "encloud/v1 job manifest"
_KEYS = {
    "expires_at",
    "input_sha256",
    "job_id",
    "key_id",
    "model_digest",
    "output",
    "params",
    "records",
    "version",
}
OUTPUT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_RECORDS = 1_000_000
PARAMS = {
    "max_new_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "repetition_penalty": float,
    "stop": list,
}
"""The decoding parameters a manifest may fix for every record (a record brings its seed)."""
ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 64

# Outcomes a workload reports when its release of a job's key ends.
DONE = "done"
PAUSED = "paused"
OUTCOMES = (DONE, PAUSED)


class JobRecordError(EncloudError):
    """A record of a job's input is not a chat request (the message names its index, never
    its content)."""


class AnswersFileError(EncloudError):
    """An answers file whose lines are out of order, of another job, missing or extra."""


@dataclass(frozen=True)
class JobManifest:
    job_id: bytes
    key_id: str
    model_digest: bytes
    input_sha256: bytes
    records: int
    output: str
    expires_at: int
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_obj(self) -> dict[str, Any]:
        return {
            "expires_at": self.expires_at,
            "input_sha256": self.input_sha256.hex(),
            "job_id": self.job_id.hex(),
            "key_id": self.key_id,
            "model_digest": self.model_digest.hex(),
            "output": self.output,
            "params": dict(self.params),
            "records": self.records,
            "version": MANIFEST_VERSION,
        }

    def signed_bytes(self) -> bytes:
        """What the owner signs: E(label, the manifest's canonical JSON)."""
        return encode(MANIFEST_LABEL, rfc8785.dumps(self.to_obj()))

    def digest(self) -> bytes:
        return sha256(self.signed_bytes())


def new_manifest(
    *,
    key_id: str,
    model_digest: bytes,
    input_sha256: bytes,
    records: int,
    output: str,
    params: Mapping[str, Any],
    ttl_seconds: int,
    now: float | None = None,
) -> JobManifest:
    """A fresh manifest (a random 16-byte job id) valid for `ttl_seconds` from `now`;
    ValueError naming what is wrong otherwise."""
    if len(model_digest) != 32 or len(input_sha256) != 32:
        raise ValueError("a manifest names a 32-byte model digest and input digest")
    if ttl_seconds < 1:
        raise ValueError("a manifest's lifetime is a positive number of seconds")
    moment = time.time() if now is None else now
    manifest = JobManifest(
        job_id=os.urandom(16),
        key_id=check_key_id(key_id),
        model_digest=model_digest,
        input_sha256=input_sha256,
        records=_records(records),
        output=_output(output),
        expires_at=int(moment) + ttl_seconds,
        params=check_params(params),
    )
    return manifest


@dataclass(frozen=True)
class PreparedJob:
    """What an owner hands over for a job: the signed manifest and the sealed input."""

    manifest: JobManifest
    signed_manifest: bytes
    sealed_input: bytes


def prepare_job(
    records: Iterable[Mapping[str, Any]],
    key: bytes | bytearray,
    key_id: str,
    *,
    model_digest: bytes,
    params: Mapping[str, Any],
    output: str,
    ttl_seconds: int,
    signing_key: Ed25519PrivateKey,
) -> PreparedJob:
    """The owner's side in one call, in memory: the records ({"messages": [...], "seed"?})
    as JSONL sealed under the key, and a manifest for exactly that input, signed."""
    plain = b"".join(record_line(r["messages"], r.get("seed")) for r in records)
    sealed = io.BytesIO()
    seal_stream(io.BytesIO(plain), sealed, key, key_id)
    manifest = new_manifest(
        key_id=key_id,
        model_digest=model_digest,
        input_sha256=hashlib.sha256(sealed.getvalue()).digest(),
        records=plain.count(b"\n"),
        output=output,
        params=params,
        ttl_seconds=ttl_seconds,
    )
    return PreparedJob(manifest, sign_manifest(manifest, signing_key), sealed.getvalue())


def sign_manifest(manifest: JobManifest, owner_key: Ed25519PrivateKey) -> bytes:
    """The signed manifest as canonical JSON bytes."""
    signature = owner_key.sign(manifest.signed_bytes())
    return rfc8785.dumps(
        {
            "manifest": manifest.to_obj(),
            "signature": base64.b64encode(signature).decode("ascii"),
        }
    )


def parse_manifest(data: bytes) -> tuple[JobManifest, bytes]:
    """(manifest, signature) of a signed manifest in canonical form; ReleaseOrderFormatError
    naming what is wrong otherwise (a manifest is a kind of release order to Sentinel). The
    signature is not checked here."""
    raw, sig = parse_signed(data, "manifest", _KEYS, "job manifest", MANIFEST_VERSION)
    try:
        manifest = JobManifest(
            job_id=hex_field(raw["job_id"], 16, "job_id"),
            key_id=check_key_id(raw["key_id"]),
            model_digest=hex_field(raw["model_digest"], 32, "model_digest"),
            input_sha256=hex_field(raw["input_sha256"], 32, "input_sha256"),
            records=_records(raw["records"]),
            output=_output(raw["output"]),
            expires_at=seconds_field(raw["expires_at"]),
            params=check_params(raw["params"]),
        )
    except ValueError as err:  # the fields checked here (the others raise the format error)
        raise ReleaseOrderFormatError(f"job manifest: {err}") from None
    return manifest, sig


def verify_manifest(data: bytes, owner_key: Ed25519PublicKey, *, now: float) -> JobManifest:
    """The manifest, once its form, its owner's signature and its expiry all check."""
    manifest, signature = parse_manifest(data)
    try:
        owner_key.verify(signature, manifest.signed_bytes())
    except InvalidSignature:
        raise ReleaseOrderSignatureError("the job manifest is not signed by this owner") from None
    if now >= manifest.expires_at:
        raise ReleaseOrderExpiredError(f"the job manifest expired at {manifest.expires_at}")
    return manifest


def check_params(params: object) -> dict[str, Any]:
    """Decoding parameters every record of the job runs with (ValueError otherwise)."""
    if not isinstance(params, Mapping):
        raise ValueError("params is an object of decoding parameters")
    out: dict[str, Any] = {}
    for name, value in params.items():
        kind = PARAMS.get(name)
        if kind is None:
            raise ValueError(f"unknown decoding parameter {name!r} (allowed: {sorted(PARAMS)})")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} is a non-negative integer")
        if kind is float and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"{name} is a non-negative number")
        if kind is list and (
            not isinstance(value, list) or not all(isinstance(s, str) and s for s in value)
        ):
            raise ValueError(f"{name} is a list of non-empty strings")
        out[name] = value
    if not 0 < out.get("max_new_tokens", 1) <= 1 << 20:
        raise ValueError("max_new_tokens is a positive integer")
    return out


# --- the input's records -------------------------------------------------------------------


@dataclass(frozen=True)
class JobRecord:
    messages: tuple[tuple[str, str], ...]
    seed: int | None


def parse_record(line: bytes, index: int) -> JobRecord:
    """One input line as a chat request; JobRecordError naming the index (never the content)."""
    try:
        obj = strict_loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JobRecordError(f"record {index} is not JSON") from None
    if not isinstance(obj, dict) or not set(obj) <= {"messages", "seed"} or "messages" not in obj:
        raise JobRecordError(f"record {index} is not an object of messages and an optional seed")
    messages = obj["messages"]
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
        raise JobRecordError(f"record {index} has no messages, or more than {MAX_MESSAGES}")
    turns: list[tuple[str, str]] = []
    for message in messages:
        if (
            not isinstance(message, dict)
            or set(message) != {"role", "content"}
            or message["role"] not in ROLES
            or not isinstance(message["content"], str)
        ):
            raise JobRecordError(
                f"record {index}: each message is {{role: {'|'.join(ROLES)}, content: text}}"
            )
        turns.append((message["role"], message["content"]))
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise JobRecordError(f"record {index}: seed is a non-negative integer")
    return JobRecord(tuple(turns), seed)


def record_line(messages: list[dict[str, str]], seed: int | None = None) -> bytes:
    """One input line (the owner's side): canonical JSON and a newline."""
    obj: dict[str, Any] = {"messages": messages}
    if seed is not None:
        obj["seed"] = seed
    return rfc8785.dumps(obj) + b"\n"


# --- the answers -----------------------------------------------------------------------------


def answer_line(
    job_digest: bytes,
    index: int,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> bytes:
    answer: dict[str, Any] = {
        "completion_tokens": completion_tokens,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "text": text,
    }
    return rfc8785.dumps({"answer": answer, "index": index, "job": job_digest.hex()}) + b"\n"


def end_line(job_digest: bytes, records: int) -> bytes:
    return rfc8785.dumps({"end": {"records": records}, "job": job_digest.hex()}) + b"\n"


class AnswersChecker:
    """Reads an answers file's plaintext as it is written (feed) and refuses, with
    AnswersFileError, a line out of place: another job's, an index out of order, anything after
    the end line, or (finish) no end line or an end that counts other records. `expected_job`
    pins the manifest digest; otherwise the first line's job is every line's."""

    def __init__(self, expected_job: bytes | None = None) -> None:
        self.job = expected_job.hex() if expected_job is not None else None
        self.answers = 0
        self.ended = False
        self._partial = bytearray()

    def feed(self, data: bytes) -> None:
        self._partial += data
        *lines, rest = self._partial.split(b"\n")
        self._partial = bytearray(rest)
        for line in lines:
            self._line(bytes(line))

    def finish(self) -> int:
        """The number of answers, once the file ended with its end line."""
        if self._partial:
            raise AnswersFileError("the answers file ends inside a line")
        if not self.ended:
            raise AnswersFileError(
                f"the answers file ends after {self.answers} answers without its end line"
            )
        return self.answers

    def _line(self, line: bytes) -> None:
        where = f"line {self.answers + 1}"
        if self.ended:
            raise AnswersFileError(f"{where} follows the end line")
        try:
            obj = json.loads(line)
        except (UnicodeDecodeError, ValueError):
            raise AnswersFileError(f"{where} is not JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("job"), str):
            raise AnswersFileError(f"{where} is not an answer of a job")
        if self.job is None:
            self.job = obj["job"]
        if obj["job"] != self.job:
            raise AnswersFileError(f"{where} belongs to another job")
        if set(obj) == {"end", "job"}:
            end = obj["end"]
            if not isinstance(end, dict) or end.get("records") != self.answers:
                raise AnswersFileError(
                    f"the end line counts {end!r} records, the file holds {self.answers}"
                )
            self.ended = True
            return
        if set(obj) != {"answer", "index", "job"} or not isinstance(obj["answer"], dict):
            raise AnswersFileError(f"{where} is not an answer of a job")
        if obj["index"] != self.answers:
            raise AnswersFileError(
                f"{where} holds the answer to record {obj['index']!r}, expected {self.answers}"
            )
        self.answers += 1


# --- Sentinel: the job's quote and the end of a release ------------------------------------------


def job_qualifying_data(
    suite: HpkeSuiteId,
    nonce: bytes,
    manifest_digest: bytes,
    input_sha256: bytes,
    hpke_public_key: bytes,
) -> bytes:
    """Q_j = H(E("encloud/v2 sentinel job", suite, nonce, manifest digest, input digest, HPKE
    public key)): what a workload's quote binds when it asks Sentinel for a job's key. The
    input digest is the SHA-256 of the sealed input the attested server received."""
    return sha256(
        encode(
            "encloud/v2 sentinel job",
            suite.encoded(),
            nonce,
            manifest_digest,
            input_sha256,
            hpke_public_key,
        )
    )


def end_proof(
    key: bytes | bytearray,
    job_id: bytes,
    release_seq: int,
    outcome: str,
    answers_sha256: bytes,
    records_done: int,
) -> bytes:
    """HMAC-SHA256 under HKDF(K, "encloud/v1 job end") over the release's end: only a holder
    of the job's data key (the attested workload it was released to, or its owner) makes it,
    and it names the release it ends, so an old one does not end a newer release."""
    if outcome not in OUTCOMES:
        raise ValueError(f"an outcome is one of {OUTCOMES}")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"encloud/v1 job end")
    mac_key = bytearray(hkdf.derive(key))
    try:
        message = encode(
            "encloud/v1 job end",
            job_id,
            u32(release_seq),
            outcome.encode("ascii"),
            answers_sha256,
            u64(records_done),
        )
        return hmac.digest(bytes(mac_key), message, "sha256")
    finally:
        mac_key[:] = bytes(len(mac_key))


def _records(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_RECORDS:
        raise ValueError(f"records is a count from 1 to {MAX_RECORDS}")
    return value


def _output(value: object) -> str:
    if not isinstance(value, str) or not OUTPUT_PATTERN.fullmatch(value):
        raise ValueError(
            "output is a file name: 1 to 128 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return value
