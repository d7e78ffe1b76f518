"""``python -m aule_kp.comfyui install <ComfyUI dir>``: copies the ComfyUI node pack into custom_nodes/.

The wheel carries the pack as ``aule_kp/comfyui_node``; a source checkout has it as ``comfyui_aule/``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Optional

PACK_NAME = "comfyui_aule"


def pack_source() -> Path:
    """The node pack folder shipped with this aule_kp (installed wheel or source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "comfyui_node", here.parent / PACK_NAME):
        if (candidate / "__init__.py").is_file():
            return candidate
    raise FileNotFoundError(f"no ComfyUI node pack beside {here}: reinstall aule-kp from its wheel")


def install(comfyui_dir: Path) -> Path:
    """Copies the node pack to ``<comfyui_dir>/custom_nodes/comfyui_aule`` (replacing an older copy).

    Returns the folder written. Raises ValueError when ``comfyui_dir`` has no ``custom_nodes`` folder.
    """
    custom_nodes = Path(comfyui_dir) / "custom_nodes"
    if not custom_nodes.is_dir():
        raise ValueError(f"comfyui_dir: expected a ComfyUI folder holding custom_nodes/, got {comfyui_dir}")
    dest = custom_nodes / PACK_NAME
    if dest.is_symlink():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(pack_source(), dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aule_kp.comfyui", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("install", help="copy the node pack into <ComfyUI dir>/custom_nodes/")
    cmd.add_argument("comfyui_dir", type=Path, help="the ComfyUI folder (the one holding custom_nodes/)")
    args = parser.parse_args(argv)
    try:
        dest = install(args.comfyui_dir)
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:  # no pack beside aule_kp, or custom_nodes/ not writable / holding a file there
        parser.error(f"cannot install the pack: {exc}")
    sys.stdout.write(f"installed the Aule Attention nodes in {dest}; restart ComfyUI\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
