"""Networking through the SDK on real VMs: port forwards (``expose_local``,
``ports=`` at creation, ``unexpose_local``, ``list_ports``), SSH
(``wait_for_ssh``, ``ssh_commands`` with the system client and a pinned
host key, ``comm_channel="ssh"``), ``get_ip``, the create-time egress
settings (validated and stored only: enforcement is not tested here), and
the errors of each.

Nothing here sends traffic off the machine: the forwards and SSH ride the
agent channel to VMs without a network device (``network=False``); the
session's VM (``running_vm``, with a network) only reports its own
address. Two VMs are booted for the module; the settings tests create VMs
without starting them.
"""

from __future__ import annotations

import asyncio
import shlex
import socket
import subprocess
import time
import urllib.request

import pytest

from smolvm import InternetSettings, InvalidStateError, NetworkError, PortForward, SmolVM, ValidationError, VMState
from smolvm.exceptions import OperationTimeoutError
from smolvm.types import VMConfig

from conftest import _delete_if_there

#: Guest port of the forward made at creation.
CREATED_PORT = 8003

# Direct connections only: a proxy from the environment must not carry a
# test's request anywhere.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(port: int, path: str = "/") -> str:
    with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=20) as r:
        assert r.status == 200
        return r.read().decode()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def serve(vm: SmolVM, port: int, bind: str, text: str) -> None:
    """A Python HTTP server in the guest on ``bind:port`` whose index says ``text``."""
    d = f"/root/www{port}"
    r = vm.run(f"mkdir -p {d} && printf %s {shlex.quote(text)} > {d}/index.html", shell="raw")
    assert r.ok, r.stderr
    vm.spawn(["python3", "-m", "http.server", str(port), "--bind", bind, "--directory", d])
    vm.wait_for_port(port, timeout=30)


@pytest.fixture(scope="module")
def quiet(isolated_data_dir):
    """A running VM without a network device, with a forward to guest port
    ``CREATED_PORT`` made at creation."""
    vm = SmolVM(network=False, ports=[CREATED_PORT])
    try:
        vm.start()
        yield vm
    finally:
        _delete_if_there(vm.vm_id)


@pytest.fixture(scope="module")
def servers(quiet):
    """Guest HTTP servers: on 0.0.0.0:8001 and on the guest's 127.0.0.1:8002."""
    serve(quiet, 8001, "0.0.0.0", "on-any")
    serve(quiet, 8002, "127.0.0.1", "on-loopback")
    return quiet


# -- create-time settings ------------------------------------------------------


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"mode": "sometimes"}, ["mode", "'open'", "'restricted'"]),
        ({"mode": "allowlist"}, ["nothing", "mode='off'"]),
        ({"mode": "restricted", "allowed_cidrs": []}, ["nothing"]),
        ({"allowed_cidrs": ["10.0.0.1/8"]}, ["10.0.0.1/8", "10.0.0.0/8"]),
        ({"allowed_cidrs": ["300.1.2.3"]}, ["300.1.2.3", "203.0.113.0/24"]),
        ({"allowed_cidrs": ["2001:db8::/32"]}, ["IPv6"]),
        ({"allowed_cidrs": "10.0.0.0/8"}, ["list"]),
        ({"allowed_domains": ["10.1.2.3"]}, ["allowed_cidrs"]),
        ({"allowed_domains": ["exa mple.com"]}, ["exa mple.com", "*.example.com"]),
        ({"allowed_domains": ["*"], "mode": "allowlist"}, ["mode='open'"]),
        ({"mode": "off", "allowed_domains": ["example.com"]}, ["mode='off'"]),
        ({"domains": ["example.com"]}, ["'domains'", "'allowed_domains'"]),
        ("open", ["InternetSettings", "dict"]),
    ],
)
def test_bad_internet_settings_are_refused_before_anything_is_made(settings, words, vm_ids):
    before = vm_ids()
    with pytest.raises(ValidationError) as ei:
        SmolVM(internet_settings=settings)
    assert ei.value.kind == "invalid_input"
    for w in words:
        assert w in ei.value.message, ei.value.message
    assert vm_ids() == before


def test_internet_settings_objects_check_themselves():
    with pytest.raises(ValidationError):
        InternetSettings(mode="restricted")
    s = InternetSettings(
        mode="restricted",
        allowed_domains=["PyPI.org.", "https://files.pythonhosted.org/", "*.Example.com", "pypi.org"],
        allowed_cidrs=["203.0.113.7", "10.1.0.0/16"],
    )
    assert s.mode == "allowlist"
    assert s.allowed_domains == ["pypi.org", "files.pythonhosted.org", "*.example.com"]
    assert s.allowed_cidrs == ["203.0.113.7/32", "10.1.0.0/16"]
    assert InternetSettings().mode == "open"
    assert InternetSettings(allowed_domains=["*"]).mode == "open"  # the older package's default
    assert InternetSettings(allowed_cidrs=["192.0.2.0/24"]).mode == "allowlist"


def test_set_internet_settings_changes_a_running_vm(make_vm, quiet):
    """A live change on a VM with a network (nothing is sent anywhere: the
    rules change, no packet is needed to check that they are stored), and
    the refusals of a VM without one."""
    vm = make_vm()
    vm.start()
    got = vm.set_internet_settings({"mode": "restricted", "allowed_domains": ["PyPI.org."], "allowed_cidrs": ["192.0.2.0/24"]})
    assert got == InternetSettings("allowlist", ["pypi.org"], ["192.0.2.0/24"])
    assert SmolVM.from_id(vm.vm_id).info.config.internet_settings == got
    assert vm.run("true").ok, "commands still run under the new policy"
    with pytest.raises(ValidationError):
        vm.set_internet_settings({"allowed_cidrs": ["10.0.0.1/8"]})
    assert vm.info.config.internet_settings == got, "a refused change changed the policy"
    assert vm.set_internet_settings(InternetSettings("open")).mode == "open"
    # Without a NIC only "off" is possible.
    with pytest.raises(InvalidStateError) as ei:
        quiet.set_internet_settings({"mode": "open"})
    assert "without a network" in ei.value.message
    assert quiet.set_internet_settings({"mode": "off"}).mode == "off"


def test_internet_settings_are_stored_with_the_vm(make_vm, vm_ids):
    vm = make_vm(
        internet_settings=InternetSettings(
            mode="restricted", allowed_domains=["pypi.org", "*.example.com"], allowed_cidrs=["192.0.2.1"]
        )
    )
    got = vm.info.config.internet_settings
    assert got.mode == "allowlist"
    assert sorted(got.allowed_domains) == ["*.example.com", "pypi.org"]
    assert got.allowed_cidrs == ["192.0.2.1/32"]
    assert vm.info.config.network is True
    cfg = SmolVM.from_id(vm.vm_id).info.config
    assert cfg.internet_settings == got, "another handle reads another policy"

    as_dict = make_vm(internet_settings={"allowed_cidrs": ["198.51.100.0/24"]})
    assert as_dict.info.config.internet_settings.allowed_cidrs == ["198.51.100.0/24"]
    assert as_dict.info.config.internet_settings.mode == "allowlist"

    off = make_vm(internet_settings={"mode": "off"})
    assert off.info.config.network is False, "mode='off' must mean no network device"
    assert off.info.config.internet_settings.mode == "off"

    opened = make_vm(config=VMConfig(internet_settings=InternetSettings("open"), ports=["7000:70"]))
    assert opened.info.config.internet_settings.mode == "open"
    assert opened.info.config.ports == [PortForward(host_port=7000, guest_port=70)]
    assert vm.status == VMState.CREATED

    before = vm_ids()
    with pytest.raises(ValidationError) as ei:
        SmolVM(network=False, internet_settings={"allowed_domains": ["pypi.org"]})
    assert "network=False" in ei.value.message
    with pytest.raises(ValidationError):
        SmolVM(config=VMConfig(), internet_settings={"mode": "off"})
    assert vm_ids() == before


@pytest.mark.parametrize(
    "ports, words",
    [
        (8080, ["list"]),
        ([70000], ["guest_port", "70000"]),
        ([0], ["guest_port"]),
        (["80:"], ["80:"]),
        (["x:80"], ["host port"]),
        ([(1, 2, 3)], ["(host, guest)"]),
        ([{"guest": 80}], ["'guest'", "'guest_port'"]),
        (["8080:80", (8080, 81)], ["twice"]),
        ([True], ["True"]),
    ],
)
def test_bad_ports_are_refused_before_anything_is_made(ports, words, vm_ids):
    before = vm_ids()
    with pytest.raises(ValidationError) as ei:
        SmolVM(ports=ports)
    for w in words:
        assert w in ei.value.message, ei.value.message
    assert vm_ids() == before


# -- port forwards -------------------------------------------------------------


def test_expose_local_reaches_guest_servers_on_any_address_and_on_loopback(servers):
    any_port = servers.expose_local(8001)
    loop_port = servers.expose_local(8002)
    assert any_port != loop_port and 0 < any_port < 65536
    assert fetch(any_port) == "on-any"
    # Bound to the guest's own loopback, reached anyway: forwards are
    # tunnels to the guest's 127.0.0.1, not NAT rules.
    assert fetch(loop_port) == "on-loopback"
    listed = {(p.host_port, p.guest_port) for p in servers.list_ports()}
    assert {(any_port, 8001), (loop_port, 8002)} <= listed
    assert all(p.host_address == "127.0.0.1" for p in servers.list_ports())


def test_expose_local_on_a_chosen_host_port(servers):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert servers.expose_local(8001, host_port=free) == free
    assert fetch(free) == "on-any"
    servers.unexpose_local(free)


def test_forwards_given_at_creation_open_at_start(quiet):
    created = [p for p in quiet.list_ports() if p.guest_port == CREATED_PORT]
    assert len(created) == 1, quiet.list_ports()
    assert created[0].host_port > 0
    assert quiet.info.config.ports == [PortForward(host_port=0, guest_port=CREATED_PORT)]
    serve(quiet, CREATED_PORT, "127.0.0.1", "made-at-create")
    assert fetch(created[0].host_port) == "made-at-create"


def test_unexpose_local_closes_the_forward(servers):
    port = servers.expose_local(8001)
    assert fetch(port) == "on-any"
    with pytest.raises(ValidationError) as ei:
        servers.unexpose_local(port, guest_port=8002)
    assert "8001" in ei.value.message and "nothing was closed" in ei.value.message
    assert fetch(port) == "on-any"
    assert servers.unexpose_local(port, guest_port=8001) is servers
    assert refused(port), f"host port {port} still accepts connections after unexpose_local"
    assert port not in {p.host_port for p in servers.list_ports()}
    with pytest.raises(InvalidStateError) as ei:
        servers.unexpose_local(port)
    assert ei.value.kind == "invalid_state" and "no port forward" in ei.value.message


def test_a_taken_host_port_is_a_network_error(servers):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(NetworkError) as ei:
            servers.expose_local(8001, host_port=taken)
        assert ei.value.kind == "network" and ei.value.vm_id == servers.vm_id
        assert str(taken) in ei.value.message, ei.value.message
    assert taken not in {p.host_port for p in servers.list_ports()}


@pytest.mark.parametrize("guest, host", [(0, None), (70000, None), ("80", None), (True, None), (80, -1), (80, 70000)])
def test_expose_local_refuses_what_is_not_a_port(quiet, guest, host):
    with pytest.raises(ValidationError):
        quiet.expose_local(guest, host_port=host)


# -- SSH -------------------------------------------------------------------------


def test_wait_for_ssh_then_the_system_client_logs_in_with_the_pinned_key(quiet):
    assert quiet.wait_for_ssh(timeout=60) is quiet
    cmds = quiet.ssh_commands()
    assert set(cmds) == {"ssh", "localhost_port", "smolvm"}
    assert cmds["smolvm"] == f"smolvm ssh {quiet.vm_id}"
    argv = shlex.split(cmds["ssh"])
    assert argv[0] == "ssh" and "StrictHostKeyChecking=yes" in argv and "UserKnownHostsFile=/dev/null" not in argv
    r = subprocess.run(argv + ["hostname"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == quiet.vm_id
    # Set up once: the same forward again.
    assert quiet.ssh_commands() == cmds


def test_comm_channel_ssh_runs_commands_through_ssh(quiet):
    vm = SmolVM.from_id(quiet.vm_id, comm_channel="ssh")
    r = vm.run("echo hi; exit 3")
    assert (r.exit_code, r.stdout, r.ok) == (3, "hi\n", False)
    # Through sshd: its session variables are there, not over the agent.
    assert vm.run("echo ${SSH_CONNECTION:+via-ssh}", shell="raw").output == "via-ssh"
    assert quiet.run("echo ${SSH_CONNECTION:+via-ssh}", shell="raw").output == ""
    r = vm.run(["sh", "-c", 'printf "%s|%s|%s" "$1" "$PWD" "$X"', "-", "it's quoted"], env={"X": "y z"}, cwd="/tmp")
    assert r.stdout == "it's quoted|/tmp|y z"
    assert vm.run("echo oops >&2", shell="raw").stderr == "oops\n"
    t = time.monotonic()
    with pytest.raises(OperationTimeoutError):
        vm.run("sleep 30", timeout=1)
    assert time.monotonic() - t < 15
    assert vm.run("true").ok, "the connection does not survive a timed-out command"


def test_the_guest_address(running_vm):
    # The session's VM with a network device: it only reports its address.
    assert running_vm.get_ip() == "10.0.2.15"


def test_two_vms_get_their_own_ports_and_a_deleted_vm_leaves_none(quiet, make_vm):
    other = make_vm(network=False, comm_channel="ssh")
    other.start()
    # comm_channel at creation: this handle runs commands through SSH.
    assert other.run("hostname").output == other.vm_id
    assert other.run("echo ${SSH_CONNECTION:+via-ssh}", shell="raw").output == "via-ssh"
    serve(other, 8001, "0.0.0.0", "other")
    mine, theirs = quiet.expose_local(8001), other.expose_local(8001)
    assert mine != theirs
    assert fetch(theirs) == "other"
    ports = {p.host_port for p in other.list_ports()}
    assert len(ports) == 2, other.list_ports()  # 8001's and SSH's
    assert not ports & {p.host_port for p in quiet.list_ports()}
    other.delete()
    for port in ports:
        assert refused(port), f"host port {port} of a deleted VM still accepts connections"
    quiet.unexpose_local(mine)


def test_get_ip_of_a_vm_without_network_is_a_network_error(quiet):
    with pytest.raises(NetworkError) as ei:
        quiet.get_ip()
    assert "expose_local" in ei.value.message


def test_forwards_and_ssh_need_a_running_vm(make_vm):
    vm = make_vm(network=False)
    assert vm.list_ports() == []

    with pytest.raises(InvalidStateError):
        vm.expose_local(80)
    for call in (vm.ssh_commands, vm.wait_for_ssh):
        with pytest.raises(InvalidStateError) as ei:
            call()
        assert "vm.start()" in ei.value.message, ei.value.message
    ssh = SmolVM.from_id(vm.vm_id, comm_channel="ssh")
    with pytest.raises(InvalidStateError):
        ssh.run("true")


def test_async_twins(quiet):
    async def main():
        port = await quiet.async_expose_local(8001)
        assert port in {p.host_port for p in await quiet.async_list_ports()}
        assert await quiet.async_unexpose_local(port) is quiet
        assert await quiet.async_wait_for_ssh(timeout=60) is quiet
        cmds = await quiet.async_ssh_commands()
        vm = await SmolVM.async_from_id(quiet.vm_id, comm_channel="ssh")
        r = await vm.async_run("echo ${SSH_CONNECTION:+via-ssh}; exit 4", shell="raw")
        with pytest.raises(NetworkError):
            await quiet.async_get_ip()
        return port, cmds, r

    port, cmds, r = asyncio.run(main())
    assert refused(port)
    assert cmds["smolvm"].endswith(quiet.vm_id)
    assert (r.exit_code, r.output) == (4, "via-ssh")
