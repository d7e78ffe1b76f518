"""Sequence parallelism (issue 21): ``aule_kp.distributed.ring_attention`` and ``ulysses_attention`` on 2
and 4 local processes (gloo on 127.0.0.1) against one process's float64 attention (tests/reference.py):
each rank's output and q/k/v gradients equal the matching slice of the whole sequence's, causal and
not, GQA, both layouts, on the CPU backend (2 ranks) and the Vulkan backend (4 ranks, lavapipe). Then
the faults: a killed or stalled rank makes the others raise within the group's timeout, and ranks
that disagree on shapes get an error naming the rank.

Processes start with the 'spawn' method (a forked child must not inherit the parent's Vulkan state:
tests/test_fork.py), and one launch runs many problems, since starting a process with torch costs
seconds here. Random problems come from a seeded generator, drawn in the parent (hypothesis cannot
drive a process group it does not own); every wait is bounded, so a hang fails the test.
"""

from __future__ import annotations

import datetime
import math
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import exponent_range, make_inputs, tolerance
from reference import backward_scales, output_scale, reference_attention, reference_backward

from aule_kp.distributed import PeerFailure, ring_attention, shard, ulysses_attention, unshard
from aule_kp.distributed.layout import block, natural_order
from aule_kp.dtypes import to_f32
from aule_kp.problem import Problem, band
from aule_kp.vulkan import device as devmod

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")

#: Seconds the parent waits for a launch's results: a hang fails the test instead of stalling the run.
LAUNCH_TIMEOUT = 240

#: The process group's timeout in the stalled-rank test: the stall must be noticed within it.
GROUP_TIMEOUT = 4.0

#: How long the stalled rank sleeps past that timeout before it goes on to the next test.
STALL_MARGIN = 1.0

#: What a failing rank may take beyond the group's timeout to raise (error path, process load here).
FAULT_SLACK = 6.0

FUNCTIONS: Dict[str, Callable[..., torch.Tensor]] = {"ring": ring_attention, "ulysses": ulysses_attention}


@dataclass(frozen=True)
class Case:
    """One problem over the whole sequence (``length`` = the world's positions) and how it is split."""

    fn: str
    b: int
    hq: int
    hkv: int
    length: int
    dk: int
    dv: int
    causal: bool
    layout: str
    dtype: str = "float32"
    seed: int = 0

    def problem(self) -> Problem:
        diag, left, right = band(self.length, self.length, causal=self.causal, window=None, top_left=False)
        return Problem(self.b, self.hq, self.hkv, self.length, self.length, self.dk, self.dv, self.dtype,
                       1 / math.sqrt(self.dk), diag, left, right, None)

    def inputs(self) -> Tuple[np.ndarray, ...]:
        """q, k, v and the output gradient, in storage dtype."""
        rng = np.random.default_rng(self.seed)
        q, k, v = make_inputs(rng, (self.b, self.hq, self.length, self.dk), (self.b, self.hkv, self.length, self.dk),
                              (self.b, self.hkv, self.length, self.dv), self.dtype)
        (dout,) = make_inputs(rng, (self.b, self.hq, self.length, self.dv), (0,), (0,), self.dtype)[:1]
        return q, k, v, dout


# --------------------------------------------------------------------------------------------------
# Launching: each rank runs ``job(rank, world, *args)`` in its own process and reports back.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ThenDie:
    """A job's result after which its process dies at once (no clean-up), as a killed rank would."""

    value: Any


def _rank_main(rank: int, world: int, port: int, job: Callable[..., Any], args: tuple, results: Any) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=LAUNCH_TIMEOUT))
        value = job(rank, world, *args)
    except BaseException as exc:  # reported to the parent, which fails the test with it
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    results.put((rank, True, value.value if isinstance(value, ThenDie) else value))
    if isinstance(value, ThenDie):
        results.close()
        results.join_thread()  # the result is in the pipe
        os._exit(1)
    dist.destroy_process_group()


def launch(world: int, job: Callable[..., Any], *args: Any) -> Dict[int, Any]:
    """``{rank: job's result}`` from ``world`` spawned processes; a rank that raised fails the test."""
    expect = list(range(world))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, job, args, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got: Dict[int, Any] = {}
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while len(got) < len(expect):
            try:
                rank, ok, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"ranks {sorted(set(expect) - set(got))} reported nothing within {LAUNCH_TIMEOUT} s")
            assert ok, f"rank {rank} raised: {value}"
            got[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return got


# --------------------------------------------------------------------------------------------------
# Correctness: each rank runs its share of every case and returns its rows of out, dq, dk, dv.


def _run_cases(rank: int, world: int, cases: List[Case], backend: str) -> List[Tuple[np.ndarray, ...]]:
    found = []
    for case in cases:
        full = [torch.from_numpy(x) for x in case.inputs()]
        q, k, v, dout = (shard(x, rank, world, case.layout) for x in full)
        q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
        out = FUNCTIONS[case.fn](q, k, v, causal=case.causal, backend=backend, layout=case.layout)
        out.backward(dout)
        found.append(tuple(x.detach().float().numpy() for x in (out, q.grad, k.grad, v.grad)))
    return found


def _tolerances(case: Case, q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray) -> Tuple[float, ...]:
    """conftest's error model for the output and the three gradients. The ring adds one rounding to
    storage per result (each block's output and gradients are stored in the input dtype before the
    float32 merge; the merge's weights sum to one and the gradient partials' rounding is relative to
    the sums of absolute terms that bound them), a no-op for float32."""
    p = case.problem()
    extra = 1 if case.fn == "ring" else 0
    e = exponent_range(to_f32(q, p.dtype), to_f32(k, p.dtype), p.scale)
    out_tol = tolerance(p.dtype, p.len_k + p.dim_k, output_scale(q, k, v, p), e, roundings=2 + extra)
    n = p.len_q * p.group + p.len_k + max(p.dim_k, p.dim_v)
    grads = backward_scales(q, k, v, dout, p)[:3]
    return (out_tol, *(tolerance(p.dtype, n, s, e, roundings=4 + extra) for s in grads))


def check_cases(world: int, cases: List[Case], got: Dict[int, List[Tuple[np.ndarray, ...]]]) -> None:
    """Each rank's results (``_run_cases``) against the float64 reference's slice for that rank."""
    for i, case in enumerate(cases):
        q, k, v, dout = case.inputs()
        p = case.problem()
        ref_out, _ = reference_attention(q, k, v, p)
        ref = (ref_out, *reference_backward(q, k, v, dout, p)[:3])
        tols = _tolerances(case, q, k, v, dout)
        for rank in range(world):
            for name, found, want, tol in zip(("out", "dq", "dk", "dv"), got[rank][i], ref, tols):
                want = shard(torch.from_numpy(want), rank, world, case.layout).numpy()
                err = float(np.abs(found - want).max(initial=0.0))
                assert err <= tol, f"{case}: rank {rank} {name} off by {err:.3g} (tolerance {tol:.3g})"


def grid(hq: int, hkv: int, local: int, world: int, fns: Tuple[str, ...] = ("ring", "ulysses")) -> List[Case]:
    return [Case(fn, 2, hq, hkv, local * world, 16, 16, causal, layout, seed=i)
            for i, (fn, causal, layout) in enumerate(
                (fn, causal, layout) for fn in fns for causal in (False, True) for layout in ("contiguous", "zigzag"))]


def random_cases(world: int, count: int, seed: int) -> List[Case]:
    """Random shapes (batch, heads, GQA group, chunk length, head dims), options and function."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        fn = ("ring", "ulysses")[rng.integers(2)]
        hkv = int(rng.choice([1, 2])) * (world if fn == "ulysses" else 1)
        dk = int(rng.choice([8, 16, 32]))
        cases.append(Case(fn, int(rng.integers(1, 3)), hkv * int(rng.choice([1, 2, 4])), hkv,
                          2 * int(rng.integers(1, 7)) * world, dk, int(rng.choice([dk, 8])), bool(rng.integers(2)),
                          ("contiguous", "zigzag")[rng.integers(2)], seed=100 + i))
    return cases


#: 2 ranks, CPU backend: the grid (ring and Ulysses, causal or not, both layouts, GQA), random
#: problems, and float16.
TWO_RANK_CASES = grid(4, 2, 8, 2) + random_cases(2, 4, seed=21) + [
    Case("ring", 1, 4, 1, 32, 32, 32, True, "contiguous", "float16", seed=7),
    Case("ulysses", 1, 4, 2, 32, 32, 32, True, "zigzag", "float16", seed=8)]


def _two_rank_job(rank: int, world: int) -> Any:
    found = {"cases": _run_cases(rank, world, TWO_RANK_CASES, "cpu"), "disagree": _disagree(rank, world)}
    stall_group = dist.new_group(timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))
    kill_group = dist.new_group(timeout=datetime.timedelta(seconds=LAUNCH_TIMEOUT))
    found["stall"] = _fault(rank, stall_group, "stall")
    found["kill"] = _fault(rank, kill_group, "kill")
    return ThenDie(found) if rank == 1 else found


@pytest.fixture(scope="module")
def two_ranks() -> Dict[int, Any]:
    """One launch of 2 ranks for the CPU backend's cases, the disagreement checks and the faults, in
    that order (a process with torch takes seconds to start here; rank 1 stalls, then dies)."""
    return launch(2, _two_rank_job)


def test_two_ranks_cpu_backend(two_ranks):
    check_cases(2, TWO_RANK_CASES, {rank: found["cases"] for rank, found in two_ranks.items()})


@pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device")
def test_four_ranks_vulkan_backend():
    """4 ranks, Vulkan backend: ring over contiguous chunks causal and not with GQA, zigzag causal,
    and Ulysses with GQA."""
    cases = [Case("ring", 1, 4, 2, 32, 16, 16, causal, "contiguous", seed=i) for i, causal in enumerate((False, True))]
    cases += [Case("ring", 1, 4, 1, 32, 16, 16, True, "zigzag", seed=2),
              Case("ulysses", 1, 8, 4, 32, 16, 16, True, "contiguous", seed=3)]
    check_cases(4, cases, launch(4, _run_cases, cases, "vulkan"))


# --------------------------------------------------------------------------------------------------
# Faults.


def _disagree(rank: int, world: int) -> List[str]:
    """Rank 1 passes a longer chunk to ring_attention; Ulysses gets a head count the world does not
    divide. The messages each rank raised (every rank must raise: the first names rank 1)."""
    messages = []
    longer = torch.randn(1, 2, 8 if rank != 1 else 10, 8)
    one_head = torch.randn(1, 1, 8, 8)
    for fn, x in ((ring_attention, longer), (ulysses_attention, one_head)):
        try:
            fn(x, x, x)
            messages.append("no error")
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def test_shape_disagreement_names_the_rank(two_ranks):
    for rank in range(2):
        mismatch, heads = two_ranks[rank]["disagree"]
        assert "rank 1" in mismatch and "query length 10 (rank 0: 8)" in mismatch, mismatch
        assert "multiples of 2" in heads, heads


def _fault(rank: int, group: Any, fault: str) -> Optional[Tuple[str, float, str]]:
    """Both ranks run a forward pass; then rank 1 stalls past the group's timeout (``stall``) or dies
    (``kill``: once it has reported, see ``ThenDie``) instead of joining the backward pass, whose
    ring exchanges rank 0 is waiting on. Rank 0's ``(outcome, seconds it waited, message)``."""
    q, k, v = (torch.randn(1, 2, 8, 8, requires_grad=True) for _ in range(3))
    out = ring_attention(q, k, v, causal=True, backend="cpu", group=group)
    if rank == 1:
        if fault == "stall":
            time.sleep(GROUP_TIMEOUT + STALL_MARGIN)
        return None
    start = time.monotonic()
    try:
        out.sum().backward()
    except PeerFailure as exc:
        return "PeerFailure", time.monotonic() - start, str(exc)
    return "no error", time.monotonic() - start, ""


@pytest.mark.parametrize("fault", ["stall", "kill"])
def test_failed_rank_raises_within_timeout(two_ranks, fault):
    kind, seconds, message = two_ranks[0][fault]
    assert kind == "PeerFailure", kind
    assert seconds <= GROUP_TIMEOUT + FAULT_SLACK, seconds
    assert "rank 0 of 2" in message and "backward" not in message, message
    if fault == "stall":
        assert f"timeout ({GROUP_TIMEOUT:g} s)" in message, message


# --------------------------------------------------------------------------------------------------
# Without a process group.


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_unshard_and_natural_order(layout):
    x = torch.arange(2 * 24).reshape(1, 2, 24, 1)
    parts = [shard(x, r, 3, layout) for r in range(3)]
    assert torch.equal(unshard(parts, layout), x)
    order = natural_order(8, 3, layout, x.device)
    joined = torch.cat(parts, 2)
    assert torch.equal(joined if order is None else joined[:, :, order], x)
    if layout == "zigzag":
        assert parts[0][0, 0, :, 0].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_causal_blocks_cover_exactly_what_queries_see(layout):
    """For every (rank, source) pair of 1 to 5 ranks, the ring step's block holds every visible
    (query, key) pair of the two chunks and, where it is not causal, only visible ones."""
    for world in range(1, 6):
        n = 4
        positions = [shard(torch.arange(n * world).reshape(1, 1, -1, 1), r, world, layout)[0, 0, :, 0]
                     for r in range(world)]
        for rank in range(world):
            for source in range(world):
                seen = positions[source][None, :] <= positions[rank][:, None]
                blk = block(rank, source, n, n, True, layout)
                inside = torch.zeros_like(seen)
                if blk is not None:
                    inside[blk.rows, blk.cols] = True
                    part = seen[blk.rows, blk.cols]
                    want = torch.ones_like(part).tril() if blk.causal else torch.ones_like(part)
                    assert torch.equal(part, want), (world, rank, source)
                assert not (seen & ~inside).any(), (world, rank, source)


def test_bad_arguments_are_named():
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        ring_attention(q.numpy(), q, q)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, q, q, layout="striped")
    with pytest.raises(ValueError, match="zigzag layout holds two equal chunks"):
        ulysses_attention(q[:, :, :7], q[:, :, :7], q[:, :, :7], layout="zigzag")
    with pytest.raises(ValueError, match="x: length 7 along dim 2 must be a multiple of 4"):
        shard(q[:, :, :7], 0, 2, "zigzag")
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
            ring_attention(q, q, q)


def test_shard_unshard_bad_arguments_are_named():
    """unshard of parts that shard cannot have made put positions in the wrong order without a word
    (zigzag parts of odd or unequal lengths); shard's world, rank, dim and x were not all checked."""
    x = torch.arange(12.0).reshape(1, 1, 12, 1)
    with pytest.raises(ValueError, match="parts: .*even"):
        unshard([x[:, :, :3], x[:, :, 3:6]], "zigzag")
    for layout in ("contiguous", "zigzag"):
        with pytest.raises(ValueError, match="parts: .*same length"):
            unshard([x[:, :, :4], x[:, :, 4:6]], layout)
        with pytest.raises(ValueError, match="parts: .*non-empty"):
            unshard([], layout)
    with pytest.raises(TypeError, match="parts"):
        unshard([x.numpy(), x.numpy()])
    with pytest.raises(ValueError, match="world must be an integer >= 1"):
        shard(x, 0, 0)
    with pytest.raises(TypeError, match="rank must be an integer"):
        shard(x, 1.0, 2)
    with pytest.raises(ValueError, match="dim 5 is out of range"):
        shard(x, 0, 2, dim=5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        shard(x.numpy(), 0, 2)
    assert torch.equal(unshard([shard(x, r, 2, "zigzag", dim=-2) for r in range(2)], "zigzag", dim=-2), x)
