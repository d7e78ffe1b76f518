"""A KV cache resident on a Vulkan device (``Context.kv_cache``): the serving call appends the new
rows with glsl/kv_append.comp and the ragged kernel reads the cache in place, so a decode step moves
only q, the new k/v rows and a few small buffers.

One ``DeviceKVCache`` holds K or V: ``[B, S, Hkv, D]`` contiguous or ``[num_blocks, page_size, Hkv, D]``
paged, in q's float dtype or as q8_0 (int8 values and an fp16 scale per 32, quantized on the host as
they are appended: only the new rows).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..dtypes import ITEMSIZE, STORAGE
from ..q8 import dequantize
from .configs import DTYPE_CODE
from .plan import binding_limit, mapped_memory, round_up, stats

KERNEL = "kv_append"
WORKGROUP = 64
_serial = itertools.count()


@dataclass
class RowRotation:
    """RoPE applied to rows as they are written (glsl/kv_append.comp): ``cos``/``sin`` ``[n, half]``
    (held as float32, what the kernel reads), row i's own (gathered at its position); channels
    ``[offset, offset + 2 half)`` of every head, "half" or ``interleaved`` pairs (flash-attn's
    ``apply_rotary``)."""

    cos: np.ndarray
    sin: np.ndarray
    interleaved: bool
    offset: int = 0

    def __post_init__(self) -> None:
        self.cos = np.ascontiguousarray(self.cos, np.float32)
        self.sin = np.ascontiguousarray(self.sin, np.float32)

    @property
    def half(self) -> int:
        return int(self.cos.shape[1])


class DeviceKVCache:
    """K or V of a KV cache in device memory (made by ``aule_kp.Context.kv_cache``); pass it as
    ``k_cache``/``v_cache`` to :func:`aule_kp.flash_attention_with_kvcache`. ``download()`` returns
    its values (float32 for q8_0) for checks; it lives until ``free()`` or its Context closes."""

    def __init__(self, device: Any, shape: Tuple[int, int, int, int], dtype: str, quantized: bool) -> None:
        self.device = device
        self.shape = tuple(int(s) for s in shape)
        self.dtype_name = dtype
        self.q8 = bool(quantized)
        self.serial = next(_serial)
        n0, n1, h, d = self.shape
        rows = n0 * n1
        if self.q8 and (d % 32 or (h * d // 32) % 2):
            raise ValueError(f"a q8_0 device cache needs a head dim that is a multiple of 32 and Hkv * D / 32 even "
                             f"(whole words of fp16 scales per row), got Hkv {h}, D {d}")
        self.row_bytes = h * d * (1 if self.q8 else ITEMSIZE[dtype])
        self.scale_row_bytes = h * d // 32 * 2 if self.q8 else 0
        limit = binding_limit(device.caps.max_storage_buffer_range)
        if rows * self.row_bytes > limit:
            raise ValueError(f"a cache of shape {self.shape} needs {rows * self.row_bytes} B: over the device's "
                             f"{limit} B storage binding limit")
        if self.row_bytes % 4:
            raise ValueError(f"a cache row (Hkv * D values) must fill whole 4-byte words, got {self.row_bytes} B")
        kp = device.kp
        kind = kp.TensorTypes.host if device.host_memory else kp.TensorTypes.device
        with device.lock:
            mgr = device.manager
            self.data = mgr.tensor_t(np.zeros(max(rows * self.row_bytes // 4, 1), np.uint32), kind)
            self.scales = mgr.tensor_t(np.zeros(max(rows * self.scale_row_bytes // 4, 1), np.uint32), kind)
            # The zeros are in the host copy: put them on the device once.
            init = mgr.sequence().record(kp.OpTensorSyncDevice([self.data, self.scales]))
            init.eval()
            init.destroy()
        self._append: Optional[_AppendPlan] = None

    @property
    def nbytes(self) -> int:
        rows = self.shape[0] * self.shape[1]
        return rows * (self.row_bytes + self.scale_row_bytes)

    def _live(self) -> None:
        if self.data is None:
            raise ValueError("this DeviceKVCache was freed (DeviceKVCache.free or its Context closed)")

    def write(self, rows: np.ndarray, values: np.ndarray, scales: Optional[np.ndarray],
              rotary: Optional[RowRotation] = None) -> None:
        """Writes host ``values`` (``[n, Hkv, D]``: storage of the dtype, or int8 with ``scales``
        float16 ``[n, Hkv, D/32]``) into cache rows ``rows`` (flat: block * page_size + slot).

        ``rotary``: float values are rotated on the device as they are written (RoPE of every
        head, with the cos/sin rows of each written row: see ``RowRotation``)."""
        self._live()
        if len(rows) == 0:
            return
        if rotary is not None and (self.q8 or self.shape[3] % 2 or rotary.offset % 2
                                   or rotary.offset + 2 * rotary.half > self.shape[3]):
            raise ValueError(f"a device rotation needs a float cache of even head dim holding channels "
                             f"[{rotary.offset}, {rotary.offset + 2 * rotary.half}) at an even offset; got "
                             f"{self!r}")
        parts = [(self.data, values, self.row_bytes)]
        if self.q8:
            parts.append((self.scales, scales, self.scale_row_bytes))
        tables = None if rotary is None else np.concatenate([rotary.cos.reshape(-1), rotary.sin.reshape(-1)])
        need = {"src": max(p[1].nbytes for p in parts), "rows": 4 * len(rows),
                "tables": 0 if tables is None else tables.nbytes}
        with self.device.lock:
            if self._append is None or not self._append.fits(need):
                old = self._append
                dtype = 0 if self.q8 else DTYPE_CODE[self.dtype_name]
                self._append = _AppendPlan(self.device, [p[0] for p in parts], need, old, dtype)
            push = np.zeros(6, np.uint32)
            if rotary is not None:
                push[:] = (1, self.shape[3], rotary.half, rotary.offset, int(rotary.interleaved), rotary.cos.size)
            self._append.run(rows.astype(np.uint32), [(p[1], p[2]) for p in parts], tables, push)

    def tensors(self) -> Dict[str, Any]:
        """The kp tensors the ragged kernel binds for this cache as K or V (data, scales)."""
        self._live()
        return {"data": self.data, "scales": self.scales}

    def download(self) -> np.ndarray:
        """The cache's values: float32 for q8_0, else the dtype's host storage (bf16 as uint16 bits)."""
        self._live()
        kp = self.device.kp
        with self.device.lock:
            seq = self.device.manager.sequence().record(kp.OpTensorSyncLocal([self.data, self.scales]))
            seq.eval()
            seq.destroy()
            raw = mapped_memory(self.data).view(np.uint8)[: self.shape[0] * self.shape[1] * self.row_bytes].copy()
            sc = mapped_memory(self.scales).view(np.uint8)[: self.shape[0] * self.shape[1] * self.scale_row_bytes]
            sc = sc.copy()
        if not self.q8:
            return raw.view(STORAGE[self.dtype_name]).reshape(self.shape)
        n0, n1, h, d = self.shape
        return dequantize(raw.view(np.int8).reshape(self.shape), sc.view(np.float16).reshape(n0, n1, h, d // 32))

    def free(self) -> None:
        """Releases the device memory now; idempotent."""
        if self.data is None:
            return
        with self.device.lock:
            self.device.plans.drop(lambda key: isinstance(key, tuple) and len(key) > 3 and key[2] == "io"
                                   and self.serial in key[3])
            if self._append is not None:
                self._append.destroy()
            self.data.destroy()
            self.scales.destroy()
        self.data = self.scales = None
        self._append = None

    def __repr__(self) -> str:
        kind = "q8_0" if self.q8 else self.dtype_name
        return f"DeviceKVCache(shape={self.shape}, dtype={kind}{'' if self.data is not None else ', freed'})"


class _AppendPlan:
    """The append dispatches of one cache: a source buffer per destination (data, scales), the
    row indices and the rotation's cos/sin rows, host-written; one algorithm per destination."""

    def __init__(self, device: Any, targets: List[Any], need: Dict[str, int], old: Optional[_AppendPlan],
                 dtype: int) -> None:
        self.device = device
        cap = {name: max(n, round_up(n, 1), 256, old.capacity.get(name, 0) if old else 0) for name, n in need.items()}
        if old is not None:
            old.destroy()
        self.capacity = cap
        self.rows = device.io_tensor(np.zeros(math.ceil(cap["rows"] / 4), np.uint32), "in")
        self.rows_mem = mapped_memory(self.rows).view(np.uint8)
        self.tables = device.io_tensor(np.zeros(math.ceil(cap["tables"] / 4), np.float32), "in")
        self.tables_mem = mapped_memory(self.tables)
        self.srcs, self.src_mems, self.algorithms = [], [], []
        # One grid over the whole source buffer (the shader stops at n_words): no grid to set per call.
        grid = (math.ceil(cap["src"] / 4 / WORKGROUP), 1, 1)
        for dst in targets:
            src = device.io_tensor(np.zeros(math.ceil(cap["src"] / 4), np.uint32), "in")
            self.srcs.append(src)
            self.src_mems.append(mapped_memory(src).view(np.uint8))
            stats["algorithms"] += 1
            self.algorithms.append(device.manager.algorithm([dst, src, self.rows, self.tables], device.spirv(KERNEL),
                                                            grid, np.array([dtype, 0], np.uint32),
                                                            np.zeros(8, np.uint32)))

    def fits(self, need: Dict[str, int]) -> bool:
        return all(n <= self.capacity[name] for name, n in need.items())

    def run(self, rows: np.ndarray, parts: List[Tuple[np.ndarray, int]], tables: Optional[np.ndarray],
            rotation: np.ndarray) -> None:
        """Copies ``parts`` ((values, row bytes) per destination) to ``rows``; ``rotation``: the
        kernel's rotation push constants (zeros: none) and ``tables`` its cos/sin rows."""
        kp = self.device.kp
        raw_rows = rows.view(np.uint8)
        self.rows_mem[: raw_rows.nbytes] = raw_rows
        sent = [self.rows, *self.srcs[: len(parts)]]
        if tables is not None:
            self.tables_mem[: tables.size] = tables
            sent.append(self.tables)
        seq = self.device.manager.sequence()
        try:
            seq.record(kp.OpTensorSyncDevice(sent))
            for (values, row_bytes), mem, algorithm in zip(parts, self.src_mems, self.algorithms):
                raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
                mem[: raw.nbytes] = raw
                words = raw.nbytes // 4
                seq.record(kp.OpAlgoDispatch(algorithm, np.concatenate([np.array([row_bytes // 4, words], np.uint32),
                                                                        rotation])))
            seq.eval()
            stats["evals"] += 1
        finally:
            seq.destroy()

    def destroy(self) -> None:
        for algorithm in self.algorithms:
            algorithm.destroy()
        self.algorithms.clear()
