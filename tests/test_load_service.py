"""64 concurrent clients, each its own attested session, several distinct prompts each.

Every answer is opened under its own session's keys and its final frame carries
its own request's transcript hash (the load generator checks both, or counts an
error). Greedy answers are compared with the single-stream reference that the
same server gives for the same prompt when nothing else runs: the engine does
not expose its logits through the server, so the test compares texts (see the
note on near-ties in docs/OPERATIONS.md). Figures are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack import running_stack

from encloud.cli.loadgen import run_load
from encloud.client import NO_AUDIT
from encloud.protocol.policy import Policy

pytestmark = pytest.mark.load

CLIENTS = 64
REQUESTS = 3
MAX_NEW_TOKENS = 8


def prompt(client: int, index: int) -> str:
    things = ("apples", "rivers", "clocks")
    return f"In one sentence, what is special about {things[index]} number {client}?"


@pytest.fixture(scope="module")
def loaded_server(model_dir: Path) -> Iterator[tuple[str, Policy]]:
    with (
        tempfile.TemporaryDirectory(prefix="encloud-load-") as tmp,
        running_stack(
            Path(tmp), model_dir, max_pending_sessions=256, attest_burst=256, max_sessions=512
        ) as stack,
    ):
        yield stack.address, stack.policy


def test_64_clients_each_get_their_own_correct_answers(
    loaded_server: tuple[str, Policy], tmp_path: Path
) -> None:
    address, policy = loaded_server
    audit = tmp_path / "load-audit.jsonl"
    report = asyncio.run(
        run_load(
            address,
            policy,
            clients=CLIENTS,
            requests_per_client=REQUESTS,
            max_new_tokens=MAX_NEW_TOKENS,
            prompt=prompt,
            timeout_seconds=600,
            audit_log=audit,
        )
    )
    # Every client's attestation is in the audit log, as for any other client.
    assert audit.read_text().count('"outcome":"pass"') == CLIENTS
    print("load:", json.dumps(report.summary()))
    assert not report.errors, report.errors
    assert len(report.results) == CLIENTS * REQUESTS
    assert len({r.session_id for r in report.results}) == CLIENTS
    for result in report.results:
        assert result.prompt == prompt(result.client, result.index)
        assert result.finish_reason in {"stop", "length"}

    # The single-stream reference: one client, one request at a time, same prompts.
    async def reference() -> dict[str, str]:
        answers: dict[str, str] = {}
        for client in range(CLIENTS):
            single = await run_load(
                address,
                policy,
                clients=1,
                requests_per_client=REQUESTS,
                max_new_tokens=MAX_NEW_TOKENS,
                prompt=lambda _c, i, client=client: prompt(client, i),
                audit_log=NO_AUDIT,
            )
            assert not single.errors, single.errors
            answers.update({r.prompt: r.text for r in single.results})
        return answers

    expected = asyncio.run(reference())
    assert len(expected) == CLIENTS * REQUESTS
    mismatched = [r.prompt for r in report.results if r.text != expected[r.prompt]]
    assert not mismatched, f"{len(mismatched)} answers differ from the reference"
