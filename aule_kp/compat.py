"""aule-attention 0.5.0's Python API on aule-kp: ``import aule_kp.compat as aule`` in place of ``import aule``.

Same names, signatures, defaults and masking semantics as aule-attention 0.5.0 (its ``aule/__init__.py``
and ``aule/vulkan.py``), computed by aule-kp's public API. What aule-attention did differently from
what it documented is fixed here, never copied (the README's "Coming from aule-attention 0.5.0" lists it):

* ``causal`` (default ``True`` in ``flash_attention``) is aligned **top-left** as aule-attention's
  CPU and Triton paths are (query ``i`` sees keys ``j <= i``); ``aule_kp.flash_attention`` aligns
  bottom-right, so calls with ``Lq != Lk`` are translated, never passed on.
* ``rot_cos``/``rot_sin`` are applied (aule-attention's ``flash_attention`` dropped them with a
  warning on Vulkan and CPU): the half-rotation of its Triton kernel and ``apply_rope_separate``,
  ``x*cos + rotate_half(x)*sin`` on q (positions ``0..Lq-1``) and k (``0..Lk-1``), with ``cos`` and
  ``sin`` of shape ``[S, D/2]`` (leading 1s allowed), ``S >= max(Lq, Lk)``.
* ``scale`` is honoured on every backend; results keep q's dtype instead of coming back float32.

Printing: aule-attention's ``install``, ``uninstall``, ``print_backend_info`` and (with
``verbose=True``) each ``flash_attention`` call print to stdout; so do these, and nothing else here.
"""

from __future__ import annotations

import logging
import numbers
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import api, dispatch, inputs
from ._version import __version__
from .errors import BackendUnavailable
from .info import info as _kp_info
from .vulkan.tensor import Context
from .vulkan.tensor import GpuTensor as _KpTensor

log = logging.getLogger("aule_kp")

__all__ = ["flash_attention", "attention", "scaled_dot_product_attention", "flash_attention_rope",
           "apply_rope_separate", "precompute_rope_frequencies", "install", "uninstall", "get_available_backends",
           "get_backend_info", "print_backend_info", "Aule", "GpuTensor", "AuleError", "__version__"]

_BACKENDS = ("triton", "vulkan", "cpu")  # install()'s choices besides None, as aule-attention's
_forced_backend: Optional[str] = None
_verbose = False
_installed = False


class AuleError(RuntimeError):
    """aule-attention's error for a failed device operation (here: the Vulkan backend is unavailable)."""


# --- masking: aule-attention's top-left causal / window_size as aule-kp arguments -----------------


def _band_args(lq: int, lk: int, causal: bool, window_size: int = -1) -> Dict[str, Any]:
    """``flash_attention`` keyword arguments for aule-attention's band: query ``i`` sees key ``j`` when
    ``j <= i`` (causal) and ``|i - j| <= window_size`` (``window_size > 0``; only ``i - j`` if causal).

    aule-kp's band sits on the diagonal ``j = i + Lk - Lq``; shifting a top-left band onto it can need
    a negative bound, which a window cannot say: then a boolean ``[Lq, Lk]`` mask does.
    """
    if not isinstance(window_size, numbers.Integral) or isinstance(window_size, (bool, np.bool_)):
        raise TypeError(f"window_size must be an int (-1 = full attention), got {window_size!r}")
    inputs.check_causal(causal)
    left = int(window_size) if window_size > 0 else None
    right = 0 if causal else left
    if left is None and right is None:
        return {}
    shift = lk - lq  # aule-kp's diagonal relative to the top-left one
    left_kp = None if left is None else left + shift
    right_kp = None if right is None else right - shift
    if all(b is None or b >= 0 for b in (left_kp, right_kp)):
        return {"window": (-1 if left_kp is None else left_kp, -1 if right_kp is None else right_kp)}
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    seen = np.ones((lq, lk), dtype=bool)
    if left is not None:
        seen &= i - j <= left
    if right is not None:
        seen &= j - i <= right
    return {"attn_mask": seen}


def _check_4d(**arrays: Any) -> None:
    """TypeError/ValueError naming the argument that is not a 4-D array or tensor (checked before the
    band and rotary code read shapes; aule-kp's own checks follow)."""
    for name, x in arrays.items():
        if not (isinstance(x, np.ndarray) or inputs.is_torch(x)):
            raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {tuple(x.shape)}")


# --- rotary embeddings, as aule-attention's Triton kernel applies them -----------------------------


def _rope_table(t: Any, name: str, rows: int, half: int) -> Any:
    """``t`` as ``[rows, half]``: leading axes of size 1 dropped, the first ``rows`` positions kept."""
    is_float = t.is_floating_point() if hasattr(t, "is_floating_point") else np.asarray(t).dtype.kind == "f"
    if not is_float:  # a complex table's imaginary part would be dropped by the float32 cast, silently
        raise TypeError(f"{name} must hold real floating-point values, got {t.dtype}")
    shape = tuple(t.shape)
    if len(shape) < 2 or any(s != 1 for s in shape[:-2]) or shape[-1] != half or shape[-2] < rows:
        raise ValueError(f"{name} must have shape [S, {half}] (leading 1s allowed) with S >= {rows} "
                         f"(head_dim / 2 and the longest sequence), got {shape}")
    return t.reshape(shape[-2], half)[:rows]


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    """``x*cos + rotate_half(x)*sin`` over x's last axis (halves, not interleaved pairs), in x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if isinstance(x, np.ndarray):
        c, s = np.asarray(cos, np.float32), np.asarray(sin, np.float32)
        return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).astype(x.dtype)
    import torch

    c, s = (torch.as_tensor(a, device=x.device, dtype=torch.float32) for a in (cos, sin))
    x1, x2 = x1.float(), x2.float()
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)


def _apply_rope(q: Any, k: Any, rot_cos: Any, rot_sin: Any) -> Tuple[Any, Any]:
    """q and k rotated at positions ``0..Lq-1`` and ``0..Lk-1`` (both tables or neither)."""
    _check_4d(q=q, k=k)
    if rot_cos is None and rot_sin is None:
        return q, k
    if rot_cos is None or rot_sin is None:
        raise ValueError("rot_cos and rot_sin must be given together (rotary embeddings need both)")
    d = q.shape[-1]
    if d % 2 or k.shape[-1] != d:
        raise ValueError(f"rotary embeddings need one even head_dim for q and k, got {d} and {k.shape[-1]}")
    rows = max(q.shape[-2], k.shape[-2])
    cos = _rope_table(rot_cos, "rot_cos", rows, d // 2)
    sin = _rope_table(rot_sin, "rot_sin", rows, d // 2)
    lq, lk = q.shape[-2], k.shape[-2]
    return _rotate(q, cos[:lq], sin[:lq]), _rotate(k, cos[:lk], sin[:lk])


def apply_rope_separate(q: Any, k: Any, cos: Any, sin: Any) -> Tuple[Any, Any]:
    """aule-attention's ``apply_rope_separate``: q and k (``[B, H, L, D]``) rotated by ``cos``/``sin``
    (``[S, D/2]``), as :func:`flash_attention` applies ``rot_cos``/``rot_sin``."""
    return _apply_rope(q, k, cos, sin)


def precompute_rope_frequencies(seq_len: int, head_dim: int, base: float = 10000.0, device: str = "cuda",
                                dtype: Any = None) -> Tuple[Any, Any]:
    """aule-attention's table: ``cos``/``sin`` ``[seq_len, head_dim // 2]`` of ``position * base**(-i/(D/2))``
    (its exponent, ``i / (head_dim // 2)``, kept as it was). torch tensors on ``device``."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, device=device, dtype=dtype) / half))
    angles = torch.arange(seq_len, device=device, dtype=dtype)[:, None] * freqs[None, :]
    return torch.cos(angles), torch.sin(angles)


# --- the functional API ---------------------------------------------------------------------------


def _call(q: Any, k: Any, v: Any, causal: bool, scale: Optional[float], window_size: int, backend: str) -> Any:
    _check_4d(q=q, k=k, v=v)
    try:
        return api.flash_attention(q, k, v, scale=scale, backend=backend,
                                   **_band_args(q.shape[-2], k.shape[-2], causal, window_size))
    except BackendUnavailable as e:
        raise AuleError(str(e)) from e


def flash_attention(query: Any, key: Any, value: Any, rot_cos: Any = None, rot_sin: Any = None,
                    causal: bool = True, scale: Optional[float] = None) -> Any:
    """aule-attention's ``flash_attention`` (causal by default, top-left aligned), on aule-kp.

    Args:
        query: ``[B, Hq, Lq, D]``; key, value: ``[B, Hkv, Lk, D]`` (NumPy or torch, as aule-kp takes).
        rot_cos, rot_sin: rotary tables ``[S, D/2]`` applied to q and k (see the module docstring).
        causal: query ``i`` sees keys ``j <= i``.
        scale: default ``1/sqrt(D)``.

    Returns:
        ``[B, Hq, Lq, D]`` in query's type and dtype.

    Raises:
        AuleError: the backend forced by :func:`install` cannot take the call (its reasons listed).
        ValueError, TypeError: bad inputs, as :func:`aule_kp.flash_attention`.
    """
    backend = _forced_backend or "auto"
    if _verbose:
        print(f"aule-kp: {backend} | shape={tuple(query.shape)} | causal={causal}")
    query, key = _apply_rope(query, key, rot_cos, rot_sin)
    return _call(query, key, value, causal, scale, -1, backend)


attention = flash_attention


def flash_attention_rope(q: Any, k: Any, v: Any, cos: Any, sin: Any, causal: bool = True,
                         scale: Optional[float] = None, window_size: int = -1) -> Any:
    """aule-attention's fused RoPE + attention: :func:`flash_attention` with ``rot_cos=cos, rot_sin=sin``
    and its ``window_size`` (``> 0``: keys within that distance of the query, only behind it if causal)."""
    q, k = _apply_rope(q, k, cos, sin)
    return _call(q, k, v, causal, scale, window_size, _forced_backend or "auto")


def scaled_dot_product_attention(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Any:
    """torch's SDPA (top-left causal), computed by :func:`aule_kp.scaled_dot_product_attention`."""
    from .torch import scaled_dot_product_attention as sdpa

    return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


def install(backend: Optional[str] = None, verbose: bool = False) -> None:
    """aule-attention's ``install``: routes ``torch.nn.functional.scaled_dot_product_attention`` through
    aule-kp (:func:`aule_kp.install`) and forces ``backend`` for :func:`flash_attention` too.

    Args:
        backend: ``None`` (auto) or ``"triton" | "vulkan" | "cpu"``.
        verbose: print the backend and shape of each :func:`flash_attention` call.

    Raises:
        ValueError: another backend name.
    """
    global _forced_backend, _verbose, _installed
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"Invalid backend '{backend}'. Choose from: 'triton', 'vulkan', 'cpu', or None (auto)")
    from . import torch as kp_torch

    kp_torch.install(backend)
    _forced_backend, _verbose = backend, bool(verbose)
    if _installed:
        _say(verbose, f"aule-kp: Updated (backend={backend or 'auto'}, verbose={verbose})")
        return
    _installed = True
    name = backend.capitalize() if backend else f"auto: {get_available_backends()[0].capitalize()}"
    _say(verbose, f"aule-kp: Installed ({name}{', verbose' if verbose else ''})")


def _say(verbose: bool, line: str) -> None:
    """aule-attention printed these lines; here they are printed when the caller asked for output
    (``verbose=True``) and otherwise logged at INFO on logger ``aule_kp``."""
    if verbose:
        print(line)
    else:
        log.info("%s", line)


def uninstall() -> None:
    """aule-attention's ``uninstall``: puts torch's SDPA back (:func:`aule_kp.uninstall`)."""
    global _forced_backend, _verbose, _installed
    if not _installed:
        log.info("aule-kp: Not installed")
        return
    from . import torch as kp_torch

    kp_torch.uninstall()
    _forced_backend, _verbose, _installed = None, False, False
    log.info("aule-kp: Uninstalled, restored PyTorch SDPA")


def get_available_backends() -> List[str]:
    """Backend names usable here, best first (``aule_kp.info()["backends"]``)."""
    return list(dispatch.available_backends())


_DESCRIPTIONS = {"vulkan": "Vulkan compute (aule-kp FlashAttention-2)", "triton": "Triton FlashAttention-2",
                 "cpu": "NumPy/torch CPU backend"}


def get_backend_info() -> Dict[str, Dict[str, Any]]:
    """Per available backend: ``available``, ``device`` (Vulkan: the selected device's name) and
    ``description``, as aule-attention's."""
    data = _kp_info()
    devices = data["devices"]
    chosen = devices[data["selected_device"] or 0]["name"] if devices else "Unknown"
    out: Dict[str, Dict[str, Any]] = {}
    for name in data["backends"]:
        entry: Dict[str, Any] = {"available": True, "description": _DESCRIPTIONS.get(name, name)}
        if name == "vulkan":
            entry["device"] = chosen
        elif name == "triton":
            import torch

            entry["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "N/A"
        out[name] = entry
    return out


def print_backend_info() -> None:
    """Prints :func:`get_backend_info` in aule-attention's layout."""
    print("=" * 60)
    print("AULE-KP v" + __version__ + " (aule-attention compat)")
    print("=" * 60)
    print()
    backends = get_backend_info()
    print(f"Available backends: {list(backends)}")
    print()
    for idx, (name, entry) in enumerate(backends.items(), 1):
        print(f"[{idx}] {name.upper()}")
        if "device" in entry:
            print(f"    GPU: {entry['device']}")
        print(f"    Status: {entry['description']}")
        print()
    print("=" * 60)


# --- the Vulkan object API --------------------------------------------------------------------------


class GpuTensor:
    """aule-attention's GpuTensor: device memory of one shape and dtype (an aule-kp GpuTensor)."""

    def __init__(self, tensor: _KpTensor):
        self._t = tensor

    @property
    def shape(self) -> Tuple[int, ...]:
        return self._t.shape

    @property
    def dtype(self) -> Any:
        return self._t.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self._t.shape))

    def upload(self, data: np.ndarray) -> None:
        """Copies ``data`` in (any shape of the same size; cast to this tensor's dtype)."""
        data = np.asarray(data)
        if data.size != self.size:
            raise ValueError(f"Size mismatch: tensor has {self.size} elements, got {data.size}")
        self._t.upload(np.ascontiguousarray(data, dtype=self._t.dtype).reshape(self.shape))

    def download(self) -> np.ndarray:
        """A host copy of the contents."""
        return self._t.download()

    def destroy(self) -> None:
        """Frees the device memory now; idempotent."""
        self._t.free()


class Aule:
    """aule-attention's Vulkan object (an :class:`aule_kp.Context`); also a context manager.

    Its ``causal`` defaults to False, as aule-attention's ``Aule.attention``/``attention_gpu``.
    """

    def __init__(self, library_path: Optional[str] = None):
        if library_path is not None:
            raise ValueError("library_path names aule-attention's libaule; aule-kp has no such library (pass None)")
        try:
            self._ctx = Context()
        except BackendUnavailable as e:
            raise AuleError(f"Failed to initialize aule: {e}") from e

    @property
    def device_name(self) -> str:
        return self._ctx.device.caps.as_dict()["name"]

    def get_device_info(self) -> Dict[str, Any]:
        """``device_name``, ``vendor``, ``fp16_supported``, ``subgroup_size`` of this Context's device."""
        d = self._ctx.device.caps.as_dict()
        return {"device_name": d["name"], "vendor": d["vendor"], "fp16_supported": d["fp16"],
                "subgroup_size": d["subgroup_size"]}

    def tensor(self, shape: Tuple[int, int, int, int], dtype: Any = np.float32) -> GpuTensor:
        """A zero-filled GpuTensor (float32 by default, as aule-attention's)."""
        if len(shape) != 4:
            raise ValueError("Shape must be (batch, heads, seq, dim)")
        return GpuTensor(self._ctx.tensor(shape, dtype))

    def attention(self, query: np.ndarray, key: np.ndarray, value: np.ndarray, rot_cos: Optional[np.ndarray] = None,
                  rot_sin: Optional[np.ndarray] = None, causal: bool = False, window_size: int = -1) -> np.ndarray:
        """Attention on host arrays (cast to float32, as aule-attention) on this Vulkan device."""
        q, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in (query, key, value))
        q, k = _apply_rope(q, k, rot_cos, rot_sin)
        return _call(q, k, v, causal, None, window_size, "vulkan")

    def attention_gpu(self, Q: GpuTensor, K: GpuTensor, V: GpuTensor, output: GpuTensor,
                      rot_cos: Optional[GpuTensor] = None, rot_sin: Optional[GpuTensor] = None,
                      causal: bool = False, window_size: int = -1) -> None:
        """Attention on GpuTensors into ``output``. Rotary tables are applied through a host round trip
        of q and k; a band that needs a mask (top-left causal with ``Lq < Lk``, or a ``window_size``
        below ``|Lq - Lk|``) raises ValueError."""
        band = _band_args(Q.shape[2], K.shape[2], causal, window_size)
        if "attn_mask" in band:
            raise ValueError(f"this causal/window_size band on Lq={Q.shape[2]} != Lk={K.shape[2]} needs a mask, "
                             "which GpuTensor attention has not: use Aule.attention on host arrays")
        scratch: List[GpuTensor] = []
        if rot_cos is not None or rot_sin is not None:
            tables = (None if t is None else t.download() for t in (rot_cos, rot_sin))
            q, k = _apply_rope(Q.download(), K.download(), *tables)
            Q, K = self.tensor(Q.shape, Q.dtype), self.tensor(K.shape, K.dtype)
            scratch += [Q, K]
            Q.upload(q)
            K.upload(k)
        try:
            self._ctx.attention(Q._t, K._t, V._t, output._t, **band)
        except BackendUnavailable as e:
            raise AuleError(f"GPU attention failed: {e}") from e
        finally:
            for t in scratch:
                t.destroy()

    def close(self) -> None:
        """Frees every tensor of this object; later uses raise ValueError. Idempotent."""
        self._ctx.close()

    def __enter__(self) -> Aule:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
