"""One long sequence split over 1, 2 and 4 local processes: ``aule_kp.distributed`` ring and Ulysses
attention on the CPU backend, gloo on 127.0.0.1.

    .venv/bin/python benchmarks/ring_cpu.py [--seq 4096] [--heads 8] [--kv-heads 4] [--dim 64]
                                            [--worlds 1 2 4] [--repeat 3] [--rounds 2] [--backend cpu]

Every world size runs on the same cores (each rank pinned to its share of them, round robin when
there are more ranks than cores), so the table shows what splitting costs or saves on one machine:
the transfers, the merges, the smaller blocks, and for causal attention how evenly each layout
spreads the work. It is not a multi-GPU speed-up. Each rank holds ``seq / W`` positions of q, k and v
(the memory sequence parallelism exists to save). Timing: per launch one warm-up, then ``--repeat`` runs of
a forward pass and of a forward + backward pass, each started after a barrier and timed on every
rank (a run takes as long as its slowest rank); ``--rounds`` launches of each world size, taken in
turn; medians of all runs.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import multiprocessing as mp
import os
import platform
import socket
import statistics
import time
from typing import Any, Dict, List, Tuple

#: (function, causal, layout) rows of the table.
CONFIGS: Tuple[Tuple[str, bool, str], ...] = (
    ("ring", False, "contiguous"),
    ("ring", True, "contiguous"),
    ("ring", True, "zigzag"),
    ("ulysses", True, "contiguous"),
)


def _cores_for(rank: int, world: int, cores: List[int]) -> List[int]:
    """This rank's share of ``cores``: a slice of them, or one core shared round robin."""
    if world <= len(cores):
        per = len(cores) // world
        return cores[rank * per:(rank + 1) * per]
    return [cores[rank % len(cores)]]


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, cores: List[int], results: Any) -> None:
    os.sched_setaffinity(0, _cores_for(rank, world, cores))  # before torch/NumPy start their threads
    import torch
    import torch.distributed as dist

    from aule_kp.distributed import ring_attention, shard, ulysses_attention

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, args.heads, args.seq, args.dim), (1, args.kv_heads, args.seq, args.dim),
              (1, args.kv_heads, args.seq, args.dim)]
    full = [torch.randn(s, generator=gen) for s in shapes]
    fns = {"ring": ring_attention, "ulysses": ulysses_attention}
    table = {}
    for fn, causal, layout in CONFIGS:
        q, k, v = (shard(x, rank, world, layout).clone().requires_grad_() for x in full)
        call = functools.partial(fns[fn], q, k, v, causal=causal, layout=layout, backend=args.backend)
        timings = []
        for backward in (False, True):
            seconds = []
            for _ in range(args.repeat + 1):  # the first is a warm-up: plans, buffers, connections
                dist.barrier()
                start = time.perf_counter()
                out = call()
                if backward:
                    out.sum().backward()
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                seconds.append(float(elapsed))
            timings.append(seconds[1:])
        table[(fn, causal, layout)] = tuple(timings)
    if rank == 0:
        results.put(table)
    dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace, cores: List[int]) -> Dict[Tuple[str, bool, str], Any]:
    """``{config: ([forward s], [forward + backward s])}`` of ``world`` ranks (rank 0 reports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")  # no forked Vulkan or thread state
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, cores, results)) for r in range(world)]
    for p in procs:
        p.start()
    table = results.get(timeout=3600)
    for p in procs:
        p.join()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=4096, help="whole sequence length")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per launch, after one warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="launches of each world size, taken in turn")
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    samples: Dict[int, Dict[Tuple[str, bool, str], Tuple[List[float], List[float]]]] = {
        w: {c: ([], []) for c in CONFIGS} for w in args.worlds}
    for _ in range(args.rounds):  # world sizes in turn, so that a shared machine's drift hits each alike
        for w in args.worlds:
            for config, (forward, both) in run_world(w, args, cores).items():
                samples[w][config][0].extend(forward)
                samples[w][config][1].extend(both)
    tables = {w: {c: tuple(statistics.median(x) for x in runs) for c, runs in by_config.items()}
              for w, by_config in samples.items()}
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# {now:%Y-%m-%d %H:%M} UTC, {platform.machine()}, {len(cores)} cores, backend {args.backend}")
    print(f"# B1 Hq{args.heads} Hkv{args.kv_heads} S{args.seq} D{args.dim} float32; "
          f"medians of {args.rounds} x {args.repeat}; ms (x the 1-process time of the same row)")
    print(f"| {'function':8} | {'causal':6} | {'layout':10} | {'ranks':5} | {'forward ms':>18} | {'fwd+bwd ms':>18} |")
    print(f"|{'-' * 10}|{'-' * 8}|{'-' * 12}|{'-' * 7}|{'-' * 20}|{'-' * 20}|")
    base = tables.get(min(args.worlds), {})
    for config in CONFIGS:
        fn, causal, layout = config
        for w in args.worlds:
            f, fb = tables[w][config]
            f0, fb0 = base[config]
            print(f"| {fn:8} | {str(causal):6} | {layout:10} | {w:5} | {1e3 * f:9.1f} ({f / f0:4.2f}x) "
                  f"| {1e3 * fb:9.1f} ({fb / fb0:4.2f}x) |")


if __name__ == "__main__":
    main()
