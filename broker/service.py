"""Sentinel's domain logic, free of gRPC: the owner API, the workload API, and an audit
entry for every request and decision (docs/SENTINEL.md).

The order of the release checks is fixed, and each refusal is typed and audited:
nonce (single use) -> order form -> key exists -> owner's signature -> expiry -> key active
-> evidence against the key's policy over Sentinel's qualifying data -> the order's model is
the one running -> the order id unused (marked used in the transaction that reads the
wrapped versions) -> each version sealed to the workload's HPKE key.

A job manifest (ReleaseJobKey) goes through the same checks, its digest in the order's
place, then: the input the workload received is the manifest's -> the job is not done and
no other release of it is live (claimed in the transaction that reads the wrapped versions).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from encloud.broker import schema
from encloud.broker.kek import KekError, KeyWrapper
from encloud.broker.store import ACTIVE, JOB_LIVE, JobRow, KeyRecord, Owner, Startup, Store
from encloud.protocol import eventlog, job, key_broker, release_order
from encloud.protocol.audit import AuditLog, parse_line
from encloud.protocol.encoding import u32
from encloud.protocol.errors import (
    PolicyError,
    ReleaseOrderFormatError,
    ReleaseOrderSignatureError,
)
from encloud.protocol.evidence import Evidence
from encloud.protocol.faults import (
    AttestationRefusedFault,
    DomainError,
    InputMismatchFault,
    InvalidArgumentError,
    JobProofFault,
    JobReleaseUnknownFault,
    KeyImportFault,
    KeyNotFoundFault,
    KeyRevokedFault,
    ModelMismatchFault,
    NonceUnknownFault,
    NotKeyOwnerFault,
    OrderExpiredFault,
    OrderMalformedFault,
    OrderSignatureFault,
    OwnerUnknownFault,
    PolicyRejectedFault,
    UnsupportedSuiteError,
)
from encloud.protocol.handshake import (
    HpkeSuiteId,
    KeyOpenError,
    is_supported,
    sentinel_qualifying_data,
    session_public_key_length,
    xwing_private_key,
    xwing_public_key,
)
from encloud.protocol.policy import parse_policy, policy_digest
from encloud.protocol.sealed_file import check_key_id
from encloud.protocol.verifier import VerifiedAttestation, verify_with_report

log = logging.getLogger("encloud.sentinel")


@dataclass(frozen=True)
class KeyView:
    """A key's public facts (what ListKeys shows): never its material."""

    key_id: str
    state: str
    versions: tuple[int, ...]
    policy_sha256: str
    created_at: int


@dataclass(frozen=True)
class Released:
    key_id: str
    sealed: list[tuple[int, bytes]]
    """(version, HPKE-sealed key), newest first."""


@dataclass(frozen=True)
class JobEnd:
    """A workload's report that its release of a job's key ended (EndJobRelease)."""

    job_id: bytes
    release_seq: int
    outcome: str
    answers_sha256: bytes
    records_done: int
    proof: bytes


def _view(record: KeyRecord) -> KeyView:
    return KeyView(
        record.key_id, record.state, record.versions, record.policy_sha256, record.created_at
    )


class ImportKey:
    """Sentinel's X-Wing import key: generated once, its seed stored wrapped under the KEK."""

    def __init__(self, store: Store, wrapper: KeyWrapper) -> None:
        seed = bytearray(os.urandom(32))
        try:
            stored = store.set_settings_once(
                {
                    schema.KEK_CHECK: wrapper.check_value.encode("ascii"),
                    schema.IMPORT_SEED: wrapper.wrap(seed, b"import key"),
                    schema.IMPORT_PUBLIC: xwing_public_key(bytes(seed)),
                }
            )
        finally:
            seed[:] = bytes(32)
        if stored[schema.KEK_CHECK] != wrapper.check_value.encode("ascii"):
            raise KekError("this KEK is not the one the database was created with")
        own_seed = wrapper.unwrap(stored[schema.IMPORT_SEED], b"import key")
        try:
            self.private_key: Any = xwing_private_key(bytes(own_seed))
        finally:
            own_seed[:] = bytes(len(own_seed))
        self.public_key = stored[schema.IMPORT_PUBLIC]
        self.suite = key_broker.IMPORT_SUITE


class Sentinel:
    def __init__(
        self,
        store: Store,
        wrapper: KeyWrapper,
        audit: AuditLog,
        *,
        nonce_ttl_seconds: int = 60,
        max_outstanding_nonces: int = 10_000,
        max_outstanding_nonces_per_peer: int = 64,
        accept_dev_policies: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.wrapper = wrapper
        self.audit = audit
        self.import_key = ImportKey(store, wrapper)
        self.nonce_ttl_seconds = nonce_ttl_seconds
        self.max_outstanding_nonces = max_outstanding_nonces
        self.max_outstanding_nonces_per_peer = max_outstanding_nonces_per_peer
        self.accept_dev_policies = accept_dev_policies
        self.clock = clock

    # --- the owner API ---------------------------------------------------------------------

    def owner_for(self, cert_spki_sha256: str | None, method: str) -> Owner:
        """The owner a verified client certificate belongs to; refused (and audited) if none,
        or if the database cannot say."""
        facts = {"certificate": cert_spki_sha256 or ""}
        try:
            owner = self.store.owner_by_certificate(cert_spki_sha256) if cert_spki_sha256 else None
            if owner is None:
                raise OwnerUnknownFault("no registered owner holds this client certificate")
        except DomainError as err:
            self._record("sentinel_owner", method, "refused", reason=err.reason, **facts)
            raise
        return owner

    def add_signing_key(self, owner: Owner, public_key: bytes) -> str:
        facts: dict[str, Any] = {"owner": owner.name}
        with self._owner_call("AddSigningKey", facts):
            try:
                Ed25519PublicKey.from_public_bytes(public_key)
            except ValueError:
                raise InvalidArgumentError("not a raw 32-byte Ed25519 public key") from None
            facts["signer"] = hashlib.sha256(public_key).hexdigest()
            facts["new"] = self.store.add_signing_key(owner, public_key, facts["signer"])
        return str(facts["signer"])

    def create_key(self, owner: Owner, key_id: str, policy: bytes, sealed_key: bytes) -> KeyView:
        facts: dict[str, Any] = {"owner": owner.name, "key_id": key_id}
        with self._owner_call("CreateKey", facts):
            self._own_key_id(owner, key_id)
            facts["policy_sha256"] = self._check_policy(policy)
            wrapped = self._import(key_id, 1, sealed_key)
            self.store.create_key(owner, key_id, policy, facts["policy_sha256"], wrapped)
            record = self._owned_record(owner, key_id)
            facts["key_versions"] = list(record.versions)
        return _view(record)

    def rotate_key(self, owner: Owner, key_id: str, sealed_key: bytes) -> KeyView:
        facts: dict[str, Any] = {"owner": owner.name, "key_id": key_id}
        with self._owner_call("RotateKey", facts):
            record = self._owned_record(owner, key_id)
            if record.state != ACTIVE:
                raise KeyRevokedFault(f"the key {key_id} is revoked")
            version = self.store.next_version(record)
            self.store.add_version(record, version, self._import(key_id, version, sealed_key))
            record = self._owned_record(owner, key_id)
            facts["key_versions"] = list(record.versions)
        return _view(record)

    def revoke_key(self, owner: Owner, key_id: str) -> KeyView:
        with self._owner_call("RevokeKey", {"owner": owner.name, "key_id": key_id}):
            self.store.revoke(self._owned_record(owner, key_id))
            record = self._owned_record(owner, key_id)
        return _view(record)

    def list_keys(self, owner: Owner) -> list[KeyView]:
        facts: dict[str, Any] = {"owner": owner.name}
        with self._owner_call("ListKeys", facts):
            views = [_view(record) for record in self.store.keys_of(owner)]
            facts["count"] = len(views)
        return views

    def read_audit(self, owner: Owner, after_seq: int) -> list[bytes]:
        """This owner's entries (those naming it as owner), as their lines in the log."""
        with self._owner_call("ReadAudit", {"owner": owner.name}):
            pass  # recorded first, so the reader sees its own read
        self.audit.flush()
        found: list[bytes] = []
        with self.audit.path.open("rb") as handle:
            for line in handle:
                line = line.rstrip(b"\n")
                entry = parse_line(line)
                if entry.get("owner") == owner.name and entry["seq"] > after_seq:
                    found.append(line)
        return found

    def malformed(self, method: str) -> None:
        """Audit a request refused before it reached the logic (it was not protobuf)."""
        self._record("sentinel_request", method, "refused", reason="MALFORMED_MESSAGE")

    # --- the workload API ------------------------------------------------------------------

    def challenge(self, peer: str) -> tuple[bytes, int]:
        """A nonce for `peer` (protocol.peers.peer_key of the caller), within its share."""
        nonce = os.urandom(key_broker.NONCE_LENGTH)
        facts: dict[str, Any] = {}
        with self._audited("sentinel_workload", "GetChallenge", facts):
            self.store.add_nonce(
                nonce,
                int(self.clock()) + self.nonce_ttl_seconds,
                peer,
                self.max_outstanding_nonces,
                self.max_outstanding_nonces_per_peer,
            )
            facts["nonce_sha256"] = _h(nonce)
        return nonce, self.nonce_ttl_seconds

    def release(
        self,
        signed_order: bytes,
        nonce: bytes,
        suite: HpkeSuiteId,
        public_key: bytes,
        evidence: Evidence,
    ) -> Released:
        facts: dict[str, Any] = {"nonce_sha256": _h(nonce)}
        with self._audited("sentinel_release", "ReleaseKey", facts, done="released"):
            released = self._release(signed_order, nonce, suite, public_key, evidence, facts)
            facts["key_versions"] = [version for version, _ in released.sealed]
        return released

    def _release(
        self,
        signed_order: bytes,
        nonce: bytes,
        suite: HpkeSuiteId,
        public_key: bytes,
        evidence: Evidence,
        facts: dict[str, Any],
    ) -> Released:
        self._check_request(suite, public_key, nonce)
        try:
            order, _ = release_order.parse_order(signed_order)
        except ReleaseOrderFormatError as err:
            raise OrderMalformedFault(f"the release order is malformed: {err}") from None
        facts.update(key_id=order.key_id, order_id=order.order_id.hex())
        record = self._signed_record(
            order.key_id,
            order.expires_at,
            lambda owner_key: release_order.verify_order(signed_order, owner_key, now=0),
            facts,
            "release order",
        )
        q = sentinel_qualifying_data(suite, nonce, order.digest(), public_key)
        self._attested(evidence, record, q, order.model_digest, facts)
        wrapped = self.store.use_order(order.order_id, order.expires_at, record)
        return self._seal_versions(wrapped, record, suite, nonce, order.digest(), public_key)

    # --- jobs ------------------------------------------------------------------------------

    def release_job(
        self,
        signed_manifest: bytes,
        nonce: bytes,
        suite: HpkeSuiteId,
        public_key: bytes,
        input_sha256: bytes,
        evidence: Evidence,
    ) -> tuple[Released, int]:
        """The job's key for the workload that runs it, and this release's number."""
        facts: dict[str, Any] = {"nonce_sha256": _h(nonce)}
        with self._audited("sentinel_job", "ReleaseJobKey", facts, done="released"):
            released, seq = self._release_job(
                signed_manifest, nonce, suite, public_key, input_sha256, evidence, facts
            )
            facts.update(key_versions=[v for v, _ in released.sealed], release_seq=seq)
        return released, seq

    def _release_job(
        self,
        signed_manifest: bytes,
        nonce: bytes,
        suite: HpkeSuiteId,
        public_key: bytes,
        input_sha256: bytes,
        evidence: Evidence,
        facts: dict[str, Any],
    ) -> tuple[Released, int]:
        self._check_request(suite, public_key, nonce)
        try:
            manifest, _ = job.parse_manifest(signed_manifest)
        except ReleaseOrderFormatError as err:
            raise OrderMalformedFault(f"the job manifest is malformed: {err}") from None
        digest = manifest.digest()
        facts.update(
            key_id=manifest.key_id, job_id=manifest.job_id.hex(), manifest_sha256=digest.hex()
        )
        record = self._signed_record(
            manifest.key_id,
            manifest.expires_at,
            lambda owner_key: job.verify_manifest(signed_manifest, owner_key, now=0),
            facts,
            "job manifest",
        )
        if len(input_sha256) != 32:
            raise InvalidArgumentError("input_sha256 is 32 bytes")
        facts["input_sha256"] = input_sha256.hex()
        q = job.job_qualifying_data(suite, nonce, digest, input_sha256, public_key)
        attested = self._attested(evidence, record, q, manifest.model_digest, facts)
        if not hmac.compare_digest(input_sha256, manifest.input_sha256):
            raise InputMismatchFault("the workload received another input than the manifest's")
        startup = _startup(attested)
        facts.update(startups=startup.startups, reset_count=startup.reset_count)
        seq, wrapped = self.store.claim_job(
            manifest.job_id, digest.hex(), manifest.expires_at, record, startup
        )
        released = self._seal_versions(wrapped, record, suite, nonce, digest, public_key)
        return released, seq

    def end_job_release(self, end: JobEnd) -> None:
        """End a live release of a job as done or paused, once its proof checks."""
        facts: dict[str, Any] = {
            "job_id": end.job_id.hex(),
            "release_seq": end.release_seq,
            "job_outcome": end.outcome,
            "records_done": end.records_done,
        }
        with self._audited("sentinel_job", "EndJobRelease", facts, done="ended"):
            if end.outcome not in job.OUTCOMES:
                raise InvalidArgumentError(f"the outcome is one of {job.OUTCOMES}")
            if len(end.answers_sha256) not in (0, 32):
                raise InvalidArgumentError("answers_sha256 is 32 bytes or empty")
            row = self.store.job(end.job_id)
            if row is None or row.release_seq != end.release_seq or row.state != JOB_LIVE:
                raise JobReleaseUnknownFault("no live release of this job has that number")
            facts["key_id"] = row.key_id
            if not self._proof_checks(end, row):
                raise JobProofFault("the proof is not made with the job's key")
            answers = end.answers_sha256.hex() or None
            facts["answers_sha256"] = answers
            self.store.end_release(
                end.job_id, end.release_seq, end.outcome, end.records_done, answers
            )

    def _proof_checks(self, end: JobEnd, row: JobRow) -> bool:
        wrapped = self.store.wrapped_version(row.data_key, row.proof_version)
        if wrapped is None:  # revoked since: the key is gone
            return False
        key = self.wrapper.unwrap(wrapped, row.key_id.encode(), u32(row.proof_version))
        try:
            expected = job.end_proof(
                key, end.job_id, end.release_seq, end.outcome, end.answers_sha256, end.records_done
            )
        finally:
            key[:] = bytes(len(key))
        return hmac.compare_digest(expected, end.proof)

    # --- the checks a release order and a job manifest share ---------------------------------

    def _check_request(self, suite: HpkeSuiteId, public_key: bytes, nonce: bytes) -> None:
        if not is_supported(suite):
            raise UnsupportedSuiteError("this HPKE suite is not supported")
        if len(public_key) != session_public_key_length(suite):
            raise InvalidArgumentError("the public key's length does not fit its suite")
        if len(nonce) != key_broker.NONCE_LENGTH or not self.store.take_nonce(nonce):
            raise NonceUnknownFault(
                "the nonce was not issued, was used already or expired: ask for a new one"
            )

    def _signed_record(
        self,
        key_id: str,
        expires_at: int,
        verify: Callable[[Ed25519PublicKey], object],
        facts: dict[str, Any],
        what: str,
    ) -> KeyRecord:
        """The key's record, once one of its owner's signing keys signed the request
        (`verify` raises ReleaseOrderSignatureError otherwise), it has not expired on
        Sentinel's clock and the key is active."""
        record = self.store.key(key_id)
        if record is None:
            raise KeyNotFoundFault(f"no key {key_id}")
        facts["owner"] = record.owner.name
        if not self._signed_by_owner(verify, record):
            raise OrderSignatureFault(f"the {what} is not signed by the key's owner")
        if self.clock() >= expires_at:
            raise OrderExpiredFault(f"the {what} expired at {expires_at}")
        if record.state != ACTIVE:
            raise KeyRevokedFault(f"the key {key_id} is revoked")
        return record

    def _attested(
        self,
        evidence: Evidence,
        record: KeyRecord,
        qualifying_data: bytes,
        model_digest: bytes,
        facts: dict[str, Any],
    ) -> VerifiedAttestation:
        policy = parse_policy(record.policy)
        attested, report, error = verify_with_report(
            evidence, policy, expected_qualifying_data=qualifying_data, session_ttl_seconds=None
        )
        if error is not None:
            check = report[-1].name if report else ""
            raise AttestationRefusedFault(
                f"the evidence failed the check {check}: {type(error).__name__}",
                metadata={"check": check, "error": type(error).__name__},
            )
        assert attested is not None
        facts.update(
            ak_fingerprint=attested.ak_fingerprint, attest_sha256=_h(evidence.quote_attest)
        )
        if model_digest not in attested.models.values():
            raise ModelMismatchFault("the attested workload does not run the requested model")
        return attested

    def _seal_versions(
        self,
        wrapped: list[tuple[int, bytes]],
        record: KeyRecord,
        suite: HpkeSuiteId,
        nonce: bytes,
        digest: bytes,
        public_key: bytes,
    ) -> Released:
        sealed: list[tuple[int, bytes]] = []
        for version, blob in wrapped:
            key = self.wrapper.unwrap(blob, record.key_id.encode(), u32(version))
            try:
                info = key_broker.release_info(suite, nonce, digest, record.key_id, version)
                sealed.append((version, key_broker.seal_data_key(suite, public_key, key, info)))
            finally:
                key[:] = bytes(len(key))
        return Released(record.key_id, sealed)

    def _signed_by_owner(
        self, verify: Callable[[Ed25519PublicKey], object], record: KeyRecord
    ) -> bool:
        """Whether one of the key owner's registered signing keys signed the request (expiry
        is checked after, on Sentinel's clock)."""
        for raw in self.store.signing_keys(record.owner.id):
            try:
                verify(Ed25519PublicKey.from_public_bytes(raw))
            except ReleaseOrderSignatureError:
                continue
            return True
        return False

    # --- helpers ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _audited(
        self, event: str, method: str, facts: dict[str, Any], done: str = "ok"
    ) -> Iterator[None]:
        """Run one call and audit its outcome: `done` with the facts it gathered, or refused
        with the reason, the facts gathered so far and the fault's metadata (a database that
        is down included)."""
        try:
            yield
        except DomainError as err:
            refusal = {**facts, **err.metadata}
            self._record(event, method, "refused", reason=err.reason, **refusal)
            raise
        self._record(event, method, done, **facts)

    def _owner_call(
        self, method: str, facts: dict[str, Any]
    ) -> contextlib.AbstractContextManager[None]:
        return self._audited("sentinel_owner", method, facts)

    def _own_key_id(self, owner: Owner, key_id: str) -> None:
        try:
            check_key_id(key_id)
        except ValueError as err:
            raise InvalidArgumentError(str(err)) from None
        if key_broker.owner_of(key_id) != owner.name:
            raise NotKeyOwnerFault(f"key ids of this owner start with {owner.name}/")

    def _owned_record(self, owner: Owner, key_id: str) -> KeyRecord:
        self._own_key_id(owner, key_id)
        record = self.store.key(key_id)
        if record is None or record.owner.id != owner.id:
            raise KeyNotFoundFault(f"no key {key_id}")
        return record

    def _check_policy(self, policy: bytes) -> str:
        try:
            parsed = parse_policy(policy)
        except PolicyError as err:
            raise PolicyRejectedFault(f"the release policy is invalid: {err}") from None
        if parsed.dev_only and not self.accept_dev_policies:
            raise PolicyRejectedFault(
                "a dev-only (trust-on-first-use) policy; this Sentinel accepts production "
                "policies only (accept_dev_policies)"
            )
        return policy_digest(parsed).hex()

    def _import(self, key_id: str, version: int, sealed: bytes) -> bytes:
        info = key_broker.import_info(key_id, version)
        try:
            key = key_broker.open_data_key(
                self.import_key.suite, self.import_key.private_key, sealed, info
            )
        except KeyOpenError:
            raise KeyImportFault(
                f"the sealed key did not open as version {version} of {key_id}"
            ) from None
        try:
            return self.wrapper.wrap(key, key_id.encode(), u32(version))
        finally:
            key[:] = bytes(len(key))

    def _record(self, event: str, method: str, outcome: str, **facts: Any) -> None:
        entry = {"event": event, "method": method, "outcome": outcome, **facts}
        self.audit.append({k: v for k, v in entry.items() if v is not None})


def _startup(attested: VerifiedAttestation) -> Startup:
    """The machine and start-up a verified quote shows (its log's start-ups: one runtime
    event each, the verifier checked the grammar)."""
    startups = sum(
        1 for record in attested.events if record.event.event_type == eventlog.EVENT_RUNTIME
    )
    return Startup(attested.ak_fingerprint, attested.reset_count, attested.restart_count, startups)


def _h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
