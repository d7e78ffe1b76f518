"""The tuning cache: the per-device file of tile winners ``aule-kp tune`` (aule_kp/tune.py) stores
and the kernel choice (choice.py) reads.

The cache is one JSON file per device and driver version, in the user cache dir
(``AULE_KP_CACHE_DIR``, else ``$XDG_CACHE_HOME/aule_kp`` or ``~/.cache/aule_kp``; on Windows
``%LOCALAPPDATA%\\aule_kp``), named ``tuning-<device uuid>-<driver version>.json``::

    {"format": 1,
     "device": {"name": ..., "uuid": ..., "driver_version": ..., "driver_name": ..., "driver_info": ...},
     "entries": {"fwd.scalar/dk64-dv64/float32/causal/Lq512-Lk512":
                     {"br": 128, "bc": 8, "wg": 64, "tpr": 2, "rpt": 4, "stage": 0,
                      "ms": 1.9, "default_ms": 2.3, "case": "B1 H8 ...", "date": "..."}}}

Keys: kernel family (``fwd.<variant>``, ``bwd.<variant>``), head dims, dtype, causal or not, and the
power-of-two buckets of the query and key lengths (decode and prefill at one key length want other
tiles). Each entry records the build it was timed on (``"build"``: aule-kp's version and a digest of
the family's SPIR-V, as the self-check's verdicts do); a lookup ignores, with one warning, entries of
another build (an upgrade changes the kernels, and their best tiles with them). A lookup takes the
exact bucket, else the nearest tuned one within a factor of two in each
length (``AULE_KP_NO_TUNING_CACHE=1`` turns lookups off). The file is read once per process and
again after ``save`` or ``clear`` write it; each write bumps :func:`generation`, which memoised
choices hold in their keys. A corrupt, unreadable or foreign file is ignored with one warning;
writes go to a temporary file and ``os.replace``. The self-check's verdicts (selfcheck.py) live
beside it in a file of the same shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

from .. import knobs
from ..problem import Problem
from .build import build_id
from .probe import DeviceCaps

log = logging.getLogger("aule_kp")

FORMAT = 1
#: The spec constants a winner sets (the others come from the problem).
TILE_FIELDS = ("br", "bc", "wg", "tpr", "rpt", "stage")

_memo: Dict[str, Dict[str, Any]] = {}
_paths: Dict[Tuple[Any, ...], Path] = {}
_warned: set = set()
_lock = threading.Lock()
_bypass: contextvars.ContextVar[bool] = contextvars.ContextVar("aule_kp_tuning_bypass", default=False)
_generation = [0]


def generation() -> int:
    """A number that changes whenever a cache or verdicts file is written or removed in this process."""
    return _generation[0]


def changed() -> None:
    """Marks the files as changed (memoised choices made before no longer match)."""
    _generation[0] += 1


def cache_dir(override: Optional[str] = None) -> Path:
    """The folder of the tuning cache: ``override``, ``AULE_KP_CACHE_DIR``, else the user cache dir."""
    if override:
        return Path(override).expanduser()
    configured = knobs.current().cache_dir
    if configured:
        return Path(configured).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "aule_kp"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aule_kp"


def location_key() -> Tuple[Any, ...]:
    """What ``cache_dir()`` depends on, for memo keys (resolving the path costs more than a lookup)."""
    return knobs.current().raw("cache_dir"), os.environ.get("XDG_CACHE_HOME")


def device_key(caps: DeviceCaps) -> str:
    """``<uuid>-<driver version>``: a new driver (or another device) starts an empty cache. Devices
    that report no UUID (Vulkan 1.0) use their vendor and device ids and name instead."""
    ident = caps.uuid or re.sub(r"[^A-Za-z0-9]+", "_", f"{caps.vendor_id:x}-{caps.device_id:x}-{caps.name}")
    return f"{ident}-{caps.driver_version}"


def cache_path(caps: DeviceCaps, directory: Optional[str] = None) -> Path:
    """The tuning file of this device and driver."""
    return cache_dir(directory) / f"tuning-{device_key(caps)}.json"


def warn_once(tag: str, msg: str, *args: Any) -> None:
    """Logs ``msg`` the first time ``tag`` is seen (tags end with the file's path)."""
    if tag not in _warned:
        _warned.add(tag)
        log.warning(msg, *args)


def read_cache_file(path: Path, caps: DeviceCaps, section: str = "entries", what: str = "tuning cache",
                    fmt: int = FORMAT) -> Dict[str, Any]:
    """The ``section`` of the per-device JSON file ``path`` ({} when it is missing; one warning and {}
    when it cannot be used: unreadable, not JSON, another format, another device or driver). Shared
    by the tuning cache and the self-check's verdicts (selfcheck.py), which live side by side."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        warn_once(f"read:{path}", "aule-kp: ignoring the %s %s: cannot read it (%s)", what, path, exc)
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        warn_once(f"read:{path}", "aule-kp: ignoring the %s %s: not valid JSON (%s)", what, path, exc)
        return {}
    if not isinstance(data, dict) or data.get("format") != fmt or not isinstance(data.get(section), dict):
        version = data.get("format") if isinstance(data, dict) else None
        warn_once(f"read:{path}", "aule-kp: ignoring the %s %s: format %r, expected %d", what, path, version, fmt)
        return {}
    dev = data.get("device") if isinstance(data.get("device"), dict) else {}
    if (dev.get("uuid"), dev.get("driver_version")) != (caps.uuid, caps.driver_version):
        warn_once(f"read:{path}", "aule-kp: ignoring the %s %s: it was written for device %s, driver %s",
                  what, path, dev.get("uuid"), dev.get("driver_version"))
        return {}
    return data[section]


def write_cache_file(path: Path, caps: DeviceCaps, section: str, entries: Dict[str, Any],
                     fmt: int = FORMAT) -> None:
    """Writes ``entries`` as the ``section`` of ``path`` for this device and driver, atomically
    (temporary file + ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": fmt,
            "device": {"name": caps.name, "uuid": caps.uuid, "driver_version": caps.driver_version,
                       "driver_name": caps.driver_name, "driver_info": caps.driver_info},
            section: dict(sorted(entries.items()))}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load(caps: DeviceCaps, directory: Optional[str] = None) -> Dict[str, Any]:
    """This device's cached winners by key (read once per process and path; do not modify)."""
    where = (directory, *location_key(), caps.uuid, caps.driver_version)
    path = _paths.get(where)
    if path is None:
        path = _paths[where] = cache_path(caps, directory)
    key = str(path)
    with _lock:
        if key not in _memo:
            _memo[key] = read_cache_file(path, caps)
        return _memo[key]


def invalidate(path: Path) -> None:
    """Forgets what was read from ``path`` and its warnings, and bumps :func:`generation`."""
    with _lock:
        _memo.pop(str(path), None)
        _warned.difference_update({t for t in _warned if t.endswith(str(path))})
    changed()


def build_of(key: str) -> str:
    """The build (:func:`aule_kp.vulkan.build.build_id`) that entries of ``key``'s kernel family run now."""
    return build_id(key.split("/", 1)[0])


def save(caps: DeviceCaps, entries: Dict[str, Dict[str, Any]], directory: Optional[str] = None) -> Path:
    """Merges ``entries``, timed on this build, into this device's file (atomically: temporary file +
    ``os.replace``)."""
    path = cache_path(caps, directory)
    merged = dict(read_cache_file(path, caps))
    merged.update({key: {**entry, "build": build_of(key)} for key, entry in entries.items()})
    write_cache_file(path, caps, "entries", merged)
    invalidate(path)
    return path


def clear(caps: DeviceCaps, directory: Optional[str] = None) -> bool:
    """Deletes this device's tuning file; True when there was one."""
    path = cache_path(caps, directory)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    finally:
        invalidate(path)
    return True


def length_bucket(n: int) -> int:
    """The power of two at or above ``n`` (1 for 0 and 1)."""
    return 1 << (max(1, n) - 1).bit_length()


def _key(kernel: str, problem: Problem, lq: int, lk: int) -> str:
    causal = "causal" if problem.right == 0 else "full"
    return f"{kernel}/dk{problem.dim_k}-dv{problem.dim_v}/{problem.dtype}/{causal}/Lq{lq}-Lk{lk}"


def problem_key(kernel: str, problem: Problem) -> str:
    """The cache key of ``problem`` for ``kernel`` (``fwd.<variant>`` or ``bwd.<variant>``)."""
    return _key(kernel, problem, length_bucket(problem.len_q), length_bucket(problem.len_k))


def lookup(caps: DeviceCaps, kernel: str, problem: Problem,
           snapshot: Optional[knobs.Snapshot] = None) -> Optional[Tuple[str, Dict[str, int]]]:
    """``(key, tiles)`` of the cached winner for ``problem``: its own length buckets, else the nearest
    tuned ones within a factor of two; None when there is none (or ``AULE_KP_NO_TUNING_CACHE=1``, or
    inside :func:`defaults_only`)."""
    if (snapshot or knobs.current()).no_tuning_cache or _bypass.get():
        return None
    entries = load(caps)
    if not entries:
        return None
    bq, bk = length_bucket(problem.len_q), length_bucket(problem.len_k)
    steps = sorted(((i, j) for i in (0, 1, -1) for j in (0, 1, -1)), key=lambda s: abs(s[0]) + abs(s[1]))
    for i, j in steps:
        key = _key(kernel, problem, bq << i if i >= 0 else bq >> 1, bk << j if j >= 0 else bk >> 1)
        entry = entries.get(key)
        if entry is None:
            continue
        if isinstance(entry, dict) and entry.get("build") != build_of(key):
            warn_once(f"build:{key}:{cache_path(caps)}", "aule-kp: ignoring the tuning cache entry %s: timed on "
                      "another aule-kp build (run `aule-kp tune` again)", key)
            continue
        try:
            return key, {f: int(entry[f]) for f in TILE_FIELDS}
        except (KeyError, TypeError, ValueError):
            warn_once(f"entry:{key}:{cache_path(caps)}", "aule-kp: ignoring the tuning cache entry %s: %r", key,
                      entry)
            return None
    return None


@contextlib.contextmanager
def defaults_only() -> Iterator[None]:
    """Within this block the choice ignores the cache (this context only)."""
    token = _bypass.set(True)
    try:
        yield
    finally:
        _bypass.reset(token)


def bypassed() -> bool:
    """Whether this context is inside :func:`defaults_only` (memoised choices key on it)."""
    return _bypass.get()
