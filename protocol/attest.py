"""The one attest, verify and release path (docs/PROTOCOL.md), written once and without I/O.

`attest_and_release` is a generator: it yields the RPCs to make (`AttestCall`,
`ReleaseCall`) and is sent their replies, so one implementation serves the
blocking client, the asyncio client and every tool built on them. In order:

1. draw a fresh 32-byte nonce (no caller chooses it: a chosen nonce could accept a
   replayed AttestResponse) and a 32-byte client secret, and ask for a session under the
   suite with the secret's commitment C;
2. recompute Q from the client's own nonce and suite and the server's session values,
   verify the evidence against the policy (encloud.protocol.verifier), and write the
   outcome to the audit log, pass or fail;
3. only if it verified and a release was asked for: seal `DEK || S || client_secret` to
   the session key with HPKE (the server binds the session only when the secret opens C,
   so nobody else who saw the Attest reply can bind or close it), derive the traffic
   keys, and check the server's key confirmation before anything else may be sent.

It returns a `Handshake`: the `Attempt` (everything an evidence bundle needs, the report,
the failure if any) and, once released, the `Session` with its keys.
`first_use_evidence` is the trust-on-first-use variant for `encloud policy init`: one
Attest, nothing verified, nothing released.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from encloud.protocol.audit import AuditLog, attestation_entry
from encloud.protocol.envelope import MessageType, OpeningKey, SealingKey
from encloud.protocol.errors import (
    EnvelopeError,
    KeyConfirmationError,
    MalformedAttestResponseError,
    ServiceError,
    VerificationError,
)
from encloud.protocol.eventlog import ROLE_EMBEDDINGS
from encloud.protocol.evidence import Evidence
from encloud.protocol.handshake import (
    CLIENT_SECRET_LENGTH,
    SESSION_ID_LENGTH,
    SESSION_SECRET_LENGTH,
    SUITE_V1,
    HpkeSuiteId,
    TrafficKeys,
    client_commitment,
    derive_traffic_keys,
    handshake_hash,
    new_dek,
    quote_qualifying_data,
    release_info,
    seal_key,
    session_public_key_length,
    split_enc,
)
from encloud.protocol.policy import Policy, policy_digest
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.verifier import CheckResult, VerifiedAttestation, verify_with_report
from encloud.protocol.wire import evidence_from_proto, sealed_from_proto, suite_to_proto

NONCE_LENGTH = 32


@dataclass(frozen=True)
class AttestCall:
    """Make the Attest RPC with this request; send back its AttestResponse."""

    request: pb.AttestRequest


@dataclass(frozen=True)
class ReleaseCall:
    """Make the ReleaseKey RPC with this request; send back its ReleaseKeyResponse."""

    request: pb.ReleaseKeyRequest


Call = AttestCall | ReleaseCall


@dataclass
class Attempt:
    """One Attest exchange and its verification."""

    target: str
    suite: HpkeSuiteId
    nonce: bytes
    client_commitment: bytes
    session_id: bytes
    session_public_key: bytes
    ttl_seconds: int
    evidence: Evidence
    received_at: float
    """time.monotonic() when the reply arrived (the TTL runs from there)."""
    verified_at: int
    """Unix time of the verification (for bundles; never used for freshness)."""
    policy_sha256: bytes
    report: list[CheckResult]
    attestation: VerifiedAttestation | None
    failure: VerificationError | None
    client_secret: bytearray = field(default_factory=bytearray, repr=False)
    """Opens client_commitment inside the sealed key; wiped once the key is released."""
    route: str = ""
    """The replica's routing token (wire.ROUTE_HEADER), set by the transport from the Attest
    reply's initial metadata; "" when the server sent none."""

    def qualifying_data(self) -> bytes:
        """Q recomputed from the client's nonce, suite and commitment and the server's
        session values."""
        return quote_qualifying_data(
            self.suite,
            self.nonce,
            self.client_commitment,
            self.session_public_key,
            self.session_id,
            self.ttl_seconds,
        )

    def wipe_secret(self) -> None:
        self.client_secret[:] = bytes(len(self.client_secret))


@dataclass
class Session:
    """A verified session whose key was released and confirmed."""

    attempt: Attempt
    attestation: VerifiedAttestation
    keys: TrafficKeys
    c2s: SealingKey
    s2c: OpeningKey
    expires_at: float
    next_request_id: int = 1
    users: int = field(default=0)
    """Calls using the keys right now (the client wipes a replaced session after the last)."""
    retired: bool = field(default=False)

    @property
    def session_id(self) -> bytes:
        return self.attempt.session_id

    @property
    def route(self) -> str:
        return self.attempt.route

    def take_request_id(self) -> int:
        """Request ids start at 1 and share one space across Infer, StreamInfer and End."""
        request_id = self.next_request_id
        self.next_request_id += 1
        return request_id

    def wipe(self) -> None:
        self.c2s.wipe()
        self.s2c.wipe()
        self.keys.wipe()


@dataclass
class Handshake:
    attempt: Attempt
    session: Session | None = None
    """Set when the evidence verified and the key was released."""


def attest_and_release(
    policy: Policy,
    *,
    target: str,
    audit: AuditLog | None,
    release: bool = True,
    dek: bytes | bytearray | None = None,
    suite: HpkeSuiteId | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Generator[Call, Any, Handshake]:
    """Attest, verify against `policy`, audit, and (with `release`) release the key.

    The suite is the policy's first (the post-quantum hybrid by default); when the server
    answers UNSUPPORTED_SUITE the next suite the policy lists is tried, never one it does
    not list. The suite is inside Q, so the quote shows which one the session uses. The
    DEK is fresh unless the caller gives its own; either way the caller's bytes are not
    kept. Raises KeyConfirmationError when the server cannot prove it holds the key; a
    failed verification is returned in `Handshake.attempt.failure` (and audited)."""
    suites = policy.suites if suite is None else (suite,)
    if suite is not None and suite not in policy.suites:
        raise ValueError("the policy does not accept this HPKE suite")
    attempt = yield from _attest_with_fallback(policy, target=target, suites=suites, clock=clock)
    if audit is not None:
        audit.append(audit_entry(attempt))
    if attempt.failure is not None or not release:
        return Handshake(attempt)
    assert attempt.attestation is not None
    session = yield from release_key(attempt, dek)
    return Handshake(attempt, session)


def audit_entry(attempt: Attempt) -> dict[str, Any]:
    """The audit entry of one attestation outcome (digests and the outcome, no secret)."""
    verified = attempt.attestation
    return attestation_entry(
        server=attempt.target,
        nonce=attempt.nonce,
        quote_attest=attempt.evidence.quote_attest,
        policy_digest=attempt.policy_sha256,
        ak_fingerprint=verified.ak_fingerprint if verified else None,
        model_digest=verified.model_digest if verified else None,
        failed_check=attempt.failure.check if attempt.failure is not None else None,
        embedding_model_digest=verified.models.get(ROLE_EMBEDDINGS) if verified else None,
    )


@dataclass(frozen=True)
class FirstUseEvidence:
    """DEV ONLY: what a server showed about itself, unverified (trust on first use)."""

    evidence: Evidence
    qualifying_data: bytes
    ttl_seconds: int


def first_use_evidence(
    suite: HpkeSuiteId = SUITE_V1,
) -> Generator[AttestCall, Any, FirstUseEvidence]:
    """One Attest with a fresh nonce; nothing verified, nothing released. For writing a
    dev-only policy from a server's own claims (`encloud policy init`)."""
    nonce = os.urandom(NONCE_LENGTH)
    commitment = client_commitment(os.urandom(CLIENT_SECRET_LENGTH))  # never released
    reply = yield AttestCall(
        pb.AttestRequest(nonce=nonce, suite=suite_to_proto(suite), client_commitment=commitment)
    )
    malformed = _malformed_reply(suite, reply)
    if malformed is not None:
        raise malformed
    q = quote_qualifying_data(
        suite, nonce, commitment, reply.session_public_key, reply.session_id, reply.ttl_seconds
    )
    return FirstUseEvidence(evidence_from_proto(reply.evidence), q, reply.ttl_seconds)


def _attest_with_fallback(
    policy: Policy,
    *,
    target: str,
    suites: tuple[HpkeSuiteId, ...],
    clock: Callable[[], float],
) -> Generator[Call, Any, Attempt]:
    for index, suite in enumerate(suites):
        try:
            return (yield from _attest(policy, target=target, suite=suite, clock=clock))
        except ServiceError as error:
            # Only a server that does not offer the suite (nothing was quoted) moves us on.
            if error.reason != "UNSUPPORTED_SUITE" or index + 1 == len(suites):
                raise
    raise AssertionError("a policy lists at least one suite")


def _attest(
    policy: Policy, *, target: str, suite: HpkeSuiteId, clock: Callable[[], float]
) -> Generator[Call, Any, Attempt]:
    nonce = os.urandom(NONCE_LENGTH)
    client_secret = bytearray(os.urandom(CLIENT_SECRET_LENGTH))
    commitment = client_commitment(client_secret)
    reply = yield AttestCall(
        pb.AttestRequest(nonce=nonce, suite=suite_to_proto(suite), client_commitment=commitment)
    )
    received_at = clock()
    evidence = evidence_from_proto(reply.evidence)
    malformed = _malformed_reply(suite, reply)
    attestation: VerifiedAttestation | None = None
    failure: VerificationError | None = malformed
    if malformed is not None:
        report = [CheckResult(malformed.check, False, malformed.detail)]
    else:
        expected = quote_qualifying_data(
            suite, nonce, commitment, reply.session_public_key, reply.session_id, reply.ttl_seconds
        )
        attestation, report, failure = verify_with_report(
            evidence,
            policy,
            expected_qualifying_data=expected,
            session_ttl_seconds=reply.ttl_seconds,
        )
    return Attempt(
        target=target,
        suite=suite,
        nonce=nonce,
        client_commitment=commitment,
        session_id=reply.session_id,
        session_public_key=reply.session_public_key,
        ttl_seconds=reply.ttl_seconds,
        evidence=evidence,
        received_at=received_at,
        verified_at=int(time.time()),
        policy_sha256=policy_digest(policy),
        report=report,
        attestation=attestation,
        failure=failure,
        client_secret=client_secret,
    )


def _malformed_reply(
    suite: HpkeSuiteId, reply: pb.AttestResponse
) -> MalformedAttestResponseError | None:
    """The reply's session values checked before any use: a failure like any other check's
    (returned, then audited), never an exception from deeper down."""
    if len(reply.session_id) != SESSION_ID_LENGTH:
        return MalformedAttestResponseError(f"the session id is not {SESSION_ID_LENGTH} bytes")
    if len(reply.session_public_key) != session_public_key_length(suite):
        return MalformedAttestResponseError("the session public key is not the suite's length")
    if not 0 < reply.ttl_seconds < 1 << 32:
        return MalformedAttestResponseError("the session TTL is not 1 to 2^32-1 seconds")
    return None


def release_key(
    attempt: Attempt, dek: bytes | bytearray | None = None
) -> Generator[ReleaseCall, Any, Session]:
    """The release half of `attest_and_release`, for a client that attested first (to
    look at the attestation) and releases afterwards: seal DEK || S, check the key
    confirmation, return the session."""
    attestation = attempt.attestation
    if attestation is None or attempt.failure is not None:
        raise ValueError("release a key only to an attestation that verified")
    dek_bytes = bytearray(dek) if dek is not None else new_dek()
    secret = bytearray(os.urandom(SESSION_SECRET_LENGTH))
    try:
        info = release_info(attempt.suite, attempt.session_id, attestation.attest_digest)
        sealed_key = seal_key(
            attempt.suite,
            attempt.session_public_key,
            dek_bytes,
            secret,
            attempt.client_secret,
            info,
        )
        h_hs = handshake_hash(
            attempt.suite,
            attempt.nonce,
            attempt.session_public_key,
            attempt.session_id,
            attempt.ttl_seconds,
            attestation.attest_digest,
            split_enc(attempt.suite, sealed_key),
        )
        keys = derive_traffic_keys(dek_bytes, secret, h_hs)
    finally:
        dek_bytes[:] = bytes(len(dek_bytes))
        secret[:] = bytes(len(secret))
    try:
        reply = yield ReleaseCall(
            pb.ReleaseKeyRequest(session_id=attempt.session_id, sealed_key=sealed_key)
        )
    except BaseException:  # the call failed or was abandoned: the keys go with it
        keys.wipe()
        raise
    confirm = OpeningKey(bytearray(keys.kc), attempt.session_id)
    try:
        proof = confirm.open(
            sealed_from_proto(reply.key_confirmation), MessageType.KEY_CONFIRM, 0, 0
        )
    except EnvelopeError as error:
        keys.wipe()
        raise KeyConfirmationError("the server did not prove it holds the key") from error
    finally:
        confirm.wipe()
    if not hmac.compare_digest(proof, h_hs):
        keys.wipe()
        raise KeyConfirmationError("the key confirmation is for another handshake")
    attempt.wipe_secret()  # the session is bound: the secret has done its one job
    return Session(
        attempt=attempt,
        attestation=attestation,
        keys=keys,
        c2s=SealingKey(keys.c2s, attempt.session_id),
        s2c=OpeningKey(keys.s2c, attempt.session_id),
        expires_at=attempt.received_at + attempt.ttl_seconds,
    )
