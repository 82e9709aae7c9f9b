"""The per-marker wall-time summary adds what it should, once per test and marker."""

from __future__ import annotations

import pytest
from marker_times import marker_wall_times, summary_lines


@pytest.mark.unit
def test_a_test_counts_under_each_of_its_markers_and_once_in_the_total() -> None:
    durations = {"a": 2.0, "b": 3.0, "c": 0.5}
    markers_of = {"a": {"e2e", "attack"}, "b": {"e2e"}, "c": set()}
    times = marker_wall_times(durations, markers_of)
    assert times == {"e2e": (2, 5.0), "attack": (1, 2.0), "(no marker)": (1, 0.5)}
    lines = summary_lines(durations, markers_of)
    assert lines[0].startswith("e2e") and "5.0 s" in lines[0]  # slowest first
    assert lines[-1].split() == ["total", "3", "tests", "5.5", "s"]
