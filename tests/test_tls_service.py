"""TLS and mutual TLS on loopback, with certificates made in the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pki import issue_certificate

from encloud.client import NO_AUDIT, Client
from encloud.protocol.errors import ServiceError
from encloud.protocol.policy import load_policy
from encloud.server.devstack import ServerProcess, start_swtpm

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    ca = issue_certificate("encloud test CA", None, ca=True)
    server = issue_certificate("127.0.0.1", ca, server=True)
    client = issue_certificate("caller", ca)
    rogue = issue_certificate("rogue", issue_certificate("rogue CA", None, ca=True))
    return {
        "ca": ca[0],
        "server": server[0],
        "server_key": server[1],
        "client": client[0],
        "client_key": client[1],
        "rogue": rogue[0],
        "rogue_key": rogue[1],
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
