"""AK trust comes from a pin or a certificate chain, never from a guest-chosen hardware report;
production policies are complete or refused; trust roots travel with the policy, never in a
process registry. One test per attack, each expecting its typed error.

The evidence is built by tests/tpm_builders and signed by the test "AMD" hierarchy and the
test GCE CA of tests/cloud_fixtures (byte layouts as the clouds write them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import cloud_fixtures as cf
import pytest
import tpm_builders as b
from cryptography.hazmat.primitives.asymmetric import ec

from encloud.protocol.errors import (
    AkUntrustedError,
    PolicyError,
    PolicyIncompleteError,
    VmplError,
)
from encloud.protocol.hardware.binding import session_report_data
from encloud.protocol.policy import Policy, build_policy, parse_policy
from encloud.protocol.verifier import verify, verify_with_report

pytestmark = [pytest.mark.cloud]

GCE_PIN = {"project_id": cf.GCE_IDENTITY["project_id"]}


@pytest.fixture
def sc() -> b.Scenario:
    return b.make_scenario(selection=b.PRODUCTION_SELECTION)


def _verify(evidence: Any, policy: Policy) -> Any:
    return verify(evidence, policy, expected_qualifying_data=b.NONCE_Q, session_ttl_seconds=60)


def _snp_evidence(sc: b.Scenario, **overrides: Any) -> Any:
    """A genuine (test-AMD-signed) SEV-SNP report whose REPORT_DATA binds this session and
    this AK, as any SNP guest can ask its own kernel for."""
    key = cf.vcek_key()
    report = cf.snp_report(key, report_data=session_report_data(b.NONCE_Q, sc.ak_public))
    chain = cf.vcek_chain(cf.hierarchy(), cf.hierarchy().vcek(key))
    fields = {
        "hardware_kind": "sev-snp",
        "hardware_report": report,
        "hardware_certificate_chain": chain,
    }
    fields.update(overrides)
    return sc.evidence(**fields)


def _azure_evidence(sc: b.Scenario, **report_kwargs: Any) -> Any:
    report, chain = cf.azure_hcl(sc.key.public_key(), **report_kwargs)
    return sc.evidence(
        hardware_kind="azure-hcl", hardware_report=report, hardware_certificate_chain=chain
    )


def _gcp_policy(sc: b.Scenario, **kwargs: Any) -> Policy:
    kwargs.setdefault("roots", (cf.gce_root_der(),))
    kwargs.setdefault("gce", GCE_PIN)
    return cf.production_policy(sc.policy, sc.pcr_values, "sev-snp", **kwargs)


def _azure_policy(sc: b.Scenario, **kwargs: Any) -> Policy:
    return cf.production_policy(sc.policy, sc.pcr_values, "azure-sev-snp", **kwargs)


# --- complete production policies still verify genuine evidence ---------------------------


def test_complete_production_gcp_policy_verifies_genuine_evidence(sc) -> None:
    evidence = _snp_evidence(sc, ak_certificate_chain=cf.gce_ak_chain(sc.key.public_key()))
    attestation, report, error = verify_with_report(
        evidence, _gcp_policy(sc), expected_qualifying_data=b.NONCE_Q, session_ttl_seconds=60
    )
    assert error is None, error
    details = {r.name: r.detail for r in report}
    assert "EK/AK CA Root" in details["ak_trust"]
    assert "project encloud-prod" in details["ak_trust"]
    assert "some GCP confidential guest holds this session key" in details["report_data"]
    assert attestation is not None
    assert "hardware binding of the workload" not in attestation.trust_note


def test_complete_production_azure_policy_verifies_genuine_evidence(sc) -> None:
    attestation, report, error = verify_with_report(
        _azure_evidence(sc),
        _azure_policy(sc),
        expected_qualifying_data=b.NONCE_Q,
        session_ttl_seconds=60,
    )
    assert error is None, error
    assert "Azure HCL report" in {r.name: r.detail for r in report}["ak_trust"]
    assert attestation is not None and attestation.hardware_binding.startswith("Azure")


def test_waived_pcrs_are_printed_in_every_report(sc) -> None:
    policy = _azure_policy(sc, waivers={5: "GPT changes with the disk size"})
    _, report, error = verify_with_report(
        _azure_evidence(sc), policy, expected_qualifying_data=b.NONCE_Q, session_ttl_seconds=60
    )
    assert error is None, error
    assert (
        "PCR 5 waived: GPT changes with the disk size"
        in {r.name: r.detail for r in report}["pcr_value"]
    )


# --- attacks ----------------------------------------------------------------------------


@pytest.mark.attack
def test_attack_software_ak_with_a_genuine_snp_report_and_no_chain(sc) -> None:
    # The review's scenario: the attacker's own SNP VM binds a software key (given TPM AK
    # attributes, signing a quote over the policy's PCRs and model) in a genuine report,
    # and sends no AK certificate chain. The report's REPORT_DATA was chosen by the guest.
    evidence = _snp_evidence(sc)
    assert evidence.ak_certificate_chain == ()
    with pytest.raises(AkUntrustedError):
        _verify(evidence, _gcp_policy(sc))


@pytest.mark.attack
def test_attack_gcp_ak_chain_from_another_project(sc) -> None:
    chain = cf.gce_ak_chain(sc.key.public_key(), project_id="attacker-project", project_number=7)
    with pytest.raises(AkUntrustedError, match="project"):
        _verify(_snp_evidence(sc, ak_certificate_chain=chain), _gcp_policy(sc))


@pytest.mark.attack
def test_attack_gcp_ak_chain_marked_non_production(sc) -> None:
    chain = cf.gce_ak_chain(sc.key.public_key(), is_production=False)
    with pytest.raises(AkUntrustedError, match="production"):
        _verify(_snp_evidence(sc, ak_certificate_chain=chain), _gcp_policy(sc))


@pytest.mark.attack
def test_attack_google_ca_without_a_project_pin(sc) -> None:
    with pytest.raises(PolicyIncompleteError, match=r"ak\.gce"):
        _gcp_policy(sc, gce=None)


@pytest.mark.attack
def test_attack_azure_report_from_vmpl_1_under_a_policy_that_omits_vmpl(sc) -> None:
    # Below VMPL 0 the guest, not the paravisor, chose REPORT_DATA: the AK binding is void.
    platform = {k: v for k, v in cf.platform_policy().items() if k != "vmpl"}
    dev = build_policy(
        pcr_selection=sc.policy.pcr_selection,
        pcr_values=dict(sc.policy.pcr_values),
        workload_pcr=sc.policy.workload_pcr,
        allowed_model_digests=sc.policy.allowed_model_digests,
        allowed_runtime_events=sc.policy.allowed_runtime_events,
        pinned_public_keys=(),
        max_session_ttl_seconds=3600,
        platform=platform,
    )
    assert dev.platform is not None and dev.platform.vmpl is None
    with pytest.raises(VmplError):
        _verify(_azure_evidence(sc, vmpl=1), dev)


@pytest.mark.attack
def test_attack_production_policy_without_boot_pcr_pins(sc) -> None:
    complete = _azure_policy(sc)
    unpinned = {k: v for k, v in complete.pcr_values.items() if k not in (0, 2, 4, 7, 8, 9)}
    with pytest.raises(PolicyIncompleteError, match="PCR 4"):
        parse_policy(
            dataclasses.replace(complete, pcr_values=unpinned).to_json(),
            unsafe_test_roots=complete.unsafe_test_roots,
        )
    # A Policy object built around the parser is refused by the verifier itself, before it
    # reads any evidence.
    broken = dataclasses.replace(complete, pcr_values=unpinned)
    _, report, error = verify_with_report(
        _azure_evidence(sc), broken, expected_qualifying_data=b.NONCE_Q, session_ttl_seconds=60
    )
    assert isinstance(error, PolicyIncompleteError)
    assert [r.name for r in report] == ["policy"]


@pytest.mark.attack
def test_attack_waiver_of_pcr_4(sc) -> None:
    with pytest.raises(PolicyError, match="PCR 4"):
        _azure_policy(sc, waivers={4: "the boot loader changes often"})


@pytest.mark.attack
def test_attack_test_root_named_by_a_production_policy_after_another_test_accepted_it(
    sc,
) -> None:
    # Another test in this process accepted the test AMD root for its own policy ...
    accepted = _azure_policy(sc)
    _verify(_azure_evidence(sc), accepted)
    # ... which must not make a policy file naming that root acceptable here.
    with pytest.raises(PolicyIncompleteError, match="amd_roots"):
        parse_policy(accepted.to_json())
    # Nor does the verifier accept a policy object stripped of its own test roots.
    stripped = dataclasses.replace(accepted, unsafe_test_roots=())
    with pytest.raises(PolicyIncompleteError, match="amd_roots"):
        _verify(_azure_evidence(sc), stripped)


@pytest.mark.attack
def test_attack_snp_report_for_an_unpinned_ak_under_a_dev_sev_snp_policy(sc) -> None:
    # Even a dev policy gives no AK trust to a configfs-tsm report: the AK must be pinned.
    other = ec.generate_private_key(ec.SECP256R1())
    policy = build_policy(
        pcr_selection=sc.policy.pcr_selection,
        pcr_values=dict(sc.policy.pcr_values),
        workload_pcr=sc.policy.workload_pcr,
        allowed_model_digests=sc.policy.allowed_model_digests,
        allowed_runtime_events=sc.policy.allowed_runtime_events,
        pinned_public_keys=[b.spki(other)],
        max_session_ttl_seconds=3600,
        platform=cf.platform_policy("sev-snp"),
    )
    with pytest.raises(AkUntrustedError):
        _verify(_snp_evidence(sc), policy)


@pytest.mark.attack
def test_attack_azure_shaped_report_without_a_pinned_paravisor_measurement(sc) -> None:
    # Any SNP guest without a paravisor runs its own kernel at VMPL 0 and can write an
    # HCL-shaped report whose claims carry its software AK. Only the pinned paravisor
    # measurement makes VMPL 0 mean "the paravisor wrote this".
    platform = {**cf.platform_policy(), "measurements": []}
    with pytest.raises(PolicyIncompleteError, match="paravisor's launch measurement"):
        build_policy(
            pcr_selection=sc.policy.pcr_selection,
            pcr_values=dict(sc.policy.pcr_values),
            workload_pcr=sc.policy.workload_pcr,
            allowed_model_digests=sc.policy.allowed_model_digests,
            allowed_runtime_events=sc.policy.allowed_runtime_events,
            pinned_public_keys=(),
            max_session_ttl_seconds=3600,
            platform=platform,
        )
    pinned = _azure_policy(sc)
    assert pinned.platform is not None
    unpinned = dataclasses.replace(
        pinned, platform=dataclasses.replace(pinned.platform, measurements=(), production=False)
    )
    evidence = _azure_evidence(sc, measurement=bytes([0x42]) * 48)
    with pytest.raises(PolicyIncompleteError):
        _verify(evidence, unpinned)


@pytest.mark.attack
def test_attack_policy_object_edited_around_the_parser(sc) -> None:
    # dataclasses.replace skips the parser: the verifier validates the object itself.
    policy = _azure_policy(sc)
    assert policy.platform is not None
    debug = dataclasses.replace(
        policy, platform=dataclasses.replace(policy.platform, allow_debug=True)
    )
    evidence = _azure_evidence(sc, policy=cf.GUEST_POLICY | cf.DEBUG_BIT)
    _, report, error = verify_with_report(
        evidence, debug, expected_qualifying_data=b.NONCE_Q, session_ttl_seconds=60
    )
    assert isinstance(error, PolicyIncompleteError) and "debug" in str(error)
    assert [r.name for r in report] == ["policy"]
    broken = dataclasses.replace(policy, pcr_bank="sha512")
    with pytest.raises(PolicyIncompleteError, match="does not validate"):
        _verify(evidence, broken)
