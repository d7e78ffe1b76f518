#!/usr/bin/env bash
# Sets up everything aule-kp needs, idempotently: system packages, .venv, the patched kp,
# the shader compiler, the compiled SPIR-V, and the Python dependencies for tests and benchmarks.
# Re-running it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv
# The runtime (Vulkan loader + lavapipe), the Khronos validation layer for the tests, the venv, and what
# scripts/kp_build.py (the one build of the patched kp, shared with setup.py and the wheel) needs.
APT_PACKAGES="mesa-vulkan-drivers vulkan-validationlayers make python3-venv $("$PYTHON" scripts/kp_build.py --debian-packages)"

say() { printf '[setup] %s\n' "$*"; }

# 1. System packages.
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

# 4. The patched kp, as aule_kp/_kp<suffix> in the tree (git-ignored): the same build, and the same
#    cache under build/kp-private/, as the wheel's. A re-run only checks the inputs' hash.
python scripts/kp_build.py --into aule_kp >/dev/null
#    The CPU backend's native kernel, one library per vector width in aule_kp/cpu/lib/ (cached under build/cpu-native/).
python scripts/cpu_build.py --into aule_kp >/dev/null

# 5. The package itself (editable, for the `aule-kp` console script).
if ! python -c 'import aule_kp' 2>/dev/null || [ ! -x "$VENV/bin/aule-kp" ]; then
  $PIP install --no-build-isolation --no-deps -e .
fi

# 6. Shaders: every variant compiled to spirv_cache/ and checked with spirv-val.
python -m aule_kp.vulkan.compile --quiet
say "ready: $VENV"
