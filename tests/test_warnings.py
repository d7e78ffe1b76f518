"""Fallbacks the caller did not ask for are visible: one ``aule_kp.AuleFallbackWarning`` per kind
(through ``warnings``, so no logging set-up is needed), attributed to the caller's line. The "no
Vulkan driver" case is in test_api.py, dropout in test_torch.py."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from conftest import gradient_tolerances

import aule_kp
import aule_kp.vulkan.device as devmod
from aule_kp import errors
from aule_kp.problem import Problem, band
from aule_kp.vulkan.backend import VulkanBackend

_NO_VULKAN = devmod.vulkan_unavailable()
needs_vulkan = pytest.mark.skipif(bool(_NO_VULKAN), reason=f"no Vulkan device: {_NO_VULKAN}")
D = 32


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(errors, "_warned", set())


def _tensors(requires_grad: bool = True) -> Any:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).requires_grad_(requires_grad)
            for s in ((1, 2, 6, D), (1, 1, 9, D), (1, 1, 9, D))]


def test_warn_once_is_once_per_key() -> None:
    with pytest.warns(aule_kp.AuleFallbackWarning) as record:
        for _ in range(3):
            errors.warn_once("a", "first kind")
            errors.warn_once("b", "second kind")
    assert [str(w.message) for w in record] == ["first kind", "second kind"]
    assert all(w.filename == __file__ for w in record)
    assert issubclass(aule_kp.AuleFallbackWarning, RuntimeWarning)


def test_an_error_filter_stops_every_fallback_not_only_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: ``warnings.simplefilter("error", AuleFallbackWarning)`` makes fallbacks errors. The key was
    recorded before ``warnings.warn`` raised, so the second call of a kind ran its fallback silently."""
    from aule_kp.cpu import native
    from aule_kp.cpu.backend import CpuBackend

    with warnings.catch_warnings():
        warnings.simplefilter("error", aule_kp.AuleFallbackWarning)
        for _ in range(2):
            with pytest.raises(aule_kp.AuleFallbackWarning, match="first kind"):
                errors.warn_once("a", "first kind")
        # A real fallback: the native CPU kernel missing (the NumPy path would run).
        monkeypatch.setattr(native, "LIB_DIR", native.LIB_DIR / "missing")
        monkeypatch.setattr(native, "_loaded", {})
        monkeypatch.setattr(native, "_why", {})
        q = np.zeros((1, 1, 4, 8), np.float32)
        p = Problem(1, 1, 1, 4, 4, 8, 8, "float32", 0.25)
        for _ in range(2):
            with pytest.raises(aule_kp.AuleFallbackWarning, match="native kernel is unavailable"):
                CpuBackend().forward(p, q, q, q, None)
    # Shown once it is a warning again: once per kind, as before.
    with pytest.warns(aule_kp.AuleFallbackWarning) as record:
        for _ in range(3):
            errors.warn_once("a", "first kind")
    assert len(record) == 1


@needs_vulkan
def test_backward_on_the_cpu_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """flash_attention on the Vulkan backend whose backward cannot run: CPU gradients, one warning."""
    monkeypatch.setattr(VulkanBackend, "backward_reasons", lambda self, problem, mask_grad=False: ["test: none"])
    q, k, v = _tensors()
    want = torch.autograd.grad(aule_kp.flash_attention(q, k, v, causal=True, backend="cpu").sum(), (q, k, v))
    # The forward runs on Vulkan, the backward on the CPU: two computations, each within the error model's
    # tolerance of the exact gradient (d sum(out) / d out = 1).
    qf, kf, vf = (x.detach().numpy() for x in (q, k, v))
    b, hq, lq, d = qf.shape
    diag, left, right = band(lq, kf.shape[2], causal=True, window=None, top_left=False)
    p = Problem(b, hq, kf.shape[1], lq, kf.shape[2], d, vf.shape[-1], "float32", d**-0.5, diag, left, right)
    tolerances = [2 * t for t in gradient_tolerances(p, qf, kf, vf, np.ones((b, hq, lq, vf.shape[-1]), np.float32))]
    with pytest.warns(aule_kp.AuleFallbackWarning) as record:
        for _ in range(2):
            out = aule_kp.flash_attention(q, k, v, causal=True, backend="vulkan")
            grads = torch.autograd.grad(out.sum(), (q, k, v))
            for g, w, tol in zip(grads, want, tolerances):
                torch.testing.assert_close(g, w, atol=tol, rtol=0)
    notices = [w for w in record if "computing gradients on the CPU backend" in str(w.message)]
    assert len(notices) == 1 and "test: none" in str(notices[0].message)


@needs_vulkan
def test_sdpa_on_a_named_backend_that_refuses_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(VulkanBackend, "bind", lambda self, problem: (None, ["no room for it (test)"]))
    q, k, v = _tensors(requires_grad=False)
    with pytest.warns(aule_kp.AuleFallbackWarning, match="no room for it") as record, aule_kp.enabled("vulkan"):
        for _ in range(3):
            aule_kp.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert len(record) == 1


@needs_vulkan
def test_no_warning_on_the_normal_path(recwarn: pytest.WarningsRecorder) -> None:
    """auto on this machine (the CPU backend, or Vulkan where it leads) is no fallback."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 6, D)).astype(np.float32)
    aule_kp.flash_attention(q, q, q)
    aule_kp.flash_attention(*_tensors(), causal=True).sum().backward()
    assert not [w for w in recwarn if issubclass(w.category, aule_kp.AuleFallbackWarning)]
