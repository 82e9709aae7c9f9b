"""Chat templates against exact strings: FastChat's vicuna_v1.1 and SmolLM2's own ChatML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from encloud.server.inference.templates import VICUNA_V1_1

SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CASES = [
    ([("user", "Hi")], SYS + " USER: Hi ASSISTANT:"),
    (
        [("user", "Hi"), ("assistant", "Hello!"), ("user", "What's 2+2?")],
        SYS + " USER: Hi ASSISTANT: Hello!</s>USER: What's 2+2? ASSISTANT:",
    ),
    ([("system", "Be brief."), ("user", "Hi")], "Be brief. USER: Hi ASSISTANT:"),
]


def _msgs(turns):
    return [{"role": r, "content": c} for r, c in turns]


def _fastchat_add_colon_two(turns) -> str:
    """FastChat's get_prompt for SeparatorStyle.ADD_COLON_TWO, as written in
    fastchat/conversation.py, with the vicuna_v1.1 conversation's values."""
    system = turns[0][1] if turns and turns[0][0] == "system" else SYS
    messages = [("USER" if r == "user" else "ASSISTANT", c) for r, c in turns if r != "system"]
    messages.append(("ASSISTANT", None))
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


@pytest.mark.unit
@pytest.mark.parametrize(("turns", "expected"), CASES)
def test_vicuna_v1_1_jinja_matches_fastchat(turns, expected) -> None:
    jinja2_sandbox = pytest.importorskip("jinja2.sandbox")
    template = jinja2_sandbox.ImmutableSandboxedEnvironment().from_string(VICUNA_V1_1)
    assert _fastchat_add_colon_two(turns) == expected
    assert template.render(messages=_msgs(turns), add_generation_prompt=True) == expected


@pytest.mark.engine
@pytest.mark.parametrize(("turns", "expected"), CASES)
def test_vicuna_v1_1_through_onnxruntime_genai(model_dir: Path, turns, expected) -> None:
    """The engine renders with onnxruntime-genai's own Jinja implementation: same string."""
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(og.Model(str(model_dir)))
    got = tokenizer.apply_chat_template(
        json.dumps(_msgs(turns)), template_str=VICUNA_V1_1, add_generation_prompt=True
    )
    assert got == expected
