"""The Azure and GCP paths end to end: a real server on swtpm provisioned in each cloud's
NV layout, a client verifying the hardware binding under a production policy.

- Azure: the AK made persistent at 0x81000003 (EvictControl), the HCL report (SEV-SNP
  report signed by the test VCEK + runtime claims carrying the AK) in NV 0x01400001, the
  VCEK chain in a PEM file (as Azure's instance metadata serves it).
- GCP: the ECC AK template in NV 0x01c10003 (recreated with CreatePrimary under the
  endorsement hierarchy), its certificate in NV 0x01c10002, and a fake configfs-tsm folder
  whose SEV-SNP report binds each session.
"""

from __future__ import annotations

from pathlib import Path

import cloud_fixtures as cf
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from encloud.client import NO_AUDIT, Client
from encloud.protocol.errors import (
    AkUntrustedError,
    MeasurementNotAllowedError,
    ReportDataMismatchError,
)
from encloud.protocol.hardware.binding import session_report_data
from encloud.protocol.policy import Policy, load_policy
from encloud.protocol.tpm_structures import parse_public

pytestmark = [pytest.mark.cloud, pytest.mark.e2e, pytest.mark.tpm]


def _pem(ders) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in ders
    )


GCE_PIN = {"project_id": cf.GCE_IDENTITY["project_id"], "instance_id": "4242424242424242424"}


def _production(dev: Policy, kind: str = "azure-sev-snp", **kwargs) -> Policy:
    """A complete production policy: the dev policy's PCR values (swtpm's, as a measured image
    would publish them) pinned, the test AMD root accepted for this policy object only."""
    if kind == "sev-snp":
        kwargs.setdefault("roots", (cf.gce_root_der(),))
        kwargs.setdefault("gce", GCE_PIN)
    return cf.production_policy(dev, dict(dev.pcr_values), kind, **kwargs)


def _provision_azure(state: Path) -> None:
    from encloud.server.attestation.swtpm import Swtpm
    from encloud.server.attestation.tpm import Tpm

    sw = Swtpm(state).start()
    try:
        with Tpm.open(sw.tcti) as tpm:
            tpm.make_persistent_ak(cf.AZURE_AK_HANDLE)
            ak = parse_public(tpm.ak_public()).public_key()
            ek = ec.generate_private_key(ec.SECP256R1()).public_key()
            report, _ = cf.azure_hcl(ak, claims=cf.runtime_claims(ak, ek=ek))
            tpm.define_nv(cf.AZURE_HCL_REPORT_NV, len(report))
            tpm.write_nv(cf.AZURE_HCL_REPORT_NV, report)
    finally:
        sw.stop()


@pytest.fixture
def azure_server(tmp_path: Path, model_dir: Path):
    from encloud.server.devstack import ServerProcess, start_swtpm

    _provision_azure(tmp_path / "swtpm")
    h = cf.hierarchy()
    chain_file = tmp_path / "vcek-chain.pem"
    chain_file.write_bytes(_pem(cf.vcek_chain(h, h.vcek(cf.vcek_key()))))
    swtpm = start_swtpm(tmp_path / "swtpm")
    server = ServerProcess(
        tmp_path,
        swtpm.tcti,
        model_dir,
        extra_env={"ENCLOUD_HARDWARE_CERTIFICATE_CHAIN_FILE": str(chain_file)},
        platform="azure",
    )
    try:
        address = server.start()
        yield address, load_policy(server.policy_path)
    finally:
        server.kill()
        swtpm.stop()


def test_azure_end_to_end_under_a_production_policy(azure_server, tmp_path) -> None:
    address, dev = azure_server
    policy = _production(dev)
    with Client(address, policy, audit_log=tmp_path / "a.jsonl") as client:
        attestation = client.attest()
        report = {r.name: r.detail for r in client.last_report}
    assert attestation.hardware_binding == "Azure HCL report (SEV-SNP)"
    assert "bound by the Azure HCL report" in report["ak_trust"]
    assert "HCLAkPub" in report["runtime_claims"]


@pytest.mark.attack
def test_azure_measurement_below_the_policy_is_refused(azure_server) -> None:
    address, dev = azure_server
    policy = _production(dev, measurements=["ab" * 48])
    with (
        Client(address, policy, audit_log=NO_AUDIT) as client,
        pytest.raises(MeasurementNotAllowedError),
    ):
        client.attest()


# --- GCP: AK from the NV template, AK certificate, configfs-tsm SEV-SNP report ------------


def _provision_gcp(state: Path) -> bytes:
    """Template + AK certificate (with the GCE instance identity) in GCP's NV layout;
    returns the intermediate certificate (DER) the server sends after it."""
    from tpm2_pytss import TPM2B_PUBLIC

    from encloud.server.attestation.swtpm import Swtpm
    from encloud.server.attestation.tpm import AK_ATTRIBUTES, AK_TEMPLATE, GCP_AK_ECC, Tpm

    template = TPM2B_PUBLIC.parse(
        AK_TEMPLATE, objectAttributes=AK_ATTRIBUTES, nameAlg="sha256"
    ).publicArea.marshal()
    sw = Swtpm(state).start()
    try:
        with Tpm.open(sw.tcti) as tpm:
            tpm.define_nv(cf.GCP_AK_TEMPLATE_ECC_NV, len(template))
            tpm.write_nv(cf.GCP_AK_TEMPLATE_ECC_NV, template)
        with Tpm.open(sw.tcti, ak_source=GCP_AK_ECC) as tpm:
            ak = parse_public(tpm.ak_public()).public_key()
            leaf, inter = cf.gce_ak_chain(ak)
            tpm.define_nv(cf.GCP_AK_CERT_ECC_NV, len(leaf) + 32)
            tpm.write_nv(cf.GCP_AK_CERT_ECC_NV, leaf + bytes(32))
    finally:
        sw.stop()
    return inter


@pytest.fixture
def gcp_server(tmp_path: Path, model_dir: Path):
    from encloud.server.devstack import ServerProcess, start_swtpm

    inter = _provision_gcp(tmp_path / "swtpm")
    h = cf.hierarchy()
    vcek_chain = tmp_path / "vcek-chain.pem"
    vcek_chain.write_bytes(_pem(cf.vcek_chain(h, h.vcek(cf.vcek_key()))))
    ak_chain = tmp_path / "ak-intermediates.pem"
    ak_chain.write_bytes(_pem([inter]))
    state = {"report_data": None}

    def make_report(inblob: bytes) -> bytes:
        data = state["report_data"] or inblob
        return cf.snp_report(cf.vcek_key(), report_data=data)

    tsm = cf.FakeTsm(tmp_path / "tsm", make_report).start()
    swtpm = start_swtpm(tmp_path / "swtpm")
    server = ServerProcess(
        tmp_path,
        swtpm.tcti,
        model_dir,
        extra_env={
            "ENCLOUD_HARDWARE_CERTIFICATE_CHAIN_FILE": str(vcek_chain),
            "ENCLOUD_TSM_REPORT_DIR": str(tmp_path / "tsm"),
        },
        platform="gcp",
        ak_certificate_chain_file=ak_chain,
    )
    try:
        address = server.start()
        yield address, load_policy(server.policy_path), tsm, state
    finally:
        server.kill()
        swtpm.stop()
        tsm.stop()


def test_gcp_end_to_end_with_a_session_bound_snp_report(gcp_server, tmp_path) -> None:
    address, dev, tsm, _ = gcp_server
    policy = _production(dev, "sev-snp")
    with Client(address, policy, audit_log=tmp_path / "a.jsonl") as client:
        attestation = client.attest()
        report = {r.name: r.detail for r in client.last_report}
    assert "EK/AK CA Root (encloud TEST)" in report["ak_trust"]
    assert "GCE project encloud-prod" in report["ak_trust"]
    assert "session key only" in attestation.hardware_binding
    assert "Google" in attestation.trust_note
    # One configfs-tsm request for the one session; the verifier checked its REPORT_DATA.
    assert len(tsm.served) == 1 and len(tsm.served[0]) == 64
    assert "REPORT_DATA = SHA-512" in report["report_data"]


@pytest.mark.attack
def test_gcp_report_data_for_another_session_is_refused(gcp_server) -> None:
    address, dev, _, state = gcp_server
    state["report_data"] = session_report_data(b"\x01" * 32, b"another AK")
    policy = _production(dev, "sev-snp")
    with (
        Client(address, policy, audit_log=NO_AUDIT) as client,
        pytest.raises(ReportDataMismatchError),
    ):
        client.attest()


@pytest.mark.attack
def test_gcp_ak_certified_for_another_project_is_refused(gcp_server) -> None:
    # A genuine GCE AK certificate, but for a VM of a project this policy does not accept.
    address, dev, _, _ = gcp_server
    policy = _production(dev, "sev-snp", gce={"project_id": "someone-elses-project"})
    with (
        Client(address, policy, audit_log=NO_AUDIT) as client,
        pytest.raises(AkUntrustedError, match="project_id"),
    ):
        client.attest()
