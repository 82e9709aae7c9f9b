"""Start-up of the attestation side (docs/ATTESTATION.md), as one call for app.py.

Opens the TPM, measures the workload events into the workload PCR with the
persisted event log, reads the AK certificate (if the platform keeps one in
NV) and returns the attester the service quotes through, plus the dev-only
policy writer.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from encloud.protocol.encoding import sha256
from encloud.protocol.eventlog import (
    EVENT_RUNTIME,
    ROLE_CHAT,
    ROLE_EMBEDDINGS,
    WorkloadEvent,
    logged_models,
)
from encloud.protocol.hardware.binding import KIND_AZURE_HCL
from encloud.server.attestation.attester import HardwareSource, Remeasure, TpmAttester
from encloud.server.attestation.measure import check_workload_pcr, measure_workload
from encloud.server.attestation.tpm import (
    AZURE_AK,
    GCP_AK_ECC,
    GENERATED_AK,
    AkSource,
    Tpm,
)
from encloud.server.attestation.tsm import DEFAULT_REPORT_DIR, TsmError, TsmReporter

log = logging.getLogger("encloud.attestation")

EVENT_LOG_NAME = "workload-eventlog.jsonl"


@dataclass(frozen=True)
class AttestationConfig:
    """What the attestation side needs, as plain values (app.py fills it from the settings,
    so this package never reads the server's configuration)."""

    tcti: str
    tpm_timeout_seconds: float
    platform: str
    state_dir: Path
    workload_pcr: int
    pcr_selection: list[int]
    allow_resettable_workload_pcr: bool = False
    ak_certificate_nv_index: int | None = None
    ak_certificate_chain_file: Path | None = None
    hardware_certificate_chain_file: Path | None = None
    tsm_report_dir: Path | None = None
    dev_policy_path: Path | None = None
    session_ttl_seconds: int = 900


class AkCertificateError(RuntimeError):
    """The AK certificate in NV (or the chain file) is unusable; the server must not start."""


AZURE_HCL_REPORT_NV = 0x01400001
GCP_AK_CERT_ECC_NV = 0x01C10002


class HardwareReportError(RuntimeError):
    """The platform's hardware report is unusable; the server must not start."""


def ak_source(settings: AttestationConfig) -> AkSource:
    """The AK per platform: Azure's persistent key, GCP's NV template, or our own."""
    if settings.platform == "azure":
        return AZURE_AK
    if settings.platform == "gcp":
        return GCP_AK_ECC
    return GENERATED_AK


def hardware_source(tpm: Tpm, settings: AttestationConfig) -> HardwareSource | None:
    """The hardware report for the platform, checked before the server starts serving."""
    chain_file = settings.hardware_certificate_chain_file
    chain: tuple[bytes, ...] = ()
    if chain_file is not None:
        try:
            certs = x509.load_pem_x509_certificates(chain_file.read_bytes())
        except (OSError, ValueError) as err:
            raise HardwareReportError("the hardware certificate chain file is not PEM") from err
        chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
    tsm_dir = settings.tsm_report_dir
    if settings.platform == "azure":
        from encloud.protocol.errors import VerificationError
        from encloud.protocol.hardware.azure_hcl import parse_hcl_report, parse_runtime_claims
        from encloud.protocol.verifier import spki_der

        raw = tpm.read_nv(AZURE_HCL_REPORT_NV)
        try:
            hcl = parse_hcl_report(raw)
            claims = parse_runtime_claims(hcl.runtime_claims)
        except VerificationError as err:
            raise HardwareReportError(f"the HCL report in NV is unusable: {err}") from err
        if claims.ak_spki != spki_der(tpm.ak_public()):
            raise HardwareReportError("the HCL report's runtime claims name another AK")
        log.info("Azure HCL report loaded", extra={"certificates": len(chain)})
        return HardwareSource(KIND_AZURE_HCL, chain, static_report=hcl.raw)
    if tsm_dir is not None or settings.platform == "gcp":
        try:
            reporter = TsmReporter(tsm_dir if tsm_dir is not None else DEFAULT_REPORT_DIR)
        except TsmError as err:
            if tsm_dir is not None:
                raise HardwareReportError(str(err)) from err
            log.warning("no configfs-tsm: evidence is vTPM only", extra={"error": str(err)})
            return None
        log.info("configfs-tsm reports", extra={"kind": reporter.kind})
        return HardwareSource(reporter.kind, chain, tsm=reporter)
    return None


class AttestationRuntime:
    """The TPM, its attester and what was measured; closed at shutdown."""

    def __init__(self, attester: TpmAttester, events: Sequence[WorkloadEvent]) -> None:
        self.attester = attester
        self.events = list(events)

    @property
    def tpm(self) -> Tpm:
        return self.attester.tpm

    def close(self) -> None:
        self.attester.close()


def start_attestation(
    settings: AttestationConfig, events: Sequence[WorkloadEvent]
) -> AttestationRuntime:
    """Blocking: call from a worker thread."""
    check_workload_pcr(settings.workload_pcr, settings.allow_resettable_workload_pcr)

    source = ak_source(settings)

    def reopen() -> Tpm:
        return Tpm.open(settings.tcti, timeout=settings.tpm_timeout_seconds, ak_source=source)

    tpm = reopen()
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        log_path = settings.state_dir / EVENT_LOG_NAME
        records = measure_workload(
            tpm,
            settings.workload_pcr,
            log_path,
            events,
            allow_resettable=settings.allow_resettable_workload_pcr,
        )
        chain = ak_certificate_chain(tpm, settings)
        hardware = hardware_source(tpm, settings)
    except BaseException:
        tpm.close()
        raise
    remeasure = Remeasure(
        settings.workload_pcr,
        log_path,
        events,
        allow_resettable=settings.allow_resettable_workload_pcr,
        reopen=reopen,
    )
    attester = TpmAttester(
        tpm,
        settings.pcr_selection,
        records,
        ak_certificate_chain=chain,
        remeasure=remeasure,
        hardware=hardware,
    )
    runtime = AttestationRuntime(attester, events)
    if settings.dev_policy_path is not None:
        write_dev_policy(settings.dev_policy_path, settings, runtime)
    return runtime


def write_dev_policy(path: Path, settings: AttestationConfig, runtime: AttestationRuntime) -> None:
    """DEV ONLY, trust on first use: pin what this server is right now."""
    from encloud.protocol.verifier import spki_der

    pinned = [p for p in settings.pcr_selection if p != settings.workload_pcr]
    values = runtime.tpm.read_pcrs(pinned) if pinned else {}
    # Every start-up since the TPM's last reset is in the log and the verifier checks each:
    # pin them all (a restart with other settings adds one; none is dropped).
    logged = [record.event for record in runtime.attester.records]
    models = logged_models(logged)
    runtimes = sorted({sha256(e.data).hex() for e in logged if e.event_type == EVENT_RUNTIME})
    policy = {
        "version": 1,
        "dev_only": True,
        "pcr_bank": "sha256",
        "pcr_selection": settings.pcr_selection,
        "pcr_values": {str(index): values[index].hex() for index in pinned},
        "workload_pcr": settings.workload_pcr,
        "allowed_model_digests": [d.hex() for d in models.get(ROLE_CHAT, [])],
        "allowed_embedding_model_digests": [d.hex() for d in models.get(ROLE_EMBEDDINGS, [])],
        "allowed_runtime_events": runtimes,
        "ak": {
            "pinned_public_keys": [base64.b64encode(spki_der(runtime.attester.ak_public)).decode()]
        },
        "max_session_ttl_seconds": settings.session_ttl_seconds,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(policy, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    log.warning("wrote a DEV-ONLY trust-on-first-use policy", extra={"path": str(path)})


def ak_certificate_chain(tpm: Tpm, settings: AttestationConfig) -> tuple[bytes, ...]:
    """The AK certificate from NV (DER, leaf first) and the intermediates from the chain file.

    Cloud vTPMs keep the AK certificate in an NV index, sometimes padded after the DER, so
    the certificate is cut to its DER length. The leaf must certify this TPM's AK: a
    certificate for another key would only make every client refuse, so the server refuses
    to start instead. An empty tuple when no NV index is configured (swtpm, generic TPM).
    The hardware-report binding (SEV-SNP, TDX) will ship beside this chain, in its own field.
    """
    nv_index = settings.ak_certificate_nv_index
    if nv_index is None and settings.platform == "gcp":
        nv_index = GCP_AK_CERT_ECC_NV  # the certificate of the ECC AK this server uses
    if nv_index is None:
        if settings.ak_certificate_chain_file is not None:
            raise AkCertificateError("ak_certificate_chain_file needs ak_certificate_nv_index")
        return ()
    from encloud.protocol.verifier import spki_der

    raw = tpm.read_nv(nv_index)
    leaf_der = der_prefix(raw)
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
        leaf_spki = leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except ValueError as err:
        raise AkCertificateError(f"NV 0x{nv_index:08x} does not hold a DER certificate") from err
    if leaf_spki != spki_der(tpm.ak_public()):
        raise AkCertificateError("the AK certificate in NV is for another key than this AK")
    chain = [leaf_der]
    if settings.ak_certificate_chain_file is not None:
        try:
            pem = settings.ak_certificate_chain_file.read_bytes()
            intermediates = x509.load_pem_x509_certificates(pem)
        except (OSError, ValueError) as err:
            raise AkCertificateError("the AK certificate chain file is not PEM") from err
        chain.extend(c.public_bytes(serialization.Encoding.DER) for c in intermediates)
    log.info("AK certificate chain loaded", extra={"certificates": len(chain)})
    return tuple(chain)


def der_prefix(data: bytes) -> bytes:
    """The DER SEQUENCE at the start of `data`, without whatever padding follows it."""
    if len(data) < 2 or data[0] != 0x30:
        raise AkCertificateError("the AK certificate in NV does not start with a DER SEQUENCE")
    first = data[1]
    if first < 0x80:
        length, header = first, 2
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or len(data) < 2 + count:
            raise AkCertificateError("the AK certificate in NV has an invalid DER length")
        length, header = int.from_bytes(data[2 : 2 + count], "big"), 2 + count
    if header + length > len(data):
        raise AkCertificateError("the AK certificate in NV is truncated")
    return data[: header + length]
