"""The layering of docs/ARCHITECTURE.md, as import-linter contracts (pyproject.toml), and proof
that the contracts are live: a module planted in a copy of the tree breaks them."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.lint

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "protocol": "protocol",
    "client": "client",
    "proxy": "proxy",
    "cli": "cli",
    "server": "server",
    "broker": "broker",
}


def _lint(packages_root: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over the encloud packages found under `packages_root` only.

    `python -S` keeps the editable install's import hook (a .pth file) out, so `encloud.*`
    resolves to the copy; site-packages is put back after it for import-linter itself."""
    site = sysconfig.get_paths()["purelib"]
    code = "import sys; from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run(
        [sys.executable, "-S", "-c", code, "--config", str(config), "--no-cache"],
        cwd=packages_root,
        env={"PYTHONPATH": f"{packages_root}:{site}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for name, folder in PACKAGES.items():
        shutil.copytree(
            ROOT / folder,
            root / "encloud" / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.onnx*"),
        )
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_import_contracts_hold(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    result = _lint(tree, tree / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_server_contract_names_every_module_above_attestation_and_inference() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [
        c
        for c in config["contracts"]
        if c["name"].startswith("attestation and inference never import the server")
    ]
    modules = {
        f"encloud.server.{m.name}"
        for m in pkgutil.iter_modules([str(ROOT / "server")])
        if m.name not in ("attestation", "inference")
    }
    assert set(contract["forbidden_modules"]) == modules


@pytest.mark.parametrize(
    ("where", "imports", "contract"),
    [
        ("protocol/_planted.py", "import encloud.client", "protocol imports nothing else"),
        ("client/_planted.py", "import encloud.server.settings", "client imports the protocol"),
        ("server/_planted.py", "from encloud.client import Client", "server imports the protocol"),
        ("proxy/_planted.py", "import encloud.server.app", "proxy builds on the client"),
        ("client/_planted.py", "import encloud.proxy", "client imports the protocol"),
        ("broker/_planted.py", "import encloud.client.sentinel", "broker (Sentinel) builds on"),
        ("broker/_planted.py", "from encloud.server import core", "broker (Sentinel) builds on"),
        ("server/_planted.py", "import encloud.broker.store", "server imports the protocol"),
        (
            "server/attestation/_planted.py",
            "import encloud.server.inference.engine",
            "attestation and inference never import each other",
        ),
        (
            "server/inference/_planted.py",
            "from encloud.server import settings",
            "attestation and inference never import the server above them",
        ),
    ],
)
def test_a_planted_violation_breaks_its_contract(
    tmp_path: Path, where: str, imports: str, contract: str
) -> None:
    tree = _copy_tree(tmp_path)
    (tree / "encloud" / where).write_text(f'"""Planted by the test."""\n\n{imports}\n')
    result = _lint(tree, tree / "pyproject.toml")
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and "_planted" in broken, result.stdout
