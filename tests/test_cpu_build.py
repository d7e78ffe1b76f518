"""scripts/cpu_build.py's install step (the build itself runs in every test of the native kernels)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import cpu_build  # noqa: E402 - scripts/ is not a package


@pytest.mark.skipif(os.name == "nt", reason="Windows installs no library")
def test_install_replaces_a_library_rather_than_rewriting_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A process that has the installed library loaded maps its file: the new build must arrive as a new file
    # (another inode) renamed over it, never as new bytes written into the mapped one.
    built = tmp_path / "built"
    built.mkdir()
    (built / "libaule_fa2_w4.so").write_bytes(b"new build")
    monkeypatch.setattr(cpu_build, "build", lambda: built)
    lib = tmp_path / "aule_kp" / "cpu" / "lib"
    lib.mkdir(parents=True)
    old = lib / "libaule_fa2_w4.so"
    old.write_bytes(b"old build")
    inode = old.stat().st_ino
    with old.open("rb"):  # held open, as a loaded library is: its inode cannot be reused
        assert cpu_build.install_into(tmp_path / "aule_kp") == [old]
        assert old.read_bytes() == b"new build" and old.stat().st_ino != inode
    assert sorted(p.name for p in lib.iterdir()) == ["libaule_fa2_w4.so"]
