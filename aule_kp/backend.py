"""What every backend implements (xformers-style: each says *why* it cannot take a problem)."""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from .problem import Problem
from .rotary import RotaryLayout

#: What ``backend=`` takes everywhere: "auto" (the dispatcher's priority list) or one backend.
BACKEND_NAMES = ("auto", "vulkan", "triton", "cpu")

#: A forward pass bound to its backend and Problem (``Backend.bind``): ``(q, k, v, mask) -> (out, lse)``,
#: with the keywords ``alibi`` / ``sinks`` where ``problem.alibi_rows`` / ``problem.sinks`` (see ``Backend``).
Runner = Callable[[Any, Any, Any, Any], Tuple[Any, Any]]


def check_backend_name(backend: Any, allow_none: bool = False) -> None:
    """ValueError naming ``backend`` unless it is one of ``BACKEND_NAMES`` (or None, where
    ``allow_none``: the integrations' "keep what install() chose")."""
    if backend is None and allow_none:
        return
    if backend not in BACKEND_NAMES:
        either = "None or one" if allow_none else "one"
        raise ValueError(f"backend must be {either} of {BACKEND_NAMES}, got {backend!r}")


class Backend:
    """One way to compute attention. Subclasses live one per module (cpu/, vulkan/, triton/).

    ``forward`` takes host arrays in engine storage (float32 / float16 / bf16 as uint16 bits),
    contiguous, shaped as the Problem says, and an optional float32 additive ``mask`` of
    ``problem.mask_shape`` (``-inf`` = hidden). It returns ``(out, lse)``: ``out`` in the storage
    dtype of q, shape ``[B, Hq, Lq, Dv]``, and the natural-log row log-sum-exp, float32
    ``[B, Hq, Lq]`` (``-inf`` for a row that sees no key; such a row's output is 0).

    Score modifiers (:mod:`aule_kp.scoremods`): every backend applies ``problem.softcap``; when
    ``problem.alibi_rows``, the keyword argument ``alibi`` of ``forward`` and ``backward`` (float32
    slopes ``[alibi_rows, Hq]``, host or torch as the other inputs); when ``problem.sinks``, the
    keyword argument ``sinks`` of ``forward`` and ``backward`` (float32 ``[Hq]``; the returned lse
    includes them, and ``backward``'s gradients need nothing more than that lse: a backend may read
    the sinks where it recomputes a row's statistics).
    """

    name = "base"

    def unavailable_reasons(self) -> List[str]:
        """Why this backend cannot run at all on this machine (empty when it can)."""
        return []

    def problem_reasons(self, problem: Problem) -> List[str]:
        """Why this backend cannot take ``problem``, ``unavailable_reasons()`` included (empty when it can).
        Which of the backends that can take it runs it is ``aule_kp.dispatch.PRIORITY``'s choice."""
        return self.unavailable_reasons()

    def bind(self, problem: Problem) -> Tuple[Optional[Runner], List[str]]:
        """``(runner, [])`` when this backend can take ``problem``, ``runner(q, k, v, mask)`` computing it
        as ``forward(problem, q, k, v, mask)`` does; ``(None, problem_reasons(problem))`` when it cannot.
        One call for both, so that the dispatcher's check and the run that follows share their work."""
        reasons = self.problem_reasons(problem)
        return (None, reasons) if reasons else (functools.partial(self.forward, problem), [])

    def bind_rotary(self, problem: Problem, layout: RotaryLayout) -> Optional[Runner]:
        """The one hook for backends with a fused rotary embedding: a runner like ``bind``'s that
        also takes ``rotary=`` (a :class:`aule_kp.rotary.RotaryTables` of the problem's batch and
        lengths) and rotates q and k (unrotated in) in its own sequence before the attention; None
        where this backend cannot (the caller then rotates first and calls ``bind``'s runner).
        ``problem`` is one ``bind`` accepted."""
        return None

    #: True for backends that take torch tensors where they live (Triton on CUDA/ROCm): then
    #: ``forward``/``backward`` receive and return contiguous torch tensors instead of host arrays.
    native_torch = False

    def forward(
        self, problem: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray], *,
        alibi: Optional[np.ndarray] = None, sinks: Optional[np.ndarray] = None,
    ) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def backward_reasons(self, problem: Problem, mask_grad: bool = False) -> List[str]:
        """Reasons this backend's ``backward`` cannot take ``problem`` (empty when it can)."""
        return []

    def backward(
        self,
        problem: Problem,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        out: np.ndarray,
        dout: np.ndarray,
        lse: np.ndarray,
        mask: Optional[np.ndarray],
        mask_grad: bool = False,
        *,
        alibi: Optional[np.ndarray] = None,
        sinks: Optional[np.ndarray] = None,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """Gradients ``(dq, dk, dv, dmask)`` of the forward pass, FA2-style from the saved ``lse``.

        Inputs as in ``forward`` plus ``out`` and ``dout`` (storage dtype of q, ``[B, Hq, Lq, Dv]``)
        and ``lse`` (float32 ``[B, Hq, Lq]``, natural log). ``dq``/``dk``/``dv`` come back in the
        storage dtype of q with the shapes of q/k/v (GQA: dk/dv summed over the query heads that
        share a kv head). ``dmask`` (float32, ``problem.mask_shape``: summed over broadcast dims) is
        computed only when ``mask_grad`` is True and a mask is given, else None. Rows with no
        visible key contribute nothing.
        """
        raise NotImplementedError(f"the {self.name} backend has no backward pass")
