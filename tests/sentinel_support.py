"""What Sentinel's tests and its benchmark share: a test PKI and an attested workload on a
real swtpm (its vTPM measured a model and a runtime, and wrote the dev policy that pins it)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from encloud.protocol.eventlog import EVENT_RUNTIME, ROLE_CHAT, WorkloadEvent, model_event
from encloud.protocol.evidence import Evidence
from encloud.server.attestation.startup import (
    AttestationConfig,
    AttestationRuntime,
    start_attestation,
)
from encloud.server.devstack import start_swtpm
from encloud.server.settings import Settings

MODEL = bytes.fromhex("11" * 32)
RUNTIME = b'{"engine":"sentinel-test"}'


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def issue_certificate(
    subject: str, issuer: tuple[x509.Name, Any] | None, *, ca: bool = False, server: bool = False
) -> tuple[bytes, bytes]:
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
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass
class Workload:
    runtime: AttestationRuntime
    policy: bytes

    def quote(self, qualifying_data: bytes) -> Evidence:
        return self.runtime.attester.evidence(qualifying_data)


def attested_workload(root: Path, model: bytes) -> Iterator[Workload]:
    swtpm = start_swtpm(root / "tpm")
    defaults = Settings()
    config = AttestationConfig(
        tcti=swtpm.tcti,
        tpm_timeout_seconds=10.0,
        platform="swtpm",
        state_dir=root / "state",
        workload_pcr=defaults.workload_pcr,
        pcr_selection=list(defaults.pcr_selection),
        dev_policy_path=root / "policy.json",
    )
    runtime = start_attestation(
        config, [model_event(ROLE_CHAT, model), WorkloadEvent(EVENT_RUNTIME, RUNTIME)]
    )
    try:
        yield Workload(runtime, (root / "policy.json").read_bytes())
    finally:
        runtime.close()
        swtpm.stop()
