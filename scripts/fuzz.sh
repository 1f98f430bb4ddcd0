#!/usr/bin/env bash
# Fuzzes the wire protocol (crates/smolvm-proto/fuzz): every target for N
# seconds (default 60), one after another, each from its kept corpus.
# Usage: scripts/fuzz.sh [SECONDS]. Not run by CI. Needs the nightly
# toolchain and cargo-fuzz. A crash stops nothing: the other targets still
# run, the crashing input is saved under fuzz/artifacts/<target>/, and the
# script exits non-zero. New inputs are added to fuzz/corpus/<target>/;
# minimise before committing them: cargo +nightly fuzz cmin <target>.
set -uo pipefail
cd "$(dirname "$0")/../crates/smolvm-proto/fuzz"
SECONDS_EACH="${1:-60}"
case "$SECONDS_EACH" in
    '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS]" >&2; exit 2 ;;
esac
TARGETS=(frames_guest frames_host messages)

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: the nightly toolchain is missing; install it with:" >&2
    echo "    rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is missing; install it with:" >&2
    echo "    cargo install cargo-fuzz" >&2
    exit 1
fi

failed=()
for t in "${TARGETS[@]}"; do
    echo "fuzz: $t for ${SECONDS_EACH}s"
    mkdir -p "corpus/$t"
    if ! cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$SECONDS_EACH"; then
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (inputs under crates/smolvm-proto/fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: all targets ran ${SECONDS_EACH}s without a failure"
