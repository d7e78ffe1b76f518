#!/usr/bin/env bash
# Run on the development machine before a lent-GPU run: gathers into .device/ (git-ignored) what the
# bare GPU machine cannot download: the Vulkan loader + glvnd debs, the -dev debs kp builds against,
# and wheels for its Python 3.12: the pure-Python `vulkan` binding, cffi, and pybind11 for scripts/kp_build.py
# (kp's sdist: the tracked third_party/ one).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device/debs .device/whl /tmp/amd64/partial
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
[ -n "$(ls .device/debs/*.deb 2>/dev/null)" ] || {
  apt-get $o update -q
  (cd .device/debs && apt-get $o download libvulkan1 libvulkan-dev libfmt9 libfmt-dev \
     libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
}
[ -n "$(ls .device/whl/*.whl 2>/dev/null)" ] || python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .device/whl vulkan==1.3.275.1 cffi pycparser aule-attention==0.5.0
[ -n "$(ls .device/whl/pybind11-*.whl 2>/dev/null)" ] || python3 -m pip download -q --no-deps --only-binary=:all: \
  -d .device/whl pybind11==2.13.6
.venv/bin/python -m aule_kp.vulkan.compile --quiet
du -sh .device spirv_cache
