"""PyTorch integration: the SDPA drop-in, install()/uninstall()/enabled(), the autograd Function and
the ``torch.library`` ops (``torch.ops.aule_kp.flash_attention_forward`` / ``_backward``)."""

from __future__ import annotations

from .ops import FlashAttentionFunction, flash_attention_backward, flash_attention_forward
from .patch import enabled, install, uninstall
from .sdpa import scaled_dot_product_attention

__all__ = [
    "FlashAttentionFunction",
    "enabled",
    "flash_attention_backward",
    "flash_attention_forward",
    "install",
    "scaled_dot_product_attention",
    "uninstall",
]
