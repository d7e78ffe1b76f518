"""aule-kp: FlashAttention-2 for every GPU that speaks Vulkan, driven from Python through Kompute."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from ._version import __version__
from .api import flash_attention
from .errors import AuleFallbackWarning, BackendUnavailable
from .info import info
from .vulkan.tensor import Context, GpuTensor

__all__ = ["flash_attention", "AuleFallbackWarning", "BackendUnavailable", "Context", "GpuTensor", "info",
           "__version__"]

logging.getLogger("aule_kp").addHandler(logging.NullHandler())

#: The PyTorch entry points (aule_kp.torch), imported on first use: torch is an optional dependency
#: and slow to import. They stay out of ``__all__`` so that ``import *`` works without torch.
_TORCH_EXPORTS = ("scaled_dot_product_attention", "install", "uninstall", "enabled")

#: Subpackages built on torch, reachable as attributes (``aule_kp.nn``, ``aule_kp.distributed``).
_SUBMODULES = ("nn", "distributed")


def __getattr__(name: str) -> Any:
    if name in _TORCH_EXPORTS:
        from . import torch as torch_integration

        return getattr(torch_integration, name)
    if name in _SUBMODULES:  # torch modules and sequence parallelism: need torch, imported on first use
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
