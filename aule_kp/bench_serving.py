"""``aule-kp bench --preset serving``: prefill and decode sweeps of the serving calls.

Prefill: a batch of B causal sequences of ``ctx`` tokens each, packed (``flash_attention_varlen``).
Decode: one new token per sequence appended to a paged cache holding ``ctx - 1`` tokens and attended
over (``flash_attention_with_kvcache``; page 16, pages shuffled); the same step is repeated, so every
call writes the same slot. Batch 1-32 and context 128-32K with Llama-3-8B heads (32/8, D128, fp16)
on a GPU; on a CPU device (lavapipe, or no Vulkan) the sweep is scaled down: 8/2 heads, D64, fp32,
batch 1-16, context 128-2048 (``--scale`` divides the contexts further).

Rows: the aule-kp backends (NumPy inputs for vulkan/cpu; torch tensors on the CUDA/ROCm device for
triton), a q8_0 cache on decode (``aule-kp <backend> q8_0``), torch SDPA over the same keys padded to
one length (dense batch; decode over the contiguous cache), naive attention in NumPy (scores
materialised), and flash-attn's own calls when ``flash_attn`` is installed with a CUDA device. Every
row reports ms (median), tokens/s (prefill: B * ctx tokens per call; decode: B), the peak host memory
of one call and, for decode, the KV cache's size; a sample of rows is checked against float64.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import tracemalloc
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .bench import median_time
from .dtypes import STORAGE, from_f32, to_f32
from .q8 import Q8Cache
from .serving import flash_attention_varlen, flash_attention_with_kvcache

log = logging.getLogger("aule_kp")

PAGE = 16


@dataclass(frozen=True)
class ServingCase:
    """One step: ``kind`` "prefill" or "decode", ``batch`` sequences of ``ctx`` tokens, heads, head dim."""

    kind: str
    batch: int
    ctx: int
    hq: int
    hkv: int
    d: int
    dtype: str

    def label(self) -> str:
        return f"{self.kind} B{self.batch} ctx{self.ctx} H{self.hq}/{self.hkv} D{self.d} {self.dtype}"

    @property
    def tokens(self) -> int:
        """Tokens one call processes (its throughput unit)."""
        return self.batch * (self.ctx if self.kind == "prefill" else 1)

    def flops(self) -> float:
        """Multiply-adds x2 of the two matmuls over the visible pairs (causal prefill: ~half)."""
        pairs = self.ctx * (self.ctx + 1) / 2 if self.kind == "prefill" else self.ctx
        return 4.0 * self.batch * self.hq * pairs * self.d


def cases(gpu: bool, scale: float = 1.0) -> List[ServingCase]:
    """The sweep: GPU-sized (Llama-3-8B heads) or scaled down for a CPU device; contexts / ``scale``."""
    if gpu:
        shape, batches, contexts, prefill_max = (32, 8, 128, "float16"), (1, 8, 32), (128, 1024, 8192, 32768), 8192
    else:
        shape, batches, contexts, prefill_max = (8, 2, 64, "float32"), (1, 4, 16), (128, 512, 2048), 512
    out = []
    for kind in ("prefill", "decode"):
        for b in batches:
            for ctx in contexts:
                if kind == "prefill" and ctx > prefill_max:
                    continue  # the longest prefills would take minutes on such a machine
                c = max(16, int(round(ctx / scale)))
                case = ServingCase(kind, b, c, *shape)
                if case not in out:
                    out.append(case)
    return out


def _rng_data(case: ServingCase, seed: int = 0) -> Dict[str, Any]:
    """Host inputs in the case's storage: packed q/k/v for prefill; q, new k/v, a paged cache and its
    table (pages shuffled) for decode."""
    rng = np.random.default_rng(seed)
    b, n, hq, hkv, d = case.batch, case.ctx, case.hq, case.hkv, case.d

    def rand(*shape: int) -> np.ndarray:
        return from_f32(rng.standard_normal(shape, dtype=np.float32), case.dtype)

    if case.kind == "prefill":
        cu = (np.arange(b + 1) * n).astype(np.int32)
        return {"q": rand(b * n, hq, d), "k": rand(b * n, hkv, d), "v": rand(b * n, hkv, d), "cu": cu}
    per = -(-n // PAGE)
    table = rng.permutation(b * per).reshape(b, per).astype(np.int32)
    return {"q": rand(b, 1, hq, d), "k_new": rand(b, 1, hkv, d), "v_new": rand(b, 1, hkv, d),
            "k_cache": rand(b * per, PAGE, hkv, d), "v_cache": rand(b * per, PAGE, hkv, d), "table": table,
            "seqlens": np.full(b, n - 1, np.int32)}


def _row(case: ServingCase, who: str, seconds: Optional[float], err: Optional[float] = None,
         peak: Optional[float] = None, kv_mb: Optional[float] = None, note: str = "") -> Dict[str, Any]:
    return {"case": case.label(), "backend": who, "ms": None if seconds is None else seconds * 1e3,
            "tflops": None if not seconds else case.flops() / seconds / 1e12,
            "tokens_per_s": None if not seconds else case.tokens / seconds, "max_err": err, "peak_mb": peak,
            "kv_cache_mb": kv_mb, "note": note}


def _dense(case: ServingCase, data: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 q ``[B, Hq, Lq, D]`` and k, v ``[B, Hkv, ctx, D]``: the case's keys padded to one length
    (all sequences have one length here), as a dense attention call sees them."""
    b, n, d = case.batch, case.ctx, case.d
    if case.kind == "prefill":
        q, k, v = (to_f32(data[x], case.dtype).reshape(b, n, -1, d).transpose(0, 2, 1, 3) for x in ("q", "k", "v"))
        return q, k, v
    t = data["table"]
    rows = [np.concatenate([data[c][t[s]].reshape(-1, case.hkv, d)[: n - 1],
                            data["k_new" if c == "k_cache" else "v_new"][s]]) for c in ("k_cache", "v_cache")
            for s in range(b)]
    k = np.stack(rows[:b]).transpose(0, 2, 1, 3)
    v = np.stack(rows[b:]).transpose(0, 2, 1, 3)
    return to_f32(data["q"], case.dtype).transpose(0, 2, 1, 3), to_f32(k, case.dtype), to_f32(v, case.dtype)


def _max_err(case: ServingCase, data: Dict[str, Any], out: np.ndarray) -> float:
    """Max abs error of head 0 of the first sequence against float64 (bottom-right causal for prefill)."""
    q, k, v = _dense(case, data)
    qf, kf, vf = (x[0, 0].astype(np.float64) for x in (q, k, v))
    s = qf @ kf.T / math.sqrt(case.d)
    if case.kind == "prefill":
        s = np.where(np.tril(np.ones(s.shape, bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = p @ vf / p.sum(-1, keepdims=True)
    got = to_f32(np.asarray(out), case.dtype)
    got = got[: case.ctx, 0] if case.kind == "prefill" else got[0, :, 0]
    return float(np.abs(got - ref).max())


def _timed(case: ServingCase, who: str, call: Callable[[], Any], repeat: int, data: Dict[str, Any],
           kv_mb: Optional[float] = None, to_host: Callable[[Any], np.ndarray] = np.asarray,
           sync: Callable[[], None] = lambda: None) -> Dict[str, Any]:
    out = call()
    tracemalloc.start()
    call()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    seconds = median_time(call, repeat, warmup=0, sync=sync)
    return _row(case, who, seconds, _max_err(case, data, to_host(out)), peak, kv_mb)


def _kv_mb(case: ServingCase, q8: bool = False) -> float:
    per_value = 34 / 32 if q8 else STORAGE[case.dtype].itemsize
    return 2 * case.batch * case.ctx * case.hkv * case.d * per_value / 2**20


def _cuda_data(case: ServingCase, data: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """``data`` as CUDA tensors (floating ones in the case's dtype): the Triton and flash-attn rows' inputs."""
    import torch

    dt = getattr(torch, case.dtype)
    t = {name: torch.from_numpy(np.ascontiguousarray(x)).cuda() for name, x in data.items()}
    return {name: (x.to(dt) if x.is_floating_point() else x) for name, x in t.items()}


def bench_ours(case: ServingCase, backend: str, repeat: int, q8: bool = False) -> Dict[str, Any]:
    """An aule-kp serving call (``q8``: a q8_0 cache; decode only): on NumPy inputs, or for the Triton
    backend (which takes CUDA tensors) on CUDA tensors, synchronised."""
    data = _rng_data(case)
    who = f"aule-kp {backend}" + (" q8_0" if q8 else "")
    args, sync, to_host = data, (lambda: None), np.asarray
    if backend == "triton":
        torch = _torch_device("cuda")
        if torch is None:
            return _row(case, who, None, note="skipped: the Triton backend takes CUDA tensors; no CUDA here")
        args, sync = _cuda_data(case, data), torch.cuda.synchronize
        to_host = lambda o: from_f32(o.float().cpu().numpy(), case.dtype)  # noqa: E731
    if case.kind == "prefill":
        def call() -> Any:
            return flash_attention_varlen(args["q"], args["k"], args["v"], args["cu"], args["cu"], case.ctx, case.ctx,
                                          causal=True, backend=backend)
        return _timed(case, who, call, repeat, data, to_host=to_host, sync=sync)
    kc, vc = args["k_cache"], args["v_cache"]
    if q8:
        kc, vc = Q8Cache.from_float(to_f32(kc, case.dtype)), Q8Cache.from_float(to_f32(vc, case.dtype))

    def step() -> Any:
        return flash_attention_with_kvcache(args["q"], kc, vc, args["k_new"], args["v_new"],
                                            cache_seqlens=args["seqlens"], block_table=args["table"], causal=True,
                                            backend=backend)
    row = _timed(case, who, step, repeat, data, _kv_mb(case, q8), to_host=to_host, sync=sync)
    if q8:
        row["note"] = "max err vs the float cache's values"
    return row


def _torch_device(device: str) -> Optional[Any]:
    try:
        import torch
    except ImportError:
        return None
    return torch if device == "cpu" or torch.cuda.is_available() else None


def bench_torch(case: ServingCase, repeat: int, device: str) -> Dict[str, Any]:
    """torch SDPA on the dense (padded) batch: ``[B, Hq, L, D]`` with GQA, causal for prefill."""
    who = f"torch SDPA {device}"
    torch = _torch_device(device)
    if torch is None:
        return _row(case, who, None, note=f"skipped: no torch on {device}")
    data = _rng_data(case)
    dt = getattr(torch, case.dtype)
    q, k, v = (torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dt) for x in _dense(case, data))
    import torch.nn.functional as F

    def call() -> Any:
        return F.scaled_dot_product_attention(q, k, v, is_causal=case.kind == "prefill", enable_gqa=case.hkv != case.hq)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def host(o: Any) -> np.ndarray:
        o = o.float().cpu().numpy()
        return (o[0].transpose(1, 0, 2)[None] if case.kind == "decode" else o.transpose(0, 2, 1, 3).reshape(
            -1, case.hq, case.d))

    return _timed(case, who, call, repeat, data, _kv_mb(case) if case.kind == "decode" else None,
                  to_host=lambda o: from_f32(host(o), case.dtype), sync=sync)


def bench_naive(case: ServingCase, repeat: int) -> Dict[str, Any]:
    """Naive attention in NumPy float32: the whole score matrix, softmax, then the value product."""
    data = _rng_data(case)
    q, k, v = _dense(case, data)
    g = case.hq // case.hkv
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    hide = None
    if case.kind == "prefill":
        hide = ~np.tril(np.ones((case.ctx, case.ctx), bool))

    def call() -> np.ndarray:
        s = q @ k.swapaxes(-1, -2) / np.float32(math.sqrt(case.d))
        if hide is not None:
            s[..., hide] = -np.inf
        p = np.exp(s - s.max(-1, keepdims=True))
        o = (p / p.sum(-1, keepdims=True)) @ v
        return from_f32(o.transpose(0, 2, 1, 3).reshape(-1, case.hq, case.d) if case.kind == "prefill"
                        else o.transpose(0, 2, 1, 3), case.dtype)

    return _timed(case, "naive numpy", call, repeat, data, _kv_mb(case) if case.kind == "decode" else None)


def bench_flash_attn(case: ServingCase, repeat: int) -> Optional[Dict[str, Any]]:
    """flash-attn's own varlen / kvcache calls on CUDA, when the package and a device are there (else no row)."""
    torch = _torch_device("cuda")
    if torch is None or importlib.util.find_spec("flash_attn") is None or case.dtype == "float32":
        return None
    import flash_attn

    data = _rng_data(case)
    t = _cuda_data(case, data)
    if case.kind == "prefill":
        def call() -> Any:
            return flash_attn.flash_attn_varlen_func(t["q"], t["k"], t["v"], t["cu"], t["cu"], case.ctx, case.ctx,
                                                     causal=True)
    else:
        def call() -> Any:
            return flash_attn.flash_attn_with_kvcache(t["q"], t["k_cache"], t["v_cache"], t["k_new"], t["v_new"],
                                                      cache_seqlens=t["seqlens"], block_table=t["table"], causal=True)
    return _timed(case, "flash-attn cuda", call, repeat, data, _kv_mb(case) if case.kind == "decode" else None,
                  to_host=lambda o: from_f32(o.float().cpu().numpy(), case.dtype), sync=torch.cuda.synchronize)


def plan_rows(case: ServingCase, backends: Sequence[str], vs: bool, repeat: int, gpu: bool
              ) -> List[Tuple[str, Callable[[], Optional[Dict[str, Any]]]]]:
    """The rows of ``case``: aule-kp backends (+ q8_0 on decode), then with ``vs`` the baselines."""
    rows: List[Tuple[str, Callable[[], Optional[Dict[str, Any]]]]] = []
    for be in backends:
        if be == "triton" and not gpu:
            continue  # the interpreter's timings would mean nothing
        if be == "cpu" and gpu and case.ctx * case.batch > 65536:
            continue  # the host's cores are no contender at GPU sizes
        rows.append((f"aule-kp {be}", functools.partial(bench_ours, case, be, repeat)))
        if case.kind == "decode" and be in ("vulkan", "cpu"):
            rows.append((f"aule-kp {be} q8_0", functools.partial(bench_ours, case, be, repeat, True)))
    if vs:
        rows.append((f"torch SDPA {'cuda' if gpu else 'cpu'}",
                     functools.partial(bench_torch, case, repeat, "cuda" if gpu else "cpu")))
        if case.batch * case.hq * case.ctx * (case.ctx if case.kind == "prefill" else 1) <= 1 << 28:
            rows.append(("naive numpy", functools.partial(bench_naive, case, repeat)))
        rows.append(("flash-attn cuda", functools.partial(bench_flash_attn, case, repeat)))
    return rows


def run(backends: Sequence[str], vs: bool, repeat: int, gpu: bool, scale: float = 1.0) -> List[Dict[str, Any]]:
    """Time the sweep (``cases(gpu, scale)``) on ``backends``; a row that fails says why in its note."""
    rows = []
    for case in cases(gpu, scale):
        for who, timing in plan_rows(case, backends, vs, repeat, gpu):
            try:
                row = timing()
            except Exception as exc:  # noqa: BLE001 - one failed row must not lose the rest of the sweep
                log.warning("bench: %s on %s failed: %s", who, case.label(), exc)
                row = _row(case, who, None, note=f"failed: {exc}"[:80])
            if row:
                rows.append(row)
    return rows


def format_table(rows: List[Dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    def fmt(x: Any, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    lines = ["| case | backend | ms | tokens/s | TFLOPS | max err | peak host MB | KV cache MB | note |",
             "|---" * 9 + "|"]
    lines += [f"| {r['case']} | {r['backend']} | {fmt(r['ms'], '.3f')} | {fmt(r['tokens_per_s'], '.4g')} | "
              f"{fmt(r['tflops'], '.3g')} | {fmt(r['max_err'], '.1e')} | {fmt(r['peak_mb'], '.1f')} | "
              f"{fmt(r['kv_cache_mb'], '.2f')} | {r['note']} |" for r in rows]
    return "\n".join(lines)
