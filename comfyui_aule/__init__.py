"""aule-kp ComfyUI node pack: FlashAttention-2 over Vulkan for ComfyUI models.

ComfyUI loads this folder as a custom node directory (``custom_nodes/<this folder>``) and reads
``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``. The engine is the ``aule-kp`` package.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .override import AuleAttentionOverride

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "AuleAttentionOverride"]
