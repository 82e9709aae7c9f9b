"""Clients of Sentinel, the key broker (docs/SENTINEL.md).

`OwnerClient`: a data owner over mutual TLS: registers signing keys, creates, rotates,
revokes and lists keys (each key sealed with HPKE to Sentinel's import key before it leaves),
reads its audit entries. `WorkloadClient`: a workload in an attested CVM: asks for a key with
an owner-signed release order and a quote over Sentinel's qualifying data, and opens what
comes back with a fresh HPKE key that never leaves the process. Refusals raise the typed
errors of encloud.protocol.errors (SentinelError and its subclasses).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from encloud.client._status import sentinel_error
from encloud.protocol import key_broker
from encloud.protocol.audit import parse_line
from encloud.protocol.evidence import Evidence
from encloud.protocol.handshake import SUITE_XWING, HpkeSuiteId
from encloud.protocol.key_broker import ReleasedKeys, ReleaseResponseError
from encloud.protocol.sentinel.v1 import sentinel_pb2 as pb
from encloud.protocol.sentinel.v1 import sentinel_pb2_grpc as pb_grpc
from encloud.protocol.wire import suite_from_proto

T = TypeVar("T")
__all__ = ["OwnerClient", "ReleaseResponseError", "ReleasedKeys", "WorkloadClient"]
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    state: str
    """"active" or "revoked"."""
    versions: tuple[int, ...]
    policy_sha256: str
    created_at: int


def _info(key: pb.KeyInfo) -> KeyInfo:
    state = "active" if key.state == pb.KEY_STATE_ACTIVE else "revoked"
    return KeyInfo(key.key_id, state, tuple(key.versions), key.policy_sha256, key.created_at)


def _call(method: Callable[..., T], request: Any, timeout: float) -> T:
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as err:
        raise sentinel_error(err) from None


class OwnerClient:
    """The owner API over mutual TLS: `cert_pem`/`key_pem` are this owner's client
    certificate and key, `ca_pem` the roots Sentinel's certificate chains to."""

    def __init__(
        self,
        target: str,
        *,
        ca_pem: bytes,
        cert_pem: bytes,
        key_pem: bytes,
        timeout: float = DEFAULT_TIMEOUT,
        server_name: str | None = None,
    ) -> None:
        credentials = grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.OwnerServiceStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> OwnerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def import_key(self) -> tuple[HpkeSuiteId, bytes]:
        reply = _call(self._stub.GetImportKey, pb.GetImportKeyRequest(), self.timeout)
        return suite_from_proto(reply.suite), reply.public_key

    def add_signing_key(self, public_key: bytes) -> str:
        request = pb.AddSigningKeyRequest(public_key=public_key)
        return _call(self._stub.AddSigningKey, request, self.timeout).fingerprint

    def _seal(self, key_id: str, version: int, key: bytes | bytearray) -> bytes:
        suite, public = self.import_key()
        return key_broker.seal_data_key(suite, public, key, key_broker.import_info(key_id, version))

    def create_key(self, key_id: str, policy: bytes, key: bytes | bytearray) -> KeyInfo:
        request = pb.CreateKeyRequest(
            key_id=key_id, policy=policy, sealed_key=self._seal(key_id, 1, key)
        )
        return _info(_call(self._stub.CreateKey, request, self.timeout).key)

    def rotate_key(self, key_id: str, key: bytes | bytearray) -> KeyInfo:
        """Add a version: the next number after the newest Sentinel lists."""
        current = next((k for k in self.list_keys() if k.key_id == key_id), None)
        version = (max(current.versions) if current and current.versions else 0) + 1
        request = pb.RotateKeyRequest(key_id=key_id, sealed_key=self._seal(key_id, version, key))
        return _info(_call(self._stub.RotateKey, request, self.timeout).key)

    def revoke_key(self, key_id: str) -> KeyInfo:
        request = pb.RevokeKeyRequest(key_id=key_id)
        return _info(_call(self._stub.RevokeKey, request, self.timeout).key)

    def list_keys(self) -> list[KeyInfo]:
        reply = _call(self._stub.ListKeys, pb.ListKeysRequest(), self.timeout)
        return [_info(key) for key in reply.keys]

    def read_audit(self, after_seq: int = 0) -> list[dict[str, Any]]:
        reply = _call(self._stub.ReadAudit, pb.ReadAuditRequest(after_seq=after_seq), self.timeout)
        return [parse_line(line) for line in reply.entries]


class WorkloadClient:
    """The workload API. `ca_pem` when Sentinel serves it over TLS, None for plaintext."""

    def __init__(
        self,
        target: str,
        *,
        ca_pem: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        server_name: str | None = None,
    ) -> None:
        if ca_pem is None:
            self._channel = grpc.insecure_channel(target)
        else:
            options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self._channel = grpc.secure_channel(
                target, grpc.ssl_channel_credentials(ca_pem), options=options
            )
        self._stub = pb_grpc.WorkloadServiceStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> WorkloadClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def challenge(self) -> bytes:
        return _call(self._stub.GetChallenge, pb.GetChallengeRequest(), self.timeout).nonce

    def release_key(
        self,
        signed_order: bytes,
        quote: Callable[[bytes], Evidence],
        *,
        suite: HpkeSuiteId = SUITE_XWING,
        nonce: bytes | None = None,
    ) -> ReleasedKeys:
        """Ask for the order's key. `quote(qualifying_data)` makes the evidence (the
        workload's vTPM: TpmAttester.evidence). `nonce` is for tests that replay one."""
        nonce = self.challenge() if nonce is None else nonce
        pending = key_broker.prepare_release(signed_order, nonce, quote, suite)
        return pending.open(_call(self._stub.ReleaseKey, pending.request, self.timeout))


def key_info_json(keys: Sequence[KeyInfo]) -> str:
    """Keys as JSON lines for `encloud sentinel key list`."""
    return "\n".join(
        json.dumps(
            {
                "key_id": k.key_id,
                "state": k.state,
                "versions": list(k.versions),
                "policy_sha256": k.policy_sha256,
                "created_at": k.created_at,
            },
            sort_keys=True,
        )
        for k in keys
    )
