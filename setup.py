"""Build of aule-kp: the Python package plus, in a wheel or a ``pip install .``, the patched kp and the SPIR-V.

kp 0.9.0 is built from the vendored sdist (third_party/, so nothing is downloaded) with
patches/kp-0.9.0-aule.patch and installed as ``aule_kp._kp``: its pybind11 module is renamed and given
its own pybind11 internals, so a user's own ``kp`` (patched or not) never clashes with it. The build is
cached under build/kp-private/<hash of its inputs>/. Every shader is compiled and spirv-val-checked
into aule_kp/spirv/, the GLSL sources ship as aule_kp/glsl/ and the ComfyUI node pack as
aule_kp/comfyui_node/. An editable install (scripts/setup.sh)
skips all of this: it uses .venv's kp and spirv_cache/ in the tree.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
KP_VERSION = "0.9.0"
KP_SDIST = ROOT / "third_party" / f"kp-{KP_VERSION}.tar.gz"
PATCH = ROOT / "patches" / f"kp-{KP_VERSION}-aule.patch"
APT_PACKAGES = "libvulkan-dev libfmt-dev cmake g++ python3-dev"
KOMPUTE_OPTIONS = {
    "KOMPUTE_OPT_BUILD_PYTHON": "ON", "KOMPUTE_OPT_LOG_LEVEL": "Off", "KOMPUTE_OPT_USE_SPDLOG": "OFF",
    "KOMPUTE_OPT_DISABLE_VULKAN_VERSION_CHECK": "ON", "KOMPUTE_OPT_USE_BUILT_IN_VULKAN_HEADER": "OFF",
    "KOMPUTE_OPT_USE_BUILT_IN_FMT": "OFF", "KOMPUTE_OPT_USE_BUILT_IN_PYBIND11": "OFF", "KOMPUTE_OPT_INSTALL": "OFF",
}
# Prepended to kp's binding: its own pybind11 internals (no "type already registered" against another kp).
PRELUDE = f'#define PYBIND11_INTERNALS_KIND "_aule_kp"\n#define VERSION_INFO "{KP_VERSION}"\n'


def missing_system_packages() -> list:
    """What kp's build needs from the system and cannot find (as Debian package names)."""
    include = Path(sysconfig.get_paths()["include"])
    checks = {
        "cmake": shutil.which("cmake") is not None,
        "g++": shutil.which(os.environ.get("CXX", "c++")) is not None,
        "libvulkan-dev": Path("/usr/include/vulkan/vulkan.h").exists(),
        "libfmt-dev": Path("/usr/include/fmt/format.h").exists(),
        "python3-dev": (include / "Python.h").exists(),
    }
    return [name for name, ok in checks.items() if not ok]


def pybind11_cmake_dir() -> str:
    try:
        import pybind11
    except ImportError:
        sys.exit("aule-kp's build needs pybind11: pip install 'pybind11>=2.12,<3'")
    # 2.12: numpy 2. Before 3: PYBIND11_INTERNALS_KIND (PRELUDE), which 3.x dropped.
    if not (2, 12) <= tuple(int(x) for x in pybind11.__version__.split(".")[:2]) < (3, 0):
        sys.exit(f"aule-kp's build needs pybind11>=2.12,<3 (numpy 2; private internals), found {pybind11.__version__}")
    return pybind11.get_cmake_dir()


def build_private_kp() -> Path:
    """The patched kp extension as ``_kp<EXT_SUFFIX>``, built once per set of inputs."""
    missing = missing_system_packages()
    if missing:
        sys.exit("aule-kp builds its patched kp from source and needs these system packages:\n"
                 f"  sudo apt-get install -y {' '.join(missing)}\n"
                 f"(all of them: {APT_PACKAGES}); or install the prebuilt wheel instead (see README)")
    cmake_dir = pybind11_cmake_dir()
    import pybind11

    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    key = hashlib.sha256()
    for part in (KP_SDIST.read_bytes(), PATCH.read_bytes(), PRELUDE.encode(), repr(KOMPUTE_OPTIONS).encode(),
                 suffix.encode(), pybind11.__version__.encode(), Path(__file__).read_bytes()):
        key.update(hashlib.sha256(part).digest())
    cache = ROOT / "build" / "kp-private" / key.hexdigest()[:16]
    target = cache / f"_kp{suffix}"
    if target.exists():
        return target
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    with tarfile.open(KP_SDIST) as tar:
        tar.extractall(cache)
    src = cache / f"kp-{KP_VERSION}"
    subprocess.run(["patch", "-p1", "-i", str(PATCH)], cwd=src, check=True, stdout=subprocess.DEVNULL)
    main_cpp = src / "python" / "src" / "main.cpp"
    patch_id = hashlib.sha256(PATCH.read_bytes()).hexdigest()[:16]
    code = main_cpp.read_text()
    code, renamed = re.subn(r"PYBIND11_MODULE\(kp, m\)", "PYBIND11_MODULE(_kp, m)", code)
    code, stamped = re.subn(r'(m\.attr\("aule_patch"\) = \d+;)', rf'\1\n    m.attr("aule_patch_id") = "{patch_id}";',
                            code)
    if renamed != 1 or stamped != 1:
        sys.exit(f"kp's binding changed shape (module renamed {renamed}x, patch id stamped {stamped}x): "
                 "update setup.py")
    main_cpp.write_text(PRELUDE + code)
    out = cache / "lib"
    env = dict(os.environ, **KOMPUTE_OPTIONS)
    env["CXXFLAGS"] = f"{env.get('CXXFLAGS', '')} -fPIC -DKOMPUTE_VK_API_MINOR_VERSION=3"
    configure = ["cmake", "-S", str(src), "-B", str(cache / "cmake"), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}", f"-DPYTHON_EXECUTABLE={sys.executable}",
                 f"-DCMAKE_PREFIX_PATH={cmake_dir}", *(f"-D{k}={v}" for k, v in KOMPUTE_OPTIONS.items())]
    print(f"aule-kp: building the patched kp {KP_VERSION} in {cache} (a few minutes)", flush=True)
    subprocess.run(configure, env=env, check=True, stdout=subprocess.DEVNULL)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(cache / "cmake"), "--target", "kp", "-j", jobs], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    built = next(out.glob("kp*.so"))
    built.replace(target)
    return target


def compile_shaders(dest: Path) -> None:
    """Compiles (spirv-val-checked) every kernel into spirv_cache/ and copies it, and the GLSL, into ``dest``."""
    env = dict(os.environ, AULE_KP_SPIRV_CACHE=str(ROOT / "spirv_cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-m", "aule_kp.vulkan.compile", "--quiet"], cwd=ROOT, env=env, check=True)
    kernels = sorted((ROOT / "glsl").rglob("*.comp"))  # glsl/glslang15/ too (SPIR-V from glsl/prebuilt/)
    (dest / "spirv").mkdir(parents=True, exist_ok=True)
    for src in kernels:
        shutil.copy2(ROOT / "spirv_cache" / f"{src.stem}.spv", dest / "spirv" / f"{src.stem}.spv")
    shutil.copytree(ROOT / "glsl", dest / "glsl", dirs_exist_ok=True)


class BuildPy(build_py):
    """Adds the private kp and the shaders to the package (not in an editable install)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        package = Path(self.build_lib) / "aule_kp"
        shutil.copy2(build_private_kp(), package)
        compile_shaders(package)
        # The ComfyUI node pack, for `python -m aule_kp.comfyui install <ComfyUI dir>`.
        shutil.copytree(ROOT / "comfyui_aule", package / "comfyui_node", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))


class BinaryDistribution(Distribution):
    """The wheel holds a compiled extension: a platform wheel, never py3-none-any."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPy}, distclass=BinaryDistribution)
