"""The end-of-run check finds a process the tests left running, and only live ones."""

from __future__ import annotations

import subprocess
import sys

import pytest
from leftovers import kill_all, live_descendants

pytestmark = pytest.mark.unit


def test_a_forgotten_child_and_grandchild_are_found_and_killed() -> None:
    before = {leftover.pid for leftover in live_descendants()}
    child = subprocess.Popen(  # a child that starts a grandchild, then both sleep
        [
            sys.executable,
            "-c",
            "import subprocess,sys,time; subprocess.Popen(['sleep','60']);"
            "print('up', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        new = [lf for lf in live_descendants() if lf.pid not in before]
        assert child.pid in {lf.pid for lf in new}
        assert any(lf.command.startswith("sleep 60") for lf in new), new
        kill_all(new)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # The killed child was reaped; the grandchild is a zombie or gone: neither is live.
    left = {lf.pid for lf in live_descendants()} - before
    assert child.pid not in left
