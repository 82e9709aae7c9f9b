"""Sentinel's domain logic, free of gRPC: the owner API, the workload API, and an audit
entry for every request and decision (docs/SENTINEL.md).

The order of the release checks is fixed, and each refusal is typed and audited:
nonce (single use) -> order form -> key exists -> owner's signature -> expiry -> key active
-> evidence against the key's policy over Sentinel's qualifying data -> the order's model is
the one running -> the order id unused (marked used in the transaction that reads the
wrapped versions) -> each version sealed to the workload's HPKE key.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from encloud.broker import schema
from encloud.broker.kek import KekError, KeyWrapper
from encloud.broker.store import ACTIVE, KeyRecord, Owner, Store
from encloud.protocol import key_broker, release_order
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
    InvalidArgumentError,
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
from encloud.protocol.verifier import verify_with_report

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
        if not is_supported(suite):
            raise UnsupportedSuiteError("this HPKE suite is not supported")
        if len(public_key) != session_public_key_length(suite):
            raise InvalidArgumentError("the public key's length does not fit its suite")
        if len(nonce) != key_broker.NONCE_LENGTH or not self.store.take_nonce(nonce):
            raise NonceUnknownFault(
                "the nonce was not issued, was used already or expired: ask for a new one"
            )
        try:
            order, _ = release_order.parse_order(signed_order)
        except ReleaseOrderFormatError as err:
            raise OrderMalformedFault(f"the release order is malformed: {err}") from None
        facts.update(key_id=order.key_id, order_id=order.order_id.hex())
        record = self.store.key(order.key_id)
        if record is None:
            raise KeyNotFoundFault(f"no key {order.key_id}")
        facts["owner"] = record.owner.name
        if not self._check_signature(signed_order, record):
            raise OrderSignatureFault("the release order is not signed by the key's owner")
        if self.clock() >= order.expires_at:
            raise OrderExpiredFault(f"the release order expired at {order.expires_at}")
        if record.state != ACTIVE:
            raise KeyRevokedFault(f"the key {order.key_id} is revoked")
        policy = parse_policy(record.policy)
        q = sentinel_qualifying_data(suite, nonce, order.digest(), public_key)
        attested, report, error = verify_with_report(
            evidence, policy, expected_qualifying_data=q, session_ttl_seconds=None
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
        if order.model_digest not in attested.models.values():
            raise ModelMismatchFault("the attested workload does not run the order's model")
        wrapped = self.store.use_order(order.order_id, order.expires_at, record)
        sealed: list[tuple[int, bytes]] = []
        digest = order.digest()
        for version, blob in wrapped:
            key = self.wrapper.unwrap(blob, record.key_id.encode(), u32(version))
            try:
                info = key_broker.release_info(suite, nonce, digest, record.key_id, version)
                sealed.append((version, key_broker.seal_data_key(suite, public_key, key, info)))
            finally:
                key[:] = bytes(len(key))
        return Released(record.key_id, sealed)

    def _check_signature(self, signed_order: bytes, record: KeyRecord) -> bool:
        """Whether one of the key owner's registered signing keys signed the order (expiry
        is checked after, on Sentinel's clock)."""
        for raw in self.store.signing_keys(record.owner.id):
            try:
                release_order.verify_order(
                    signed_order, Ed25519PublicKey.from_public_bytes(raw), now=0
                )
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


def _h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
