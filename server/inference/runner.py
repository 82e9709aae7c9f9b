"""The exported decoder graph driven by plain ONNX Runtime over a KV buffer with one slot per row.

Why plain ONNX Runtime (figures in docs/MODEL_PIPELINE.md): onnxruntime-genai 0.18 holds
Python's GIL through every step and admits no row into a running batch on the CPU; a plain
``InferenceSession`` releases the GIL while it runs, and the builder's ``GroupQueryAttention``
takes a sequence length per row, so rows of different lengths share one step.

The buffer. One tensor ``[layers, 2 (key, value), max_rows, kv_heads, cap, head_size]`` holds
every row's cache; row ``r`` is slot ``r``. It lives in host memory on the CPU and in device
memory under CUDA (:mod:`encloud.server.inference.kv_buffer`); what follows is the host one.
Its length ``cap`` grows, by copying, only when a row needs more (to the next multiple of
``GROWTH_TOKENS`` above 5/4 of the need, at most ``max_len``): ``GroupQueryAttention`` on the CPU
does work in proportion to the buffer's length (measured: a 40-token prompt took 87 ms over a
512-token buffer, 466 ms over 8,192), so a buffer as long as the context would slow every step. It
is allocated with ``numpy.zeros``, which maps fresh zero pages that the kernel commits only when
written; only cached tokens are ever written or copied, so its resident size follows the tokens
actually cached (page-rounded), never ``max_rows x cap``; when a row ends, :meth:`release` hands its
pages back (``madvise(MADV_DONTNEED)``), and a growth copy frees each old layer as soon as it is
copied.
The KV token budget is enforced by the scheduler's admission, not here. Under CUDA the same
tensor is device memory and rows move by device copies; inputs and logits stay host memory
(ONNX Runtime copies them).

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

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from encloud.server.inference.kv_buffer import (
    DeviceKV,
    HostKV,
    KVLayout,
    KVStore,
    cuda_copy2d,
)

GROWTH_TOKENS = 256
PROVIDERS = ("cpu", "cuda")


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


def execution_providers(provider: str) -> list:
    """ONNX Runtime's provider list for ``provider``; CUDA libraries from the ``nvidia-*``
    wheels are loaded first where this ONNX Runtime can (``preload_dlls``)."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(
                "provider 'cuda': this ONNX Runtime has no CUDA provider "
                "(install onnxruntime-gpu from requirements/server-gpu.lock)"
            )
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            preload(directory="")
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    raise ValueError(f"provider must be one of {PROVIDERS}, not {provider!r}")


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
        kv_store: Callable[[KVLayout], KVStore] | None = None,
    ) -> None:
        """``kv_store`` builds the store (tests run :class:`DeviceKV` over host memory);
        default: host memory on the CPU, device memory under CUDA."""
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
        self.provider = provider
        self.session = ort.InferenceSession(
            str(Path(folder) / decoder["filename"]),
            session_options(threads, spinning),
            providers=execution_providers(provider),
        )
        if provider == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # ONNX Runtime falls back to the CPU when the CUDA provider fails to load (a missing
            # cuDNN, an old driver); the device store would then be bound to a CPU session.
            raise ValueError(
                "provider 'cuda': ONNX Runtime could not start its CUDA provider here "
                "(see its log for the missing library or driver)"
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
        layout = KVLayout(self.layers, max_rows, self.kv_heads, self.head_size, self.kv_dtype)
        self._store = kv_store(layout) if kv_store is not None else _store_for(provider, layout)
        if not self.shared_buffer and not isinstance(self._store, HostKV):
            # The plain-attention path gathers and scatters rows with numpy.
            raise ValueError(
                f"provider {provider!r} serves the builder's GroupQueryAttention graph only; "
                "this export has plain attention (position_ids)"
            )

    @property
    def cap(self) -> int:
        return self._store.cap

    @property
    def kv_device(self) -> str:
        return self._store.device

    def ensure(self, needed: int, cached: list[int]) -> None:
        """Make every row able to hold ``needed`` tokens; ``cached[r]`` is what row ``r``
        holds now (only that is copied)."""
        if needed <= self.cap:
            return
        if needed > self.max_len:
            raise ValueError("a row would pass the buffer's length")
        target = -(-max(needed, needed * 5 // 4) // GROWTH_TOKENS) * GROWTH_TOKENS
        self._bindings.clear()  # they point into the old buffer
        self._store.grow(min(target, self.max_len), cached)

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
            shape = [n, self.kv_heads, self.cap, self.head_size]
            device, dtype = self._store.device, self.kv_dtype
            for layer in range(self.layers):
                for kind in (0, 1):
                    ptr = self._store.pointer(layer, kind, first_row)
                    binding.bind_input(self._past[layer][kind], device, 0, dtype, shape, ptr)
                    binding.bind_output(self._present[layer][kind], device, 0, dtype, shape, ptr)
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
        kv = self._host_array()
        for layer in range(self.layers):
            for kind in (0, 1):
                feeds[self._past[layer][kind]] = np.ascontiguousarray(
                    kv[layer, kind, rows, :, :width]
                )
        wanted = [self._logits] + [name for pair in self._present for name in pair]
        logits, *presents = self.session.run(wanted, feeds)
        for layer in range(self.layers):
            for kind in (0, 1):
                new = presents[2 * layer + kind][:, :, width:]
                for i, p in enumerate(past):
                    kv[layer, kind, first_row + i, :, p : p + s] = new[i]
        return np.asarray(logits, dtype=np.float32)

    def _host_array(self) -> np.ndarray:
        assert isinstance(self._store, HostKV)
        return self._store.array

    # ------------------------------------------------------------------ slots

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached tokens of row ``src`` into row ``dst``."""
        if src == dst or length <= 0:
            return
        self._store.move(src, dst, length)

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange the caches of rows ``a`` and ``b``."""
        if a == b or max(length_a, length_b) <= 0:
            return
        self._store.swap(a, b, length_a, length_b)

    def release(self, row: int) -> None:
        """Row ``row`` ended: give its memory back where the store can (host pages)."""
        self._store.release(row)

    def clear(self) -> None:
        """Drop the whole buffer (no row is running)."""
        self._bindings.clear()
        self._store.clear()


def _store_for(provider: str, layout: KVLayout) -> KVStore:
    if provider == "cuda":
        return DeviceKV(layout, "cuda", cuda_copy2d())
    return HostKV(layout)


__all__ = ["PROVIDERS", "ModelRunner", "execution_providers", "session_options"]
