"""aule_kp.compat: aule-attention 0.5.0's names, signatures, defaults and semantics on aule-kp.

The installed aule-attention (requirements-dev.txt) is the ground truth for names and signatures.
Importing it is safe in-process: its import only looks for libaule's file; Vulkan starts in ``Aule()``
(whose ``get_device_info`` dies with SIGILL on lavapipe), which nothing here calls. Its pure NumPy /
torch helpers (``_cpu_attention``, ``apply_rope_separate``) are called as a second reference.
Numbers are compared with the float64 reference under the suite's error model (conftest.tolerance).
"""

from __future__ import annotations

import inspect
import logging

import numpy as np
import pytest
from conftest import output_tolerance
from reference import reference_attention

import aule_kp
import aule_kp.compat as aule
from aule_kp.problem import Problem, default_scale

#: aule-attention 0.5.0 names the compat layer leaves out, and why (README, "Coming from aule-attention").
NOT_PROVIDED = {
    "flash_attention_paged_amd",  # AMD ROCm only (undefined elsewhere in aule-attention too)
    "patch_model",  # GPT-2 monkey patch; aule_kp.install / aule_kp.integrations replace it
}


@pytest.fixture(scope="module")
def original():
    return pytest.importorskip("aule", reason="aule-attention 0.5.0 (requirements-dev.txt) is not installed")


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_every_name_with_aule_attentions_signature(original):
    import torch

    assert set(original.__all__) - set(aule.__all__) == NOT_PROVIDED
    for name in original.__all__:
        if name in NOT_PROVIDED or name == "__version__":
            continue
        ours, theirs = getattr(aule, name), getattr(original, name)
        if inspect.isclass(theirs):
            continue
        expected = _params(theirs)
        if name == "precompute_rope_frequencies":  # dtype=None means torch.float32: torch is imported lazily
            expected = [(n, k, None if d is torch.float32 else d) for n, k, d in expected]
        assert _params(ours) == expected, name
    methods = {"Aule": ("__init__", "tensor", "attention", "attention_gpu", "close", "__enter__", "__exit__",
                        "get_device_info"),
               "GpuTensor": ("upload", "download", "destroy")}
    for cls, names in methods.items():
        for m in names:
            theirs = getattr(getattr(original, cls), m)
            ours = getattr(getattr(aule, cls), m)
            if m == "__exit__":  # (exc_type, exc_val, exc_tb) vs *exc: both take the three
                continue
            assert _params(ours) == _params(theirs), f"{cls}.{m}"
        for prop in ("shape", "dtype", "size") if cls == "GpuTensor" else ("device_name",):
            assert isinstance(getattr(getattr(aule, cls), prop), property), f"{cls}.{prop}"
    assert issubclass(aule.AuleError, RuntimeError)
    assert aule.attention is aule.flash_attention


def _inputs(rng, b, hq, hkv, lq, lk, d, dtype=np.float32):
    q = rng.standard_normal((b, hq, lq, d)).astype(dtype)
    k = rng.standard_normal((b, hkv, lk, d)).astype(dtype)
    v = rng.standard_normal((b, hkv, lk, d)).astype(dtype)
    return q, k, v


def _top_left(q, k, v, causal, window_size=-1):
    """The float64 reference and its tolerance for aule-attention's band (top-left: diag 0)."""
    b, hq, lq, d = q.shape
    left = window_size if window_size > 0 else None
    right = 0 if causal else left
    p = Problem(b, hq, k.shape[1], lq, k.shape[2], d, d, "float32", default_scale(d), 0, left, right)
    return reference_attention(q, k, v, p)[0], output_tolerance(p, q, k, v)


@pytest.mark.parametrize("hq,hkv,lq,lk", [(2, 2, 24, 24), (4, 2, 9, 24), (2, 1, 24, 9)])
def test_causal_default_is_top_left(rng, hq, hkv, lq, lk):
    """Lq < Lk needs a mask, Lq > Lk a shifted window, Lq == Lk plain causal: all top-left."""
    q, k, v = _inputs(rng, 1, hq, hkv, lq, lk, 16)
    ref, tol = _top_left(q, k, v, causal=True)
    out = aule.flash_attention(q, k, v)
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol)
    # The difference the issue found (aule_kp's non-causal default) is far outside the tolerance.
    assert np.abs(aule_kp.flash_attention(q, k, v) - ref).max() > 100 * tol


def test_matches_aule_attentions_own_cpu_path(rng, original):
    q, k, v = _inputs(rng, 1, 2, 2, 20, 20, 16)
    theirs = original._cpu_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    _, tol = _top_left(q, k, v, causal=True)
    np.testing.assert_allclose(aule.flash_attention(q, k, v), theirs, rtol=0, atol=tol)
    np.testing.assert_allclose(aule.flash_attention(q, k, v, causal=False, scale=0.3),
                               reference_attention(q, k, v, Problem(1, 2, 2, 20, 20, 16, 16, "float32", 0.3))[0],
                               rtol=0, atol=tol)


@pytest.mark.parametrize("lq,lk,causal,window", [(24, 24, False, 5), (9, 24, True, 4), (24, 9, False, 3),
                                                 (24, 9, True, 6), (9, 24, False, 30)])
def test_window_size(rng, lq, lk, causal, window):
    """Aule.attention's window_size (|i - j| <= w, only behind the query when causal), top-left."""
    q, k, v = _inputs(rng, 1, 2, 2, lq, lk, 16)
    ref, tol = _top_left(q, k, v, causal, window)
    with aule.Aule() as a:
        np.testing.assert_allclose(a.attention(q, k, v, causal=causal, window_size=window), ref, rtol=0, atol=tol)


def _rope_reference(x, cos, sin):
    """float64 rotation of x's halves as complex pairs (x1 + i x2)·e^{iθ}: aule-attention's
    ``x*cos + rotate_half(x)*sin`` with ``cos = cos θ``, ``sin = sin θ`` of shape [S, D/2]."""
    h = x.shape[-1] // 2
    z = (x[..., :h].astype(np.float64) + 1j * x[..., h:]) * (cos[: x.shape[-2]] + 1j * sin[: x.shape[-2]])
    return np.concatenate([z.real, z.imag], axis=-1)


def _rope_tables(n, d, base=10000.0):
    theta = np.arange(n)[:, None] * base ** (-np.arange(d // 2) / (d // 2))
    return np.cos(theta), np.sin(theta)


@pytest.mark.parametrize("lq,lk", [(16, 16), (6, 16)])
def test_rotary_matches_reference(rng, lq, lk):
    q, k, v = _inputs(rng, 1, 4, 2, lq, lk, 16)
    cos, sin = _rope_tables(20, 16)
    qr, kr = _rope_reference(q, cos, sin), _rope_reference(k, cos, sin)
    ref, tol = _top_left(qr, kr, v, causal=True)
    out = aule.flash_attention(q, k, v, rot_cos=cos.astype(np.float32)[None, None], rot_sin=sin.astype(np.float32))
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol)
    # Without the rotation the result is another one: the tables were not dropped.
    assert np.abs(aule.flash_attention(q, k, v) - ref).max() > 100 * tol


def test_rotary_helpers_match_aule_attentions(rng, original):
    import torch

    q, k, _ = (torch.from_numpy(a) for a in _inputs(rng, 1, 2, 2, 12, 12, 16))
    cos, sin = original.precompute_rope_frequencies(12, 16, device="cpu")
    c2, s2 = aule.precompute_rope_frequencies(12, 16, device="cpu")
    assert torch.equal(cos, c2) and torch.equal(sin, s2)
    theirs = original.apply_rope_separate(q, k, cos, sin)
    ours = aule.apply_rope_separate(q, k, cos, sin)
    for a, b in zip(ours, theirs):
        # float32 products of |x| <= ~5 and a sum of two: a few units of float32 roundoff apart at most.
        torch.testing.assert_close(a, b, rtol=0, atol=4 * 2.0**-24 * 2 * float(q.abs().max()))
    out = aule.flash_attention_rope(q, k, torch.from_numpy(_inputs(rng, 1, 2, 2, 12, 12, 16)[2]), cos, sin)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32


def test_rotary_bad_tables(rng):
    q, k, v = _inputs(rng, 1, 2, 2, 8, 8, 16)
    cos, sin = _rope_tables(8, 16)
    with pytest.raises(ValueError, match="rot_cos and rot_sin"):
        aule.flash_attention(q, k, v, rot_cos=cos)
    with pytest.raises(ValueError, match=r"rot_cos must have shape \[S, 8\]"):
        aule.flash_attention(q, k, v, rot_cos=np.concatenate([cos, cos], -1), rot_sin=sin)
    with pytest.raises(ValueError, match="S >= 8"):
        aule.flash_attention(q, k, v, rot_cos=cos[:4], rot_sin=sin[:4])


def test_install_verbose(rng, capsys, caplog):
    import torch

    caplog.set_level(logging.INFO, logger="aule_kp")
    original_sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = _inputs(rng, 1, 2, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="Invalid backend 'auto'"):
        aule.install(backend="auto")
    try:
        aule.install(verbose=True)
        assert "aule-kp: Installed (auto: " in capsys.readouterr().out
        assert torch.nn.functional.scaled_dot_product_attention is aule_kp.scaled_dot_product_attention
        aule.flash_attention(q, k, v)
        assert capsys.readouterr().out == "aule-kp: auto | shape=(1, 2, 8, 16) | causal=True\n"
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        ref, tol = _top_left(q, k, v, causal=True)
        np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=tol)
        aule.install(backend="triton")
        assert capsys.readouterr().out == ""  # without verbose the line goes to the log
        assert "aule-kp: Updated (backend=triton, verbose=False)" in caplog.text
        with pytest.raises(aule.AuleError, match="Triton backend takes torch tensors"):
            aule.flash_attention(q, k, v)  # the forced backend refuses NumPy: aule-attention's error class
    finally:
        aule.uninstall()
    assert "aule-kp: Uninstalled, restored PyTorch SDPA" in caplog.text
    assert torch.nn.functional.scaled_dot_product_attention is original_sdpa
    aule.uninstall()
    assert "aule-kp: Not installed" in caplog.text and capsys.readouterr().out == ""


def test_backend_info(capsys):
    names = aule.get_available_backends()
    assert "vulkan" in names and "cpu" in names
    info = aule.get_backend_info()
    assert list(info) == names and all(e["available"] for e in info.values())
    assert info["vulkan"]["device"] == aule_kp.info()["devices"][0]["name"]
    aule.print_backend_info()
    printed = capsys.readouterr().out
    assert "Available backends" in printed and info["vulkan"]["device"] in printed


def test_context_round_trip(rng):
    q, k, v = _inputs(rng, 1, 4, 2, 16, 16, 16)
    cos, sin = _rope_tables(16, 16)
    with pytest.raises(ValueError, match="library_path"):
        aule.Aule(library_path="libaule.so")
    with aule.Aule() as a:
        assert a.get_device_info()["device_name"] == a.device_name
        tq, tk, tv, out = a.tensor(q.shape), a.tensor(k.shape), a.tensor(v.shape), a.tensor(q.shape)
        assert out.dtype == np.float32 and out.size == q.size
        for t, x in ((tq, q), (tk, k), (tv, v)):
            t.upload(x)
        a.attention_gpu(tq, tk, tv, out)  # causal=False by default, as aule-attention's Aule
        ref, tol = _top_left(q, k, v, causal=False)
        np.testing.assert_allclose(out.download(), ref, rtol=0, atol=tol)
        np.testing.assert_allclose(a.attention(q, k, v), ref, rtol=0, atol=tol)
        tc, ts = a.tensor((1, 1, 16, 8)), a.tensor((1, 1, 16, 8))
        tc.upload(cos)
        ts.upload(sin)
        a.attention_gpu(tq, tk, tv, out, tc, ts, causal=True)
        ref, tol = _top_left(_rope_reference(q, cos, sin), _rope_reference(k, cos, sin), v, causal=True)
        np.testing.assert_allclose(out.download(), ref, rtol=0, atol=tol)
        np.testing.assert_array_equal(tq.download(), q)  # the rotation went to scratch tensors
        short = a.tensor((1, 4, 8, 16))
        with pytest.raises(ValueError, match="needs a mask"):
            a.attention_gpu(short, tk, tv, a.tensor(short.shape), causal=True)
        out.destroy()
        out.destroy()
        with pytest.raises(ValueError, match="freed"):
            out.download()
        with pytest.raises(ValueError, match="Size mismatch"):
            tq.upload(q[:, :1])
    with pytest.raises(ValueError, match="closed"):
        tq.download()
    with pytest.raises(ValueError, match="closed"):
        a.tensor(q.shape)


def test_bad_inputs_name_the_argument(rng):
    """Not an array, or too few dims: a TypeError/ValueError naming the argument from every entry point
    (they were AttributeError / IndexError from the band and rotary code before aule-kp's checks ran)."""
    q, k, v = _inputs(rng, 1, 2, 2, 8, 8, 16)
    cos, sin = _rope_tables(8, 16)
    calls = (lambda *a: aule.flash_attention(*a), lambda *a: aule.flash_attention_rope(*a, cos, sin),
             lambda *a: aule.flash_attention(*a, rot_cos=cos, rot_sin=sin),
             lambda q, k, v: aule.apply_rope_separate(q, k, cos, sin))
    for call in calls:
        for args, bad in (((q.tolist(), k, v), "q"), ((q, None, v), "k"), ((q[0, 0, 0], k, v), "q"),
                          ((q, k[0, 0, 0], v), "k")):
            with pytest.raises((TypeError, ValueError), match=rf"^{bad} "):
                call(*args)
    with aule.Aule() as a:
        for args, bad in (((None, k, v), "q"), ((q, k[0, 0], v), "k"), ((q, k, 1.0), "v")):
            with pytest.raises(ValueError, match=rf"^{bad} "):
                a.attention(*args)


@pytest.mark.parametrize("dtype", [np.complex64, np.int32, bool])
def test_rope_tables_must_be_real_floats(rng, dtype):
    """A complex table lost its imaginary part in the float32 cast (NumPy only warned), silently."""
    q, k, v = _inputs(rng, 1, 2, 2, 8, 8, 16)
    cos, sin = _rope_tables(8, 16)
    for bad_cos, bad_sin, name in ((cos.astype(dtype), sin, "rot_cos"), (cos, sin.astype(dtype), "rot_sin")):
        with pytest.raises(TypeError, match=rf"^{name} "):
            aule.flash_attention(q, k, v, rot_cos=bad_cos, rot_sin=bad_sin)
    with pytest.raises(TypeError, match="^rot_cos "):
        aule.flash_attention(q, k, v, rot_cos=pytest.importorskip("torch").from_numpy(cos.astype(np.complex64)),
                             rot_sin=sin)


def test_window_size_takes_any_integer(rng):
    """aule-attention passed window_size through ctypes.c_int32, which takes NumPy integers too."""
    q, k, v = _inputs(rng, 1, 2, 2, 12, 12, 16)
    ref, tol = _top_left(q, k, v, causal=False, window_size=3)
    with aule.Aule() as a:
        np.testing.assert_allclose(a.attention(q, k, v, window_size=np.int64(3)), ref, rtol=0, atol=tol)
    for bad in (3.0, True, "3", None):
        with pytest.raises(TypeError, match="window_size"):
            aule.flash_attention_rope(q, k, v, *_rope_tables(12, 16), window_size=bad)
