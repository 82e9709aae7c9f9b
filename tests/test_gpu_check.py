"""scripts/gpu-check's own mistakes: on a machine without a GPU it says so in one line and
exits 2 before any set-up; an unknown flag gets its usage. (Its steps are covered by the
engine tests of the CUDA export and the device store; the whole script runs on a CUDA machine,
or here with --cpu-dry-run.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.lint

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.skipif(shutil.which("nvidia-smi", path="/usr/bin:/bin") is not None, reason="GPU")
def test_without_a_gpu_it_says_so_in_one_line() -> None:
    done = _run()
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "no nvidia-smi" in done.stderr and "--cpu-dry-run" in done.stderr


def test_an_unknown_flag_gets_the_usage() -> None:
    done = _run("--gpu")
    assert done.returncode == 2
    assert done.stderr.strip() == "usage: scripts/gpu-check [--cpu-dry-run]"
