"""The KV stores: the device store (the CUDA engine's, rows moved by 2D copies) run over host
memory with ``memmove`` must hold exactly what the host store holds after the same growths,
moves and swaps, first on random data, then through the real model's runner (the logits of
every step equal, bit for bit).

The exporter's CUDA precision (``fp16``, built with ``-e cuda``) also runs on ONNX Runtime's CPU
kernels, so its graph (fp16 KV, fp16 logits) is served here through the device store too.
The CUDA copy itself (``cudaMemcpy2D``) and the CUDA kernels run only on a GPU:
``scripts/gpu-check``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from conftest import cache_root
from test_batching import _run_batched

from encloud.server.inference.engine import ChatTurn, Engine, GenerationParams
from encloud.server.inference.kv_buffer import DeviceKV, HostKV, KVLayout, KVStore, host_copy2d
from encloud.server.inference.runner import ModelRunner


def _device_on_host(layout: KVLayout) -> DeviceKV:
    return DeviceKV(layout, "cpu", host_copy2d)


def _write_row(store: KVStore, layer: int, kind: int, row: int, data: np.ndarray) -> None:
    data = np.ascontiguousarray(data, dtype=store.layout.dtype)
    ctypes.memmove(store.pointer(layer, kind, row), data.ctypes.data, data.nbytes)


def _read_row(store: KVStore, layer: int, kind: int, row: int, length: int) -> np.ndarray:
    lay = store.layout
    out = np.empty((lay.kv_heads, store.cap, lay.head_size), lay.dtype)
    ctypes.memmove(out.ctypes.data, store.pointer(layer, kind, row), out.nbytes)
    return out[:, :length]


def _fill(stores: list[KVStore], rng: np.random.Generator, lengths: list[int]) -> None:
    lay = stores[0].layout
    for layer in range(lay.layers):
        for kind in (0, 1):
            for row, length in enumerate(lengths):
                data = np.zeros((lay.kv_heads, stores[0].cap, lay.head_size), lay.dtype)
                data[:, :length] = rng.standard_normal((lay.kv_heads, length, lay.head_size))
                for store in stores:
                    _write_row(store, layer, kind, row, data)


def _assert_same(a: KVStore, b: KVStore, lengths: list[int]) -> None:
    assert a.cap == b.cap
    for layer in range(a.layout.layers):
        for kind in (0, 1):
            for row, length in enumerate(lengths):
                np.testing.assert_array_equal(
                    _read_row(a, layer, kind, row, length), _read_row(b, layer, kind, row, length)
                )


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_device_store_matches_host_store_through_growth_moves_and_swaps(dtype: type) -> None:
    layout = KVLayout(layers=3, max_rows=4, kv_heads=2, head_size=8, dtype=dtype)
    host, device = HostKV(layout), _device_on_host(layout)
    rng = np.random.default_rng(7)
    lengths = [5, 3, 7, 0]
    for store in (host, device):
        store.grow(16, [0, 0, 0, 0])
    _fill([host, device], rng, lengths)
    _assert_same(host, device, lengths)

    for store in (host, device):  # growth keeps every row's cached tokens
        store.grow(48, lengths)
    _assert_same(host, device, lengths)

    for store in (host, device):  # compaction: row 2 into row 3, then rows 0 and 1 exchanged
        store.move(2, 3, 7)
        store.swap(0, 1, 5, 3)
    lengths = [3, 5, 7, 7]
    _assert_same(host, device, lengths)
    expected_row0 = _read_row(host, 1, 0, 0, 3)
    assert np.any(expected_row0 != 0)  # a swap that copied nothing would still compare equal

    for store in (host, device):
        store.clear()
        assert store.cap == 0


@pytest.mark.unit
def test_row_pointers_follow_the_documented_layout() -> None:
    """Rows r .. r+n of one (layer, kind) are contiguous, so the runner binds them by one
    pointer: the pointer arithmetic equals numpy's indexing of the same tensor."""
    layout = KVLayout(layers=2, max_rows=3, kv_heads=2, head_size=4, dtype=np.float32)
    host = HostKV(layout)
    host.grow(8, [0, 0, 0])
    for layer in range(2):
        for kind in (0, 1):
            for row in range(3):
                view = host.array[layer, kind, row:]
                assert view.flags.c_contiguous
                assert host.pointer(layer, kind, row) == view.ctypes.data


@pytest.fixture(scope="module")
def cuda_export() -> Path:
    """The exporter's CUDA precision of the embedded model (~15 s the first time, then cached)."""
    from encloud.server.inference.export import export_model

    return export_model(None, cache_root(), "fp16", progress=lambda _: None)


@pytest.mark.engine
@pytest.mark.parametrize("export", ["served", "cuda-fp16"])
def test_runner_over_the_device_store_computes_what_the_host_store_computes(
    export: str, request: pytest.FixtureRequest
) -> None:
    """The scheduler's own sequence on the real model: two rows prefilled in one batched call,
    decoding, a growth, a row compacted into a lower slot, a swap; every step's logits equal."""
    model_dir = request.getfixturevalue("model_dir" if export == "served" else "cuda_export")

    def runner(kv_store=None) -> ModelRunner:  # type: ignore[no-untyped-def]
        return ModelRunner(
            model_dir,
            threads=2,
            spinning=False,
            provider="cpu",
            max_rows=3,
            max_len=1024,
            kv_store=kv_store,
        )

    host, device = runner(), runner(_device_on_host)
    assert host.kv_device == device.kv_device == "cpu"
    rng = np.random.default_rng(3)
    prompt = rng.integers(100, 20000, size=(2, 24))

    def both(first_row: int, tokens: np.ndarray, past: list[int]) -> np.ndarray:
        a = host.run(first_row, tokens, past)
        b = device.run(first_row, tokens, past)
        np.testing.assert_array_equal(a, b)
        return a

    for r in (host, device):
        r.ensure(40, [0, 0, 0])
    logits = both(1, prompt, [0, 0])  # rows 1 and 2
    cached = [0, 24, 24]
    for _ in range(4):
        tokens = np.argmax(logits, axis=-1).reshape(2, 1)
        logits = both(1, tokens, cached[1:])
        cached = [0, cached[1] + 1, cached[2] + 1]
    for r in (host, device):
        r.ensure(300, cached)  # growth past the first buffer length
        r.move(2, 0, cached[2])  # row 2 compacted into row 0
        r.release(2)
    cached = [cached[2], cached[1], 0]
    logits = both(0, np.argmax(logits[::-1], axis=-1).reshape(2, 1), cached[:2])
    cached = [cached[0] + 1, cached[1] + 1, 0]
    for r in (host, device):
        r.swap(0, 1, cached[0], cached[1])
    cached = [cached[1], cached[0], 0]
    both(0, np.argmax(logits[::-1], axis=-1).reshape(2, 1), cached[:2])


@pytest.mark.engine
def test_the_cuda_export_serves_through_the_device_store(cuda_export: Path) -> None:
    """The CUDA precision's graph through the engine with the device store (on host memory):
    fp16 KV and logits; the known answer and a batch of answers equal the host store's."""
    host = Engine.load(cuda_export, threads=2, max_batch=4)
    device = Engine.load(cuda_export, threads=2, max_batch=4, kv_store=_device_on_host)
    try:
        assert host.runner.kv_dtype == np.float16
        assert host.known_answer == device.known_answer
        assert host.precision == "fp16"
        prompts = ["What is the capital of France?", "Name three colours.", "Explain gravity."]
        answers = [_batched(host, prompts), _batched(device, prompts)]
        assert answers[0] == answers[1]
        assert "Paris" in answers[0][0]
    finally:
        host.close()
        device.close()


def _batched(engine: Engine, prompts: list[str]) -> list[str]:
    """The prompts' greedy answers, admitted together (so they share steps)."""
    jobs = [(GenerationParams((ChatTurn("user", p),), 12), lambda: False) for p in prompts]
    out = _run_batched(engine, jobs)
    return [out[i][0] for i in range(len(prompts))]
