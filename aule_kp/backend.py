"""What every backend implements (xformers-style: each says *why* it cannot take a problem)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from .problem import Problem


class Backend:
    """One way to compute attention. Subclasses live one per module (cpu/, vulkan/, triton/).

    ``forward`` takes host arrays in engine storage (float32 / float16 / bf16 as uint16 bits),
    contiguous, shaped as the Problem says, and an optional float32 additive ``mask`` of
    ``problem.mask_shape`` (``-inf`` = hidden). It returns ``(out, lse)``: ``out`` in the storage
    dtype of q, shape ``[B, Hq, Lq, Dv]``, and the natural-log row log-sum-exp, float32
    ``[B, Hq, Lq]`` (``-inf`` for a row that sees no key; such a row's output is 0).
    """

    name = "base"

    def available(self) -> List[str]:
        """Reasons this backend cannot run at all on this machine (empty when it can)."""
        return []

    def reasons(self, problem: Problem) -> List[str]:
        """Reasons this backend cannot take ``problem`` (empty when it can)."""
        return self.available()

    def rank(self, problem: Problem) -> int:
        """Lower is preferred by ``backend="auto"`` among backends that can take ``problem``."""
        return 100

    def forward(
        self, problem: Problem, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray]
    ) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError
