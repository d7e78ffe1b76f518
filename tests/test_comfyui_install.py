"""The ComfyUI node pack installs the ComfyUI-Manager way and loads from a custom_nodes/ folder.

ComfyUI-Manager clones a node pack into ``custom_nodes/`` and runs ``pip install -r requirements.txt``
in it. The in-tree tests check that file, ``python -m aule_kp.comfyui install`` and the pack's message
when aule_kp is missing. The wheel test installs the built wheel into a fresh venv, copies the pack
out of that wheel into a temporary ``custom_nodes/`` and runs tests/test_comfyui.py's loading and
sampling tests with the venv's Python against that copy. It skips without a wheel in dist/ (``make
wheel``) or without the ComfyUI snapshot (``$AULE_KP_COMFYUI``).
"""

from __future__ import annotations

import importlib.util
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from test_wheel import built_wheels, needs_wheel

from aule_kp import comfyui

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "comfyui_aule"
COMFYUI = Path(os.environ.get("AULE_KP_COMFYUI", REPO.parent / "shared" / "thirdparty" / "ComfyUI"))


def test_requirements_pull_aule_kp() -> None:
    tomllib = pytest.importorskip("tomllib")
    lines = [x.strip() for x in (PACK / "requirements.txt").read_text().splitlines()]
    wanted = [x for x in lines if x and not x.startswith("#")]
    assert wanted == tomllib.loads((PACK / "pyproject.toml").read_text())["project"]["dependencies"]
    assert wanted[0].startswith("aule-kp")


def test_install_copies_the_pack(tmp_path: Path) -> None:
    (tmp_path / "custom_nodes" / "comfyui_aule").mkdir(parents=True)
    (tmp_path / "custom_nodes" / "comfyui_aule" / "stale.py").write_text("")
    assert comfyui.main(["install", str(tmp_path)]) == 0
    dest = tmp_path / "custom_nodes" / "comfyui_aule"
    shipped = sorted(p.name for p in PACK.iterdir() if p.is_file())
    assert sorted(p.name for p in dest.iterdir()) == shipped  # the older copy is replaced, not merged
    assert (dest / "nodes.py").read_bytes() == (PACK / "nodes.py").read_bytes()


def test_install_refuses_a_folder_without_custom_nodes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="comfyui_dir.*custom_nodes"):
        comfyui.install(tmp_path)


def test_install_failure_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file where the pack goes (an OSError while replacing it): exit 2 with the reason, not a traceback."""
    (tmp_path / "custom_nodes").mkdir()
    (tmp_path / "custom_nodes" / "comfyui_aule").write_text("not the pack")
    with pytest.raises(SystemExit) as exc:
        comfyui.main(["install", str(tmp_path)])
    assert exc.value.code == 2
    assert "comfyui_aule" in capsys.readouterr().err


def test_pack_without_aule_kp_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "aule_kp" else real_find_spec(name, *a))
    spec = importlib.util.spec_from_file_location("pack_without_aule_kp", PACK / "__init__.py",
                                                  submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match=r"aule-kp.*pip install .*requirements\.txt"):
        spec.loader.exec_module(module)


@needs_wheel
@pytest.mark.skipif(not (COMFYUI / "comfy" / "ldm" / "modules" / "attention.py").is_file(),
                    reason=f"no ComfyUI snapshot at {COMFYUI} (set AULE_KP_COMFYUI)")
def test_pack_from_the_wheel_loads_and_samples_in_comfyui(tmp_path: Path) -> None:
    """A fresh venv holds only the wheel (no deps); torch, ComfyUI's dependencies and pytest come from
    this environment's site-packages, appended after the venv's own (a .pth), so the installed aule_kp
    and its private kp win over this checkout's and nothing large is installed again."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    "--disable-pip-version-check", str(built_wheels()[-1])], check=True)
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "zz_host_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    comfy_dir = tmp_path / "ComfyUI"
    (comfy_dir / "custom_nodes").mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()  # outside the checkout: `python -m` must not put this tree's aule_kp first
    subprocess.run([py, "-m", "aule_kp.comfyui", "install", str(comfy_dir)], cwd=run, check=True)
    check = ("import aule_kp, aule_kp.vulkan.device as d, sys; "
             "assert aule_kp.__file__.startswith(sys.prefix), aule_kp.__file__; "
             "assert d.import_kp().__name__ == 'aule_kp._kp'")
    subprocess.run([py, "-c", check], cwd=run, check=True)
    env = dict(os.environ, AULE_KP_COMFYUI=str(COMFYUI),
               AULE_KP_COMFYUI_PACK=str(comfy_dir / "custom_nodes" / "comfyui_aule"))
    done = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                           "pack_loads_as_custom_node or sd15_sampling or vulkan_tiny",
                           str(REPO / "tests" / "test_comfyui.py")],
                          cwd=run, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    # vulkan_tiny skips where there is no Vulkan device: 2 or 3 passed, nothing failed.
    summary = done.stdout.strip().splitlines()[-1]
    assert " failed" not in summary and ("3 passed" in summary or "2 passed" in summary), done.stdout[-2000:]
