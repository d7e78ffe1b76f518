#!/usr/bin/env bash
# Compiles the GLSL kernels of two revisions (default: HEAD and the working tree; see spirv_at.sh)
# and lists which SPIR-V files differ. Exit status 1 when any does: a refactoring that must not
# change the shaders shows here, so the GPU issue knows what to re-time.
set -euo pipefail
cd "$(dirname "$0")/.."
a=${1:-HEAD}; b=${2:-worktree}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
./scripts/spirv_at.sh "$a" "$tmp/a" >/dev/null
./scripts/spirv_at.sh "$b" "$tmp/b" >/dev/null
status=0
for f in $(ls "$tmp/a" "$tmp/b" | grep '\.spv$' | sort -u); do
  if ! cmp -s "$tmp/a/$f" "$tmp/b/$f" 2>/dev/null; then echo "differs: $f"; status=1; else echo "same:    $f"; fi
done
exit $status
