"""Hardware-report binding in the verifier: SEV-SNP reports, VCEK chains, Azure HCL reports,
session-bound configfs-tsm reports, production vs dev policies. One test per attack.

Everything is signed by the test "AMD" hierarchy of tests/cloud_fixtures; the quotes are
built by tests/tpm_builders (no swtpm needed here, so these run in well under a second
each once the RSA-4096 test roots exist).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import cloud_fixtures as cf
import pytest
import tpm_builders as b
from cryptography.hazmat.primitives.asymmetric import ec

from encloud.protocol.errors import (
    AkUntrustedError,
    DebugEnabledError,
    HardwareBindingRequiredError,
    HardwareChainError,
    HardwareReportFormatError,
    HardwareSignatureError,
    MeasurementNotAllowedError,
    PlainSevRefusedError,
    PlatformMismatchError,
    PolicyError,
    ReportDataMismatchError,
    RuntimeClaimsError,
    TcbTooLowError,
    VmplError,
)
from encloud.protocol.hardware import azure_hcl, sev_snp
from encloud.protocol.hardware.binding import session_report_data
from encloud.protocol.policy import Policy, build_policy, parse_policy
from encloud.protocol.verifier import verify, verify_with_report

pytestmark = [pytest.mark.cloud]


def _policy(sc: b.Scenario, platform: dict | None, *, pin: bool = False) -> Policy:
    p = sc.policy
    return build_policy(
        pcr_selection=p.pcr_selection,
        pcr_values=dict(p.pcr_values),
        workload_pcr=p.workload_pcr,
        allowed_model_digests=p.allowed_model_digests,
        allowed_runtime_events=p.allowed_runtime_events,
        pinned_public_keys=p.pinned_public_keys if pin else (),
        max_session_ttl_seconds=p.max_session_ttl_seconds,
        platform=platform,
    )


def _verify(sc: b.Scenario, evidence, policy: Policy):
    return verify(evidence, policy, expected_qualifying_data=b.NONCE_Q, session_ttl_seconds=60)


@pytest.fixture
def sc() -> b.Scenario:
    return b.make_scenario()


def azure_evidence(sc: b.Scenario, **kwargs):
    report, chain = cf.azure_hcl(sc.key.public_key(), **kwargs)
    return sc.evidence(
        hardware_kind="azure-hcl", hardware_report=report, hardware_certificate_chain=chain
    )


def snp_evidence(sc: b.Scenario, *, report_data: bytes | None = None, **kwargs):
    ak_public = sc.ak_public
    data = report_data if report_data is not None else session_report_data(b.NONCE_Q, ak_public)
    key = cf.vcek_key()
    report = cf.snp_report(key, report_data=data, **kwargs)
    chain = cf.vcek_chain(cf.hierarchy(), cf.hierarchy().vcek(key, kwargs.get("tcb")))
    return sc.evidence(
        hardware_kind="sev-snp", hardware_report=report, hardware_certificate_chain=chain
    )


# --- the layout -----------------------------------------------------------------------------


def test_snp_report_fields_sit_at_the_abi_offsets() -> None:
    data = hashlib.sha512(b"d").digest()
    raw = cf.snp_report(cf.vcek_key(), report_data=data, vmpl=2)
    report = sev_snp.parse_report(raw)
    assert len(raw) == 0x4A0 == sev_snp.REPORT_SIZE
    assert report.report_data == data == raw[0x50:0x90]
    assert report.measurement == cf.MEASUREMENT == raw[0x90:0xC0]
    assert report.vmpl == 2 and report.policy == cf.GUEST_POLICY and not report.debug
    assert report.chip_id == cf.CHIP_ID
    assert report.reported_tcb == sev_snp.TcbVersion(**cf.TCB)
    assert report.reported_tcb.to_u64() == struct.unpack_from("<Q", raw, 0x180)[0]
    assert report.signature_r == int.from_bytes(raw[0x2A0:0x2E8], "little")
    assert not any(raw[0x2A0 + 144 :])


def test_hcl_report_layout() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    report, _ = cf.azure_hcl(key.public_key())
    hcl = azure_hcl.parse_hcl_report(report + bytes(100))  # NV padding is ignored
    assert report[:4] == b"HCLA"
    assert hcl.hardware_report == report[0x20 : 0x20 + 0x4A0]
    assert hcl.runtime_claims == report[0x4D4:]
    assert sev_snp.parse_report(hcl.hardware_report).report_data[:32] == hcl.claims_digest()


@pytest.mark.parametrize(
    "offset,value",
    [(0x00, b"\x01\0\0\0"), (0x34, b"\x02\0\0\0"), (0x4C, b"\x01"), (0x1F8, b"\x01")],
)
def test_snp_report_parser_is_strict(offset: int, value: bytes) -> None:
    raw = bytearray(cf.snp_report(cf.vcek_key()))
    raw[offset : offset + len(value)] = value
    with pytest.raises(HardwareReportFormatError):
        sev_snp.parse_report(bytes(raw))
    with pytest.raises(HardwareReportFormatError):
        sev_snp.parse_report(bytes(raw[:-1]))


# --- the paths that pass -----------------------------------------------------------------


def test_azure_hcl_report_binds_the_ak(sc) -> None:
    policy = _policy(sc, cf.platform_policy())
    evidence = azure_evidence(sc)
    attestation, report, error = verify_with_report(
        evidence, policy, expected_qualifying_data=b.NONCE_Q, session_ttl_seconds=60
    )
    assert error is None, error
    names = [r.name for r in report]
    assert names.index("hardware_signature") < names.index("ak_trust")
    assert "bound by the Azure HCL report" in {r.name: r.detail for r in report}["ak_trust"]
    assert attestation is not None and attestation.hardware_binding.startswith("Azure")


def test_session_bound_snp_report_passes_and_names_the_vtpm_operator(sc) -> None:
    # The report binds the session key only; the AK is trusted by its pin.
    policy = _policy(sc, cf.platform_policy("sev-snp"), pin=True)
    attestation = _verify(sc, snp_evidence(sc), policy)
    assert "Google" in attestation.trust_note
    assert "host" in attestation.trust_note
    assert "session key only" in attestation.hardware_binding


def test_the_ark_may_be_left_out_of_the_shipped_chain(sc) -> None:
    evidence = azure_evidence(sc)
    evidence = dataclasses.replace(
        evidence, hardware_certificate_chain=evidence.hardware_certificate_chain[:2]
    )
    _verify(sc, evidence, _policy(sc, cf.platform_policy()))


def test_dev_platform_policy_accepts_vtpm_only_evidence(sc) -> None:
    _verify(sc, sc.evidence(), _policy(sc, cf.platform_policy("sev-snp"), pin=True))


def test_policy_round_trips_with_a_platform(sc) -> None:
    policy = _policy(sc, cf.platform_policy())
    assert parse_policy(policy.to_json()) == policy


# --- attacks -------------------------------------------------------------------------------


@pytest.mark.attack
def test_attack_ak_not_in_runtime_claims(sc) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    report, chain = cf.azure_hcl(other)  # a genuine report, for another AK
    evidence = sc.evidence(
        hardware_kind="azure-hcl", hardware_report=report, hardware_certificate_chain=chain
    )
    with pytest.raises(RuntimeClaimsError, match="not the quoting AK"):
        _verify(sc, evidence, _policy(sc, cf.platform_policy()))


@pytest.mark.attack
def test_attack_report_signed_by_an_unknown_vcek(sc) -> None:
    h = cf.hierarchy()
    rogue = ec.generate_private_key(ec.SECP384R1())
    claims = cf.runtime_claims(sc.key.public_key())
    report = cf.snp_report(rogue, report_data=hashlib.sha256(claims).digest())
    chain = cf.vcek_chain(h, h.vcek(cf.vcek_key()))  # the genuine VCEK's chain
    evidence = sc.evidence(
        hardware_kind="azure-hcl",
        hardware_report=cf.hcl_report(report, claims),
        hardware_certificate_chain=chain,
    )
    with pytest.raises(HardwareSignatureError):
        _verify(sc, evidence, _policy(sc, cf.platform_policy()))


@pytest.mark.attack
def test_attack_report_tampered_after_signing(sc) -> None:
    evidence = azure_evidence(sc)
    raw = bytearray(evidence.hardware_report)
    raw[0x20 + 0x90] ^= 1  # one bit of the measurement
    with pytest.raises(HardwareSignatureError):
        _verify(
            sc,
            dataclasses.replace(evidence, hardware_report=bytes(raw)),
            _policy(sc, cf.platform_policy(measurements=[bytes(raw[0xB0:0xE0]).hex()])),
        )


@pytest.mark.attack
def test_attack_broken_vcek_chain_vcek_not_signed_by_the_ask(sc) -> None:
    h = cf.hierarchy()
    other = cf.hierarchy("Other")
    key = cf.vcek_key()
    claims = cf.runtime_claims(sc.key.public_key())
    report = cf.snp_report(key, report_data=hashlib.sha256(claims).digest())
    forged_vcek = h.vcek(key, signer=other.ask_key)  # names the ASK, signed by another key
    evidence = sc.evidence(
        hardware_kind="azure-hcl",
        hardware_report=cf.hcl_report(report, claims),
        hardware_certificate_chain=cf.vcek_chain(h, forged_vcek),
    )
    with pytest.raises(HardwareChainError, match="VCEK"):
        _verify(sc, evidence, _policy(sc, cf.platform_policy()))


@pytest.mark.attack
def test_attack_vcek_chain_to_another_root(sc) -> None:
    evidence = azure_evidence(sc, h=cf.hierarchy("Other"))
    with pytest.raises(HardwareChainError):
        _verify(sc, evidence, _policy(sc, cf.platform_policy()))


@pytest.mark.attack
def test_attack_vcek_for_another_tcb(sc) -> None:
    h = cf.hierarchy()
    key = cf.vcek_key()
    claims = cf.runtime_claims(sc.key.public_key())
    report = cf.snp_report(key, report_data=hashlib.sha256(claims).digest())
    vcek = h.vcek(key, tcb={**cf.TCB, "snp": cf.TCB["snp"] + 1})
    evidence = sc.evidence(
        hardware_kind="azure-hcl",
        hardware_report=cf.hcl_report(report, claims),
        hardware_certificate_chain=cf.vcek_chain(h, vcek),
    )
    with pytest.raises(HardwareSignatureError, match="REPORTED_TCB"):
        _verify(sc, evidence, _policy(sc, cf.platform_policy()))


@pytest.mark.attack
def test_attack_report_data_not_matching_the_runtime_claims(sc) -> None:
    evidence = azure_evidence(sc, report_data=hashlib.sha256(b"other claims").digest())
    with pytest.raises(ReportDataMismatchError):
        _verify(sc, evidence, _policy(sc, cf.platform_policy()))


@pytest.mark.attack
def test_attack_report_data_not_matching_the_session(sc) -> None:
    stale = session_report_data(hashlib.sha256(b"another session").digest(), sc.ak_public)
    with pytest.raises(ReportDataMismatchError):
        _verify(
            sc,
            snp_evidence(sc, report_data=stale),
            _policy(sc, cf.platform_policy("sev-snp"), pin=True),
        )


@pytest.mark.attack
def test_attack_session_report_for_another_ak(sc) -> None:
    other = b.ecc_public(ec.generate_private_key(ec.SECP256R1()))
    data = session_report_data(b.NONCE_Q, other)
    with pytest.raises(ReportDataMismatchError):
        _verify(
            sc,
            snp_evidence(sc, report_data=data),
            _policy(sc, cf.platform_policy("sev-snp"), pin=True),
        )


@pytest.mark.attack
def test_attack_debug_bit_set(sc) -> None:
    evidence = azure_evidence(sc, policy=cf.GUEST_POLICY | cf.DEBUG_BIT)
    with pytest.raises(DebugEnabledError):
        _verify(sc, evidence, _policy(sc, cf.platform_policy()))


@pytest.mark.attack
def test_attack_measurement_not_allowed(sc) -> None:
    evidence = azure_evidence(sc, measurement=bytes(48))
    with pytest.raises(MeasurementNotAllowedError):
        _verify(sc, evidence, _policy(sc, cf.platform_policy()))


@pytest.mark.attack
@pytest.mark.parametrize("component", ["bootloader", "tee", "snp", "microcode"])
def test_attack_tcb_below_the_policy(sc, component: str) -> None:
    minimum = {**cf.TCB, component: cf.TCB[component] + 1}
    with pytest.raises(TcbTooLowError, match=component):
        _verify(sc, azure_evidence(sc), _policy(sc, cf.platform_policy(min_tcb=minimum)))


@pytest.mark.attack
def test_attack_wrong_vmpl(sc) -> None:
    with pytest.raises(VmplError):
        _verify(sc, azure_evidence(sc, vmpl=1), _policy(sc, cf.platform_policy()))


@pytest.mark.attack
def test_attack_console_enabled_in_runtime_claims(sc) -> None:
    claims = cf.runtime_claims(sc.key.public_key(), **{"console-enabled": True})
    with pytest.raises(RuntimeClaimsError, match="console-enabled"):
        _verify(sc, azure_evidence(sc, claims=claims), _policy(sc, cf.platform_policy()))


@pytest.mark.attack
def test_attack_vtpm_only_evidence_under_a_production_policy() -> None:
    sc = b.make_scenario(selection=b.PRODUCTION_SELECTION)
    policy = cf.production_policy(
        sc.policy, sc.pcr_values, pinned_public_keys=sc.policy.pinned_public_keys
    )
    with pytest.raises(HardwareBindingRequiredError):
        _verify(sc, sc.evidence(), policy)
    _verify(sc, azure_evidence(sc), policy)  # the same policy with the binding passes


@pytest.mark.attack
def test_attack_vtpm_only_evidence_without_hardware_is_not_ak_trust(sc) -> None:
    # A dev platform policy that pins no AK: vTPM-only evidence has nothing to trust the AK by.
    with pytest.raises(AkUntrustedError):
        _verify(sc, sc.evidence(), _policy(sc, cf.platform_policy()))


@pytest.mark.attack
def test_attack_plain_sev_without_snp_is_refused(sc) -> None:
    evidence = sc.evidence(hardware_kind="sev", hardware_report=b"\0" * 32)
    with pytest.raises(PlainSevRefusedError):
        _verify(sc, evidence, _policy(sc, cf.platform_policy()))
    with pytest.raises(PolicyError, match="plain SEV"):
        _policy(sc, cf.platform_policy("sev"))


@pytest.mark.attack
def test_attack_report_of_another_platform(sc) -> None:
    with pytest.raises(PlatformMismatchError):
        _verify(sc, snp_evidence(sc), _policy(sc, cf.platform_policy()))


def test_production_policy_refuses_a_test_root_by_default() -> None:
    sc = b.make_scenario(selection=b.PRODUCTION_SELECTION)
    with pytest.raises(PolicyError, match="not an AMD ARK"):
        cf.production_policy(sc.policy, sc.pcr_values, test_roots=())


def test_production_policy_refuses_debug_and_tdx(sc) -> None:
    with pytest.raises(PolicyError, match="debug"):
        _policy(sc, cf.platform_policy(production=True, allow_debug=True))
    with pytest.raises(PolicyError, match="TDX"):
        _policy(sc, cf.platform_policy("tdx", production=True))
