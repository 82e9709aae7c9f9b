"""Evidence for one session: a quote over the policy PCRs plus what it covers."""

from __future__ import annotations

from collections.abc import Sequence

from encloud.client.eventlog import EventRecord, serialize
from encloud.client.evidence import TPM_ALG_SHA256, Evidence
from encloud.server.attestation.tpm import Tpm


class TpmAttester:
    def __init__(self, tpm: Tpm, pcr_selection: Sequence[int], log: Sequence[EventRecord]) -> None:
        self._tpm = tpm
        self._pcrs = list(pcr_selection)
        self._ak_public = tpm.ak_public()
        # The server is the log's only writer, so the measured log is kept in memory.
        self.records = list(log)
        self._log = serialize(self.records)

    @property
    def ak_public(self) -> bytes:
        return self._ak_public

    def evidence(self, qualifying_data: bytes) -> Evidence:
        attest, signature, pcr_values = self._tpm.quote_with_pcrs(qualifying_data, self._pcrs)
        return Evidence(
            quote_attest=attest,
            quote_signature=signature,
            ak_public=self._ak_public,
            pcr_values=pcr_values,
            workload_event_log=self._log,
            pcr_hash_algorithm=TPM_ALG_SHA256,
        )
