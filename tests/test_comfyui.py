"""The ComfyUI node pack (comfyui_aule/) against the real ComfyUI code.

ComfyUI is not a package: the tests put a source snapshot on ``sys.path`` (``$AULE_KP_COMFYUI``, default
``<repo>/../shared/thirdparty/ComfyUI``) and skip when it is absent. They load the pack the way ComfyUI
does (``nodes.load_custom_node``), patch a tiny SD1.5-style UNet with random weights and compare
sampling with ComfyUI's own attention, and check the override's layouts, masks and fallbacks.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.abc
import importlib.machinery
import logging
import os
import pickle
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
# tests/test_comfyui_install.py points this at a copy that `python -m aule_kp.comfyui install` wrote.
PACK = Path(os.environ.get("AULE_KP_COMFYUI_PACK", REPO / "comfyui_aule"))
COMFYUI = Path(os.environ.get("AULE_KP_COMFYUI", REPO.parent / "shared" / "thirdparty" / "ComfyUI"))

if not (COMFYUI / "comfy" / "ldm" / "modules" / "attention.py").is_file():
    pytest.skip(f"no ComfyUI snapshot at {COMFYUI} (set AULE_KP_COMFYUI)", allow_module_level=True)
# What `import nodes` needs beyond torch and numpy (see the snapshot's NOTES.md).
for _name in ("psutil", "einops", "PIL", "safetensors", "scipy", "torchsde", "tqdm", "yaml", "transformers", "av"):
    pytest.importorskip(_name, reason=f"ComfyUI needs {_name}")

from conftest import exponent_range, tolerance  # noqa: E402

import aule_kp  # noqa: E402

log = logging.getLogger("aule_kp")



# Tolerances from the suite's error model (conftest.tolerance). aule-kp and ComfyUI's torch SDPA path
# both compute in float32, each within one tolerance of exact: twice that between them. Through whole
# modules (projections around the attention) the value scale is the largest |value| compared.


def _module_tol(want: torch.Tensor, reduction_len: int) -> float:
    """Two float32 computations of a module's output (or gradient) ``want``."""
    return 2 * tolerance("float32", reduction_len, want.abs().max().item())


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty ``torchvision`` packages: ComfyUI imports torchvision at module level but uses it only in
    models these tests never run, and PyPI's torchvision does not import beside the local torch wheel."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []


@pytest.fixture(scope="module")
def comfy() -> Iterator[types.SimpleNamespace]:
    """ComfyUI imported CPU-only with the node pack loaded; undoes the path and stub afterwards."""
    stub = _TorchvisionStub()
    sys.meta_path.insert(0, stub)
    sys.path.insert(0, str(COMFYUI))
    try:
        import comfy.cli_args

        # ComfyUI never parses argv here; without --cpu model_management asks torch for a CUDA device.
        comfy.cli_args.args.cpu = True
        import comfy.ldm.modules.attention as attention
        import comfy.model_management  # noqa: F401
        import comfy.model_patcher as model_patcher
        import comfy.supported_models as supported_models
        import nodes

        assert asyncio.run(nodes.load_custom_node(str(PACK))) is True, "ComfyUI could not load comfyui_aule"
        pack = sys.modules[str(PACK).replace(".", "_x_")]
        yield types.SimpleNamespace(attention=attention, model_patcher=model_patcher,
                                    supported_models=supported_models, nodes=nodes, pack=pack)
    finally:
        sys.meta_path.remove(stub)
        sys.path.remove(str(COMFYUI))
        # Other test modules (transformers) must not see the stub as an installed torchvision.
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            if isinstance(sys.modules[name].__spec__.loader, _TorchvisionStub):
                del sys.modules[name]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> List[Dict[str, Any]]:
    """Counts aule_kp.flash_attention calls (the override looks it up on the module at call time); each
    test starts with no fallback warned about."""
    monkeypatch.setattr(aule_kp.errors, "_warned", set())
    seen: List[Dict[str, Any]] = []
    real = aule_kp.flash_attention

    def counting(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        seen.append({"q": tuple(q.shape), **kw})
        return real(q, k, v, **kw)

    monkeypatch.setattr(aule_kp, "flash_attention", counting)
    return seen


def _override(comfy: types.SimpleNamespace, backend: str) -> Any:
    """The override the *Aule Attention* node sets, taken from a patched model."""
    model = comfy.model_patcher.ModelPatcher(torch.nn.Linear(1, 1), torch.device("cpu"), torch.device("cpu"))
    (patched,) = comfy.nodes.NODE_CLASS_MAPPINGS["AuleKpAttention"]().patch(model, backend)
    return patched.model_options["transformer_options"]["optimized_attention_override"]


def _reset(module: torch.nn.Module) -> None:
    """Random weights: ComfyUI's ``disable_weight_init`` layers skip init, so call torch's own."""
    for m in module.modules():
        for cls in type(m).__mro__:
            if cls.__module__.startswith("torch.nn") and "reset_parameters" in cls.__dict__:
                cls.reset_parameters(m)
                break


def test_pack_loads_as_custom_node(comfy: types.SimpleNamespace) -> None:
    mappings, names = comfy.nodes.NODE_CLASS_MAPPINGS, comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS
    assert mappings["AuleKpAttention"] is comfy.pack.NODE_CLASS_MAPPINGS["AuleKpAttention"]
    assert names["AuleKpAttention"] == "Aule Attention" and names["AuleKpInfo"] == "Aule Info"
    inputs = mappings["AuleKpAttention"].INPUT_TYPES()["required"]
    assert inputs["model"] == ("MODEL",)
    assert inputs["backend"][0] == ["auto", "vulkan", "cpu", "triton"]
    assert inputs["backend"][1]["default"] == "auto"
    assert mappings["AuleKpAttention"].RETURN_TYPES == ("MODEL",)
    assert mappings["AuleKpInfo"].RETURN_TYPES == ("STRING",)


def test_pyproject_is_registry_ready() -> None:
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((PACK / "pyproject.toml").read_text())
    project, comfy_tool = data["project"], data["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()
    assert len(project["version"].split(".")) == 3 and all(p.isdigit() for p in project["version"].split("."))
    assert any(d.startswith("aule-kp") for d in project["dependencies"])
    assert {"PublisherId", "DisplayName", "Icon"} <= set(comfy_tool)


@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "2d", "3d", "4d", "bool"])
def test_override_matches_comfyui_attention(comfy: types.SimpleNamespace, calls: List[Dict[str, Any]],
                                            skip_reshape: bool, skip_output_reshape: bool,
                                            mask_kind: Optional[str]) -> None:
    b, heads, lq, lk, d = 2, 3, 7, 11, 16
    g = torch.Generator().manual_seed(1)
    shape_q, shape_k = (((b, heads, lq, d), (b, heads, lk, d)) if skip_reshape
                        else ((b, lq, heads * d), (b, lk, heads * d)))
    q, k, v = torch.randn(shape_q, generator=g), torch.randn(shape_k, generator=g), torch.randn(shape_k, generator=g)
    masks = {
        None: None,
        "2d": torch.randn(lq, lk, generator=g),
        "3d": torch.randn(b, lq, lk, generator=g),
        "4d": torch.randn(b, heads, lq, lk, generator=g),
        # key padding, True = attend (torch SDPA's convention, which ComfyUI's pytorch attention uses)
        "bool": torch.arange(lk).view(1, 1, 1, lk) < torch.tensor([lk, 5]).view(b, 1, 1, 1),
    }
    mask = masks[mask_kind]
    fn = comfy.attention.attention_pytorch
    # heads as a keyword and the mask positional: ComfyUI's callers do both.
    want = fn(q, k, v, heads=heads, mask=mask, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    opts = {"optimized_attention_override": _override(comfy, "cpu")}
    got = fn(q, k, v, heads, mask, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
             transformer_options=opts)
    assert len(calls) == 1 and calls[0]["backend"] == "cpu"
    assert got.shape == want.shape and got.dtype == want.dtype
    heads_layout = [x if skip_reshape else x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k)]
    e = exponent_range(*(x.numpy() for x in heads_layout), d**-0.5,
                       None if mask is None or mask.dtype == torch.bool else mask.numpy())
    torch.testing.assert_close(got, want, rtol=0, atol=2 * tolerance("float32", lk + d, v.abs().max().item(), e))


def _tiny_sd15(comfy: types.SimpleNamespace) -> Any:
    """A real ComfyUI SD1.5 model (UNetModel in a BaseModel in a ModelPatcher), 4M random weights.

    Head dims are 8 and 16 (8 heads over 64/128 channels), so every attention call suits aule-kp.
    """
    config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 64,
        "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 32, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False,
        "use_temporal_resblock": False, "dtype": torch.float32,
    }
    torch.manual_seed(0)
    model = comfy.supported_models.SD15(config).get_model({})
    _reset(model)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def test_sd15_sampling_matches_comfyui(comfy: types.SimpleNamespace, calls: List[Dict[str, Any]]) -> None:
    model = _tiny_sd15(comfy)
    g = torch.Generator().manual_seed(2)
    positive = [[torch.randn(1, 8, 32, generator=g), {}]]
    negative = [[torch.randn(1, 8, 32, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 4, 16, 16)}

    def sample(m: Any) -> torch.Tensor:
        return comfy.nodes.KSampler().sample(m, 7, 2, 2.0, "euler", "normal", positive, negative, latent)[0]["samples"]

    want = sample(model)
    assert not calls, "the unpatched model must not reach aule-kp"
    (patched,) = comfy.nodes.NODE_CLASS_MAPPINGS["AuleKpAttention"]().patch(model, "cpu")
    got = sample(patched)
    # 7 transformer blocks x (self + cross attention) x 2 steps (cond and uncond batched together).
    assert len(calls) == 28
    assert {c["backend"] for c in calls} == {"cpu"}
    assert torch.isfinite(want).all()
    # Each of the 28 attention calls is off by one float32 tolerance relative to its values (rows of <= 256
    # tokens, head dims <= 16); two euler steps carry those errors to the latents about linearly.
    atol = len(calls) * tolerance("float32", 256 + 16, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    # The node patched a clone: the input model is untouched.
    assert "optimized_attention_override" not in model.model_options["transformer_options"]


def test_clone_deepcopy_and_pickle(comfy: types.SimpleNamespace) -> None:
    (patched,) = comfy.nodes.NODE_CLASS_MAPPINGS["AuleKpAttention"]().patch(_tiny_sd15(comfy), "vulkan")
    fn = patched.model_options["transformer_options"]["optimized_attention_override"]
    again = patched.clone().model_options["transformer_options"]["optimized_attention_override"]
    assert isinstance(again, comfy.pack.AuleAttentionOverride) and again.backend == "vulkan"
    assert copy.deepcopy(fn) == fn
    assert pickle.loads(pickle.dumps(fn)) == fn


def _cross_attention(comfy: types.SimpleNamespace, dim_head: int, heads: int = 2) -> torch.nn.Module:
    torch.manual_seed(3)
    block = comfy.attention.CrossAttention(query_dim=24, context_dim=20, heads=heads, dim_head=dim_head)
    _reset(block)
    return block.eval()


def test_fallback_for_unsupported_head_dim(comfy: types.SimpleNamespace, calls: List[Dict[str, Any]],
                                           caplog: pytest.LogCaptureFixture) -> None:
    block = _cross_attention(comfy, dim_head=12)  # not a multiple of 8
    x, ctx = torch.randn(2, 9, 24), torch.randn(2, 5, 20)
    options = {"optimized_attention_override": _override(comfy, "cpu")}
    with torch.no_grad():
        want = block(x, context=ctx)
        with caplog.at_level(logging.DEBUG, logger="aule_kp"):
            with pytest.warns(aule_kp.AuleFallbackWarning, match="head dim 12"):
                got = block(x, context=ctx, transformer_options=options)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # said once per kind of call
                block(x, context=ctx, transformer_options=options)
    assert not calls
    assert torch.equal(got, want)  # ComfyUI's own function ran, unchanged
    assert sum("head dim 12" in r.getMessage() for r in caplog.records) == 2  # every call logged


def test_fallback_passes_the_call_through(comfy: types.SimpleNamespace, calls: List[Dict[str, Any]],
                                          caplog: pytest.LogCaptureFixture) -> None:
    seen: List[Any] = []

    def comfy_func(*args: Any, **kwargs: Any) -> str:
        seen.append((args, kwargs))
        return "comfy"

    fn = _override(comfy, "cpu")
    q = torch.randn(1, 4, 16, dtype=torch.float64)  # a dtype aule-kp does not take
    with caplog.at_level(logging.DEBUG, logger="aule_kp"):
        out = fn(comfy_func, q, q, q, 2, None, torch.float32, transformer_options={}, _inside_attn_wrapper=True)
    assert out == "comfy" and not calls
    (args, kwargs), = seen
    assert args[:4] == (q, q, q, 2)
    assert kwargs == {"mask": None, "attn_precision": torch.float32, "skip_reshape": False,
                      "skip_output_reshape": False, "transformer_options": {}, "_inside_attn_wrapper": True}
    assert any("float64" in r.getMessage() for r in caplog.records)

    # A mask that does not broadcast: aule-kp raises ValueError, ComfyUI's function takes the call.
    seen.clear()
    q32 = torch.randn(1, 4, 16)
    assert fn(comfy_func, q32, q32, q32, 2, mask=torch.zeros(3, 4, 4)) == "comfy"
    assert len(calls) == 1 and len(seen) == 1


def test_gradients_match_comfyui(comfy: types.SimpleNamespace, calls: List[Dict[str, Any]],
                                 caplog: pytest.LogCaptureFixture) -> None:
    """With grad enabled (ComfyUI's training nodes) the override runs aule-kp and keeps the graph: same
    gradients. (It used to call the autograd Function with too few arguments: the TypeError sent every
    such call to ComfyUI's own attention, and counting ``apply`` calls did not notice.)"""
    block = _cross_attention(comfy, dim_head=16)
    x, ctx = torch.randn(2, 6, 24, requires_grad=True), torch.randn(2, 5, 20)
    mask = torch.randn(2, 6, 5, requires_grad=True)  # 3-D: [B, Lq, Lk], differentiable too
    grads = []
    for options in ({}, {"optimized_attention_override": _override(comfy, "cpu")}):
        block.zero_grad()
        x.grad = mask.grad = None
        with caplog.at_level(logging.DEBUG, logger="aule_kp"):
            out = block(x, context=ctx, mask=mask, transformer_options=options)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), x.grad.clone(), mask.grad.clone(), block.to_q.weight.grad.clone(),
                      block.to_v.weight.grad.clone()))
    assert len(calls) == 1 and calls[0]["backend"] == "cpu"
    assert not [r for r in caplog.records if "using ComfyUI's" in r.getMessage()], "fell back to ComfyUI"
    for got, want in zip(grads[1], grads[0]):  # sums over 2 x 6 rows, 5 keys, 16-wide heads, 24 features
        torch.testing.assert_close(got, want, rtol=0, atol=_module_tol(want, 12 + 5 + 16 + 24))


def test_info_node(comfy: types.SimpleNamespace) -> None:
    result = comfy.nodes.NODE_CLASS_MAPPINGS["AuleKpInfo"]().describe()
    (text,) = result["result"]
    assert result["ui"]["text"] == [text]
    data = aule_kp.info()
    assert f"aule-kp {data['version']}" in text
    assert "backends: " + ", ".join(data["backends"]) in text
    for dev in data["devices"]:
        assert dev["name"] in text and ", ".join(dev["variants"]) in text
    assert "selected device" in text


def test_vulkan_tiny_cross_attention(comfy: types.SimpleNamespace, calls: List[Dict[str, Any]]) -> None:
    if "vulkan" not in aule_kp.info()["backends"]:
        pytest.skip("no Vulkan device")
    block = _cross_attention(comfy, dim_head=16)
    x, ctx = torch.randn(1, 8, 24), torch.randn(1, 5, 20)
    with torch.no_grad():
        want = block(x, context=ctx)
        got = block(x, context=ctx, transformer_options={"optimized_attention_override": _override(comfy, "vulkan")})
    assert len(calls) == 1 and calls[0]["backend"] == "vulkan"
    torch.testing.assert_close(got, want, rtol=0, atol=_module_tol(want, 8 + 5 + 16 + 24))
