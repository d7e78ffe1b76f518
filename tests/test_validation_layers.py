"""The engine under the Khronos validation layer, synchronization validation on: zero errors.

Debian's ``vulkan-validationlayers`` (1.3.239, installed by scripts/setup.sh) reads its settings from
the ``vk_layer_settings.txt`` that ``VK_LAYER_SETTINGS_PATH`` points to; ``VK_INSTANCE_LAYERS``
loads it into every instance of the process, kp's included. The layer writes each message to the
log file as a header line such as ``SYNC-HAZARD-WRITE-AFTER-WRITE(ERROR / SPEC): msgNum: ... -
Validation Error: [ ... ] ...`` followed by indented object lines. The workload
(``validation_workload.py``) runs in a subprocess, since the layer must be there when the Vulkan
instance is made; the positive control (a deliberate write-after-write hazard) shows that this
harness does see an error when there is one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

from aule_kp.vulkan import device as devmod

WORKLOAD = Path(__file__).resolve().parent / "validation_workload.py"
LAYER = "VK_LAYER_KHRONOS_validation"
LAYER_DIRS = ["/usr/share/vulkan/explicit_layer.d", "/usr/local/share/vulkan/explicit_layer.d",
              "/etc/vulkan/explicit_layer.d"]
#: A message's header line: its ID, then the severity.
HEADER = re.compile(r"^(\S+)\((ERROR|WARN|INFO|PERF|DEBUG)\b[^)]*\): msgNum")


def _layer_installed() -> bool:
    dirs = os.environ.get("VK_LAYER_PATH", "").split(os.pathsep) + LAYER_DIRS
    return any((Path(d) / "VkLayer_khronos_validation.json").is_file() for d in dirs if d)


pytestmark = [
    pytest.mark.skipif(devmod.vulkan_unavailable() is not None, reason="no Vulkan device"),
    pytest.mark.skipif(not _layer_installed(), reason="vulkan-validationlayers is not installed (scripts/setup.sh)"),
]


def run_validated(tmp_path: Path, what: str, instances: int = 1) -> List[Tuple[str, str, str]]:
    """Runs the workload ``what`` under the layer, which the loader must put into at least
    ``instances`` Vulkan instances; ``(id, severity, header line)`` of each message."""
    log = tmp_path / "validation.log"
    settings = tmp_path / "vk_layer_settings.txt"
    settings.write_text("\n".join([
        "khronos_validation.debug_action = VK_DBG_LAYER_ACTION_LOG_MSG",
        f"khronos_validation.log_filename = {log}",
        "khronos_validation.report_flags = error,warn",
        "khronos_validation.enables = VK_VALIDATION_FEATURE_ENABLE_SYNCHRONIZATION_VALIDATION_EXT,"
        "VALIDATION_CHECK_ENABLE_SYNCHRONIZATION_VALIDATION_QUEUE_SUBMIT",
        "khronos_validation.enable_message_limit = false",  # count every message, not the first 10 of a kind
        "",
    ]))
    env = {**os.environ, "VK_INSTANCE_LAYERS": LAYER, "VK_LAYER_SETTINGS_PATH": str(settings),
           "VK_LOADER_DEBUG": "layer"}  # the loader says on stderr which instances got the layer
    done = subprocess.run([sys.executable, str(WORKLOAD), what], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.count(f'Insert instance layer "{LAYER}"') >= instances, done.stderr[-3000:]
    assert log.is_file(), "the validation layer did not read its settings (no log file)"
    return [(m.group(1), m.group(2), line) for line in log.read_text().splitlines() if (m := HEADER.match(line))]


def test_engine_calls_have_no_validation_errors(tmp_path: Path) -> None:
    messages = run_validated(tmp_path, "engine", instances=2)  # the device probe's instance and kp's
    errors = [line for _, severity, line in messages if severity == "ERROR"]
    assert errors == [], f"{len(errors)} validation errors, first: {errors[:3]}"


def test_a_deliberate_hazard_is_reported(tmp_path: Path) -> None:
    messages = run_validated(tmp_path, "hazard")
    assert [(ident, severity) for ident, severity, _ in messages] == [("SYNC-HAZARD-WRITE-AFTER-WRITE", "ERROR")]


def test_a_compute_to_compute_hazard_is_reported(tmp_path: Path) -> None:
    """The positive control of the barriers between dispatches (kp patch 5): one dispatch reading
    what another wrote, with no barrier, is reported."""
    messages = run_validated(tmp_path, "compute_hazard")
    assert [(ident, severity) for ident, severity, _ in messages] == [("SYNC-HAZARD-READ-AFTER-WRITE", "ERROR")]
