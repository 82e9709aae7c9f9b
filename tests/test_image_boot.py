"""The measured VM image, end to end: built from this checkout by deploy/image/build-vm.sh, its
boot PCRs predicted offline by `encloud policy from-image`, booted by deploy/image/run-vm.sh
(QEMU q35, OVMF, swtpm as the vTPM; TCG here), and attested from outside through the forwarded
port. Then the two tamper cases: one byte of the root file system (the boot stops at
dm-verity) and one byte of the UKI's command line (the server boots, and the client refuses it,
naming PCR 4). Never skipped: ./dev installs QEMU, OVMF and the build tools.

What the policy pins, and where each value comes from:
- PCRs 0-14 (10 excepted): predicted from the image's files and the committed OVMF reference,
  before any boot;
- the AK: read from the swtpm state before the boot (`encloud tpm ak`), as a cloud's AK API
  gives it for a VM;
- the runtime event: from the booted server's evidence, standing in for the event an image's
  publisher records on its reference machine (it holds the CPU feature class, under TCG
  QEMU's). The verifier checks the workload PCR against the event log that holds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stack import free_port

from encloud.cli.reference import boot_pcrs
from encloud.client import NO_AUDIT, Client
from encloud.protocol.errors import PcrValueError
from encloud.protocol.policy import Policy, load_policy

pytestmark = [pytest.mark.image_boot, pytest.mark.timeout(3000)]

ROOT = Path(__file__).parent.parent
ENCLOUD = str(ROOT / ".venv" / "bin" / "encloud")
FIRMWARE_REFERENCE = ROOT / "deploy" / "image" / "ovmf-reference.json"
# Under TCG systemd is up in ~90 s and the server serves some minutes later; a boot that has
# not served in this long is a failure, with the console's tail in the message.
SERVING_DEADLINE_S = 1500.0
PANIC_DEADLINE_S = 600.0


@pytest.fixture(scope="module")
def image(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("mmdebstrap", "qemu-system-x86_64", "swtpm"):
        assert shutil.which(tool), f"{tool} is not installed (./dev installs it)"
    out = tmp_path_factory.mktemp("image")
    started = time.monotonic()
    _build(model_dir, out)
    print(f"\nimage built in {time.monotonic() - started:.0f} s")
    return out


def _build(model_dir: Path, out: Path) -> None:
    built = subprocess.run(
        [str(ROOT / "deploy" / "image" / "build-vm.sh"), str(model_dir), str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
    )
    assert built.returncode == 0, built.stderr[-3000:]


@dataclass
class Vm:
    process: subprocess.Popen[bytes]
    state: Path
    address: str

    @property
    def console(self) -> str:
        path = self.state / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def _booted(image_dir: Path, state: Path) -> Iterator[Vm]:
    """run-vm.sh in the background, as the docs run it; killed with its swtpm on exit."""
    port = free_port()
    with (state.parent / f"{state.name}.out").open("wb") as out:
        process = subprocess.Popen(
            [str(ROOT / "deploy" / "image" / "run-vm.sh"), str(image_dir), str(state), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
    vm = Vm(process, state, f"127.0.0.1:{port}")
    try:
        yield vm
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _wait_serving(vm: Vm) -> float:
    """Seconds from now until the server in `vm` reports SERVING on grpc.health.v1."""
    started = time.monotonic()
    with grpc.insecure_channel(vm.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert vm.process.poll() is None, f"the VM stopped:\n{vm.console[-3000:]}"
            assert time.monotonic() - started < SERVING_DEADLINE_S, (
                f"not serving after {SERVING_DEADLINE_S:.0f} s:\n{vm.console[-3000:]}"
            )
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            time.sleep(2)


def _ak_before_boot(state: Path) -> Path:
    (state / "tpm").mkdir(parents=True, mode=0o700)
    pem = state.parent / f"{state.name}-ak.pem"
    ran = subprocess.run(
        [ENCLOUD, "tpm", "ak", "--state", str(state / "tpm"), "-o", str(pem)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    return pem


def _reference_boot(vm: Vm, folder: Path) -> tuple[Path, bytes]:
    """What an image's publisher records from a reference boot, as docs/DEPLOY.md runs it
    (`policy init --runtime-event-out`): the runtime event the server measured, as a file, and
    the AK the server quoted with (SPKI DER)."""
    event = folder / "runtime-event.json"
    args = ["policy", "init", "--target", vm.address, "-o", str(folder / "dev-policy.json")]
    ran = subprocess.run(
        [ENCLOUD, *args, "--runtime-event-out", str(event)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    (quoted,) = load_policy(folder / "dev-policy.json").pinned_public_keys
    return event, quoted


def _policy_from_image(image_dir: Path, runtime: Path, ak: Path, out: Path) -> Policy:
    args = ["policy", "from-image", str(image_dir), "-o", str(out)]
    args += ["--firmware-reference", str(FIRMWARE_REFERENCE)]
    args += ["--runtime-event", str(runtime), "--ak-pin", str(ak)]
    ran = subprocess.run(
        [ENCLOUD, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    checked = subprocess.run(
        [ENCLOUD, "policy", "check", str(out), "--production-except-hardware"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return load_policy(out)


def _spki(pem: Path) -> bytes:
    from encloud.cli.reference import read_pinned_key

    return read_pinned_key(pem)


def _ask(vm: Vm, policy: Policy) -> str:
    with Client(vm.address, policy, audit_log=NO_AUDIT, timeout=600) as client:
        stream = client.stream([("user", "Name a colour.")], max_new_tokens=8, seed=1)
        text = "".join(stream)
        assert stream.completion is not None
    return text


def _copy_image(image_dir: Path, into: Path) -> Path:
    """A copy to tamper with: hard links, except the file about to change."""
    into.mkdir()
    for f in image_dir.iterdir():
        os.link(f, into / f.name)
    return into


def _replace(path: Path) -> bytearray:
    data = bytearray(path.read_bytes())
    path.unlink()  # a hard link to the original: write a new file, never through the link
    return data


# --- the image as built ------------------------------------------------------------------


REFERENCE = json.loads(FIRMWARE_REFERENCE.read_text())


@pytest.fixture(scope="module")
def predicted(image: Path) -> dict[int, bytes]:
    """Every boot PCR, from the files alone: nothing has booted yet."""
    firmware = REFERENCE["firmware"]
    installed = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", firmware["package"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Another OVMF build measures other firmware PCRs: say so, rather than fail on PCR 0 later.
    assert installed == firmware["version"], (
        f"{firmware['package']} {installed} is installed; {FIRMWARE_REFERENCE.name} was recorded "
        f"with {firmware['version']}: record a new reference (docs/ATTESTATION.md)"
    )
    values = _predict(image / "uki.efi")
    assert sorted(values) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14]
    return values


def _predict(uki: Path) -> dict[int, bytes]:
    return boot_pcrs(uki.read_bytes(), REFERENCE)


def test_the_booted_image_verifies_under_its_predicted_policy_and_streams(
    image: Path, predicted: dict[int, bytes], tmp_path: Path
) -> None:
    state = tmp_path / "vm"
    ak = _ak_before_boot(state)
    with _booted(image, state) as vm:
        print(f"\nserving {_wait_serving(vm):.0f} s after the boot started")
        runtime, quoted_ak = _reference_boot(vm, tmp_path)
        assert quoted_ak == _spki(ak), "the server quotes with the AK read before the boot"
        policy = _policy_from_image(image, runtime, ak, tmp_path / "policy.json")
        assert policy.pcr_values == predicted
        assert _ask(vm, policy).strip()


# --- the tamper cases -----------------------------------------------------------------------


@pytest.mark.attack
def test_attack_one_byte_of_the_root_file_system_stops_the_boot_at_dm_verity(
    image: Path, tmp_path: Path
) -> None:
    tampered = _copy_image(image, tmp_path / "tampered")
    root = tampered / "root.squashfs"
    data = _replace(root)
    data[200] ^= 0x01  # in the squashfs superblock's block: read when the root is mounted
    root.write_bytes(bytes(data))
    state = tmp_path / "vm"
    with _booted(tampered, state) as vm:
        vm.process.wait(timeout=PANIC_DEADLINE_S)
        console = vm.console
    # The untampered image boots (the first test): the byte is what stops this one.
    corrupted = re.search(r"device-mapper: verity: [\d:]+: data block 0 is corrupted", console)
    assert corrupted, console[-3000:]
    assert "Kernel panic - not syncing: dm-verity device corrupted" in console


@pytest.mark.attack
def test_attack_one_byte_of_the_command_line_boots_but_fails_verification_on_pcr_4(
    image: Path, predicted: dict[int, bytes], tmp_path: Path
) -> None:
    tampered = _copy_image(image, tmp_path / "tampered")
    uki = tampered / "uki.efi"
    data = _replace(uki)
    cmdline = json.loads((image / "image.json").read_text())["cmdline"].encode()
    at = data.find(cmdline)
    assert at > 0 and data.find(cmdline, at + 1) == -1, "the .cmdline section, once"
    at += cmdline.rindex(b"quiet") + 4
    data[at] = ord("T")  # "quiet" -> "quieT": still a valid command line
    uki.write_bytes(bytes(data))
    esp = tampered / "esp.img"
    shutil.copyfile(image / "esp.img", esp.with_suffix(".new"))
    esp.unlink()
    esp.with_suffix(".new").rename(esp)
    subprocess.run(
        ["mcopy", "-o", "-i", str(esp), str(uki), "::/EFI/BOOT/BOOTX64.EFI"],
        check=True,
        timeout=60,
    )
    # The prediction sees the change before any boot: the UKI's hash (4), the command line
    # (9) and the section (11).
    changed = {i for i, v in _predict(uki).items() if predicted[i] != v}
    assert changed == {4, 9, 11}

    state = tmp_path / "vm"
    ak = _ak_before_boot(state)
    with _booted(tampered, state) as vm:
        _wait_serving(vm)
        runtime, _ = _reference_boot(vm, tmp_path)
        policy = _policy_from_image(image, runtime, ak, tmp_path / "policy.json")
        with pytest.raises(PcrValueError, match="PCR 4 is") as refused:
            _ask(vm, policy)
        assert predicted[4].hex()[:8] in str(refused.value)
        # The tampered image's own prediction is what it quotes: the prediction is exact.
        own = _policy_from_image(tampered, runtime, ak, tmp_path / "own-policy.json")
        assert _ask(vm, own).strip()


# --- reproducibility ------------------------------------------------------------------------


def test_a_second_build_of_the_same_tree_gives_the_same_root_hash_and_pcrs(
    image: Path, model_dir: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    _build(model_dir, again)
    first = json.loads((image / "image.json").read_text())
    second = json.loads((again / "image.json").read_text())
    assert second["verity_root_hash"] == first["verity_root_hash"]
    # uki.efi, root.squashfs and root.verity byte for byte (esp.img is not measured: mtools
    # stamps its directories with the clock).
    assert second["sha256"] == first["sha256"]
    assert _predict(again / "uki.efi") == _predict(image / "uki.efi")
