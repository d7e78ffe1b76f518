"""A process forked after it used Vulkan (multiprocessing's default start method on Linux, torch
DataLoader workers) computes in the child with a fresh device state, or gets a clear error at once
from what the parent made; it never hangs (issue 15, part 5). Every wait has a timeout."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import output_tolerance
from reference import reference_attention

import aule_kp
from aule_kp.problem import Problem
from aule_kp.vulkan import device as devmod

pytestmark = [
    pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device"),
    pytest.mark.skipif(sys.platform != "linux", reason="fork start method"),
]

#: Seconds a child may take (a new Manager and a first pipeline take ~1 s on lavapipe); a hang
#: shows as a timeout, never as a stuck test run.
TIMEOUT = 120


def attention_error(seed: int, lk: int = 64) -> float:
    """Max error over the fp32 tolerance of one Vulkan call (Lq 1: split-KV on CPU drivers) against
    the float64 reference; ``lk`` of 16384 moves over 8 MiB, so the copy thread pool is used."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 8, 1, 64)).astype(np.float32)
    k, v = (rng.standard_normal((1, 8, lk, 64)).astype(np.float32) for _ in range(2))
    out = aule_kp.flash_attention(q, k, v, backend="vulkan")
    p = Problem(1, 8, 8, 1, lk, 64, 64, "float32", 0.125)
    ref, _ = reference_attention(q, k, v, p)
    return float(np.abs(out - ref).max()) / output_tolerance(p, q, k, v)


def child_error(seed: int) -> float:
    return max(attention_error(seed), attention_error(seed, lk=16384))


def test_forked_pool_computes():
    assert attention_error(0, lk=16384) <= 1  # the parent has a Manager, plans and copy threads
    with mp.get_context("fork").Pool(2) as pool:
        errors = pool.map_async(child_error, [1, 2, 3]).get(timeout=TIMEOUT)
    assert max(errors) <= 1, errors
    assert attention_error(4) <= 1  # the parent's state is untouched


def _use_parent_context(ctx: aule_kp.Context, t: object, conn: object) -> None:
    results = []
    for use in (lambda: t.download(), lambda: ctx.tensor((1, 1, 4, 16), np.float32)):
        try:
            use()
            results.append("no error")
        except RuntimeError as exc:
            results.append(str(exc))
    conn.send(results)


def test_parent_context_raises_in_child():
    with aule_kp.Context() as ctx:
        t = ctx.tensor((1, 1, 4, 16), np.float32).upload(np.ones((1, 1, 4, 16), np.float32))
        fork = mp.get_context("fork")
        receive, send = fork.Pipe(duplex=False)
        child = fork.Process(target=_use_parent_context, args=(ctx, t, send))
        child.start()
        try:
            assert receive.poll(TIMEOUT), "the child hung"
            results = receive.recv()
        finally:
            child.join(TIMEOUT)
            if child.is_alive():
                child.kill()
        assert len(results) == 2 and all("parent process" in r and "Context" in r for r in results), results
        np.testing.assert_array_equal(t.download(), 1)  # still works in the parent


def test_plain_fork_child_exits_normally():
    # os.fork() and a normal interpreter exit in the child (no os._exit, unlike multiprocessing):
    # neither the parent's kp objects nor the driver's exit handlers may wait on threads that only
    # the parent has; the child's exit status comes through.
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_fork import attention_error
        assert attention_error(0) <= 1
        pid = os.fork()
        if pid == 0:
            assert attention_error(1) <= 1
            print("child ok", flush=True)
            sys.exit(7)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 7, status
        print("parent ok", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "child ok" in done.stdout and "parent ok" in done.stdout
