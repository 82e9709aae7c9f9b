"""The GPU lock follows the CPU one: requirements/server-gpu.lock holds server.lock's pins with
onnxruntime-gpu in place of onnxruntime (the two install the same module), every line hashed.
scripts/lock.sh writes both; this fails when one was edited or regenerated without the other."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.lint

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s\\]+)", re.MULTILINE)


def _pins(text: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(3) for m in _PIN.finditer(text)}


def _gpu_runtime() -> str:
    match = re.search(r'^ORT_GPU="([^"]+)"', (ROOT / "scripts/lock.sh").read_text(), re.MULTILINE)
    assert match, "scripts/lock.sh names the GPU runtime in ORT_GPU"
    return match.group(1)


def test_the_gpu_input_is_server_lock_with_the_gpu_runtime() -> None:
    cpu = _pins((REQ / "server.lock").read_text())
    gpu_in = _pins((REQ / "server-gpu.in").read_text())
    expected = {name: v for name, v in cpu.items() if name != "onnxruntime"}
    expected["onnxruntime-gpu"] = _gpu_runtime().split("==")[1]
    assert gpu_in == expected


def test_the_gpu_lock_resolves_those_pins_without_the_cpu_runtime() -> None:
    text = (REQ / "server-gpu.lock").read_text()
    locked = _pins(text)
    assert "onnxruntime" not in locked
    for name, version in _pins((REQ / "server-gpu.in").read_text()).items():
        assert locked.get(name) == version, name
    # The CUDA runtime the engine's device copies load (libcudart) comes with it.
    assert "nvidia-cuda-runtime" in locked
    starts = [m.start() for m in _PIN.finditer(text)] + [len(text)]
    for start, end in itertools.pairwise(starts):
        assert "--hash=sha256:" in text[start:end], text[start:end].splitlines()[0]
