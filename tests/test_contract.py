"""The contract and the code hygiene: generated stubs fresh, buf lint, ruff."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lint

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "tools" / "node_modules" / ".bin" / "buf"


@pytest.mark.parametrize("stubs", ["v2", "sentinel/v1"])
def test_codegen_output_is_committed_and_fresh(tmp_path: Path, stubs: str) -> None:
    """Running codegen.sh must not change protocol/v2 or protocol/sentinel/v1."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", copy / "proto")
    for folder in ("v2", "sentinel/v1"):
        shutil.copytree(ROOT / "protocol" / folder, copy / "protocol" / folder)
    shutil.copy(ROOT / "codegen.sh", copy / "codegen.sh")
    subprocess.run(
        ["bash", str(copy / "codegen.sh")],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    fresh = copy / "protocol" / stubs
    committed = ROOT / "protocol" / stubs
    names = sorted(p.name for p in committed.glob("*_pb2*"))
    assert names == sorted(p.name for p in fresh.glob("*_pb2*"))
    assert names, "no generated stubs found"
    _, mismatch, errors = filecmp.cmpfiles(committed, fresh, names, shallow=False)
    assert not mismatch and not errors, f"codegen.sh would change {mismatch + errors}"


def test_buf_lint_standard_is_clean() -> None:
    if not BUF.exists():
        pytest.fail("buf is missing: run ./dev setup (installs tools/ from npm)")
    result = subprocess.run(
        [str(BUF), "lint"], cwd=ROOT / "proto", capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run(
            [str(ruff), *args], cwd=ROOT, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_configuration_doc_lists_every_setting() -> None:
    from encloud.server.settings import configuration_markdown

    doc = (ROOT / "docs" / "CONFIGURATION.md").read_text()
    assert doc == configuration_markdown(), "regenerate docs/CONFIGURATION.md"


def test_client_package_type_checks(tmp_path: Path) -> None:
    """mypy over encloud.protocol, encloud.client and encloud.broker, laid out as the import
    packages."""
    (tmp_path / "encloud").mkdir()
    for name in ("protocol", "client", "broker"):
        (tmp_path / "encloud" / name).symlink_to(ROOT / name)
    mypy = Path(sys.executable).with_name("mypy")
    result = subprocess.run(
        [
            str(mypy),
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "encloud/protocol",
            "encloud/client",
            "encloud/broker",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
