#!/usr/bin/env bash
# Builds the Python SDK's wheel into target/wheels (the supervisor and the
# static guest agent inside it) and installs it, with pytest, into .venv.
# Prints the wheel's path on stdout (everything else on stderr).
set -euo pipefail
umask 022  # the wheel's binaries must not be group-writable (the library refuses those)
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "python-sdk: creating .venv with $("$PY" --version)" >&2
    "$PY" -m venv .venv
fi
rm -f target/wheels/smolvm_sdk-*.whl
echo "python-sdk: building the wheel (release build; the first one takes minutes)" >&2
.venv/bin/python -m pip wheel -q --no-deps -w target/wheels ./crates/smolvm-py >&2
wheel="$(ls target/wheels/smolvm_sdk-*.whl)"
.venv/bin/python -m pip install -q --force-reinstall --no-deps "$wheel" >&2
.venv/bin/python -m pip install -q "pytest>=7" >&2
.venv/bin/python -c 'import smolvm; print("python-sdk: smolvm", smolvm.__version__, "from", smolvm.__file__)' >&2
echo "$wheel"
