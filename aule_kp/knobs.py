"""The ``AULE_KP_*`` environment variables ("knobs"): each read here and nowhere else, by one parser
with one error style, into a frozen :class:`Snapshot`.

``current()`` returns the snapshot of the environment as it is now: it compares the raw values of
the knobs with those the last snapshot was made from (a few dictionary lookups) and parses again only
when one changed, so a test that sets a variable sees it at the next call. Memo keys hold the
snapshot object itself (equal snapshots: equal raw values and overrides), never a list of variables.

A knob whose value does not parse raises ``ValueError("AULE_KP_SPLIT_KV must be ..., got 'x'")`` when it
is read (``snapshot.split_kv``), not when the snapshot is made: a bad knob fails what uses it, not the rest.
Engineering knobs (forced variant, split count, coopmat conversion) are also keyword arguments of the
internal entry points (``VulkanBackend(variant=..., num_splits=..., coopmat_convert=...)``), which
apply them with :meth:`Snapshot.override`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

#: The opt-in that lets fp32/bf16 data run the fp16 cooperative-matrix kernels (rounded on load).
COOPMAT_CONVERT_ENV = "AULE_KP_COOPMAT_CONVERT"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _flag(raw: str) -> bool:
    low = raw.lower()
    if low in _TRUE or low in _FALSE:
        return low in _TRUE
    raise ValueError("0 or 1")


def _integer(minimum: int, what: str) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise ValueError(what)
        return value
    return parse


def _families(raw: str) -> frozenset:
    return frozenset(x.strip() for x in raw.split(",") if x.strip())


@dataclass(frozen=True)
class Knob:
    """One environment variable: its field in the snapshot, parser, default (unset or empty) and meaning."""

    name: str
    attr: str
    parse: Callable[[str], Any]
    default: Any
    meaning: str


KNOBS: Tuple[Knob, ...] = (
    Knob("AULE_KP_DEVICE", "device", _integer(-(1 << 62), "a device index (an integer)"), 0,
         "index of the Vulkan device to use (default 0)"),
    Knob("AULE_KP_CACHE_DIR", "cache_dir", str, None,
         "folder of the tuning cache and self-check verdicts (default: the user cache dir)"),
    Knob("AULE_KP_NO_TUNING_CACHE", "no_tuning_cache", _flag, False,
         "1: ignore the tuning cache (`aule-kp tune` winners); the default tiles run"),
    Knob("AULE_KP_SELF_CHECK", "self_check", _flag, True,
         "0: do not run a kernel family's self-check on first use (recorded verdicts still apply)"),
    Knob("AULE_KP_WORKAROUNDS", "workarounds", _flag, True,
         "0: ignore the driver-trap table (aule_kp/vulkan/workarounds.py)"),
    Knob(COOPMAT_CONVERT_ENV, "coopmat_convert", _flag, False,
         "1: fp32/bf16 data may run the fp16 cooperative-matrix kernels (rounded to fp16 on load)"),
    Knob("AULE_KP_FORCE_VARIANT", "force_variant", str, None,
         "pin the forward kernel variant (scalar, wave64, coopmat, coopmat2; int8dot, int8coopmat); tests"),
    Knob("AULE_KP_FORCE_BWD_VARIANT", "force_bwd_variant", str, None,
         "pin the backward kernel variant (scalar, coopmat); tests and benchmarks"),
    Knob("AULE_KP_SPLIT_KV", "split_kv", _integer(0, "0 (never split) or a number of splits"), None,
         "split-KV decoding: 0 never splits, N forces N splits for Lq <= 16 (default automatic)"),
    Knob("AULE_KP_MAX_BINDING_BYTES", "max_binding_bytes", _integer(1, "a positive number of bytes"), None,
         "lowers the largest buffer one binding may cover (tests of the chunked paths)"),
    Knob("AULE_KP_PIPELINE_CHUNKS", "pipeline_chunks", _integer(1, "a positive number of chunks"), None,
         "forces the chunks a host call is pipelined over (1: never; default automatic)"),
    Knob("AULE_KP_SECTION_BYTES", "section_bytes", _integer(1, "a positive number of bytes"), None,
         "K/V bytes the query heads of one scheduling section read (default 16 MiB)"),
    Knob("AULE_KP_PLAN_CACHE_MB", "plan_cache_mb", _integer(0, "a number of MiB"), 1024,
         "device memory the cached plans may hold, in MiB (default 1024)"),
    Knob("AULE_KP_COPY_THREADS", "copy_threads", _integer(1, "a positive integer"), None,
         "threads a large host copy is split over (default: every core, at most 16)"),
    Knob("AULE_KP_DIRECT_IO", "direct_io", _flag, True,
         "0: host calls go through staging buffers, not device-local host-visible memory"),
    Knob("AULE_KP_HOST_TENSORS", "host_tensors", _flag, False,
         "1: GpuTensors live in host memory on discrete GPUs too"),
    Knob("AULE_KP_SPIRV_CACHE", "spirv_cache", str, None,
         "folder of the compiled SPIR-V (default: spirv_cache/ in the source tree); read once, at import"),
    Knob("AULE_KP_GLSLANG", "glslang", str, None,
         "a glslang >= 15.2 to rebuild glsl/prebuilt/ with (scripts/glslang15.sh; default: `glslang` on PATH)"),
    Knob("AULE_KP_TEST_CORRUPT", "test_corrupt", _families, frozenset(),
         "TEST ONLY: comma list of kernel families whose outputs are made wrong (self-check tests)"),
)
_INDEX = {k.attr: i for i, k in enumerate(KNOBS)}
_BY_NAME = {k.name: k for k in KNOBS}


class _Bad:
    """A value that did not parse: reading it raises ``error``."""

    def __init__(self, error: str):
        self.error = error


@dataclass(frozen=True)
class Snapshot:
    """The knobs' values: ``snapshot.<attr>`` (see ``KNOBS``). ``source``: the raw values, in
    ``KNOBS`` order, it was parsed from; ``overrides``: values set by keyword arguments."""

    source: Tuple[Optional[str], ...]
    overrides: Tuple[Tuple[str, Any], ...] = ()
    values: Tuple[Any, ...] = field(default=(), compare=False, repr=False)

    def __getattr__(self, attr: str) -> Any:
        i = _INDEX.get(attr)
        if i is None or not self.values:
            raise AttributeError(attr)
        value = self.values[i]
        if isinstance(value, _Bad):
            raise ValueError(value.error)
        return value

    def raw(self, attr: str) -> Optional[str]:
        """The environment's text of knob ``attr`` (None: unset)."""
        return self.source[_INDEX[attr]]

    def override(self, **values: Any) -> Snapshot:
        """This snapshot with the given knobs set (None: left as they are); the result compares by them."""
        given = {a: v for a, v in values.items() if v is not None}
        if not given:
            return self
        unknown = set(given) - set(_INDEX)
        if unknown:
            raise TypeError(f"unknown knobs {sorted(unknown)}; expected some of {sorted(_INDEX)}")
        merged = list(self.values)
        for a, v in given.items():
            merged[_INDEX[a]] = v
        return Snapshot(self.source, tuple(sorted({**dict(self.overrides), **given}.items())), tuple(merged))

    def describe(self) -> Dict[str, Dict[str, Any]]:
        """Every knob by name: its raw ``value`` (None: unset, the default applies), ``default``, ``meaning``."""
        return {k.name: {"value": self.source[i],
                         "default": sorted(k.default) if isinstance(k.default, frozenset) else k.default,
                         "meaning": k.meaning}
                for i, k in enumerate(KNOBS)}


def _parse(source: Tuple[Optional[str], ...]) -> Snapshot:
    values = []
    for knob, raw in zip(KNOBS, source):
        text = (raw or "").strip()
        if not text:
            values.append(knob.default)
            continue
        try:
            values.append(knob.parse(text))
        except ValueError as exc:
            values.append(_Bad(f"{knob.name} must be {exc}, got {raw!r}"))
    return Snapshot(source, (), tuple(values))


_NAMES = tuple(k.name for k in KNOBS)
# os.environ keeps the encoded variables in ``_data``: looking the knobs up there directly costs a
# tenth of ``os.environ.get`` (which encodes the key and decodes the value), and current() runs on
# every call of the hot paths.
_DATA = getattr(os.environ, "_data", None)
_KEYS = tuple(map(os.environ.encodekey, _NAMES)) if _DATA is not None and hasattr(os.environ, "encodekey") else None


def _fingerprint() -> Tuple[Any, ...]:
    """The raw values of the knobs, as cheaply as the platform allows (compared, never parsed)."""
    if _KEYS is not None:
        return tuple(map(_DATA.get, _KEYS))  # type: ignore[union-attr]
    return tuple(map(os.environ.get, _NAMES))


def reload() -> Snapshot:
    """Parses the environment again, whether or not it changed."""
    global _snapshot, _seen
    _seen = _fingerprint()
    _snapshot = _parse(tuple(map(os.environ.get, _NAMES)))
    return _snapshot


_seen: Tuple[Any, ...] = ()
_snapshot: Snapshot = reload()


def current() -> Snapshot:
    """The knobs as the environment sets them now (parsed again only when a raw value changed)."""
    return _snapshot if _fingerprint() == _seen else reload()


def knob(name: str) -> Knob:
    """The knob of environment variable ``name`` (KeyError for one that is not a knob)."""
    return _BY_NAME[name]
