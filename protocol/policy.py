"""The verification policy: the reference values a quote is checked against.

docs/PROTOCOL.md ("The policy file") is the normative description; this copy of it
is for readers of the code. A policy is one JSON object, version 1. Every key below
is required unless marked optional; an unknown key, a duplicate key or a value of the wrong type
is refused with a PolicyError naming the field. A policy that parses but
leaves out something it must state (policy_gaps: AK trust, the GCE project for
Google's CA, and for a production policy its hardware roots, measurement,
minimum TCB, VMPL and boot PCR pins) is refused with PolicyIncompleteError,
which lists every gap.

    {
      "version": 1,
      "dev_only": false,
      "pcr_bank": "sha256",
      "pcr_selection": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 15],
      "pcr_values": {"0": "<64 hex>", "7": "<64 hex>"},
      "workload_pcr": 15,
      "allowed_model_digests": ["<64 hex>"],
      "allowed_runtime_events": ["<64 hex>"],
      "ak": {"pinned_public_keys": ["<base64 DER SubjectPublicKeyInfo>"],
             "certificate_roots": ["-----BEGIN CERTIFICATE-----\\n..."],
             "gce": {"project_id": "my-project"}},
      "pcr_waivers": {"5": "why PCR 5 is not pinned"},
      "max_session_ttl_seconds": 3600
    }

Fields:

- `version` (int): the format version, 1.
- `dev_only` (bool): true for a trust-on-first-use policy that a server wrote
  about itself; such a policy proves nothing to a third party and must never
  be used in production. The verifier does not read it; tools warn on it.
- `pcr_bank` (string): the PCR bank the quote must cover, "sha256" or
  "sha384". "sha1" is refused. In a SHA-384 bank the workload PCR is replayed
  with SHA-384 over each event's measured bytes (the log's SHA-256 digests are
  still checked against the content). The encloud server extends and quotes
  sha256 only, so `policy_problems` (and `encloud policy check`) refuse sha384.
- `pcr_selection` (list of int): the PCR indices (0-23) the quote must cover,
  exactly, sorted ascending, without duplicates, at least one.
- `pcr_values` (object): expected values of some selected PCRs, keyed by the
  index in decimal ("0", "7"), each the bank's digest in lowercase hex. The
  workload PCR must not be pinned here: it changes with each start-up and is
  checked by replaying the workload event log instead. A production policy
  pins the PCRs covering firmware, boot chain, kernel, initrd, command line and
  the measured root filesystem.
- `workload_pcr` (int): the PCR the server extends the model and runtime
  events into; it must be in `pcr_selection` and should be one that locality 0
  cannot reset (15, not 16 or 23).
- `allowed_model_digests` (list of hex): the 32-byte digests (from the model
  manifest) of the chat models the policy accepts, no duplicates. Empty only
  when `allowed_embedding_model_digests` is not: a policy accepts some model.
- `allowed_embedding_model_digests` (optional, list of hex): the same for the
  embedding models (role "embeddings" in the event log). Absent or empty: a
  server that measured any embedding model is refused.
- `allowed_runtime_events` (list of hex): SHA-256 over the data bytes (the
  canonical JSON) of each accepted runtime event, at least one, no duplicates.
- `ak` (object): how the attestation key is trusted.
  - `pinned_public_keys` (optional, list of base64): DER SubjectPublicKeyInfo
    of AKs trusted as they are (standard base64 with padding, canonical DER).
  - `certificate_roots` (optional, list of PEM strings): root certificates; an
    AK is also trusted when the evidence carries a certificate chain (DER,
    leaf first) whose leaf holds the AK's public key and which validates to
    one of these roots at the client's current time (RFC 5280 path
    validation with the Web PKI rules for CA certificates; the leaf's
    extensions are not constrained). Meant for GCP and Azure AK certificates.
  - `gce` (optional, object): the GCE instance identity a Google-issued AK
    certificate must carry (its extension 1.3.6.1.4.1.11129.2.1.21):
    `project_id` (string) and/or `project_number` (a decimal string), at least
    one of the two; optionally `zone`, `instance_id` (a decimal string: GCE
    ids exceed 2^53, where JSON parsers of other languages round),
    `instance_name`. Required
    when a root names Google (organization "Google LLC"), since Google's vTPM
    CA certifies every customer's VMs.
  At least one pinned key or one root is required, except for kind
  azure-sev-snp, where the paravisor's VMPL-0 report carries the AK.
  - `hardware_report` (optional, object): reserved; its presence is refused.
    The hardware binding is the top-level `platform` section.
- `max_session_ttl_seconds` (int): the longest session time-to-live the client
  accepts, 1 to 4294967295.
- `hpke_suites` (optional, list of names): the key-release suites the client may
  use, in its order of preference: "mlkem768-x25519" (X-Wing, the post-quantum
  hybrid) and "x25519". Without it both, the hybrid first. A client never offers
  a suite the policy does not list, so listing only the hybrid means no fallback.
- `pcr_waivers` (optional, object): selected PCRs deliberately left unpinned,
  keyed by index in decimal, each with its reason (a non-empty string);
  printed in every verification report. A pinned PCR, the workload PCR and
  the boot PCRs (BOOT_PCRS) cannot be waived.
- `platform` (optional, object): the CVM platform and its hardware roots. Without
  it the policy is vTPM-only (development); see docs/ATTESTATION.md, "Hardware
  binding".
  - `kind` (string): "azure-sev-snp" (Azure's HCL report in vTPM NV binds the AK),
    "sev-snp" (a configfs-tsm SEV-SNP report, whose REPORT_DATA the guest chose, binds
    the session key only, never AK trust; GCP N2D, bare metal) or "tdx" (parsed only;
    refused in a production policy). "sev" (plain SEV or SEV-ES, without SNP) is refused.
  - `production` (bool): true refuses evidence without a verified hardware report,
    and requires a complete policy (policy_gaps): AK trust, AMD roots that are AMD
    ARKs, measurements, min_tcb, vmpl, every boot PCR pinned, every other selected
    PCR pinned or waived.
  - `amd_roots` (list of PEM strings): the AMD root keys (ARK) a VCEK chain must
    lead to. In a production policy each must be an AMD ARK (organization
    "Advanced Micro Devices", common name ARK-Milan, ARK-Genoa or ARK-Turin); a
    test root only for a policy object built with `unsafe_test_roots`.
  - `measurements` (list of 96-hex): allowed launch MEASUREMENTs (on Azure, the
    paravisor's); at least one in a production policy.
  - `min_tcb` (optional object, required in production): all four of `bootloader`,
    `tee`, `snp`, `microcode` (0-255); every component of the report's REPORTED_TCB
    must reach it.
  - `vmpl` (optional int 0-3, required in production): the VMPL the report must
    come from. For azure-sev-snp it must be 0, and 0 is enforced when it is absent.
  - `allow_debug` (optional bool, default false): must be false in production.
  - `azure` (optional object; kind azure-sev-snp): required runtime claims
    `secure_boot`, `tpm_enabled`, `console_enabled` (bools; absent ones not checked).

`Policy.to_json()` gives the canonical form (RFC 8785: sorted keys, no whitespace,
UTF-8; lists sorted, `certificate_roots` re-encoded as PEM and left out when empty)
and `policy_digest()` is its SHA-256, stable across load/save.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from encloud.protocol.canonical import rfc8785_dumps, strict_loads
from encloud.protocol.encoding import sha256
from encloud.protocol.errors import PolicyError, PolicyIncompleteError
from encloud.protocol.handshake import DEFAULT_SUITES, SUITE_NAMES, HpkeSuiteId
from encloud.protocol.hardware.gce import is_google_root
from encloud.protocol.hardware.roots import is_production_amd_root
from encloud.protocol.hardware.sev_snp import TcbVersion

POLICY_VERSION = 1
PCR_BANKS: Mapping[str, int] = MappingProxyType({"sha256": 32, "sha384": 48})
"""Accepted bank names and their digest sizes."""
PCR_BANK_ALG: Mapping[str, int] = MappingProxyType({"sha256": 0x000B, "sha384": 0x000C})
MAX_PCR_INDEX = 23
MAX_TTL_SECONDS = 0xFFFFFFFF
SERVER_PCR_BANKS = frozenset({"sha256"})
"""The banks an encloud server extends and quotes: a policy naming another cannot pass."""
BOOT_PCRS: Mapping[int, str] = MappingProxyType(
    {
        0: "the firmware code (SRTM)",
        2: "option ROM and UEFI driver code",
        4: "the boot loader and the kernel or UKI image the firmware starts",
        7: "the Secure Boot state and keys",
        8: "the kernel command line (GRUB)",
        9: "the kernel and initrd (GRUB, and the kernel's own initrd measurement)",
        11: "the UKI sections: kernel, initrd, command line (systemd-stub)",
        12: "command-line overrides and credentials (systemd-stub)",
    }
)
"""PCRs a production policy must pin: on Azure and GCP the launch measurement is the
cloud's firmware, the same for every tenant, so only these tell your image from an
attacker's. Never waived (docs/ATTESTATION.md, "Complete production policies")."""

_KEYS = frozenset(
    {
        "version",
        "dev_only",
        "pcr_bank",
        "pcr_selection",
        "pcr_values",
        "workload_pcr",
        "allowed_model_digests",
        "allowed_runtime_events",
        "ak",
        "max_session_ttl_seconds",
    }
)
_OPTIONAL_KEYS = frozenset(
    {"platform", "pcr_waivers", "hpke_suites", "allowed_embedding_model_digests"}
)
_PLATFORM_KEYS = frozenset(
    {"kind", "production", "amd_roots", "measurements", "min_tcb", "vmpl", "allow_debug", "azure"}
)
PLATFORM_KINDS = ("azure-sev-snp", "sev-snp", "tdx")
_TCB_KEYS = ("bootloader", "tee", "snp", "microcode")
_AZURE_CLAIMS = {
    "secure_boot": "secure-boot",
    "tpm_enabled": "tpm-enabled",
    "console_enabled": "console-enabled",
}
"""Policy key -> the runtime claims' vm-configuration key."""


@dataclass(frozen=True)
class PlatformPolicy:
    """The `platform` section: which CVM hardware must bind the evidence, and how."""

    kind: str
    production: bool
    amd_roots: tuple[bytes, ...] = ()
    measurements: tuple[bytes, ...] = ()
    min_tcb: TcbVersion | None = None
    """None when the policy states no minimum (every component 0)."""
    vmpl: int | None = None
    allow_debug: bool = False
    azure_claims: Mapping[str, bool] = dc_field(default_factory=lambda: MappingProxyType({}))
    """vm-configuration key (e.g. "secure-boot") -> required value."""

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "kind": self.kind,
            "production": self.production,
            "amd_roots": sorted(_pem(der) for der in self.amd_roots),
            "measurements": sorted(m.hex() for m in self.measurements),
            "allow_debug": self.allow_debug,
        }
        if self.min_tcb is not None:
            obj["min_tcb"] = {k: getattr(self.min_tcb, k) for k in _TCB_KEYS}
        if self.vmpl is not None:
            obj["vmpl"] = self.vmpl
        if self.azure_claims:
            names = {v: k for k, v in _AZURE_CLAIMS.items()}
            obj["azure"] = {names[k]: v for k, v in sorted(self.azure_claims.items())}
        return obj


_AK_KEYS = frozenset({"pinned_public_keys", "certificate_roots", "hardware_report", "gce"})
_GCE_KEYS = {
    "project_id": str,
    "project_number": int,
    "zone": str,
    "instance_id": int,
    "instance_name": str,
}


@dataclass(frozen=True)
class GcePin:
    """`ak.gce`: the GCE instance identity an AK certificate from Google's CA must carry.

    Google's vTPM CA certifies every customer's VMs; only this pin tells yours apart.
    The project (id or number) is required; zone and instance narrow it further."""

    project_id: str | None = None
    project_number: int | None = None
    zone: str | None = None
    instance_id: int | None = None
    instance_name: str | None = None

    def to_obj(self) -> dict[str, Any]:
        """The JSON form: ids as decimal strings."""
        return {
            k: str(v) if _GCE_KEYS[k] is int else v
            for k in _GCE_KEYS
            if (v := getattr(self, k)) is not None
        }

    def pinned(self) -> dict[str, str | int]:
        """The pinned identity fields with their typed values."""
        return {k: v for k in _GCE_KEYS if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build one with parse_policy, load_policy or build_policy."""

    version: int
    dev_only: bool
    pcr_bank: str
    pcr_selection: tuple[int, ...]
    pcr_values: Mapping[int, bytes]
    workload_pcr: int
    allowed_model_digests: tuple[bytes, ...]
    allowed_runtime_events: tuple[bytes, ...]
    pinned_public_keys: tuple[bytes, ...]
    """DER SubjectPublicKeyInfo of each pinned AK."""
    max_session_ttl_seconds: int
    certificate_roots: tuple[bytes, ...] = ()
    """DER of each root certificate an AK certificate chain may lead to."""
    platform: PlatformPolicy | None = None
    """The hardware binding; None for a vTPM-only (development) policy."""
    gce: GcePin | None = None
    """`ak.gce`: the GCE identity a Google-issued AK certificate must carry."""
    pcr_waivers: Mapping[int, str] = dc_field(default_factory=lambda: MappingProxyType({}))
    """Selected PCRs deliberately left unpinned, each with the reason (printed in reports)."""
    unsafe_test_roots: tuple[bytes, ...] = ()
    """TESTS ONLY: DER roots this policy object treats as vendor roots (AMD ARKs) in
    production checks. Never serialised: no file can carry it."""
    hpke_suites: tuple[str, ...] | None = None
    """The key-release suites accepted, in the order a client offers them; None: both,
    the post-quantum hybrid first (DEFAULT_SUITES)."""
    allowed_embedding_model_digests: tuple[bytes, ...] = ()
    """The embedding models accepted (role "embeddings"); empty: none."""

    def allowed_models(self, role: str) -> tuple[bytes, ...]:
        """The model digests accepted for a model role of the event log."""
        if role == "chat":
            return self.allowed_model_digests
        if role == "embeddings":
            return self.allowed_embedding_model_digests
        return ()

    @property
    def suites(self) -> tuple[HpkeSuiteId, ...]:
        """The accepted HPKE suites, preferred first."""
        return tuple(SUITE_NAMES[name] for name in (self.hpke_suites or DEFAULT_SUITES))

    @property
    def production(self) -> bool:
        """True when the policy refuses evidence without a verified hardware binding."""
        return self.platform is not None and self.platform.production

    @property
    def pcr_bank_alg(self) -> int:
        """The TPM_ALG_ID of the bank."""
        return PCR_BANK_ALG[self.pcr_bank]

    def to_obj(self) -> dict[str, Any]:
        ak: dict[str, list[str]] = {
            "pinned_public_keys": sorted(
                base64.b64encode(k).decode("ascii") for k in self.pinned_public_keys
            )
        }
        if self.certificate_roots:
            ak["certificate_roots"] = sorted(_pem(der) for der in self.certificate_roots)
        ak_obj: dict[str, Any] = dict(ak)
        if self.gce is not None:
            ak_obj["gce"] = self.gce.to_obj()
        obj: dict[str, Any] = {
            "version": self.version,
            "dev_only": self.dev_only,
            "pcr_bank": self.pcr_bank,
            "pcr_selection": list(self.pcr_selection),
            "pcr_values": {str(i): v.hex() for i, v in sorted(self.pcr_values.items())},
            "workload_pcr": self.workload_pcr,
            "allowed_model_digests": sorted(d.hex() for d in self.allowed_model_digests),
            "allowed_runtime_events": sorted(d.hex() for d in self.allowed_runtime_events),
            "ak": ak_obj,
            "max_session_ttl_seconds": self.max_session_ttl_seconds,
        }
        if self.allowed_embedding_model_digests:
            obj["allowed_embedding_model_digests"] = sorted(
                d.hex() for d in self.allowed_embedding_model_digests
            )
        if self.pcr_waivers:
            obj["pcr_waivers"] = {str(i): why for i, why in sorted(self.pcr_waivers.items())}
        if self.hpke_suites is not None:
            obj["hpke_suites"] = list(self.hpke_suites)  # an order of preference: not sorted
        if self.platform is not None:
            obj["platform"] = self.platform.to_obj()
        return obj

    def to_json(self) -> bytes:
        """The canonical JSON (RFC 8785) of the canonical object (lists sorted)."""
        return rfc8785_dumps(self.to_obj())


def policy_digest(policy: Policy) -> bytes:
    """SHA-256 of the policy's canonical JSON."""
    return sha256(policy.to_json())


def policy_gaps(policy: Policy) -> list[str]:
    """Everything the policy leaves out that it must state, one line each ([] = complete).

    Every policy states how the AK is trusted and, when its AK roots include Google's vTPM
    CA, which GCE project it accepts. A production policy (platform.production) also states
    the AMD roots (AMD ARKs, or this object's unsafe_test_roots), launch measurements,
    minimum TCB and VMPL, and pins every boot PCR (BOOT_PCRS); every other selected PCR is
    pinned or waived. parse_policy refuses a policy with gaps, and the verifier re-checks
    before it reads evidence."""
    gaps: list[str] = []
    platform = policy.platform
    # Azure's report vouches for the AK only when the paravisor's measurement is pinned: any
    # SNP guest without a paravisor runs its own kernel at VMPL 0 and chooses REPORT_DATA.
    azure = (
        platform is not None and platform.kind == "azure-sev-snp" and bool(platform.measurements)
    )
    if not policy.pinned_public_keys and not policy.certificate_roots and not azure:
        gaps.append(
            "ak: no pinned key and no certificate root: nothing establishes AK trust (a "
            "hardware report vouches for the AK only on azure-sev-snp with the paravisor's "
            "launch measurement pinned)"
        )
    if policy.gce is None and any(is_google_root(r) for r in policy.certificate_roots):
        gaps.append(
            "ak.gce: Google's vTPM CA certifies every customer's VMs; pin your project "
            "(project_id or project_number)"
        )
    if platform is not None and not platform.amd_roots and platform.kind != "tdx":
        gaps.append("platform.amd_roots: no AMD root (ARK) to verify the VCEK chain against")
    if platform is None or not platform.production:
        return gaps
    trusted = set(policy.unsafe_test_roots)
    for i, der in enumerate(platform.amd_roots):
        if der not in trusted and not is_production_amd_root(der):
            gaps.append(f"platform.amd_roots[{i}]: not an AMD ARK (a test root?)")
    if not platform.measurements:
        gaps.append("platform.measurements: no launch measurement pinned")
    if platform.min_tcb is None:
        gaps.append("platform.min_tcb: no minimum TCB (bootloader, tee, snp, microcode)")
    if platform.vmpl is None and platform.kind in ("sev-snp", "azure-sev-snp"):
        gaps.append("platform.vmpl: the VMPL the report must come from is not stated")
    return gaps + _boot_chain_gaps(policy)


def production_gaps_except_hardware(policy: Policy) -> list[str]:
    """What keeps ``policy`` from being a production policy, every rule applied but those on
    the hardware report (platform: AMD roots, launch measurement, TCB, VMPL): for a boot
    emulated without SEV-SNP (deploy/image/run-vm.sh), whose policy pins the same boot chain
    a production one does ([] = passes)."""
    gaps = [g for g in policy_gaps(policy) if not g.startswith("platform.")]
    if policy.platform is None or not policy.platform.production:
        gaps += _boot_chain_gaps(policy)
    return gaps


def _boot_chain_gaps(policy: Policy) -> list[str]:
    """A production policy's boot-chain rules: not trust on first use, the workload PCR
    outside the boot PCRs, every boot PCR quoted and pinned, every other quoted PCR pinned
    or waived."""
    gaps: list[str] = []
    if policy.dev_only:
        gaps.append("dev_only: a production policy is not a trust-on-first-use policy")
    if policy.workload_pcr in BOOT_PCRS:
        gaps.append(
            f"workload_pcr: PCR {policy.workload_pcr} covers {BOOT_PCRS[policy.workload_pcr]}"
        )
    for index, what in BOOT_PCRS.items():
        if index == policy.workload_pcr:
            continue
        if index not in policy.pcr_selection:
            gaps.append(f"pcr_selection: PCR {index} ({what}) is not quoted")
        elif index not in policy.pcr_values:
            gaps.append(f"pcr_values: PCR {index} ({what}) is not pinned")
    for index in policy.pcr_selection:
        if index in BOOT_PCRS or index == policy.workload_pcr:
            continue
        if index not in policy.pcr_values and index not in policy.pcr_waivers:
            gaps.append(f"pcr_values: PCR {index} is selected but neither pinned nor waived")
    return gaps


def policy_problems(data: bytes) -> list[str]:
    """Every problem of a policy file, for `encloud policy check` ([] = usable with an
    encloud server): each missing field, else the first format error, then every gap
    (policy_gaps, on placeholders for the missing fields) and a PCR bank the server never
    extends."""
    try:
        obj = strict_loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        return [f"policy is not valid JSON: {err}"]
    if not isinstance(obj, dict):
        return ["policy must be a JSON object"]
    problems = [f"{key}: missing ({why})" for key, why in _REQUIRED_WHY.items() if key not in obj]
    filled = {**_PLACEHOLDERS, **obj}
    try:
        policy = _from_obj(filled, check_gaps=False)
    except PolicyError as err:
        return [*problems, str(err)]
    problems += policy_gaps(policy)
    if policy.pcr_bank not in SERVER_PCR_BANKS:
        problems.append(
            f"pcr_bank: {policy.pcr_bank} is never extended by the server (it measures and "
            "quotes sha256 only), so the workload PCR stays zero there and no quote matches"
        )
    return problems


_REQUIRED_WHY = {
    "version": "the format version, 1",
    "dev_only": "true only for a trust-on-first-use policy",
    "pcr_bank": "the PCR bank the quote covers: sha256",
    "pcr_selection": "the PCRs every quote must cover",
    "pcr_values": "the pinned values of the boot and platform PCRs",
    "workload_pcr": "the PCR the model and runtime events are measured into",
    "allowed_model_digests": "the models you accept",
    "allowed_runtime_events": "the runtime configurations you accept",
    "ak": "how the attestation key is trusted: pinned keys or certificate roots",
    "max_session_ttl_seconds": "the longest session you accept",
}
_PLACEHOLDERS: dict[str, Any] = {
    "version": POLICY_VERSION,
    "dev_only": False,
    "pcr_bank": "sha256",
    "pcr_selection": [15],
    "pcr_values": {},
    "workload_pcr": 15,
    "allowed_model_digests": ["00" * 32],
    "allowed_runtime_events": ["00" * 32],
    "ak": {},
    "max_session_ttl_seconds": 1,
}
"""Stand-ins for missing fields, so that policy_problems can list the gaps of the rest."""


def load_policy(path: str | os.PathLike[str], *, unsafe_test_roots: Iterable[bytes] = ()) -> Policy:
    with open(path, "rb") as f:
        return parse_policy(f.read(), unsafe_test_roots=unsafe_test_roots)


def parse_policy(data: bytes, *, unsafe_test_roots: Iterable[bytes] = ()) -> Policy:
    """Parse and validate a policy; any problem raises PolicyError naming the field.

    `unsafe_test_roots` (TESTS ONLY): DER roots this one policy object accepts as vendor
    roots in production checks."""
    try:
        obj = strict_loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise PolicyError(f"policy is not valid JSON: {err}") from err
    return _from_obj(obj, tuple(unsafe_test_roots))


def build_policy(
    *,
    pcr_selection: Iterable[int],
    workload_pcr: int,
    allowed_model_digests: Iterable[bytes],
    allowed_runtime_events: Iterable[bytes],
    pinned_public_keys: Iterable[bytes],
    max_session_ttl_seconds: int,
    certificate_roots: Iterable[bytes] = (),
    pcr_values: Mapping[int, bytes] | None = None,
    dev_only: bool = False,
    pcr_bank: str = "sha256",
    platform: Mapping[str, Any] | None = None,
    gce: Mapping[str, Any] | None = None,
    pcr_waivers: Mapping[int, str] | None = None,
    unsafe_test_roots: Iterable[bytes] = (),
    hpke_suites: Iterable[str] | None = None,
    allowed_embedding_model_digests: Iterable[bytes] = (),
) -> Policy:
    """Build a policy from Python values, validated exactly as a parsed one."""
    ak: dict[str, Any] = {
        "pinned_public_keys": [base64.b64encode(k).decode("ascii") for k in pinned_public_keys],
        "certificate_roots": [_pem(der) for der in certificate_roots],
    }
    if gce is not None:
        ak["gce"] = dict(gce)
    obj: dict[str, Any] = {
        "version": POLICY_VERSION,
        "dev_only": dev_only,
        "pcr_bank": pcr_bank,
        "pcr_selection": sorted(pcr_selection),
        "pcr_values": {str(i): v.hex() for i, v in (pcr_values or {}).items()},
        "workload_pcr": workload_pcr,
        "allowed_model_digests": [d.hex() for d in allowed_model_digests],
        "allowed_runtime_events": [d.hex() for d in allowed_runtime_events],
        "ak": ak,
        "max_session_ttl_seconds": max_session_ttl_seconds,
    }
    embedding_models = [d.hex() for d in allowed_embedding_model_digests]
    if embedding_models:
        obj["allowed_embedding_model_digests"] = embedding_models
    if pcr_waivers:
        obj["pcr_waivers"] = {str(i): why for i, why in pcr_waivers.items()}
    if hpke_suites is not None:
        obj["hpke_suites"] = list(hpke_suites)
    if platform is not None:
        obj["platform"] = dict(platform)
    return _from_obj(obj, tuple(unsafe_test_roots))


# --- validation ---------------------------------------------------------------------


def _fail(field: str, why: str) -> PolicyError:
    return PolicyError(f"policy field {field!r}: {why}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(obj: Mapping[str, Any], field: str, low: int, high: int) -> int:
    value = obj[field]
    if not _is_int(value) or not low <= value <= high:
        raise _fail(field, f"must be an integer in {low}..{high}")
    return int(value)


def _hex(value: object, field: str, size: int) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size or value != value.lower():
        raise _fail(field, f"must be {2 * size} lowercase hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError as err:
        raise _fail(field, f"must be {2 * size} lowercase hex digits") from err


def _hex_list(
    obj: Mapping[str, Any], field: str, size: int, *, may_be_empty: bool = False
) -> tuple[bytes, ...]:
    value = obj[field]
    if not isinstance(value, list) or not (value or may_be_empty):
        raise _fail(field, "must be a non-empty list of hex strings")
    items = [_hex(item, f"{field}[{i}]", size) for i, item in enumerate(value)]
    if len(set(items)) != len(items):
        raise _fail(field, "has duplicates")
    return tuple(sorted(items))


def _spki(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise _fail(field, "must be a base64 string")
    try:
        der = base64.b64decode(value, validate=True)
        key = serialization.load_der_public_key(der)
    except (binascii.Error, ValueError, UnsupportedAlgorithm) as err:
        raise _fail(field, "is not base64 of a DER SubjectPublicKeyInfo") from err
    canonical = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if canonical != der:
        raise _fail(field, "is not canonical DER SubjectPublicKeyInfo")
    return der


def _pem(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _root(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise _fail(field, "must be a PEM string")
    try:
        certs = x509.load_pem_x509_certificates(value.encode("ascii"))
    except (UnicodeEncodeError, ValueError, UnsupportedAlgorithm) as err:
        raise _fail(field, "is not a PEM certificate") from err
    if len(certs) != 1:
        raise _fail(field, "must hold exactly one certificate")
    return certs[0].public_bytes(serialization.Encoding.DER)


def _gce(value: object) -> GcePin:
    if not isinstance(value, dict):
        raise _fail("ak.gce", "must be an object")
    unknown = sorted(set(value) - set(_GCE_KEYS))
    if unknown:
        raise _fail(f"ak.gce.{unknown[0]}", "unknown key")
    for key, kind in _GCE_KEYS.items():
        if key not in value:
            continue
        item = value[key]
        # Numbers as decimal strings: GCE ids exceed 2^53, past which JSON parsers in other
        # languages (JavaScript's among them) silently round.
        if kind is int and (
            not isinstance(item, str)
            or not item.isascii()
            or not item.isdigit()
            or str(int(item)) != item
            or int(item) >= 2**63
        ):
            raise _fail(f"ak.gce.{key}", "must be a decimal string below 2^63")
        if kind is str and (not isinstance(item, str) or not item):
            raise _fail(f"ak.gce.{key}", "must be a non-empty string")
    if "project_id" not in value and "project_number" not in value:
        raise _fail("ak.gce", "must pin the project (project_id or project_number)")
    number = value.get("project_number")
    instance = value.get("instance_id")
    return GcePin(
        project_id=value.get("project_id"),
        project_number=None if number is None else int(number),
        zone=value.get("zone"),
        instance_id=None if instance is None else int(instance),
        instance_name=value.get("instance_name"),
    )


def gce_pin_from_obj(value: object) -> GcePin:
    """Parse an `ak.gce` object (PolicyError naming the field on any problem)."""
    return _gce(value)


def _ak(value: object) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    if not isinstance(value, dict):
        raise _fail("ak", "must be an object")
    unknown = sorted(set(value) - _AK_KEYS)
    if unknown:
        raise _fail(f"ak.{unknown[0]}", "unknown key")
    if "hardware_report" in value:
        raise _fail("ak.hardware_report", "hardware report binding is not implemented yet")
    keys = value.get("pinned_public_keys", [])
    if not isinstance(keys, list):
        raise _fail("ak.pinned_public_keys", "must be a list")
    ders = [_spki(k, f"ak.pinned_public_keys[{i}]") for i, k in enumerate(keys)]
    if len(set(ders)) != len(ders):
        raise _fail("ak.pinned_public_keys", "has duplicates")
    roots_value = value.get("certificate_roots", [])
    if not isinstance(roots_value, list):
        raise _fail("ak.certificate_roots", "must be a list of PEM strings")
    roots = [_root(r, f"ak.certificate_roots[{i}]") for i, r in enumerate(roots_value)]
    if len(set(roots)) != len(roots):
        raise _fail("ak.certificate_roots", "has duplicates")
    return tuple(sorted(ders)), tuple(sorted(roots))


def _from_obj(
    obj: object, unsafe_test_roots: tuple[bytes, ...] = (), *, check_gaps: bool = True
) -> Policy:
    if not isinstance(obj, dict):
        raise PolicyError("policy must be a JSON object")
    unknown = sorted(set(obj) - _KEYS - _OPTIONAL_KEYS)
    if unknown:
        raise _fail(unknown[0], "unknown key")
    missing = sorted(_KEYS - set(obj))
    if missing:
        raise _fail(missing[0], "missing")

    version = obj["version"]
    if not _is_int(version) or version != POLICY_VERSION:
        raise _fail("version", f"must be {POLICY_VERSION}")
    if not isinstance(obj["dev_only"], bool):
        raise _fail("dev_only", "must be true or false")

    bank = obj["pcr_bank"]
    if not isinstance(bank, str):
        raise _fail("pcr_bank", f"must be one of {sorted(PCR_BANKS)}")
    if bank == "sha1":
        raise _fail("pcr_bank", "sha1 is refused")
    if bank not in PCR_BANKS:
        raise _fail("pcr_bank", f"must be one of {sorted(PCR_BANKS)}")
    digest_size = PCR_BANKS[bank]

    selection = obj["pcr_selection"]
    if (
        not isinstance(selection, list)
        or not selection
        or not all(_is_int(i) and 0 <= i <= MAX_PCR_INDEX for i in selection)
    ):
        raise _fail("pcr_selection", f"must be a non-empty list of integers 0..{MAX_PCR_INDEX}")
    if selection != sorted(set(selection)):
        raise _fail("pcr_selection", "must be sorted ascending without duplicates")

    workload_pcr = _int(obj, "workload_pcr", 0, MAX_PCR_INDEX)
    if workload_pcr not in selection:
        raise _fail("workload_pcr", f"{workload_pcr} is not in pcr_selection")

    raw_values = obj["pcr_values"]
    if not isinstance(raw_values, dict):
        raise _fail("pcr_values", "must be an object of index -> hex")
    pcr_values: dict[int, bytes] = {}
    for key, value in raw_values.items():
        field = f"pcr_values.{key}"
        if not key.isascii() or not key.isdigit() or str(int(key)) != key:
            raise _fail(field, "key must be a PCR index in decimal")
        index = int(key)
        if index not in selection:
            raise _fail(field, "PCR is not in pcr_selection")
        if index == workload_pcr:
            raise _fail(field, "the workload PCR is checked by replay and must not be pinned")
        pcr_values[index] = _hex(value, field, digest_size)

    model_digests = _hex_list(obj, "allowed_model_digests", 32, may_be_empty=True)
    embedding_models = (
        _hex_list(obj, "allowed_embedding_model_digests", 32, may_be_empty=True)
        if "allowed_embedding_model_digests" in obj
        else ()
    )
    if not model_digests and not embedding_models:
        raise _fail("allowed_model_digests", "must list a model (or name embedding models)")
    runtime_events = _hex_list(obj, "allowed_runtime_events", 32)
    pinned, roots = _ak(obj["ak"])
    gce = _gce(obj["ak"]["gce"]) if "gce" in obj["ak"] else None
    waivers = _waivers(obj.get("pcr_waivers", {}), selection, workload_pcr, pcr_values)
    ttl = _int(obj, "max_session_ttl_seconds", 1, MAX_TTL_SECONDS)
    platform = _platform(obj["platform"]) if "platform" in obj else None

    policy = Policy(
        version=POLICY_VERSION,
        dev_only=obj["dev_only"],
        pcr_bank=bank,
        pcr_selection=tuple(selection),
        pcr_values=MappingProxyType(dict(sorted(pcr_values.items()))),
        workload_pcr=workload_pcr,
        allowed_model_digests=model_digests,
        allowed_runtime_events=runtime_events,
        pinned_public_keys=pinned,
        max_session_ttl_seconds=ttl,
        certificate_roots=roots,
        platform=platform,
        gce=gce,
        pcr_waivers=MappingProxyType(dict(sorted(waivers.items()))),
        unsafe_test_roots=unsafe_test_roots,
        hpke_suites=_suites(obj["hpke_suites"]) if "hpke_suites" in obj else None,
        allowed_embedding_model_digests=embedding_models,
    )
    gaps = policy_gaps(policy) if check_gaps else []
    if gaps:
        raise PolicyIncompleteError(gaps)
    if check_gaps:
        object.__setattr__(policy, _VALIDATED, True)
    return policy


_VALIDATED = "_encloud_validated"


def ensure_valid(policy: Policy) -> None:
    """Raise PolicyError unless `policy` is exactly what the parser makes of its own fields.

    A Policy from parse_policy / build_policy is; one made by dataclasses.replace or the
    constructor is checked here again (format and completeness), so the verifier never
    trusts a policy object that skipped the parser's rules."""
    if getattr(policy, _VALIDATED, False):
        return
    if not isinstance(policy, Policy):
        raise PolicyError(f"expected a Policy, not {type(policy).__name__}")
    try:
        rebuilt = _from_obj(policy.to_obj(), tuple(policy.unsafe_test_roots))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, PolicyError):
            raise
        raise PolicyError(f"the policy object is malformed ({type(err).__name__})") from err
    if rebuilt != policy:
        raise PolicyError("the policy object differs from what its own fields parse to")
    object.__setattr__(policy, _VALIDATED, True)


def _suites(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _fail("hpke_suites", f"must be a non-empty list of {sorted(SUITE_NAMES)}")
    for i, name in enumerate(value):
        if name not in SUITE_NAMES:
            raise _fail(f"hpke_suites[{i}]", f"must be one of {sorted(SUITE_NAMES)}")
    if len(set(value)) != len(value):
        raise _fail("hpke_suites", "has duplicates")
    return tuple(value)


def _waivers(
    value: object, selection: list[int], workload_pcr: int, pinned: Mapping[int, bytes]
) -> dict[int, str]:
    if not isinstance(value, dict):
        raise _fail("pcr_waivers", "must be an object of index -> reason")
    waivers: dict[int, str] = {}
    for key, why in value.items():
        field = f"pcr_waivers.{key}"
        if not key.isascii() or not key.isdigit() or str(int(key)) != key:
            raise _fail(field, "key must be a PCR index in decimal")
        index = int(key)
        if index not in selection:
            raise _fail(field, "PCR is not in pcr_selection")
        if index == workload_pcr or index in pinned:
            raise _fail(field, "a pinned or workload PCR cannot be waived")
        if index in BOOT_PCRS:
            raise _fail(field, f"PCR {index} covers {BOOT_PCRS[index]}; it is never waived")
        if not isinstance(why, str) or not why.strip():
            raise _fail(field, "must give the reason as a non-empty string")
        waivers[index] = why
    return waivers


def _bool(obj: Mapping[str, Any], field: str, default: bool | None = None) -> bool:
    value = obj.get(field.rsplit(".", 1)[-1], default)
    if not isinstance(value, bool):
        raise _fail(field, "must be true or false")
    return value


def _platform(value: object) -> PlatformPolicy:
    if not isinstance(value, dict):
        raise _fail("platform", "must be an object")
    unknown = sorted(set(value) - _PLATFORM_KEYS)
    if unknown:
        raise _fail(f"platform.{unknown[0]}", "unknown key")
    kind = value.get("kind")
    if kind == "sev":
        raise _fail("platform.kind", "plain SEV without SNP is refused: it has no signed report")
    if kind not in PLATFORM_KINDS:
        raise _fail("platform.kind", f"must be one of {list(PLATFORM_KINDS)}")
    if "production" not in value:
        raise _fail("platform.production", "missing")
    production = _bool(value, "platform.production")
    allow_debug = _bool(value, "platform.allow_debug", False)
    if production and allow_debug:
        raise _fail("platform.allow_debug", "a production policy never allows debug")
    if production and kind == "tdx":
        raise _fail(
            "platform.kind",
            "TDX quotes are parsed but not verified against Intel's chain yet; "
            "a production policy cannot name tdx",
        )

    roots_value = value.get("amd_roots", [])
    if not isinstance(roots_value, list):
        raise _fail("platform.amd_roots", "must be a list of PEM strings")
    roots = [_root(r, f"platform.amd_roots[{i}]") for i, r in enumerate(roots_value)]
    if len(set(roots)) != len(roots):
        raise _fail("platform.amd_roots", "has duplicates")

    raw_measurements = value.get("measurements", [])
    if not isinstance(raw_measurements, list):
        raise _fail("platform.measurements", "must be a list of hex strings")
    measurements = [
        _hex(m, f"platform.measurements[{i}]", 48) for i, m in enumerate(raw_measurements)
    ]
    if len(set(measurements)) != len(measurements):
        raise _fail("platform.measurements", "has duplicates")

    min_tcb = None
    if "min_tcb" in value:
        raw_tcb = value["min_tcb"]
        if not isinstance(raw_tcb, dict) or set(raw_tcb) != set(_TCB_KEYS):
            raise _fail("platform.min_tcb", f"must be an object with the keys {list(_TCB_KEYS)}")
        min_tcb = TcbVersion(
            **{
                k: _int({f"platform.min_tcb.{k}": raw_tcb[k]}, f"platform.min_tcb.{k}", 0, 255)
                for k in _TCB_KEYS
            }
        )

    vmpl = None
    if "vmpl" in value:
        vmpl = _int({"platform.vmpl": value["vmpl"]}, "platform.vmpl", 0, 3)
        if kind == "azure-sev-snp" and vmpl != 0:
            raise _fail(
                "platform.vmpl",
                "must be 0 for azure-sev-snp: only the paravisor at VMPL 0 puts the AK in the "
                "report",
            )

    claims: dict[str, bool] = {}
    azure = value.get("azure", {})
    if not isinstance(azure, dict) or set(azure) - set(_AZURE_CLAIMS):
        raise _fail("platform.azure", f"must be an object with keys from {sorted(_AZURE_CLAIMS)}")
    if azure and kind != "azure-sev-snp":
        raise _fail("platform.azure", "only for kind azure-sev-snp")
    for key, claim in _AZURE_CLAIMS.items():
        if key in azure:
            claims[claim] = _bool(azure, f"platform.azure.{key}")

    return PlatformPolicy(
        kind=kind,
        production=production,
        amd_roots=tuple(sorted(roots)),
        measurements=tuple(sorted(measurements)),
        min_tcb=min_tcb,
        vmpl=vmpl,
        allow_debug=allow_debug,
        azure_claims=MappingProxyType(dict(sorted(claims.items()))),
    )
