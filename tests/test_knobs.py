"""The knobs (aule_kp/knobs.py): every ``AULE_KP_*`` variable parsed in one place, one error style,
a snapshot re-read when the environment changes, keyword overrides, and the lists users read
(``aule_kp.info()["knobs"]``, the README table) complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aule_kp import knobs

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in knobs.KNOBS:
        monkeypatch.delenv(k.name, raising=False)
    snap = knobs.current()
    assert snap.split_kv is None and snap.self_check is True and snap.plan_cache_mb == 1024
    assert snap.test_corrupt == frozenset() and snap.device == 0
    monkeypatch.setenv("AULE_KP_SPLIT_KV", "4")
    monkeypatch.setenv("AULE_KP_SELF_CHECK", "off")
    monkeypatch.setenv("AULE_KP_TEST_CORRUPT", "splitkv, fwd.scalar")
    snap2 = knobs.current()
    assert snap2 is not snap and snap2 != snap
    assert snap2.split_kv == 4 and snap2.self_check is False
    assert snap2.test_corrupt == {"splitkv", "fwd.scalar"}
    assert knobs.current() is snap2  # nothing changed: the same snapshot, no parse


@pytest.mark.parametrize("name, raw, expected", [
    ("AULE_KP_SPLIT_KV", "lots", "0 (never split) or a number of splits"),
    ("AULE_KP_SPLIT_KV", "-1", "0 (never split) or a number of splits"),
    ("AULE_KP_PIPELINE_CHUNKS", "0", "a positive number of chunks"),
    ("AULE_KP_COPY_THREADS", "many", "a positive integer"),
    ("AULE_KP_DIRECT_IO", "maybe", "0 or 1"),
    ("AULE_KP_DEVICE", "gpu0", "a device index (an integer)"),
])
def test_bad_values_raise_when_read(monkeypatch: pytest.MonkeyPatch, name: str, raw: str, expected: str) -> None:
    monkeypatch.setenv(name, raw)
    snap = knobs.current()  # making the snapshot does not fail: only reading the bad knob does
    assert snap.plan_cache_mb >= 0
    with pytest.raises(ValueError, match=re.escape(f"{name} must be {expected}, got {raw!r}")):
        getattr(snap, knobs.knob(name).attr)


def test_override_and_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AULE_KP_FORCE_VARIANT", raising=False)
    snap = knobs.current()
    pinned = snap.override(force_variant="scalar", split_kv=None)
    assert pinned.force_variant == "scalar" and pinned != snap and snap.force_variant is None
    again = snap.override(force_variant="scalar")
    assert pinned == again and hash(pinned) == hash(again)
    assert snap.override() is snap
    with pytest.raises(TypeError, match="unknown knobs"):
        snap.override(num_splitz=3)
    fresh = knobs.reload()
    assert fresh == snap and fresh is not snap


def test_the_backend_memo_follows_the_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Changing a knob between calls changes the memoised choice (the memo keys on the snapshot)."""
    from aule_kp.problem import Problem
    from aule_kp.vulkan import device as devmod
    from aule_kp.vulkan.backend import VulkanBackend
    from aule_kp.vulkan.configs import KernelConfig, SplitKVConfig

    if devmod.vulkan_unavailable():
        pytest.skip("no Vulkan device")
    p = Problem(1, 4, 1, 1, 600, 64, 64, "float32", 0.125, 599, 599, 0)
    backend = VulkanBackend()
    monkeypatch.setenv("AULE_KP_SPLIT_KV", "0")
    assert isinstance(backend.config(p), KernelConfig)
    monkeypatch.setenv("AULE_KP_SPLIT_KV", "3")
    assert isinstance(backend.config(p), SplitKVConfig) and backend.config(p).n_split == 3
    assert isinstance(VulkanBackend(num_splits=0).config(p), KernelConfig)  # the keyword wins


def test_every_knob_is_listed() -> None:
    """Every AULE_KP_* name the package mentions is a knob, only knobs.py reads the environment for
    them, and info() and the README list them all."""
    mentioned = set()
    for path in (REPO / "aule_kp").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        mentioned |= set(re.findall(r"AULE_KP_[A-Z0-9_]*[A-Z0-9]", text))
        if path.name != "knobs.py":
            assert not re.search(r"(environ|getenv)[^\n]*AULE_KP_", text), path
    names = {k.name for k in knobs.KNOBS}
    assert mentioned <= names, mentioned - names
    from aule_kp.info import info

    assert set(info()["knobs"]) == names
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert all(f"| `{n}` |" in readme for n in names)
