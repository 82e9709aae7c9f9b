"""Boot PCRs of the measured VM image (deploy/image/build-vm.sh), predicted from its files
without booting it.

What each PCR holds on this image's boot path (OVMF -> the UKI as the ESP's default
BOOTX64.EFI -> systemd-stub 252 -> Linux), SHA-256 bank, each value a chain of extends from 32
zero bytes (docs/ATTESTATION.md, "The measured image"):

- **4** (boot loader code), by the firmware: the ``EV_EFI_ACTION`` "Calling EFI Application
  from Boot Option", the ``EV_SEPARATOR``, then the Authenticode hash of every PE image it loads:
  the UKI, then the kernel that systemd-stub loads from its ``.linux`` section.
- **7** (Secure Boot state), by the firmware: the ``EV_EFI_VARIABLE_DRIVER_CONFIG`` of
  SecureBoot, PK, KEK, db and dbx as the firmware's variable store holds them, then the
  ``EV_SEPARATOR``.
- **11** (kernel image), by systemd-stub: for each UKI section present, in the stub's order
  (.linux, .osrel, .cmdline, .initrd, .splash, .dtb), the section's name with its NUL, then its
  contents; then, from userspace, the boot phases systemd-pcrphase extends.
- **12** (kernel parameters) and **13** (system extensions): extended by systemd-stub only for
  a command line passed by a boot loader, credentials or sysext images on the ESP; this image
  has none, so both stay zero.

Pure Python over bytes: the policy tools and the tests use it.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ZERO = bytes(32)
SEPARATOR = b"\x00\x00\x00\x00"
CALLING_EFI_APPLICATION = b"Calling EFI Application from Boot Option"
STUB_SECTIONS = (".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb")
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
SECURE_BOOT_VARIABLES = (
    (EFI_GLOBAL_VARIABLE, "SecureBoot"),
    (EFI_GLOBAL_VARIABLE, "PK"),
    (EFI_GLOBAL_VARIABLE, "KEK"),
    (EFI_IMAGE_SECURITY_DATABASE, "db"),
    (EFI_IMAGE_SECURITY_DATABASE, "dbx"),
)


class ImageFormatError(ValueError):
    """The file is not the PE image the prediction needs."""


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def extend_all(digests: Iterable[bytes], start: bytes = ZERO) -> bytes:
    value = start
    for digest in digests:
        value = sha256(value + digest)
    return value


# ---------------------------------------------------------------------- PE images


@dataclass(frozen=True)
class Section:
    name: str
    virtual_size: int
    raw_offset: int
    raw_size: int


@dataclass(frozen=True)
class PeImage:
    data: bytes
    checksum_offset: int
    cert_dir_offset: int
    cert_table: tuple[int, int]  # (file offset, size) of the attribute certificate table
    headers_size: int
    sections: tuple[Section, ...]

    def section(self, name: str) -> bytes | None:
        """A section's contents as loaded (VirtualSize bytes of its raw data)."""
        for s in self.sections:
            if s.name == name:
                size = min(s.virtual_size, s.raw_size) if s.virtual_size else s.raw_size
                return self.data[s.raw_offset : s.raw_offset + size]
        return None


def parse_pe(data: bytes) -> PeImage:
    if data[:2] != b"MZ" or len(data) < 0x40:
        raise ImageFormatError("not a PE image (no MZ header)")
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if data[pe : pe + 4] != b"PE\x00\x00":
        raise ImageFormatError("not a PE image (no PE signature)")
    n_sections, _, _, _, opt_size = struct.unpack_from("<HIIIH", data, pe + 6)
    opt = pe + 24
    magic = struct.unpack_from("<H", data, opt)[0]
    if magic == 0x20B:  # PE32+
        dirs = opt + 112
    elif magic == 0x10B:  # PE32
        dirs = opt + 96
    else:
        raise ImageFormatError(f"unknown optional header magic {magic:#x}")
    headers_size = struct.unpack_from("<I", data, opt + 60)[0]
    n_dirs = struct.unpack_from("<I", data, dirs - 4)[0]
    cert_dir = dirs + 4 * 8
    cert_table = struct.unpack_from("<II", data, cert_dir) if n_dirs > 4 else (0, 0)
    sections = []
    table = opt + opt_size
    for i in range(n_sections):
        raw = data[table + 40 * i : table + 40 * (i + 1)]
        name = raw[:8].rstrip(b"\x00").decode("ascii", "replace")
        vsize, _, rsize, roff = struct.unpack_from("<IIII", raw, 8)
        sections.append(Section(name, vsize, roff, rsize))
    return PeImage(data, opt + 64, cert_dir, cert_table, headers_size, tuple(sections))


def authenticode_sha256(data: bytes) -> bytes:
    """The PE image hash UEFI firmware measures (the Authenticode digest: headers without the
    checksum and the certificate-table entry, then each section's raw data in file order, then
    any data after the last section but before the certificate table)."""
    image = parse_pe(data)
    h = hashlib.sha256()
    h.update(data[: image.checksum_offset])
    h.update(data[image.checksum_offset + 4 : image.cert_dir_offset])
    h.update(data[image.cert_dir_offset + 8 : image.headers_size])
    hashed = image.headers_size
    for s in sorted(image.sections, key=lambda s: s.raw_offset):
        if s.raw_size:
            h.update(data[s.raw_offset : s.raw_offset + s.raw_size])
            hashed += s.raw_size
    end = len(data) - image.cert_table[1]
    if end > hashed:
        h.update(data[hashed:end])
    return h.digest()


# ---------------------------------------------------------------------- events


def uefi_variable_data(guid: uuid.UUID, name: str, value: bytes) -> bytes:
    """UEFI_VARIABLE_DATA, the structure an EV_EFI_VARIABLE_* event's digest covers."""
    encoded = name.encode("utf-16-le")
    return guid.bytes_le + struct.pack("<QQ", len(name), len(value)) + encoded + value


@dataclass(frozen=True)
class Event:
    pcr: int
    kind: str
    digest: bytes
    what: str


def boot_events(
    uki: bytes, secure_boot_variables: dict[str, bytes], phases: Sequence[str]
) -> list[Event]:
    """The events the firmware, systemd-stub and systemd-pcrphase extend into PCRs 4, 7 and 11
    when the image boots, in order per PCR. ``secure_boot_variables`` maps SecureBoot, PK,
    KEK, db and dbx to their contents in the firmware's variable store (absent: empty)."""
    image = parse_pe(uki)
    kernel = image.section(".linux")
    if kernel is None:
        raise ImageFormatError("the UKI has no .linux section")
    events = [
        Event(4, "EV_EFI_ACTION", sha256(CALLING_EFI_APPLICATION), "calling the boot option"),
        Event(4, "EV_SEPARATOR", sha256(SEPARATOR), "separator"),
        Event(4, "EV_EFI_BOOT_SERVICES_APPLICATION", authenticode_sha256(uki), "the UKI"),
        Event(4, "EV_EFI_BOOT_SERVICES_APPLICATION", authenticode_sha256(kernel), "its kernel"),
    ]
    for guid, name in SECURE_BOOT_VARIABLES:
        value = secure_boot_variables.get(name, b"")
        digest = sha256(uefi_variable_data(guid, name, value))
        events.append(Event(7, "EV_EFI_VARIABLE_DRIVER_CONFIG", digest, name))
    events.append(Event(7, "EV_SEPARATOR", sha256(SEPARATOR), "separator"))
    for name in STUB_SECTIONS:
        contents = image.section(name)
        if contents is None:
            continue
        events.append(Event(11, "EV_IPL", sha256(name.encode() + b"\x00"), f"{name} name"))
        events.append(Event(11, "EV_IPL", sha256(contents), f"{name} contents"))
    for phase in phases:
        events.append(Event(11, "pcrphase", sha256(phase.encode()), f"phase {phase}"))
    return events


def predict(
    uki: bytes, secure_boot_variables: dict[str, bytes], phases: Sequence[str]
) -> dict[int, bytes]:
    """PCRs 4, 7, 11, 12 and 13 after the image booted to the phases named."""
    events = boot_events(uki, secure_boot_variables, phases)
    out = {pcr: extend_all(e.digest for e in events if e.pcr == pcr) for pcr in (4, 7, 11)}
    out[12] = ZERO
    out[13] = ZERO
    return out


__all__ = [
    "Event",
    "ImageFormatError",
    "authenticode_sha256",
    "boot_events",
    "extend_all",
    "parse_pe",
    "predict",
    "uefi_variable_data",
]
