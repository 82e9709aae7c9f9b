"""Where the runner's KV cache lives: host memory (numpy) or device memory (an ONNX Runtime
``OrtValue`` on the GPU), behind one small interface.

Both stores hold one tensor ``[layers, 2 (key, value), max_rows, kv_heads, cap, head_size]``.
For a ``(layer, kind)`` the rows ``r .. r + n - 1`` are one contiguous region, so the runner
binds them to ``GroupQueryAttention``'s past and present by pointer and shape alone; what
differs between the stores is how rows are copied (growth, compaction) and freed:

- :class:`HostKV` (the CPU engine): ``numpy.zeros`` pages, committed only when written; rows
  copied by numpy; a finished row's pages handed back with ``madvise(MADV_DONTNEED)``.
- :class:`DeviceKV` (the CUDA engine): memory from ONNX Runtime's allocator on the device;
  rows copied with ``cudaMemcpy2D`` (one call per ``(layer, kind)``: the ``kv_heads`` spans of
  a row are ``cap * head_size`` elements apart); nothing is handed back per row (device memory
  stays with the buffer, whose size the KV token budget bounds). The copy function is passed
  in, so the same store runs over host memory with ``memmove`` in the CPU test suite, which
  checks its pointer arithmetic against :class:`HostKV` on the real model.

Copies run on the legacy default stream after ``run_with_iobinding`` returned (ONNX Runtime
synchronises the provider's stream at the end of a run). A device-to-device ``cudaMemcpy2D``
may return before it completes, and ONNX Runtime's stream need not wait for the legacy one, so
each copy is followed by ``cudaDeviceSynchronize``: the next run reads finished rows (copies
are rare: a growth, a compaction).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import mmap
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnxruntime as ort

_MADV_DONTNEED = 4

# copy2d(dst, dst_pitch, src, src_pitch, width, height): ``height`` spans of ``width`` bytes,
# each ``*_pitch`` bytes after the previous one (cudaMemcpy2D's shape).
Copy2D = Callable[[int, int, int, int, int, int], None]


@dataclass(frozen=True)
class KVLayout:
    layers: int
    max_rows: int
    kv_heads: int
    head_size: int
    dtype: type[np.floating]

    @property
    def itemsize(self) -> int:
        return int(np.dtype(self.dtype).itemsize)

    def shape(self, cap: int) -> tuple[int, int, int, int, int, int]:
        return (self.layers, 2, self.max_rows, self.kv_heads, cap, self.head_size)

    def row_offset(self, cap: int, layer: int, kind: int, row: int) -> int:
        """Byte offset of row ``row`` of ``(layer, kind)`` in a buffer of length ``cap``."""
        per_row = self.kv_heads * cap * self.head_size
        return ((layer * 2 + kind) * self.max_rows + row) * per_row * self.itemsize


class KVStore(Protocol):
    layout: KVLayout
    device: str  # ONNX Runtime's device name for I/O binding: "cpu" or "cuda"

    @property
    def cap(self) -> int: ...

    def pointer(self, layer: int, kind: int, row: int) -> int: ...

    def grow(self, cap: int, cached: list[int]) -> None: ...

    def move(self, src: int, dst: int, length: int) -> None: ...

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None: ...

    def release(self, row: int) -> None: ...

    def clear(self) -> None: ...


class HostKV:
    """The cache in host memory: lazily committed zero pages, handed back per row."""

    device = "cpu"

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        self.array = np.zeros(layout.shape(0), layout.dtype)

    @property
    def cap(self) -> int:
        return int(self.array.shape[4])

    def pointer(self, layer: int, kind: int, row: int) -> int:
        return int(self.array.ctypes.data) + self.layout.row_offset(self.cap, layer, kind, row)

    def grow(self, cap: int, cached: list[int]) -> None:
        new = np.zeros(self.layout.shape(cap), self.layout.dtype)
        old = self.array
        for layer in range(self.layout.layers):
            for row, length in enumerate(cached):
                if length:
                    new[layer, :, row, :, :length] = old[layer, :, row, :, :length]
            _free(old[layer])  # each old layer goes as soon as it is copied
        self.array = new

    def move(self, src: int, dst: int, length: int) -> None:
        self.array[:, :, dst, :, :length] = self.array[:, :, src, :, :length]

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        n = max(length_a, length_b)
        held = self.array[:, :, a, :, :n].copy()
        self.array[:, :, a, :, :n] = self.array[:, :, b, :, :n]
        self.array[:, :, b, :, :n] = held

    def release(self, row: int) -> None:
        for layer in range(self.layout.layers):
            for kind in (0, 1):
                _free(self.array[layer, kind, row])

    def clear(self) -> None:
        self.array = np.zeros(self.layout.shape(0), self.layout.dtype)


class DeviceKV:
    """The cache in memory ONNX Runtime allocates on ``device``, rows copied by ``copy2d``."""

    def __init__(self, layout: KVLayout, device: str, copy2d: Copy2D) -> None:
        self.layout = layout
        self.device = device
        self._copy2d = copy2d
        self._value = self._allocate(0)
        self._cap = 0

    def _allocate(self, cap: int) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(
            list(self.layout.shape(cap)), self.layout.dtype, self.device, 0
        )

    @property
    def cap(self) -> int:
        return self._cap

    def pointer(self, layer: int, kind: int, row: int) -> int:
        return self._base(self._value) + self.layout.row_offset(self._cap, layer, kind, row)

    @staticmethod
    def _base(value: ort.OrtValue) -> int:
        return int(value.data_ptr()) if value.shape()[4] else 0

    def _pitch(self, cap: int) -> int:
        return cap * self.layout.head_size * self.layout.itemsize

    def grow(self, cap: int, cached: list[int]) -> None:
        new = self._allocate(cap)
        longest = max(cached, default=0)
        if longest:
            # One 2D copy per (layer, kind): all rows' heads are max_rows * kv_heads spans at the
            # old pitch; unused positions are copied too (harmless, never read).
            lay, spans = self.layout, self.layout.max_rows * self.layout.kv_heads
            for layer in range(lay.layers):
                for kind in (0, 1):
                    self._copy2d(
                        self._base(new) + lay.row_offset(cap, layer, kind, 0),
                        self._pitch(cap),
                        self._base(self._value) + lay.row_offset(self._cap, layer, kind, 0),
                        self._pitch(self._cap),
                        longest * lay.head_size * lay.itemsize,
                        spans,
                    )
        self._value, self._cap = new, cap

    def _copy_rows(self, dst: int, src: int, length: int) -> None:
        pitch, width = self._pitch(self._cap), length * self.layout.head_size * self.layout.itemsize
        for layer in range(self.layout.layers):
            for kind in (0, 1):
                self._copy2d(
                    self.pointer(layer, kind, dst),
                    pitch,
                    self.pointer(layer, kind, src),
                    pitch,
                    width,
                    self.layout.kv_heads,
                )

    def move(self, src: int, dst: int, length: int) -> None:
        self._copy_rows(dst, src, length)

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        n = max(length_a, length_b)
        lay = self.layout
        held = ort.OrtValue.ortvalue_from_shape_and_type(
            [lay.layers, 2, lay.kv_heads, n, lay.head_size], lay.dtype, self.device, 0
        )
        held_pitch = n * lay.head_size * lay.itemsize
        pitch = self._pitch(self._cap)
        for layer in range(lay.layers):
            for kind in (0, 1):
                spot = int(held.data_ptr()) + (layer * 2 + kind) * lay.kv_heads * held_pitch
                a_ptr, b_ptr = self.pointer(layer, kind, a), self.pointer(layer, kind, b)
                self._copy2d(spot, held_pitch, a_ptr, pitch, held_pitch, lay.kv_heads)
                self._copy2d(a_ptr, pitch, b_ptr, pitch, held_pitch, lay.kv_heads)
                self._copy2d(b_ptr, pitch, spot, held_pitch, held_pitch, lay.kv_heads)

    def release(self, row: int) -> None:
        """Nothing per row: device memory stays with the buffer until :meth:`clear`."""

    def clear(self) -> None:
        self._value, self._cap = self._allocate(0), 0


# ---------------------------------------------------------------------- copies


def host_copy2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
    """cudaMemcpy2D's contract over host memory (for :class:`DeviceKV` on the CPU)."""
    for i in range(height):
        ctypes.memmove(dst + i * dpitch, src + i * spitch, width)


_CUDA_MEMCPY_DEVICE_TO_DEVICE = 3


def cuda_copy2d() -> Copy2D:
    """``cudaMemcpy2D`` device to device, from the CUDA runtime that ONNX Runtime's CUDA
    provider loaded (or the one in the ``nvidia-cuda-runtime`` wheel)."""
    runtime = _load_cudart()
    memcpy2d = runtime.cudaMemcpy2D
    memcpy2d.argtypes = [ctypes.c_void_p, ctypes.c_size_t] * 2 + [ctypes.c_size_t] * 2
    memcpy2d.argtypes += [ctypes.c_int]
    memcpy2d.restype = ctypes.c_int
    synchronize = runtime.cudaDeviceSynchronize
    synchronize.restype = ctypes.c_int
    error_string = runtime.cudaGetErrorString
    error_string.argtypes = [ctypes.c_int]
    error_string.restype = ctypes.c_char_p

    def copy2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        if not width or not height:
            return
        code = memcpy2d(dst, dpitch, src, spitch, width, height, _CUDA_MEMCPY_DEVICE_TO_DEVICE)
        code = code or synchronize()
        if code:
            raise RuntimeError(f"cudaMemcpy2D failed: {error_string(code).decode()}")

    return copy2d


def _load_cudart() -> ctypes.CDLL:
    names = ["libcudart.so.13", "libcudart.so.12"]
    for site in sys.path:
        names += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libcudart.so.*")))
        names += sorted(glob.glob(os.path.join(site, "nvidia", "*", "*", "lib", "libcudart.so.*")))
    found = ctypes.util.find_library("cudart")
    if found:
        names.append(found)
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("the CUDA runtime (libcudart) was not found")


# ---------------------------------------------------------------------- host pages


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


__all__ = [
    "Copy2D",
    "DeviceKV",
    "HostKV",
    "KVLayout",
    "KVStore",
    "cuda_copy2d",
    "host_copy2d",
]
