"""PEP 517 backend of smolvm-sdk: maturin, after building the companion
binaries the wheel carries.

The extension module runs VMs through two programs of its own: the per-VM
supervisor (a daemon that outlives the Python process) and the static guest
agent (PID 1 in the guest, packed into the image's initramfs). Both are
built here from the same workspace, copied into ``python/smolvm/_bin`` and
packed by maturin with the package, so an installed wheel needs nothing
else from the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import maturin

HERE = Path(__file__).resolve().parent.parent
WORKSPACE = HERE.parent.parent
BIN = HERE / "python" / "smolvm" / "_bin"
AGENT_TARGET = "x86_64-unknown-linux-gnu"


def _cargo(args: list[str], env: dict[str, str]) -> None:
    cargo = os.environ.get("CARGO", "cargo")
    if shutil.which(cargo) is None:
        sys.exit(
            "smolvm-sdk builds from source and needs Rust's cargo on PATH "
            "(https://rustup.rs, or your distribution's cargo package)"
        )
    print(f"smolvm-sdk: {cargo} {' '.join(args)}", file=sys.stderr, flush=True)
    subprocess.run([cargo, *args], cwd=WORKSPACE, env=env, check=True)


def _companions() -> None:
    env = dict(os.environ)
    target = Path(env.get("CARGO_TARGET_DIR") or WORKSPACE / "target")
    # The agent is PID 1 of a guest with no libc of ours: linked statically.
    _cargo(
        ["build", "--profile", "release-agent", "--target", AGENT_TARGET, "-p", "smolvm-agent"],
        dict(env, RUSTFLAGS="-C target-feature=+crt-static"),
    )
    _cargo(["build", "--release", "-p", "smolvm", "--bin", "smolvm-supervisor"], env)
    BIN.mkdir(exist_ok=True)
    for src, name in (
        (target / AGENT_TARGET / "release-agent" / "smolvm-agent", "smolvm-agent"),
        (target / "release" / "smolvm-supervisor", "smolvm-supervisor"),
    ):
        dest = BIN / name
        tmp = dest.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _companions()
    return maturin.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _companions()
    return maturin.build_editable(wheel_directory, config_settings, metadata_directory)


get_requires_for_build_wheel = maturin.get_requires_for_build_wheel
prepare_metadata_for_build_wheel = maturin.prepare_metadata_for_build_wheel


def build_sdist(sdist_directory, config_settings=None):
    # The wheel is built from the whole smolvm workspace (the agent and the
    # supervisor are crates beside this one): an sdist of this directory
    # alone could not build it.
    raise RuntimeError(
        "smolvm-sdk has no source distribution: build or install it from the smolvm "
        "repository (pip install ./crates/smolvm-py, or pip wheel ./crates/smolvm-py)"
    )
# Hooks that only some maturin versions have: defined only when present.
for _hook in ("get_requires_for_build_editable", "prepare_metadata_for_build_editable"):
    if hasattr(maturin, _hook):
        globals()[_hook] = getattr(maturin, _hook)
