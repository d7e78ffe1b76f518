"""Build of aule-kp: the Python package plus, in a wheel or a ``pip install .``, the patched kp, the CPU kernel's
libraries and the SPIR-V.

The patched kp comes from scripts/kp_build.py (the one kp build: the vendored sdist, our patch, the
private module ``aule_kp._kp``, cached under build/kp-private/); the CPU backend's native kernel from
scripts/cpu_build.py (one library per vector width, aule_kp/cpu/lib/, cached under build/cpu-native/). Every shader is compiled and
spirv-val-checked into aule_kp/spirv/, the GLSL sources ship as aule_kp/glsl/ and the ComfyUI node
pack as aule_kp/comfyui_node/. An editable install (scripts/setup.sh) gets the same kp, copied into
the tree's aule_kp/, and uses glsl/ and spirv_cache/ in the tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))
import cpu_build  # noqa: E402 - scripts/ is not a package
import kp_build  # noqa: E402


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
    """Adds the private kp, the CPU kernel and the shaders to the package (an editable install: the kp and the
    CPU kernel, into the tree)."""

    def run(self) -> None:
        super().run()
        package = ROOT / "aule_kp" if getattr(self, "editable_mode", False) else Path(self.build_lib) / "aule_kp"
        kp_build.install_into(package)
        cpu_build.install_into(package)
        if getattr(self, "editable_mode", False):
            return
        compile_shaders(package)
        # The ComfyUI node pack, for `python -m aule_kp.comfyui install <ComfyUI dir>`.
        shutil.copytree(ROOT / "comfyui_aule", package / "comfyui_node", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))


class BinaryDistribution(Distribution):
    """The wheel holds a compiled extension: a platform wheel, never py3-none-any."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPy}, distclass=BinaryDistribution)
