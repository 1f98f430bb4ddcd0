#!/usr/bin/env bash
# The whole test suite: lint, unit tests and end-to-end tests that boot real
# VMs (the first run builds the guest image, ~1-2 minutes), then the Python
# SDK's tests against its wheel (real VMs too).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-host.sh
scripts/build.sh dev
./target/debug/smolvm doctor
echo "test: cargo fmt --check"
cargo fmt --all --check
echo "test: cargo clippy"
cargo clippy --quiet --workspace --all-targets -- -D warnings
echo "test: cargo test"
cargo test --workspace --no-fail-fast
echo "test: Python SDK"
wheel="$(scripts/python-sdk.sh)"
SMOLVM_WHEEL="$wheel" SMOLVM_CLI="$PWD/target/debug/smolvm" \
    .venv/bin/python -m pytest crates/smolvm-py/tests -q -p no:cacheprovider
