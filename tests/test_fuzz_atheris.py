"""Coverage-guided fuzzing of the parsers with atheris (optional: skipped when not installed).

Run longer by hand: `python tests/test_fuzz_atheris.py -runs=1000000` (or -max_total_time=600).
Each input is routed by its first byte to one parser; anything but the parser's typed error
is a crash that atheris reports with the input.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuzz


def _target(data: bytes) -> None:
    from encloud.protocol import eventlog
    from encloud.protocol.audit import parse_line
    from encloud.protocol.bundle import parse_bundle
    from encloud.protocol.envelope import OpeningKey, Sealed, unpad
    from encloud.protocol.errors import EncloudError
    from encloud.protocol.policy import parse_policy
    from encloud.protocol.tpm_structures import (
        parse_attest,
        parse_pcr_selection,
        parse_public,
        parse_signature,
    )

    if not data:
        return
    body = data[1:]
    parsers = [
        parse_public,
        parse_attest,
        parse_signature,
        parse_pcr_selection,
        eventlog.parse,
        parse_policy,
        parse_line,
        parse_bundle,
        lambda d: unpad(d, 64),
        lambda d: OpeningKey(bytearray(32), bytes(16)).open_unchecked_header(Sealed(3, 1, 0, d)),
    ]
    with contextlib.suppress(EncloudError):
        parsers[data[0] % len(parsers)](body)


def main() -> None:
    import atheris

    with atheris.instrument_imports():
        import encloud.protocol.audit
        import encloud.protocol.bundle
        import encloud.protocol.envelope
        import encloud.protocol.eventlog
        import encloud.protocol.policy
        import encloud.protocol.tpm_structures  # noqa: F401
    atheris.Setup(sys.argv, _target)
    atheris.Fuzz()


def test_atheris_finds_no_crash(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is optional (pip install atheris)")
    runs = os.environ.get("ENCLOUD_ATHERIS_RUNS", "3000")
    result = subprocess.run(
        [sys.executable, __file__, f"-runs={runs}", "-seed=1", f"-artifact_prefix={tmp_path}/"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {runs} runs" in result.stderr


if __name__ == "__main__":
    main()
