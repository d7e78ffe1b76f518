"""Exceptions and warnings of the public API."""

from __future__ import annotations

import os
import sys
import threading
import warnings
from typing import Set


class BackendUnavailable(RuntimeError):
    """A forced backend cannot take the problem; ``reasons`` lists every reason."""

    def __init__(self, backend: str, reasons: list[str]):
        self.backend = backend
        self.reasons = list(reasons)
        super().__init__(f"backend {backend!r} cannot run this problem: " + "; ".join(self.reasons))


class AuleFallbackWarning(RuntimeWarning):
    """Work went to another device or a slower class of backend than the call would otherwise get
    (no Vulkan device under ``backend="auto"``, gradients computed on the CPU, ...). Emitted once
    per kind of fallback and process; ``warnings.simplefilter("error", AuleFallbackWarning)``
    turns fallbacks into errors."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_warned: Set[str] = set()
_warned_lock = threading.Lock()


def warn_once(key: str, message: str) -> None:
    """``warnings.warn(message, AuleFallbackWarning)`` the first time ``key`` is seen in this process,
    attributed to the first caller outside the package. A warning that an "error" filter turned into an
    exception does not count as shown: the next fallback of that kind raises too."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    # Point at the user's line, not ours (``skip_file_prefixes`` does this from Python 3.12 on).
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    try:
        warnings.warn(message, AuleFallbackWarning, stacklevel=level)
    except BaseException:
        with _warned_lock:
            _warned.discard(key)
        raise
