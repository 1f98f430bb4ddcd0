#!/bin/busybox sh
# smolvm initramfs /init: load the virtio modules, mount the root disk and
# hand PID 1 over to the smolvm agent.
#
# Runs on every boot, often under TCG emulation where each fork costs
# milliseconds: prefer shell builtins, batch arguments.
#
# Kernel command line read here:
#   smolvm.probe=1      print SMOLVM-PROBE-OK and power off (accelerator probe)
#   smolvm.root=DEV     root block device (default /dev/vda), ext4

export PATH=/bin:/sbin

/bin/busybox mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
exec </dev/console >/dev/console 2>&1

log() { echo "smolvm-init: $*"; }

fail() {
    echo "smolvm-init: error: $*"
    # Give the UART a moment to drain before the VM goes away.
    usleep 50000
    reboot -f
    exit 1
}

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys

read -r cmdline </proc/cmdline
probe=0
root=/dev/vda
for arg in $cmdline; do
    case "$arg" in
    smolvm.probe=1) probe=1 ;;
    smolvm.root=?*) root="${arg#smolvm.root=}" ;;
    esac
done

log "loading modules"
while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod.ko" || log "warning: cannot load module $mod"
done </modules.order

if [ "$probe" = 1 ]; then
    echo "SMOLVM-PROBE-OK"
    usleep 50000
    reboot -f
    exit 1
fi

n=0
while [ ! -b "$root" ]; do
    n=$((n + 1))
    [ "$n" -le 500 ] || fail "root disk $root did not appear within 5s"
    usleep 10000
done

log "mounting $root"
mount -t ext4 -o rw,noatime "$root" /newroot || fail "cannot mount $root (ext4) on /newroot"
mkdir -p /newroot/run /newroot/dev /newroot/proc /newroot/sys /newroot/tmp ||
    fail "cannot create mount points in the root filesystem"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "cannot mount tmpfs on /run"
mkdir /newroot/run/smolvm || fail "cannot create /run/smolvm"
cp /smolvm-agent /newroot/run/smolvm/smolvm-agent || fail "cannot copy the agent into /run/smolvm"
chmod 0755 /newroot/run/smolvm/smolvm-agent || fail "cannot make the agent executable"
mount --move /dev /newroot/dev || fail "cannot move /dev into the root filesystem"
umount /sys /proc

log "starting agent"
exec switch_root /newroot /run/smolvm/smolvm-agent
