"""The one build of the CPU backend's native kernels: aule_kp/cpu/csrc/ (forward, backward, their shared
header) compiled once per vector width into a plain shared library (``libaule_fa2_w<floats>``), which
aule_kp/cpu/native.py picks for the CPU it runs on and calls through ctypes. Plain libraries rather than Python
extensions: one build serves every Python version, and ctypes releases the GIL for the whole call.

Every route goes through here, like scripts/kp_build.py: setup.py (wheels, ``pip install`` of a checkout) and
scripts/setup.sh (``make install``). Builds are cached under build/cpu-native/<hash of sources, flags and
compiler>/.

    python scripts/cpu_build.py --into aule_kp    # build (or reuse) and copy the libraries to aule_kp/cpu/lib/

Only the standard library is imported: setup.sh runs this with the system Python before any venv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "aule_kp" / "cpu" / "csrc"
SOURCES = [CSRC / "fa2_forward.cpp", CSRC / "fa2_backward.cpp"]  # with fa2_common.h: one library per width
CACHE = ROOT / "build" / "cpu-native"

#: No exceptions, RTTI or C++ library: the libraries need libc, libm and pthreads alone. Contraction (FMA) is
#: the only floating-point licence: the kernel's NaN and infinity handling needs IEEE comparisons.
FLAGS = ["-O3", "-std=c++17", "-fno-exceptions", "-fno-rtti", "-ffp-contract=fast", "-fPIC", "-shared", "-pthread",
         "-fvisibility=hidden"]


def variants() -> Dict[int, List[str]]:
    """Floats per vector -> the ISA flags of that build, for this machine's architecture. x86-64 gets AVX-512,
    AVX2+FMA (both with F16C, which every AVX2 CPU has) and its SSE2 baseline (native.py picks by the CPU's
    features at run time); other architectures their baseline (NEON on arm64) at 4 floats."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return {16: ["-mavx512f", "-mavx2", "-mfma", "-mf16c"], 8: ["-mavx2", "-mfma", "-mf16c"], 4: []}
    return {4: []}


def library_name(width: int) -> str:
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    return f"libaule_fa2_w{width}{suffix}"


def compiler() -> str:
    """``$CXX``, else the first C++ compiler on PATH; exits with what to install when there is none."""
    for name in filter(None, [os.environ.get("CXX"), "c++", "g++", "clang++"]):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("aule-kp: building the CPU kernel needs a C++17 compiler (GCC or Clang): "
             "apt-get install g++ / xcode-select --install")


def build() -> Path:
    """The directory holding every variant's library, built unless cached."""
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    link = ["-Wl,--as-needed"] if sys.platform.startswith("linux") else []
    plan = {width: [cxx, *FLAGS, *isa, f"-DAULE_W={width}", *map(str, SOURCES), *link]
            for width, isa in variants().items()}
    inputs = b"".join(path.read_bytes() for path in sorted(CSRC.iterdir()) if path.suffix in (".cpp", ".h"))
    key = hashlib.sha256(inputs + repr((version, sorted(plan.items()))).encode()).hexdigest()[:16]
    out = CACHE / key
    if all((out / library_name(w)).is_file() for w in plan):
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=CACHE))  # builds running at once each use their own
    try:
        for width, cmd in plan.items():
            print(f"[cpu-build] {library_name(width)}", file=sys.stderr)
            subprocess.run([*cmd, "-o", str(tmp / library_name(width))], check=True)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except OSError:
        if not all((out / library_name(w)).is_file() for w in plan):
            raise
        # another build of the same inputs finished first: its libraries are these
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def install_into(package: Path) -> List[Path]:
    """Builds (or reuses) the libraries and copies them into ``package``/cpu/lib/; returns their paths.
    Windows gets none: the source uses GCC/Clang vector extensions, which MSVC lacks, so there the CPU
    backend runs its NumPy paths (and says so once)."""
    if os.name == "nt":
        print("[cpu-build] skipped on Windows: MSVC has no GCC/Clang vector extensions", file=sys.stderr)
        return []
    built = build()
    dest = package / "cpu" / "lib"
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for lib in sorted(built.iterdir()):
        target = dest / lib.name
        if not target.exists() or target.read_bytes() != lib.read_bytes():
            # A new file renamed over the old: a process that has the old one loaded keeps its pages (writing
            # into it in place crashed such a process, SIGILL).
            partial = target.with_name(target.name + ".partial")
            shutil.copy2(lib, partial)
            os.replace(partial, target)
        copied.append(target)
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--into", type=Path, required=True, help="the aule_kp package directory")
    args = parser.parse_args()
    for path in install_into(args.into):
        print(path)


if __name__ == "__main__":
    main()
