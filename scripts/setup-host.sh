#!/usr/bin/env bash
# Installs the host packages smolvm needs (Debian/Ubuntu) and then verifies
# that every tool runs. Idempotent.
#
# QEMU's system emulator and qemu-utils must come from the same source
# package at the same version: a machine may already carry a newer
# qemu-utils (a backport) whose `Breaks: qemu-system-common (<< 8.0)` makes
# apt *remove* it when only qemu-system-x86 is asked for. So the QEMU
# packages are always installed together, pinned to the emulator's
# candidate version (downgrading qemu-utils when needed, upgrading the
# emulator when the archive has moved on).
export LC_ALL=C
set -euo pipefail

PKGS=(mmdebstrap debian-archive-keyring busybox-static lz4 cpio e2fsprogs
      openssh-client uidmap ca-certificates passt util-linux iproute2 nftables)
QEMU_PKGS=(qemu-system-x86 qemu-utils)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

installed_version() {
    dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null |
        awk '$1=="install" && $3=="installed" {print $4}' || true
}

missing=()
for p in "${PKGS[@]}"; do
    [ -n "$(installed_version "$p")" ] || missing+=("$p")
done

# The Python SDK is built and used in a virtualenv: python3 (3.9 or newer)
# with venv and ensurepip (Debian splits those into python3-venv).
py_ok() { python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; }
py_ok || missing+=(python3 python3-venv)

# The QEMU set is consistent when both are installed at one version.
qemu_sys="$(installed_version qemu-system-x86)"
qemu_utils="$(installed_version qemu-utils)"
qemu_ok=0
[ -n "$qemu_sys" ] && [ "$qemu_sys" = "$qemu_utils" ] && qemu_ok=1

if [ ${#missing[@]} -gt 0 ] || [ $qemu_ok -eq 0 ]; then
    echo "setup-host: updating the package lists"
    $SUDO apt-get update -q
    install=("${missing[@]}")
    if [ $qemu_ok -eq 0 ]; then
        want="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')"
        if [ -z "$want" ] || [ "$want" = "(none)" ]; then
            echo "setup-host: no installable qemu-system-x86 in the configured apt sources" >&2
            exit 1
        fi
        for p in "${QEMU_PKGS[@]}"; do install+=("$p=$want"); done
        echo "setup-host: QEMU packages pinned to $want (qemu-utils was ${qemu_utils:-absent})"
    fi
    echo "setup-host: installing ${install[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        --allow-downgrades "${install[@]}"
fi

# Verify: every tool smolvm runs must be present and start. The same list
# as `smolvm doctor` (crates/smolvm/src/hosttools.rs).
fail=0
check() { # name package command...
    local name="$1" pkg="$2"; shift 2
    if ! command -v "$name" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$name" ] && [ ! -x "/sbin/$name" ]; then
        echo "setup-host: MISSING $name — install it with: ${SUDO:+sudo }apt-get install $pkg" >&2
        fail=1
    elif ! "$@" >/dev/null 2>&1; then
        echo "setup-host: BROKEN $name — \`$*\` failed; reinstall with: ${SUDO:+sudo }apt-get install --reinstall $pkg" >&2
        fail=1
    fi
}
export PATH="$PATH:/usr/sbin:/sbin"
check qemu-system-x86_64 qemu-system-x86 qemu-system-x86_64 --version
check qemu-img qemu-utils qemu-img --version
check mmdebstrap mmdebstrap mmdebstrap --version
check busybox busybox-static busybox true
check lz4 lz4 lz4 --version
check cpio cpio cpio --version
check mkfs.ext4 e2fsprogs mkfs.ext4 -V
check unshare util-linux unshare --version
check newuidmap uidmap test -x "$(command -v newuidmap || echo /nonexistent)"
check passt passt passt --version
check pasta passt pasta --version
check ip iproute2 ip -V
check nft nftables nft --version
check ssh openssh-client ssh -V
check ssh-keygen openssh-client test -x "$(command -v ssh-keygen || echo /nonexistent)"
check python3 python3-venv py_ok
if [ $fail -ne 0 ]; then
    echo "setup-host: host set-up is incomplete (see above)" >&2
    exit 1
fi
echo "setup-host: all host tools present and working (qemu $(installed_version qemu-system-x86))"
