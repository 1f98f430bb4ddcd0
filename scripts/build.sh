#!/usr/bin/env bash
# Builds smolvm: the CLI and supervisor (PROFILE=release by default) and the
# static guest agent. Usage: scripts/build.sh [release|dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${1:-release}"
echo "build: guest agent (static)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --profile release-agent \
    --target x86_64-unknown-linux-gnu -p smolvm-agent
echo "build: smolvm CLI and supervisor ($PROFILE)"
if [ "$PROFILE" = "release" ]; then
    cargo build --quiet --release -p smolvm-cli -p smolvm --bins
else
    cargo build --quiet -p smolvm-cli -p smolvm --bins
fi
