#!/usr/bin/env bash
# `make sanitize`: the CPU kernels (aule_kp/cpu/csrc/) built with AddressSanitizer and UndefinedBehaviorSanitizer
# (GCC) into a temporary directory, and their tests run against those builds: any out-of-bounds access, use of
# freed memory or undefined arithmetic stops the run with a report. The installed libraries are left untouched:
# tests/conftest.py points aule_kp.cpu.native.LIB_DIR at CPU_SANITIZED_LIBS when that is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for width in $("$PY" -c 'import sys; sys.path.insert(0, "scripts"); import cpu_build; print(*cpu_build.variants())'); do
  flags=$("$PY" -c "import sys; sys.path.insert(0, 'scripts'); import cpu_build; print(*cpu_build.variants()[$width])")
  # shellcheck disable=SC2086
  g++ -O1 -g -std=c++17 -fno-exceptions -fno-rtti -ffp-contract=fast -fPIC -shared -pthread \
      -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined $flags \
      -DAULE_W="$width" aule_kp/cpu/csrc/fa2_forward.cpp aule_kp/cpu/csrc/fa2_backward.cpp \
      -o "$out/libaule_fa2_w$width.so"
done
ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
CPU_SANITIZED_LIBS="$out" \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_cpu_native.py tests/test_cpu_backend.py tests/test_cpu_backward.py
