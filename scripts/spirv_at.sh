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
# Kernels that need glslang >= 15.2 (compile.NEWER_GLSLANG; glsl/glslang15/) go through scripts/glslang15.sh.
for f in "$src"/glsl/*.comp "$src"/glsl/glslang15/*.comp; do
  [ -e "$f" ] || continue
  if grep -qE 'GL_EXT_integer_dot_product|GL_NV_cooperative_matrix2' "$f"; then cc="./scripts/glslang15.sh";
  else cc=".venv/bin/glslangValidator"; fi
  $cc -V --target-env vulkan1.3 -I"$src/glsl" "$@" "$f" -o "$dest/$(basename "${f%.comp}").spv" >/dev/null
done
[ "$rev" = worktree ] && at=worktree || at="$rev ($(git rev-parse --short "$rev"))"
echo "$at${*:+ $*} -> $dest: $(ls "$dest" | wc -l) kernels"
