"""AK trust by X.509 chain, end to end: an AK certificate in swtpm NV, read by a real server.

A test CA (root -> intermediate) certifies the swtpm's AK; the leaf goes into NV
as cloud vTPMs keep it (0x01C101D0, Azure's index), the intermediate into the
chain file. A policy that pins no key, only the root, verifies the server; a
policy with another root, or a certificate for another key, is refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import tpm_builders as b
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from encloud.client import NO_AUDIT, Client
from encloud.protocol.errors import AkUntrustedError
from encloud.protocol.policy import load_policy
from encloud.protocol.tpm_structures import parse_public

pytestmark = [pytest.mark.e2e, pytest.mark.tpm]

NV_INDEX = 0x01C101D0


class _PublicOnly:
    """Wraps a public key where tpm_builders.certificate expects a key with public_key()."""

    def __init__(self, public):
        self._public = public

    def public_key(self):
        return self._public


def _provision(state_dir: Path, *, certify_other_key: bool = False) -> tuple[bytes, bytes]:
    """Write an AK certificate (DER, padded like a cloud NV index) into swtpm NV.

    Returns (root DER, intermediate DER)."""
    from encloud.server.attestation.swtpm import Swtpm
    from encloud.server.attestation.tpm import Tpm

    root_key = ec.generate_private_key(ec.SECP256R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    root = b.certificate(
        "Test vTPM Root", root_key.public_key(), "Test vTPM Root", root_key, ca=True
    )
    inter = b.certificate(
        "Test vTPM Intermediate", inter_key.public_key(), "Test vTPM Root", root_key, ca=True
    )
    sw = Swtpm(state_dir)
    sw.start()
    try:
        with Tpm.open(sw.tcti) as tpm:
            ak_key = parse_public(tpm.ak_public()).public_key()
            if certify_other_key:
                ak_key = ec.generate_private_key(ec.SECP256R1()).public_key()
            leaf = b.certificate("Test AK", ak_key, "Test vTPM Intermediate", inter_key, ca=False)
            padded = leaf + bytes(64)  # NV indices are often larger than the certificate
            tpm.define_nv(NV_INDEX, len(padded))
            tpm.write_nv(NV_INDEX, padded)
    finally:
        sw.stop()
    return root, inter


def _serve(tmp_path: Path, model_dir: Path, intermediate: bytes):
    from encloud.server.devstack import ServerProcess, start_swtpm

    chain_file = tmp_path / "intermediates.pem"
    chain_file.write_bytes(
        x509.load_der_x509_certificate(intermediate).public_bytes(serialization.Encoding.PEM)
    )
    swtpm = start_swtpm(tmp_path / "swtpm")
    server = ServerProcess(
        tmp_path,
        swtpm.tcti,
        model_dir,
        ak_certificate_nv_index=NV_INDEX,
        ak_certificate_chain_file=chain_file,
    )
    return swtpm, server


@pytest.fixture
def certified_server(tmp_path: Path, model_dir: Path):
    root, inter = _provision(tmp_path / "swtpm")
    swtpm, server = _serve(tmp_path, model_dir, inter)
    try:
        address = server.start()
        dev = load_policy(server.policy_path)
        yield address, replace(dev, pinned_public_keys=(), certificate_roots=(root,))
    finally:
        server.kill()
        swtpm.stop()


def test_ak_certificate_from_nv_verifies_to_the_root(certified_server, tmp_path) -> None:
    address, policy = certified_server
    with Client(address, policy, audit_log=tmp_path / "a.jsonl") as client:
        attestation = client.attest()
        report = {r.name: r.detail for r in client.last_report}
    assert "certified by a chain to root CN=Test vTPM Root" in report["ak_trust"]
    assert attestation.ak_fingerprint


@pytest.mark.attack
def test_ak_certificate_from_an_untrusted_root_is_refused(certified_server, tmp_path) -> None:
    address, policy = certified_server
    other = b.ak_certificate_chain(ec.generate_private_key(ec.SECP256R1()))
    with (
        Client(
            address, replace(policy, certificate_roots=(other.root,)), audit_log=NO_AUDIT
        ) as client,
        pytest.raises(AkUntrustedError),
    ):
        client.attest()


@pytest.mark.attack
def test_server_refuses_to_start_with_a_certificate_for_another_key(tmp_path, model_dir) -> None:
    _, inter = _provision(tmp_path / "swtpm", certify_other_key=True)
    swtpm, server = _serve(tmp_path, model_dir, inter)
    try:
        with pytest.raises(RuntimeError, match="server exited"):
            server.start(timeout=120)
        assert "AK certificate in NV is for another key" in server.log_text()
    finally:
        server.kill()
        swtpm.stop()
