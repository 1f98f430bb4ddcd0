"""Snapshots through the SDK: take one of a running VM, restore it into a
new VM or back into its source (also after the source was deleted), fork
a VM, disk snapshots of a stopped VM, listing and deleting, and the errors
of each from real causes.

One VM is booted for the module (``source``) and one more by the disk
snapshot test; every other VM is a restore (well under a second). Every VM
and snapshot made here is deleted at the end of the module whatever
happened, and most as soon as their test ends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import time
import uuid
from types import SimpleNamespace

import pytest

from smolvm import SmolVM, VMState
from smolvm.exceptions import (
    HostError,
    InvalidStateError,
    SmolVMError,
    SnapshotAlreadyExistsError,
    SnapshotError,
    SnapshotNotFoundError,
    ValidationError,
    VMAlreadyExistsError,
    VMNotFoundError,
)
from smolvm.types import SnapshotInfo, SnapshotType

# A counter that lives in guest memory only (tmpfs), ticking ten times a
# second while the VM runs.
COUNTER = "i=1000; while :; do echo $i > /dev/shm/n; i=$((i+1)); sleep 0.1; done"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sh(vm: SmolVM, cmd: str) -> str:
    r = vm.run(cmd, shell="raw")
    assert r.ok, f"{cmd!r} in {vm.vm_id}: exit {r.exit_code}: {r.stderr}"
    return r.output


def has(vm: SmolVM, path: str) -> bool:
    return vm.run(f"test -e {path}", shell="raw").exit_code == 0


class Made:
    """The VMs and snapshots a test (or the module) made: ``clean()``
    deletes every one that is still there, and fails if one cannot be."""

    def __init__(self) -> None:
        self.vms: list = []
        self.snaps: list = []

    def vm(self, vm: SmolVM) -> SmolVM:
        self.vms.append(vm.vm_id)
        return vm

    def vm_id(self, vm_id: str) -> str:
        self.vms.append(vm_id)
        return vm_id

    def snap(self, info: SnapshotInfo) -> SnapshotInfo:
        self.snaps.append(info.snapshot_id)
        return info

    def snap_id(self, snapshot_id: str) -> str:
        self.snaps.append(snapshot_id)
        return snapshot_id

    def clean(self) -> None:
        errors = []
        for vm_id in self.vms:
            try:
                SmolVM.from_id(vm_id).delete()
            except VMNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001 - report every one
                errors.append(f"VM {vm_id}: {type(e).__name__}: {e}")
        for sid in self.snaps:
            try:
                SmolVM.delete_snapshot(sid)
            except SnapshotNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001
                errors.append(f"snapshot {sid}: {type(e).__name__}: {e}")
        self.vms, self.snaps = [], []
        assert not errors, f"could not clean up: {errors}"


@pytest.fixture(scope="module")
def module_made(isolated_data_dir):
    m = Made()
    yield m
    m.clean()


@pytest.fixture
def made(module_made):
    """Per test: what it made is deleted when it ends."""
    m = Made()
    yield m
    try:
        m.clean()
    finally:
        # Whatever could not be deleted now is retried at the module's end.
        module_made.vms += m.vms
        module_made.snaps += m.snaps


@pytest.fixture(scope="module")
def source(module_made):
    """A running VM with a memory-only counter ticking and ``/root/before``
    written, snapshotted (left paused by the snapshot), then resumed and
    ``/root/after`` written."""
    vm = module_made.vm(SmolVM(name=uid("snapsrc"), memory=256, cold=True))
    vm.start()
    vm.spawn(COUNTER, shell="raw")
    sh(vm, "echo before > /root/before && sync")
    deadline = time.monotonic() + 30
    while not has(vm, "/dev/shm/n"):
        assert time.monotonic() < deadline, "the counter never started"
        time.sleep(0.1)
    n_before = int(sh(vm, "cat /dev/shm/n"))
    t0 = time.time()
    snap = module_made.snap(vm.snapshot(uid("s")))
    state_after = vm.status
    vm.resume()
    sh(vm, "echo after > /root/after && sync")
    return SimpleNamespace(vm=vm, snap=snap, n_before=n_before, state_after=state_after, taken_at=t0)


def test_snapshot_pauses_the_source_and_describes_itself(source):
    assert source.state_after == VMState.PAUSED, "resume_source=False did not leave the source paused"
    s = source.snap
    assert isinstance(s, SnapshotInfo)
    assert s.vm_id == source.vm.vm_id
    assert s.snapshot_type == SnapshotType.FULL
    assert (s.memory_mib, s.vcpus, s.image) == (256, 1, "debian-12")
    assert isinstance(s.created_at, dt.datetime)
    assert abs(s.created_at.timestamp() - source.taken_at) < 120, s.created_at
    assert s.size_bytes > 0 and s.size_bytes == s.state_bytes + s.memory_bytes + s.disk_bytes
    assert s.path is not None and s.path.is_dir(), s.path
    listed = {i.snapshot_id: i for i in SmolVM.list_snapshots()}
    assert s.snapshot_id in listed, listed
    assert listed[s.snapshot_id].vm_id == source.vm.vm_id
    # The cold= flag reached the library's config.
    assert '"cold":true' in source.vm._native.config_json().replace(" ", "")


def test_restore_into_a_new_vm_continues_from_the_snapshot(source, made):
    new = made.vm(SmolVM.from_snapshot(source.snap.snapshot_id, vm_id=uid("rest")))
    assert new.status == VMState.PAUSED, "resume_vm=False did not leave the restored VM paused"
    new.resume()
    # The counter (in RAM only) is there and continues from its value at
    # the snapshot, not from anywhere else.
    n1 = int(sh(new, "cat /dev/shm/n"))
    assert source.n_before <= n1 <= source.n_before + 300, (source.n_before, n1)
    time.sleep(1.0)
    n2 = int(sh(new, "cat /dev/shm/n"))
    assert n2 > n1, f"the counter does not tick in the restored VM ({n1} then {n2})"
    # The disk as it was: written before the snapshot, not after.
    assert sh(new, "cat /root/before") == "before"
    assert not has(new, "/root/after"), "a file written after the snapshot is in the restored VM"
    assert has(source.vm, "/root/after"), "the source lost a file it wrote after the snapshot"
    # Its own identity.
    assert sh(new, "hostname") == new.vm_id
    users = {i.snapshot_id: i.used_by for i in SmolVM.list_snapshots()}[source.snap.snapshot_id]
    assert new.vm_id in users, users
    # Like a from_id handle: a with block stops it, does not delete it.
    with new:
        assert new.status == VMState.RUNNING
    assert SmolVM.from_id(new.vm_id).status == VMState.STOPPED


def test_fork_children_are_separate_vms(source, made):
    kids = source.vm.fork(2)
    for k in kids:
        made.vm(k)
    assert len(kids) == 2
    assert source.vm.status == VMState.RUNNING, "the fork's source did not go on running"
    ids = [k.vm_id for k in kids]
    assert len(set(ids) | {source.vm.vm_id}) == 3, ids
    rnd = []
    for k in kids:
        assert k.status == VMState.RUNNING
        assert sh(k, "hostname") == k.vm_id
        assert sh(k, "cat /root/after") == "after"  # the source's state when forked
        rnd.append(sh(k, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"))
        sh(k, f"echo mine > /root/own-{k.vm_id} && sync")
    assert rnd[0] != rnd[1], "the children's /dev/urandom gave the same bytes"
    for k in kids:
        for other in ids:
            assert has(k, f"/root/own-{other}") == (other == k.vm_id), (k.vm_id, other)
    assert not any(has(source.vm, f"/root/own-{i}") for i in ids)
    # Handles like from_id's: the fork leaves deleting them to the caller.
    assert all(not k._owns_vm for k in kids)


def test_disk_snapshot_of_a_stopped_vm(source, made):
    d = made.vm(SmolVM.from_snapshot(source.snap.snapshot_id, vm_id=uid("disk"), resume_vm=True))
    sh(d, "echo kept > /root/disk-file && sync")
    with pytest.raises(InvalidStateError) as ei:
        d.snapshot(snapshot_type=SnapshotType.DISK)
    assert "vm.stop()" in ei.value.message, ei.value.message
    d.stop()
    with pytest.raises(InvalidStateError) as ei:
        d.snapshot()
    assert "SnapshotType.DISK" in ei.value.message, ei.value.message
    info = made.snap(d.snapshot(uid("ds"), snapshot_type="disk"))
    assert info.snapshot_type == SnapshotType.DISK
    assert info.memory_bytes == 0 and info.state_bytes == 0
    # A disk snapshot's restore boots; resume_vm=False still leaves it paused.
    d2 = made.vm(SmolVM.from_snapshot(info.snapshot_id, vm_id=uid("disk2")))
    assert d2.status == VMState.PAUSED
    d2.resume()
    assert sh(d2, "cat /root/disk-file") == "kept"
    assert sh(d2, "cat /root/before") == "before"
    assert not has(d2, "/dev/shm/n"), "a booted disk snapshot has the source's RAM"
    assert sh(d2, "hostname") == d2.vm_id


def test_delete_snapshot_and_not_found(source, made):
    s = made.snap(source.vm.snapshot(uid("del"), resume_source=True))
    assert source.vm.status == VMState.RUNNING
    kid = made.vm(SmolVM.from_snapshot(s.snapshot_id, vm_id=uid("user")))
    # The source goes on over the disk the snapshot froze, and the restored
    # VM too.
    users = {i.snapshot_id: i.used_by for i in SmolVM.list_snapshots()}[s.snapshot_id]
    assert set(users) == {source.vm.vm_id, kid.vm_id}, users
    assert SmolVM.delete_snapshot(s.snapshot_id) is None
    assert s.snapshot_id not in {i.snapshot_id for i in SmolVM.list_snapshots()}
    # Its files stay while VMs are layered on them.
    assert s.path.is_dir()
    kid.resume()
    assert sh(kid, "cat /root/after") == "after"
    for call in (
        lambda: SmolVM.delete_snapshot(s.snapshot_id),
        lambda: SmolVM.from_snapshot(s.snapshot_id, vm_id=uid("never")),
        lambda: SmolVM.from_snapshot("no-such-snapshot"),
    ):
        with pytest.raises(SnapshotNotFoundError) as ei:
            call()
        e = ei.value
        assert isinstance(e, SnapshotError) and isinstance(e, SmolVMError)
        assert e.kind == "snapshot_not_found"
        assert e.snapshot_id in (s.snapshot_id, "no-such-snapshot")
        assert "SmolVM.list_snapshots()" in e.message, e.message
    kid.delete()
    assert s.path.is_dir(), "the files of a deleted snapshot went while the source still uses them"
    assert has(source.vm, "/root/after")


def test_snapshot_errors_from_real_causes(source, made):
    vm, sid = source.vm, source.snap.snapshot_id
    with pytest.raises(SnapshotAlreadyExistsError) as ei:
        vm.snapshot(sid, resume_source=True)
    e = ei.value
    assert e.kind == "snapshot_already_exists" and e.snapshot_id == sid
    assert f"SmolVM.delete_snapshot('{sid}')" in e.message, e.message
    assert vm.status == VMState.RUNNING, "a refused snapshot changed the VM's state"

    with pytest.raises(ValidationError) as ei:
        vm.snapshot(snapshot_type=SnapshotType.DIFF)
    assert "not supported" in ei.value.message and "SnapshotType.FULL" in ei.value.message
    for bad in (dict(snapshot_type="memory"), dict(snapshot_id=7), dict(snapshot_id="Bad Name!")):
        with pytest.raises(ValidationError):
            vm.snapshot(**bad)
    for bad in (0, -1, 257, 1.5, True):
        with pytest.raises(ValidationError):
            vm.fork(bad)
    with pytest.raises(VMAlreadyExistsError):
        SmolVM.from_snapshot(sid, vm_id=vm.vm_id)
    with pytest.raises(HostError) as ei:
        SmolVM.from_snapshot(sid, vm_id=uid("never"), backend="firecracker")
    with pytest.raises(HostError) as ctor:
        SmolVM(backend="firecracker")
    assert ei.value.message == ctor.value.message
    with pytest.raises(ValidationError):
        SmolVM.from_snapshot(sid, resume_vm="yes")
    with pytest.raises(ValidationError):
        SmolVM(cold="yes")
    with pytest.raises(ValidationError) as ei:
        SmolVM(vm_id=vm.vm_id, cold=True)
    assert "cold" in ei.value.message

    # A damaged snapshot is refused whole, and nothing is made.
    bad = made.snap(vm.snapshot(uid("bad"), resume_source=True))
    state = bad.path / "state"
    assert state.is_file(), sorted(os.listdir(bad.path))
    with open(state, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    target = uid("never")
    with pytest.raises(SnapshotError) as ei:
        SmolVM.from_snapshot(bad.snapshot_id, vm_id=target)
    assert ei.value.kind == "snapshot_invalid" and ei.value.snapshot_id == bad.snapshot_id
    assert target not in {i.vm_id for i in SmolVM.list()}


def test_async_twins(source, made):
    async def main():
        s = made.snap(await source.vm.async_snapshot(uid("as"), resume_source=True))
        assert s.snapshot_type == SnapshotType.FULL
        c = made.vm(await SmolVM.async_from_snapshot(s.snapshot_id, vm_id=uid("ac"), resume_vm=True))
        assert (await c.async_run("hostname", shell="raw")).output == c.vm_id
        kids = await source.vm.async_fork(1)
        for k in kids:
            made.vm(k)
        assert len(kids) == 1
        assert (await kids[0].async_run("hostname", shell="raw")).output == kids[0].vm_id
        assert s.snapshot_id in {i.snapshot_id for i in await SmolVM.async_list_snapshots()}
        await SmolVM.async_delete_snapshot(s.snapshot_id)
        with pytest.raises(SnapshotNotFoundError):
            await SmolVM.async_from_snapshot(s.snapshot_id, vm_id=uid("never"))

    asyncio.run(main())


def test_interrupted_fork_finishes_then_leaves_nothing(source, made):
    vms_before = {i.vm_id for i in SmolVM.list()}
    snaps_before = {i.snapshot_id for i in SmolVM.list_snapshots()}

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        # Ctrl-C while the fork's snapshot is being taken.
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            kids = source.vm.fork(2)
            for k in kids:
                made.vm(k)
            pytest.fail("the fork ended before the interrupt came; nothing was tested")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert {i.vm_id for i in SmolVM.list()} == vms_before, "an interrupted fork left VMs"
    assert {i.snapshot_id for i in SmolVM.list_snapshots()} == snaps_before
    assert source.vm.status == VMState.RUNNING
    assert sh(source.vm, "cat /root/after") == "after"


def test_snapshot_of_a_restored_vm(source, made):
    x = made.vm(SmolVM.from_snapshot(source.snap.snapshot_id, vm_id=uid("gen2"), resume_vm=True))
    sh(x, "echo two > /root/gen && sync")
    s2 = made.snap(x.snapshot(resume_source=True))
    assert s2.snapshot_id.startswith("snap-"), s2.snapshot_id
    assert x.status == VMState.RUNNING, "resume_source=True did not keep the VM running"
    y = made.vm(SmolVM.from_snapshot(s2.snapshot_id, vm_id=uid("gen3"), resume_vm=True))
    assert sh(y, "cat /root/gen") == "two"
    kids = x.fork(1)
    made.vm(kids[0])
    assert sh(kids[0], "cat /root/gen") == "two"


# Last: it replaces the module's source VM.
def test_restore_back_into_the_source_and_after_it_was_deleted(source, made):
    vm, sid = source.vm, source.snap.snapshot_id
    assert has(vm, "/root/after")
    # vm_id=None: back into the source, its run and disk replaced.
    back = SmolVM.from_snapshot(sid, resume_vm=True)
    assert back.vm_id == vm.vm_id
    assert back.status == VMState.RUNNING, "resume_vm=True did not leave the VM running"
    assert sh(back, "cat /root/before") == "before"
    assert not has(back, "/root/after"), "the restore into the source kept its later disk"
    assert int(sh(back, "cat /dev/shm/n")) >= source.n_before

    # Once the source is gone, the restore re-creates it.
    back.delete()
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id(vm.vm_id)
    again = SmolVM.from_snapshot(sid)
    assert again.vm_id == vm.vm_id
    assert again.status == VMState.PAUSED
    again.resume()
    assert sh(again, "cat /root/before") == "before"
    assert not has(again, "/root/after")
    assert sh(again, "hostname") == vm.vm_id
