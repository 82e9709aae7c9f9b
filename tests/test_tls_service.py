"""TLS and mutual TLS on loopback, with certificates made in the test."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from encloud.client import NO_AUDIT, Client
from encloud.protocol.errors import ServiceError
from encloud.protocol.policy import load_policy
from encloud.server.devstack import ServerProcess, start_swtpm

pytestmark = pytest.mark.e2e


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    subject: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer if issuer else (_name(subject), key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    ca, ca_key = _issue("encloud test CA", None, ca=True)
    server, server_key = _issue(
        "127.0.0.1", (ca.subject, ca_key), usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    client, client_key = _issue(
        "caller", (ca.subject, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    rogue_ca, rogue_key = _issue("rogue CA", None, ca=True)
    rogue, rogue_client_key = _issue(
        "rogue", (rogue_ca.subject, rogue_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return {
        "ca": _pem(ca),
        "server": _pem(server),
        "server_key": _key_pem(server_key),
        "client": _pem(client),
        "client_key": _key_pem(client_key),
        "rogue": _pem(rogue),
        "rogue_key": _key_pem(rogue_client_key),
    }


@pytest.fixture(scope="module")
def mtls_server(
    model_dir: Path, pki: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("tls")
    for name in ("ca", "server", "server_key"):
        (root / f"{name}.pem").write_bytes(pki[name])
    (root / "server_key.pem").chmod(0o600)
    swtpm = start_swtpm(root / "swtpm")
    server = ServerProcess(
        root,
        swtpm.tcti,
        model_dir,
        tls_cert_file=root / "server.pem",
        tls_key_file=root / "server_key.pem",
        tls_client_ca_file=root / "ca.pem",
    )
    try:
        server.start()
        yield server
    finally:
        server.kill()
        swtpm.stop()


def test_mutual_tls_admits_only_callers_with_a_certificate(
    mtls_server: ServerProcess, pki: dict[str, bytes]
) -> None:
    policy = load_policy(mtls_server.policy_path)
    address = mtls_server.address
    good = grpc.ssl_channel_credentials(pki["ca"], pki["client_key"], pki["client"])
    with Client(address, policy, credentials=good, audit_log=NO_AUDIT) as client:
        client.attest()
        client.release_key()
        assert client.infer([("user", "Say hi.")], max_new_tokens=4).text

    refused_credentials = [
        grpc.ssl_channel_credentials(pki["ca"]),  # no client certificate
        grpc.ssl_channel_credentials(pki["ca"], pki["rogue_key"], pki["rogue"]),
    ]
    for credentials in refused_credentials:
        with Client(address, policy, credentials=credentials, timeout=10, audit_log=NO_AUDIT) as c:
            with pytest.raises(ServiceError) as refused:
                c.attest()
            assert refused.value.code == "UNAVAILABLE"
    with Client(address, policy, timeout=10, audit_log=NO_AUDIT) as plain:
        with pytest.raises(ServiceError) as refused:
            plain.attest()
        assert refused.value.code == "UNAVAILABLE"


def test_the_cli_reaches_a_mutual_tls_server_with_ca_cert_and_key(
    mtls_server: ServerProcess, pki: dict[str, bytes], tmp_path: Path, capsys, monkeypatch
) -> None:
    """attest, chat, policy init and loadgen dial TLS with --ca/--cert/--key."""
    from encloud.cli.main import main

    monkeypatch.chdir(tmp_path)
    for name in ("ca", "client", "client_key"):
        (tmp_path / f"{name}.pem").write_bytes(pki[name])
    tls = ["--ca", "ca.pem", "--cert", "client.pem", "--key", "client_key.pem"]
    target = ["--target", mtls_server.address]
    policy = ["--policy", str(mtls_server.policy_path)]
    assert main(["attest", *target, *policy, *tls]) == 0
    assert "Attestation verified" in capsys.readouterr().out
    assert main(["chat", "Say hi.", "--max-new-tokens", "4", *target, *policy, *tls]) == 0
    assert "transcript verified" in capsys.readouterr().out
    assert main(["policy", "init", *target, "-o", "init.json", *tls]) == 0
    args = ["loadgen", *target, *policy, *tls, "--clients", "1", "--requests", "1", "--no-audit"]
    assert main(args) == 0
    capsys.readouterr()
    # Without the client certificate the server refuses the connection: one line, exit 1.
    assert main(["attest", *target, *policy, "--ca", "ca.pem"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "UNAVAILABLE" in err[0], err
