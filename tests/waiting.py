"""Waiting on a real server without sleeping a guessed time: poll what it shows (its
metrics, its health) until a condition holds, within a deadline."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    """Poll `condition` until it holds; AssertionError naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.02)


def samples(metrics_address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the server's /metrics: (name, sorted labels) -> value."""
    url = f"http://{metrics_address}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(metrics_address: str, name: str, **labels: str) -> float:
    """One sample's value from the server's /metrics (0 when the series does not exist)."""
    return samples(metrics_address).get((name, tuple(sorted(labels.items()))), 0.0)


def sessions_expired(metrics_address: str) -> float:
    return metric(metrics_address, "encloud_sessions_ended_total", cause="expired")
