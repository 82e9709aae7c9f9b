"""Fixtures that reproduce cloud CVM layouts byte for byte, signed by TEST roots only.

- a test "AMD" hierarchy: ARK and ASK are RSA-4096 certificates signed with
  RSASSA-PSS/SHA-384 (as AMD's are), the VCEK an ECDSA P-384 key carrying AMD's TCB
  and hwID extensions; the subjects say TEST, so no production policy accepts them
  unless a test passes the root to its own policy object (`unsafe_test_roots`);
- SEV-SNP ATTESTATION_REPORTs laid out per AMD's SEV-SNP ABI (0x4A0 bytes, signature
  at 0x2A0, R and S little-endian, 72 bytes each), written independently of the
  client's parser;
- Azure HCL reports (header, SNP report, IGVM request data, runtime claims JSON);
- swtpm provisioning for the Azure and GCP NV layouts;
- a fake configfs-tsm report folder backed by a FIFO (see FakeTsm).
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import json
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

AZURE_AK_HANDLE = 0x81000003
AZURE_AK_CERT_NV = 0x01C101D0
AZURE_HCL_REPORT_NV = 0x01400001
GCP_AK_CERT_RSA_NV, GCP_AK_TEMPLATE_RSA_NV = 0x01C10000, 0x01C10001
GCP_AK_CERT_ECC_NV, GCP_AK_TEMPLATE_ECC_NV = 0x01C10002, 0x01C10003

MEASUREMENT = bytes(range(48))
CHIP_ID = hashlib.sha512(b"test chip").digest()
TCB = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
# SEV-SNP guest policy: ABI 0.31... minimal: reserved bit 17 set, SMT allowed.
GUEST_POLICY = (1 << 17) | (1 << 16)
DEBUG_BIT = 1 << 19

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "encloud TEST fixtures (not AMD)"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _der_int(v: int) -> bytes:
    body = v.to_bytes(1, "big") if v < 0x80 else b"\0" + v.to_bytes(1, "big")
    return b"\x02" + bytes([len(body)]) + body


def tcb_u64(t: dict[str, int]) -> int:
    return int.from_bytes(
        bytes([t["bootloader"], t["tee"], 0, 0, 0, 0, t["snp"], t["microcode"]]), "little"
    )


@dataclass
class AmdHierarchy:
    ark_key: rsa.RSAPrivateKey
    ark: x509.Certificate
    ask_key: rsa.RSAPrivateKey
    ask: x509.Certificate

    def ark_der(self) -> bytes:
        return self.ark.public_bytes(serialization.Encoding.DER)

    def ark_pem(self) -> str:
        return self.ark.public_bytes(serialization.Encoding.PEM).decode()

    def vcek(
        self,
        key: ec.EllipticCurvePrivateKey,
        tcb: dict[str, int] | None = None,
        chip_id: bytes = CHIP_ID,
        signer: rsa.RSAPrivateKey | None = None,
    ) -> x509.Certificate:
        tcb = tcb or TCB
        now = datetime.datetime.now(datetime.UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(_name("SEV-VCEK"))
            .issuer_name(self.ask.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
        )
        for oid, value in (
            ("1.3.6.1.4.1.3704.1.3.1", tcb["bootloader"]),
            ("1.3.6.1.4.1.3704.1.3.2", tcb["tee"]),
            ("1.3.6.1.4.1.3704.1.3.3", tcb["snp"]),
            ("1.3.6.1.4.1.3704.1.3.8", tcb["microcode"]),
        ):
            b = b.add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), _der_int(value)), False
            )
        b = b.add_extension(
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4"), b"\x04\x40" + chip_id
            ),
            False,
        )
        return b.sign(signer or self.ask_key, hashes.SHA384(), rsa_padding=_PSS)


def _ca(subject: str, key: rsa.RSAPrivateKey, issuer: x509.Name, signer: rsa.RSAPrivateKey):
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(signer, hashes.SHA384(), rsa_padding=_PSS)
    )


def make_hierarchy(name: str = "Test") -> AmdHierarchy:
    ark_key = rsa.generate_private_key(65537, 4096)
    ask_key = rsa.generate_private_key(65537, 4096)
    ark = _ca(f"ARK-{name}", ark_key, _name(f"ARK-{name}"), ark_key)
    ask = _ca(f"SEV-{name}", ask_key, ark.subject, ark_key)
    return AmdHierarchy(ark_key, ark, ask_key, ask)


@functools.lru_cache(maxsize=2)
def hierarchy(name: str = "Test") -> AmdHierarchy:
    """One cached hierarchy per name (RSA-4096 key generation takes a second)."""
    return make_hierarchy(name)


@functools.lru_cache(maxsize=1)
def vcek_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


# --- SEV-SNP report ---------------------------------------------------------------------


def snp_report(
    signer: ec.EllipticCurvePrivateKey,
    *,
    report_data: bytes = bytes(64),
    measurement: bytes = MEASUREMENT,
    policy: int = GUEST_POLICY,
    vmpl: int = 0,
    tcb: dict[str, int] | None = None,
    chip_id: bytes = CHIP_ID,
    version: int = 2,
    signing_key: int = 0,
) -> bytes:
    """A signed ATTESTATION_REPORT (AMD SEV-SNP ABI, table 'ATTESTATION_REPORT')."""
    t = tcb_u64(tcb or TCB)
    r = bytearray(0x4A0)
    struct.pack_into("<IIQ", r, 0x00, version, 1, policy)  # VERSION, GUEST_SVN, POLICY
    r[0x10:0x20] = b"F" * 16  # FAMILY_ID
    r[0x20:0x30] = b"I" * 16  # IMAGE_ID
    struct.pack_into("<IIQQ", r, 0x30, vmpl, 1, t, 0x3)  # VMPL, SIG_ALGO, CURRENT_TCB, PLAT
    struct.pack_into("<I", r, 0x48, signing_key << 2)
    r[0x50:0x90] = report_data.ljust(64, b"\0")
    r[0x90:0xC0] = measurement
    r[0xC0:0xE0] = b"H" * 32  # HOST_DATA
    r[0x140:0x160] = hashlib.sha256(b"report id").digest()
    struct.pack_into("<Q", r, 0x180, t)  # REPORTED_TCB
    r[0x1A0:0x1E0] = chip_id
    struct.pack_into("<Q", r, 0x1E0, t)  # COMMITTED_TCB
    r[0x1E8:0x1EB] = bytes([21, 55, 1])  # current build, minor, major
    r[0x1EC:0x1EF] = bytes([21, 55, 1])
    struct.pack_into("<Q", r, 0x1F0, t)  # LAUNCH_TCB
    der = signer.sign(bytes(r[:0x2A0]), ec.ECDSA(hashes.SHA384()))
    rr, ss = decode_dss_signature(der)
    r[0x2A0:0x2E8] = rr.to_bytes(72, "little")
    r[0x2E8:0x330] = ss.to_bytes(72, "little")
    return bytes(r)


def vcek_chain(h: AmdHierarchy, vcek: x509.Certificate, with_ark: bool = True) -> tuple[bytes, ...]:
    certs = [vcek, h.ask] + ([h.ark] if with_ark else [])
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)


# --- Azure ------------------------------------------------------------------------------


def _b64url(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwk(public_key: Any, kid: str) -> dict[str, Any]:
    if isinstance(public_key, rsa.RSAPublicKey):
        nums = public_key.public_numbers()
        return {
            "kid": kid,
            "key_ops": ["sign"],
            "kty": "RSA",
            "e": _b64url(nums.e),
            "n": _b64url(nums.n),
        }
    nums = public_key.public_numbers()
    crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[public_key.curve.name]
    return {
        "kid": kid,
        "key_ops": ["sign"],
        "kty": "EC",
        "crv": crv,
        "x": _b64url(nums.x),
        "y": _b64url(nums.y),
    }


def runtime_claims(ak_public_key: Any, *, ek: Any = None, **config: Any) -> bytes:
    """Runtime claims as Azure's HCL writes them (JSON; keys HCLAkPub, HCLEkPub).

    Azure's EK is RSA-2048; swtpm's NV indices hold at most 2048 bytes, so the end-to-end
    fixture passes a P-256 EK to fit the whole HCL report in one index."""
    ek = ek or _rsa_ek()
    vm_config = {
        "console-enabled": False,
        "root-cert-thumbprint": "test",
        "secure-boot": True,
        "tpm-enabled": True,
        "tpm-persisted": True,
        "vmUniqueId": "00000000-0000-0000-0000-000000000001",
    }
    vm_config.update(config)
    claims = {
        "keys": [jwk(ak_public_key, "HCLAkPub"), jwk(ek, "HCLEkPub")],
        "vm-configuration": vm_config,
        "user-data": "00" * 64,
    }
    return json.dumps(claims, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=1)
def _rsa_ek() -> rsa.RSAPublicKey:
    return rsa.generate_private_key(65537, 2048).public_key()


def hcl_report(snp: bytes, claims: bytes, *, report_type: int = 2, hash_type: int = 1) -> bytes:
    """ATTESTATION_HEADER | hw report (1184-byte field) | IGVM_REQUEST_DATA | claims."""
    header = struct.pack("<5I12x", 0x414C4348, 2, len(snp), 2, 0)
    hw = snp.ljust(1184, b"\0")
    request = struct.pack("<5I", 20 + len(claims), 1, report_type, hash_type, len(claims))
    return header + hw + request + claims


def azure_hcl(
    ak_public_key: Any,
    *,
    h: AmdHierarchy | None = None,
    claims: bytes | None = None,
    report_data: bytes | None = None,
    **report_kwargs: Any,
) -> tuple[bytes, tuple[bytes, ...]]:
    """An HCL report binding `ak_public_key`, and the VCEK chain that signs it."""
    h = h or hierarchy()
    claims = claims if claims is not None else runtime_claims(ak_public_key)
    data = report_data if report_data is not None else hashlib.sha256(claims).digest()
    key = vcek_key()
    report = snp_report(key, report_data=data, **report_kwargs)
    return hcl_report(report, claims), vcek_chain(h, h.vcek(key, report_kwargs.get("tcb")))


def platform_policy(
    kind: str = "azure-sev-snp",
    *,
    production: bool = False,
    h: AmdHierarchy | None = None,
    **extra: Any,
) -> dict[str, Any]:
    h = h or hierarchy()
    obj: dict[str, Any] = {
        "kind": kind,
        "production": production,
        "amd_roots": [h.ark_pem()],
        "measurements": [MEASUREMENT.hex()],
        "min_tcb": dict(TCB),
        "vmpl": 0,
    }
    if kind == "azure-sev-snp":
        obj["azure"] = {"secure_boot": True, "tpm_enabled": True, "console_enabled": False}
    obj.update(extra)
    return obj


# --- fake configfs-tsm ----------------------------------------------------------------


@dataclass
class FakeTsm:
    """A configfs-tsm report folder whose `outblob` is a FIFO served by a thread.

    The kernel computes outblob when it is read; here the server's read of the FIFO
    blocks until this thread, having seen the server's inblob, writes a signed report.
    `make_report(inblob) -> outblob` decides what comes back (tests break it).
    """

    root: Path
    make_report: Callable[[bytes], bytes]
    provider: str = "sev_guest"
    entry_name: str = "encloud"
    served: list[bytes] = field(default_factory=list)
    _stop: bool = False
    _thread: threading.Thread | None = None

    @property
    def entry(self) -> Path:
        return self.root / self.entry_name

    def start(self) -> FakeTsm:
        self.entry.mkdir(parents=True, exist_ok=True)
        (self.entry / "inblob").write_bytes(b"")
        (self.entry / "provider").write_text(self.provider + "\n")
        (self.entry / "generation").write_text("0\n")
        (self.entry / "privlevel").write_text("0\n")
        os.mkfifo(self.entry / "outblob")
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        # A FIFO writer that reopens at once would find the last reader still there and
        # serve twice; so each report waits for a new inblob (the server writes inblob,
        # then opens outblob, after it closed the previous outblob).
        generation = 0
        inblob = self.entry / "inblob"
        seen = (inblob.stat().st_mtime_ns, b"")
        while not self._stop:
            current = (inblob.stat().st_mtime_ns, inblob.read_bytes())
            if current == seen or not current[1]:
                time.sleep(0.002)
                continue
            seen = current
            with open(self.entry / "outblob", "wb") as out:  # blocks until the reader opens
                if self._stop:
                    return
                generation += 1
                tmp = self.entry / ".generation.tmp"
                tmp.write_text(f"{generation}\n")
                tmp.replace(self.entry / "generation")  # atomically, as configfs reads are
                self.served.append(current[1])
                out.write(self.make_report(current[1]))

    def stop(self) -> None:
        self._stop = True
        try:  # unblock the writer's open() with a reader of our own
            fd = os.open(self.entry / "outblob", os.O_RDONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass


# --- GCE vTPM AK certificates -------------------------------------------------------------

GCE_IDENTITY_OID = "1.3.6.1.4.1.11129.2.1.21"
"""Google's instance-identity extension in GCE vTPM EK/AK certificates."""
GCE_IDENTITY = {
    "zone": "europe-west4-a",
    "project_number": 123456789012,
    "project_id": "encloud-prod",
    "instance_id": 4242424242424242424,
    "instance_name": "encloud-cvm-1",
}


def _der(tag: int, body: bytes) -> bytes:
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _der_integer(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def gce_instance_info(
    *,
    zone: str,
    project_number: int,
    project_id: str,
    instance_id: int,
    instance_name: str,
    is_production: bool | None = True,
) -> bytes:
    """The extension's DER value, as go-tpm-tools' gceInstanceInfo marshals it: SEQUENCE {
    zone UTF8String, projectNumber INTEGER, projectId UTF8String, instanceId INTEGER,
    instanceName UTF8String, [0] EXPLICIT SEQUENCE { [0] securityVersion INTEGER OPTIONAL,
    [1] isProduction BOOLEAN OPTIONAL } OPTIONAL }."""
    body = (
        _der(0x0C, zone.encode())
        + _der_integer(project_number)
        + _der(0x0C, project_id.encode())
        + _der_integer(instance_id)
        + _der(0x0C, instance_name.encode())
    )
    if is_production is not None:
        props = _der(0xA0, _der_integer(0)) + _der(
            0xA1, _der(0x01, b"\xff" if is_production else b"\x00")
        )
        body += _der(0xA0, _der(0x30, props))
    return _der(0x30, body)


@functools.lru_cache(maxsize=1)
def _gce_ca_keys() -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePrivateKey]:
    return ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())


def _gce_name(cn: str) -> x509.Name:
    # Google's vTPM CA names itself O=Google LLC; this TEST root imitates the name only.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Google LLC"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Google Cloud"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _gce_cert(
    subject: x509.Name,
    public_key: Any,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    extension: bytes | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    if extension is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(GCE_IDENTITY_OID), extension),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


@functools.lru_cache(maxsize=1)
def gce_ca() -> tuple[x509.Certificate, x509.Certificate]:
    """A TEST 'EK/AK CA Root' and 'EK/AK CA Intermediate' named like Google's vTPM CA."""
    root_key, inter_key = _gce_ca_keys()
    root_name = _gce_name("EK/AK CA Root (encloud TEST)")
    inter_name = _gce_name("EK/AK CA Intermediate (encloud TEST)")
    root = _gce_cert(root_name, root_key.public_key(), root_name, root_key, ca=True)
    inter = _gce_cert(inter_name, inter_key.public_key(), root_name, root_key, ca=True)
    return root, inter


def gce_root_der() -> bytes:
    return gce_ca()[0].public_bytes(serialization.Encoding.DER)


def gce_ak_chain(
    ak_public_key: Any, *, is_production: bool | None = True, **identity: Any
) -> tuple[bytes, ...]:
    """AK leaf (with the instance-identity extension) then the intermediate, DER."""
    _, inter = gce_ca()
    _, inter_key = _gce_ca_keys()
    info = gce_instance_info(**{**GCE_IDENTITY, **identity}, is_production=is_production)
    leaf = _gce_cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "encloud-cvm-1 AK")]),
        ak_public_key,
        inter.subject,
        inter_key,
        ca=False,
        extension=info,
    )
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in (leaf, inter))


# --- complete production policies -------------------------------------------------------------


def production_policy(
    base: Any,
    pcr_values: dict[int, bytes],
    kind: str = "azure-sev-snp",
    *,
    pinned_public_keys: tuple[bytes, ...] = (),
    roots: tuple[bytes, ...] = (),
    gce: dict[str, Any] | None = None,
    waivers: dict[int, str] | None = None,
    test_roots: tuple[bytes, ...] | None = None,
    **platform_extra: Any,
) -> Any:
    """A complete production policy on `base`'s selection, model and runtime: every selected
    PCR but the workload PCR and the waived ones pinned to `pcr_values`, the test AMD root
    accepted for this policy only (`unsafe_test_roots`)."""
    from encloud.protocol.policy import build_policy

    waivers = waivers or {}
    pins = {
        i: pcr_values[i] for i in base.pcr_selection if i != base.workload_pcr and i not in waivers
    }
    return build_policy(
        pcr_selection=base.pcr_selection,
        pcr_values=pins,
        pcr_waivers=waivers,
        workload_pcr=base.workload_pcr,
        allowed_model_digests=base.allowed_model_digests,
        allowed_runtime_events=base.allowed_runtime_events,
        pinned_public_keys=pinned_public_keys,
        certificate_roots=roots,
        gce=gce,
        max_session_ttl_seconds=base.max_session_ttl_seconds,
        platform=platform_policy(kind, production=True, **platform_extra),
        unsafe_test_roots=(hierarchy().ark_der(),) if test_roots is None else test_roots,
    )
