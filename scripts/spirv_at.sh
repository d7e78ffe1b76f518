#!/usr/bin/env bash
# Compiles the GLSL kernels of git revision $1 (default HEAD) into ${2:-.device/spirv_ab}, so that a
# GPU run can time them against the working tree's (scripts/gpu_run.sh, STEPS=ab: A/B of a shader
# change on the same machine in the same run).
set -euo pipefail
rev=${1:-HEAD}; dest=${2:-.device/spirv_ab}
src=$(mktemp -d); trap 'rm -rf "$src"' EXIT
git archive "$rev" glsl | tar -x -C "$src"
mkdir -p "$dest"
for f in "$src"/glsl/*.comp; do
  .venv/bin/glslangValidator -V --target-env vulkan1.3 -I"$src/glsl" "$f" -o "$dest/$(basename "${f%.comp}").spv" >/dev/null
done
echo "$rev ($(git rev-parse --short "$rev")) -> $dest: $(ls "$dest" | wc -l) kernels"
