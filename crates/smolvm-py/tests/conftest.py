"""Shared fixtures of the smolvm Python SDK's tests.

Every test boots real VMs (QEMU; under TCG a boot takes 3-4 s), so:

- the whole run gets its own, fresh ``SMOLVM_DATA_DIR`` (the image cache,
  ``SMOLVM_CACHE_DIR`` or its default, stays as the environment has it, so
  the guest image is not rebuilt); at the end every VM still in
  ``SmolVM.list()`` is deleted and the directory removed;
- tests that only run commands share one running VM (``running_vm``); tests
  that change a VM's state (pause, stop, delete) make their own with
  ``make_vm``, which deletes them when the test ends, whatever happened.

No test is ever skipped: what cannot run fails, saying why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

# The repository root: crates/smolvm-py/tests/conftest.py -> ../../..
REPO_ROOT = Path(__file__).resolve().parents[3]

_saved_data_dir = None
_data_dir = None


def pytest_configure(config):
    """Points SMOLVM_DATA_DIR at a fresh private directory before any test
    module imports smolvm (and so before anything could read it): this
    process, the subprocesses the tests start and the CLI all use it."""
    global _saved_data_dir, _data_dir
    _saved_data_dir = os.environ.get("SMOLVM_DATA_DIR")
    # mkdtemp makes it 0700. A short prefix keeps the VMs' unix socket paths
    # well under the 108-byte limit.
    _data_dir = tempfile.mkdtemp(prefix="smolvm-py-")
    os.chmod(_data_dir, 0o700)
    os.environ["SMOLVM_DATA_DIR"] = _data_dir


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that failed on a boot shows the guest console's last lines
    (the VM itself is usually deleted by then): flaky boots stay
    diagnosable from the CI log."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None:
        return
    import smolvm

    err = call.excinfo.value
    tail = getattr(err, "console_tail", None) if isinstance(err, smolvm.BootError) else None
    if tail:
        report.sections.append(("guest console, last lines", smolvm.escape_text(tail)))


def pytest_unconfigure(config):
    if _saved_data_dir is None:
        os.environ.pop("SMOLVM_DATA_DIR", None)
    else:
        os.environ["SMOLVM_DATA_DIR"] = _saved_data_dir


def _delete_if_there(vm_id: str) -> None:
    from smolvm import SmolVM
    from smolvm.exceptions import VMNotFoundError

    try:
        vm = SmolVM.from_id(vm_id)
    except VMNotFoundError:
        return
    try:
        vm.delete()
    except VMNotFoundError:
        pass


@pytest.fixture(scope="session", autouse=True)
def isolated_data_dir():
    """The run's private data dir; at the end, deletes every VM left in it
    (a failure to delete one is a teardown error: a leaked VM keeps QEMU
    running) and removes the directory."""
    assert _data_dir is not None and os.environ.get("SMOLVM_DATA_DIR") == _data_dir, (
        "SMOLVM_DATA_DIR was changed during the run"
    )
    yield Path(_data_dir)
    from smolvm import SmolVM

    failures = []
    for info in SmolVM.list():
        try:
            _delete_if_there(info.vm_id)
        except Exception as e:  # noqa: BLE001 - report every one, then fail
            failures.append(f"{info.vm_id}: {type(e).__name__}: {e}")
    left = [i.vm_id for i in SmolVM.list()]
    if not failures and not left:
        shutil.rmtree(_data_dir, ignore_errors=True)
    assert not failures and not left, (
        f"could not delete the VMs left at the end of the run (data dir kept: {_data_dir}): "
        f"{failures or left}"
    )


@pytest.fixture(scope="session")
def running_vm(isolated_data_dir):
    """One started VM shared by the tests that only run commands in it.

    A test that pauses, stops or deletes a VM must make its own."""
    from smolvm import SmolVM, VMState

    vm = SmolVM()
    try:
        vm.start()
        assert vm.status == VMState.RUNNING
        yield vm
    finally:
        _delete_if_there(vm.vm_id)


@pytest.fixture
def make_vm():
    """``make_vm(**kwargs)`` is ``SmolVM(**kwargs)``, deleted when the test
    ends. ``make_vm.track(vm_id)`` adds a VM made some other way (from_id, the
    CLI, another process) to the ones deleted."""
    from smolvm import SmolVM

    made = []

    def make(**kwargs):
        vm = SmolVM(**kwargs)
        made.append(vm.vm_id)
        return vm

    make.track = made.append
    yield make
    errors = []
    for vm_id in made:
        try:
            _delete_if_there(vm_id)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{vm_id}: {type(e).__name__}: {e}")
    assert not errors, f"could not delete the test's VMs: {errors}"


@pytest.fixture
def vm_ids():
    """``vm_ids()``: the ids of every VM in the inventory, now."""
    from smolvm import SmolVM

    return lambda: {info.vm_id for info in SmolVM.list()}


@pytest.fixture
def new_name():
    """``new_name(prefix)``: a VM name no other test uses."""
    return lambda prefix="t": f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def smolvm_cli():
    """The `smolvm` CLI binary: $SMOLVM_CLI, else the cargo build's."""
    candidates = []
    if os.environ.get("SMOLVM_CLI"):
        candidates.append(Path(os.environ["SMOLVM_CLI"]))
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO_ROOT / "target")
        candidates.append(target / "debug" / "smolvm")
        candidates.append(target / "release" / "smolvm")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    pytest.fail(
        f"the smolvm CLI is not built (looked at {', '.join(map(str, candidates))}); "
        "run `cargo build -p smolvm-cli` or set SMOLVM_CLI to the binary"
    )
