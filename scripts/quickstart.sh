#!/usr/bin/env bash
# The main job: install what is missing, build, build the default guest image
# and run a command in a fresh sandbox.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-host.sh
scripts/build.sh release
# Everything else a VM needs of this host (seccomp QEMU, /dev/net/tun, user
# namespaces, a default route, the KVM verdict), each with its fix.
./target/release/smolvm doctor
./target/release/smolvm image build debian-12
./target/release/smolvm run -- sh -c 'echo "hello from $(hostname), PID 1 is $(cat /proc/1/comm)"; uname -sr; python3 --version'
