"""The exported decoder graph driven by plain ONNX Runtime over a KV buffer with one slot per row.

Why plain ONNX Runtime (figures in docs/MODEL_PIPELINE.md): onnxruntime-genai 0.18 holds
Python's GIL through every step and admits no row into a running batch on the CPU; a plain
``InferenceSession`` releases the GIL while it runs, and the builder's ``GroupQueryAttention``
takes a sequence length per row, so rows of different lengths share one step.

The buffer. One array ``[layers, 2 (key, value), max_rows, kv_heads, cap, head_size]`` holds
every row's cache; row ``r`` is slot ``r``. Its length ``cap`` grows, by copying, only when a row
needs more (to the next multiple of ``GROWTH_TOKENS`` above 5/4 of the need, at most
``max_len``): ``GroupQueryAttention`` on the CPU does work in proportion to the buffer's length
(measured: a 40-token prompt took 87 ms over a 512-token buffer, 466 ms over 8,192), so a buffer
as long as the context would slow every step. It is allocated with ``numpy.zeros``, which maps
fresh zero pages that the kernel commits only when written; only cached tokens are ever written
or copied, so its resident size follows the tokens actually cached (page-rounded), never
``max_rows x cap``; when a row ends, :meth:`release` hands its pages back
(``madvise(MADV_DONTNEED)``), and a growth copy frees each old layer as soon as it is copied.
The KV token budget is enforced by the scheduler's admission, not here.

Two graph shapes:

- **The builder's** (``GroupQueryAttention``; no ``position_ids`` input): past and present are
  bound to the *same* memory (I/O binding by pointer), so a step writes only the new tokens'
  keys and values in place. The graph derives each row's length from the attention mask's row
  sum and the step's total from its width, so the mask of row ``i`` is ``past_i + S`` ones.
- **A plain-attention graph** (optimum's: ``position_ids``, present = past ++ new): the rows'
  caches are gathered into one ``[n, kv_heads, P, head]`` past (P = the longest), the mask hides
  each row's unused positions, and the new columns are copied back into the slots. Slower (it
  copies the cache every step); it keeps such exports servable.

Logits: exports made with the builder's ``prune_lm_head`` return only the last position (the
lm_head runs on one row instead of every prompt token); a graph that returns every position is
cut to the last one here. Prefill is per request (one row), so the last position is never a
pad.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
from pathlib import Path

import numpy as np
import onnxruntime as ort

_MADV_DONTNEED = 4
GROWTH_TOKENS = 256


def _libc_madvise():  # type: ignore[no-untyped-def]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


def session_options(threads: int, spinning: bool) -> ort.SessionOptions:
    """The session options the engine runs with (the runtime event reports them)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # Spinning: faster steps; sleeping: more CPU left to the event loop (docs/MODEL_PIPELINE.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


class ModelRunner:
    """One ONNX Runtime session of the decoder and the KV buffer its rows live in. Not
    thread-safe: owned by the scheduler thread."""

    def __init__(
        self,
        folder: Path,
        *,
        threads: int,
        spinning: bool,
        provider: str,
        max_rows: int,
        max_len: int,
    ) -> None:
        cfg = json.loads((Path(folder) / "genai_config.json").read_text(encoding="utf-8"))
        decoder = cfg["model"]["decoder"]
        self.layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_size = int(decoder["head_size"])
        self.vocab_size = int(cfg["model"]["vocab_size"])
        names = decoder.get("inputs", {})
        outs = decoder.get("outputs", {})
        self._input_ids = names.get("input_ids", "input_ids")
        self._mask = names.get("attention_mask", "attention_mask")
        self._past = [
            (
                names.get("past_key_names", "past_key_values.%d.key") % i,
                names.get("past_value_names", "past_key_values.%d.value") % i,
            )
            for i in range(self.layers)
        ]
        self._present = [
            (
                outs.get("present_key_names", "present.%d.key") % i,
                outs.get("present_value_names", "present.%d.value") % i,
            )
            for i in range(self.layers)
        ]
        self._logits = outs.get("logits", "logits")
        if provider != "cpu":
            # The buffer is host memory bound by pointer, and a row move is a host copy: on a
            # device, past and present would not share memory. Refused rather than run wrong.
            raise ValueError(
                f"provider {provider!r} is not supported by the continuous-batching engine yet "
                "(its KV buffer is host memory; docs/MODEL_PIPELINE.md)"
            )
        providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(
            str(Path(folder) / decoder["filename"]),
            session_options(threads, spinning),
            providers=providers,
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._position_ids = names.get("position_ids", "position_ids")
        self.shared_buffer = self._position_ids not in inputs
        outputs = {o.name: o for o in self.session.get_outputs()}
        # The builder's prune_lm_head: logits of the last position only, [batch, 1, vocab].
        self.last_only = outputs[self._logits].shape[1] == 1
        self._logits_dtype = (
            np.float16 if outputs[self._logits].type == "tensor(float16)" else np.float32
        )
        kv_type = inputs[self._past[0][0]].type
        self.kv_dtype = np.float16 if kv_type == "tensor(float16)" else np.float32
        self.max_rows = max_rows
        self.max_len = max_len
        self._bindings: dict[tuple[int, int], ort.IOBinding] = {}
        self._kv = self._allocate(0)

    def _allocate(self, cap: int) -> np.ndarray:
        shape = (self.layers, 2, self.max_rows, self.kv_heads, cap, self.head_size)
        return np.zeros(shape, self.kv_dtype)

    @property
    def cap(self) -> int:
        return int(self._kv.shape[4])

    def ensure(self, needed: int, cached: list[int]) -> None:
        """Make every row able to hold ``needed`` tokens; ``cached[r]`` is what row ``r``
        holds now (only that is copied)."""
        if needed <= self.cap:
            return
        if needed > self.max_len:
            raise ValueError("a row would pass the buffer's length")
        target = -(-max(needed, needed * 5 // 4) // GROWTH_TOKENS) * GROWTH_TOKENS
        new = self._allocate(min(target, self.max_len))
        old = self._kv
        for layer in range(self.layers):
            for row, length in enumerate(cached):
                if length:
                    new[layer, :, row, :, :length] = old[layer, :, row, :, :length]
            _free(old[layer])
        self._kv = new
        self._bindings.clear()  # they point into the old buffer

    # ------------------------------------------------------------------ steps

    def run(self, first_row: int, tokens: np.ndarray, past: list[int]) -> np.ndarray:
        """Append ``tokens`` (``[n, S]``) to rows ``first_row .. first_row + n - 1``, whose
        caches hold ``past[i]`` tokens, and return the last position's logits, ``[n, vocab]``."""
        n, s = tokens.shape
        if first_row < 0 or first_row + n > self.max_rows or len(past) != n:
            raise ValueError("rows out of range")
        if max(past) + s > self.cap:
            raise ValueError("a row would pass the buffer's length (call ensure first)")
        if self.shared_buffer:
            logits = self._run_shared(first_row, tokens, past)
        else:
            logits = self._run_concat(first_row, tokens, past)
        return logits[:, -1, :]

    def _run_shared(self, first_row: int, tokens: np.ndarray, past: list[int]) -> np.ndarray:
        n, s = tokens.shape
        totals = [p + s for p in past]
        mask = np.zeros((n, max(totals)), dtype=np.int64)
        for i, total in enumerate(totals):
            mask[i, :total] = 1
        binding = self._binding(first_row, n)
        binding.bind_cpu_input(self._input_ids, np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_cpu_input(self._mask, mask)
        logits = np.empty((n, 1 if self.last_only else s, self.vocab_size), self._logits_dtype)
        binding.bind_output(
            self._logits, "cpu", 0, self._logits_dtype, list(logits.shape), logits.ctypes.data
        )
        self.session.run_with_iobinding(binding)
        return logits.astype(np.float32, copy=False)

    def _binding(self, first_row: int, n: int) -> ort.IOBinding:
        """An I/O binding with rows ``first_row .. +n`` of the buffer bound as past and present,
        kept for the next step over the same rows (binding 2 x layers tensors costs ~0.5 ms)."""
        key = (first_row, n)
        binding = self._bindings.get(key)
        if binding is None:
            binding = self.session.io_binding()
            for layer in range(self.layers):
                for kind in (0, 1):
                    view = self._kv[layer, kind, first_row : first_row + n]
                    shape, ptr, dtype = list(view.shape), view.ctypes.data, self.kv_dtype
                    binding.bind_input(self._past[layer][kind], "cpu", 0, dtype, shape, ptr)
                    binding.bind_output(self._present[layer][kind], "cpu", 0, dtype, shape, ptr)
            self._bindings[key] = binding
        return binding

    def _run_concat(self, first_row: int, tokens: np.ndarray, past: list[int]) -> np.ndarray:
        n, s = tokens.shape
        width = max(past)
        mask = np.zeros((n, width + s), dtype=np.int64)
        positions = np.zeros((n, s), dtype=np.int64)
        for i, p in enumerate(past):
            mask[i, :p] = 1
            mask[i, width:] = 1
            positions[i] = np.arange(p, p + s)
        feeds: dict[str, np.ndarray] = {
            self._input_ids: np.ascontiguousarray(tokens, dtype=np.int64),
            self._mask: mask,
            self._position_ids: positions,
        }
        rows = slice(first_row, first_row + n)
        for layer in range(self.layers):
            for kind in (0, 1):
                feeds[self._past[layer][kind]] = np.ascontiguousarray(
                    self._kv[layer, kind, rows, :, :width]
                )
        wanted = [self._logits] + [name for pair in self._present for name in pair]
        logits, *presents = self.session.run(wanted, feeds)
        for layer in range(self.layers):
            for kind in (0, 1):
                new = presents[2 * layer + kind][:, :, width:]
                for i, p in enumerate(past):
                    self._kv[layer, kind, first_row + i, :, p : p + s] = new[i]
        return np.asarray(logits, dtype=np.float32)

    # ------------------------------------------------------------------ slots

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached tokens of row ``src`` into row ``dst``."""
        if src == dst or length <= 0:
            return
        self._kv[:, :, dst, :, :length] = self._kv[:, :, src, :, :length]

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange the caches of rows ``a`` and ``b``."""
        if a == b:
            return
        n = max(length_a, length_b)
        if n <= 0:
            return
        held = self._kv[:, :, a, :, :n].copy()
        self._kv[:, :, a, :, :n] = self._kv[:, :, b, :, :n]
        self._kv[:, :, b, :, :n] = held

    def release(self, row: int) -> None:
        """Give row ``row``'s pages back to the kernel (they read as zeros afterwards)."""
        for layer in range(self.layers):
            for kind in (0, 1):
                _free(self._kv[layer, kind, row])

    def clear(self) -> None:
        """Drop the whole buffer (no row is running)."""
        self._bindings.clear()
        self._kv = self._allocate(0)


def _free(region: np.ndarray) -> None:
    """madvise(MADV_DONTNEED) over the whole pages inside a contiguous region."""
    if _madvise is None or not region.nbytes:
        return
    page = mmap.PAGESIZE
    start = region.ctypes.data
    first = -(-start // page) * page
    last = ((start + region.nbytes) // page) * page
    if last > first:
        _madvise(first, last - first, _MADV_DONTNEED)


__all__ = ["ModelRunner", "session_options"]
