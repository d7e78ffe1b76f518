"""Per-pipeline registers, spills and shared memory as the Vulkan driver reports them
(VK_KHR_pipeline_executable_properties, which kp does not expose), for the pipelines the library
picks on this device.

Builds scripts/pipeline_stats.c with ``cc`` into a temporary directory (no compiler or no
``<vulkan/vulkan.h>``: a note, exit 0), feeds it one line per pipeline (``NAME SPV C0..C8``) and
prints a markdown table: one row per pipeline with its specialization constants, the shared memory
the library's formula gives, and every statistic the driver reports (the union of their names).
A device without the extension (Mesa's lavapipe 22.3, for one) gets a note and exit 0.

Pipelines: the forward kernel ``choice.forward_kernel`` picks for B1 H32 fp16 S2048 D64, S8192 D64,
S8192 D128 and S8192 D128 causal, and the split-KV kernel ``choice.split_kv_config`` picks for
decoding B1 Hq32 Hkv8 Lq1 Lk32768 D128 fp16; then any given as arguments, to compare variants:

    python3 benchmarks/pipeline_stats_gpu.py [kernel:dk,dv,br,bc,tpr,dtype,wg,stage,rpt ...]
    python3 benchmarks/pipeline_stats_gpu.py fa2_splitkv:128,128,2,2,16,1,256,0,1

(``kernel`` names glsl/<kernel>.comp; the nine numbers are KernelConfig.spec()'s order, dtype 0
fp32 / 1 fp16 / 2 bf16). The SPIR-V comes from ``compile.spirv_path`` (``AULE_KP_SPIRV_CACHE``
honoured); the device is ``AULE_KP_DEVICE`` (default 0) for both the library and the tool.

On the lent GPU, after scripts/gpu_run.sh's set-up (which unpacks libvulkan-dev for the header and
sets AULE_KP_SPIRV_CACHE):

    STEPS=cmd GPU_CMD='python3 benchmarks/pipeline_stats_gpu.py | tee "$OUT/pipeline_stats.md"' \\
        scripts/gpu_run.sh
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from aule_kp.problem import Problem, band
from aule_kp.vulkan import choice
from aule_kp.vulkan import device as devmod
from aule_kp.vulkan.compile import spirv_path
from aule_kp.vulkan.configs import KernelConfig, coopmat_shared_bytes, splitkv_shared_bytes

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "scripts" / "pipeline_stats.c"
SPEC_NAMES = "DK,DV,BR,BC,TPR,DTYPE,WG,STAGE,RPT"
#: Exit status of the tool when the device lacks VK_KHR_pipeline_executable_properties.
NO_EXTENSION = 2

Pipeline = Tuple[str, KernelConfig, str]  # (row name, pipeline, note)


def build(out_dir: Path) -> Optional[Path]:
    """Compiles the tool into ``out_dir``; None (after a note) when that cannot be done here."""
    cc = shutil.which("cc")
    if cc is None:
        print("note: no C compiler (`cc`) on PATH; pipeline statistics need scripts/pipeline_stats.c built")
        return None
    exe = out_dir / "pipeline_stats"
    done = subprocess.run([cc, "-O2", "-o", str(exe), str(SOURCE), "-lvulkan"], capture_output=True, text=True)
    if done.returncode != 0:
        err = (done.stdout + done.stderr).strip()
        what = "no <vulkan/vulkan.h> (install libvulkan-dev)" if "vulkan/vulkan.h" in err else "cc failed"
        print(f"note: cannot build scripts/pipeline_stats.c: {what}\n\n```\n{err[-2000:]}\n```")
        return None
    return exe


def forward_problem(s: int, d: int, causal: bool) -> Problem:
    diag, left, right = band(s, s, causal=causal, window=None, top_left=False)
    return Problem(1, 32, 32, s, s, d, d, "float16", 1 / math.sqrt(d), diag, left, right)


def decode_problem(lk: int = 32768, d: int = 128) -> Problem:
    diag, left, right = band(1, lk, causal=False, window=None, top_left=False)
    return Problem(1, 32, 8, 1, lk, d, d, "float16", 1 / math.sqrt(d), diag, left, right)


def library_pipelines() -> List[Pipeline]:
    """The pipelines the library picks on this device for the problems in the module docstring."""
    caps = devmod.get_device().caps
    out: List[Pipeline] = []
    for s, d, causal in ((2048, 64, False), (8192, 64, False), (8192, 128, False), (8192, 128, True)):
        name = f"fwd S{s} D{d}{' causal' if causal else ''}"
        try:
            cfg = choice.forward_kernel(caps, forward_problem(s, d, causal))
        except ValueError as exc:
            print(f"note: {name}: {exc}")
            continue
        out.append((name, cfg, cfg.variant))
    p = decode_problem()
    split = choice.split_kv_config(caps, p)
    if split is not None:
        out.append(("decode Lk32768 D128", split.kernel, f"splitkv, {split.n_split} x {split.split_len} keys"))
    else:  # this device runs the forward kernel there; show the split kernel it would use anyway
        out.append(("decode Lk32768 D128", choice.split_kernel(caps, p), "splitkv (not picked on this device)"))
    return out


def parse_extra(arg: str) -> KernelConfig:
    """``kernel:dk,dv,br,bc,tpr,dtype,wg,stage,rpt`` -> KernelConfig."""
    kernel, sep, nums = arg.partition(":")
    try:
        vals = [int(x, 0) for x in nums.split(",")]
    except ValueError:
        vals = []
    if not sep or not kernel or len(vals) != 9 or min(vals) < 0:
        raise SystemExit(f"bad pipeline {arg!r}: want kernel:dk,dv,br,bc,tpr,dtype,wg,stage,rpt (9 integers)")
    variant = "coopmat" if "coopmat" in kernel else "splitkv" if "splitkv" in kernel else "scalar"
    return KernelConfig(variant, kernel, *vals)


def shared_bytes(cfg: KernelConfig) -> str:
    """Shared memory by the library's formula for the kernel (what it checks against the device)."""
    try:
        if cfg.kernel.startswith("fa2_splitkv"):
            return str(splitkv_shared_bytes(cfg))
        if "coopmat" in cfg.kernel:
            return str(coopmat_shared_bytes(cfg))
        if cfg.kernel == "fa2_fwd":
            return str(cfg.shared_bytes())
    except (AttributeError, ZeroDivisionError, TypeError):
        pass
    return "?"


def run_tool(exe: Path, pipelines: List[Pipeline]) -> Tuple[int, str, Dict[str, Dict[str, str]], List[str]]:
    """Runs the tool over ``pipelines``; returns its exit status, stderr, the statistics of each
    pipeline (by its index, as a string) and the other lines it printed (its "# device=..." line)."""
    lines = []
    for i, (_, cfg, _) in enumerate(pipelines):
        path = spirv_path(cfg.kernel)
        if " " in str(path):
            raise SystemExit(f"the tool takes no spaces in SPIR-V paths: {path}")
        lines.append(f"{i} {path} {' '.join(str(int(c)) for c in cfg.spec())}\n")
    done = subprocess.run([str(exe)], input="".join(lines), capture_output=True, text=True)
    stats: Dict[str, Dict[str, str]] = {}
    comments: List[str] = []
    for line in done.stdout.splitlines():
        words = line.split()
        if words and words[0].isdigit() and int(words[0]) < len(pipelines):
            stats[words[0]] = dict(p.partition("=")[::2] for p in words[1:])
        elif line.strip():  # the tool's own "# device=..." line, or what a layer printed
            comments.append(line[1:].strip() if line.startswith("#") else line)
    return done.returncode, done.stderr.strip(), stats, comments


def cell(value: str) -> str:
    return value.replace("|", "\\|")


def main(argv: List[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    extras = [parse_extra(a) for a in argv]
    with tempfile.TemporaryDirectory(prefix="pipeline_stats.") as tmp:
        exe = build(Path(tmp))
        if exe is None:
            return 0
        pipelines = library_pipelines() + [(f"argv {i + 1}", cfg, cfg.kernel) for i, cfg in enumerate(extras)]
        missing = [cfg.kernel for _, cfg, _ in pipelines if not spirv_path(cfg.kernel).exists()]
        if missing:
            print(f"note: no SPIR-V for {', '.join(sorted(set(missing)))} in {spirv_path('x').parent} "
                  "(python -m aule_kp.vulkan.compile builds it)")
        rc, err, stats, comments = run_tool(exe, pipelines)
    if rc == NO_EXTENSION:
        print(f"note: no pipeline statistics on this device: {err}")
        return 0
    for comment in comments:
        print(comment)
    if rc != 0:
        print(f"note: the tool exited with status {rc}: {err}")
    elif err:
        print(f"tool stderr: {err}")
    print()
    keys: List[str] = []
    for row in stats.values():
        keys += [k for k in row if k not in keys]
    head = ["pipeline", "kernel", SPEC_NAMES, "shared B (formula)", *keys]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for i, (name, cfg, note) in enumerate(pipelines):
        row = stats.get(str(i), {"error": f"no output (tool status {rc})"})
        spec = ",".join(str(int(c)) for c in cfg.spec())
        cells = [f"{name} ({note})", cfg.kernel, spec, shared_bytes(cfg), *(row.get(k, "") for k in keys)]
        print("| " + " | ".join(cell(c) for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
