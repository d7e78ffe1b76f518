"""The Triton backend: FA2 kernels on CUDA/ROCm torch tensors where they live.

Importing this module imports neither torch nor triton (the registry builds every backend at import
time, and NumPy users should not pay for them); ``aule_kp.triton.ops`` is imported on first use.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, List, Optional, Tuple

from ..backend import Backend
from ..problem import MAX_HEAD_DIM, Problem
from .interpreter import interpreting


@functools.cache
def _missing() -> Tuple[str, ...]:
    """Packages this backend needs that are not installed (looked up once, without importing)."""
    return tuple(name for name in ("torch", "triton") if importlib.util.find_spec(name) is None)


class TritonBackend(Backend):
    """FlashAttention-2 forward and backward in Triton on torch tensors (``native_torch``).

    ``block_m``/``block_n`` pin the tile sizes (tests use tiny ones); by default large problems are
    autotuned and the rest take a heuristic tile (see ``aule_kp.triton.ops``).
    """

    name = "triton"
    native_torch = True

    def __init__(self, block_m: Optional[int] = None, block_n: Optional[int] = None) -> None:
        for what, size in (("block_m", block_m), ("block_n", block_n)):
            if size is not None and (size < 16 or size & (size - 1)):
                raise ValueError(f"{what} must be a power of two >= 16, got {size}")
        self.block_m = block_m
        self.block_n = block_n

    def unavailable_reasons(self) -> List[str]:
        """Reasons Triton cannot run here at all: a missing package."""
        return [f"{name} is not installed (pip install aule-kp[triton])" for name in _missing()]

    def problem_reasons(self, problem: Problem) -> List[str]:
        """Why this backend cannot take ``problem``: packages, where the tensors live, head dims."""
        why = self.unavailable_reasons()
        device = problem.device
        if device is None:
            why.append("the inputs are NumPy arrays; the Triton backend takes torch tensors")
        elif device == "cpu" and not interpreting():
            why.append("the tensors are on the CPU; Triton needs CUDA or ROCm tensors "
                       "(or TRITON_INTERPRET=1 to run its interpreter on CPU tensors)")
        elif device not in ("cpu", "cuda"):
            why.append(f"the tensors are on a {device!r} device; Triton needs CUDA or ROCm tensors")
        for what, d in (("Dk", problem.dim_k), ("Dv", problem.dim_v)):
            if not 0 < d <= MAX_HEAD_DIM:
                why.append(f"{what} = {d} is outside the kernels' 1..{MAX_HEAD_DIM}")
        return why

    def forward(self, problem: Problem, q: Any, k: Any, v: Any, mask: Any, *, alibi: Any = None,
                sinks: Any = None, rotary: Any = None) -> Tuple[Any, Any]:
        """``(out, lse)`` torch tensors on q's device; see :class:`aule_kp.backend.Backend`.
        ``rotary`` (:class:`aule_kp.triton.ops.Rotary`, fp precision only): q and k come unrotated
        and the kernel rotates them as it loads them."""
        from . import ops

        if problem.precision == "int8":
            from . import int8

            if rotary is not None:
                raise ValueError("precision='int8' takes no rotary embedding (its kernel rotates nothing)")
            out, lse = int8.forward(problem, q, k, v, mask)
        else:
            out, lse = ops.forward(problem, q, k, v, mask, self.block_m, self.block_n, alibi, sinks, rotary)
        # A NaN row's log-sum-exp is NaN (aule_kp.nonfinite), as on the other backends; on the
        # device, with no host sync. Unlike them, a non-finite v of a key hidden from a row may
        # still reach it here (no host check on this path; README, flash_attention).
        return out, lse.masked_fill(out.isnan().any(-1), float("nan"))

    def backward(self, problem: Problem, q: Any, k: Any, v: Any, out: Any, dout: Any, lse: Any, mask: Any,
                 mask_grad: bool = False, *, alibi: Any = None, sinks: Any = None,
                 rotary: Any = None) -> Tuple[Any, Any, Any, Optional[Any]]:
        """``(dq, dk, dv, dmask)`` torch tensors; see :meth:`aule_kp.backend.Backend.backward` (the
        saved lse carries the sinks). With ``rotary`` (as ``forward``), dq and dk are the gradients
        of the unrotated q and k."""
        from . import ops

        return ops.backward(problem, q, k, v, out, dout, lse, mask, mask_grad, self.block_m, self.block_n, alibi,
                            rotary, sinks)
