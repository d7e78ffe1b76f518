#!/usr/bin/env bash
# Compiles the GLSL kernels of git revision $1 (default HEAD; `worktree`: the files as they are now)
# into ${2:-.device/spirv_ab}, with any further arguments passed to glslangValidator (-DNAME=VALUE
# to compile a variant), so that a GPU run can time them against the working tree's
# (scripts/gpu_run.sh, STEPS=ab: A/B of a shader change on the same machine in the same run).
set -euo pipefail
rev=${1:-HEAD}; dest=${2:-.device/spirv_ab}; shift $(( $# < 2 ? $# : 2 ))
src=$(mktemp -d); trap 'rm -rf "$src"' EXIT
if [ "$rev" = worktree ]; then cp -r glsl "$src/"; else git archive "$rev" glsl | tar -x -C "$src"; fi
mkdir -p "$dest" && rm -f "$dest"/*.spv
for f in "$src"/glsl/*.comp; do
  .venv/bin/glslangValidator -V --target-env vulkan1.3 -I"$src/glsl" "$@" "$f" -o "$dest/$(basename "${f%.comp}").spv" >/dev/null
done
[ "$rev" = worktree ] && at=worktree || at="$rev ($(git rev-parse --short "$rev"))"
echo "$at${*:+ $*} -> $dest: $(ls "$dest" | wc -l) kernels"
