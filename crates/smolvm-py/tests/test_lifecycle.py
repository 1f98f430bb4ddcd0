"""A VM's life through the SDK: create, start, stop, start again, pause,
resume, close, reconnect, delete. Each test has VMs of its own (they change
state)."""

from __future__ import annotations

import os
import time

import pytest

from smolvm import SmolVM, VMState
from smolvm.exceptions import InvalidStateError, SmolVMError, VMNotFoundError
from smolvm.types import VMConfig, VMInfo


def test_context_manager_starts_then_stops_and_deletes(vm_ids, make_vm):
    class Boom(Exception):
        pass

    seen = {}
    # The with-block ends with an exception: cleanup must happen anyway.
    with pytest.raises(Boom):
        with SmolVM() as vm:
            make_vm.track(vm.vm_id)  # deleted even if __exit__ fails to
            seen["id"] = vm.vm_id
            assert vm.status == VMState.RUNNING
            r = vm.run("hostname")
            assert r.ok, r
            assert r.output, r
            seen["in_list"] = vm.vm_id in vm_ids()
            raise Boom()
    assert seen["in_list"]
    assert seen["id"] not in vm_ids(), "__exit__ did not delete the VM it created"


def test_explicit_lifecycle(make_vm, new_name, vm_ids):
    name = new_name("life")
    vm = make_vm(name=name)
    assert vm.vm_id == name
    assert vm.status == VMState.CREATED
    assert vm.status == "created"  # a str enum
    assert name in vm_ids()

    assert vm.start() is vm
    assert vm.status == VMState.RUNNING
    vm.wait_for_ready(timeout=60.0)
    info = vm.info
    assert isinstance(info, VMInfo)
    assert info.vm_id == name
    assert info.status == VMState.RUNNING
    assert isinstance(info.pid, int) and os.path.exists(f"/proc/{info.pid}"), info
    assert info.config.memory == 512
    assert info.config.vcpu_count == 1

    # start() of a running VM does nothing: same VMM.
    assert vm.start() is vm
    assert vm.status == VMState.RUNNING
    assert vm.info.pid == info.pid

    assert vm.run("echo kept > /root/note && sync").ok

    vm.stop()
    assert vm.status == VMState.STOPPED
    assert vm.refresh() is vm
    assert vm.info.status == VMState.STOPPED
    with pytest.raises(InvalidStateError) as ei:
        vm.run("true")
    msg = ei.value.message
    assert "stopped" in msg, msg
    assert "start" in msg, f"the message does not say to start the VM: {msg}"
    assert ei.value.kind == "invalid_state"

    # The same disk after a restart.
    vm.start()
    assert vm.status == VMState.RUNNING
    assert vm.run("cat /root/note").output == "kept"

    vm.delete()
    assert name not in vm_ids()
    with pytest.raises(VMNotFoundError):
        vm.refresh()
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id(name)


def test_create_records_the_options(make_vm, new_name):
    name = new_name("opts")
    vm = make_vm(name=name, memory=256, vcpus=2, network=False, env={"A": "1"})
    cfg = vm.info.config
    assert isinstance(cfg, VMConfig)
    assert (cfg.vm_id, cfg.memory, cfg.vcpu_count, cfg.network) == (name, 256, 2, False)
    assert cfg.env_vars == {"A": "1"}
    assert cfg.image == "debian-12"
    listed = [i for i in SmolVM.list() if i.vm_id == name]
    assert len(listed) == 1
    assert listed[0].status == VMState.CREATED
    assert listed[0].config.memory == 256


def _start_counter(vm):
    # The loop is its own session with nothing of the exec's open, so run()
    # returns at once. The counter file is replaced atomically (mv), so a
    # read never sees it half written.
    r = vm.run(
        "setsid nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/c.new; "
        "mv /tmp/c.new /tmp/c; sleep 0.2; done' >/dev/null 2>&1 </dev/null &",
        timeout=30,
    )
    assert r.ok, r


def _counter(vm):
    r = vm.run("cat /tmp/c 2>/dev/null || echo 0")
    assert r.ok, r
    return int(r.output)


def _wait_counter_above(vm, value, within=60.0):
    deadline = time.monotonic() + within
    while True:
        c = _counter(vm)
        if c > value:
            return c
        assert time.monotonic() < deadline, f"the guest counter stays at {c} (waiting for > {value})"
        time.sleep(0.2)


def test_pause_resume_keeps_the_guest_going(make_vm):
    vm = make_vm()
    vm.start()
    _start_counter(vm)
    _wait_counter_above(vm, 2)
    before = _counter(vm)

    vm.pause()
    assert vm.status == VMState.PAUSED
    assert vm.info.status == VMState.PAUSED
    with pytest.raises(InvalidStateError) as ei:
        vm.run("true")
    assert "paused" in ei.value.message, ei.value.message
    with pytest.raises(InvalidStateError):
        vm.pause()  # already paused
    time.sleep(1.0)  # the time the VM spends paused, not a synchronization
    assert vm.status == VMState.PAUSED

    vm.resume()
    assert vm.status == VMState.RUNNING
    after = _counter(vm)
    assert after >= before, f"the counter went back from {before} to {after}: the guest restarted"
    _wait_counter_above(vm, after)

    # start() of a paused VM resumes it.
    last = _counter(vm)
    vm.pause()
    assert vm.status == VMState.PAUSED
    assert vm.start() is vm
    assert vm.status == VMState.RUNNING
    _wait_counter_above(vm, last)

    vm.stop()
    assert vm.status == VMState.STOPPED


def test_close_keeps_the_vm_and_from_id_reconnects(make_vm, vm_ids):
    vm = make_vm()
    vm_id = vm.vm_id
    vm.start()
    assert vm.run("echo here > /tmp/marker").ok
    vm.close()

    again = SmolVM.from_id(vm_id)
    assert again.vm_id == vm_id
    assert again.status == VMState.RUNNING, "close() must not stop the VM"
    assert again.run("cat /tmp/marker").output == "here"
    again.close()

    # A with-block on a handle that did not create the VM stops it on exit,
    # and keeps it.
    with SmolVM.from_id(vm_id) as vm3:
        assert vm3.status == VMState.RUNNING
        assert vm3.run("cat /tmp/marker").output == "here"
    assert vm_id in vm_ids(), "__exit__ of a from_id handle deleted the VM"
    assert SmolVM.from_id(vm_id).status == VMState.STOPPED


def test_states_are_str_enum_members():
    assert {s.value for s in VMState} == {"created", "running", "paused", "stopped", "error"}
    assert VMState.RUNNING == "running"
    assert VMState("paused") is VMState.PAUSED
    assert isinstance(VMState.STOPPED, str)
    assert issubclass(InvalidStateError, SmolVMError)


def _interrupt_after(seconds):
    """SIGINT to this process after `seconds` (Python raises it as
    KeyboardInterrupt in the main thread, as a Ctrl-C would)."""
    import os
    import signal
    import threading

    t = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    t.start()
    return t


def _processes_of(info):
    import os

    return [p for p in (info.pid, info.supervisor_pid) if p and os.path.exists(f"/proc/{p}")]


def test_ctrl_c_during_start_ends_the_boot(make_vm):
    # A cold boot: from the warm boot snapshot it would be over in time.
    vm = make_vm(cold=True)
    timer = _interrupt_after(1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            vm.start(boot_timeout=60)
    finally:
        timer.cancel()
    # The boot was ended, not left to finish behind the caller's back.
    info = vm.info
    assert info.status == VMState.CREATED, info
    assert info.pid is None and info.supervisor_pid is None, info
    time.sleep(3)
    assert vm.status == VMState.CREATED, "the interrupted boot came up anyway"
    # And the VM still boots when asked again.
    vm.start()
    assert vm.run("echo back", shell="raw").output == "back"


def test_failed_start_in_a_with_block_leaves_no_vm(new_name, vm_ids):
    name = new_name("enter")
    timer = _interrupt_after(1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            with SmolVM(name=name, cold=True):
                pytest.fail("the block ran although start was interrupted")
    finally:
        timer.cancel()
    assert name not in vm_ids(), "a VM whose start failed on __enter__ was left behind"


def test_a_closed_handle_refuses_with_invalid_state(make_vm):
    vm = make_vm()
    vm.close()
    with pytest.raises(InvalidStateError) as ei:
        vm.start()
    assert "closed" in ei.value.message and "from_id" in ei.value.message


def test_a_handle_never_acts_on_a_newer_vm_of_the_same_name(make_vm, new_name, vm_ids):
    name = new_name("reuse")
    old = make_vm(name=name)
    SmolVM.from_id(name).delete()
    newer = make_vm(name=name, memory=256)
    # The old handle's VM is gone; the new one of that name is not its VM.
    with pytest.raises(VMNotFoundError):
        old.refresh()
    old.delete()  # nothing of its own is left: a no-op
    assert name in vm_ids(), "an old handle's delete removed a newer VM of the same name"
    assert newer.info.config.memory == 256
