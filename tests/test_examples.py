"""Every example runs as it is (a subprocess, as a user would start it) and reports success."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# (script, optional packages it needs, the line it prints on success)
CASES: Tuple[Tuple[str, Tuple[str, ...], str], ...] = (
    ("numpy_batched.py", (), "numpy_batched: OK"),
    ("context_zero_copy.py", (), "context_zero_copy: "),  # "OK", or "skipped" without a Vulkan device
    ("torch_sdpa_patch.py", ("torch",), "torch_sdpa_patch: OK"),
    ("transformers_patch.py", ("torch", "transformers"), "transformers_patch: OK"),
    ("diffusers_unet.py", ("torch", "diffusers"), "diffusers_unet: OK"),
)


@pytest.mark.parametrize("script,needs,marker", CASES, ids=[c[0] for c in CASES])
def test_example_runs(script: str, needs: Tuple[str, ...], marker: str) -> None:
    for package in needs:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{script} needs {package}")
    env = dict(os.environ)
    # The examples import aule_kp from the checkout even when it is not installed in the venv.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(EXAMPLES.parent), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert any(line.startswith(marker) for line in proc.stdout.splitlines()), proc.stdout
    if marker.endswith(": "):
        assert f"{marker}OK" in proc.stdout or f"{marker}skipped" in proc.stdout, proc.stdout
