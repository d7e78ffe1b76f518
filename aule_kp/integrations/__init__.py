"""Integrations with model libraries: :mod:`~aule_kp.integrations.transformers` (an attention
implementation named ``"aule_kp"``) and :mod:`~aule_kp.integrations.diffusers` (an attention
processor). Each submodule imports its library only when imported itself, so ``aule_kp`` never
needs either installed."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

__all__ = ["backend_scope"]


@contextlib.contextmanager
def backend_scope(backend: Optional[str]) -> Iterator[None]:
    """Runs the block with aule_kp's SDPA on ``backend``; ``None`` keeps what ``install()`` chose
    (or the per-device default), so a caller's global choice is not overridden."""
    if backend is None:
        yield
        return
    from ..torch.patch import enabled

    with enabled(backend=backend):
        yield
