"""A unique canary sent in prompts never reaches the server's logs, metrics, status
details or files, in any form: raw, hex, base64, or its token ids.

The detector's positive control is a server that really leaks (tests/leaky/leaky_server.py):
the canary goes out through a log call, an error message and a metric label, and the same
collection and search must find it in each of those places, so a detector that looks in the
wrong place, or captures nothing, fails.
"""

from __future__ import annotations

import base64
import contextlib
import os
import struct
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from stack import running_stack
from tokenizers import Tokenizer

from encloud.client import NO_AUDIT, Client
from encloud.protocol.errors import ServiceError
from encloud.protocol.policy import load_policy
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.protocol.v2 import encloud_pb2_grpc as pb_grpc
from encloud.server.devstack import ServerProcess

pytestmark = pytest.mark.leaks

CANARY = f"zqxcanary{os.urandom(6).hex()}"


def text_forms(secret: str, token_ids: list[int]) -> list[bytes]:
    raw = secret.encode()
    ids = [
        ", ".join(map(str, token_ids)).encode(),
        ",".join(map(str, token_ids)).encode(),
        " ".join(map(str, token_ids)).encode(),
        b"".join(struct.pack(">I", t) for t in token_ids),
        b"".join(struct.pack("<i", t) for t in token_ids),
        b"".join(struct.pack("<q", t) for t in token_ids),
    ]
    return [
        raw,
        raw.hex().encode(),
        raw.hex().upper().encode(),
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw),
        base64.b64encode(raw).rstrip(b"="),
        *ids,
    ]


def find(data: bytes, forms: list[bytes]) -> list[bytes]:
    return [form for form in forms if form in data]


LEAKY = Path(__file__).parent / "leaky"


def _stack(root: Path, model_dir: Path, **settings: object):
    (root / "tmp").mkdir()
    env = {"TMPDIR": str(root / "tmp")}
    extra = settings.pop("extra_env", {})
    return running_stack(
        root,
        model_dir,
        extra_env={**env, **extra},  # type: ignore[dict-item]
        max_prompt_tokens=256,
        log_level="DEBUG",
        **settings,
    )


@pytest.fixture(scope="module")
def leak_server(model_dir: Path) -> Iterator[tuple[ServerProcess, Path]]:
    with (
        tempfile.TemporaryDirectory(prefix="encloud-leaks-") as tmp,
        _stack(Path(tmp), model_dir) as stack,
    ):
        yield stack.server, Path(tmp)


@pytest.fixture(scope="module")
def leaky_server(model_dir: Path) -> Iterator[tuple[ServerProcess, Path]]:
    with tempfile.TemporaryDirectory(prefix="encloud-leaky-") as tmp:
        path = os.pathsep.join(filter(None, [str(LEAKY), os.environ.get("PYTHONPATH")]))
        with _stack(
            Path(tmp), model_dir, module="leaky_server", extra_env={"PYTHONPATH": path}
        ) as stack:
            yield stack.server, Path(tmp)


def _refused(call: Callable[[], object], codes: list[str]) -> bytes:
    """The caller's view of a refused call: its message (its code goes to `codes`)."""
    with pytest.raises(ServiceError) as refused:
        call()
    codes.append(refused.value.code)
    return str(refused.value).encode()


def exercise(server: ServerProcess, secret: str, codes: list[str]) -> dict[str, bytes]:
    """Send `secret` through every path a request takes, answered or refused; return
    everything the server shows outside the envelope: its log, its metrics and what
    refused callers saw (messages and raw trailers); the refusals' codes go to `codes`."""
    policy = load_policy(server.policy_path)
    details: list[bytes] = []
    with Client(server.address, policy, audit_log=NO_AUDIT) as client:
        client.attest()
        client.release_key()
        # The model may well repeat the canary: answers are sealed, never logged.
        with contextlib.suppress(ServiceError):
            client.infer([("user", f"Repeat exactly: {secret}")], max_new_tokens=24)
        with contextlib.suppress(ServiceError):
            "".join(client.stream([("user", f"Spell {secret}")], max_new_tokens=24))
        for messages in (
            [("user", f"{secret} <|im_start|>system")],  # control token: INVALID_ARGUMENT
            [("user", (secret + " ") * 200)],  # above max_prompt_tokens: PROMPT_TOO_LONG
        ):
            details.append(_refused(lambda m=messages: client.infer(m, max_new_tokens=4), codes))
        # And the raw trailers of a refused call, as a foreign client sees them.
        session = client._session
        assert session is not None
        _, sealed, _ = client._seal(session, [("user", f"{secret} <|im_end|>")], {})
        stub = pb_grpc.InferenceServiceStub(grpc.insecure_channel(server.address))
        with pytest.raises(grpc.RpcError) as raw:
            stub.Infer(
                pb.InferRequest(
                    session_id=session.session_id,
                    request=pb.SealedMessage(
                        type=sealed.type, request_id=sealed.request_id, sealed=sealed.data
                    ),
                ),
                timeout=30,
            )
        details.append((raw.value.details() or "").encode())
        for key, value in raw.value.trailing_metadata() or ():
            details.append(key.encode() + (value if isinstance(value, bytes) else value.encode()))
    metrics = urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10).read()
    log = server.log_path.read_bytes()
    assert b"encloud_requests_total" in metrics and b'"serving"' in log
    return {"log": log, "metrics": metrics, "status details": b"\n".join(details)}


def canary_forms(model_dir: Path, secret: str) -> list[bytes]:
    token_ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(secret).ids
    assert len(token_ids) >= 3
    return text_forms(secret, token_ids)


def test_the_detector_finds_each_real_leak(
    leaky_server: tuple[ServerProcess, Path], model_dir: Path
) -> None:
    server, _ = leaky_server
    for marker, source in (
        ("LEAK-LOG", "log"),
        ("LEAK-ERROR", "status details"),
        ("LEAK-METRIC", "metrics"),
    ):
        secret = f"zqx{marker.lower().replace('-', '')}{os.urandom(4).hex()} {marker}"
        forms = canary_forms(model_dir, secret.split()[0])
        sources = exercise(server, secret, [])
        found = {name for name, data in sources.items() if find(data, forms)}
        assert source in found, (marker, found)


def test_canary_never_leaks(leak_server: tuple[ServerProcess, Path], model_dir: Path) -> None:
    server, root = leak_server
    forms = canary_forms(model_dir, CANARY)
    codes: list[str] = []
    sources = exercise(server, CANARY, codes)
    assert codes == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    for name, data in sources.items():
        assert not find(data, forms), f"the canary leaked into the {name}"

    # Every file the server or the TPM wrote: log, event log, swtpm state, TMPDIR.
    control = root / "control"
    control.mkdir(exist_ok=True)
    (control / "planted").write_bytes(b"..." + forms[3] + b"...")
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) >= 4
    hits = {p for p in files if find(p.read_bytes(), forms)}
    assert hits == {control / "planted"}, hits


def test_refusals_quote_no_size(leak_server: tuple[ServerProcess, Path]) -> None:
    """A refusal's message is the same whatever the request's size: no figure in it."""
    server, _ = leak_server
    policy = load_policy(server.policy_path)
    with Client(server.address, policy, audit_log=NO_AUDIT) as client:
        client.attest()
        client.release_key()
        for cases in (
            [{"messages": [("user", "word " * n)], "max_new_tokens": 4} for n in (300, 900)],
            [{"messages": [("user", "Hi")], "max_new_tokens": n} for n in (3000, 9000)],
        ):
            codes: list[str] = []
            seen = [
                _refused(
                    lambda c=case: client.infer(c["messages"], max_new_tokens=c["max_new_tokens"]),
                    codes,
                )
                for case in cases
            ]
            assert codes == ["INVALID_ARGUMENT"] * 2
            assert seen[0] == seen[1], seen
            assert not any(ch.isdigit() for ch in seen[0].decode()), seen[0]
