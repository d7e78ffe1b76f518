"""scripts/kp_build.py, the one build of the patched kp (setup.py, make install, gpu_run.sh): the patch
applies in Python, the packaging edits apply once each, and a machine that lacks something gets one
message naming what to install on its platform. The compile itself runs in `make install`/`make wheel`
(tests/test_wheel.py checks its product)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kp_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kp_build", ROOT / "scripts" / "kp_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def kp_source(kp_build: ModuleType, tmp_path: Path) -> Path:
    with tarfile.open(kp_build.KP_SDIST) as tar:
        tar.extractall(tmp_path)
    return tmp_path / f"kp-{kp_build.KP_VERSION}"


def test_patch_and_edits_apply(kp_build: ModuleType, kp_source: Path) -> None:
    before = (kp_source / "src" / "Sequence.cpp").read_text()
    kp_build.apply_patch(kp_build.PATCH.read_text(), kp_source)
    kp_build.edit_sources(kp_source, "0123456789abcdef")
    binding = (kp_source / "python" / "src" / "main.cpp").read_text()
    assert "PYBIND11_MODULE(_kp, m)" in binding and '"set_workgroup"' in binding
    assert 'm.attr("aule_patch_id") = "0123456789abcdef";' in binding
    assert (kp_source / "src" / "Sequence.cpp").read_text() != before
    cmake = (kp_source / "CMakeLists.txt").read_text()
    assert "PythonLibs" not in cmake
    assert r'"PYBIND11_INTERNALS_KIND=\"_aule_kp\""' in cmake  # every translation unit: kompute's too


def test_patch_hunks_match_shifted_or_fail_by_name(kp_build: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("a\nb\nc\nd\ne\n")
    shifted = "--- a/f.txt\n+++ b/f.txt\n@@ -1,2 +1,3 @@\n c\n+x\n d\n"  # says line 1, matches at line 3
    kp_build.apply_patch(shifted, tmp_path)
    assert (tmp_path / "f.txt").read_text() == "a\nb\nc\nx\nd\ne\n"
    with pytest.raises(RuntimeError, match=r"line 1 of f\.txt does not apply"):
        kp_build.apply_patch("--- a/f.txt\n+++ b/f.txt\n@@ -1,1 +1,1 @@\n-zzz\n+y\n", tmp_path)


def test_a_changed_kp_source_is_refused(kp_build: ModuleType, kp_source: Path) -> None:
    with pytest.raises(RuntimeError, match="changed shape"):  # the unpatched binding has no aule_patch
        kp_build.edit_sources(kp_source, "0123456789abcdef")


@pytest.mark.parametrize(("platform", "expected"), [
    ("linux", ["sudo apt-get install -y cmake libvulkan-dev libfmt-dev"]),
    ("darwin", ["brew install cmake", "brew install vulkan-headers vulkan-loader molten-vk", "brew install fmt"]),
    ("win32", ["LunarG Vulkan SDK", "vcpkg install fmt:x64-windows", "CMake"]),
])
def test_one_message_names_what_to_install(kp_build: ModuleType, platform: str, expected: list) -> None:
    message = kp_build.missing_message(["cmake", "vulkan", "fmt"], "pybind11 2.10.3 is installed", platform)
    assert "lacks: cmake, the Vulkan headers and loader, fmt, pybind11." in message
    assert all(part in message for part in expected), message
    assert 'pip install "pybind11>=2.12,<3"' in message and "prebuilt aule-kp wheel" in message


@pytest.mark.parametrize("pybind11", [None, "pybind11 is not installed"])
def test_build_stops_with_that_message(kp_build: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       pybind11: str) -> None:
    monkeypatch.setattr(kp_build, "CACHE", tmp_path)  # no cached build to fall back on
    monkeypatch.setattr(kp_build, "missing", lambda: ["compiler", "vulkan"])
    monkeypatch.setattr(kp_build, "pybind11_problem", lambda: pybind11)
    if pybind11 is None:
        pytest.importorskip("pybind11")
    with pytest.raises(SystemExit) as stop:
        kp_build.build()
    assert "lacks: a C++17 compiler, the Vulkan headers and loader" in str(stop.value.code)
    assert ("pybind11" in str(stop.value.code)) == (pybind11 is not None)


def test_vulkan_sdk_is_searched_first(kp_build: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "Include" / "vulkan").mkdir(parents=True)  # the Windows SDK's spelling
    (tmp_path / "Include" / "vulkan" / "vulkan.h").write_text("")
    monkeypatch.setenv("VULKAN_SDK", str(tmp_path))
    assert kp_build.prefix_with("vulkan/vulkan.h") == tmp_path


def test_debian_packages_for_setup_sh() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "kp_build.py"), "--debian-packages"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["cmake", "g++", "libvulkan-dev", "libfmt-dev", "python3-dev"]
