#!/usr/bin/env bash
# Installs what kiln needs on a Debian 12 host and builds the guest assets.
# Idempotent and cached: a second run checks, finds everything current and does nothing.
#
#   KILN_HOME    state directory            (default /var/lib/kiln)
#   KILN_ASSETS  guest assets directory     (default $KILN_HOME/assets)
#   (and the variables scripts/setup-lib.sh reads: apt's directory, os-release, firmware)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
KILN_HOME=${KILN_HOME:-/var/lib/kiln}
assets=${KILN_ASSETS:-$KILN_HOME/assets}
target=x86_64-unknown-linux-gnu
say() { printf 'setup: %s\n' "$*" >&2; }

# --- host packages: QEMU 10 (from backports on Debian 12) and the tools the bake uses ---------
# shellcheck source=scripts/setup-lib.sh
. "$repo/scripts/setup-lib.sh"
codename=$(kiln_codename)
[ -n "$codename" ] || { say "cannot read VERSION_CODENAME from /etc/os-release: kiln needs Debian 12 (bookworm)"; exit 1; }
need_root() {
    [ "$(id -u)" = 0 ] || { say "need root to $1 (run scripts/setup.sh as root)"; exit 1; }
}
export DEBIAN_FRONTEND=noninteractive
mapfile -t qemu_missing < <(kiln_qemu_packages_to_install)
mapfile -t base_missing < <(kiln_base_packages_to_install)
suite=""
if [ ${#qemu_missing[@]} -gt 0 ] || [ ${#base_missing[@]} -gt 0 ]; then
    need_root "install ${qemu_missing[*]} ${base_missing[*]}"
    apt-get update -qq
    suite=$(kiln_qemu_suite "$codename")
    if [ -n "$suite" ] && ! kiln_suite_enabled "$suite"; then
        entry=$(kiln_backports_entry "$codename" "$suite") || {
            say "no apt source for Debian's $codename suite to derive $suite from: add $suite to apt's sources and run again"
            exit 1
        }
        list="${KILN_APT_SOURCES_DIR:-/etc/apt}/sources.list.d/$KILN_BACKPORTS_FILE"
        say "enabling $suite (from this host's own $codename source) in $list"
        printf '%s\n' "$entry" >"$list.tmp"
        mv "$list.tmp" "$list"
        apt-get update -qq
    fi
    if [ ${#qemu_missing[@]} -gt 0 ]; then
        say "installing ${qemu_missing[*]}${suite:+ from $suite}"
        apt-get install -y -qq --no-install-recommends ${suite:+-t "$suite"} "${qemu_missing[@]}" >/dev/null
    fi
    if [ ${#base_missing[@]} -gt 0 ]; then
        say "installing ${base_missing[*]}"
        apt-get install -y -qq --no-install-recommends "${base_missing[@]}" >/dev/null
    fi
fi
# Checked after installing, every run: a tool that is missing, broken or of the wrong version
# stops set-up here with the command that fixes it.
# KILN_HOME holds the API key, keys, the database and every microVM: root's alone.
mkdir -p "$KILN_HOME" && chmod 0700 "$KILN_HOME"
mkdir -p "$assets"
if ! checks=$(kiln_verify "${suite:-$(kiln_qemu_suite "$codename")}"); then
    printf '%s\n' "$checks" | sed -n 's/^fail \([^ ]*\) \(.*\) -- \(.*\)/setup: \1: \2\n       fix: \3/p' >&2
    say "set-up is incomplete: fix the above and run scripts/setup.sh again"
    exit 1
fi
printf '%s\n' "$checks" >"$assets/host-checks.tmp" && mv "$assets/host-checks.tmp" "$assets/host-checks"

mkdir -p "$assets/kernel" "$assets/bases"

# --- guest kernel: Debian's package, vmlinuz + the few modules the guest loads ----------------
if [ ! -s "$assets/kernel/vmlinuz" ] || [ ! -s "$assets/kernel/version" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ && !n++ {print $2}')
    if [ -z "$pkg" ]; then
        apt-get update -qq
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ && !n++ {print $2}')
    fi
    [ -n "$pkg" ] || { say "cannot find Debian's kernel package (linux-image-amd64)"; exit 1; }
    say "fetching guest kernel $pkg"
    (cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1)
    dpkg-deb -x "$work"/"$pkg"_*.deb "$work/x"
    kver=${pkg#linux-image-}
    mods="$work/x/lib/modules/$kver"
    rm -rf "$assets/kernel/modules" && mkdir -p "$assets/kernel/modules"
    while read -r m; do
        f=$(find "$mods" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | sed -n 1p)
        [ -n "$f" ] || { say "kernel $kver has no module $m"; exit 1; }
        case "$f" in
            *.xz) xz -dc "$f" >"$assets/kernel/modules/$m.ko" ;;
            *.zst) zstd -qdc "$f" >"$assets/kernel/modules/$m.ko" ;;
            *) cp "$f" "$assets/kernel/modules/$m.ko" ;;
        esac
    done <"$repo/guest/modules.order"
    cp "$work/x/boot/vmlinuz-$kver" "$assets/kernel/vmlinuz.tmp"
    mv "$assets/kernel/vmlinuz.tmp" "$assets/kernel/vmlinuz"
    echo "$kver" >"$assets/kernel/version"
    rm -rf "$work"
    trap - EXIT
fi

# --- the same kernel uncompressed, for direct PVH boot (kernel/vmlinux; kiln prefers it) -------
if [ ! -s "$assets/kernel/vmlinux" ] || [ "$assets/kernel/vmlinux" -ot "$assets/kernel/vmlinuz" ]; then
    if kiln_extract_pvh "$assets/kernel/vmlinuz" "$assets/kernel/vmlinux"; then
        say "extracted the kernel for direct PVH boot"
    else
        say "the guest kernel has no PVH entry: guests boot the compressed kernel through the firmware"
        rm -f "$assets/kernel/vmlinux"
    fi
fi

# --- the agent: a static binary (no musl target here: glibc with crt-static) ---------------
say "building kiln-agent (static)"
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build -q --release -p kiln-agent -p kiln-testapp --target "$target" --manifest-path "$repo/Cargo.toml"
agent="$repo/target/$target/release/kiln-agent"
if ! kiln_is_static "$agent"; then
    say "kiln-agent is not static"; exit 1
fi

# --- initramfs: busybox + init + modules + agent, rebuilt when any input changes --------------
inputs=$(cat "$agent" /bin/busybox "$repo/guest/init" "$repo/guest/modules.order" "$assets"/kernel/modules/*.ko | sha256sum | cut -c1-16)
if [ "$(cat "$assets/initramfs.key" 2>/dev/null)" != "$inputs" ]; then
    say "building initramfs"
    ir=$(mktemp -d)
    mkdir -p "$ir"/{bin,dev,proc,sys,newroot,lib/kiln-modules}
    cp /bin/busybox "$ir/bin/busybox"
    cp "$repo/guest/init" "$ir/init" && chmod 0755 "$ir/init"
    cp "$assets"/kernel/modules/*.ko "$ir/lib/kiln-modules/"
    cp "$repo/guest/modules.order" "$ir/lib/kiln-modules/order"
    cp "$agent" "$ir/kiln-agent"
    (cd "$ir" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$assets/initramfs.cpio.tmp"
    mv "$assets/initramfs.cpio.tmp" "$assets/initramfs.cpio"
    echo "$inputs" >"$assets/initramfs.key"
    rm -rf "$ir"
fi

# --- busybox base root disk ------------------------------------------------------------------
bbver=$(/bin/busybox --help 2>&1 | sed -n 1p | sha256sum | cut -c1-16)
if [ "$(cat "$assets/bases/busybox.key" 2>/dev/null)" != "$bbver" ]; then
    say "building the busybox base disk"
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,root,home,var/tmp,.kiln}
    chmod 1777 "$root/tmp" "$root/var/tmp"
    chmod 0700 "$root/root"
    cp /bin/busybox "$root/bin/busybox"
    for applet in $(/bin/busybox --list-full); do
        [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' >"$root/etc/group"
    printf 'NAME="kiln busybox"\nID=kiln-busybox\nPRETTY_NAME="kiln busybox base"\n' >"$root/etc/os-release"
    printf '127.0.0.1 localhost kiln\n::1 localhost\n' >"$root/etc/hosts"
    rm -f "$assets/bases/busybox.ext4.tmp"
    mke2fs -q -t ext4 -E root_owner=0:0 -L kiln-busybox -d "$root" "$assets/bases/busybox.ext4.tmp" 64M
    mv "$assets/bases/busybox.ext4.tmp" "$assets/bases/busybox.ext4"
    echo "$bbver" >"$assets/bases/busybox.key"
    rm -rf "$root"
fi
# Shared guest assets are root's and read-only; jails reach them only through read-only binds.
chmod 0444 "$assets/kernel/vmlinuz" "$assets/initramfs.cpio" "$assets"/bases/*.ext4
[ ! -e "$assets/kernel/vmlinux" ] || chmod 0444 "$assets/kernel/vmlinux"
say "guest assets ready in $assets"
