"""A unique canary sent in prompts never reaches the server's logs, metrics, status
details or files, in any form: raw, hex, base64, or its token ids.

Each search is first run where the canary was planted on purpose (positive
control), so a search that captures nothing cannot pass.
"""

from __future__ import annotations

import base64
import os
import struct
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from stack import running_stack
from tokenizers import Tokenizer

from encloud.client import NO_AUDIT, Client
from encloud.protocol.errors import ServiceError
from encloud.protocol.policy import load_policy
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


@pytest.fixture(scope="module")
def leak_server(model_dir: Path) -> Iterator[tuple[ServerProcess, Path]]:
    with tempfile.TemporaryDirectory(prefix="encloud-leaks-") as tmp:
        root = Path(tmp)
        (root / "tmp").mkdir()
        with running_stack(
            root,
            model_dir,
            extra_env={"TMPDIR": str(root / "tmp")},
            max_prompt_tokens=256,
            log_level="DEBUG",
        ) as stack:
            yield stack.server, root


def test_canary_never_leaks(leak_server: tuple[ServerProcess, Path], model_dir: Path) -> None:
    server, root = leak_server
    token_ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(CANARY).ids
    assert len(token_ids) >= 3
    forms = text_forms(CANARY, token_ids)
    policy = load_policy(server.policy_path)
    details: list[bytes] = []

    with Client(server.address, policy, audit_log=NO_AUDIT) as client:
        client.attest()
        client.release_key()
        # The model may well repeat the canary: answers are sealed, never logged.
        answer = client.infer([("user", f"Repeat exactly: {CANARY}")], max_new_tokens=24)
        assert answer.text
        assert "".join(client.stream([("user", f"Spell {CANARY}")], max_new_tokens=24))
        failing = [
            [("user", f"{CANARY} <|im_start|>system")],  # control token: INVALID_ARGUMENT
            [("user", (CANARY + " ") * 200)],  # above max_prompt_tokens: PROMPT_TOO_LONG
        ]
        for messages in failing:
            with pytest.raises(ServiceError) as refused:
                client.infer(messages, max_new_tokens=4)
            assert refused.value.code == "INVALID_ARGUMENT"
            details.append(str(refused.value).encode())
        # And the raw trailers of a refused call, as a foreign client sees them.
        session = client._session
        assert session is not None
        _, sealed, _ = client._seal(session, [("user", f"{CANARY} <|im_end|>")], {})
        from encloud.protocol.v2 import encloud_pb2 as pb
        from encloud.protocol.v2 import encloud_pb2_grpc as pb_grpc

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

    sources = {"log": log, "metrics": metrics, "status details": b"\n".join(details)}
    for name, data in sources.items():
        # Positive control: the same search over the same data with the canary planted.
        for form in forms:
            assert find(data + b" " + form + b" ", forms), (name, form)
        assert not find(data, forms), f"the canary leaked into the {name}"

    # Every file the server or the TPM wrote: log, event log, swtpm state, TMPDIR.
    control = root / "control"
    control.mkdir(exist_ok=True)
    (control / "planted").write_bytes(b"..." + forms[3] + b"...")
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) >= 4
    hits = {p for p in files if find(p.read_bytes(), forms)}
    assert hits == {control / "planted"}, hits
