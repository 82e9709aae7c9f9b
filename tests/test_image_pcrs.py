"""The offline PCR prediction's parts: the PE image hash against an independent implementation
(osslsigncode's Authenticode digest of a signed systemd-stub), and the UKI's events on a small
UKI joined by objcopy as deploy/image/build-vm.sh joins the real one. The prediction as a
whole is checked against a booted image by tests/test_image_boot.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from encloud.cli.image_pcrs import (
    CALLING_EFI_APPLICATION,
    SEPARATOR,
    ZERO,
    authenticode_sha256,
    boot_events,
    parse_pe,
    predict,
    sha256,
)

pytestmark = pytest.mark.unit

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")


def _need(path: Path) -> None:
    assert path.exists(), f"{path} is missing (./dev setup installs it)"


def test_the_image_hash_is_the_authenticode_digest(tmp_path: Path) -> None:
    _need(STUB)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=encloud test", "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    signed = tmp_path / "signed.efi"
    subprocess.run(
        ["osslsigncode", "sign", "-certs", str(tmp_path / "c.pem"), "-key",
         str(tmp_path / "k.pem"), "-in", str(STUB), "-out", str(signed)],
        check=True, capture_output=True,
    )  # fmt: skip
    report = subprocess.run(
        ["osslsigncode", "verify", "-in", str(signed)], capture_output=True, text=True
    ).stdout
    calculated = re.search(r"Calculated message digest\s*:\s*([0-9A-Fa-f]{64})", report)
    assert calculated, report
    assert authenticode_sha256(signed.read_bytes()).hex() == calculated.group(1).lower()
    # The signature is outside the hash: the unsigned and signed images differ only there.
    assert parse_pe(signed.read_bytes()).cert_table[1] > 0


def _uki(tmp_path: Path, cmdline: bytes) -> bytes:
    _need(STUB)
    parts = {".osrel": b"ID=debian\n", ".cmdline": cmdline, ".initrd": b"initrd bytes"}
    args = []
    for i, (name, data) in enumerate(parts.items()):
        path = tmp_path / name.strip(".")
        path.write_bytes(data)
        args += ["--add-section", f"{name}={path}", "--change-section-vma",
                 f"{name}={0x20000 + 0x10000 * i:#x}"]  # fmt: skip
    # The kernel section must itself be a PE image: the stub is one.
    args += ["--add-section", f".linux={STUB}", "--change-section-vma", ".linux=0x2000000"]
    out = tmp_path / "uki.efi"
    subprocess.run(["objcopy", *args, str(STUB), str(out)], check=True, capture_output=True)
    return out.read_bytes()


def test_a_ukis_events_follow_the_stub_and_the_firmware(tmp_path: Path) -> None:
    uki = _uki(tmp_path, b"root=/dev/mapper/root ro")
    events = boot_events(uki, {"SecureBoot": b"\x00"}, ["sysinit", "ready"])
    pcr11 = [e.what for e in events if e.pcr == 11]
    assert pcr11 == [
        ".linux name", ".linux contents", ".osrel name", ".osrel contents",
        ".cmdline name", ".cmdline contents", ".initrd name", ".initrd contents",
        "phase sysinit", "phase ready",
    ]  # fmt: skip
    by_what = {e.what: e.digest for e in events if e.pcr == 11}
    assert by_what[".cmdline name"] == sha256(b".cmdline\x00")
    assert by_what[".cmdline contents"] == sha256(b"root=/dev/mapper/root ro")
    assert by_what[".linux contents"] == sha256(STUB.read_bytes())
    pcr4 = [e for e in events if e.pcr == 4]
    assert pcr4[2].digest == authenticode_sha256(uki)
    assert pcr4[3].digest == authenticode_sha256(STUB.read_bytes())


def test_one_changed_command_line_byte_moves_pcrs_4_and_11_only(tmp_path: Path) -> None:
    a = predict(_uki(tmp_path, b"root=/dev/mapper/root ro"), {}, ["ready"])
    b = predict(_uki(tmp_path, b"root=/dev/mapper/root rw"), {}, ["ready"])
    assert a[4] != b[4] and a[11] != b[11]
    assert a[7] == b[7]
    assert a[12] == b[12] == ZERO and a[13] == b[13] == ZERO


def test_a_file_that_is_not_a_pe_image_is_refused() -> None:
    from encloud.cli.image_pcrs import ImageFormatError

    with pytest.raises(ImageFormatError, match="not a PE image"):
        authenticode_sha256(b"\x7fELF" + bytes(100))


def _image_dir(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A stand-in for build-vm.sh's output (a small UKI, image.json), a firmware reference,
    a runtime event and an AK key file: what `policy from-image` reads."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    image = tmp_path / "image"
    image.mkdir()
    (image / "uki.efi").write_bytes(_uki(tmp_path, b"root=/dev/mapper/root ro"))
    (image / "image.json").write_text(json.dumps({"model_digest": "ab" * 32}))
    reference = tmp_path / "ovmf.json"
    firmware = {str(i): f"{i:02x}" * 32 for i in (0, 1, 2, 3, 5, 6, 8, 9, 14)}
    reference.write_text(
        json.dumps(
            {
                "pcr_values": firmware,
                "secure_boot_variables": {"SecureBoot": "00"},
                "pcr4_before_uki": [
                    {"event": "calling", "sha256": sha256(CALLING_EFI_APPLICATION).hex()},
                    {"event": "separator", "sha256": sha256(SEPARATOR).hex()},
                ],
                "phases": ["sysinit", "ready"],
            }
        )
    )
    event = tmp_path / "runtime.json"
    event.write_text(json.dumps({"encloud": "test", "settings": {}, "engine": {}}))
    ak = tmp_path / "ak.pem"
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    ak.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return image, reference, event, ak


def test_policy_from_image_pins_the_predicted_boot_chain(tmp_path: Path, capsys) -> None:
    from encloud.cli.main import main
    from encloud.protocol.policy import load_policy

    image, reference, event, ak = _image_dir(tmp_path)
    out = tmp_path / "policy.json"
    args = ["policy", "from-image", str(image), "--firmware-reference", str(reference)]
    args += ["--runtime-event", str(event), "--ak-pin", str(ak), "-o", str(out)]
    assert main(args) == 0
    policy = load_policy(out)
    expected = predict(
        (image / "uki.efi").read_bytes(), {"SecureBoot": b"\x00"}, ["sysinit", "ready"]
    )
    for index in (4, 7, 8, 9, 11, 12, 13):
        assert policy.pcr_values[index] == expected[index]
    assert policy.pcr_values[0] == bytes.fromhex("00" * 32)  # from the firmware reference
    assert 15 not in policy.pcr_values  # the workload PCR is replayed, not pinned
    assert list(policy.allowed_model_digests) == [bytes.fromhex("ab" * 32)]
    capsys.readouterr()
    assert main(["policy", "check", str(out), "--production-except-hardware"]) == 0
    assert "complete production (every rule but the hardware report's)" in capsys.readouterr().out


def test_production_except_hardware_names_an_unpinned_boot_pcr(tmp_path: Path, capsys) -> None:
    from encloud.cli.main import main

    image, reference, event, ak = _image_dir(tmp_path)
    out = tmp_path / "policy.json"
    args = ["policy", "from-image", str(image), "--firmware-reference", str(reference)]
    assert main([*args, "--runtime-event", str(event), "--ak-pin", str(ak), "-o", str(out)]) == 0
    policy = json.loads(out.read_text())
    del policy["pcr_values"]["4"]
    out.write_text(json.dumps(policy))
    capsys.readouterr()
    assert main(["policy", "check", str(out)]) == 0  # complete as a vTPM-only policy
    assert main(["policy", "check", str(out), "--production-except-hardware"]) == 1
    assert (
        "pcr_values: PCR 4 (the boot loader and the kernel or UKI image" in capsys.readouterr().err
    )


def test_policy_from_image_with_a_broken_reference_is_one_line(tmp_path: Path, capsys) -> None:
    from encloud.cli.main import main

    image, reference, event, _ak = _image_dir(tmp_path)
    reference.write_text(json.dumps({"pcr_values": {}}))
    args = ["policy", "from-image", str(image), "--firmware-reference", str(reference)]
    code = main([*args, "--runtime-event", str(event), "-o", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "firmware reference is malformed" in err


def test_the_committed_firmware_reference_is_its_event_log_replayed() -> None:
    """deploy/image/ovmf-reference.json holds what firmware_reference reads from the recorded
    event log: the firmware PCRs replayed, PCR 4's events before the UKI, Secure Boot's state."""
    from encloud.cli.image_pcrs import firmware_reference, parse_event_log

    root = Path(__file__).resolve().parent.parent / "deploy" / "image"
    log = (root / "ovmf-reference.evlog").read_bytes()
    committed = json.loads((root / "ovmf-reference.json").read_text())
    for key, value in firmware_reference(log).items():
        assert committed[key] == value, key
    assert committed["secure_boot_variables"]["SecureBoot"] == "00"  # OVMF without Secure Boot
    events = parse_event_log(log)
    applications = [e for e in events if e.pcr == 4 and e.event_type == 0x80000003]
    assert len(applications) == 2  # the UKI, then the kernel systemd-stub loaded
