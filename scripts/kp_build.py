"""The one build of aule-kp's patched kp: kp 0.9.0 from the vendored sdist (third_party/, so nothing is
downloaded) with patches/kp-0.9.0-aule.patch, as the private extension module ``aule_kp._kp``.

The pybind11 module is renamed ``_kp`` and given its own pybind11 internals, so a user's own ``kp``
(patched or not) never clashes with it. Each build is cached under build/kp-private/<hash of its
inputs>/, so the wheel, ``pip install`` of a checkout and ``make install`` share one compile.

Every route goes through here: setup.py (wheels, cibuildwheel, ``pip install`` of a checkout or sdist,
editable installs), scripts/setup.sh (``make install``) and scripts/gpu_run.sh (a lent GPU machine):

    python scripts/kp_build.py --into aule_kp     # build (or reuse) and copy _kp<EXT_SUFFIX> there
    python scripts/kp_build.py --debian-packages  # the Debian/Ubuntu packages the build needs

What the build needs from the system (cmake, a C++17 compiler, the Vulkan headers and loader, fmt, the
Python headers) is checked first; anything missing stops it with one message saying what to install
on this platform. Only the standard library is imported at module level: setup.sh runs this with the
system Python before any venv exists.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Iterable, List, NamedTuple, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
KP_VERSION = "0.9.0"
KP_SDIST = ROOT / "third_party" / f"kp-{KP_VERSION}.tar.gz"
PATCH = ROOT / "patches" / f"kp-{KP_VERSION}-aule.patch"
CACHE = ROOT / "build" / "kp-private"
MODULE = "_kp"
# 2.12: numpy 2 (older bindings hand numpy 2 arrays of stride 0). Before 3: PYBIND11_INTERNALS_KIND, which 3.x dropped.
PYBIND11 = "pybind11>=2.12,<3"
KOMPUTE_OPTIONS = {
    "KOMPUTE_OPT_BUILD_PYTHON": "ON", "KOMPUTE_OPT_LOG_LEVEL": "Off", "KOMPUTE_OPT_USE_SPDLOG": "OFF",
    "KOMPUTE_OPT_DISABLE_VULKAN_VERSION_CHECK": "ON", "KOMPUTE_OPT_USE_BUILT_IN_VULKAN_HEADER": "OFF",
    "KOMPUTE_OPT_USE_BUILT_IN_FMT": "OFF", "KOMPUTE_OPT_USE_BUILT_IN_PYBIND11": "OFF", "KOMPUTE_OPT_INSTALL": "OFF",
}
# For every translation unit (kompute's own include pybind11 too: one value, or the inline get_internals()
# differs between them): the binding's own pybind11 internals, so no "type already registered" against
# another kp; and the version kp reports.
DEFINITIONS = f'"PYBIND11_INTERNALS_KIND=\\"_aule_kp\\"" "VERSION_INFO=\\"{KP_VERSION}\\""'


class Need(NamedTuple):
    """One thing the build needs from the system, and how each platform gets it."""

    what: str
    debian: str
    macos: str
    windows: str


NEEDS = {
    "cmake": Need("cmake", "cmake", "brew install cmake", "CMake (cmake.org, or `pip install cmake`)"),
    "compiler": Need("a C++17 compiler", "g++", "xcode-select --install",
                     "Visual Studio Build Tools, workload 'Desktop development with C++'"),
    "vulkan": Need("the Vulkan headers and loader", "libvulkan-dev",
                   "brew install vulkan-headers vulkan-loader molten-vk",
                   "the LunarG Vulkan SDK (vulkan.lunarg.com; its installer sets VULKAN_SDK)"),
    "fmt": Need("fmt", "libfmt-dev", "brew install fmt",
                "vcpkg install fmt:x64-windows, then set CMAKE_PREFIX_PATH=<vcpkg>\\installed\\x64-windows"),
    "python": Need("the Python headers", "python3-dev", "a Python from python.org or Homebrew (they ship them)",
                   "a Python from python.org (it ships them)"),
}


def prefixes() -> List[Path]:
    """Install prefixes searched for the Vulkan SDK and fmt: VULKAN_SDK, CMAKE_PREFIX_PATH, the system's."""
    found = [Path(os.environ["VULKAN_SDK"])] if os.environ.get("VULKAN_SDK") else []
    found += [Path(p) for p in re.split(r"[;" + re.escape(os.pathsep) + "]", os.environ.get("CMAKE_PREFIX_PATH", ""))
              if p]
    if sys.platform != "win32":
        found += [Path("/usr"), Path("/usr/local"), Path("/opt/homebrew")]
    return found


def prefix_with(header: str) -> Optional[Path]:
    """The first prefix whose include directory (``Include`` in the Windows Vulkan SDK) holds ``header``."""
    for prefix in prefixes():
        if any((prefix / inc / header).is_file() for inc in ("include", "Include")):
            return prefix
    return None


def has_compiler() -> bool:
    if sys.platform == "win32":  # CMake's Visual Studio generator finds MSVC through vswhere, not PATH
        vswhere = Path(os.environ.get("ProgramFiles(x86)", r"C:\Program Files (x86)"),
                       "Microsoft Visual Studio", "Installer", "vswhere.exe")
        return shutil.which("cl") is not None or vswhere.is_file()
    return any(shutil.which(c) for c in filter(None, [os.environ.get("CXX"), "c++", "g++", "clang++"]))


def missing() -> List[str]:
    """Keys of NEEDS this machine lacks."""
    checks = {
        "cmake": shutil.which("cmake") is not None,
        "compiler": has_compiler(),
        "vulkan": prefix_with("vulkan/vulkan.h") is not None,
        "fmt": prefix_with("fmt/format.h") is not None,
        "python": (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file(),
    }
    return [key for key, ok in checks.items() if not ok]


def pybind11_problem() -> Optional[str]:
    """Why this Python's pybind11 cannot build the binding (None: it can)."""
    try:
        import pybind11
    except ImportError:
        return "pybind11 is not installed"
    if not (2, 12) <= tuple(int(x) for x in pybind11.__version__.split(".")[:2]) < (3, 0):
        return f"pybind11 {pybind11.__version__} is installed"
    return None


def missing_message(keys: Sequence[str], pybind11: Optional[str], platform: str = sys.platform) -> str:
    """The one message for everything the build lacks, in the terms of ``platform``."""
    lines = ["aule-kp builds its patched kp (Kompute 0.9.0) from source and this machine lacks: "
             + ", ".join([NEEDS[k].what for k in keys] + (["pybind11"] if pybind11 else [])) + "."]
    if keys and platform == "win32":
        lines += ["Install:"] + [f"  - {NEEDS[k].what}: {NEEDS[k].windows}" for k in keys]
    elif keys and platform == "darwin":
        lines += ["Install:"] + [f"  {cmd}" for cmd in dict.fromkeys(NEEDS[k].macos for k in keys)]
    elif keys:
        lines += ["Debian/Ubuntu:", f"  sudo apt-get install -y {' '.join(NEEDS[k].debian for k in keys)}",
                  "(other distributions: their packages of the same names; or set VULKAN_SDK to a LunarG SDK)"]
    if pybind11:
        lines += [f'Python ({pybind11}): {sys.executable} -m pip install "{PYBIND11}"']
    lines += ["Or skip the build: install a prebuilt aule-kp wheel (README, \"Install\")."]
    return "\n".join(lines)


def debian_packages() -> List[str]:
    return [need.debian for need in NEEDS.values()]


def apply_patch(patch: str, root: Path) -> None:
    """Applies a unified diff (``diff -ruN``; paths lose their first component, as with ``patch -p1``)
    to the tree at ``root``, in Python so that no ``patch`` tool is needed. Every hunk must match
    exactly, at its line or shifted."""
    lines, i = patch.split("\n"), 0
    while i < len(lines) - 1:
        if not (lines[i].startswith("--- ") and lines[i + 1].startswith("+++ ")):
            i += 1
            continue
        path = root.joinpath(*Path(lines[i][4:].split("\t")[0].strip()).parts[1:])
        text, shift, i = path.read_text(encoding="utf-8").split("\n"), 0, i + 2
        while i < len(lines) and lines[i].startswith("@@ "):
            head = re.match(r"@@ -(\d+)(?:,(\d+))? \+\d+(?:,(\d+))? @@", lines[i])
            n_old, n_new = int(head[2] or 1), int(head[3] or 1)
            start = int(head[1]) - (1 if n_old else 0) + shift
            old, new, i = [], [], i + 1
            while len(old) < n_old or len(new) < n_new:
                tag, body = (lines[i][:1] or " "), lines[i][1:]  # an empty line: context that lost its space
                i += 1
                if tag == "\\":  # "\ No newline at end of file"
                    continue
                if tag not in " -+":
                    raise RuntimeError(f"{PATCH.name}: a hunk of {path.name} ends early, at {lines[i - 1]!r}")
                if tag != "+":
                    old.append(body)
                if tag != "-":
                    new.append(body)
            at = next((s for d in range(len(text)) for s in (start - d, start + d)
                       if 0 <= s <= len(text) - len(old) and text[s:s + len(old)] == old), None)
            if at is None:
                raise RuntimeError(f"{PATCH.name}: the hunk at line {start + 1} of {path.relative_to(root)} "
                                   "does not apply")
            text[at:at + len(old)] = new
            shift += len(new) - len(old) + at - start
        path.write_text("\n".join(text), encoding="utf-8")


def edit_sources(src: Path, patch_id: str) -> None:
    """What packaging changes beyond the patch, each of which must apply exactly once: the module's
    name and private internals, the patch's id (so a build tells which patch it has), and the Python
    lookup (kp's own FindPythonLibs wants a libpython, absent in manylinux images and never needed:
    pybind11 links the module against Python where a platform needs it)."""
    edits = [
        ("python/src/main.cpp", r"PYBIND11_MODULE\(kp, m\)", f"PYBIND11_MODULE({MODULE}, m)"),
        ("python/src/main.cpp", r'(m\.attr\("aule_patch"\) = \d+;)',
         rf'\1\n    m.attr("aule_patch_id") = "{patch_id}";'),
        ("CMakeLists.txt", r"add_compile_definitions\(KOMPUTE_BUILD_PYTHON=1\)",
         f"add_compile_definitions(KOMPUTE_BUILD_PYTHON=1 {DEFINITIONS})".replace("\\", "\\\\")),
        ("CMakeLists.txt", r"\n *find_package\(PythonLibs REQUIRED\)", ""),
        ("src/CMakeLists.txt", r"pybind11::headers \$\{PYTHON_LIBRARIES\}", "pybind11::headers"),
    ]
    for name, pattern, replacement in edits:
        path = src / name
        code, count = re.subn(pattern, replacement, path.read_text(encoding="utf-8"))
        if count != 1:
            raise RuntimeError(f"kp's {name} changed shape ({pattern!r} matched {count}x): update kp_build.py")
        path.write_text(code, encoding="utf-8")


def cmake_arguments(src: Path, work: Path, out: Path) -> List[str]:
    import pybind11

    found = [p for p in (prefix_with("vulkan/vulkan.h"), prefix_with("fmt/format.h")) if p is not None]
    args = ["-S", str(src), "-B", str(work), "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_POSITION_INDEPENDENT_CODE=ON",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_RELEASE={out}",
            f"-DPYTHON_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_PREFIX_PATH=" + ";".join(str(p) for p in dict.fromkeys(found)),
            *(f"-D{k}={v}" for k, v in KOMPUTE_OPTIONS.items())]
    if sys.platform == "darwin":  # cibuildwheel says the target architectures in ARCHFLAGS
        archs = re.findall(r"-arch\s+(\S+)", os.environ.get("ARCHFLAGS", ""))
        args += [f"-DCMAKE_OSX_ARCHITECTURES={';'.join(archs)}"] if archs else []
    if sys.platform == "win32" and not os.environ.get("CMAKE_GENERATOR"):  # Visual Studio's: its platform
        args += ["-A", "x64" if sys.maxsize > 2**32 else "Win32"]
    return args


def input_key() -> str:
    """Hash of everything the build's result depends on."""
    import pybind11

    key = hashlib.sha256()
    for part in (KP_SDIST.read_bytes(), PATCH.read_bytes(), Path(__file__).read_bytes(),
                 "|".join([sysconfig.get_config_var("EXT_SUFFIX") or "", sysconfig.get_platform(),
                           pybind11.__version__, os.environ.get("ARCHFLAGS", ""),
                           os.environ.get("CXXFLAGS", "")]).encode()):
        key.update(hashlib.sha256(part).digest())
    return key.hexdigest()[:16]


def build() -> Path:
    """The patched kp as ``_kp<EXT_SUFFIX>`` under build/kp-private/, compiled once per set of inputs.
    Exits with one message when the machine lacks something the build needs (a cached build needs
    pybind11 alone: its version is one of the inputs)."""
    pybind11 = pybind11_problem()
    if pybind11:
        sys.exit(missing_message(missing(), pybind11))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    cache = CACHE / input_key()
    target = cache / f"{MODULE}{suffix}"
    if target.exists():
        return target
    lacking = missing()
    if lacking:
        sys.exit(missing_message(lacking, None))
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    with tarfile.open(KP_SDIST) as tar:
        tar.extractall(cache, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    src, out, log = cache / f"kp-{KP_VERSION}", cache / "lib", cache / "build.log"
    apply_patch(PATCH.read_text(encoding="utf-8"), src)
    edit_sources(src, hashlib.sha256(PATCH.read_bytes()).hexdigest()[:16])
    # CXXFLAGS rather than CMAKE_CXX_FLAGS: CMake keeps its own defaults beside it (MSVC's /EHsc).
    env = dict(os.environ, CXXFLAGS=f"{os.environ.get('CXXFLAGS', '')} -DKOMPUTE_VK_API_MINOR_VERSION=3".strip())
    print(f"aule-kp: building the patched kp {KP_VERSION} (a few minutes; log: {log})", file=sys.stderr, flush=True)
    with open(log, "w") as sink:
        for step in (cmake_arguments(src, cache / "cmake", out),
                     ["--build", str(cache / "cmake"), "--config", "Release", "--target", "kp",
                      "-j", str(os.cpu_count() or 2)]):
            if subprocess.run(["cmake", *step], env=env, stdout=sink, stderr=subprocess.STDOUT).returncode != 0:
                sys.exit(log.read_text(errors="replace")[-6000:] + f"\naule-kp: kp's build failed; log: {log}")
    built = out / f"kp{suffix}"
    if not built.is_file():
        sys.exit(f"aule-kp: kp's build left no {built.name} in {out} (found {sorted(p.name for p in out.iterdir())})")
    built.replace(target)
    return target


def install_into(package: Path) -> Path:
    """Builds (or reuses) the patched kp and copies it into the package directory ``package``."""
    built = build()
    dest = package / built.name
    if not dest.exists() or not filecmp.cmp(built, dest, shallow=False):
        shutil.copy2(built, dest)
    return dest


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--into", type=Path, help="copy the built _kp extension into this package directory")
    group.add_argument("--debian-packages", action="store_true", help="print the Debian packages the build needs")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.debian_packages:
        print(" ".join(debian_packages()))
    else:
        print(install_into(args.into))
    return 0


if __name__ == "__main__":
    sys.exit(main())
