# shellcheck shell=bash
# The decisions of scripts/setup.sh, as functions: which apt suite, which packages, and whether
# every tool kiln needs is there and runs. setup.sh sources this file and so does the test of
# these decisions (crates/kiln-testkit/tests/setup_script.rs), with fake dpkg-query, apt-cache
# and tools on PATH. Nothing here changes the host: the functions only read and print.
#
#   KILN_APT_SOURCES_DIR  where apt's source files are   (default /etc/apt)
#   KILN_OS_RELEASE       the os-release file            (default /etc/os-release)
#   KILN_QEMU_FIRMWARE    the microvm firmware           (default /usr/share/qemu/qboot.rom)
#   KILN_BUSYBOX          the static busybox             (default /bin/busybox)

# The QEMU kiln drives: this upstream major version, from the packages below.
KILN_QEMU_MAJOR=10
KILN_QEMU_PACKAGES=(qemu-system-x86 qemu-utils qemu-system-data)
# Everything else, from the host's default suites: package name = what provides the tool.
KILN_BASE_PACKAGES=(e2fsprogs busybox-static cpio mmdebstrap dpkg xz-utils zstd iproute2 python3-venv)
# The file the backports entry is written to (by setup.sh, never by these functions).
KILN_BACKPORTS_FILE=kiln-backports.sources

kiln_codename() {
    local f=${KILN_OS_RELEASE:-/etc/os-release}
    sed -n 's/^VERSION_CODENAME=//p' "$f" 2>/dev/null | tr -d '"' | sed -n 1p
}

# The apt suite QEMU comes from: `<codename>-backports` where the default suite's QEMU is
# older than KILN_QEMU_MAJOR (Debian 12), empty where the default suite has it already.
kiln_qemu_suite() {
    local codename=$1 candidate
    candidate=$(kiln_candidate_version qemu-system-x86 "")
    if [ -n "$candidate" ] && [ "$(kiln_upstream_major "$candidate")" -ge "$KILN_QEMU_MAJOR" ] 2>/dev/null; then
        return 0
    fi
    printf '%s-backports\n' "$codename"
}

# "1:10.0.2+ds-2+deb13u1~bpo12+1" -> "10.0.2"; "10.0.2" -> "10.0.2".
kiln_upstream_version() {
    local v=${1#*:}
    v=${v%%[+~-]*}
    printf '%s\n' "$v"
}

kiln_upstream_major() {
    local v
    v=$(kiln_upstream_version "$1")
    printf '%s\n' "${v%%.*}"
}

# The version apt would install for package $1 from suite $2 (empty: the default), or nothing.
kiln_candidate_version() {
    local pkg=$1 suite=$2
    if [ -z "$suite" ]; then
        { apt-cache policy "$pkg" 2>/dev/null || true; } |
            awk '$1 == "Candidate:" && $2 != "(none)" { print $2; exit }'
    else
        { apt-cache policy "$pkg" 2>/dev/null || true; } | awk -v s="$suite/" '
            /^ +(\*\*\* )?[0-9]/ { sub(/^ +(\*\*\* )?/, ""); v = $1 }
            index($0, s) && v != "" { print v; exit }'
    fi
}

# The installed version of a package, or nothing.
kiln_installed_version() {
    { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null || true; } |
        awk '$1 == "install" && $2 == "ok" && $3 == "installed" { print $4 }'
}

# Does an apt source already name suite $1? (one-line sources.list and deb822 .sources files)
kiln_suite_enabled() {
    local suite=$1 dir=${KILN_APT_SOURCES_DIR:-/etc/apt} f
    for f in "$dir/sources.list" "$dir"/sources.list.d/*.list "$dir"/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        case "$f" in
            *.sources)
                awk -v s="$suite" 'tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == s) found = 1 }
                    END { exit !found }' "$f" && return 0 ;;
            *)
                awk -v s="$suite" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i == s) found = 1 }
                    END { exit !found }' "$f" && return 0 ;;
        esac
    done
    return 1
}

# A deb822 entry for suite $2 built from the host's own entry for Debian's main suite $1: the
# same URIs, components and signing key. It reads the existing sources and never names a
# mirror itself. Prints nothing (and fails) when no such entry exists.
kiln_backports_entry() {
    local codename=$1 suite=$2 dir=${KILN_APT_SOURCES_DIR:-/etc/apt} f
    for f in "$dir"/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v c="$codename" -v s="$suite" '
            function flush() {
                if (has && uris != "" && !done) {
                    print "Types: deb"; print "URIs: " uris; print "Suites: " s
                    print "Components: " (comps == "" ? "main" : comps)
                    if (key != "") print "Signed-By: " key
                    done = 1
                }
                has = 0; uris = ""; comps = ""; key = ""; deb = 0
            }
            /^[ \t]*$/ { flush(); next }
            /^#/ { next }
            tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
            tolower($1) == "uris:" { $1 = ""; uris = substr($0, 2) }
            tolower($1) == "components:" { $1 = ""; comps = substr($0, 2) }
            tolower($1) == "signed-by:" { $1 = ""; key = substr($0, 2) }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == c) has = 1 }
            END { if (!deb) has = 0; flush(); exit !done }' "$f" && return 0
    done
    for f in "$dir/sources.list" "$dir"/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v c="$codename" -v s="$suite" '
            $1 == "deb" {
                i = 2; opts = ""
                if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) { opts = opts " " $i; i++ } opts = opts " " $i; i++ }
                if ($(i + 1) != c) next
                comps = ""; for (j = i + 2; j <= NF; j++) comps = comps (comps == "" ? "" : " ") $j
                key = ""; if (match(opts, /signed-by=[^] ]+/)) key = substr(opts, RSTART + 10, RLENGTH - 10)
                print "Types: deb"; print "URIs: " $i; print "Suites: " s
                print "Components: " (comps == "" ? "main" : comps)
                if (key != "") print "Signed-By: " key
                found = 1; exit
            }
            END { exit !found }' "$f" && return 0
    done
    return 1
}

# QEMU packages to install (all of them, so they end up at one version) or nothing when every
# one is installed at the same version of the supported major.
kiln_qemu_packages_to_install() {
    local p v first="" need=0
    for p in "${KILN_QEMU_PACKAGES[@]}"; do
        v=$(kiln_installed_version "$p")
        if [ -z "$v" ] || [ "$(kiln_upstream_major "$v")" != "$KILN_QEMU_MAJOR" ]; then
            need=1
        elif [ -z "$first" ]; then
            first=$v
        elif [ "$v" != "$first" ]; then
            need=1
        fi
    done
    [ "$need" = 0 ] || printf '%s\n' "${KILN_QEMU_PACKAGES[@]}"
}

kiln_base_packages_to_install() {
    local p
    for p in "${KILN_BASE_PACKAGES[@]}"; do
        [ -n "$(kiln_installed_version "$p")" ] || printf '%s\n' "$p"
    done
}

# --- checks after installing ------------------------------------------------------------------
# Each check prints "ok NAME DETAIL" or "fail NAME PROBLEM -- FIX"; kiln_verify runs them all.

kiln_fix_qemu() {
    local suite=$1
    printf 'apt-get install -y %s%s' "${suite:+-t $suite }" "${KILN_QEMU_PACKAGES[*]}"
}

kiln_tool_version() {
    { "$1" --version 2>/dev/null || true; } | sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p' | sed -n 1p
}

kiln_check_qemu() {
    local suite=$1 sys img fix
    fix=$(kiln_fix_qemu "$suite")
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
        echo "fail qemu-system-x86_64 not installed -- $fix"; return
    fi
    if ! command -v qemu-img >/dev/null 2>&1; then
        echo "fail qemu-img not installed -- $fix"; return
    fi
    sys=$(kiln_tool_version qemu-system-x86_64)
    img=$(kiln_tool_version qemu-img)
    if [ -z "$sys" ]; then
        echo "fail qemu-system-x86_64 does not run ('qemu-system-x86_64 --version' printed no version) -- $fix"
    elif [ "${sys%%.*}" != "$KILN_QEMU_MAJOR" ]; then
        echo "fail qemu-system-x86_64 is version $sys; kiln needs $KILN_QEMU_MAJOR.x -- $fix"
    elif [ "$img" != "$sys" ]; then
        echo "fail qemu-img is version ${img:-unknown}, qemu-system-x86_64 is $sys; they must be the same -- $fix"
    else
        echo "ok qemu-system-x86_64 $sys"
        echo "ok qemu-img $img"
    fi
}

kiln_check_firmware() {
    local suite=$1 fw=${KILN_QEMU_FIRMWARE:-/usr/share/qemu/qboot.rom}
    if [ -s "$fw" ]; then
        echo "ok firmware $fw"
    else
        echo "fail firmware $fw (qboot) is missing -- $(kiln_fix_qemu "$suite")"
    fi
}

# kiln_check_tool NAME PACKAGE COMMAND...: the command must run and succeed.
kiln_check_tool() {
    local name=$1 pkg=$2
    shift 2
    if ! command -v "$name" >/dev/null 2>&1; then
        echo "fail $name not installed -- apt-get install -y $pkg"
    elif ! "$@" >/dev/null 2>&1; then
        echo "fail $name does not run ('$*' failed) -- apt-get install --reinstall -y $pkg"
    else
        echo "ok $name $(command -v "$name")"
    fi
}

# Is $1 a static executable? (ldd fails on one, so its status is not the answer.)
kiln_is_static() {
    local out
    out=$(ldd "$1" 2>&1 || true)
    case "$out" in
        *"statically linked"* | *"not a dynamic"*) return 0 ;;
        *) return 1 ;;
    esac
}

kiln_check_busybox() {
    local bb=${KILN_BUSYBOX:-/bin/busybox}
    if [ ! -x "$bb" ]; then
        echo "fail busybox $bb is missing -- apt-get install -y busybox-static"
    elif ! "$bb" true >/dev/null 2>&1; then
        echo "fail busybox $bb does not run -- apt-get install --reinstall -y busybox-static"
    elif ! kiln_is_static "$bb"; then
        echo "fail busybox $bb is not statically linked (the guest has no libc for it) -- apt-get install -y busybox-static"
    else
        echo "ok busybox $bb (static)"
    fi
}

kiln_check_venv() {
    if ! command -v python3 >/dev/null 2>&1; then
        echo "fail python3 not installed -- apt-get install -y python3 python3-venv"
    elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        echo "fail python3-venv 'python3 -m venv' cannot work (no venv/ensurepip module) -- apt-get install -y python3-venv"
    else
        echo "ok python3-venv $(python3 --version 2>&1)"
    fi
}

# Runs every check; prints one line per check. Fails when any check failed.
kiln_verify() {
    local suite=$1 out
    out=$(
        kiln_check_qemu "$suite"
        kiln_check_firmware "$suite"
        kiln_check_tool mke2fs e2fsprogs mke2fs -V
        kiln_check_busybox
        kiln_check_tool cpio cpio cpio --version
        kiln_check_tool mmdebstrap mmdebstrap mmdebstrap --version
        kiln_check_tool dpkg-deb dpkg dpkg-deb --version
        kiln_check_tool xz xz-utils xz --version
        kiln_check_tool zstd zstd zstd --version
        kiln_check_tool ip iproute2 ip -V
        kiln_check_venv
    )
    printf '%s\n' "$out"
    case "$out" in
        fail\ * | *$'\n'fail\ *) return 1 ;;
    esac
}

# --- direct PVH boot ------------------------------------------------------------------------
# Extracts the uncompressed kernel from a bzImage ($1) to $2 when it is an ELF with a PVH
# entry note (XEN_ELFNOTE_PHYS32_ENTRY): QEMU then starts it directly, without the firmware
# decompressing it under emulation (measured: a cold boot in 4.1 s instead of 7.4 s under
# TCG). Fails, writing nothing, when the image holds no such kernel.
kiln_extract_pvh() {
    python3 - "$1" "$2" <<'PY'
import gzip, lzma, struct, sys

def pvh_elf(data):
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False

def candidates(blob):
    for magic, open_ in ((b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor().decompress(b)),
                         (b"\x1f\x8b\x08", lambda b: gzip.decompress(b))):
        at = blob.find(magic)
        while at >= 0:
            try:
                yield open_(blob[at:])
            except Exception:
                pass
            at = blob.find(magic, at + 1)

src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    blob = f.read()
for data in candidates(blob):
    if pvh_elf(data):
        with open(dst + ".tmp", "wb") as out:
            out.write(data)
        import os
        os.rename(dst + ".tmp", dst)
        sys.exit(0)
sys.exit(1)
PY
}
