"""The built wheel (``make wheel``) works where nothing compiles: a fresh venv, ``pip install`` of the
wheel and numpy 2, then a causal GQA call on the Vulkan backend from outside the source tree matches
the float64 reference, and ``aule-kp info`` reports the wheel's private kp as patched.

The wheel is not built here (kp alone compiles for minutes): without one in dist/ these tests skip.
The in-tree tests below it check the shader lookup's errors and need no wheel.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import textwrap
import venv
import zipfile
from pathlib import Path
from typing import List

import numpy as np
import pytest
from conftest import output_tolerance, problem, problem_inputs
from reference import reference_attention

ROOT = Path(__file__).resolve().parents[1]


def built_wheels() -> List[Path]:
    return sorted((ROOT / "dist").glob("aule_kp-*.whl"), key=lambda p: p.stat().st_mtime)


needs_wheel = pytest.mark.skipif(not built_wheels(), reason="no wheel in dist/: run `make wheel` first")


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the newest wheel and numpy 2, installed from binaries only."""
    env_dir = tmp_path_factory.mktemp("wheel-venv")
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--only-binary", ":all:",
                    str(built_wheels()[-1]), "numpy>=2"], check=True)
    return env_dir


@needs_wheel
def test_wheel_holds_kp_spirv_and_glsl() -> None:
    names = set(zipfile.ZipFile(built_wheels()[-1]).namelist())
    kernels = sorted(p.stem for p in (ROOT / "glsl").glob("*.comp"))
    assert kernels
    missing = [k for k in kernels if f"aule_kp/spirv/{k}.spv" not in names or f"aule_kp/glsl/{k}.comp" not in names]
    assert not missing, f"kernels missing from the wheel: {missing}"
    private = [n for n in names if n.startswith("aule_kp/_kp.") and n.endswith(".so")]
    assert private
    assert any(n.startswith("aule_kp/cpu/lib/libaule_fa2_w") for n in names), "the CPU kernel's libraries"
    assert not any(n.startswith("kp.") or n.startswith("kp/") for n in names), "kp must stay private to aule_kp"
    # One pybind11 internals id in the whole module, the private one: kompute's sources include pybind11
    # too, and a second id would leave which one the module uses to the linker (then a user's kp clashes).
    ids = set(re.findall(rb"__pybind11_internals_v\d+\w*?__", zipfile.ZipFile(built_wheels()[-1]).read(private[0])))
    assert len(ids) == 1 and b"_aule_kp" in ids.pop(), "the private kp must use its own pybind11 internals alone"


def run_installed(wheel_venv: Path, tmp_path: Path, seed: int, setup: str, backend: str) -> None:
    """Runs ``setup`` (asserts about the install), then a causal GQA call on ``backend``, in the wheel's venv;
    compares its output with the float64 reference here."""
    p = problem(b=1, hq=4, hkv=2, lq=40, lk=40, causal=True)
    q, k, v = problem_inputs(p, np.random.default_rng(seed))
    np.savez(tmp_path / "in.npz", q=q, k=k, v=v)
    call = f"""
        x = np.load("in.npz")
        np.save("out.npy", aule_kp.flash_attention(x["q"], x["k"], x["v"], causal=True, backend="{backend}"))
    """
    script = textwrap.dedent(setup) + textwrap.dedent(call)
    subprocess.run([wheel_venv / "bin" / "python", "-c", script], cwd=tmp_path, check=True)
    out = np.load(tmp_path / "out.npy")
    ref, _ = reference_attention(q, k, v, p)
    np.testing.assert_allclose(out, ref, atol=output_tolerance(p, q, k, v, None), rtol=0)


@needs_wheel
def test_installed_wheel_runs_causal_gqa_under_numpy2(wheel_venv: Path, tmp_path: Path) -> None:
    run_installed(wheel_venv, tmp_path, 17, """
        import numpy as np, aule_kp, aule_kp.vulkan.device as d
        assert np.__version__.startswith("2."), np.__version__
        assert "site-packages" in aule_kp.__file__, aule_kp.__file__
        assert d.import_kp().__name__ == "aule_kp._kp"
    """, "vulkan")


@needs_wheel
def test_installed_wheel_runs_the_native_cpu_kernel(wheel_venv: Path, tmp_path: Path) -> None:
    # The wheel carries the CPU kernel's libraries: its users need no compiler for the fast CPU path.
    run_installed(wheel_venv, tmp_path, 18, """
        import warnings
        warnings.simplefilter("error")  # no fallback warning
        import numpy as np, aule_kp
        from aule_kp.cpu.backend import CpuBackend
        kern = CpuBackend().native()
        assert kern is not None and "site-packages" in str(kern.path), kern
    """, "cpu")


@needs_wheel
def test_installed_info_reports_the_private_kp_patched(wheel_venv: Path, tmp_path: Path) -> None:
    done = subprocess.run([wheel_venv / "bin" / "aule-kp", "info"], cwd=tmp_path, capture_output=True, text=True,
                          check=True)
    assert "patched: features + one fence per sequence" in done.stdout, done.stdout


@needs_wheel
def test_vulkan_suite_under_numpy2_with_the_installed_wheel(wheel_venv: Path, tmp_path: Path) -> None:
    """tests/test_vulkan.py (the forward pass's shapes, dtypes, masks and plans) against the installed
    wheel under numpy 2: the representative subset of the suite for the second numpy major."""
    py = wheel_venv / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "pytest>=8", "pytest-timeout",
                    "hypothesis>=6.100"], check=True)
    check = "import aule_kp, numpy; assert 'site-packages' in aule_kp.__file__ and numpy.__version__ >= '2'"
    subprocess.run([py, "-c", check], cwd=tmp_path, check=True)
    done = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_vulkan.py")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@needs_wheel
def test_private_kp_coexists_with_the_users_kp(wheel_venv: Path, tmp_path: Path) -> None:
    """The environment's own kp imported beside the wheel's: both load, each with its own types. Only
    where the environment has a kp: `make install` builds the private one alone (aule_kp/_kp), so a
    .venv holds a plain ``kp`` only from before that, or where a user installed one."""
    spec = importlib.util.find_spec("kp")
    if spec is None or spec.origin is None:
        pytest.skip("no kp in this environment to put beside the wheel's (make install builds aule_kp._kp only)")
    script = textwrap.dedent("""
        import kp, aule_kp.vulkan.device as d
        private = d.import_kp()
        assert private.__name__ == "aule_kp._kp" and private is not kp
        assert private.Manager is not kp.Manager
    """)
    user_kp = tmp_path / "user_kp"  # the module alone: not the rest of that environment's packages
    user_kp.mkdir()
    shutil.copy2(spec.origin, user_kp)
    env = dict(os.environ, PYTHONPATH=str(user_kp))
    subprocess.run([wheel_venv / "bin" / "python", "-c", script], cwd=tmp_path, env=env, check=True)


def test_compile_with_no_kernels_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from aule_kp.vulkan import compile as comp

    monkeypatch.setattr(comp, "GLSL_DIR", tmp_path)
    assert comp.main(["--quiet"]) != 0


def test_missing_spirv_names_the_file_and_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from aule_kp.vulkan import compile as comp
    from aule_kp.vulkan import device as devmod

    caps = devmod.devices()[0] if devmod.vulkan_unavailable() is None else pytest.skip("no Vulkan device")
    monkeypatch.setattr(comp, "GLSL_DIR", tmp_path / "glsl")
    monkeypatch.setattr(comp, "SPIRV_DIR", tmp_path / "spirv")
    with pytest.raises(FileNotFoundError, match=r"fa2_fwd\.spv.*(reinstall|make shaders)"):
        devmod.Device(caps).spirv("fa2_fwd")


def test_kp_arrays_of_stride_zero_are_refused() -> None:
    """What a kp built with pybind11 < 2.12 returns under numpy 2: refused, never read as data."""
    from aule_kp.vulkan.plan import mapped_memory

    class BrokenTensor:
        def data(self) -> np.ndarray:
            return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(6,), strides=(0,))

    with pytest.raises(RuntimeError, match="pybind11 < 2.12"):
        mapped_memory(BrokenTensor())
