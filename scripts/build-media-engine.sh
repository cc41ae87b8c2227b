#!/usr/bin/env bash
# build-media-engine.sh — build the softswitch media engine (a high-capacity pjsua2) and install it.
#
# The PyPI pjsua2 wheels hold 4 or 32 calls per process (ARCHITECTURE.md, "The one hard fact"). This
# script builds pjsua2 from the pjproject tree carried by Debian's `ring` source package, with the
# project's media-engine/config_site.h (1024 calls per process, epoll, no sound, no video), and installs
# the SWIG Python module (built with -threads) into the project's venv as the distribution `pjsua2`.
#
#   1. derive deb-src entries from the system's own apt sources into a private folder (never /etc/apt);
#   2. `apt-get source ring` against that private list (dpkg-source applies Debian's patches);
#   3. configure and build pjproject's libraries, then the SWIG Python module, with the venv's Python;
#   4. pack the module as a wheel in ${SOFTSWITCH_CACHE:-~/.cache/softswitch}/media-engine/<key>/,
#      key = hash(source package version, config_site.h, script version, Python ABI);
#   5. pip-install that wheel into the venv. Later runs find the wheel and only do step 5 (seconds).
#
# Usage: scripts/build-media-engine.sh [options]
#   --fallback        if the Debian source cannot be obtained, install the PyPI wheel
#                     pjsua2-python==2.10.post6 instead (32 calls per process) and say so loudly
#   --fallback-only   install that fallback wheel now, without trying the build
#   --python PATH     interpreter of the target venv (default: <repo>/.venv/bin/python)
#   --stamp FILE      on success, write what was installed into FILE (used by mk/media-engine.mk)
#   --rebuild         ignore a cached build with the same key and build again
#   --keep-work       keep the unpacked sources and build tree (default: removed after a build)
#   --print-deb-src   print the deb-src entries derived from the apt sources, then exit
#   -h, --help        this text
# Environment:
#   SOFTSWITCH_CACHE          cache root (default ~/.cache/softswitch)
#   SOFTSWITCH_APT_ETC        apt configuration folder to read sources from (default /etc/apt; read only)
#   MEDIA_ENGINE_JOBS         parallel compile jobs (default 2; compiles run under `nice -n 19`)
# Exit status: 0 when an engine is installed and imports; non-zero with a message naming the failed step.

set -Eeuo pipefail

# Bump when the build steps change in a way that changes the result: it is part of the cache key.
readonly SCRIPT_VERSION=1
# The source package that carries the pjproject tree, and where its repack keeps it.
readonly SOURCE_PACKAGE=ring
readonly PJPROJECT_GLOB='daemon/contrib/tarballs-unpacked/pjproject-*'
# The fallback when no Debian archive is reachable: the last PyPI build with 32 calls per process
# (2.15.1.post1 holds only 4).
readonly FALLBACK_REQUIREMENT='pjsua2-python==2.10.post6'
readonly FALLBACK_CALLS_PER_PROCESS=32
# The distribution name our wheel installs under; the fallback wheel's name.
readonly DIST_NAME=pjsua2
readonly FALLBACK_DIST_NAME=pjsua2-python
# Build tools and headers installed with apt-get when missing (root only). No sound: no libasound2-dev.
readonly BUILD_DEB_PACKAGES=(build-essential dpkg-dev swig libssl-dev uuid-dev)
# Codecs and features whose third_party sources the Debian repack dropped (or that a switch without
# sound card and video does not need): each is disabled at configure time.
readonly CONFIGURE_FLAGS=(
    --disable-sound --disable-video --enable-epoll
    --disable-speex-aec --disable-speex-codec --disable-gsm-codec --disable-ilbc-codec
    --disable-g7221-codec --disable-opencore-amr --disable-silk --disable-opus --disable-bcg729
    --disable-libyuv --disable-libwebrtc
    --disable-sdl --disable-ffmpeg --disable-v4l2 --disable-openh264 --disable-vpx
    --disable-android-mediacodec
)

# A make that runs this script must not hand its jobserver to the builds below.
unset MAKEFLAGS MFLAGS MAKELEVEL

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly CONFIG_SITE="$REPO_ROOT/media-engine/config_site.h"
readonly CACHE_ROOT="${SOFTSWITCH_CACHE:-${HOME:-/root}/.cache/softswitch}/media-engine"
readonly APT_ETC="${SOFTSWITCH_APT_ETC:-/etc/apt}"
readonly JOBS="${MEDIA_ENGINE_JOBS:-2}"

PYTHON="$REPO_ROOT/.venv/bin/python"
MODE=build
FALLBACK=0
STAMP=""
REBUILD=0
KEEP_WORK=0
STEP="start"
LOG_FILE=""

say() { printf '[media-engine] %s\n' "$*"; }
warn() { printf '[media-engine] WARNING: %s\n' "$*" >&2; }
show_log_tail() {
    if [[ -n "$LOG_FILE" && -s "$LOG_FILE" ]]; then
        printf '[media-engine] last lines of %s:\n' "$LOG_FILE" >&2
        tail -n 25 "$LOG_FILE" | sed 's/^/    /' >&2
    fi
}
die() {
    show_log_tail
    printf '[media-engine] FAILED (%s): %s\n' "$STEP" "$*" >&2
    exit 1
}
on_error() {
    local status=$?
    show_log_tail
    printf '[media-engine] FAILED during step "%s" (exit %s).\n' "$STEP" "$status" >&2
    exit "$status"
}
trap on_error ERR

usage() { sed -n '2,/^# Exit status/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

step() {
    STEP="$1"
    LOG_FILE=""
}

# Run a command with its output appended to a log file (its tail is shown on failure).
logged() {
    LOG_FILE="$1"
    shift
    "$@" >>"$LOG_FILE" 2>&1
}

# The same, in another directory.
logged_in() {
    local dir="$1"
    LOG_FILE="$2"
    shift 2
    (
        trap - ERR
        cd "$dir" && "$@"
    ) >>"$LOG_FILE" 2>&1
}

while (($#)); do
    case "$1" in
    --fallback) FALLBACK=1 ;;
    --fallback-only) MODE=fallback ;;
    --python)
        [[ $# -ge 2 ]] || die "--python needs a path"
        PYTHON="$2"
        shift
        ;;
    --stamp)
        [[ $# -ge 2 ]] || die "--stamp needs a path"
        STAMP="$2"
        shift
        ;;
    --rebuild) REBUILD=1 ;;
    --keep-work) KEEP_WORK=1 ;;
    --print-deb-src) MODE=print-deb-src ;;
    -h | --help)
        usage
        exit 0
        ;;
    *) die "unknown option: $1 (see --help)" ;;
    esac
    shift
done

# Absolute, but not resolved: a venv's python is a symlink to the base interpreter.
[[ "$PYTHON" == /* ]] || PYTHON="$PWD/$PYTHON"
[[ -z "$STAMP" || "$STAMP" == /* ]] || STAMP="$PWD/$STAMP"

# ------------------------------------------------------------------------------------------ apt sources

# Print deb-src entries for every enabled `deb` entry of the system's apt sources: one-line entries of
# sources.list and sources.list.d/*.list as one-line entries, deb822 stanzas of sources.list.d/*.sources
# as stanzas (Types: deb-src; comments and Architectures dropped). Existing deb-src entries are kept,
# duplicates removed. Reads only.
derive_deb_src() {
    python3_for_parsing - "$APT_ETC" <<'PYEOF'
import glob
import os
import sys

apt_etc = sys.argv[1]
one_line: list[str] = []
stanzas: list[str] = []


def add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def one_line_file(path: str) -> None:
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            kind, _, rest = line.partition(" ")
            if kind in ("deb", "deb-src") and rest.strip():
                add(one_line, "deb-src " + " ".join(rest.split()))


def deb822_file(path: str) -> None:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    paragraphs: list[list[str]] = [[]]
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if paragraphs[-1]:
                paragraphs.append([])
            continue
        paragraphs[-1].append(raw.rstrip())
    for lines in paragraphs:
        fields: list[tuple[str, list[str]]] = []
        for line in lines:
            if line[:1] in (" ", "\t") and fields:
                fields[-1][1].append(line)  # continuation (e.g. an inline Signed-By key)
            elif ":" in line:
                key, _, value = line.partition(":")
                fields.append((key.strip(), [value.strip()]))
        values = {k.lower(): v for k, v in fields}
        types = values.get("types", [""])[0].split()
        enabled = values.get("enabled", ["yes"])[0].lower()
        if not ({"deb", "deb-src"} & set(types)) or enabled in ("no", "false", "0"):
            continue
        out = ["Types: deb-src"]
        for key, value in fields:
            if key.lower() in ("types", "architectures", "enabled"):
                continue
            first, *more = value
            out.append(f"{key}: {first}" if first else f"{key}:")
            out.extend(more)
        add(stanzas, "\n".join(out))


main_list = os.path.join(apt_etc, "sources.list")
if os.path.isfile(main_list):
    one_line_file(main_list)
for path in sorted(glob.glob(os.path.join(apt_etc, "sources.list.d", "*.list"))):
    one_line_file(path)
for path in sorted(glob.glob(os.path.join(apt_etc, "sources.list.d", "*.sources"))):
    deb822_file(path)
if not one_line and not stanzas:
    sys.exit(f"no deb or deb-src entries found under {apt_etc}")
print("# one-line entries (for a .list file)")
for line in one_line:
    print(line)
print("# deb822 stanzas (for a .sources file)")
print()
print("\n\n".join(stanzas))
PYEOF
}

# Any Python 3 will do for parsing text; the venv's is always there when the script runs for real.
python3_for_parsing() {
    if [[ -x "$PYTHON" ]]; then
        "$PYTHON" "$@"
    else
        python3 "$@"
    fi
}

# Write the derived entries into DIR/sources/ (softswitch.list + softswitch.sources).
write_private_sources() {
    local dir="$1" derived
    derived="$(derive_deb_src)" || die "cannot derive deb-src entries from $APT_ETC"
    rm -rf "$dir/sources"
    mkdir -p "$dir/sources" "$dir/lists/partial" "$dir/cache/archives/partial"
    awk '/^# deb822/{exit} /^deb-src /{print}' <<<"$derived" >"$dir/sources/softswitch.list"
    awk 'f{print} /^# deb822/{f=1}' <<<"$derived" | sed '/./,$!d' >"$dir/sources/softswitch.sources"
    [[ -s "$dir/sources/softswitch.list" ]] || rm -f "$dir/sources/softswitch.list"
    [[ -s "$dir/sources/softswitch.sources" ]] || rm -f "$dir/sources/softswitch.sources"
}

# apt-get / apt-cache against the private folder only.
private_apt() {
    local tool="$1" dir="$2"
    shift 2
    "$tool" -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$dir/sources" \
        -o Dir::State::Lists="$dir/lists" -o Dir::Cache="$dir/cache" \
        -o APT::Sandbox::User=root "$@"
}

# Highest version of the source package known to the private lists (empty if none).
source_version() {
    local dir="$1" best="" v
    while read -r v; do
        if [[ -z "$best" ]] || dpkg --compare-versions "$v" gt "$best"; then best="$v"; fi
    done < <(
        trap - ERR
        { private_apt apt-cache "$dir" showsrc --only-source "$SOURCE_PACKAGE" 2>/dev/null || true; } |
            awk '/^Version:/{print $2}'
    )
    printf '%s' "$best"
}

# ------------------------------------------------------------------------------------------ helpers

python_abi() {
    "$PYTHON" -c 'import sys, sysconfig; print(sysconfig.get_config_var("SOABI") or "", sysconfig.get_platform(), "%d.%d" % sys.version_info[:2])'
}

sha256_of_text() { sha256sum | cut -c1-16; }

pip_in_venv() { "$PYTHON" -m pip --disable-pip-version-check "$@"; }

is_installed() { pip_in_venv show "$1" >/dev/null 2>&1; }

ensure_build_deps() {
    step "build dependencies"
    local missing=() pkg
    for pkg in "${BUILD_DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        if [[ "$(id -u)" == 0 ]]; then
            say "installing build dependencies with apt-get: ${missing[*]}"
            LOG_FILE="$WORK/logs/apt-install.log"
            if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
                >>"$LOG_FILE" 2>&1; then
                say "apt-get install failed; running apt-get update once and retrying"
                logged "$WORK/logs/apt-install.log" apt-get update
                logged "$WORK/logs/apt-install.log" env DEBIAN_FRONTEND=noninteractive \
                    apt-get install -y --no-install-recommends "${missing[@]}"
            fi
        else
            for pkg in "${missing[@]}"; do
                [[ "$pkg" == swig ]] && continue # PyPI's swig below works without root
                die "missing build dependency '$pkg' and not root: run 'sudo apt-get install ${missing[*]}'"
            done
        fi
    fi
    if ! command -v swig >/dev/null 2>&1; then
        # Not root and no Debian swig: PyPI's swig, in a tools venv of its own (not the project's).
        say "no swig on PATH: installing PyPI's swig into $WORK/tools"
        logged "$WORK/logs/swig-tools.log" "$PYTHON" -m venv --without-pip "$WORK/tools"
        logged "$WORK/logs/swig-tools.log" pip_in_venv --python "$WORK/tools/bin/python" install swig
        [[ -x "$WORK/tools/bin/swig" ]] || die "PyPI's swig did not install a swig command"
        PATH="$WORK/tools/bin:$PATH"
    fi
    swig -version >/dev/null 2>&1 || die "swig does not run"
    local include
    include="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    if [[ ! -f "$include/Python.h" ]]; then
        if [[ "$(id -u)" == 0 ]]; then
            say "no Python.h in $include: installing python3-dev"
            logged "$WORK/logs/apt-install.log" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y --no-install-recommends python3-dev
        fi
        [[ -f "$include/Python.h" ]] || die "no Python.h for $PYTHON (looked in $include): install its headers"
    fi
}

# The pjproject tree inside the unpacked source package: a folder (the repack's
# tarballs-unpacked/pjproject-<rev>.tar.gz/pjproject-<rev>/) or, in other versions, a tarball.
locate_pjproject() {
    local src="$1" candidate inner
    for candidate in $src/$PJPROJECT_GLOB; do
        [[ -e "$candidate" ]] || continue
        if [[ -f "$candidate" ]]; then
            mkdir -p "$WORK/unpacked"
            tar -xf "$candidate" -C "$WORK/unpacked"
            candidate="$WORK/unpacked"
        fi
        for inner in "$candidate" "$candidate"/pjproject*; do
            if [[ -f "$inner/configure" && -d "$inner/pjlib" && -d "$inner/pjsip-apps/src/swig/python" ]]; then
                printf '%s' "$inner"
                return 0
            fi
        done
    done
    return 1
}

# Pack the built module as a wheel: DIST_NAME, version <pjproject>+softswitch.<key>.
pack_wheel() {
    local build_lib="$1" out_dir="$2" version="$3" info_json="$4"
    "$PYTHON" - "$build_lib" "$out_dir" "$version" "$info_json" "$DIST_NAME" <<'PYEOF'
import base64
import hashlib
import pathlib
import sys
import sysconfig
import zipfile

build_lib, out_dir, version, info_json, name = sys.argv[1:6]
files = sorted(pathlib.Path(build_lib).glob("_pjsua2*.so")) + [pathlib.Path(build_lib) / "pjsua2.py"]
if len(files) != 2 or not all(f.is_file() for f in files):
    sys.exit(f"expected _pjsua2*.so and pjsua2.py in {build_lib}, found {[str(f) for f in files]}")
py = f"cp{sys.version_info.major}{sys.version_info.minor}"
abi = py + (sys.abiflags or "")
plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
tag = f"{py}-{abi}-{plat}"
dist_info = f"{name}-{version}.dist-info"
members = {f.name: f.read_bytes() for f in files}
members[f"{dist_info}/METADATA"] = (
    "Metadata-Version: 2.1\n"
    f"Name: {name}\n"
    f"Version: {version}\n"
    "Summary: pjsua2 (PJSIP) Python module, high-capacity build of the softswitch media engine\n"
    "License: GPL-2.0-or-later\n"
).encode()
members[f"{dist_info}/WHEEL"] = (
    f"Wheel-Version: 1.0\nGenerator: softswitch build-media-engine\nRoot-Is-Purelib: false\nTag: {tag}\n"
).encode()
members[f"{dist_info}/softswitch-media-engine.json"] = pathlib.Path(info_json).read_bytes()
record = []
for path, data in members.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{path},sha256={digest},{len(data)}")
record.append(f"{dist_info}/RECORD,,")
members[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
wheel = pathlib.Path(out_dir) / f"{name}-{version}-{tag}.whl"
with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for path, data in members.items():
        info = zipfile.ZipInfo(path, date_time=(2023, 2, 6, 0, 0, 0))
        info.external_attr = (0o755 if path.endswith(".so") else 0o644) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, data)
print(wheel)
PYEOF
}

# Import the installed module from outside the repo and print what it is.
verify_import() {
    (cd / && "$PYTHON" - <<'PYEOF'
import pjsua2 as pj

print(f"pjsua2 {pj.Endpoint().libVersion().full} from {pj.__file__}; "
      f"UaConfig().maxCalls default {pj.UaConfig().maxCalls} (= PJSUA_MAX_CALLS from 2.12 on)")
PYEOF
    )
}

write_stamp() {
    [[ -n "$STAMP" ]] || return 0
    mkdir -p "$(dirname "$STAMP")"
    printf '%s\n' "$@" >"$STAMP"
}

# ------------------------------------------------------------------------------------------ modes

install_fallback() {
    step "fallback install"
    cat >&2 <<EOF
[media-engine] ************************************************************************************
[media-engine] FALLBACK ENGINE: installing the PyPI wheel $FALLBACK_REQUIREMENT.
[media-engine] CAPACITY IS $FALLBACK_CALLS_PER_PROCESS CALLS PER PROCESS (about 16 bridged conversations per worker),
[media-engine] not 1024. The softswitch runs more worker processes to make up for it.
[media-engine] Build the real engine with 'make media-engine' once a Debian archive is reachable.
[media-engine] ************************************************************************************
EOF
    if is_installed "$DIST_NAME"; then
        say "removing the installed high-capacity $DIST_NAME first (same module names)"
        pip_in_venv uninstall -y "$DIST_NAME" >/dev/null
    fi
    pip_in_venv install "$FALLBACK_REQUIREMENT" || die "pip could not install $FALLBACK_REQUIREMENT"
    step "verify"
    verify_import || die "the fallback wheel does not import"
    write_stamp "engine=fallback" "requirement=$FALLBACK_REQUIREMENT" \
        "calls_per_process=$FALLBACK_CALLS_PER_PROCESS" "python=$PYTHON"
    say "installed the FALLBACK engine ($FALLBACK_CALLS_PER_PROCESS calls per process)"
}

install_wheel() {
    local wheel="$1"
    step "install"
    if is_installed "$FALLBACK_DIST_NAME"; then
        say "removing the fallback wheel $FALLBACK_DIST_NAME (same module names)"
        pip_in_venv uninstall -y "$FALLBACK_DIST_NAME" >/dev/null
    fi
    say "installing $(basename "$wheel") into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    pip_in_venv install --no-deps --no-index --force-reinstall --quiet "$wheel"
    step "verify"
    verify_import || die "the installed module does not import"
}

# Newest cached build made from the same config, script and Python, whatever the source version.
# Used when the archive is unreachable but an earlier build exists.
find_cached_any_source() {
    local config_hash="$1" abi="$2" info best=""
    for info in "$CACHE_ROOT"/*/build-info.txt; do
        [[ -f "$info" ]] || continue
        grep -qx "config_sha256=$config_hash" "$info" || continue
        grep -qx "script_version=$SCRIPT_VERSION" "$info" || continue
        grep -qx "python_abi=$abi" "$info" || continue
        if [[ -z "$best" || "$info" -nt "$best" ]]; then best="$info"; fi
    done
    [[ -n "$best" ]] || return 1
    dirname "$best"
}

fallback_or_die() {
    if ((FALLBACK)); then
        warn "$1"
        install_fallback
        exit 0
    fi
    die "$1 (rerun with --fallback to install the 32-call PyPI wheel instead)"
}

build_and_install() {
    [[ -x "$PYTHON" ]] || die "no Python at $PYTHON: create the venv first (make venv) or pass --python"
    [[ -f "$CONFIG_SITE" ]] || die "missing $CONFIG_SITE"
    command -v apt-get >/dev/null || fallback_or_die "no apt-get on this system: cannot fetch the Debian source"
    mkdir -p "$CACHE_ROOT"
    exec 9>"$CACHE_ROOT/.lock"
    if ! flock -n 9; then
        say "another build holds $CACHE_ROOT/.lock: waiting for it"
        flock 9 || die "cannot lock $CACHE_ROOT/.lock"
    fi

    WORK="$CACHE_ROOT/work"
    mkdir -p "$WORK/logs"
    local apt_dir="$WORK/apt" abi config_hash version key entry
    abi="$(python_abi)"
    config_hash="$(sha256sum "$CONFIG_SITE" | cut -d' ' -f1)"

    step "private apt sources"
    say "deriving deb-src entries from $APT_ETC into $apt_dir/sources (system apt configuration untouched)"
    write_private_sources "$apt_dir"
    step "apt-get update (private lists)"
    say "apt-get update on the private list"
    : >"$WORK/logs/apt-update.log"
    if ! logged "$WORK/logs/apt-update.log" private_apt apt-get "$apt_dir" update; then
        warn "apt-get update reported errors (see $WORK/logs/apt-update.log); using the lists it got"
    fi
    version="$(source_version "$apt_dir")"
    if [[ -z "$version" ]]; then
        if entry="$(find_cached_any_source "$config_hash" "$abi")" && ((!REBUILD)); then
            warn "no Debian archive answered; reinstalling the cached build in $entry"
            install_wheel "$(ls "$entry"/*.whl)"
            write_stamp "engine=high-capacity" "$(cat "$entry/build-info.txt")"
            return 0
        fi
        fallback_or_die "source package '$SOURCE_PACKAGE' not found via the system's apt sources"
    fi
    key="$(printf 'source=%s\nconfig=%s\nscript=%s\npython=%s\n' "$version" "$config_hash" \
        "$SCRIPT_VERSION" "$abi" | sha256_of_text)"
    entry="$CACHE_ROOT/$key"
    say "source $SOURCE_PACKAGE $version, config_site.h ${config_hash:0:12}, script v$SCRIPT_VERSION, python $abi"
    say "cache key $key ($entry)"

    if [[ -f "$entry/build-info.txt" ]] && ls "$entry"/*.whl >/dev/null 2>&1 && ((!REBUILD)); then
        say "cached build found: installing it (no compile)"
        install_wheel "$(ls "$entry"/*.whl)"
        write_stamp "engine=high-capacity" "$(cat "$entry/build-info.txt")"
        say "done: high-capacity engine installed from the cache"
        return 0
    fi

    local started=$SECONDS
    ensure_build_deps

    step "apt-get source"
    rm -rf "$WORK/src" "$WORK/unpacked" "$WORK/build"
    mkdir -p "$WORK/src"
    say "apt-get source $SOURCE_PACKAGE=$version (downloads ~30 MB, applies Debian's patches)"
    : >"$WORK/logs/apt-source.log"
    if ! logged_in "$WORK/src" "$WORK/logs/apt-source.log" \
        private_apt apt-get "$apt_dir" source --only-source "$SOURCE_PACKAGE=$version"; then
        fallback_or_die "apt-get source $SOURCE_PACKAGE=$version failed (log: $WORK/logs/apt-source.log)"
    fi
    local src_dir tree
    src_dir="$(find "$WORK/src" -mindepth 1 -maxdepth 1 -type d | head -n 1)"
    [[ -n "$src_dir" ]] || die "apt-get source left no unpacked folder in $WORK/src"
    step "locate pjproject"
    tree="$(locate_pjproject "$src_dir")" || die "no pjproject tree at $src_dir/$PJPROJECT_GLOB"
    say "pjproject tree: $tree"
    local pj_version
    pj_version="$(awk -F':= *' '/PJ_VERSION_MAJOR *:=/{a=$2} /PJ_VERSION_MINOR *:=/{b=$2} /PJ_VERSION_REV *:=/{c=$2} END{printf "%s.%s%s", a, b, (c==""?"":"." c)}' "$tree/version.mak")"
    say "pjproject version $pj_version"

    step "configure"
    local build="$WORK/build/pjproject"
    mkdir -p "$WORK/build"
    cp -a "$tree" "$build"
    cp "$CONFIG_SITE" "$build/pjlib/include/pj/config_site.h"
    say "configure ${CONFIGURE_FLAGS[*]} CFLAGS='-O2 -fPIC'"
    : >"$WORK/logs/configure.log"
    logged_in "$build" "$WORK/logs/configure.log" nice -n 19 ./configure "${CONFIGURE_FLAGS[@]}" \
        CFLAGS="-O2 -fPIC" CXXFLAGS="-O2 -fPIC"
    grep -q 'ioqueue backend... /dev/epoll' "$WORK/logs/configure.log" ||
        die "configure did not select the epoll ioqueue (see $WORK/logs/configure.log)"

    step "make lib"
    say "building the libraries (nice -n 19 make -j$JOBS lib; about a minute on 2 cores)"
    : >"$WORK/logs/make-lib.log"
    logged_in "$build" "$WORK/logs/make-lib.log" nice -n 19 make -j"$JOBS" lib

    step "swig python module"
    local swig_dir="$build/pjsip-apps/src/swig/python"
    # The 2.12.1 Makefile ships `#USE_THREADS = -threads ...` commented out: without it, the module
    # holds the GIL in every call and a callback from a library thread aborts the process.
    if grep -q '^#USE_THREADS *=' "$swig_dir/Makefile"; then
        sed -i 's/^#USE_THREADS *=/USE_THREADS =/' "$swig_dir/Makefile"
        say "patched $swig_dir/Makefile: SWIG runs with -threads"
    fi
    grep -q '^USE_THREADS *=.*-threads' "$swig_dir/Makefile" ||
        die "cannot enable SWIG -threads in $swig_dir/Makefile"
    say "building the SWIG Python module with $PYTHON (one large C++ file: 2-3 minutes)"
    : >"$WORK/logs/make-swig.log"
    logged_in "$swig_dir" "$WORK/logs/make-swig.log" nice -n 19 make PYTHON_EXE="$PYTHON"
    grep -q '^#define SWIG_PYTHON_THREADS' "$swig_dir/pjsua2_wrap.cpp" ||
        die "pjsua2_wrap.cpp was generated without thread support"
    local build_lib
    build_lib="$(dirname "$(find "$swig_dir/build" -name '_pjsua2*.so' | head -n 1)")"
    [[ -d "$build_lib" && "$build_lib" != . ]] || die "no _pjsua2*.so under $swig_dir/build"

    step "cache"
    local seconds=$((SECONDS - started)) tmp="$entry.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    {
        echo "source_package=$SOURCE_PACKAGE"
        echo "source_version=$version"
        echo "pjproject_version=$pj_version"
        echo "pjproject_tree=${tree#"$WORK/src/"}"
        echo "config_sha256=$config_hash"
        echo "script_version=$SCRIPT_VERSION"
        echo "python_abi=$abi"
        echo "configure_flags=${CONFIGURE_FLAGS[*]}"
        echo "swig=$(swig -version | awk '/SWIG Version/{print $3}') -threads"
        echo "build_seconds=$seconds"
        echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "key=$key"
    } >"$tmp/build-info.txt"
    cp "$CONFIG_SITE" "$tmp/config_site.h"
    "$PYTHON" -c 'import json, sys; print(json.dumps(dict(l.rstrip("\n").split("=", 1) for l in open(sys.argv[1])), indent=1))' \
        "$tmp/build-info.txt" >"$tmp/build-info.json"
    local wheel
    wheel="$(pack_wheel "$build_lib" "$tmp" "$pj_version+softswitch.$key" "$tmp/build-info.json")"
    rm -rf "$entry"
    mv "$tmp" "$entry"
    wheel="$entry/$(basename "$wheel")"
    say "built in ${seconds}s; cached $wheel"
    if ((!KEEP_WORK)); then
        rm -rf "$WORK/src" "$WORK/unpacked" "$WORK/build" "$WORK/tools"
    fi

    install_wheel "$wheel"
    write_stamp "engine=high-capacity" "$(cat "$entry/build-info.txt")"
    say "done: high-capacity engine built and installed"
}

case "$MODE" in
print-deb-src)
    step "derive deb-src"
    derive_deb_src
    ;;
fallback)
    [[ -x "$PYTHON" ]] || die "no Python at $PYTHON"
    install_fallback
    ;;
build) build_and_install ;;
esac
