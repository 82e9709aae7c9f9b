"""Only the client that sent the Attest can bind or close its session.

HPKE base mode does not authenticate the sender: anyone who saw a pending session's id and
public key (plaintext gRPC, a shared proxy, a log) can seal a key of their own to it. These
attacks run against the real server on swtpm, the attacker with nothing but what the Attest
reply showed on the wire.
"""

from __future__ import annotations

import os

import grpc
import pytest

from encloud.client import NO_AUDIT, Client, RetryPolicy
from encloud.protocol.encoding import sha256
from encloud.protocol.handshake import new_dek, release_info, seal_key
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.v2 import encloud_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.attack]


def _victim(stack) -> Client:
    client = Client(
        stack.address,
        stack.policy,
        audit_log=NO_AUDIT,
        retry=RetryPolicy(max_retries=0, max_reattests=0),
        auto_reattest=False,
    )
    client.attest()  # pending: attested, key not released yet
    return client


def _attacker_release(stack, victim: Client, sealed_key: bytes) -> grpc.RpcError | None:
    attempt = victim.last_attempt
    assert attempt is not None
    with grpc.insecure_channel(stack.address) as channel:
        try:
            pb_grpc.InferenceServiceStub(channel).ReleaseKey(
                pb.ReleaseKeyRequest(session_id=attempt.session_id, sealed_key=sealed_key),
                timeout=30,
            )
        except grpc.RpcError as error:
            return error
    return None


def test_attack_a_third_party_seals_its_own_key_to_a_pending_session(stack) -> None:
    victim = _victim(stack)
    attempt = victim.last_attempt
    assert attempt is not None
    # Everything the attacker uses was in the clear: the suite, the session id and public
    # key, and the quote (H_ev); the DEK and session secret are its own.
    info = release_info(attempt.suite, attempt.session_id, sha256(attempt.evidence.quote_attest))
    guess = os.urandom(32)  # the client secret is not on the wire: the attacker guesses
    forged = seal_key(
        attempt.suite, attempt.session_public_key, new_dek(), os.urandom(32), guess, info
    )
    refused = _attacker_release(stack, victim, forged)
    assert refused is not None and refused.code() == grpc.StatusCode.PERMISSION_DENIED
    # The session is still the victim's to bind.
    with victim:
        victim.release_key()
        assert victim.infer([("user", "Hi")], max_new_tokens=2).text is not None


def test_attack_a_third_party_closes_a_pending_session_with_garbage(stack) -> None:
    victim = _victim(stack)
    for _ in range(5):  # more than v1's limit of three failed releases
        refused = _attacker_release(stack, victim, os.urandom(96))
        assert refused is not None and refused.code() == grpc.StatusCode.PERMISSION_DENIED
    with victim:
        victim.release_key()  # neither closed nor bound by anyone else
        assert victim.infer([("user", "Hi")], max_new_tokens=2).text is not None
