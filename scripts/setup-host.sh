#!/usr/bin/env bash
# Installs the host packages smolvm needs (Debian/Ubuntu). Idempotent.
set -euo pipefail
PKGS=(qemu-system-x86 qemu-utils mmdebstrap debian-archive-keyring busybox-static lz4 cpio e2fsprogs openssh-client uidmap ca-certificates)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup-host: all host packages present"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "setup-host: installing ${missing[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
