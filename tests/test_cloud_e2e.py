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
import tpm_builders as b
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from encloud.client.errors import MeasurementNotAllowedError, ReportDataMismatchError
from encloud.client.hardware.binding import session_report_data
from encloud.client.hardware.roots import register_test_root
from encloud.client.policy import Policy, build_policy, load_policy
from encloud.client.session import EncloudClient
from encloud.client.tpm_structures import parse_public

pytestmark = [pytest.mark.cloud, pytest.mark.e2e, pytest.mark.tpm]


def _pem(ders) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in ders
    )


def _production(dev: Policy, platform: dict, *, roots: tuple[bytes, ...] = ()) -> Policy:
    register_test_root(cf.hierarchy().ark_der())
    return build_policy(
        pcr_selection=dev.pcr_selection,
        pcr_values=dict(dev.pcr_values),
        workload_pcr=dev.workload_pcr,
        allowed_model_digests=dev.allowed_model_digests,
        allowed_runtime_events=dev.allowed_runtime_events,
        pinned_public_keys=(),
        certificate_roots=roots,
        max_session_ttl_seconds=dev.max_session_ttl_seconds,
        platform=platform,
    )


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
    policy = _production(dev, cf.platform_policy(production=True))
    with EncloudClient(address, policy, audit_log=tmp_path / "a.jsonl") as client:
        attestation = client.attest()
        report = {r.name: r.detail for r in client.last_report}
    assert attestation.hardware_binding == "Azure HCL report (SEV-SNP)"
    assert "bound by the Azure HCL report" in report["ak_trust"]
    assert "HCLAkPub" in report["runtime_claims"]


@pytest.mark.attack
def test_azure_measurement_below_the_policy_is_refused(azure_server) -> None:
    address, dev = azure_server
    platform = cf.platform_policy(production=True, measurements=["ab" * 48])
    with (
        EncloudClient(address, _production(dev, platform), audit_log=None) as client,
        pytest.raises(MeasurementNotAllowedError),
    ):
        client.attest()


# --- GCP: AK from the NV template, AK certificate, configfs-tsm SEV-SNP report ------------


def _provision_gcp(state: Path) -> tuple[bytes, bytes]:
    """Template + AK certificate in GCP's NV layout; returns (vTPM root DER, intermediate)."""
    from tpm2_pytss import TPM2B_PUBLIC

    from encloud.server.attestation.swtpm import Swtpm
    from encloud.server.attestation.tpm import AK_ATTRIBUTES, AK_TEMPLATE, GCP_AK_ECC, Tpm

    template = TPM2B_PUBLIC.parse(
        AK_TEMPLATE, objectAttributes=AK_ATTRIBUTES, nameAlg="sha256"
    ).publicArea.marshal()
    root_key = ec.generate_private_key(ec.SECP256R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    root = b.certificate("Test GCE Root", root_key.public_key(), "Test GCE Root", root_key, ca=True)
    inter = b.certificate(
        "Test GCE Intermediate", inter_key.public_key(), "Test GCE Root", root_key, ca=True
    )
    sw = Swtpm(state).start()
    try:
        with Tpm.open(sw.tcti) as tpm:
            tpm.define_nv(cf.GCP_AK_TEMPLATE_ECC_NV, len(template))
            tpm.write_nv(cf.GCP_AK_TEMPLATE_ECC_NV, template)
        with Tpm.open(sw.tcti, ak_source=GCP_AK_ECC) as tpm:
            ak = parse_public(tpm.ak_public()).public_key()
            leaf = b.certificate("Test GCE AK", ak, "Test GCE Intermediate", inter_key, ca=False)
            tpm.define_nv(cf.GCP_AK_CERT_ECC_NV, len(leaf) + 32)
            tpm.write_nv(cf.GCP_AK_CERT_ECC_NV, leaf + bytes(32))
    finally:
        sw.stop()
    return root, inter


@pytest.fixture
def gcp_server(tmp_path: Path, model_dir: Path):
    from encloud.server.devstack import ServerProcess, start_swtpm

    root, inter = _provision_gcp(tmp_path / "swtpm")
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
        yield address, load_policy(server.policy_path), root, tsm, state
    finally:
        server.kill()
        swtpm.stop()
        tsm.stop()


def test_gcp_end_to_end_with_a_session_bound_snp_report(gcp_server, tmp_path) -> None:
    address, dev, root, tsm, _ = gcp_server
    policy = _production(dev, cf.platform_policy("sev-snp", production=True), roots=(root,))
    with EncloudClient(address, policy, audit_log=tmp_path / "a.jsonl") as client:
        attestation = client.attest()
        report = {r.name: r.detail for r in client.last_report}
    assert "certified by a chain to root CN=Test GCE Root" in report["ak_trust"]
    assert "Google" in attestation.trust_note
    # One configfs-tsm request for the one session; the verifier checked its REPORT_DATA.
    assert len(tsm.served) == 1 and len(tsm.served[0]) == 64
    assert "REPORT_DATA = SHA-512" in report["report_data"]


@pytest.mark.attack
def test_gcp_report_data_for_another_session_is_refused(gcp_server) -> None:
    address, dev, root, _, state = gcp_server
    state["report_data"] = session_report_data(b"\x01" * 32, b"another AK")
    policy = _production(dev, cf.platform_policy("sev-snp", production=True), roots=(root,))
    with (
        EncloudClient(address, policy, audit_log=None) as client,
        pytest.raises(ReportDataMismatchError),
    ):
        client.attest()
