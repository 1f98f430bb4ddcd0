"""Networking of a :class:`SmolVM`: create-time egress settings and port
forwards, forwards of a running VM, SSH, and ``run`` through SSH."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from . import _aio, _native
from .exceptions import ValidationError, _from_native
from .types import CommandResult, InternetSettings, PortForward

if TYPE_CHECKING:  # pragma: no cover
    from ._vm import SmolVM

_FORWARD_KEYS = ("host_port", "guest_port", "host_address")

#: What a person types to reach a VM with smolvm's own client.
_SMOLVM_SSH = "smolvm ssh {}"


def _invalid(message: str, op: str = "create", vm_id: Optional[str] = None) -> ValidationError:
    return _from_native("invalid_input", message, vm_id, None, op)  # type: ignore[return-value]


def _port(name: str, value: Any, op: str, vm_id: Optional[str] = None, zero_ok: bool = False) -> int:
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        free = " (0 or None: a free one)" if zero_ok else ""
        raise _invalid(f"{name} must be a port number {low}-65535{free}, not {value!r}", op, vm_id)
    return value


def _forward(item: Any) -> Dict[str, Any]:
    """One ``ports=`` entry as the library's forward (JSON form)."""
    host_addr = "127.0.0.1"
    if isinstance(item, PortForward):
        host, guest, host_addr = item.host_port, item.guest_port, item.host_address
    elif isinstance(item, bool):
        raise _invalid(f"ports entry {item!r} is not a port")
    elif isinstance(item, int):
        host, guest = 0, item
    elif isinstance(item, str):
        d = _native.parse_forward(item)
        host, guest, host_addr = d["host_port"], d["guest_port"], d["host_address"]
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        host, guest = item
    elif isinstance(item, Mapping):
        unknown = sorted(str(k) for k in item if k not in _FORWARD_KEYS)
        if unknown or "guest_port" not in item:
            what = f"has no key {unknown[0]!r}" if unknown else "needs 'guest_port'"
            raise _invalid(f"ports entry {dict(item)!r} {what}; the keys are {', '.join(map(repr, _FORWARD_KEYS))}")
        host, guest = item.get("host_port"), item["guest_port"]
        host_addr = item.get("host_address") or host_addr
    else:
        raise _invalid(
            f"ports entry {item!r} is not a forward; use a guest port (8080), 'HOST:GUEST' ('8080:80'), "
            "a (host, guest) tuple or {'host_port': ..., 'guest_port': ...}"
        )
    if not isinstance(host_addr, str):
        raise _invalid(f"host_address must be a string such as '127.0.0.1', not {host_addr!r}")
    return {
        "host_addr": host_addr,
        "host_port": _port("host_port", 0 if host is None else host, "create", zero_ok=True),
        "guest_port": _port("guest_port", guest, "create"),
    }


def _ports_spec(ports: Any) -> List[Dict[str, Any]]:
    """``SmolVM(ports=...)`` as the config's forwards, checked."""
    if ports is None:
        return []
    if isinstance(ports, (str, bytes, int, Mapping)) or not isinstance(ports, (list, tuple)):
        raise _invalid(f"ports must be a list of forwards (e.g. [8080, '9000:80']), not {ports!r}")
    out = [_forward(p) for p in ports]
    taken: Dict[Tuple[str, int], int] = {}
    for f in out:
        key = (f["host_addr"], f["host_port"])
        if f["host_port"] and key in taken:
            raise _invalid(f"ports: host port {f['host_port']} is given twice")
        taken[key] = f["guest_port"]
    return out


def _egress_spec(internet_settings: Any, network: bool) -> Tuple[Optional[Any], bool]:
    """(the config's egress policy or None, network) for these arguments."""
    if internet_settings is None:
        return None, network
    settings = InternetSettings._coerce(internet_settings)
    if settings.mode == "off":
        return settings._policy(), False
    if not network:
        raise _invalid(
            f"network=False means no network at all, which internet_settings mode={settings.mode!r} "
            "contradicts; drop one (mode='off' is network=False)"
        )
    return settings._policy(), True


def _network_error(vm_id: str, message: str, op: str) -> Exception:
    return _from_native("network", message, vm_id, None, op)


def _first_ipv4(text: str) -> Optional[str]:
    """The first address of ``ip -4 -o addr show`` output."""
    for line in text.splitlines():
        words = line.split()
        if "inet" in words[:-1]:
            return words[words.index("inet") + 1].split("/", 1)[0]
    return None


class NetworkMethods:
    """The network methods of :class:`SmolVM` (a base class of it)."""

    _channel: str

    # -- port forwards --------------------------------------------------

    def _expose_args(self: "SmolVM", guest_port: Any, host_port: Any) -> Tuple[int, int]:
        g = _port("guest_port", guest_port, "expose_local", self.vm_id)
        h = _port("host_port", 0 if host_port is None else host_port, "expose_local", self.vm_id, zero_ok=True)
        return g, h

    def expose_local(self: "SmolVM", guest_port: int, host_port: Optional[int] = None) -> int:
        """Forwards ``127.0.0.1:host_port`` on the host to ``guest_port`` on
        the guest's loopback, for as long as the VM runs (kept across
        pause/resume and snapshot/restore, gone when it stops); returns the
        host port. ``host_port=None`` picks a free one. The connections
        ride the agent channel: they need no guest network (a VM made with
        ``network=False`` works), and a service bound to the guest's own
        ``127.0.0.1`` is reached as well as one on ``0.0.0.0``.

        Raises:
            NetworkError: ``host_port`` is taken on the host.
            InvalidStateError: The VM is not running or paused.
            ValidationError: A port is not one.
        """
        g, h = self._expose_args(guest_port, host_port)
        return int(self._blocking().expose(g, h)["host_port"])

    async def async_expose_local(self: "SmolVM", guest_port: int, host_port: Optional[int] = None) -> int:
        """:meth:`expose_local` without blocking the event loop."""
        g, h = self._expose_args(guest_port, host_port)
        handle = self._h
        return int((await _aio.call(lambda done: handle.expose(g, h, None, done)))["host_port"])

    def _unexpose_check(self: "SmolVM", host_port: Any, guest_port: Any) -> Tuple[int, Optional[int]]:
        h = _port("host_port", host_port, "unexpose_local", self.vm_id)
        g = None if guest_port is None else _port("guest_port", guest_port, "unexpose_local", self.vm_id)
        return h, g

    def _check_guest(self: "SmolVM", forwards: List[Any], host_port: int, guest_port: Optional[int]) -> None:
        """Refuses (before closing anything) a forward that goes elsewhere."""
        if guest_port is None:
            return
        for d in forwards:
            if int(d["host_port"]) == host_port and int(d["guest_port"]) != guest_port:
                raise _invalid(
                    f"VM '{self.vm_id}': the forward on host port {host_port} goes to guest port "
                    f"{d['guest_port']}, not {guest_port}; nothing was closed",
                    "unexpose_local",
                    self.vm_id,
                )

    def unexpose_local(self: "SmolVM", host_port: int, guest_port: Optional[int] = None) -> "SmolVM":
        """Closes the forward on ``host_port`` (its open connections end);
        returns self. ``guest_port`` (the older package's second argument),
        when given, must be where that forward goes.

        Raises:
            NetworkError: No forward listens on ``host_port``.
            InvalidStateError: The VM is not running or paused.
            ValidationError: The forward goes to another guest port.
        """
        h, g = self._unexpose_check(host_port, guest_port)
        handle = self._blocking()
        if g is not None:
            self._check_guest(handle.ports(), h, g)
        handle.unexpose(h)
        return self

    async def async_unexpose_local(self: "SmolVM", host_port: int, guest_port: Optional[int] = None) -> "SmolVM":
        """:meth:`unexpose_local` without blocking the event loop."""
        h, g = self._unexpose_check(host_port, guest_port)
        handle = self._h
        if g is not None:
            self._check_guest(await _aio.call(lambda done: handle.ports(done)), h, g)
        await _aio.call(lambda done: handle.unexpose(h, done))
        return self

    def set_internet_settings(self: "SmolVM", internet_settings: Any) -> "InternetSettings":
        """Replaces what the guest may reach (an :class:`InternetSettings` or
        a dict, as at creation): at once on a running VM (a change to an
        allowlist or ``"off"`` cuts every open connection), and kept for its
        later starts. Returns the settings as stored (names normalised).

        Raises:
            ValidationError: Bad settings (nothing changes).
            InvalidStateError: The VM was created without a network, and the
                settings are not ``mode="off"`` (a NIC cannot be added later).
            NetworkError: The running network could not apply them.
        """
        policy = InternetSettings._coerce(internet_settings)._policy()
        out = self._blocking().set_egress(json.dumps(policy))
        return InternetSettings._from_policy(out)

    async def async_set_internet_settings(self: "SmolVM", internet_settings: Any) -> "InternetSettings":
        """:meth:`set_internet_settings` without blocking the event loop."""
        policy = json.dumps(InternetSettings._coerce(internet_settings)._policy())
        handle = self._h
        out = await _aio.call(lambda done: handle.set_egress(policy, done))
        return InternetSettings._from_policy(out)

    def list_ports(self: "SmolVM") -> List[PortForward]:
        """The VM's open forwards (``ports=`` ones, :meth:`expose_local`
        ones, SSH's, and those other clients opened); none unless it runs."""
        return [PortForward._from_native(d) for d in self._blocking().ports()]

    async def async_list_ports(self: "SmolVM") -> List[PortForward]:
        """:meth:`list_ports` without blocking the event loop."""
        handle = self._h
        return [PortForward._from_native(d) for d in await _aio.call(lambda done: handle.ports(done))]

    # -- SSH ------------------------------------------------------------

    def wait_for_ssh(self: "SmolVM", timeout: float = 60.0) -> "SmolVM":
        """Sets SSH up and waits until a real login (smolvm's key, the
        guest's pinned host key) runs a command; returns self. sshd runs in
        the guest on demand, on its loopback, reached through a host port
        forward: no guest network is needed.

        Raises:
            OperationTimeoutError: No login worked within ``timeout``.
            NetworkError: SSH failed for good (a changed host key).
            InvalidStateError: The VM is not running.
        """
        from ._vm import _seconds

        t = _seconds("wait_for_ssh", "timeout", timeout, vm_id=self.vm_id, positive=True)
        self._blocking().wait_for_ssh(t)
        return self

    async def async_wait_for_ssh(self: "SmolVM", timeout: float = 60.0) -> "SmolVM":
        """:meth:`wait_for_ssh` without blocking the event loop."""
        from ._vm import _seconds

        t = _seconds("wait_for_ssh", "timeout", timeout, vm_id=self.vm_id, positive=True)
        handle = self._h
        await _aio.call(lambda done: handle.wait_for_ssh(t, done))
        return self

    def _commands(self: "SmolVM", access: Mapping[str, Any]) -> Dict[str, str]:
        line = str(access["command_line"])
        return {"ssh": line, "localhost_port": line, "smolvm": _SMOLVM_SSH.format(self.vm_id)}

    def ssh_commands(self: "SmolVM") -> Dict[str, str]:
        """Ready-to-type commands that log into the VM as root, SSH set up
        first (so they work when printed):

        - ``"ssh"``: the system ``ssh`` client with smolvm's key and the
          VM's pinned host key (``StrictHostKeyChecking=yes``) on the
          forwarded host port (also under ``"localhost_port"``, the older
          package's key);
        - ``"smolvm"``: ``smolvm ssh <vm_id>``, which needs no port.

        The guest's own address (:meth:`get_ip`) is not reachable from the
        host, so there is no ``"private_ip"`` command. The port lasts for
        this run of the VM.
        """
        return self._commands(self._blocking().ensure_ssh())

    async def async_ssh_commands(self: "SmolVM") -> Dict[str, str]:
        """:meth:`ssh_commands` without blocking the event loop."""
        handle = self._h
        return self._commands(await _aio.call(lambda done: handle.ensure_ssh(done)))

    def _run_ssh(
        self: "SmolVM", command: Any, argv: List[str], env_items: Any, cwd: Any, t: Any, cap: Any
    ) -> CommandResult:
        from ._vm import _result

        out = self._h.ssh_exec(argv, env_items, cwd, t, cap)
        return _result(self.vm_id, command, t, out)

    async def _async_run_ssh(
        self: "SmolVM", command: Any, argv: List[str], env_items: Any, cwd: Any, t: Any, cap: Any
    ) -> CommandResult:
        from ._vm import _result

        handle = self._h
        out = await _aio.call(lambda done: handle.ssh_exec(argv, env_items, cwd, t, cap, done))
        return _result(self.vm_id, command, t, out)

    # -- the guest's address ----------------------------------------------

    def _ip_of(self: "SmolVM", info: Mapping[str, Any], out: Optional[tuple]) -> str:
        if not info.get("network", True):
            raise _network_error(
                self.vm_id,
                f"VM '{self.vm_id}' has no network (made with network=False or internet_settings "
                "mode='off'); reach its services with vm.expose_local(port)",
                "get_ip",
            )
        assert out is not None
        addr = _first_ipv4(out[3].decode("utf-8", "replace"))
        if addr is None:
            raise _network_error(self.vm_id, f"VM '{self.vm_id}' has no IPv4 address on its network", "get_ip")
        return addr

    _IP_ARGV = ["ip", "-4", "-o", "addr", "show", "scope", "global"]

    def get_ip(self: "SmolVM") -> str:
        """The guest's IPv4 address on its own network (``"10.0.2.15"``),
        as the guest has it. It is private to the VM: the host cannot
        connect to it (use :meth:`expose_local` for that).

        Raises:
            NetworkError: The VM has no network (``network=False`` or
                ``internet_settings`` mode ``"off"``).
            InvalidStateError: The VM is not running.
        """
        handle = self._blocking()
        info = handle.info()
        if not info.get("network", True):
            return self._ip_of(info, None)
        return self._ip_of(info, handle.exec(self._IP_ARGV, [], None, 10.0))

    async def async_get_ip(self: "SmolVM") -> str:
        """:meth:`get_ip` without blocking the event loop."""
        handle = self._h
        info = await _aio.call(lambda done: handle.info(done))
        if not info.get("network", True):
            return self._ip_of(info, None)
        out = await _aio.call(lambda done: handle.exec(self._IP_ARGV, [], None, 10.0, None, None, done))
        return self._ip_of(info, out)


def _check_channel(comm_channel: Any, op: str = "create", vm_id: Optional[str] = None) -> str:
    """``comm_channel`` as ``"vsock"`` or ``"ssh"``."""
    comm_channel = getattr(comm_channel, "value", comm_channel)
    if comm_channel is None:
        return "vsock"
    if comm_channel in ("vsock", "ssh"):
        return str(comm_channel)
    raise _invalid(
        f"comm_channel must be 'vsock' (the guest agent's channel) or 'ssh' (run() through SSH), "
        f"not {comm_channel!r}",
        op,
        vm_id,
    )

