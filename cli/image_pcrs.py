"""Boot PCRs of the measured VM image (deploy/image/build-vm.sh), predicted from its files
without booting it.

What each PCR holds on this image's boot path (OVMF -> the UKI as the ESP's default
BOOTX64.EFI -> systemd-stub 252 -> Linux), SHA-256 bank, each value a chain of extends from 32
zero bytes (docs/ATTESTATION.md, "The measured image"):

- **4** (boot loader code), by the firmware: what it extends before it loads the UKI (its
  boot attempts, each an ``EV_EFI_ACTION`` "Calling EFI Application from Boot Option", and the
  ``EV_SEPARATOR``; how many attempts precede the UKI depends on the firmware's boot options,
  so the firmware reference records these events), then the Authenticode hash of every PE
  image it loads: the UKI, then the kernel that systemd-stub loads from its ``.linux`` section.
- **7** (Secure Boot state), by the firmware: the ``EV_EFI_VARIABLE_DRIVER_CONFIG`` of
  SecureBoot, PK, KEK, db and dbx as the firmware's variable store holds them (OVMF without
  Secure Boot: SecureBoot = 00, the others empty; the firmware reference names them), then
  the ``EV_SEPARATOR``.
- **8**: written only by GRUB; zero here.
- **9** (kernel and initrd, by Linux's EFI stub, 6.1): the command line it was started with
  (systemd-stub passes ``.cmdline`` as the load options: UTF-16LE with its NUL), then the
  initrd it loads (systemd-stub serves ``.initrd``).
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
    uki: bytes,
    secure_boot_variables: dict[str, bytes],
    phases: Sequence[str],
    pcr4_before_uki: Sequence[bytes] = (sha256(CALLING_EFI_APPLICATION), sha256(SEPARATOR)),
) -> list[Event]:
    """The events the firmware, systemd-stub, Linux and systemd-pcrphase extend into PCRs 4, 7,
    9 and 11 when the image boots, in order per PCR. ``secure_boot_variables`` maps SecureBoot, PK,
    KEK, db and dbx to their contents in the firmware's variable store (absent: empty)."""
    image = parse_pe(uki)
    kernel = image.section(".linux")
    if kernel is None:
        raise ImageFormatError("the UKI has no .linux section")
    events = [Event(4, "firmware", digest, "before the UKI") for digest in pcr4_before_uki]
    events += [
        Event(4, "EV_EFI_BOOT_SERVICES_APPLICATION", authenticode_sha256(uki), "the UKI"),
        Event(4, "EV_EFI_BOOT_SERVICES_APPLICATION", authenticode_sha256(kernel), "its kernel"),
    ]
    for guid, name in SECURE_BOOT_VARIABLES:
        value = secure_boot_variables.get(name, b"")
        digest = sha256(uefi_variable_data(guid, name, value))
        events.append(Event(7, "EV_EFI_VARIABLE_DRIVER_CONFIG", digest, name))
    events.append(Event(7, "EV_SEPARATOR", sha256(SEPARATOR), "separator"))
    cmdline = image.section(".cmdline") or b""
    initrd = image.section(".initrd")
    events.append(
        Event(9, "EV_EVENT_TAG", sha256(cmdline.decode().encode("utf-16-le") + b"\0\0"), "cmdline")
    )
    if initrd is not None:
        events.append(Event(9, "EV_EVENT_TAG", sha256(initrd), "Linux initrd"))
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
    uki: bytes,
    secure_boot_variables: dict[str, bytes],
    phases: Sequence[str],
    pcr4_before_uki: Sequence[bytes] = (sha256(CALLING_EFI_APPLICATION), sha256(SEPARATOR)),
) -> dict[int, bytes]:
    """PCRs 4, 7, 8, 9, 11, 12 and 13 after the image booted to the phases named."""
    events = boot_events(uki, secure_boot_variables, phases, pcr4_before_uki)
    out = {pcr: extend_all(e.digest for e in events if e.pcr == pcr) for pcr in (4, 7, 9, 11)}
    out[8] = ZERO
    out[12] = ZERO
    out[13] = ZERO
    return out


# ---------------------------------------------------------------------- the firmware's own log

_DIGEST_SIZES = {0x0004: 20, 0x000B: 32, 0x000C: 48, 0x000D: 64, 0x0012: 32}
EV_SEPARATOR = 0x4
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
FIRMWARE_PCRS = (0, 1, 2, 3, 5, 6, 14)


@dataclass(frozen=True)
class LogEvent:
    pcr: int
    event_type: int
    sha256: bytes
    data: bytes


def parse_event_log(data: bytes) -> list[LogEvent]:
    """The TCG2 crypto-agile event log (``binary_bios_measurements``): its SHA-256 digests."""
    try:
        spec_size = struct.unpack_from("<I", data, 28)[0]
        offset, events = 32 + spec_size, []
        while offset < len(data):
            pcr, event_type, count = struct.unpack_from("<III", data, offset)
            offset += 12
            digest = b""
            for _ in range(count):
                alg = struct.unpack_from("<H", data, offset)[0]
                size = _DIGEST_SIZES[alg]
                if alg == 0x000B:
                    digest = data[offset + 2 : offset + 2 + size]
                offset += 2 + size
            size = struct.unpack_from("<I", data, offset)[0]
            events.append(LogEvent(pcr, event_type, digest, data[offset + 4 : offset + 4 + size]))
            offset += 4 + size
    except (struct.error, KeyError) as err:
        raise ImageFormatError(f"not a TCG2 crypto-agile event log: {err!r}") from err
    return events


def firmware_reference(log: bytes) -> dict:
    """What a reference boot's firmware event log fixes for every boot of the same firmware
    and machine: the firmware PCRs (replayed), PCR 4's events before the first EFI
    application, and the Secure Boot variables measured into PCR 7 (as JSON-able values)."""
    events = parse_event_log(log)
    values = {
        str(pcr): extend_all(e.sha256 for e in events if e.pcr == pcr).hex()
        for pcr in FIRMWARE_PCRS
    }
    before: list[dict[str, str]] = []
    for e in events:
        if e.pcr != 4:
            continue
        if e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION:
            break
        what = "separator" if e.event_type == EV_SEPARATOR else e.data.decode("ascii", "replace")
        before.append({"event": what, "sha256": e.sha256.hex()})
    variables = {}
    for e in events:
        if e.pcr == 7 and e.event_type == EV_EFI_VARIABLE_DRIVER_CONFIG:
            name_chars, size = struct.unpack_from("<QQ", e.data, 16)
            name = e.data[32 : 32 + 2 * name_chars].decode("utf-16-le")
            variables[name] = e.data[32 + 2 * name_chars : 32 + 2 * name_chars + size].hex()
    return {"pcr_values": values, "pcr4_before_uki": before, "secure_boot_variables": variables}


__all__ = [
    "Event",
    "ImageFormatError",
    "LogEvent",
    "authenticode_sha256",
    "boot_events",
    "extend_all",
    "firmware_reference",
    "parse_event_log",
    "parse_pe",
    "predict",
    "uefi_variable_data",
]


def main(argv: list[str] | None = None) -> int:
    """``python -m encloud.cli.image_pcrs EVENT_LOG``: the firmware reference (JSON) of a
    reference boot's ``binary_bios_measurements``."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m encloud.cli.image_pcrs EVENT_LOG", file=sys.stderr)
        return 2
    try:
        with open(args[0], "rb") as f:
            reference = firmware_reference(f.read())
    except (OSError, ImageFormatError) as err:
        print(f"image_pcrs: {err}", file=sys.stderr)
        return 1
    print(json.dumps(reference, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
