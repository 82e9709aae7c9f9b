"""Wall time per test marker, printed at the end of every run (`./dev test`'s summary).

A test's time is its setup, call and teardown, so a module fixture's start-up (a server, a
swtpm) counts toward the first test that needs it. A test with two markers counts under both;
the total line counts it once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping


def marker_wall_times(
    durations: Mapping[str, float], markers_of: Mapping[str, Iterable[str]]
) -> dict[str, tuple[int, float]]:
    """Per marker: (tests, seconds), from per-test seconds and each test's markers."""
    tests: dict[str, int] = defaultdict(int)
    seconds: dict[str, float] = defaultdict(float)
    for nodeid, duration in durations.items():
        for marker in set(markers_of.get(nodeid, ())) or {"(no marker)"}:
            tests[marker] += 1
            seconds[marker] += duration
    return {marker: (tests[marker], seconds[marker]) for marker in tests}


def summary_lines(
    durations: Mapping[str, float], markers_of: Mapping[str, Iterable[str]]
) -> list[str]:
    times = marker_wall_times(durations, markers_of)
    lines = [
        f"{marker:<12} {count:>5} tests {secs:>9.1f} s"
        for marker, (count, secs) in sorted(times.items(), key=lambda kv: -kv[1][1])
    ]
    lines.append(f"{'total':<12} {len(durations):>5} tests {sum(durations.values()):>9.1f} s")
    return lines
