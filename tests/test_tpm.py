"""The vTPM layer on a real swtpm: AK, quotes, PCRs, NV, workload measurement, faults."""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import threading
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import (
    TPM2_ALG,
    TPM2_ECC,
    TPM2_ST,
    TPMA_OBJECT,
    TPMS_ATTEST,
    TPMT_PUBLIC,
    TPMT_SIGNATURE,
)

from encloud.protocol.eventlog import EventRecord, WorkloadEvent, parse, replay
from encloud.protocol.faults import TpmUnavailableError
from encloud.server.attestation.measure import (
    RESETTABLE_PCRS,
    WorkloadMeasurementError,
    check_workload_pcr,
    current_log,
    measure_workload,
)
from encloud.server.attestation.swtpm import Swtpm
from encloud.server.attestation.tpm import Tpm, TpmCommandError

pytestmark = pytest.mark.tpm

ZERO = bytes(32)
NONCE = hashlib.sha256(b"qualifying data").digest()
POLICY_PCRS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 15]
EVENTS = [
    WorkloadEvent("model", hashlib.sha256(b"model files").digest()),
    WorkloadEvent("runtime", b'{"decoding":"greedy"}'),
]


@pytest.fixture
def swtpm(tmp_path: Path):
    sw = Swtpm(tmp_path / "tpmstate").start()
    yield sw
    if sw.pid is not None:
        # A test may have stopped it with SIGSTOP; let it die cleanly.
        os.kill(sw.pid, signal.SIGCONT)
    sw.close()


@pytest.fixture
def tpm(swtpm: Swtpm):
    t = Tpm.open(swtpm.tcti)
    yield t
    t.close()


def _public_key(ak_public: bytes) -> ec.EllipticCurvePublicKey:
    public, _ = TPMT_PUBLIC.unmarshal(ak_public)
    point = public.unique.ecc
    x = int.from_bytes(bytes(point.x), "big")
    y = int.from_bytes(bytes(point.y), "big")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()


def _verify_quote(ak_public: bytes, attest: bytes, signature: bytes) -> None:
    sig, _ = TPMT_SIGNATURE.unmarshal(signature)
    assert sig.sigAlg == TPM2_ALG.ECDSA
    assert sig.signature.ecdsa.hash == TPM2_ALG.SHA256
    r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
    s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
    _public_key(ak_public).verify(encode_dss_signature(r, s), attest, ec.ECDSA(hashes.SHA256()))


# --- swtpm ------------------------------------------------------------------------------------


def test_swtpm_private_state_dir_and_tcti():
    with Swtpm() as sw:
        assert sw.state_dir.stat().st_mode & 0o777 == 0o700
        assert sw.tcti == f"swtpm:path={sw.state_dir / 'swtpm.sock'}"
        assert sw.running
        state_dir = sw.state_dir
    assert not state_dir.exists()


def test_open_without_tpm_is_unavailable(tmp_path: Path):
    with pytest.raises(TpmUnavailableError):
        Tpm.open(f"swtpm:path={tmp_path / 'nothing.sock'}")


# --- the attestation key ------------------------------------------------------------------------


def test_ak_attributes(tpm: Tpm):
    ak_public = tpm.ak_public()
    public, consumed = TPMT_PUBLIC.unmarshal(ak_public)
    assert consumed == len(ak_public)  # a bare TPMT_PUBLIC, no TPM2B size prefix
    assert public.type == TPM2_ALG.ECC
    assert public.nameAlg == TPM2_ALG.SHA256
    required = (
        TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.SIGN_ENCRYPT
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
    )
    assert public.objectAttributes == required
    assert not public.objectAttributes & TPMA_OBJECT.DECRYPT
    detail = public.parameters.eccDetail
    assert detail.symmetric.algorithm == TPM2_ALG.NULL
    assert detail.scheme.scheme == TPM2_ALG.ECDSA
    assert detail.scheme.details.ecdsa.hashAlg == TPM2_ALG.SHA256
    assert detail.curveID == TPM2_ECC.NIST_P256
    # Name: nameAlg || sha256(TPMT_PUBLIC), as the TPM computes it.
    assert tpm.ak_name() == struct.pack(">H", 0x000B) + hashlib.sha256(ak_public).digest()
    assert tpm.ak_name() == bytes(public.get_name())


def test_ak_deterministic_across_reopen_and_restart(swtpm: Swtpm):
    with Tpm.open(swtpm.tcti) as first:
        ak = first.ak_public()
    with Tpm.open(swtpm.tcti) as second:
        assert second.ak_public() == ak
    swtpm.restart()
    with Tpm.open(swtpm.tcti) as third:
        assert third.ak_public() == ak


def test_ak_differs_between_tpms(tpm: Tpm, tmp_path: Path):
    with Swtpm(tmp_path / "other") as other, Tpm.open(other.tcti) as t:
        assert t.ak_public() != tpm.ak_public()


# --- quotes ---------------------------------------------------------------------------------------


def test_quote_verifies_and_binds_nonce_and_pcrs(tpm: Tpm):
    tpm.extend(15, hashlib.sha256(b"workload").digest())
    attest, signature = tpm.quote(NONCE, POLICY_PCRS)
    _verify_quote(tpm.ak_public(), attest, signature)

    parsed, consumed = TPMS_ATTEST.unmarshal(attest)
    assert consumed == len(attest)  # no TPM2B size prefix
    assert struct.unpack(">IH", attest[:6]) == (0xFF544347, 0x8018)
    assert parsed.type == TPM2_ST.ATTEST_QUOTE
    assert bytes(parsed.extraData) == NONCE
    # The quote names the AK by its qualified name: H(TPM_RH_ENDORSEMENT || name).
    assert bytes(parsed.qualifiedSigner) == tpm.ak_qualified_name()
    assert (
        tpm.ak_qualified_name()
        == b"\x00\x0b" + hashlib.sha256(bytes.fromhex("4000000b") + tpm.ak_name()).digest()
    )
    values = tpm.read_pcrs(POLICY_PCRS)
    expected = hashlib.sha256(b"".join(values[i] for i in sorted(POLICY_PCRS))).digest()
    assert bytes(parsed.attested.quote.pcrDigest) == expected
    sel = parsed.attested.quote.pcrSelect
    assert sel.count == 1 and sel.pcrSelections[0].hash == TPM2_ALG.SHA256

    # A changed byte fails verification.
    tampered = bytearray(attest)
    tampered[-1] ^= 1
    with pytest.raises(InvalidSignature):
        _verify_quote(tpm.ak_public(), bytes(tampered), signature)


def test_quote_with_pcrs_matches(tpm: Tpm):
    tpm.extend(15, hashlib.sha256(b"a").digest())
    attest, signature, pcrs = tpm.quote_with_pcrs(NONCE, POLICY_PCRS)
    _verify_quote(tpm.ak_public(), attest, signature)
    assert list(pcrs) == sorted(POLICY_PCRS)
    parsed, _ = TPMS_ATTEST.unmarshal(attest)
    assert (
        bytes(parsed.attested.quote.pcrDigest) == hashlib.sha256(b"".join(pcrs.values())).digest()
    )
    assert pcrs[15] == hashlib.sha256(ZERO + hashlib.sha256(b"a").digest()).digest()


def test_quote_qualifying_data_limits(tpm: Tpm):
    attest, _ = tpm.quote(b"\x07" * 64, [15])
    assert bytes(TPMS_ATTEST.unmarshal(attest)[0].extraData) == b"\x07" * 64
    with pytest.raises(ValueError):
        tpm.quote(b"\x07" * 65, [15])
    with pytest.raises(ValueError):
        tpm.quote(NONCE, [])
    with pytest.raises(ValueError):
        tpm.quote(NONCE, [24])


def test_quote_after_tpm_reset_recreates_ak(swtpm: Swtpm, tpm: Tpm):
    ak = tpm.ak_public()
    swtpm.restart()  # the AK's transient handle is gone
    attest, signature = tpm.quote(NONCE, [15])
    _verify_quote(ak, attest, signature)
    assert tpm.ak_public() == ak


def test_concurrent_quotes(tpm: Tpm):
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                attest, signature = tpm.quote(NONCE, POLICY_PCRS)
                _verify_quote(tpm.ak_public(), attest, signature)
                tpm.read_pcrs(range(24))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --- PCRs ---------------------------------------------------------------------------------------


def test_read_all_24_pcrs(tpm: Tpm):
    tpm.extend(16, hashlib.sha256(b"x").digest())
    values, counter = tpm.read_pcrs_with_counter(range(24))
    assert sorted(values) == list(range(24))
    assert all(len(v) == 32 for v in values.values())
    assert values[16] == hashlib.sha256(ZERO + hashlib.sha256(b"x").digest()).digest()
    assert values[0] == ZERO
    assert values[17] == b"\xff" * 32  # PCRs 17-22 start at all ones (locality-gated)
    assert isinstance(counter, int)
    assert tpm.read_pcrs([23, 3, 9]) == {3: values[3], 9: values[9], 23: values[23]}


def test_extend(tpm: Tpm):
    old = tpm.read_pcrs([15])[15]
    digest = hashlib.sha256(b"event").digest()
    tpm.extend(15, digest)
    assert tpm.read_pcrs([15])[15] == hashlib.sha256(old + digest).digest()
    with pytest.raises(ValueError):
        tpm.extend(15, b"short")


def test_sha1_bank_read(tpm: Tpm):
    values = tpm.read_pcrs([0, 15], bank="sha1")
    assert all(len(v) == 20 for v in values.values())


# --- NV -------------------------------------------------------------------------------------------


def test_nv_round_trip_over_buffer_max(swtpm: Swtpm, tpm: Tpm):
    index = 0x01C10100
    data = os.urandom(2048)  # twice TPM_PT_NV_BUFFER_MAX on swtpm; 2048 is its index maximum
    tpm.define_nv(index, len(data))
    tpm.write_nv(index, data)
    assert tpm.read_nv(index) == data
    # NV survives a TPM reset (swtpm restart on the same state folder).
    swtpm.restart()
    assert tpm.read_nv(index) == data
    tpm.undefine_nv(index)
    with pytest.raises(TpmCommandError):
        tpm.read_nv(index)


def test_nv_read_undefined_is_command_error(tpm: Tpm):
    with pytest.raises(TpmCommandError):
        tpm.read_nv(0x01C1FFFF)


# --- workload measurement -------------------------------------------------------------------------


def test_check_workload_pcr():
    check_workload_pcr(15, allow_resettable=False)
    for pcr in RESETTABLE_PCRS:
        with pytest.raises(ValueError, match=f"PCR {pcr}"):
            check_workload_pcr(pcr, allow_resettable=False)
        check_workload_pcr(pcr, allow_resettable=True)
    with pytest.raises(ValueError):
        check_workload_pcr(24, allow_resettable=True)


def test_measure_fresh_start(tpm: Tpm, tmp_path: Path):
    log = tmp_path / "workload.log"
    records = measure_workload(tpm, 15, log, EVENTS)
    assert [r.recnum for r in records] == [0, 1]
    assert [r.event for r in records] == EVENTS
    assert parse(current_log(log)) == records
    assert tpm.read_pcrs([15])[15] == replay(records)


def test_measure_refuses_resettable_pcr(tpm: Tpm, tmp_path: Path):
    with pytest.raises(ValueError, match="PCR 16"):
        measure_workload(tpm, 16, tmp_path / "log", EVENTS)
    records = measure_workload(tpm, 16, tmp_path / "log", EVENTS, allow_resettable=True)
    assert tpm.read_pcrs([16])[16] == replay(records)


def test_measure_appends_after_reopen(swtpm: Swtpm, tmp_path: Path):
    log = tmp_path / "workload.log"
    with Tpm.open(swtpm.tcti) as t:
        first = measure_workload(t, 15, log, EVENTS)
    with Tpm.open(swtpm.tcti) as t:
        both = measure_workload(t, 15, log, EVENTS)
        assert both[:2] == first
        assert [r.recnum for r in both] == [0, 1, 2, 3]
        assert t.read_pcrs([15])[15] == replay(both)
    assert parse(current_log(log)) == both


def test_measure_new_log_after_tpm_reset(swtpm: Swtpm, tpm: Tpm, tmp_path: Path):
    log = tmp_path / "workload.log"
    old = measure_workload(tpm, 15, log, EVENTS)
    old_bytes = current_log(log)
    swtpm.restart()  # PCRs reset
    new = measure_workload(tpm, 15, log, EVENTS[:1])
    assert [r.recnum for r in new] == [0]
    assert tpm.read_pcrs([15])[15] == replay(new)
    assert (tmp_path / "workload.log.prev").read_bytes() == old_bytes
    assert parse(old_bytes) == old


def test_measure_recovers_log_ahead(tpm: Tpm, tmp_path: Path):
    log = tmp_path / "workload.log"
    records = measure_workload(tpm, 15, log, EVENTS[:1])
    # Crash after writing and fsyncing record 1 but before extending it.
    ahead = EventRecord(1, 15, EVENTS[1].digest(), EVENTS[1])
    with open(log, "ab") as f:
        f.write(ahead.to_json_line() + b"\n")
    again = measure_workload(tpm, 15, log, EVENTS[1:])
    assert again == [records[0], ahead]  # the dropped record is re-measured once
    assert tpm.read_pcrs([15])[15] == replay(again)
    assert parse(current_log(log)) == again


def test_measure_refuses_unlogged_extend(tpm: Tpm, tmp_path: Path):
    log = tmp_path / "workload.log"
    measure_workload(tpm, 15, log, EVENTS)
    before = current_log(log)
    tpm.extend(15, hashlib.sha256(b"someone else").digest())
    with pytest.raises(WorkloadMeasurementError, match="PCR 15"):
        measure_workload(tpm, 15, log, EVENTS)
    assert current_log(log) == before  # nothing appended, nothing extended


def test_measure_refuses_unlogged_extend_without_log(tpm: Tpm, tmp_path: Path):
    tpm.extend(15, hashlib.sha256(b"someone else").digest())
    with pytest.raises(WorkloadMeasurementError):
        measure_workload(tpm, 15, tmp_path / "workload.log", EVENTS)


def test_measure_refuses_edited_log(tpm: Tpm, tmp_path: Path):
    log = tmp_path / "workload.log"
    measure_workload(tpm, 15, log, EVENTS)
    log.write_bytes(current_log(log).replace(b'"model"', b'"runtime"', 1))
    with pytest.raises(WorkloadMeasurementError):
        measure_workload(tpm, 15, log, [])


def test_current_log_missing(tmp_path: Path):
    assert current_log(tmp_path / "none") == b""


# --- faults ---------------------------------------------------------------------------------------


def test_killed_swtpm_is_unavailable_then_recovers(swtpm: Swtpm, tpm: Tpm):
    swtpm.kill()
    start = time.monotonic()
    with pytest.raises(TpmUnavailableError) as info:
        tpm.quote(NONCE, POLICY_PCRS)
    assert time.monotonic() - start < 1.0
    assert "TSS" not in str(info.value) and "tcti" not in str(info.value).lower()
    with pytest.raises(TpmUnavailableError):
        tpm.read_pcrs([15])
    with pytest.raises(TpmUnavailableError):
        tpm.extend(15, ZERO)
    # The TPM comes back (same state): a fresh context, the same AK.
    ak = tpm.ak_public()
    swtpm.start()
    attest, signature = tpm.quote(NONCE, POLICY_PCRS)
    _verify_quote(ak, attest, signature)


def test_hung_swtpm_times_out(swtpm: Swtpm):
    tpm = Tpm.open(swtpm.tcti, timeout=0.5)
    try:
        assert swtpm.pid is not None
        os.kill(swtpm.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(TpmUnavailableError, match="did not answer"):
            tpm.quote(NONCE, POLICY_PCRS)
        assert time.monotonic() - start < 2.0
        # Failed for good: later calls raise at once.
        start = time.monotonic()
        with pytest.raises(TpmUnavailableError):
            tpm.read_pcrs([15])
        assert time.monotonic() - start < 0.1
    finally:
        tpm.close()
        os.kill(swtpm.pid, signal.SIGCONT)


def test_closed_tpm_is_unavailable(swtpm: Swtpm):
    tpm = Tpm.open(swtpm.tcti)
    tpm.close()
    tpm.close()
    with pytest.raises(TpmUnavailableError):
        tpm.quote(NONCE, [15])


def test_no_timeout_mode(swtpm: Swtpm):
    with Tpm.open(swtpm.tcti, timeout=None) as tpm:
        attest, signature = tpm.quote(NONCE, [15])
        _verify_quote(tpm.ak_public(), attest, signature)
        swtpm.kill()
        with pytest.raises(TpmUnavailableError):
            tpm.quote(NONCE, [15])


def test_thousands_of_commands_do_not_wedge_swtpm(swtpm) -> None:
    """swtpm logs a line per connection; an undrained stderr pipe blocked it at ~2046."""
    tpm = Tpm.open(swtpm.tcti, timeout=5.0)
    try:
        for _ in range(3000):
            tpm.read_pcrs([0])
    finally:
        tpm.close()
    assert swtpm.log_path.stat().st_size > 0


def test_quote_with_pcrs_follows_an_extend_after_caching(tpm: Tpm) -> None:
    """The PCR values cached from one quote are not reused once a PCR has moved."""
    first = tpm.quote_with_pcrs(NONCE, POLICY_PCRS)
    again = tpm.quote_with_pcrs(NONCE, POLICY_PCRS)
    assert again.pcrs == first.pcrs
    tpm.extend(15, hashlib.sha256(b"another event").digest())
    moved = tpm.quote_with_pcrs(NONCE, POLICY_PCRS)
    assert (
        moved.pcrs[15]
        == hashlib.sha256(first.pcrs[15] + hashlib.sha256(b"another event").digest()).digest()
    )
    attest, _ = TPMS_ATTEST.unmarshal(moved.attest)
    digest = hashlib.sha256(b"".join(moved.pcrs[i] for i in POLICY_PCRS)).digest()
    assert bytes(attest.attested.quote.pcrDigest) == digest
