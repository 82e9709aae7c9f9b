"""The server's one owner of the TPM: quotes, PCRs, extends and NV, behind one lock.

An ESAPI context is not thread-safe, so a `Tpm` holds exactly one and runs every TPM command
under one `threading.Lock`. With a `timeout` (the default), each command also runs on one
dedicated worker thread and the caller waits at most that long: the swtpm TCTI of libtss2
3.2.1 ignores `Esys_SetTimeout` and blocks forever on a TPM that stopped answering without
closing its socket (a stopped swtpm), so this is the only reliable bound. A TPM that stopped
answering, or whose socket is gone, surfaces as `TpmUnavailableError`, never as a raw
`TSS2_Exception`:

- socket gone (swtpm killed, connection refused): libtss2 fails at once with a TCTI I/O
  error. The ESAPI context is then unusable ("called in the wrong order"), so it is dropped
  and the next call opens a fresh one (and recreates the AK, which is deterministic).
- no answer within `timeout`: the worker thread is stuck inside libtss2 and cannot be
  interrupted, so the `Tpm` is marked failed for good; every later call raises at once and
  the server has to restart (health NOT_SERVING).

The attestation key (AK) is an ECC P-256 primary key under the endorsement hierarchy,
recreated with CreatePrimary from a fixed template, so one TPM always gives the same AK
(across reopen and across a TPM reset). After a TPM reset (swtpm restarted) its transient
handle is gone: a quote that finds it gone recreates it and retries once.

Quotes and PCR values that match: `quote_with_pcrs` quotes and then reads the same PCRs under
the same lock, and checks that the PCR digest in the signed TPMS_ATTEST equals the hash of the
values read; if another process extended in between it retries.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, TypeVar

# Silence libtss2's stderr logging unless the operator asked for it; must be set before the
# library is loaded.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_PT_NV,
    TPM2_RC,
    TPM2B_NV_PUBLIC,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_NV,
    TPMA_OBJECT,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_NV_PUBLIC,
    TPMS_PCR_SELECTION,
    TPMT_HA,
    TPMT_PUBLIC,
    TSS2_RC,
    TSS2_Exception,
)

from encloud.protocol.faults import TpmUnavailableError

__all__ = [
    "AK_ATTRIBUTES",
    "AK_TEMPLATE",
    "AZURE_AK",
    "DEFAULT_NV_ATTRIBUTES",
    "DEFAULT_TIMEOUT",
    "ENDORSEMENT_HIERARCHY",
    "GCP_AK_ECC",
    "GCP_AK_RSA",
    "GENERATED_AK",
    "AkSource",
    "Quote",
    "Tpm",
    "TpmCommandError",
    "TpmUnavailableError",
    "qualified_name",
]

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
AK_TEMPLATE = "ecc256:ecdsa-sha256:null"
AK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
# Owner writes, anyone reads with the index's empty auth (like the EK/AK certificate indices).
DEFAULT_NV_ATTRIBUTES = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
_PCR_READ_MAX_ROUNDS = 32
_QUOTE_CONSISTENCY_TRIES = 3
_NAME_ALG_SHA256 = struct.pack(">H", TPM2_ALG.SHA256)
ENDORSEMENT_HIERARCHY = 0x4000000B  # TPM_RH_ENDORSEMENT

_UNAVAILABLE_BASE_RCS = {
    TSS2_RC.BASE_RC_BAD_SEQUENCE,
    TSS2_RC.BASE_RC_NO_CONNECTION,
    TSS2_RC.BASE_RC_TRY_AGAIN,
    TSS2_RC.BASE_RC_IO_ERROR,
    TSS2_RC.BASE_RC_MALFORMED_RESPONSE,
    TSS2_RC.BASE_RC_INSUFFICIENT_RESPONSE,
}


@dataclass(frozen=True)
class AkSource:
    """Where the AK comes from on a platform.

    - "generated": a primary ECC P-256 key under the endorsement hierarchy from AK_TEMPLATE
      (swtpm, a generic TPM);
    - "persistent": a key the platform made persistent at `handle` (Azure: 0x81000003);
    - "nv_template": a primary key under the endorsement hierarchy whose TPMT_PUBLIC
      template the platform keeps in NV `handle` (GCP: 0x01c10003 ECC, 0x01c10001 RSA).
    """

    kind: str = "generated"
    handle: int = 0


GENERATED_AK = AkSource()
AZURE_AK = AkSource("persistent", 0x81000003)
GCP_AK_ECC = AkSource("nv_template", 0x01C10003)
GCP_AK_RSA = AkSource("nv_template", 0x01C10001)


def qualified_name(parent_handle: int, name: bytes) -> bytes:
    """The qualified name of a primary key (SHA-256 nameAlg) under hierarchy `parent_handle`."""
    return _NAME_ALG_SHA256 + hashlib.sha256(struct.pack(">I", parent_handle) + name).digest()


class TpmCommandError(RuntimeError):
    """The TPM answered a command with an error (e.g. NV index not defined).

    `rc` is the TSS2 return code. Not a domain error: it becomes INTERNAL at the gRPC edge.
    """

    def __init__(self, what: str, rc: int, detail: str) -> None:
        super().__init__(f"TPM {what} failed: {detail} (rc 0x{rc:x})")
        self.what = what
        self.rc = rc


def _pcr_digest(values: dict[int, bytes]) -> bytes:
    """The quote's pcrDigest over `values`: our AKs sign with SHA-256, whatever the bank."""
    return hashlib.sha256(b"".join(values[i] for i in sorted(values))).digest()


class Quote(NamedTuple):
    """A quote and the PCR values it covers, read right after it under the same lock.

    A named tuple: `attest, signature, pcrs = tpm.quote_with_pcrs(...)` works."""

    attest: bytes  # TPMS_ATTEST, without the TPM2B size prefix (what the signature covers)
    signature: bytes  # marshalled TPMT_SIGNATURE
    pcrs: dict[int, bytes]  # ascending PCR index -> value; sha256(concat) == pcrDigest


def _is_unavailable(err: TSS2_Exception) -> bool:
    rc = int(err.rc)
    layer = rc & TSS2_RC.RC_LAYER_MASK
    if layer == TSS2_RC.TCTI_RC_LAYER:
        return True
    if layer in (TSS2_RC.ESAPI_RC_LAYER, TSS2_RC.SYS_RC_LAYER):
        return (rc & 0xFFFF) in _UNAVAILABLE_BASE_RCS
    # TPM in failure mode.
    return layer == TSS2_RC.TPM_RC_LAYER and rc == TPM2_RC.FAILURE


def _bank_alg(bank: str) -> TPM2_ALG:
    try:
        alg = TPM2_ALG.parse(bank)
    except (ValueError, KeyError) as err:
        raise ValueError(f"unknown PCR bank {bank!r}") from err
    if alg not in (TPM2_ALG.SHA1, TPM2_ALG.SHA256, TPM2_ALG.SHA384, TPM2_ALG.SHA512):
        raise ValueError(f"unsupported PCR bank {bank!r}")
    return alg


def _check_pcrs(pcrs: Sequence[int]) -> list[int]:
    indices = sorted(set(pcrs))
    if not indices:
        raise ValueError("empty PCR selection")
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 23:
            raise ValueError(f"invalid PCR index {index!r}")
    if len(indices) != len(pcrs):
        raise ValueError("duplicate PCR index in selection")
    return indices


def _selection(alg: TPM2_ALG, pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    bitmap = bytearray(3)
    for index in pcrs:
        bitmap[index // 8] |= 1 << (index % 8)
    sel = TPMS_PCR_SELECTION(hash=alg, sizeofSelect=3)
    for i, byte in enumerate(bitmap):
        sel.pcrSelect[i] = byte
    return TPML_PCR_SELECTION([sel])


def _selected(selection: TPML_PCR_SELECTION, alg: TPM2_ALG) -> list[int]:
    out: list[int] = []
    for i in range(selection.count):
        sel = selection.pcrSelections[i]
        if sel.hash != alg:
            continue
        for byte_index in range(sel.sizeofSelect):
            byte = sel.pcrSelect[byte_index]
            out.extend(byte_index * 8 + bit for bit in range(8) if byte & (1 << bit))
    return sorted(out)


class _Worker:
    """One daemon thread that runs the TPM commands, so that a caller can stop waiting.

    A daemon thread, unlike a ThreadPoolExecutor's, does not hold up interpreter exit when
    it is stuck in libtss2 on a TPM that never answers."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], object], Future[object]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._loop, name="encloud-tpm", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as err:
                future.set_exception(err)

    def call(self, fn: Callable[[], T], timeout: float | None) -> T:
        future: Future[T] = Future()
        self._queue.put((fn, future))  # type: ignore[arg-type]
        return future.result(timeout)

    def stop(self) -> None:
        self._queue.put(None)


class Tpm:
    """One ESAPI context, one AK, one lock. Open with `Tpm.open(tcti)`; close when done."""

    def __init__(
        self, tcti: str, timeout: float | None = DEFAULT_TIMEOUT, ak_source: AkSource = GENERATED_AK
    ) -> None:
        self._tcti = tcti
        self._ak_source = ak_source
        self._timeout = timeout
        self._lock = threading.Lock()
        self._pcr_cache: dict[tuple[int, tuple[int, ...]], dict[int, bytes]] = {}
        self._executor: _Worker | None = None
        self._ctx: ESAPI | None = None
        self._ak: ESYS_TR | None = None
        self._ak_public: bytes | None = None
        self._nv_buffer_max: int | None = None
        self._failed: str | None = None
        self._closed = False

    @classmethod
    def open(
        cls,
        tcti: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        ak_source: AkSource = GENERATED_AK,
    ) -> Tpm:
        """Connect to the TPM at `tcti` (e.g. `swtpm:path=...`, `device:/dev/tpmrm0`) and
        create (or load, per `ak_source`) the AK. `timeout` bounds every TPM command in
        seconds (None: no bound, the command runs on the caller's thread). Raises
        TpmUnavailableError."""
        tpm = cls(tcti, timeout, ak_source)
        if timeout is not None:
            tpm._executor = _Worker()
        try:
            tpm._run("open", tpm._ensure_context)
        except BaseException:
            tpm.close()
            raise
        return tpm

    # --- plumbing ---------------------------------------------------------------------------

    def _ensure_context(self) -> ESAPI:
        if self._ctx is None:
            ctx = ESAPI(self._tcti)
            try:
                self._ctx = ctx
                self._create_ak()
            except BaseException:
                self._ctx = None
                self._ak = None
                ctx.close()
                raise
        return self._ctx

    def _create_ak(self) -> None:
        assert self._ctx is not None
        source = self._ak_source
        if source.kind == "persistent":
            handle = self._ctx.tr_from_tpmpublic(source.handle)
            public, _, _ = self._ctx.read_public(handle)
            marshalled = public.publicArea.marshal()
            if self._ak_public is not None and marshalled != self._ak_public:
                self._ctx.tr_close(handle)
                raise TpmCommandError("ReadPublic", 0, "the attestation key changed")
            self._ak = handle
            self._ak_public = marshalled
            return
        if source.kind == "nv_template":
            raw = self._read_nv_locked(self._ctx, source.handle)
            area, _ = TPMT_PUBLIC.unmarshal(raw)
            template = TPM2B_PUBLIC(publicArea=area)
        else:
            template = TPM2B_PUBLIC.parse(
                AK_TEMPLATE, objectAttributes=AK_ATTRIBUTES, nameAlg="sha256"
            )
        handle, public, _, _, _ = self._ctx.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
        )
        marshalled = public.publicArea.marshal()
        if self._ak_public is not None and marshalled != self._ak_public:
            # Another TPM (or a changed endorsement seed) behind the same TCTI.
            self._ctx.flush_context(handle)
            raise TpmCommandError("CreatePrimary", 0, "the attestation key changed")
        self._ak = handle
        self._ak_public = marshalled

    def _drop_context(self) -> None:
        ctx, self._ctx, self._ak = self._ctx, None, None
        if ctx is not None:
            with contextlib.suppress(Exception):  # best effort on a broken connection
                ctx.close()

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        """Run fn under the lock (on the worker thread if there is a timeout), mapping errors."""
        with self._lock:
            if self._closed:
                raise TpmUnavailableError("the TPM connection is closed")
            if self._failed is not None:
                raise TpmUnavailableError(self._failed)
            try:
                if self._executor is None:
                    return fn()
                try:
                    return self._executor.call(fn, self._timeout)
                except FutureTimeoutError:
                    # The worker is stuck in libtss2; nothing can interrupt it. Fail for good.
                    self._failed = f"the TPM did not answer within {self._timeout:g} s"
                    self._executor.stop()
                    self._executor = None
                    self._ctx = None  # never touched again: the stuck thread still uses it
                    raise TpmUnavailableError(self._failed) from None
            except TSS2_Exception as err:
                if _is_unavailable(err):
                    self._drop_context()
                    if what == "open":
                        raise TpmUnavailableError("cannot connect to the TPM") from None
                    raise TpmUnavailableError("the TPM is not answering") from None
                raise TpmCommandError(what, int(err.rc), str(err)) from None

    # --- the attestation key ------------------------------------------------------------------

    def ak_public(self) -> bytes:
        """The AK's marshalled TPMT_PUBLIC (no TPM2B size prefix)."""
        if self._ak_public is None:
            raise TpmUnavailableError("the TPM connection is closed")
        return self._ak_public

    def ak_name(self) -> bytes:
        """The AK's TPM name: nameAlg (0x000B, SHA-256) || SHA-256(TPMT_PUBLIC)."""
        return _NAME_ALG_SHA256 + hashlib.sha256(self.ak_public()).digest()

    def ak_qualified_name(self) -> bytes:
        """The AK's qualified name, what a quote's `qualifiedSigner` holds (not `ak_name`!):
        nameAlg || SHA-256(TPM_RH_ENDORSEMENT (0x4000000B, u32) || ak_name), since the AK is
        a primary key of the endorsement hierarchy."""
        return qualified_name(ENDORSEMENT_HIERARCHY, self.ak_name())

    # --- quotes and PCRs -----------------------------------------------------------------------

    def quote(
        self, qualifying_data: bytes, pcrs: Sequence[int], bank: str = "sha256"
    ) -> tuple[bytes, bytes]:
        """Quote `pcrs` of `bank` with the AK. Returns (TPMS_ATTEST bytes without the TPM2B
        size prefix, marshalled TPMT_SIGNATURE). The PCR values are not returned: use
        `quote_with_pcrs` to get values that match the quote."""
        alg = _bank_alg(bank)
        indices = _check_pcrs(pcrs)
        data = bytes(qualifying_data)
        if len(data) > 64:
            raise ValueError("qualifying data longer than 64 bytes")
        return self._run("Quote", lambda: self._quote_locked(data, alg, indices))

    def _quote_locked(self, data: bytes, alg: TPM2_ALG, indices: list[int]) -> tuple[bytes, bytes]:
        ctx = self._ensure_context()
        selection = _selection(alg, indices)
        try:
            attest, signature = ctx.quote(self._ak, selection, data)
        except TSS2_Exception as err:
            # After a TPM reset the AK's transient handle is gone: recreate it, retry once.
            if int(err.rc) != TPM2_RC.REFERENCE_H0 and not (
                err.error == TPM2_RC.HANDLE and err.handle == 1
            ):
                raise
            assert self._ak is not None
            ctx.tr_close(self._ak)
            self._ak = None
            self._create_ak()
            attest, signature = ctx.quote(self._ak, selection, data)
        return bytes(attest), signature.marshal()

    def read_pcrs(self, pcrs: Sequence[int], bank: str = "sha256") -> dict[int, bytes]:
        """Read PCR values (any number; TPM2_PCR_Read returns at most 8 per call)."""
        values, _ = self.read_pcrs_with_counter(pcrs, bank)
        return values

    def read_pcrs_with_counter(
        self, pcrs: Sequence[int], bank: str = "sha256"
    ) -> tuple[dict[int, bytes], int]:
        """Read PCR values and the pcrUpdateCounter. The counter is the one of the last read
        round; if it changed between rounds the read is repeated."""
        alg = _bank_alg(bank)
        indices = _check_pcrs(pcrs)
        return self._run("PCR_Read", lambda: self._read_pcrs_locked(alg, indices))

    def _read_pcrs_locked(self, alg: TPM2_ALG, indices: list[int]) -> tuple[dict[int, bytes], int]:
        ctx = self._ensure_context()
        for _ in range(_QUOTE_CONSISTENCY_TRIES):
            values: dict[int, bytes] = {}
            counters: set[int] = set()
            remaining = list(indices)
            rounds = 0
            while remaining:
                rounds += 1
                if rounds > _PCR_READ_MAX_ROUNDS:
                    raise TpmCommandError("PCR_Read", 0, "the TPM keeps returning no PCRs")
                counter, selection, digests = ctx.pcr_read(_selection(alg, remaining))
                counters.add(int(counter))
                got = _selected(selection, alg)
                if not got or len(got) != digests.count:
                    raise TpmCommandError(
                        "PCR_Read", 0, f"PCRs {remaining} of bank {alg} are not available"
                    )
                for index, k in zip(got, range(digests.count), strict=True):
                    values[index] = bytes(digests.digests[k])
                remaining = [i for i in remaining if i not in values]
            if len(counters) == 1:
                return dict(sorted(values.items())), counters.pop()
        raise TpmCommandError("PCR_Read", 0, "PCRs kept changing while being read")

    def quote_with_pcrs(
        self, qualifying_data: bytes, pcrs: Sequence[int], bank: str = "sha256"
    ) -> Quote:
        """Quote and read the same PCRs under one lock; the values match the quote's pcrDigest.

        If another process extends a selected PCR between the quote and the read (the digest
        differs), the pair is retaken, up to 3 times, then TpmCommandError."""
        alg = _bank_alg(bank)
        indices = _check_pcrs(pcrs)
        data = bytes(qualifying_data)
        if len(data) > 64:
            raise ValueError("qualifying data longer than 64 bytes")

        key = (int(alg), tuple(indices))

        def run() -> Quote:
            for _ in range(_QUOTE_CONSISTENCY_TRIES):
                attest, signature = self._quote_locked(data, alg, indices)
                parsed, _ = TPMS_ATTEST.unmarshal(attest)
                quoted = bytes(parsed.attested.quote.pcrDigest)
                # PCRs change only at start-up, so the last values read usually still
                # match: then the quote needs no PCR_Read (two commands for 9 PCRs).
                cached = self._pcr_cache.get(key)
                if cached is not None and _pcr_digest(cached) == quoted:
                    return Quote(attest, signature, dict(cached))
                values, _ = self._read_pcrs_locked(alg, indices)
                if _pcr_digest(values) == quoted:
                    self._pcr_cache[key] = dict(values)
                    return Quote(attest, signature, values)
            raise TpmCommandError("Quote", 0, "PCRs kept changing while being quoted")

        return self._run("Quote", run)

    def extend(self, pcr: int, digest: bytes) -> None:
        """Extend SHA-256 `digest` into `pcr` of the SHA-256 bank, from locality 0."""
        _check_pcrs([pcr])
        digest = bytes(digest)
        if len(digest) != 32:
            raise ValueError("a SHA-256 digest is 32 bytes")

        def run() -> None:
            ctx = self._ensure_context()
            ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
            ha.digest.sha256 = digest
            values = TPML_DIGEST_VALUES([ha])
            ctx.pcr_extend(ESYS_TR.parse(f"pcr{pcr}"), values)

        self._run("PCR_Extend", run)

    # --- NV --------------------------------------------------------------------------------------

    def _buffer_max(self, ctx: ESAPI) -> int:
        if self._nv_buffer_max is None:
            _, data = ctx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT_NV.BUFFER_MAX)
            props = data.data.tpmProperties
            value = 0
            for i in range(props.count):
                if props.tpmProperty[i].property == TPM2_PT_NV.BUFFER_MAX:
                    value = int(props.tpmProperty[i].value)
            self._nv_buffer_max = value if value > 0 else 512
        return self._nv_buffer_max

    def define_nv(
        self, index: int, size: int, attributes: TPMA_NV | int = DEFAULT_NV_ATTRIBUTES
    ) -> None:
        """Define an ordinary NV index of `size` bytes with the owner hierarchy (empty auth).
        Default attributes: owner writes; owner or anyone (empty index auth) reads."""
        if not 0x01000000 <= index <= 0x01FFFFFF:
            raise ValueError(f"not an NV index: 0x{index:x}")

        def run() -> None:
            ctx = self._ensure_context()
            public = TPM2B_NV_PUBLIC(
                nvPublic=TPMS_NV_PUBLIC(
                    nvIndex=index,
                    nameAlg=TPM2_ALG.SHA256,
                    attributes=attributes,
                    dataSize=size,
                )
            )
            handle = ctx.nv_define_space(None, public, ESYS_TR.OWNER)
            ctx.tr_close(handle)

        self._run("NV_DefineSpace", run)

    def undefine_nv(self, index: int) -> None:
        def run() -> None:
            ctx = self._ensure_context()
            handle = ctx.tr_from_tpmpublic(index)
            ctx.nv_undefine_space(handle, ESYS_TR.OWNER)

        self._run("NV_UndefineSpace", run)

    def write_nv(self, index: int, data: bytes, offset: int = 0) -> None:
        """Write `data` at `offset` of NV `index`, in chunks of TPM_PT_NV_BUFFER_MAX.

        Authorised with the owner if the index has OWNERWRITE, else with its own (empty) auth."""
        data = bytes(data)

        def run() -> None:
            ctx = self._ensure_context()
            handle = ctx.tr_from_tpmpublic(index)
            try:
                public, _ = ctx.nv_read_public(handle)
                attrs = public.nvPublic.attributes
                auth = ESYS_TR.OWNER if attrs & TPMA_NV.OWNERWRITE else handle
                chunk = self._buffer_max(ctx)
                for start in range(0, len(data), chunk):
                    ctx.nv_write(handle, data[start : start + chunk], offset + start, auth)
            finally:
                ctx.tr_close(handle)

        self._run("NV_Write", run)

    def read_nv(self, index: int) -> bytes:
        """Read the whole of NV `index`, in chunks of TPM_PT_NV_BUFFER_MAX.

        Authorised with the index's own (empty) auth if it has AUTHREAD, else with the owner."""

        def run() -> bytes:
            return self._read_nv_locked(self._ensure_context(), index)

        return self._run("NV_Read", run)

    def _read_nv_locked(self, ctx: ESAPI, index: int) -> bytes:
        handle = ctx.tr_from_tpmpublic(index)
        try:
            public, _ = ctx.nv_read_public(handle)
            attrs = public.nvPublic.attributes
            size = int(public.nvPublic.dataSize)
            auth = handle if attrs & TPMA_NV.AUTHREAD else ESYS_TR.OWNER
            chunk = self._buffer_max(ctx)
            parts = []
            for start in range(0, size, chunk):
                n = min(chunk, size - start)
                parts.append(bytes(ctx.nv_read(handle, n, start, auth)))
            return b"".join(parts)
        finally:
            ctx.tr_close(handle)

    def make_persistent_ak(self, persistent_handle: int) -> None:
        """Fixtures and provisioning: EvictControl this TPM's (generated) AK to
        `persistent_handle` under the owner hierarchy, as Azure keeps its AK at 0x81000003."""

        def run() -> None:
            ctx = self._ensure_context()
            assert self._ak is not None
            ctx.evict_control(ESYS_TR.OWNER, self._ak, persistent_handle)

        self._run("EvictControl", run)

    # --- life cycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Flush the AK and finalize the context. Safe to call twice; best effort."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            executor, self._executor = self._executor, None
            if self._failed is None and self._ctx is not None:

                def run() -> None:
                    ctx = self._ctx
                    assert ctx is not None
                    if self._ak is not None:
                        with contextlib.suppress(TSS2_Exception):
                            if self._ak_source.kind == "persistent":
                                ctx.tr_close(self._ak)  # never evict the platform's AK
                            else:
                                ctx.flush_context(self._ak)
                    self._drop_context()

                if executor is None:
                    run()
                else:
                    with contextlib.suppress(FutureTimeoutError):
                        executor.call(run, self._timeout)
            if executor is not None:
                executor.stop()

    def __enter__(self) -> Tpm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
