"""Sentinel's wire rules (docs/PROTOCOL.md, "Sentinel"): key ids and their owners, and the
HPKE constructions that carry a data key to Sentinel (import) and from it (release).

    import:  HPKE(Sentinel's import key, K, info = E("encloud/v1 sentinel import", key_id,
                  u32(version)))
    release: HPKE(workload key, K_v, info = E("encloud/v1 sentinel release", suite, nonce,
                  order digest, key_id, u32(version)))

The infos bind each sealed key to where it may be opened: an import sealed for one key id or
version does not open as another; a release sealed for one request (nonce, order) or version
does not open as another. The workload's quote binds the release request with
handshake.sentinel_qualifying_data (its own label, so no session quote satisfies Sentinel).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from encloud.protocol import job, release_order
from encloud.protocol.encoding import encode, u32
from encloud.protocol.errors import EncloudError
from encloud.protocol.evidence import Evidence
from encloud.protocol.handshake import (
    SUITE_XWING,
    HpkeSuiteId,
    KeyOpenError,
    generate_session_key,
    hpke_open,
    hpke_seal,
    sentinel_qualifying_data,
)
from encloud.protocol.sealed_file import (
    KEY_LENGTH,
    SealedFileDecryptError,
    check_key_id,
    open_stream,
)
from encloud.protocol.sentinel.v1 import sentinel_pb2 as pb
from encloud.protocol.wire import evidence_to_proto, suite_from_proto, suite_to_proto

IMPORT_SUITE = SUITE_XWING
"""Sentinel's import key is X-Wing: a data key in transit is protected post-quantum."""
NONCE_LENGTH = 32
OWNER_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def check_owner_name(name: str) -> str:
    """An owner name: 1 to 63 of a-z 0-9 _ . - starting with a letter or digit."""
    if not isinstance(name, str) or not OWNER_PATTERN.fullmatch(name):
        raise ValueError("an owner name is 1 to 63 of a-z 0-9 _ . -, starting with a-z or 0-9")
    return name


def owner_of(key_id: str) -> str:
    """The owner a key id belongs to: its part before the first "/" ("" if none)."""
    check_key_id(key_id)
    owner, slash, name = key_id.partition("/")
    return owner if slash and name and OWNER_PATTERN.fullmatch(owner) else ""


def import_info(key_id: str, version: int) -> bytes:
    return encode("encloud/v1 sentinel import", check_key_id(key_id).encode(), u32(version))


def release_info(
    suite: HpkeSuiteId, nonce: bytes, order_digest: bytes, key_id: str, version: int
) -> bytes:
    return encode(
        "encloud/v1 sentinel release",
        suite.encoded(),
        nonce,
        order_digest,
        check_key_id(key_id).encode(),
        u32(version),
    )


def seal_data_key(
    suite: HpkeSuiteId, public_key: bytes, key: bytes | bytearray, info: bytes
) -> bytes:
    if len(key) != KEY_LENGTH:
        raise ValueError("a data key is 32 bytes (AES-256)")
    return hpke_seal(suite, public_key, bytes(key), info)


def open_data_key(suite: HpkeSuiteId, private_key: Any, sealed: bytes, info: bytes) -> bytearray:
    """The 32-byte key inside `sealed`; KeyOpenError for any failure, a wrong length included."""
    key = hpke_open(suite, private_key, sealed, info)
    if len(key) != KEY_LENGTH:
        key[:] = bytes(len(key))
        raise KeyOpenError("a sealed data key holds 32 bytes")
    return key


# --- the workload's side of a release (the client drives it; the tests and vectors too) -----


class ReleaseResponseError(EncloudError):
    """Sentinel's answer does not fit the request (another key id, a key that does not open)."""


@dataclass
class ReleasedKeys:
    """The versions of one key, newest first. wipe() zeroes them."""

    key_id: str
    versions: list[tuple[int, bytearray]] = field(default_factory=list)

    def newest(self) -> bytes:
        return bytes(self.versions[0][1])

    def open_sealed(self, source: BinaryIO, sink: BinaryIO) -> int:
        """Open a sealed file of this key with whichever version sealed it, newest first (as
        Tink tries a keyset's keys); return that version. `source` must be seekable. A version
        that is not the file's fails on the first segment, before anything is written; a
        failure after output began (a tampered file) is raised at once; SealedFileDecryptError
        when no version opens it, SealedFileKeyIdError when the file names another key."""
        start, written = source.tell(), sink.tell()
        failure: SealedFileDecryptError | None = None
        for version, key in self.versions:
            source.seek(start)
            try:
                open_stream(source, sink, key, expected_key_id=self.key_id)
            except SealedFileDecryptError as err:
                if sink.tell() != written:
                    raise
                failure = err
                continue
            return version
        assert failure is not None
        raise failure

    def wipe(self) -> None:
        for _, key in self.versions:
            key[:] = bytes(len(key))


@dataclass
class PendingRelease:
    """A ReleaseKey (or ReleaseJobKey) request and what opens its answer (the fresh HPKE
    private key). `digest` is the order's (or the manifest's) digest the answer is bound to."""

    request: pb.ReleaseKeyRequest | pb.ReleaseJobKeyRequest
    key_id: str
    digest: bytes
    private_key: Any

    def open(self, reply: pb.ReleaseKeyResponse | pb.ReleaseJobKeyResponse) -> ReleasedKeys:
        """Every released version, opened; ReleaseResponseError if any does not fit."""
        if reply.key_id != self.key_id or not reply.keys:
            raise ReleaseResponseError("Sentinel answered for another key, or with no version")
        suite = suite_from_proto(self.request.suite)
        released = ReleasedKeys(self.key_id)
        try:
            for item in reply.keys:
                info = release_info(
                    suite, self.request.nonce, self.digest, self.key_id, item.version
                )
                key = open_data_key(suite, self.private_key, item.sealed_key, info)
                released.versions.append((item.version, key))
        except KeyOpenError:
            released.wipe()
            raise ReleaseResponseError("a released key did not open under this request") from None
        finally:
            self.private_key = None  # one answer per request
        return released


def prepare_release(
    signed_order: bytes,
    nonce: bytes,
    quote: Callable[[bytes], Evidence],
    suite: HpkeSuiteId = SUITE_XWING,
) -> PendingRelease:
    """The ReleaseKey request for a signed order and a Sentinel nonce: a fresh HPKE key pair,
    and the workload's quote over Q_s (handshake.sentinel_qualifying_data) from `quote`."""
    order, _ = release_order.parse_order(signed_order)
    private, public = generate_session_key(suite)
    evidence = quote(sentinel_qualifying_data(suite, nonce, order.digest(), public))
    request = pb.ReleaseKeyRequest(
        release_order=signed_order,
        nonce=nonce,
        suite=suite_to_proto(suite),
        public_key=public,
        evidence=evidence_to_proto(evidence),
    )
    return PendingRelease(request, order.key_id, order.digest(), private)


def prepare_job_release(
    signed_manifest: bytes,
    input_sha256: bytes,
    nonce: bytes,
    quote: Callable[[bytes], Evidence],
    suite: HpkeSuiteId = SUITE_XWING,
) -> PendingRelease:
    """The ReleaseJobKey request for a signed job manifest, the digest of the sealed input the
    workload received, and a Sentinel nonce: the quote is over Q_j (job.job_qualifying_data)."""
    manifest, _ = job.parse_manifest(signed_manifest)
    digest = manifest.digest()
    private, public = generate_session_key(suite)
    evidence = quote(job.job_qualifying_data(suite, nonce, digest, input_sha256, public))
    request = pb.ReleaseJobKeyRequest(
        manifest=signed_manifest,
        nonce=nonce,
        suite=suite_to_proto(suite),
        public_key=public,
        input_sha256=input_sha256,
        evidence=evidence_to_proto(evidence),
    )
    return PendingRelease(request, manifest.key_id, digest, private)
