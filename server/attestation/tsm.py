"""Linux configfs-tsm report requests (kernel 6.7+, Documentation/ABI/testing/configfs-tsm).

An entry folder under /sys/kernel/config/tsm/report/ (made with mkdir) has:
`inblob` (write the 64-byte REPORT_DATA), `outblob` (read: the report, SEV-SNP's raw
ATTESTATION_REPORT or TDX's quote, generated on read), `provider` ("sev_guest" or
"tdx_guest"), `generation` (bumped on each write; compared before and after so that a
report read back is the one for our inblob), and for SEV-SNP `privlevel` and `auxblob`.
One process owns the entry (the server's), and requests run one at a time under a lock.
"""

from __future__ import annotations

import threading
from pathlib import Path

from encloud.protocol.hardware.binding import KIND_SEV_SNP, KIND_TDX

DEFAULT_REPORT_DIR = Path("/sys/kernel/config/tsm/report")
PROVIDER_KINDS = {"sev_guest": KIND_SEV_SNP, "tdx_guest": KIND_TDX}


class TsmError(RuntimeError):
    """The configfs-tsm interface is missing, busy or answered something unusable."""


class TsmReporter:
    def __init__(self, report_dir: Path, entry_name: str = "encloud") -> None:
        self.entry = Path(report_dir) / entry_name
        self._lock = threading.Lock()
        try:
            self.entry.mkdir(exist_ok=True)
            provider = (self.entry / "provider").read_text().strip()
        except OSError as err:
            raise TsmError(f"no configfs-tsm report entry at {self.entry}: {err}") from err
        if provider not in PROVIDER_KINDS:
            raise TsmError(f"configfs-tsm provider {provider!r} is not sev_guest or tdx_guest")
        self.kind = PROVIDER_KINDS[provider]

    def _generation(self) -> int:
        return int((self.entry / "generation").read_text().strip())

    def report(self, report_data: bytes) -> bytes:
        """A fresh hardware report whose REPORT_DATA is `report_data` (64 bytes)."""
        if len(report_data) != 64:
            raise ValueError("REPORT_DATA is 64 bytes")
        with self._lock:
            try:
                before = self._generation()
                with open(self.entry / "inblob", "wb") as f:
                    f.write(report_data)
                with open(self.entry / "outblob", "rb") as f:
                    out = f.read()
                after = self._generation()
            except (OSError, ValueError) as err:
                raise TsmError(f"configfs-tsm report request failed: {err}") from err
        if after != before + 1:
            raise TsmError(
                f"another writer used the configfs-tsm entry (generation {before} -> {after})"
            )
        if not out:
            raise TsmError("configfs-tsm returned an empty report")
        return out
