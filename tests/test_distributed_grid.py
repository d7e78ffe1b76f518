"""aule_kp.distributed on 3 ranks (an odd world) against an independent float64 torch reference of the
whole sequence, for what tests/test_distributed.py does not draw: query and key chunks of different
lengths (non-causal, both layouts, ring and Ulysses), an explicit ``scale``, ``Dv != Dk``, odd chunk
lengths under a causal mask, a gradient that is an expanded tensor (``out.sum().backward()``), a
process group of ranks 0 and 2 only (its ring neighbours are global ranks that differ from the group's
ranks), and the errors every rank must raise for uneven chunks and a causal call with ``Lq != Lk``.

The reference: naive float64 attention on the concatenated sequence (positions in the natural order,
top-left causal over the whole sequence), differentiated by torch autograd, sliced per rank with
``shard``. Tolerances: conftest.tolerance for float32 with reference.output_scale/backward_scales
(the ring's merge adds no storage rounding in float32), as tests/test_distributed.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
from conftest import exponent_range, tolerance
from reference import backward_scales, output_scale
from test_distributed import launch

from aule_kp.distributed import ring_attention, shard, ulysses_attention
from aule_kp.problem import Problem, band

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")

WORLD = 3


@dataclass(frozen=True)
class Case:
    fn: str
    hq: int
    hkv: int
    lq: int  # per rank
    lk: int
    dk: int
    dv: int
    causal: bool
    layout: str
    scale: Optional[float]
    seed: int
    sum_grad: bool = False  # backward from out.sum(): an expanded (stride-0) output gradient
    ranks: Tuple[int, ...] = (0, 1, 2)  # the process group

    def whole(self) -> Tuple[torch.Tensor, ...]:
        """float32 q, k, v, dout of the whole sequence."""
        g = torch.Generator().manual_seed(self.seed)
        w = len(self.ranks)
        shapes = ((1, self.hq, w * self.lq, self.dk), (1, self.hkv, w * self.lk, self.dk),
                  (1, self.hkv, w * self.lk, self.dv), (1, self.hq, w * self.lq, self.dv))
        return tuple(torch.randn(s, generator=g) for s in shapes)


CASES = [
    Case("ring", 4, 2, 4, 6, 16, 8, False, "contiguous", 0.3, 1),
    Case("ring", 2, 1, 6, 2, 8, 8, False, "zigzag", None, 2),
    Case("ulysses", 6, 3, 2, 4, 16, 16, False, "zigzag", -0.2, 3),
    Case("ulysses", 3, 3, 6, 2, 8, 16, False, "contiguous", None, 4),
    Case("ring", 4, 2, 5, 5, 16, 16, True, "contiguous", None, 5, sum_grad=True),
    Case("ring", 2, 2, 4, 4, 8, 8, True, "zigzag", 0.5, 6),
    Case("ulysses", 3, 3, 4, 4, 8, 8, True, "zigzag", None, 7, sum_grad=True),
    Case("ring", 4, 1, 3, 3, 8, 8, True, "contiguous", None, 8, ranks=(0, 2)),
]

FUNCTIONS = {"ring": ring_attention, "ulysses": ulysses_attention}


def _job(rank: int, world: int) -> Dict[str, Any]:
    results: List[Optional[Tuple[torch.Tensor, ...]]] = []
    for case in CASES:
        group = dist.new_group(list(case.ranks))  # every rank makes every group, members or not
        if rank not in case.ranks:
            results.append(None)
            continue
        r, w = case.ranks.index(rank), len(case.ranks)
        q, k, v, dout = (shard(x, r, w, case.layout) for x in case.whole())
        q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
        out = FUNCTIONS[case.fn](q, k, v, causal=case.causal, scale=case.scale, group=group, layout=case.layout,
                                 backend="cpu")
        (out.sum() if case.sum_grad else out).backward(None if case.sum_grad else dout)
        results.append(tuple(x.detach() for x in (out, q.grad, k.grad, v.grad)))
    errors = []
    x = torch.randn(1, 3, 4 if rank != 2 else 5, 8)  # rank 2's chunk is longer: an uneven split
    y = torch.randn(1, 3, 4, 8)
    for call in (lambda: ring_attention(x, x, x), lambda: ulysses_attention(x, x, x),
                 lambda: ring_attention(y, y[:, :, :2], y[:, :, :2], causal=True)):
        try:
            call()
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    return {"results": results, "errors": errors}


def _reference(case: Case) -> Tuple[torch.Tensor, ...]:
    q, k, v, dout = (x.double().requires_grad_(i < 3) for i, x in enumerate(case.whole()))
    group = case.hq // case.hkv
    kk, vv = (x.repeat_interleave(group, dim=1) for x in (k, v))
    scale = 1 / math.sqrt(case.dk) if case.scale is None else case.scale
    s = scale * q @ kk.transpose(-1, -2)
    if case.causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(s, dim=-1) @ vv
    grad = torch.ones_like(out) if case.sum_grad else dout
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad, grad


@pytest.fixture(scope="module")
def three_ranks() -> Dict[int, Any]:
    return launch(WORLD, _job)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_matches_float64_reference(three_ranks: Dict[int, Any], index: int) -> None:
    case = CASES[index]
    out, dq, dk, dv, grad = _reference(case)
    q, k, v, _ = case.whole()
    w = len(case.ranks)
    scale = 1 / math.sqrt(case.dk) if case.scale is None else case.scale
    lq, lk = w * case.lq, w * case.lk
    diag, left, right = band(lq, lk, causal=case.causal, window=None, top_left=False)  # lq == lk when causal
    p = Problem(1, case.hq, case.hkv, lq, lk, case.dk, case.dv, "float32", scale, diag, left, right, None)
    q, k, v, g = (x.numpy() for x in (q, k, v, grad.float()))
    e = exponent_range(q, k, scale)
    n = lq * p.group + lk + max(case.dk, case.dv)
    tols = (tolerance("float32", lk + case.dk, output_scale(q, k, v, p), e),
            *(tolerance("float32", n, s, e, roundings=4) for s in backward_scales(q, k, v, g, p)[:3]))
    for rank in case.ranks:
        r = case.ranks.index(rank)
        found = three_ranks[rank]["results"][index]
        for name, got, want, tol in zip(("out", "dq", "dk", "dv"), found, (out, dq, dk, dv), tols):
            want = shard(want, r, w, case.layout)
            assert got.dtype == torch.float32 and got.shape == want.shape, (case, rank, name)
            err = float((got.double() - want).abs().max())
            assert err <= tol, f"{case}: rank {rank} {name} off by {err:.3g} (tolerance {tol:.3g})"


def test_bad_splits_raise_on_every_rank(three_ranks: Dict[int, Any]) -> None:
    for rank in range(WORLD):
        uneven_ring, uneven_ulysses, causal_unequal = three_ranks[rank]["errors"]
        for msg in (uneven_ring, uneven_ulysses):
            assert "rank 2" in msg and "query length 5 (rank 0: 4)" in msg, msg
        assert "q, k" in causal_unequal and "Lq=4, Lk=2" in causal_unequal, causal_unequal
