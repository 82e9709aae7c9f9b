"""The OpenAI-compatible proxy (`encloud proxy`), started as users start it, in front of a real
server on swtpm, driven by the official `openai` Python SDK (sync, async, streaming) and raw
HTTP. Every answer it passes on verified; attestation failures and tampered frames end as
OpenAI errors; local-safety rules refuse browsers and rebinding."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from relay import Relay
from stack import free_port
from waiting import samples, wait_for

from encloud.client import NO_AUDIT, Client
from encloud.protocol.errors import ServiceError
from encloud.protocol.v2 import encloud_pb2 as pb
from encloud.proxy.openai_api import OpenAIError, error_from, parse_chat_request

ENCLOUD = str(Path(sys.executable).with_name("encloud"))
ASK = [{"role": "user", "content": "Name three colours."}]
PARAMS = {"max_tokens": 24, "seed": 7}


@dataclass
class RunningProxy:
    process: subprocess.Popen[bytes]
    address: str
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://{self.address}/v1"

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0)


def _start_proxy(target: str, policy: Path, workdir: Path, *extra: str) -> RunningProxy:
    port = free_port()
    log = workdir / "proxy.log"
    args = ["proxy", "--target", target, "--policy", str(policy)]
    args += ["--listen", f"127.0.0.1:{port}", "--audit-log", str(workdir / "audit.jsonl")]
    with log.open("wb") as out:
        process = subprocess.Popen([ENCLOUD, *args, *extra], stdout=out, stderr=out)
    running = RunningProxy(process, f"127.0.0.1:{port}", log)

    def answers() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            # Any HTTP answer (a proxy with a token answers 401 here).
            return httpx.get(f"{running.base_url}/models", timeout=2).status_code in (200, 401)
        except httpx.TransportError:
            return False

    wait_for(answers, "the proxy answering")
    return running


def _stop(proxy: RunningProxy) -> None:
    proxy.process.terminate()
    assert proxy.process.wait(timeout=60) == 0, proxy.log.read_text()


@pytest.fixture(scope="module")
def proxy(stack, tmp_path_factory) -> Iterator[RunningProxy]:
    metrics_port = free_port()
    running = _start_proxy(
        stack.address,
        stack.server.policy_path,
        tmp_path_factory.mktemp("px"),
        "--metrics-port",
        str(metrics_port),
    )
    running.metrics_port = metrics_port  # type: ignore[attr-defined]
    yield running
    _stop(running)
    log = running.log.read_text()
    assert "stopped; sessions ended, keys wiped" in log
    # JSON lines only, and never a prompt or an answer.
    assert all(line.startswith("{") for line in log.splitlines() if line.strip()), log[:500]
    assert "Name three colours" not in log and "Count from one" not in log


def _wait_until_idle(stack) -> None:
    """Until the server's engine runs nothing: answers compared token for token must each run
    alone, since a batched step's logits differ from a lone row's (docs/MODEL_PIPELINE.md)."""

    def idle() -> bool:
        return samples(stack.server.metrics_address)[("encloud_running_generations", ())] == 0

    wait_for(idle, "the engine idle")


def _grpc_answer(stack, messages: list[dict], max_new_tokens: int, **params) -> tuple[str, object]:
    with Client(stack.address, stack.policy, audit_log=NO_AUDIT) as client:
        answer = client.infer(
            [(m["role"], m["content"]) for m in messages], max_new_tokens=max_new_tokens, **params
        )
    return answer.text, answer.completion


# --- the translation, unit ----------------------------------------------------------------


@pytest.mark.unit
def test_neutral_parameters_are_accepted_and_others_refused_by_name() -> None:
    ids = frozenset({"encloud"})
    body = {"model": "encloud", "messages": ASK, "n": 1, "presence_penalty": 0, "user": "u1"}
    body |= {"frequency_penalty": 0.0, "logprobs": False}
    assert parse_chat_request(body, ids).messages == [("user", "Name three colours.")]
    for name, value in (("n", 2), ("presence_penalty", 0.5), ("logprobs", True), ("tools", [{}])):
        if name == "tools":
            value = [{"type": "function"}]
        with pytest.raises(OpenAIError) as refused:
            parse_chat_request({"model": "encloud", "messages": ASK, name: value}, ids)
        assert refused.value.status == 400 and refused.value.param == name
    with pytest.raises(OpenAIError) as unknown:
        parse_chat_request({"model": "encloud", "messages": ASK, "functions": []}, ids)
    assert unknown.value.param == "functions" and unknown.value.code == "unsupported_parameter"
    with pytest.raises(OpenAIError) as model:
        parse_chat_request({"model": "gpt-4o", "messages": ASK}, ids)
    assert model.value.status == 404 and model.value.code == "model_not_found"
    parts = [{"type": "text", "text": "Name "}, {"type": "text", "text": "two."}]
    chat = parse_chat_request(
        {
            "model": "encloud",
            "messages": [{"role": "user", "content": parts}],
            "max_completion_tokens": 5,
            "stop": "x",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        ids,
    )
    assert chat.messages == [("user", "Name two.")] and chat.include_usage
    assert chat.params == {"max_new_tokens": 5, "stop": ["x"]}


@pytest.mark.unit
def test_the_status_table_and_retry_after() -> None:
    busy = error_from(ServiceError("RESOURCE_EXHAUSTED", "busy", "SERVER_BUSY", 1.2))
    assert (busy.status, busy.headers["Retry-After"]) == (429, "2")
    assert error_from(ServiceError("UNAVAILABLE", "x")).status == 503
    assert error_from(ServiceError("INVALID_ARGUMENT", "x", "PROMPT_TOO_LONG")).status == 400
    assert error_from(ServiceError("PERMISSION_DENIED", "x")).status == 502


# --- through the proxy ----------------------------------------------------------------------


@pytest.mark.proxy
def test_the_sdk_gets_the_grpc_clients_answer_and_usage(stack, proxy: RunningProxy) -> None:
    _wait_until_idle(stack)
    text, done = _grpc_answer(stack, ASK, 24, seed=7)
    reply = proxy.sdk().chat.completions.create(model="encloud", messages=ASK, **PARAMS)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == done.finish_reason  # type: ignore[attr-defined]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == done.prompt_tokens  # type: ignore[attr-defined]
    assert reply.usage.completion_tokens == done.completion_tokens  # type: ignore[attr-defined]

    pieces, usage = [], None
    for part in proxy.sdk().chat.completions.create(
        model="encloud",
        messages=ASK,
        stream=True,
        stream_options={"include_usage": True},
        **PARAMS,
    ):
        if part.choices and part.choices[0].delta.content:
            pieces.append(part.choices[0].delta.content)
        usage = part.usage or usage
    assert "".join(pieces) == text
    assert usage is not None and usage.completion_tokens == done.completion_tokens  # type: ignore[attr-defined]

    async def both() -> tuple[str, str]:
        sdk = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
        plain = await sdk.chat.completions.create(model="encloud", messages=ASK, **PARAMS)
        streamed = []
        async for part in await sdk.chat.completions.create(
            model="encloud", messages=ASK, stream=True, **PARAMS
        ):
            if part.choices and part.choices[0].delta.content:
                streamed.append(part.choices[0].delta.content)
        return plain.choices[0].message.content or "", "".join(streamed)

    assert asyncio.run(both()) == (text, text)


@pytest.mark.proxy
def test_sse_framing_byte_for_byte_and_the_evidence_headers(proxy: RunningProxy) -> None:
    body = {"model": "encloud", "messages": ASK, "stream": True, **PARAMS}
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        evidence = r.headers["x-encloud-evidence"]
        model = r.headers["x-encloud-model-digest"]
        raw = b"".join(r.iter_raw())
    assert "access-control-allow-origin" not in r.headers
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert all(e.startswith(b"data: {") for e in events[:-2])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
    assert all(
        c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks
    )

    report = httpx.get(
        f"{proxy.base_url}/encloud/attestation", params={"evidence": evidence}
    ).json()
    assert report["outcome"] == "pass" and report["model_digest"] == model
    assert report["checks"] and all(c["passed"] for c in report["checks"])
    listed = httpx.get(f"{proxy.base_url}/models").json()["data"][0]
    assert listed["id"] == "encloud" and listed["encloud"]["attested_model_digest"] == model


@pytest.mark.proxy
def test_the_proxy_metrics_count_requests_and_no_sizes(proxy: RunningProxy) -> None:
    proxy.sdk().chat.completions.create(model="encloud", messages=ASK, max_tokens=2)
    text = httpx.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics").text  # type: ignore[attr-defined]
    assert 'encloud_proxy_requests_total{route="chat_completions",status="200"}' in text
    assert "encloud_proxy_sessions" in text
    assert "token" not in text.replace("time_to_first_token", "")


@pytest.mark.proxy
def test_an_unsupported_value_is_an_sdk_bad_request_naming_it(proxy: RunningProxy) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        proxy.sdk().chat.completions.create(model="encloud", messages=ASK, n=2)
    assert refused.value.param == "n"  # type: ignore[attr-defined]


@pytest.mark.proxy
@pytest.mark.embeddings
def test_embeddings_from_a_chat_only_server_are_model_not_found(proxy: RunningProxy) -> None:
    """This server measured no embedding model: the proxy lists none, and an embeddings call
    is 404 model_not_found without a text leaving the proxy."""
    sdk = proxy.sdk()
    assert {m.id for m in sdk.models.list().data} == {"encloud"}
    policy_ok = httpx.post(
        f"{proxy.base_url}/embeddings",
        json={"model": "encloud-embeddings", "input": "x"},
        timeout=60,
    )
    assert policy_ok.status_code == 404
    assert policy_ok.json()["error"]["code"] == "model_not_found"


@pytest.mark.proxy
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Host": "attacker.example:8080"}, 403),  # DNS rebinding
        ({"Origin": "https://evil.example"}, 403),  # a web page, even a "simple" request
        ({"Content-Type": "text/plain"}, 415),
    ],
    ids=["foreign-host", "cross-origin", "text-plain"],
)
def test_local_safety_refuses(proxy: RunningProxy, headers: dict[str, str], status: int) -> None:
    body = json.dumps({"model": "encloud", "messages": ASK})
    sent = {"Content-Type": "application/json", **headers}
    reply = httpx.post(f"{proxy.base_url}/chat/completions", content=body, headers=sent)
    assert reply.status_code == status and "error" in reply.json()
    assert "access-control-allow-origin" not in reply.headers


@pytest.mark.proxy
def test_a_cross_origin_text_plain_post_is_refused(proxy: RunningProxy) -> None:
    body = json.dumps({"model": "encloud", "messages": ASK})
    headers = {"Content-Type": "text/plain", "Origin": "https://evil.example"}
    reply = httpx.post(f"{proxy.base_url}/chat/completions", content=body, headers=headers)
    assert reply.status_code in (403, 415)


@pytest.mark.proxy
def test_a_remote_listen_needs_a_flag_and_a_token(stack, tmp_path) -> None:
    args = ["proxy", "--target", stack.address, "--policy", str(stack.server.policy_path)]
    for extra, wanted in (
        (["--listen", "0.0.0.0:0"], "--allow-remote"),
        (["--listen", "0.0.0.0:0", "--allow-remote"], "needs --token"),
        (["--target", "nope"], "not host:port"),
    ):
        done = subprocess.run([ENCLOUD, *args, *extra], capture_output=True, text=True, timeout=60)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and wanted in lines[0], done.stderr


@pytest.mark.proxy
def test_a_token_is_required_when_set(stack, tmp_path) -> None:
    running = _start_proxy(stack.address, stack.server.policy_path, tmp_path, "--token", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            running.sdk().chat.completions.create(model="encloud", messages=ASK, max_tokens=2)
        sdk = openai.OpenAI(base_url=running.base_url, api_key="s3cret", max_retries=0)
        assert sdk.chat.completions.create(model="encloud", messages=ASK, max_tokens=2).choices
    finally:
        _stop(running)


@pytest.mark.proxy
@pytest.mark.attack
@pytest.mark.parametrize("wrong", ["model", "ak"])
def test_attack_a_server_that_fails_attestation_gets_no_prompt(stack, tmp_path, wrong) -> None:
    policy = json.loads(stack.server.policy_path.read_text())
    if wrong == "model":
        policy["allowed_model_digests"] = ["00" * 32]
    else:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        other = (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        import base64

        policy["ak"]["pinned_public_keys"] = [base64.b64encode(other).decode()]
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    relay = Relay(stack.address).start()
    running = _start_proxy(relay.address, path, tmp_path)
    try:
        with pytest.raises(openai.APIStatusError) as failed:
            running.sdk().chat.completions.create(model="encloud", messages=ASK, max_tokens=4)
        assert failed.value.status_code == 502
        assert failed.value.code == "attestation_failed"  # type: ignore[attr-defined]
        assert relay.of("Attest")
        for method in ("ReleaseKey", "Infer", "StreamInfer"):
            assert not relay.of(method), method  # no key, and no prompt, ever left
    finally:
        _stop(running)
        relay.stop()


@pytest.mark.proxy
@pytest.mark.attack
def test_attack_a_flipped_frame_ends_the_sdk_stream_after_a_true_prefix(stack, tmp_path) -> None:
    messages = [{"role": "user", "content": "Count from one to thirty."}]
    _wait_until_idle(stack)
    text, _ = _grpc_answer(stack, messages, 64, seed=7)

    def flip_third(index: int, message: bytes) -> bytes:
        if index != 3:
            return message
        reply = pb.StreamInferResponse.FromString(message)
        sealed = bytearray(reply.frame.sealed)
        sealed[-1] ^= 1
        reply.frame.sealed = bytes(sealed)
        return reply.SerializeToString()

    relay = Relay(stack.address).start()
    relay.rewrite_stream["StreamInfer"] = flip_third
    running = _start_proxy(relay.address, stack.server.policy_path, tmp_path)
    try:
        got: list[str] = []
        with pytest.raises(openai.APIError):
            for part in running.sdk().chat.completions.create(
                model="encloud", messages=messages, stream=True, max_tokens=64, seed=7
            ):
                if part.choices and part.choices[0].delta.content:
                    got.append(part.choices[0].delta.content)
        assert text.startswith("".join(got)) and len("".join(got)) < len(text)
    finally:
        _stop(running)
        relay.stop()


@pytest.mark.proxy
def test_32_concurrent_sdk_clients_and_the_added_first_token_time(stack, proxy) -> None:
    errors: list[BaseException] = []
    done: list[str] = []

    def one() -> None:
        try:
            reply = proxy.sdk().chat.completions.create(model="encloud", messages=ASK, max_tokens=8)
            done.append(reply.choices[0].message.content or "")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=one) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(done) == 32, errors[:3]

    # First-token time, one request at a time, warm sessions: direct gRPC vs through the proxy.
    def ttft(stream_factory, stop: str) -> float:
        """Seconds to the first piece; then ``stream.<stop>()`` ends the generation, so that
        none outlives the measurement."""
        started = time.monotonic()
        stream = stream_factory()
        try:
            for _ in stream:
                return time.monotonic() - started
        finally:
            getattr(stream, stop)()
        raise AssertionError("no first piece")

    sdk = proxy.sdk()
    with Client(stack.address, stack.policy, audit_log=NO_AUDIT) as client:
        client.infer([("user", "Hi")], max_new_tokens=1)
        direct = [
            ttft(lambda: client.stream([("user", "Say hi.")], max_new_tokens=4), "cancel")
            for _ in range(10)
        ]
    via = [
        ttft(
            lambda: sdk.chat.completions.create(
                model="encloud",
                messages=[{"role": "user", "content": "Say hi."}],
                max_tokens=4,
                stream=True,
            ),
            "close",
        )
        for _ in range(10)
    ]
    print(
        f"\nproxy: 32 concurrent SDK requests, 0 errors; first-token p50 direct "
        f"{statistics.median(direct) * 1000:.1f} ms, via the proxy "
        f"{statistics.median(via) * 1000:.1f} ms (added "
        f"{(statistics.median(via) - statistics.median(direct)) * 1000:.1f} ms)"
    )


@pytest.mark.proxy
@pytest.mark.interop
def test_the_openai_npm_package_from_node_gets_the_same_answer(stack, proxy) -> None:
    folder = Path(__file__).parent.parent / "clients" / "openai-node"
    assert (folder / "node_modules" / "openai").is_dir(), "./dev installs it (npm ci)"
    _wait_until_idle(stack)  # a batch-mate changes the logits (docs/MODEL_PIPELINE.md)
    text, done = _grpc_answer(stack, ASK, 24, seed=7)
    ran = subprocess.run(
        ["node", "chat.mjs", proxy.base_url, ASK[0]["content"], "24", "7"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["text"] == text and out["streamed"] == text
    assert out["usage"]["completion_tokens"] == done.completion_tokens  # type: ignore[attr-defined]
    assert out["usage"]["prompt_tokens"] == done.prompt_tokens  # type: ignore[attr-defined]


@pytest.mark.unit
def test_the_errors_page_proxy_column_is_the_code_table() -> None:
    from encloud.proxy.openai_api import STATUS_TABLE

    page = (Path(__file__).parent.parent / "docs" / "ERRORS.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ") and "situation" not in line]
    checked = 0
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        status = cells[1].split()[0] if len(cells) > 5 and cells[1] else ""
        if status in STATUS_TABLE:
            http, _, code = STATUS_TABLE[status]
            assert cells[-1].startswith(f"{http} `{code}`"), row
            checked += 1
    assert checked >= 15
