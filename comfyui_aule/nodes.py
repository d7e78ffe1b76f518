"""The ComfyUI nodes: *Aule Attention* (patch a MODEL) and *Aule Info* (what aule-kp can do here)."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Tuple

import aule_kp

from .override import BACKENDS, AuleAttentionOverride

log = logging.getLogger("aule_kp")

CATEGORY = "advanced/attention"


class AuleAttention:
    """Returns a clone of the model whose attention runs through aule-kp.

    The clone's ``transformer_options["optimized_attention_override"]`` takes every attention call
    that ComfyUI routes through its attention functions (UNet/DiT blocks), including on machines where
    ComfyUI's default is sub-quadratic attention rather than SDPA. Calls aule-kp cannot take go to
    ComfyUI's own function; text encoders do not pass ``transformer_options`` and are not affected.
    """

    DESCRIPTION = "Route the model's attention through aule-kp (FlashAttention-2 over Vulkan)."

    @classmethod
    def INPUT_TYPES(cls) -> Dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL",),
                "backend": (list(BACKENDS), {
                    "default": "auto",
                    "tooltip": "auto: the best backend for each call; vulkan/cpu/triton: that one, "
                               "falling back to ComfyUI's attention where it cannot run a call",
                }),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model: Any, backend: str = "auto") -> Tuple[Any]:
        """Clone ``model`` (a ModelPatcher) and set the override on the clone only."""
        patched = model.clone()
        # clone() deep-copies model_options, so the original model keeps its own transformer_options.
        options = patched.model_options.setdefault("transformer_options", {})
        if "optimized_attention_override" in options:
            log.info("aule-kp: replacing an existing optimized_attention_override (%r)",
                     options["optimized_attention_override"])
        options["optimized_attention_override"] = AuleAttentionOverride(backend)
        return (patched,)


def format_info(data: Dict[str, Any]) -> str:
    """Human-readable text for ``aule_kp.info()``: version, selected device, its variants, backends."""
    lines: List[str] = [f"aule-kp {data.get('version', '?')}",
                        f"backends: {', '.join(data.get('backends', [])) or 'none'}"]
    devices = data.get("devices") or []
    selected = data.get("selected_device")
    if not devices:
        lines.append(f"selected device: none ({data.get('vulkan_error') or 'no Vulkan device'})")
    for i, dev in enumerate(devices):
        mark = "selected device" if dev.get("index", i) == selected else "device"
        lines.append(f"{mark} {dev.get('index', i)}: {dev.get('name', '?')} "
                     f"(vendor {dev.get('vendor', '?')}, type {dev.get('type', '?')}, "
                     f"subgroup {dev.get('subgroup_size', '?')}, fp16 {dev.get('fp16', '?')}, "
                     f"coopmat {dev.get('coopmat', '?')})")
        lines.append(f"  variants: {', '.join(dev.get('variants', [])) or 'none'}")
    return "\n".join(lines)


class AuleInfo:
    """Outputs a STRING describing aule-kp here: version, selected device, variants and backends."""

    DESCRIPTION = "Describe aule-kp's devices, kernel variants and backends."

    @classmethod
    def INPUT_TYPES(cls) -> Dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {"required": {}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    FUNCTION = "describe"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def describe(self) -> Dict[str, Any]:
        """The text as output and as UI text (shown by front-ends that display node text)."""
        try:
            text = format_info(aule_kp.info())
        except Exception as exc:  # a broken driver must not break the workflow: report it instead
            log.warning("aule-kp: info() failed: %s", exc)
            text = f"aule-kp {aule_kp.__version__}\ninfo() failed: {type(exc).__name__}: {exc}"
        return {"ui": {"text": [text]}, "result": (text,)}


# Keys carry "Kp": aule-attention 0.5.0 ships a node pack with an "AuleInfo" node, and ComfyUI keeps
# only the last node registered under a key when both packs are installed.
NODE_CLASS_MAPPINGS = {"AuleKpAttention": AuleAttention, "AuleKpInfo": AuleInfo}
NODE_DISPLAY_NAME_MAPPINGS = {"AuleKpAttention": "Aule Attention", "AuleKpInfo": "Aule Info"}
