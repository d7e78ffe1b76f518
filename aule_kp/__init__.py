"""aule-kp: FlashAttention-2 for every GPU that speaks Vulkan, driven from Python through Kompute."""

from __future__ import annotations

import logging

from .api import flash_attention
from .errors import BackendUnavailable
from .info import info
from .vulkan.tensor import Context, GpuTensor

__version__ = "0.1.0"
__all__ = ["flash_attention", "BackendUnavailable", "Context", "GpuTensor", "info", "__version__"]

logging.getLogger("aule_kp").addHandler(logging.NullHandler())
