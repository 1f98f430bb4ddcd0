"""Drop-in for code written against the older Python ``smolvm`` package:
its import paths, ``SmolVM(config=VMConfig(...))``, and the keyword forms
``backend=``, ``os=``, ``comm_channel=``, ``vm_id=``."""

from __future__ import annotations

import pytest

import smolvm
from smolvm import CommandResult, SmolVM, SmolVMError, VMState
from smolvm.exceptions import HostError, ValidationError, VMNotFoundError
from smolvm.types import CommandResult as TypesCommandResult
from smolvm.types import SnapshotInfo, SnapshotType, VMConfig, VMInfo
from smolvm.types import VMState as TypesVMState


def test_import_surface():
    assert TypesVMState is VMState
    assert TypesCommandResult is CommandResult
    assert smolvm.SmolVMError is SmolVMError
    for t in (SnapshotType, SnapshotInfo, VMInfo, VMConfig):
        assert isinstance(t, type)


def test_command_result_value():
    r = CommandResult(0, "  hi there \n", "")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "  hi there \n", "")
    assert r.ok is True
    assert r.output == "hi there"
    bad = CommandResult(exit_code=2, stdout="", stderr="no\n")
    assert bad.ok is False
    assert bad.output == ""


def test_vmconfig_defaults():
    c = VMConfig()
    assert c.vm_id is None
    assert c.vcpu_count == 1
    assert c.memory == 512
    assert c.disk_size_mib is None
    assert c.env_vars == {}
    assert c.backend is None and c.comm_channel is None
    assert c.guest_os is None and c.image is None
    assert c.network is True


def test_config_object(make_vm, new_name):
    name = new_name("cfg")
    cfg = VMConfig(vm_id=name, vcpu_count=2, memory=384, env_vars={"DROPIN": "yes"})
    with SmolVM(config=cfg) as vm:
        make_vm.track(vm.vm_id)
        assert vm.vm_id == name
        assert vm.status == VMState.RUNNING
        assert vm.can_run_commands() is True
        assert vm.run("nproc").output == "2"
        assert vm.run("echo $DROPIN").output == "yes"
        kib = int(vm.run("awk '/^MemTotal:/ {print $2}' /proc/meminfo").output)
        assert 250 * 1024 < kib <= 384 * 1024, f"MemTotal {kib} KiB for a 384 MiB guest"
        info = vm.info.config
        assert (info.vm_id, info.vcpu_count, info.memory) == (name, 2, 384)
        assert info.env_vars == {"DROPIN": "yes"}


def test_keyword_form(make_vm):
    with SmolVM(backend="qemu", os="debian", comm_channel="vsock", memory=256, disk_size=2048) as vm:
        make_vm.track(vm.vm_id)
        assert vm.can_run_commands() is True
        cfg = vm.info.config
        assert cfg.memory == 256
        assert cfg.disk_size_mib == 2048
        assert cfg.image == "debian-12"
        r = vm.run("df -m --output=size / | tail -1")
        assert r.ok, r.stderr
        # The root filesystem grew to the disk (the image is ~500 MiB).
        assert int(r.output) > 1500, f"root fs of {r.output} MiB on a 2048 MiB disk"
        assert "bookworm" in vm.run("cat /etc/os-release").stdout


def test_auto_backend_and_debian_os_need_no_boot(make_vm):
    vm = make_vm(backend="auto", os="debian")
    assert vm.status == VMState.CREATED
    assert vm.info.config.image == "debian-12"


def test_firecracker_backend_is_refused_before_anything_is_made(vm_ids):
    before = vm_ids()
    with pytest.raises(HostError) as ei:
        SmolVM(backend="firecracker")
    assert ei.value.kind in ("host_unsupported", "host_tool_missing"), ei.value.kind
    with pytest.raises(HostError):
        SmolVM(config=VMConfig(backend="firecracker"))
    assert vm_ids() == before


def test_unknown_backend_is_invalid_input(vm_ids):
    before = vm_ids()
    with pytest.raises(ValidationError) as ei:
        SmolVM(backend="no-such-vmm")
    assert ei.value.kind == "invalid_input"
    assert "no-such-vmm" in ei.value.message, ei.value.message
    assert vm_ids() == before


@pytest.mark.parametrize("os_name", ["ubuntu", "alpine"])
def test_other_guest_os_is_refused_naming_the_images(os_name, vm_ids):
    before = vm_ids()
    with pytest.raises(ValidationError) as ei:
        SmolVM(os=os_name)
    assert ei.value.kind == "invalid_input"
    assert os_name in ei.value.message, ei.value.message
    assert "debian" in ei.value.message, f"the available images are not named: {ei.value.message}"
    with pytest.raises(ValidationError):
        SmolVM(config=VMConfig(guest_os=os_name))
    assert vm_ids() == before


def test_unknown_channel_is_refused(vm_ids):
    # comm_channel="ssh" works (tests/test_network.py); others do not.
    before = vm_ids()
    with pytest.raises(ValidationError) as ei:
        SmolVM(comm_channel="telnet")
    assert ei.value.kind == "invalid_input"
    assert "telnet" in ei.value.message and "ssh" in ei.value.message, ei.value.message
    with pytest.raises(ValidationError):
        SmolVM(config=VMConfig(comm_channel="telnet"))
    assert vm_ids() == before


def test_vm_id_keyword_reconnects(make_vm, new_name, vm_ids):
    name = new_name("recon")
    first = make_vm(name=name)
    before = vm_ids()
    again = SmolVM(vm_id=name)
    assert again.vm_id == name
    assert again.status == VMState.CREATED
    assert vm_ids() == before, "SmolVM(vm_id=...) made a new VM"
    assert first.vm_id == again.vm_id
    with pytest.raises(VMNotFoundError):
        SmolVM(vm_id="nope-not-made")
    assert vm_ids() == before
