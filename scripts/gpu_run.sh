#!/usr/bin/env bash
# The whole lent-GPU run in one command (run there from the repo root, with .device and spirv_cache
# carried; see scripts/gpu_fetch.sh): Vulkan loader, the patched kp (scripts/kp_build.py), the test-suite
# (including the variants lavapipe cannot run), and the GPU benchmark. Results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/aule-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
for f in .device/debs/*.deb; do dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
# The patched kp: scripts/kp_build.py, the build every install uses, as aule_kp/_kp (cached under build/).
t0=$(date +%s)
python3 scripts/kp_build.py --into aule_kp > "$OUT/kp_build.log" 2>&1 || { tail -40 "$OUT/kp_build.log"; exit 1; }
echo "kp ready in $(( $(date +%s) - t0 )) s"
# The CPU backend's native kernels (scripts/cpu_build.py, a few seconds): the CPU rows of the benchmarks need them.
python3 scripts/cpu_build.py --into aule_kp > "$OUT/cpu_build.log" 2>&1 || tail -20 "$OUT/cpu_build.log"
export AULE_KP_SPIRV_CACHE=$PWD/spirv_cache
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -m aule_kp info | tee "$OUT/info.txt"
# STEPS picks what runs after the set-up (default: everything), e.g. STEPS="gemm host" .
STEPS=" ${STEPS:-tests bench backward host decode gemm coopmat2 tune triton} "  # also: splitkv (a tile sweep), ab, cmd
step() { [[ "$STEPS" == *" $1 "* ]]; }
if step tests; then
  timeout ${TESTS_S:-900} python3 -m pytest -q -p no:cacheprovider $(ls tests/test_{vulkan,gpu,coopmat2,vulkan_backward,splitkv,host_io}.py 2>/dev/null) \
    "$@" 2>&1 | tail -25 | tee "$OUT/tests.txt"
fi
step bench && python3 -m aule_kp bench --preset gpu --vs --backends ${BACKENDS:-vulkan,triton,torch,aule-attention} \
  --repeat ${REPEAT:-10} --markdown "$OUT/bench.md" 2>&1 | tail -40
# A/B of a shader change: kernels AB_KERNELS of other revisions or variants (compiled by
# scripts/spirv_at.sh into AB_DIRS, a comma list) against this tree's, in one process, in alternation.
step ab && python3 benchmarks/ab_gpu.py ${AB_DIRS:-.device/spirv_ab} ${AB_KERNELS:-fa2_fwd_coopmat} 2>&1 | tee "$OUT/ab.md"
step backward && python3 benchmarks/vulkan_backward_gpu.py 2>&1 | tee "$OUT/backward.md"
step host && python3 benchmarks/host_path_gpu.py 2>&1 | tee "$OUT/host_path.md"
step decode && python3 benchmarks/decode_gpu.py 2>&1 | tee "$OUT/decode.md"
step splitkv && python3 benchmarks/splitkv_sweep_gpu.py 2>&1 | tee "$OUT/splitkv.md"
step gemm && python3 benchmarks/coopmat_gemm_gpu.py 2>&1 | tee "$OUT/gemm.md"
# NV cooperative matrix 2: its GEMM ceiling and the cm2 forward (SPIR-V prebuilt by glslang >= 15.2).
step coopmat2 && python3 benchmarks/coopmat2_gpu.py ${CM2_ARGS:-} 2>&1 | tee "$OUT/coopmat2.md"
step tune && timeout ${TUNE_S:-300} python3 -m aule_kp tune --cache-dir "$OUT/tune" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.md"
step triton && python3 benchmarks/triton_vs_aule_gpu.py 2>&1 | tee "$OUT/triton_vs_aule.md"
# Anything else, in this set-up: STEPS=cmd GPU_CMD='python3 -m aule_kp tune ...'
step cmd && eval "${GPU_CMD:?STEPS=cmd needs GPU_CMD}"
exit 0
