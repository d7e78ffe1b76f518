"""install() / uninstall() / enabled(): put the engine behind ``torch.nn.functional.scaled_dot_product_attention``.

The patch is one attribute of ``torch.nn.functional``, so it is process-wide. Two layers decide it
under one lock: ``install()``'s (until ``uninstall()``) and the stack of active ``enabled()``
blocks, the innermost (latest) of which chooses the backend. The patch is on while either layer
is; when both are empty the function that was there before is put back (the same object).

Code that bound the function before the patch (``from torch.nn.functional import
scaled_dot_product_attention``) keeps calling torch's; ``F.scaled_dot_product_attention(...)``,
``nn.MultiheadAttention`` and ``torch.compile``-d modules that call it see the patch.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, Optional, Tuple

import torch

from ..backend import check_backend_name
from ..quant import check_precision
from .sdpa import log, scaled_dot_product_attention, state

#: What a layer configures: (backend, precision).
_Setting = Tuple[Optional[str], str]
_lock = threading.RLock()
_installed: List[_Setting] = []  # install()'s setting, when installed (a list of at most one)
_blocks: List[Tuple[object, _Setting]] = []  # active enabled() blocks: (token, setting), oldest first


def _apply() -> None:
    """Makes the patch and the configured backend agree with the two layers (lock held)."""
    functional = torch.nn.functional
    current = functional.scaled_dot_product_attention
    if _blocks or _installed:
        state.backend, state.precision = _blocks[-1][1] if _blocks else _installed[0]
        if current is not scaled_dot_product_attention:
            state.original = current  # what calls fall back to, and what uninstalling puts back
            functional.scaled_dot_product_attention = scaled_dot_product_attention
        return
    state.backend, state.precision = None, "fp"
    if current is scaled_dot_product_attention:
        functional.scaled_dot_product_attention = state.original
    else:
        # Someone patched over us: restoring torch's would drop their patch, keeping ours cannot happen.
        log.warning("aule_kp: torch.nn.functional.scaled_dot_product_attention was replaced after aule_kp "
                    "installed itself; leaving the replacement in place")


def install(backend: Optional[str] = None, precision: Optional[str] = None) -> None:
    """Routes ``torch.nn.functional.scaled_dot_product_attention`` through aule-kp until :func:`uninstall`.

    Args:
        backend: ``None`` (by device: CPU tensors ``"auto"``, CUDA/ROCm ``"triton"``, others
            ``"vulkan"``) or one of ``"auto" | "vulkan" | "triton" | "cpu"`` for every device.
            Installing again only changes the backend and precision.
        precision: ``"fp"`` (default, also None) or ``"int8"``: SageAttention-style INT8 Q·Kᵀ for
            the calls the engine takes (see :func:`aule_kp.flash_attention`), the SDPA drop-in's and
            the ``aule_kp.nn`` layers' (on aule-kp backends); calls that need gradients run ``"fp"``
            (warned once), int8 being forward-only.

    Raises:
        ValueError: an unknown backend name or precision.
    """
    check_backend_name(backend, allow_none=True)
    setting = (backend, check_precision(precision))
    with _lock:
        _installed[:] = [setting]
        _apply()


def uninstall() -> None:
    """Undoes :func:`install` (a no-op when not installed). Active :func:`enabled` blocks keep the
    patch until they exit; with none, the original function object is back in place."""
    with _lock:
        if _installed:
            _installed.clear()
            _apply()


@contextlib.contextmanager
def enabled(backend: Optional[str] = None, precision: Optional[str] = None) -> Iterator[None]:
    """Context manager: the patch is on (with ``backend`` and ``precision``, as :func:`install`'s)
    inside the block.

    Blocks nest and may overlap across threads: on exit a block removes only itself, and the
    patch stays while :func:`install` or another block holds it. A thread's calls follow its own
    innermost block; a thread without one follows :func:`install`'s setting or the latest block
    of any thread.
    """
    check_backend_name(backend, allow_none=True)
    setting = (backend, check_precision(precision))
    token = object()
    outer = getattr(state.local, "setting", None)
    with _lock:
        _blocks.append((token, setting))
        _apply()
    state.local.setting = setting
    try:
        yield
    finally:
        state.local.setting = outer
        with _lock:
            _blocks[:] = [b for b in _blocks if b[0] is not token]
            _apply()
