"""Evidence as the verifier sees it: plain bytes, no protobuf."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

TPM_ALG_SHA256 = 0x000B


@dataclass(frozen=True)
class Evidence:
    """What the server's vTPM produced for one session (see encloud.proto)."""

    quote_attest: bytes
    """The signed TPMS_ATTEST bytes, without the TPM2B size prefix."""
    quote_signature: bytes
    """The marshalled TPMT_SIGNATURE over quote_attest."""
    ak_public: bytes
    """The marshalled TPMT_PUBLIC of the attestation key."""
    pcr_values: Mapping[int, bytes]
    """Quoted PCR index -> value in the bank pcr_hash_algorithm."""
    workload_event_log: bytes
    """The workload event log, CEL-JSON lines (see eventlog.py)."""
    pcr_hash_algorithm: int = TPM_ALG_SHA256
    ak_certificate_chain: tuple[bytes, ...] = field(default_factory=tuple)
    hardware_kind: str = ""
    """Which hardware report rides along: "" (none, vTPM only), "azure-hcl", "sev-snp",
    "tdx" (see encloud.protocol.hardware.binding)."""
    hardware_report: bytes = b""
    """The report exactly as the platform gave it (the HCL report, the configfs-tsm outblob)."""
    hardware_certificate_chain: tuple[bytes, ...] = field(default_factory=tuple)
    """The report signer's chain, DER, leaf first: VCEK, ASK[, ARK] for SEV-SNP."""
