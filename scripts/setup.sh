#!/usr/bin/env bash
# Sets up everything aule-kp needs, idempotently: system packages, .venv, the patched kp,
# the shader compiler, the compiled SPIR-V, and the Python dependencies for tests and benchmarks.
# Re-running it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv
KP_VERSION=0.9.0
PATCH=$ROOT/patches/kp-$KP_VERSION-aule.patch
APT_PACKAGES="libvulkan-dev mesa-vulkan-drivers vulkan-validationlayers libfmt-dev pybind11-dev cmake g++ make python3-venv python3-dev"

say() { printf '[setup] %s\n' "$*"; }

# 1. System packages (Vulkan loader + lavapipe, the Khronos validation layer for the tests, kp's build
#    dependencies).
missing=()
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing system packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  else
    echo "aule-kp needs these system packages; run as root:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

# 2. The virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
PIP="python -m pip --disable-pip-version-check -q"

# 3. Python dependencies (stamped by the hash of the requirement files).
req_hash=$(cat requirements*.txt | sha256sum | cut -c1-16)
if [ ! -f "$VENV/.aule-reqs-$req_hash" ]; then
  say "installing Python dependencies"
  $PIP install -r requirements-dev.txt
  rm -f "$VENV"/.aule-reqs-*
  touch "$VENV/.aule-reqs-$req_hash"
fi

# 4. kp, built from its sdist with our patch (features enabled + one fence per sequence).
patch_id=$(sha256sum "$PATCH" | cut -c1-16)
if [ "$(python -c 'import kp; print(getattr(kp, "aule_patch_id", ""))' 2>/dev/null)" != "$patch_id" ]; then
  say "building kp $KP_VERSION with $(basename "$PATCH") (takes a few minutes)"
  build=$ROOT/build/kp
  rm -rf "$build" && mkdir -p "$build"
  tar -xzf "$ROOT/third_party/kp-$KP_VERSION.tar.gz" -C "$build"  # the sdist setup.py builds the wheel's kp from
  src=$build/kp-$KP_VERSION
  patch -d "$src" -p1 < "$PATCH"
  # The binding reports which patch it was built with, so re-runs can skip the build.
  sed -i "s/m.attr(\"aule_patch\") = \([0-9]*\);/m.attr(\"aule_patch\") = \1;\n    m.attr(\"aule_patch_id\") = \"$patch_id\";/" "$src/python/src/main.cpp"
  # Kompute reads its options from the environment; setup.py drops PYTHON_EXECUTABLE unless a venv is active.
  KOMPUTE_OPT_USE_BUILT_IN_VULKAN_HEADER=OFF KOMPUTE_OPT_USE_BUILT_IN_FMT=OFF \
  KOMPUTE_OPT_USE_BUILT_IN_PYBIND11=OFF KOMPUTE_OPT_INSTALL=OFF \
  CMAKE_PREFIX_PATH="${CMAKE_PREFIX_PATH:-}${CMAKE_PREFIX_PATH:+:}$(python -m pybind11 --cmakedir 2>/dev/null || true)" \
  CXXFLAGS="${CXXFLAGS:-} -DKOMPUTE_VK_API_MINOR_VERSION=3" \
    $PIP install --no-build-isolation --no-deps "$src"
  python -c 'import kp; assert kp.aule_patch_id' >/dev/null
fi

# 5. The package itself (editable, for the `aule-kp` console script).
if ! python -c 'import aule_kp' 2>/dev/null || [ ! -x "$VENV/bin/aule-kp" ]; then
  $PIP install --no-build-isolation --no-deps -e .
fi

# 6. Shaders: every variant compiled to spirv_cache/ and checked with spirv-val.
python -m aule_kp.vulkan.compile --quiet
say "ready: $VENV"
