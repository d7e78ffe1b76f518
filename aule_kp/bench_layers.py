"""``aule-kp bench --preset layers``: the attention layers of :mod:`aule_kp.nn` on DeepSeek-V3 and
Llama-3 shapes, torch eager (the same module on torch's SDPA) beside each aule-kp backend.

Rows: model x layer x backend, forward pass under ``torch.no_grad()`` on one layer of the model's
width (causal, batch and sequence of the model row); columns ms ± std over ``repeat`` calls after a
warm-up, speedup (torch eager's ms over the row's), peak memory during a call, and the largest
difference from torch eager's output (same weights, same input). Peak memory: CUDA's allocator peak
for CUDA tensors, else the growth of the process's resident set sampled every millisecond (host
copies of NumPy-side backends included).

``scale`` divides sequence lengths (min 16), heads (min 1; key/value heads min 2, a divisor) and
DeepSeek's LoRA ranks (min 16) by F, head dims kept, so that the preset runs on a CPU device.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class LayerModel:
    """One model row: width, heads, key/value heads, sequence, batch, and DeepSeek's MLA sizes."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    seq: int
    batch: int
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def label(self) -> str:
        return f"{self.name} (E{self.hidden} H{self.heads}/{self.kv_heads} S{self.seq} B{self.batch})"


#: The issue's shapes: DeepSeek-V3's attention width with 128 heads; Llama-3-70B and -405B (8 KV heads).
#: DeepSeek-V3 has no KV-head count of its own: its GQA row uses 8, as the Llama rows.
MODELS: Tuple[LayerModel, ...] = (
    LayerModel("DeepSeek-V3", 7168, 128, 8, 2048, 2),
    LayerModel("Llama-3-70B", 8192, 64, 8, 4096, 1),
    LayerModel("Llama-3-405B", 16384, 128, 8, 2048, 1),
)
LAYERS = ("MultiHeadAttention", "SelfAttention", "GroupedQueryAttention", "MultiQueryAttention", "LatentAttention")
#: Columns: torch eager first (the speedups' baseline), then aule-kp's backends.
TORCH_EAGER = "torch eager"
AULE_BACKENDS = ("vulkan", "triton", "cpu")


def scaled(model: LayerModel, scale: float) -> LayerModel:
    """``model`` with lengths, heads and LoRA ranks divided by ``scale`` (head dims kept)."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if scale == 1:
        return model
    heads = max(1, round(model.heads / scale))
    # At least two key/value heads where there are four heads or more: GQA stays apart from MQA.
    kv = min(heads, max(2 if heads >= 4 else 1, round(model.kv_heads / scale)))
    while heads % kv:
        kv -= 1
    return replace(model, hidden=heads * model.head_dim, heads=heads, kv_heads=kv,
                   seq=max(16, round(model.seq / scale)),
                   q_lora_rank=max(16, round(model.q_lora_rank / scale)),
                   kv_lora_rank=max(16, round(model.kv_lora_rank / scale)))


def build(layer: str, m: LayerModel, device: Any, dtype: Any) -> Any:
    """The ``layer`` module for model ``m`` (random weights), on ``device`` in ``dtype``."""
    from . import nn

    kw = dict(device=device, dtype=dtype)
    if layer == "MultiHeadAttention":
        return nn.MultiHeadAttention(m.hidden, m.heads, batch_first=True, **kw)
    if layer == "SelfAttention":
        return nn.SelfAttention(m.hidden, m.heads, causal=True, **kw)
    if layer == "GroupedQueryAttention":
        return nn.GroupedQueryAttention(m.hidden, m.heads, m.kv_heads, **kw)
    if layer == "MultiQueryAttention":
        return nn.MultiQueryAttention(m.hidden, m.heads, **kw)
    if layer == "LatentAttention":
        return nn.LatentAttention(m.hidden, m.heads, m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim,
                                  m.qk_rope_head_dim, m.v_head_dim, **kw)
    raise ValueError(f"unknown layer {layer!r}; choose from {', '.join(LAYERS)}")


def _call(module: Any, x: Any) -> Callable[[], Any]:
    import torch

    if isinstance(module, torch.nn.MultiheadAttention):
        return lambda: module(x, x, x, need_weights=False, is_causal=True)[0]
    return lambda: module(x)


class _PeakMemory:
    """Peak memory over a block: CUDA's allocator peak, or resident-set growth sampled each ms."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak_mb: Optional[float] = None

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self) -> _PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            self.base = self.top = self._rss()
        except OSError:  # no /proc: not measured
            self.base = None
            return self
        self.stop = threading.Event()

        def sample() -> None:
            while not self.stop.wait(0.001):
                self.top = max(self.top, self._rss())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.base is not None:
            self.stop.set()
            self.thread.join()
            self.top = max(self.top, self._rss())
            self.peak_mb = (self.top - self.base) / 2**20


def time_layer(module: Any, x: Any, repeat: int, cuda: bool) -> Dict[str, Any]:
    """``{"ms", "std", "peak_mb", "out"}`` of ``module``'s forward on ``x``."""
    import torch

    call = _call(module, x)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        out = call()
        sync()
        with _PeakMemory(cuda) as mem:
            call()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            call()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    std = statistics.stdev(times) if len(times) > 1 else 0.0
    return {"ms": statistics.median(times), "std": std, "peak_mb": mem.peak_mb, "out": out}


def _skip_reasons(backend: str, cuda: bool) -> List[str]:
    from . import dispatch

    why = list(dispatch.get(backend).unavailable_reasons())
    if backend == "triton" and not cuda:
        why.append("Triton times CUDA/ROCm tensors; none here")
    return why


def run(repeat: int = 5, scale: float = 1.0, backends: Optional[Sequence[str]] = None,
        layers: Sequence[str] = LAYERS, models: Sequence[LayerModel] = MODELS) -> List[Dict[str, Any]]:
    """The table's rows: ``{"model", "layer", "backend", "ms", "std", "speedup", "peak_mb", "max_diff", "note"}``.
    ``backends``: aule-kp backends to time (default all three; torch eager always runs)."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    chosen = [b for b in AULE_BACKENDS if backends is None or b in backends]
    rows: List[Dict[str, Any]] = []
    for base in models:
        m = scaled(base, scale)
        x = torch.randn(m.batch, m.seq, m.hidden, device=device, dtype=dtype,
                        generator=torch.Generator(device).manual_seed(0))
        for layer in layers:
            torch.manual_seed(0)
            module = build(layer, m, device, dtype).eval()
            ref: Optional[Dict[str, Any]] = None
            for name in (TORCH_EAGER, *chosen):
                who = name if name == TORCH_EAGER else f"aule-kp {name}"
                row = {"model": m.label(), "layer": layer, "backend": who,
                       "ms": None, "std": None, "speedup": None, "peak_mb": None, "max_diff": None, "note": ""}
                why = [] if name == TORCH_EAGER else _skip_reasons(name, cuda)
                if why:
                    rows.append(dict(row, note="skipped: " + "; ".join(why)))
                    continue
                module.backend = "torch" if name == TORCH_EAGER else name
                try:
                    got = time_layer(module, x, repeat, cuda)
                except Exception as exc:  # noqa: BLE001 - one failed row must not lose the table
                    rows.append(dict(row, note=f"failed: {exc}"[:100]))
                    continue
                out = got.pop("out")
                if ref is None:
                    ref = dict(got, out=out)
                else:
                    got["speedup"] = ref["ms"] / got["ms"]
                    got["max_diff"] = float((out.float() - ref["out"].float()).abs().max())
                rows.append(dict(row, **got))
            del module
    return rows


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    def f(x: Any, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    lines = ["| model | layer | backend | ms ± std | speedup vs torch eager | peak MB | max diff vs torch eager "
             "| note |",
             "|---" * 8 + "|"]
    for r in rows:
        ms = "—" if r["ms"] is None else f"{r['ms']:.2f} ± {r['std']:.2f}"
        lines.append(f"| {r['model']} | {r['layer']} | {r['backend']} | {ms} | {f(r['speedup'], '.2f')} | "
                     f"{f(r['peak_mb'], '.1f')} | {f(r['max_diff'], '.1e')} | {r['note']} |")
    return "\n".join(lines)
