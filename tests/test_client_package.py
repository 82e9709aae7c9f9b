"""The client as users get it: its public API, the one attest path every caller takes, and the
wheel installed from hash-locked requirements into a clean virtual environment."""

from __future__ import annotations

import asyncio
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from clean_install import clean_venv

from encloud.client import NO_AUDIT, AsyncClient, Client, Policy
from encloud.protocol import attest

ROOT = Path(__file__).resolve().parent.parent


# --- the public API ------------------------------------------------------------------------


@pytest.mark.unit
def test_the_public_api_is_importable_from_the_package() -> None:
    import encloud.client as client

    for name in client.__all__:
        assert getattr(client, name) is not None, name
    assert (ROOT / "client" / "py.typed").exists() and (ROOT / "protocol" / "py.typed").exists()


@pytest.mark.unit
def test_no_public_method_takes_a_caller_chosen_nonce() -> None:
    for cls in (Client, AsyncClient):
        for name, member in inspect.getmembers(cls, inspect.isfunction):
            if not name.startswith("_"):
                assert "nonce" not in inspect.signature(member).parameters, (cls, name)


@pytest.mark.unit
def test_the_audit_log_is_a_required_choice(tmp_path: Path) -> None:
    from test_policy import dumps, valid_obj

    path = tmp_path / "policy.json"
    path.write_bytes(dumps(valid_obj()))
    with pytest.raises(TypeError, match="audit_log"):
        Client("127.0.0.1:1", path)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="audit_log must be a path, an AuditLog or NO_AUDIT"):
        Client("127.0.0.1:1", path, audit_log=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="policy must be a Policy or the path"):
        Client("127.0.0.1:1", 42, audit_log=NO_AUDIT)  # type: ignore[arg-type]
    with Client("127.0.0.1:1", str(path), audit_log=NO_AUDIT) as client:  # a path is a policy
        assert isinstance(client.policy, Policy)


# --- one attest path --------------------------------------------------------------------------


CLIENT_SIDE = ("client", "cli", "bench", "scripts")


@pytest.mark.lint
def test_no_client_side_module_outside_the_protocol_builds_the_suite_or_computes_q() -> None:
    pattern = re.compile(r"HpkeSuite\(|quote_qualifying_data\(")
    offenders = [
        str(path.relative_to(ROOT))
        for folder in CLIENT_SIDE
        for path in (ROOT / folder).rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert not offenders


@pytest.mark.e2e
def test_every_caller_goes_through_the_one_attest_path(
    stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.harness import BUDGETS, Bench
    from encloud.cli.loadgen import run_load
    from encloud.cli.main import main

    calls: list[str] = []
    real = attest.attest_and_release

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs["target"])
        return real(*args, **kwargs)

    monkeypatch.setattr(attest, "attest_and_release", spy)

    def took_it(caller: str) -> None:
        assert calls, f"{caller} did not go through attest_and_release"
        calls.clear()

    with Client(stack.address, stack.policy, audit_log=NO_AUDIT) as client:
        client.infer([("user", "Hi")], max_new_tokens=2)
    took_it("Client")

    async def use_async() -> None:
        async with AsyncClient(stack.address, stack.policy, audit_log=NO_AUDIT) as client:
            await client.attest()

    asyncio.run(use_async())
    took_it("AsyncClient")

    policy = tmp_path / "policy.json"
    policy.write_bytes(stack.server.policy_path.read_bytes())
    bundle = tmp_path / "bundle.json"
    args = ["attest", "--target", stack.address, "--policy", str(policy), "--save", str(bundle)]
    assert main([*args, "--audit-log", str(tmp_path / "a.jsonl")]) == 0
    assert bundle.exists()
    took_it("encloud attest --save (bundles)")

    report = asyncio.run(
        run_load(
            stack.address,
            stack.policy,
            clients=1,
            requests_per_client=1,
            max_new_tokens=2,
            audit_log=tmp_path / "load.jsonl",
        )
    )
    assert not report.errors
    assert (tmp_path / "load.jsonl").read_text().count('"event":"attestation"') == 1
    took_it("the load generator")

    bench = Bench(
        BUDGETS["tiny"],
        peers=False,
        threads=2,
        cache_root=tmp_path,
        server_settings={},
        log=lambda _: None,
    )
    bench._verify(stack.address, stack.policy)
    took_it("the benchmark")


# --- the wheel, as a user installs it ---------------------------------------------------------

USER_PROGRAM = '''\
"""A user's program, type-checked with mypy --strict against the installed wheel."""
import asyncio
import sys

from encloud.client import AsyncClient, Client, load_policy


def blocking(target: str, policy_path: str, log: str) -> str:
    with Client(target, load_policy(policy_path), audit_log=log, timeout=60.0) as client:
        attestation = client.attest()
        client.release_key()
        text = "".join(client.stream([("user", "Say hi.")], max_new_tokens=4))
        return f"{attestation.model_digest.hex()} {text!r}"


async def concurrent(target: str, policy_path: str, log: str) -> str:
    async with AsyncClient(target, policy_path, audit_log=log) as client:
        answer = await client.infer([("user", "Say hi.")], max_new_tokens=4)
        pieces = [p async for p in client.stream([("user", "Again.")], max_new_tokens=4)]
        return f"{answer.completion.finish_reason} {''.join(pieces)!r}"


if __name__ == "__main__":
    target, policy_path, log = sys.argv[1:4]
    print("sync", blocking(target, policy_path, log))
    print("async", asyncio.run(concurrent(target, policy_path, log)))
'''


@pytest.mark.e2e
def test_the_wheel_in_a_clean_venv_type_checks_and_talks_to_the_server(
    stack, tmp_path: Path
) -> None:
    venv = clean_venv(tmp_path, "client.lock")
    python, env = venv.python, venv.env
    installed = venv.installed()
    for heavy in ("onnxruntime", "tpm2-pytss", "torch", "transformers", "pytest"):
        assert f"{heavy}==" not in installed, heavy

    program = tmp_path / "program.py"
    program.write_text(USER_PROGRAM)
    mypy = Path(sys.executable).with_name("mypy")
    checked = subprocess.run(
        [str(mypy), "--strict", "--no-incremental", "--python-executable", python, str(program)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    policy = tmp_path / "policy.json"
    policy.write_bytes(stack.server.policy_path.read_bytes())
    ran = subprocess.run(
        [python, str(program), stack.address, str(policy), str(tmp_path / "audit.jsonl")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0].startswith("sync " + stack.policy.allowed_model_digests[0].hex())
    assert lines[1].startswith("async ")
    assert (tmp_path / "audit.jsonl").read_text().count('"outcome":"pass"') == 2

    # The client commands of the CLI work without the server's packages.
    checked_cli = subprocess.run(
        [venv.bin("encloud"), "policy", "check", str(policy)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked_cli.returncode == 0, checked_cli.stdout + checked_cli.stderr
    assert "complete dev policy" in checked_cli.stdout


@pytest.mark.e2e
def test_the_readme_example_runs(stack, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    policy = tmp_path / "policy.json"
    policy.write_bytes(stack.server.policy_path.read_bytes())
    program = example.replace("cvm.example.com:50051", stack.address).replace(
        '"policy.json"', repr(str(policy))
    )
    assert program != example
    ran = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip()  # the streamed answer
    assert (tmp_path / "audit.jsonl").read_text().count('"outcome":"pass"') == 1
