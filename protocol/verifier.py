"""Verify a vTPM quote and the workload event log against a policy.

docs/PROTOCOL.md ("2. Verify") is the normative list of checks; `verify`'s docstring repeats
it for readers of the code.

The single entry point is `verify` (or `verify_with_report`, which also
returns the step-by-step report that `encloud attest --report` prints). Checks
run in the order listed in `verify`'s docstring; the first failure stops
verification with its typed error from encloud.protocol.errors, and no state is
returned unless every check passed.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509 import verification as x509_verification

from encloud.protocol import eventlog
from encloud.protocol.encoding import sha256
from encloud.protocol.errors import (
    AkAttributesError,
    AkUntrustedError,
    AttestMagicError,
    AttestTypeError,
    DebugEnabledError,
    EventDigestError,
    EventLogFormatError,
    EventLogReplayError,
    EventSequenceError,
    HardwareBindingRequiredError,
    HardwareReportFormatError,
    MeasurementNotAllowedError,
    ModelNotAllowedError,
    NonceMismatchError,
    PcrDigestError,
    PcrSelectionError,
    PcrValueError,
    PlainSevRefusedError,
    PlatformMismatchError,
    PolicyError,
    PolicyIncompleteError,
    QualifiedSignerError,
    ReportDataMismatchError,
    RuntimeClaimsError,
    RuntimeNotAllowedError,
    SessionTtlError,
    SignatureError,
    TcbTooLowError,
    VerificationError,
    VmplError,
)
from encloud.protocol.evidence import Evidence
from encloud.protocol.hardware import azure_hcl, gce, sev_snp
from encloud.protocol.hardware.binding import (
    KIND_AZURE_HCL,
    KIND_SEV,
    KIND_SEV_SNP,
    KIND_TDX,
    session_report_data,
)
from encloud.protocol.policy import GcePin, Policy, ensure_valid, policy_digest, policy_gaps
from encloud.protocol.tpm_structures import (
    DECRYPT,
    FIXED_PARENT,
    FIXED_TPM,
    HASH_NAMES,
    HASH_SIZES,
    RESTRICTED,
    SIGN_ENCRYPT,
    TPM_ALG_ECC,
    TPM_ALG_ECDSA,
    TPM_ALG_NULL,
    TPM_ALG_RSAPSS,
    TPM_ALG_RSASSA,
    TPM_ALG_SHA1,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    AkPublic,
    QuoteInfo,
    Signature,
    hash_bytes,
    parse_attest,
    parse_public,
    parse_signature,
)

_HASHES: Mapping[int, Callable[[], hashes.HashAlgorithm]] = {
    0x000B: hashes.SHA256,
    0x000C: hashes.SHA384,
}


@dataclass(frozen=True)
class CheckResult:
    """One step of verification: its name, whether it passed, and what was compared."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class VerifiedAttestation:
    """What a quote proved. Only ever built after every check passed."""

    ak_fingerprint: str
    """Hex SHA-256 of the AK's DER SubjectPublicKeyInfo."""
    workload_pcr: int
    workload_pcr_value: bytes
    models: Mapping[str, bytes]
    """Role ("chat", "embeddings") -> model digest, of the last (running) start-up."""
    runtime_event: dict[str, Any]
    """The parsed runtime event of the last (running) start-up."""
    events: list[eventlog.EventRecord]
    attest_digest: bytes
    """H_ev: SHA-256 of the signed TPMS_ATTEST bytes."""
    clock: int
    reset_count: int
    restart_count: int
    firmware_version: int
    pcr_values: Mapping[int, bytes]
    policy_digest: bytes
    report: list[CheckResult] = field(default_factory=list)
    hardware_binding: str = ""
    """What the hardware report proved ("" when the evidence was vTPM only)."""
    trust_note: str = ""
    """Who stays trusted for what, in words (e.g. Google for the vTPM's PCRs on GCP)."""

    @property
    def model_digest(self) -> bytes:
        """The running chat model's digest; b"" when the server serves embeddings only."""
        return self.models.get(eventlog.ROLE_CHAT, b"")


def spki_der(ak_public_bytes: bytes) -> bytes:
    """DER SubjectPublicKeyInfo of a marshalled TPMT_PUBLIC (what a policy pins)."""
    return _spki(parse_public(ak_public_bytes))


def ak_fingerprint(ak_public_bytes: bytes) -> str:
    """Hex SHA-256 of the AK's DER SubjectPublicKeyInfo."""
    return sha256(spki_der(ak_public_bytes)).hex()


def _spki(ak: AkPublic) -> bytes:
    return ak.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify(
    evidence: Evidence,
    policy: Policy,
    *,
    expected_qualifying_data: bytes,
    session_ttl_seconds: int | None,
) -> VerifiedAttestation:
    """Verify evidence against a policy; raise the first failed check's typed error.

    `expected_qualifying_data` is Q, recomputed by the caller from its own nonce,
    suite, session key, session id and TTL; `session_ttl_seconds` is the TTL the
    server offered. Checks, in order (report name, error raised):

    0. policy: the policy is complete (encloud.protocol.policy.policy_gaps: AK trust
       stated, the GCE project pinned for Google's CA, and for a production policy
       the hardware roots, measurement, minimum TCB, VMPL and every boot PCR pinned),
       checked before any evidence is read (PolicyIncompleteError).
    1. ak_parse: ak_public is a strict TPMT_PUBLIC of an RSA 2048/3072 or ECC
       P-256/P-384 key (MalformedEvidenceError).
       (With a `platform` section, the hardware checks of docs/ATTESTATION.md run
       here, between ak_parse and ak_trust.)
    2. ak_trust: the AK's DER SubjectPublicKeyInfo equals a key pinned in the
       policy; or else the evidence's AK certificate chain (DER, leaf first)
       has a leaf for exactly this key and validates, at the current time, to
       one of the policy's certificate roots, and a GCE instance identity in the
       leaf matches the policy's `ak.gce` pin (a GCE leaf needs the pin); or else,
       on azure-sev-snp only, the paravisor's VMPL-0 report carries this AK in its
       runtime claims. A guest-chosen report (configfs-tsm, GCP) never vouches for
       the AK (AkUntrustedError).
    3. ak_attributes: restricted, sign, fixedTPM and fixedParent are set and
       decrypt is clear; the symmetric algorithm is NULL; the key has a signing
       scheme (AkAttributesError).
    4. signature_parse: quote_signature is a strict TPMT_SIGNATURE
       (MalformedEvidenceError); its scheme fits the key type (ECDSA for ECC,
       RSASSA or RSAPSS for RSA) and equals the key's scheme and hash
       (SignatureError).
    5. signature: the signature over quote_attest verifies under the AK
       (SignatureError).
    6. attest_parse: quote_attest is a strict TPMS_ATTEST (MalformedEvidenceError).
    7. magic: magic is TPM_GENERATED_VALUE 0xFF544347 (AttestMagicError).
    8. attest_type: type is TPM_ST_ATTEST_QUOTE 0x8018 (AttestTypeError).
    9. qualified_signer: qualifiedSigner is the AK's Name, or its Qualified Name
       as a primary key of the owner, endorsement, platform or null hierarchy,
       which is what a TPM writes for a primary AK (QualifiedSignerError).
    10. qualifying_data: extraData equals expected_qualifying_data, compared in
        constant time (NonceMismatchError).
    11. pcr_selection: the evidence's bank and the quoted TPML_PCR_SELECTION are
        exactly one bank, the policy's, with exactly the policy's indices; a
        SHA-1 bank is refused (PcrSelectionError).
    12. pcr_digest: the shipped PCR values cover exactly the selection, each the
        bank's digest size, and pcrDigest equals H(values concatenated in
        ascending index order), H being the signature's hash algorithm as the
        TPM computes it (PcrDigestError).
    13. pcr_value: every PCR pinned in the policy has its pinned value (PcrValueError).
    14. event_log_format: the workload event log parses strictly (EventLogFormatError).
    15. event_digest: every record is for the workload PCR and its digest,
        recomputed from its content, equals the logged digest (EventDigestError).
    16. event_log_replay: the log replays from zero to the quoted workload PCR
        value (EventLogReplayError).
    17. event_sequence: the log is one or more start-ups, each one or more model
        events (canonical {"digest","role"} JSON, roles chat then embeddings, none
        twice) then one runtime event in canonical JSON (an object); the last
        start-up is the running one (EventSequenceError).
    18. model_digest: every start-up's every model digest is allowed for its role
        (ModelNotAllowedError).
    19. runtime_event: every start-up's runtime event (SHA-256 of its data) is
        allowed (RuntimeNotAllowedError).
    20. session_ttl: 0 < session_ttl_seconds <= max_session_ttl_seconds
        (SessionTtlError); None for a request that opens no session (Sentinel's key
        release, whose freshness is its single-use nonce).
    """
    attestation, _, error = verify_with_report(
        evidence,
        policy,
        expected_qualifying_data=expected_qualifying_data,
        session_ttl_seconds=session_ttl_seconds,
    )
    if error is not None:
        raise error
    assert attestation is not None
    return attestation


def verify_with_report(
    evidence: Evidence,
    policy: Policy,
    *,
    expected_qualifying_data: bytes,
    session_ttl_seconds: int | None,
) -> tuple[VerifiedAttestation | None, list[CheckResult], VerificationError | None]:
    """Run `verify`'s checks and return (attestation or None, report, error or None)."""
    if not isinstance(expected_qualifying_data, bytes) or not expected_qualifying_data:
        raise ValueError("expected_qualifying_data must be non-empty bytes")
    run = _Run(evidence, policy, expected_qualifying_data, session_ttl_seconds)
    try:
        attestation = run.run()
    except VerificationError as err:
        run.report.append(CheckResult(run.current, False, err.detail))
        return None, run.report, err
    return attestation, run.report, None


def format_report(results: list[CheckResult]) -> str:
    """One line per check: PASS or FAIL, its name and what was compared."""
    width = max((len(r.name) for r in results), default=0)
    lines = [f"{'PASS' if r.passed else 'FAIL'}  {r.name:<{width}}  {r.detail}" for r in results]
    if results and all(r.passed for r in results):
        lines.append("verified: all checks passed")
    elif results:
        lines.append(f"refused at check {results[-1].name}")
    return "\n".join(lines)


def _short(value: bytes) -> str:
    return value.hex() if len(value) <= 8 else f"{value[:8].hex()}..({len(value)} bytes)"


class _Run:
    """The state of one verification; each step records a passed CheckResult."""

    def __init__(self, evidence: Evidence, policy: Policy, q: bytes, ttl: int | None) -> None:
        self.evidence = evidence
        self.policy = policy
        self.q = q
        self.ttl = ttl
        self.report: list[CheckResult] = []
        self.current = "start"

    def step(self, name: str) -> None:
        self.current = name

    def ok(self, detail: str) -> None:
        self.report.append(CheckResult(self.current, True, detail))

    def run(self) -> VerifiedAttestation:
        ev, policy = self.evidence, self.policy

        self.step("policy")
        try:
            ensure_valid(policy)
        except PolicyIncompleteError:
            raise
        except PolicyError as err:
            raise PolicyIncompleteError([f"the policy object does not validate: {err}"]) from err
        gaps = policy_gaps(policy)
        if gaps:
            raise PolicyIncompleteError(gaps)
        self.ok(_policy_summary(policy))

        self.step("ak_parse")
        ak = parse_public(ev.ak_public)
        key = ak.public_key()
        spki = _spki(ak)
        fingerprint = sha256(spki).hex()
        self.ok(f"{_key_desc(ak)}, fingerprint {fingerprint}")

        hardware = self._hardware(ev, policy, spki)

        self.step("ak_trust")
        self.ok(self._ak_trust(ev, policy, spki, fingerprint, hardware))

        self.step("ak_attributes")
        _check_ak_attributes(ak)
        self.ok(f"objectAttributes 0x{ak.attributes:08x}: restricted, sign, fixedTPM, fixedParent")

        self.step("signature_parse")
        sig = parse_signature(ev.quote_signature)
        _check_scheme(ak, sig)
        self.ok(f"{_sig_desc(sig)} matches the key's scheme")

        self.step("signature")
        _verify_signature(key, sig, ev.quote_attest)
        self.ok(f"{_sig_desc(sig)} over {len(ev.quote_attest)} TPMS_ATTEST bytes verifies")

        self.step("attest_parse")
        attest = parse_attest(ev.quote_attest)
        self.ok(f"TPMS_ATTEST of {len(ev.quote_attest)} bytes")

        self.step("magic")
        if attest.magic != TPM_GENERATED_VALUE:
            raise AttestMagicError(f"magic 0x{attest.magic:08x} is not 0x{TPM_GENERATED_VALUE:08x}")
        self.ok(f"magic 0x{attest.magic:08x}")

        self.step("attest_type")
        if attest.type != TPM_ST_ATTEST_QUOTE or attest.quote is None:
            raise AttestTypeError(f"type 0x{attest.type:04x} is not 0x{TPM_ST_ATTEST_QUOTE:04x}")
        quote = attest.quote
        self.ok(f"type 0x{attest.type:04x} (quote)")

        self.step("qualified_signer")
        if attest.qualified_signer != ak.name() and (
            attest.qualified_signer not in ak.qualified_names()
        ):
            raise QualifiedSignerError(
                f"qualifiedSigner {_short(attest.qualified_signer)} is neither the AK's name "
                f"{_short(ak.name())} nor its qualified name"
            )
        self.ok(f"qualifiedSigner {_short(attest.qualified_signer)} names the AK")

        self.step("qualifying_data")
        if not hmac.compare_digest(attest.extra_data, self.q):
            raise NonceMismatchError(
                f"extraData ({len(attest.extra_data)} bytes) differs from the expected "
                f"qualifying data ({len(self.q)} bytes)"
            )
        self.ok(f"extraData equals the expected qualifying data ({len(self.q)} bytes)")

        self.step("pcr_selection")
        _check_selection(ev, policy, quote)
        self.ok(f"bank {policy.pcr_bank}, PCRs {list(policy.pcr_selection)}")

        self.step("pcr_digest")
        values = _check_pcr_digest(ev, policy, quote, sig.hash_alg)
        self.ok(
            f"{HASH_NAMES[sig.hash_alg]} over {len(values)} PCR values = {_short(quote.pcr_digest)}"
        )

        self.step("pcr_value")
        for index, expected in policy.pcr_values.items():
            if not hmac.compare_digest(values[index], expected):
                raise PcrValueError(
                    f"PCR {index} is {values[index].hex()}, the policy pins {expected.hex()}"
                )
        self.ok(
            f"pinned PCRs {sorted(policy.pcr_values)} have their values"
            + "".join(f"; PCR {i} waived: {why}" for i, why in policy.pcr_waivers.items())
        )

        self.step("event_log_format")
        records = eventlog.parse(ev.workload_event_log)
        self.ok(f"{len(records)} records")

        self.step("event_digest")
        for record in records:
            if record.pcr != policy.workload_pcr:
                raise EventDigestError(
                    f"record {record.recnum} is for PCR {record.pcr}, "
                    f"not the workload PCR {policy.workload_pcr}"
                )
            if not hmac.compare_digest(record.digest, record.event.digest()):
                raise EventDigestError(
                    f"record {record.recnum} ({record.event.event_type}) logs digest "
                    f"{record.digest.hex()}, its content hashes to {record.event.digest().hex()}"
                )
        self.ok(f"{len(records)} digests recomputed from content, all in PCR {policy.workload_pcr}")

        self.step("event_log_replay")
        workload_value = values[policy.workload_pcr]
        replayed = _replay(records, policy.pcr_bank_alg)
        if not hmac.compare_digest(replayed, workload_value):
            raise EventLogReplayError(
                f"log replays to {replayed.hex()}, PCR {policy.workload_pcr} "
                f"is {workload_value.hex()}"
            )
        self.ok(f"replays to PCR {policy.workload_pcr} = {workload_value.hex()}")

        self.step("event_sequence")
        startups = _check_sequence(records)
        self.ok(f"{len(startups)} start-up(s) of [model..., runtime]; the last is running")

        self.step("model_digest")
        for i, (models, _) in enumerate(startups):
            for role, digest in models.items():
                if digest not in policy.allowed_models(role):
                    raise ModelNotAllowedError(
                        f"start-up {i} {role} model digest {digest.hex()} is not allowed"
                    )
        running = ", ".join(f"{role} {digest.hex()}" for role, digest in startups[-1][0].items())
        self.ok(f"model digests allowed: {running}")

        self.step("runtime_event")
        allowed_runtimes = set(policy.allowed_runtime_events)
        for i, (_, runtime) in enumerate(startups):
            runtime_hash = sha256(runtime.event.data)
            if runtime_hash not in allowed_runtimes:
                raise RuntimeNotAllowedError(
                    f"start-up {i} runtime event {runtime_hash.hex()} is not allowed"
                )
        self.ok(f"runtime event {sha256(startups[-1][1].event.data).hex()} allowed")

        self.step("session_ttl")
        ttl = self.ttl
        if ttl is None:  # a key broker request (Sentinel): no session is being opened
            self.ok("no session: nothing to check")
        elif isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
            raise SessionTtlError(f"session TTL {ttl!r} is not a positive integer")
        elif ttl > policy.max_session_ttl_seconds:
            raise SessionTtlError(
                f"session TTL {ttl} s exceeds the policy's {policy.max_session_ttl_seconds} s"
            )
        else:
            self.ok(f"session TTL {ttl} s <= {policy.max_session_ttl_seconds} s")

        models, runtime = startups[-1]
        return VerifiedAttestation(
            ak_fingerprint=fingerprint,
            workload_pcr=policy.workload_pcr,
            workload_pcr_value=workload_value,
            models=MappingProxyType(dict(models)),
            runtime_event=json.loads(runtime.event.data),
            events=list(records),
            attest_digest=sha256(ev.quote_attest),
            clock=attest.clock,
            reset_count=attest.reset_count,
            restart_count=attest.restart_count,
            firmware_version=attest.firmware_version,
            pcr_values=dict(values),
            policy_digest=policy_digest(policy),
            report=list(self.report),
            hardware_binding=hardware.binding,
            trust_note=hardware.note,
        )

    # --- AK trust -------------------------------------------------------------------------

    def _ak_trust(
        self, ev: Evidence, policy: Policy, spki: bytes, fingerprint: str, hardware: _Hardware
    ) -> str:
        """A pin, a certificate chain to the policy's roots (plus the GCE identity pin), or
        Azure's paravisor binding; nothing else. A guest-chosen report never vouches."""
        if spki in policy.pinned_public_keys:
            return f"AK {fingerprint} is pinned by the policy"
        if policy.certificate_roots and ev.ak_certificate_chain:
            root = check_certificate_chain(
                ev.ak_certificate_chain, policy.certificate_roots, spki, policy.gce is not None
            )
            identity = check_gce_identity(ev.ak_certificate_chain[0], policy.gce)
            return f"AK {fingerprint} certified by a chain to root {root}{identity}"
        if hardware.ak_bound:
            return f"AK {fingerprint} bound by the {hardware.binding}"
        why = "is not pinned by the policy"
        if policy.certificate_roots:
            why += " and no certificate chain came with it"
        if ev.hardware_kind and ev.hardware_report:
            why += (
                f"; a {ev.hardware_kind} report's REPORT_DATA is chosen by the guest, so it "
                "does not vouch for the AK"
            )
        raise AkUntrustedError(f"AK {fingerprint} {why}")

    # --- the hardware report ------------------------------------------------------------

    def _hardware(self, ev: Evidence, policy: Policy, ak_spki: bytes) -> _Hardware:
        """Checks 2a-2j (docs/ATTESTATION.md, "Hardware binding")."""
        platform = policy.platform
        kind = ev.hardware_kind
        if platform is None and not kind:
            return _Hardware(False, "", _VTPM_ONLY_NOTE)  # a vTPM-only policy: no extra step
        self.step("hardware_platform")
        if kind == KIND_SEV:
            raise PlainSevRefusedError("plain SEV without SNP has no signed report: refused")
        if platform is None:
            self.ok(
                "the policy names no platform: vTPM-only evidence"
                + (f" (the {kind} report is not checked)" if kind else "")
            )
            return _Hardware(False, "", _VTPM_ONLY_NOTE)
        if not kind or not ev.hardware_report:
            if platform.production:
                raise HardwareBindingRequiredError(
                    "the production policy requires a hardware report binding the evidence; "
                    "this evidence is vTPM only"
                )
            self.ok(f"no hardware report; the dev policy ({platform.kind}) accepts vTPM only")
            return _Hardware(False, "", _VTPM_ONLY_NOTE)
        expected = {"azure-sev-snp": KIND_AZURE_HCL, "sev-snp": KIND_SEV_SNP, "tdx": KIND_TDX}
        if kind != expected[platform.kind]:
            raise PlatformMismatchError(
                f"the evidence carries a {kind!r} report, the policy's platform "
                f"{platform.kind} needs {expected[platform.kind]!r}"
            )
        if kind == KIND_TDX:
            raise HardwareReportFormatError(
                "TDX quote verification is not implemented (docs/DEPLOY.md)"
            )
        self.ok(f"{kind} report for platform {platform.kind}")

        self.step("hardware_report_parse")
        hcl = None
        if kind == KIND_AZURE_HCL:
            hcl = azure_hcl.parse_hcl_report(ev.hardware_report)
            if hcl.report_type != azure_hcl.REPORT_TYPE_SNP:
                raise PlatformMismatchError("the HCL report holds a TDX report, not SEV-SNP")
            report = sev_snp.parse_report(hcl.hardware_report)
            self.ok(
                f"HCL report v{hcl.version}: SEV-SNP report v{report.version} and "
                f"{len(hcl.runtime_claims)} bytes of runtime claims"
            )
        else:
            report = sev_snp.parse_report(ev.hardware_report)
            self.ok(f"SEV-SNP report v{report.version}")

        self.step("hardware_chain")
        chain = sev_snp.verify_vcek_chain(ev.hardware_certificate_chain, platform.amd_roots)
        self.ok(f"VCEK -> ASK -> ARK {chain.ark_subject}")

        self.step("hardware_signature")
        sev_snp.verify_report_signature(report, chain.vcek)
        sev_snp.check_vcek_matches(report, chain)
        self.ok("ECDSA P-384/SHA-384 by the VCEK for this chip and REPORTED_TCB")

        self.step("report_data")
        if hcl is not None:
            want = hcl.expected_report_data()
            what = f"{azure_hcl.HASH_TYPES[hcl.hash_type]}(runtime claims)"
        else:
            want = session_report_data(self.q, ev.ak_public)
            what = "SHA-512(E(report data, Q, AK))"
        if not hmac.compare_digest(report.report_data, want):
            raise ReportDataMismatchError(f"REPORT_DATA is not {what}")
        if hcl is not None:
            self.ok(f"REPORT_DATA = {what}, written by the paravisor at VMPL 0")
        else:
            self.ok(
                f"REPORT_DATA = {what}: proves only that some SEV-SNP guest with this launch "
                "measurement holds this session key (on GCP, whose firmware measurement every "
                "tenant shares: some GCP confidential guest holds this session key); the "
                "guest chose REPORT_DATA, so it does not vouch for the AK"
            )

        if hcl is not None:
            self.step("runtime_claims")
            claims = azure_hcl.parse_runtime_claims(hcl.runtime_claims)
            if not hmac.compare_digest(claims.ak_spki, ak_spki):
                raise RuntimeClaimsError("the AK in the runtime claims is not the quoting AK")
            for claim, required in platform.azure_claims.items():
                actual = claims.vm_configuration.get(claim)
                if actual is not required:
                    raise RuntimeClaimsError(
                        f"runtime claim {claim} is {actual!r}, the policy requires {required}"
                    )
            self.ok(
                "the runtime claims carry the quoting AK (HCLAkPub)"
                + "".join(f", {k}={v}" for k, v in platform.azure_claims.items())
            )

        self.step("hardware_debug")
        if report.debug and not platform.allow_debug:
            raise DebugEnabledError("the guest policy allows debug (bit 19): refused")
        self.ok(f"guest policy 0x{report.policy:x}: debug {'on' if report.debug else 'off'}")

        self.step("hardware_vmpl")
        # Azure: only the paravisor at VMPL 0 writes the AK into the claims REPORT_DATA
        # hashes; from any other VMPL the guest chose it. So 0, whatever the policy says.
        wanted_vmpl = 0 if hcl is not None else platform.vmpl
        if wanted_vmpl is not None and report.vmpl != wanted_vmpl:
            raise VmplError(f"report from VMPL {report.vmpl}, the policy requires {wanted_vmpl}")
        self.ok(f"VMPL {report.vmpl}")

        self.step("hardware_measurement")
        if platform.measurements and report.measurement not in platform.measurements:
            raise MeasurementNotAllowedError(
                f"launch measurement {report.measurement.hex()} is not allowed"
            )
        self.ok(f"measurement {report.measurement.hex()}")

        self.step("hardware_tcb")
        min_tcb = platform.min_tcb or sev_snp.TcbVersion(0, 0, 0, 0)
        low = report.reported_tcb.below(min_tcb)
        if low:
            raise TcbTooLowError(
                f"REPORTED_TCB ({report.reported_tcb}) is below the policy's "
                f"({min_tcb}) in {', '.join(low)}"
            )
        self.ok(f"REPORTED_TCB ({report.reported_tcb}) >= ({min_tcb})")

        if hcl is not None:
            binding = "Azure HCL report (SEV-SNP)"
            note = _AZURE_NOTE
        else:
            binding = "SEV-SNP report (configfs-tsm): session key only"
            note = _HOST_VTPM_NOTE
        self.step("trust")
        self.ok(note)
        # Only Azure's paravisor, pinned by its measurement, writes the AK into REPORT_DATA.
        return _Hardware(hcl is not None and bool(platform.measurements), binding, note)


@dataclass(frozen=True)
class _Hardware:
    ak_bound: bool
    binding: str
    note: str


_VTPM_ONLY_NOTE = (
    "vTPM only: whoever runs the vTPM (possibly the hypervisor) could forge this evidence"
)
_AZURE_NOTE = (
    "the SEV-SNP report binds the AK through Azure's runtime claims; the vTPM runs in "
    "Azure's paravisor (HCL) inside the guest at VMPL0, covered by the pinned measurement; "
    "Microsoft stays trusted for the paravisor's code"
)
_HOST_VTPM_NOTE = (
    "the SEV-SNP report proves only that some guest with the pinned launch measurement (on "
    "GCP: some GCP confidential guest) holds this session key; the AK is trusted by its pin "
    "or certificate chain; the vTPM and its PCRs are run by the host (on GCP: Google), which "
    "stays trusted for the PCR values"
)


# --- steps ------------------------------------------------------------------------------


def _replay(records: list[eventlog.EventRecord], bank_alg: int) -> bytes:
    """Replay the log in the quoted bank: SHA-256 uses the logged (and checked) digests;
    another bank extends H_bank(measured bytes) of each event, as a TPM extending all banks
    with the event would."""
    if bank_alg == 0x000B:
        return eventlog.replay(records)
    value = bytes(HASH_SIZES[bank_alg])
    for record in records:
        value = hash_bytes(bank_alg, value + hash_bytes(bank_alg, record.event.measured_bytes()))
    return value


def _key_desc(ak: AkPublic) -> str:
    if ak.type == TPM_ALG_ECC:
        return f"ECC {'P-256' if ak.curve == 0x0003 else 'P-384'} key"
    return f"RSA {ak.rsa_key_bits} key"


def _sig_desc(sig: Signature) -> str:
    names = {TPM_ALG_ECDSA: "ECDSA", TPM_ALG_RSASSA: "RSASSA", TPM_ALG_RSAPSS: "RSAPSS"}
    return f"{names[sig.sig_alg]}-{HASH_NAMES[sig.hash_alg].upper()}"


def _check_ak_attributes(ak: AkPublic) -> None:
    required = {
        "restricted": RESTRICTED,
        "sign": SIGN_ENCRYPT,
        "fixedTPM": FIXED_TPM,
        "fixedParent": FIXED_PARENT,
    }
    missing = [name for name, bit in required.items() if not ak.has(bit)]
    if missing:
        raise AkAttributesError(f"objectAttributes 0x{ak.attributes:08x} lack {', '.join(missing)}")
    if ak.has(DECRYPT):
        raise AkAttributesError(f"objectAttributes 0x{ak.attributes:08x} allow decrypt")
    if ak.symmetric.algorithm != TPM_ALG_NULL:
        raise AkAttributesError("a signing key must have a NULL symmetric algorithm")
    if ak.scheme == TPM_ALG_NULL:
        raise AkAttributesError("a restricted signing key must fix its signing scheme")


def check_certificate_chain(
    chain: tuple[bytes, ...], roots: tuple[bytes, ...], ak_spki: bytes, gce_pinned: bool
) -> str:
    """Validate chain (leaf first) to one of roots; return the root's subject."""
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as err:
        raise AkUntrustedError("the AK certificate chain does not parse as DER") from err
    leaf = certs[0]
    try:
        leaf_spki = leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, UnsupportedAlgorithm) as err:
        raise AkUntrustedError("the AK certificate's public key is not readable") from err
    if leaf_spki != ak_spki:
        raise AkUntrustedError("the AK certificate is for another key")
    store = x509_verification.Store([x509.load_der_x509_certificate(r) for r in roots])
    verifier = (
        x509_verification.PolicyBuilder()
        .store(store)
        .extension_policies(
            ca_policy=x509_verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=x509_verification.ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, certs[1:])
    except x509_verification.VerificationError as err:
        raise AkUntrustedError(f"the AK certificate chain does not validate: {err}") from err
    google = [c for c in verified.chain if gce.is_google_certificate(c)]
    if google and not gce_pinned:
        raise AkUntrustedError(
            "the AK certificate chain runs through Google's vTPM CA; the policy must pin the "
            "GCE project (ak.gce)"
        )
    return verified.chain[-1].subject.rfc4514_string()


def check_gce_identity(leaf_der: bytes, pin: GcePin | None) -> str:
    """The GCE instance identity in the AK certificate must match the policy's pin; a GCE
    certificate under a policy without a pin is refused (Google's CA certifies everyone)."""
    try:
        identity = gce.identity_of(leaf_der)
    except gce.GceIdentityFormatError as err:
        raise AkUntrustedError(f"the AK certificate's GCE identity does not parse: {err}") from err
    if pin is None:
        if identity is not None:
            raise AkUntrustedError(
                "the AK certificate is a GCE one; the policy must pin the project (ak.gce)"
            )
        return ""
    if identity is None:
        raise AkUntrustedError("the AK certificate carries no GCE instance identity")
    if not identity.is_production:
        raise AkUntrustedError("the AK certificate's GCE identity is not marked production")
    for name, wanted in pin.pinned().items():
        actual = getattr(identity, name)
        if actual != wanted:
            raise AkUntrustedError(
                f"the AK certificate is for GCE {name} {actual!r}, the policy pins {wanted!r}"
            )
    return f", GCE project {identity.project_id} ({identity.project_number})" + (
        f" instance {identity.instance_name} ({identity.instance_id}) in {identity.zone}"
    )


def _policy_summary(policy: Policy) -> str:
    platform = policy.platform
    kind = "vTPM-only" if platform is None else platform.kind
    mode = "production" if policy.production else "dev"
    waived = "".join(f"; PCR {i} waived: {why}" for i, why in policy.pcr_waivers.items())
    return f"complete {mode} policy ({kind}){waived}"


def _check_scheme(ak: AkPublic, sig: Signature) -> None:
    fits = (
        sig.sig_alg == TPM_ALG_ECDSA
        if ak.type == TPM_ALG_ECC
        else sig.sig_alg
        in (
            TPM_ALG_RSASSA,
            TPM_ALG_RSAPSS,
        )
    )
    if not fits:
        raise SignatureError(f"{_sig_desc(sig)} does not fit a {_key_desc(ak)}")
    if sig.sig_alg != ak.scheme or sig.hash_alg != ak.scheme_hash:
        raise SignatureError(f"{_sig_desc(sig)} is not the key's own scheme")


def _verify_signature(
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, sig: Signature, message: bytes
) -> None:
    hash_alg = _HASHES[sig.hash_alg]()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            der = encode_dss_signature(int.from_bytes(sig.r, "big"), int.from_bytes(sig.s, "big"))
            key.verify(der, message, ec.ECDSA(hash_alg))
        elif sig.sig_alg == TPM_ALG_RSASSA:
            if len(sig.rsa_signature) != key.key_size // 8:
                raise SignatureError("RSA signature length differs from the modulus length")
            key.verify(sig.rsa_signature, message, padding.PKCS1v15(), hash_alg)
        else:
            if len(sig.rsa_signature) != key.key_size // 8:
                raise SignatureError("RSA signature length differs from the modulus length")
            pss = padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=padding.PSS.AUTO)
            key.verify(sig.rsa_signature, message, pss, hash_alg)
    except InvalidSignature as err:
        raise SignatureError(f"{_sig_desc(sig)} does not verify over TPMS_ATTEST") from err


def _check_selection(ev: Evidence, policy: Policy, quote: QuoteInfo) -> None:
    banks = quote.pcr_select
    if any(b.hash_alg == TPM_ALG_SHA1 for b in banks) or ev.pcr_hash_algorithm == TPM_ALG_SHA1:
        raise PcrSelectionError("a SHA-1 PCR bank is refused")
    if ev.pcr_hash_algorithm != policy.pcr_bank_alg:
        raise PcrSelectionError(
            f"evidence bank 0x{ev.pcr_hash_algorithm:04x} is not the policy's {policy.pcr_bank}"
        )
    if len(banks) != 1 or banks[0].hash_alg != policy.pcr_bank_alg:
        quoted = [(HASH_NAMES.get(b.hash_alg, hex(b.hash_alg)), list(b.indices)) for b in banks]
        raise PcrSelectionError(f"quoted banks {quoted} are not exactly {policy.pcr_bank}")
    if banks[0].indices != policy.pcr_selection:
        raise PcrSelectionError(
            f"quoted PCRs {list(banks[0].indices)} differ from the policy's "
            f"{list(policy.pcr_selection)}"
        )


def _check_pcr_digest(
    ev: Evidence, policy: Policy, quote: QuoteInfo, digest_alg: int
) -> dict[int, bytes]:
    values = ev.pcr_values
    if not isinstance(values, Mapping) or set(values) != set(policy.pcr_selection):
        shipped = sorted(values) if isinstance(values, Mapping) else "?"
        raise PcrDigestError(
            f"shipped PCR values {shipped} do not cover exactly {list(policy.pcr_selection)}"
        )
    size = HASH_SIZES[policy.pcr_bank_alg]
    for index in policy.pcr_selection:
        value = values[index]
        if not isinstance(value, bytes) or len(value) != size:
            raise PcrDigestError(f"PCR {index} value is not {size} bytes")
    computed = hash_bytes(digest_alg, b"".join(values[i] for i in policy.pcr_selection))
    if not hmac.compare_digest(computed, quote.pcr_digest):
        raise PcrDigestError(
            f"pcrDigest {_short(quote.pcr_digest)} does not match the shipped values "
            f"({_short(computed)})"
        )
    return {i: values[i] for i in policy.pcr_selection}


def _check_sequence(
    records: list[eventlog.EventRecord],
) -> list[tuple[dict[str, bytes], eventlog.EventRecord]]:
    """Split the log into start-ups: model events (roles in MODEL_ROLES order, none twice,
    at least one), then one runtime event."""
    if not records:
        raise EventSequenceError("the log has no start-up")
    startups: list[tuple[dict[str, bytes], eventlog.EventRecord]] = []
    models: dict[str, bytes] = {}
    for record in records:
        n = len(startups)
        if record.event.event_type == eventlog.EVENT_MODEL:
            try:
                role, digest = eventlog.parse_model_event(record.event.data)
            except EventLogFormatError as err:
                raise EventSequenceError(f"start-up {n}: {err}") from None
            order = eventlog.MODEL_ROLES.index(role)
            if any(eventlog.MODEL_ROLES.index(seen) >= order for seen in models):
                raise EventSequenceError(f"start-up {n} measures {role!r} out of order or twice")
            models[role] = digest
            continue
        if not models:
            raise EventSequenceError(f"start-up {n} has no model event before its runtime event")
        _check_runtime(record, n)
        startups.append((models, record))
        models = {}
    if models:
        raise EventSequenceError(f"start-up {len(startups)} ends without its runtime event")
    return startups


def _check_runtime(runtime: eventlog.EventRecord, n: int) -> None:
    if runtime.event.event_type != eventlog.EVENT_RUNTIME:
        raise EventSequenceError(f"start-up {n} has {runtime.event.event_type!r} there")
    try:
        parsed = json.loads(runtime.event.data)
    except (UnicodeDecodeError, ValueError) as err:
        raise EventSequenceError(f"start-up {n} runtime event is not JSON") from err
    if not isinstance(parsed, dict) or eventlog.canonical_json(parsed) != runtime.event.data:
        raise EventSequenceError(f"start-up {n} runtime event is not a canonical JSON object")


__all__ = [
    "CheckResult",
    "VerifiedAttestation",
    "ak_fingerprint",
    "check_certificate_chain",
    "check_gce_identity",
    "format_report",
    "spki_der",
    "verify",
    "verify_with_report",
]
