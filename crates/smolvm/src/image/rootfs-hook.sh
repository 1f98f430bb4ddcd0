#!/bin/sh
# mmdebstrap --customize-hook for smolvm root filesystems. $1 is the chroot.
#
# Runs inside mmdebstrap (as root, or as namespace-root in unshare mode) so
# the ownership mkfs.ext4 sees is the guest's. It trims the tree, then makes
# the ext4 image itself: mmdebstrap's own cleanup runs after this hook, so
# that cleanup is done here too.
#
# Environment (set by smolvm):
#   SMOLVM_EXT4         output ext4 image path
#   SMOLVM_DPKG_STATUS  where to copy /var/lib/dpkg/status
#   SMOLVM_VIEW         mount point (created here) for a private bind mount of the tree
#   SMOLVM_MKFS         mkfs.ext4 path
#   SMOLVM_UNSHARE      unshare path
#   SMOLVM_LABEL        filesystem label
set -eu

root="$1"

step() { echo "smolvm-step: $*"; }

# Per-VM identity and configuration are set at boot by the agent.
rm -f "$root/etc/hostname" "$root/etc/resolv.conf" "$root/etc/hosts" "$root/etc/fstab"
: >"$root/etc/resolv.conf"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
: >"$root/etc/fstab"
# Every VM gets its own SSH host keys (generated at first boot).
rm -f "$root"/etc/ssh/ssh_host_*
mkdir -p "$root/run" "$root/tmp" "$root/dev" "$root/proc" "$root/sys" "$root/root"
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"
# A sandbox is disposable: `pip install` into the system Python is what
# agents try first, so the distribution's "externally managed" guard is off
# (venvs work too).
printf '[global]\nbreak-system-packages = true\n' >"$root/etc/pip.conf"

# What mmdebstrap's cleanup would do, so the image does not carry it.
# (Package lists go, apt's lock file and partial/ directory stay.)
find "$root/var/lib/apt/lists" -maxdepth 1 -type f ! -name lock -delete
rm -f "$root"/var/cache/apt/*.bin
find "$root/var/cache/apt/archives" -maxdepth 1 -type f -name '*.deb' -delete
rm -f "$root/var/log/dpkg.log" "$root/var/log/apt/history.log" "$root/var/log/apt/term.log" \
    "$root/var/log/alternatives.log" "$root/var/cache/ldconfig/aux-cache" \
    "$root/var/log/apt/eipp.log.xz" "$root/var/lib/dbus/machine-id"
if [ -e "$root/etc/machine-id" ]; then
    rm -f "$root/etc/machine-id"
    : >"$root/etc/machine-id"
fi

cp "$root/var/lib/dpkg/status" "$SMOLVM_DPKG_STATUS"

# mmdebstrap still needs its temporary apt configuration and its files in
# /tmp and /run after this hook (its cleanup removes them later), but the
# image must not carry them: move them aside while mkfs runs.
mkdir -p "$SMOLVM_VIEW"
stash=$(mktemp -d "${root%/}.smolvm-stash.XXXXXX" 2>/dev/null || mktemp -d "$SMOLVM_VIEW.stash.XXXXXX")
mkdir "$stash/tmp" "$stash/run" "$stash/apt"
aptconf="$root/etc/apt/apt.conf.d/00mmdebstrap"
restore() {
    find "$stash/tmp" -mindepth 1 -maxdepth 1 -exec mv {} "$root/tmp/" \;
    find "$stash/run" -mindepth 1 -maxdepth 1 -exec mv {} "$root/run/" \;
    if [ -e "$stash/apt/00mmdebstrap" ]; then mv "$stash/apt/00mmdebstrap" "$aptconf"; fi
    rm -rf "$stash"
}
trap restore EXIT
find "$root/tmp" -mindepth 1 -maxdepth 1 -exec mv {} "$stash/tmp/" \;
find "$root/run" -mindepth 1 -maxdepth 1 ! -name lock -exec mv {} "$stash/run/" \;
if [ -e "$aptconf" ]; then mv "$aptconf" "$stash/apt/"; fi

used_kib=$(du -skx "$root" | cut -f1)
size_mib=$((used_kib * 5 / 4 / 1024 + 256))
step "making ext4 (${size_mib} MiB)"
# /proc, /sys and /dev are mounted in the chroot while hooks run; a
# non-recursive bind mount in a private mount namespace shows the tree
# without them.
"$SMOLVM_UNSHARE" --mount --propagation private -- sh -eu -c '
    mount --bind "$1" "$2"
    rm -f "$3"
    "$4" -F -q -b 4096 -i 8192 -L "$5" -E root_owner=0:0 -d "$2" "$3" "$6M"
' sh "$root" "$SMOLVM_VIEW" "$SMOLVM_EXT4" "$SMOLVM_MKFS" "$SMOLVM_LABEL" "$size_mib"
