"""Whether Triton runs kernels through its CPU interpreter: asked by the backend (which must not
import torch or triton) and by the host code (which picks tiles for it)."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
