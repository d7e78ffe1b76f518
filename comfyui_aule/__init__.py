"""aule-kp ComfyUI node pack: FlashAttention-2 over Vulkan for ComfyUI models.

ComfyUI loads this folder as a custom node directory (``custom_nodes/<this folder>``) and reads
``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``. The engine is the ``aule-kp`` package, which
must be installed in ComfyUI's Python; without it the pack fails to load with one message saying how.
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("aule_kp") is None:
    raise ImportError(
        "the Aule Attention nodes need the aule-kp package in ComfyUI's Python: "
        f"{sys.executable} -m pip install <aule_kp wheel>, then "
        f"{sys.executable} -m pip install -r {Path(__file__).with_name('requirements.txt')}")

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from .override import AuleAttentionOverride  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "AuleAttentionOverride"]
