"""Google's vTPM AK certificates: the instance identity they carry, and Google's CA.

Google's vTPM "EK/AK CA" certifies the AK of every Compute Engine VM of every
customer, so a chain to it proves only "some GCE vTPM holds this key". What
tells your VM from anyone else's is the instance-identity extension (OID
1.3.6.1.4.1.11129.2.1.21) in the AK certificate, DER:

    SEQUENCE {
      zone UTF8String, projectNumber INTEGER, projectId UTF8String,
      instanceId INTEGER, instanceName UTF8String,
      [0] EXPLICIT SEQUENCE {                      -- security properties, optional
        [0] EXPLICIT INTEGER securityVersion OPTIONAL,
        [1] EXPLICIT BOOLEAN isProduction OPTIONAL } OPTIONAL }

(the layout go-tpm-tools reads in `GetGCEInstanceInfo`). A policy whose AK
roots include Google's CA must pin the project, and may pin the instance.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

GCE_IDENTITY_OID = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.1.21")
GOOGLE_ORGANIZATION = "Google LLC"


class GceIdentityFormatError(ValueError):
    """The instance-identity extension does not parse as the layout above."""


@dataclass(frozen=True)
class GceIdentity:
    zone: str
    project_number: int
    project_id: str
    instance_id: int
    instance_name: str
    is_production: bool
    """False when Google marked the VM's security properties as non-production (or left
    them out); go-tpm-tools then ignores the identity, and so do we."""


def is_google_root(der: bytes) -> bool:
    """True when a root certificate names Google as its organisation (Google's vTPM CA).

    A policy naming such a root must pin the GCE project (encloud.protocol.policy)."""
    return is_google_certificate(x509.load_der_x509_certificate(der))


def is_google_certificate(cert: x509.Certificate) -> bool:
    """True when a certificate's subject names Google as its organisation."""
    names = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return any(str(a.value) == GOOGLE_ORGANIZATION for a in names)


def identity_of(certificate_der: bytes) -> GceIdentity | None:
    """The GCE instance identity of a certificate, or None when it has no such extension."""
    cert = x509.load_der_x509_certificate(certificate_der)
    try:
        ext = cert.extensions.get_extension_for_oid(GCE_IDENTITY_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise GceIdentityFormatError("the GCE identity extension is not raw DER")
    return parse_identity(value.value)


def parse_identity(der: bytes) -> GceIdentity:
    """Parse the extension's DER value strictly (definite lengths, no trailing bytes)."""
    body, rest = _take(der, 0x30)
    if rest:
        raise GceIdentityFormatError("trailing bytes after the identity")
    zone, body = _utf8(body)
    project_number, body = _integer(body)
    project_id, body = _utf8(body)
    instance_id, body = _integer(body)
    instance_name, body = _utf8(body)
    is_production = False
    if body:
        wrapped, body = _take(body, 0xA0)
        props, tail = _take(wrapped, 0x30)
        if tail:
            raise GceIdentityFormatError("trailing bytes after the security properties")
        if props and props[0] == 0xA0:
            version, props = _take(props, 0xA0)
            _, extra = _integer(version)
            if extra:
                raise GceIdentityFormatError("malformed securityVersion")
        if props and props[0] == 0xA1:
            flag, props = _take(props, 0xA1)
            value, extra = _take(flag, 0x01)
            if extra or value not in (b"\x00", b"\xff"):
                raise GceIdentityFormatError("malformed isProduction")
            is_production = value == b"\xff"
        # Google adds properties [2], [3], ... (e.g. tpmDataAlwaysEncrypted): well-formed
        # ones are skipped, as Go's encoding/asn1 (go-tpm-tools) skips what it does not know.
        _skip_elements(props)
    _skip_elements(body)  # fields Google may append after the security properties
    return GceIdentity(zone, project_number, project_id, instance_id, instance_name, is_production)


def _skip_elements(data: bytes) -> None:
    """Check that `data` is a sequence of well-formed DER elements, and ignore them."""
    while data:
        _, data = _take(data, data[0])


def _take(data: bytes, tag: int) -> tuple[bytes, bytes]:
    """(content, rest) of one DER element with `tag`."""
    if len(data) < 2 or data[0] != tag:
        raise GceIdentityFormatError(f"expected DER tag 0x{tag:02x}")
    length, offset = data[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            raise GceIdentityFormatError("bad DER length")
        length = int.from_bytes(data[2 : 2 + count], "big")
        offset = 2 + count
        if length < 0x80 or data[2] == 0:
            raise GceIdentityFormatError("non-minimal DER length")
    if len(data) < offset + length:
        raise GceIdentityFormatError("DER element runs past its container")
    return data[offset : offset + length], data[offset + length :]


def _utf8(data: bytes) -> tuple[str, bytes]:
    content, rest = _take(data, 0x0C)
    try:
        return content.decode("utf-8"), rest
    except UnicodeDecodeError as err:
        raise GceIdentityFormatError("a string field is not UTF-8") from err


def _integer(data: bytes) -> tuple[int, bytes]:
    content, rest = _take(data, 0x02)
    if not content or (len(content) > 1 and content[0] == (0xFF if content[1] & 0x80 else 0)):
        raise GceIdentityFormatError("non-minimal DER integer")
    if len(content) > 9:
        raise GceIdentityFormatError("integer too large")
    return int.from_bytes(content, "big", signed=True), rest
