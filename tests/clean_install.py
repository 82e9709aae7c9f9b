"""The project as a user installs it: a wheel built from the project's files only, in a
clean virtual environment from a hash-locked requirements file (no ./dev, no .venv)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w"]


def build_wheel(tmp_path: Path) -> Path:
    """The encloud wheel, built from tracked and new files (never ignored ones such as a
    stale build/ folder), as from a clean clone."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    source = tmp_path / "source"
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run([*PIP_WHEEL, str(dist), str(source)], check=True, capture_output=True)
    (wheel,) = dist.glob("encloud-*.whl")
    return wheel


@dataclass
class CleanVenv:
    path: Path
    env: dict[str, str]

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")

    def bin(self, name: str) -> str:
        return str(self.path / "bin" / name)

    def pip(self, *args: str) -> None:
        result = subprocess.run(
            [self.python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def installed(self) -> str:
        """`pip list --format=freeze`, lower-cased."""
        return subprocess.run(
            [self.python, "-m", "pip", "list", "--format=freeze"],
            env=self.env,
            capture_output=True,
            text=True,
        ).stdout.lower()


def clean_venv(tmp_path: Path, lock: str) -> CleanVenv:
    """A new venv with requirements/`lock` (hash-checked) and the wheel without its deps."""
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    made = CleanVenv(venv, env)
    made.pip("--require-hashes", "-r", str(ROOT / "requirements" / lock))
    made.pip("--no-deps", str(wheel))
    return made
