"""Value types of the smolvm SDK: states, configs, results, infos."""

from __future__ import annotations

import datetime as _dt
import ipaddress as _ip
import re as _re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union
from urllib.parse import urlsplit as _urlsplit

from .exceptions import ValidationError

__all__ = [
    "VMState",
    "SnapshotType",
    "CommandResult",
    "InternetSettings",
    "PortForward",
    "VMConfig",
    "VMInfo",
    "SnapshotInfo",
]


class VMState(str, Enum):
    """A VM's lifecycle state. Members are strings: ``VMState.RUNNING == "running"``."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


class SnapshotType(str, Enum):
    """What a snapshot keeps: ``FULL`` (memory, device state and disk of a
    running or paused VM; a restore continues it where it was), ``DISK``
    (the disk of a stopped VM; a restore boots it). ``DIFF`` is not
    supported (:class:`ValidationError`): every snapshot's disk is a layer
    over what it was made from already, so a ``FULL`` one stores only what
    the VM wrote."""

    FULL = "full"
    DIFF = "diff"
    DISK = "disk"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CommandResult:
    """A finished command.

    The output is the guest's, raw (a hostile guest can put terminal escape
    sequences in it): pass it through :func:`smolvm.escape_text` before
    printing it to a terminal.

    Attributes:
        exit_code: Its exit status (128 + N when killed by signal N).
        stdout: Its standard output (UTF-8, undecodable bytes replaced).
        stderr: Its standard error.
        signal: The signal that killed it, or None.
        duration_ms: Its run time, measured in the guest.
        truncated: True when output past ``max_output`` was dropped.
    """

    exit_code: int
    stdout: str
    stderr: str
    signal: Optional[int] = None
    duration_ms: int = 0
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.exit_code == 0

    @property
    def output(self) -> str:
        """``stdout`` without leading and trailing whitespace."""
        return self.stdout.strip()


# -- networking ----------------------------------------------------------

#: ``InternetSettings.mode`` values; ``"restricted"`` (the older package's
#: name) is an allowlist.
_MODES = ("open", "off", "allowlist", "restricted")
_SETTINGS_KEYS = ("mode", "allowed_domains", "allowed_cidrs")
_LABEL = _re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def _invalid(message: str) -> ValidationError:
    return ValidationError(message, {"field": "internet_settings", "operation": "create"})


def _entries(name: str, value: Any) -> List[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
        raise _invalid(f"internet_settings.{name} must be a list of strings, not {value!r}")
    return list(value)


def _domain(entry: Any) -> str:
    """A name as the allowlist keeps it: lowercase, no trailing dot;
    ``*.example.com`` admits the names below ``example.com``."""
    if not isinstance(entry, str):
        raise _invalid(f"internet_settings.allowed_domains entries must be strings, not {entry!r}")
    text = entry.strip().lower()
    if "://" in text:
        # A URL: its host (the older package took URLs too).
        parts = _urlsplit(text)
        if parts.username or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise _invalid(
                f"internet_settings.allowed_domains entry {entry!r} is a URL with more than a host; "
                "give the host name only, such as 'example.com'"
            )
        text = parts.hostname or ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]  # host:port: the allowlist is by name, any port
    name = text.rstrip(".")
    if name == "*":
        raise _invalid("internet_settings.allowed_domains entry '*' admits every name; use mode='open'")
    try:
        _ip.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise _invalid(
            f"internet_settings.allowed_domains entry {entry!r} is an address; "
            "put addresses in allowed_cidrs (e.g. allowed_cidrs=['203.0.113.7'])"
        )
    labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise _invalid(
            f"internet_settings.allowed_domains entry {entry!r} is not a host name; use names such as "
            "'example.com', or '*.example.com' for the names below it"
        )
    return name


def _cidr(entry: Any) -> str:
    """An IPv4 address or network as ``a.b.c.d/n`` (an address is ``/32``)."""
    if not isinstance(entry, str):
        raise _invalid(f"internet_settings.allowed_cidrs entries must be strings, not {entry!r}")
    text = entry.strip()
    try:
        net = _ip.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = _ip.ip_network(text, strict=False)
        except ValueError:
            raise _invalid(
                f"internet_settings.allowed_cidrs entry {entry!r} is not an IPv4 address or network; "
                "use an address such as '203.0.113.7' or a network such as '203.0.113.0/24'"
            ) from None
        one = text.split("/", 1)[0]
        raise _invalid(
            f"internet_settings.allowed_cidrs entry {entry!r} has host bits set past /{loose.prefixlen}: "
            f"the network is '{loose}' (or use '{one}' for that one address)"
        ) from None
    if net.version != 4:
        raise _invalid(
            f"internet_settings.allowed_cidrs entry {entry!r} is IPv6; the guest's network is IPv4 only"
        )
    return str(net)


def _unique(items: List[str]) -> List[str]:
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class InternetSettings:
    """What the guest may reach on the network (``SmolVM(internet_settings=...)``).

    Attributes:
        mode: ``"open"`` (anything but the host's own services, the
            default), ``"off"`` (no network device at all; commands, files
            and port forwards still work: they ride the agent channel), or
            ``"allowlist"`` (only the names and networks listed;
            ``"restricted"``, the older package's name, means the same and
            reads back as ``"allowlist"``). None: ``"allowlist"`` when
            something is listed, else ``"open"``.
        allowed_domains: Host names the guest may resolve and connect to
            (``"example.com"``, ``"*.example.com"`` for the names below
            it); kept lowercase without a trailing dot. A URL gives its
            host; ``"*"`` alone means ``mode="open"``.
        allowed_cidrs: IPv4 addresses and networks the guest may connect
            to (``"203.0.113.7"``, kept as ``"203.0.113.7/32"``, or
            ``"10.1.0.0/16"``).

    A bad value is a :class:`ValidationError` at once, naming the entry and
    what would do instead.
    """

    mode: Optional[str] = None
    allowed_domains: List[str] = field(default_factory=list)
    allowed_cidrs: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        mode = getattr(self.mode, "value", self.mode)
        if mode is not None and (not isinstance(mode, str) or mode.lower() not in _MODES):
            accepted = ", ".join(repr(m) for m in _MODES)
            raise _invalid(f"internet_settings.mode must be one of {accepted}, not {mode!r}")
        raw_domains = _entries("allowed_domains", self.allowed_domains)
        cidrs = _unique([_cidr(c) for c in _entries("allowed_cidrs", self.allowed_cidrs)])
        if mode is None and raw_domains and all(isinstance(d, str) and d.strip() == "*" for d in raw_domains):
            # The older package's default, ["*"]: everything.
            raw_domains = []
            mode = "open" if not cidrs else None
        domains = _unique([_domain(d) for d in raw_domains])
        if mode is None:
            mode = "allowlist" if domains or cidrs else "open"
        mode = mode.lower()
        if mode == "restricted":
            mode = "allowlist"
        if mode == "allowlist" and not domains and not cidrs:
            raise _invalid(
                "internet_settings: an allowlist with no allowed_domains and no allowed_cidrs lets "
                "nothing through; use mode='off' for no network, or list what the guest may reach"
            )
        if mode != "allowlist" and (domains or cidrs):
            raise _invalid(
                f"internet_settings: allowed_domains and allowed_cidrs apply to mode='allowlist' "
                f"(or 'restricted') only, not mode={mode!r}"
            )
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "allowed_domains", domains)
        object.__setattr__(self, "allowed_cidrs", cidrs)

    @classmethod
    def _coerce(cls, value: Any) -> "InternetSettings":
        """An ``InternetSettings`` from one, a dict with its keys, or an
        object with its attributes (the older package's settings)."""
        if isinstance(value, InternetSettings):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(str(k) for k in value if k not in _SETTINGS_KEYS)
            if unknown:
                accepted = ", ".join(repr(k) for k in _SETTINGS_KEYS)
                raise _invalid(
                    f"internet_settings has no key {unknown[0]!r}; the keys are {accepted}"
                )
            return cls(**{str(k): v for k, v in value.items()})
        if any(hasattr(value, k) for k in _SETTINGS_KEYS):
            return cls(**{k: getattr(value, k) for k in _SETTINGS_KEYS if hasattr(value, k)})
        raise _invalid(
            "internet_settings must be an InternetSettings or a dict with keys "
            f"{', '.join(repr(k) for k in _SETTINGS_KEYS)}, not {type(value).__name__}"
        )

    def _policy(self) -> Any:
        """The library's egress policy (its JSON form)."""
        if self.mode == "allowlist":
            return {"allowlist": {"domains": list(self.allowed_domains), "cidrs": list(self.allowed_cidrs)}}
        return self.mode

    @classmethod
    def _from_policy(cls, policy: Any) -> "InternetSettings":
        if isinstance(policy, Mapping) and "allowlist" in policy:
            a = policy["allowlist"] or {}
            return cls("allowlist", list(a.get("domains") or []), list(a.get("cidrs") or []))
        return cls(policy if policy in ("open", "off") else "open")


@dataclass(frozen=True)
class PortForward:
    """A host TCP port forwarded to a port on the guest's loopback
    (:meth:`SmolVM.list_ports`, ``SmolVM(ports=...)``). The connection
    rides the agent channel: it needs no guest network, and services the
    guest binds to its own ``127.0.0.1`` are reached too.

    Attributes:
        host_port: The host port (bound).
        guest_port: The guest port.
        host_address: The host address it listens on (``127.0.0.1``
            unless asked otherwise).
    """

    host_port: int
    guest_port: int
    host_address: str = "127.0.0.1"

    @classmethod
    def _from_native(cls, d: Mapping[str, Any]) -> "PortForward":
        return cls(
            host_port=int(d["host_port"]),
            guest_port=int(d["guest_port"]),
            host_address=str(d.get("host_address") or d.get("host_addr") or "127.0.0.1"),
        )


# Fields of the older Python `smolvm` package's VMConfig that select things
# this SDK does not do (custom kernels and disks): accepted as None only, so
# code that sets them learns so at once instead of getting another VM.
_UNSUPPORTED = ("kernel_path", "initrd_path", "rootfs_path", "boot_args")


@dataclass(frozen=True)
class VMConfig:
    """How a VM is made (the older Python ``smolvm`` package's names).

    Attributes:
        vm_id: Its name (id): 1-63 of ``a-z 0-9 _ -``, starting with a letter
            or digit; generated (``sbx-xxxxxxxx``) when None.
        vcpu_count: vCPUs, 1-32.
        memory: Guest memory in MiB, 128-16384.
        disk_size_mib: Root disk size in MiB (at least the image's); the
            image's size when None.
        env_vars: Environment for every command run in the VM.
        image: Guest image name (default ``debian-12``).
        guest_os: ``"debian"`` (or None); other systems have no image yet.
        backend: ``"auto"``, ``"qemu"`` (``"firecracker"`` is not available).
        comm_channel: ``"vsock"`` (the guest agent channel), ``"ssh"``
            (:meth:`SmolVM.run` through SSH) or None. A choice of the
            handle, not of the VM: an info always says ``"vsock"``.
        network: Outbound network for the guest (never the host's own
            services).
        internet_settings: What the guest may reach (an
            :class:`InternetSettings` or a dict); None: open (``"off"``
            when ``network`` is False).
        ports: Host ports forwarded to the guest whenever it starts (as
            ``SmolVM(ports=...)``); ``host_port`` 0 picks a free one each
            start.
    """

    vm_id: Optional[str] = None
    vcpu_count: int = 1
    memory: int = 512
    disk_size_mib: Optional[int] = None
    env_vars: Dict[str, str] = field(default_factory=dict)
    image: Optional[str] = None
    guest_os: Optional[str] = None
    backend: Optional[str] = None
    comm_channel: Optional[str] = None
    network: bool = True
    internet_settings: Optional[InternetSettings] = None
    ports: List[Any] = field(default_factory=list)
    kernel_path: Optional[Any] = None
    initrd_path: Optional[Any] = None
    rootfs_path: Optional[Any] = None
    boot_args: Optional[str] = None


def _settings_of(d: Mapping[str, Any]) -> Optional[InternetSettings]:
    """A VM's egress policy as its info has it: None when the info does
    not carry it (``SmolVM.list()``); ``"off"`` for a VM without network."""
    if not d.get("network", True):
        return InternetSettings("off")
    if "egress" not in d:
        return None
    return InternetSettings._from_policy(d["egress"])


@dataclass(frozen=True)
class VMInfo:
    """A VM as the inventory has it, with crash truth applied (a VM whose
    processes died is ``ERROR``, never ``RUNNING``).

    Attributes:
        vm_id: Its id (name).
        status: Its state.
        config: How it was made.
        pid: Its VMM's process id while it runs.
        supervisor_pid: Its supervisor's process id while it runs.
        accel: The accelerator of its last boot (``"kvm"``, ``"tcg"``).
        created_at: When it was made.
        updated_at: When its record last changed.
        last_error: Why it is in ``ERROR`` (or why it stopped), if known.
        boot_count: How many times it booted.
        data_dir: Its directory on the host.
    """

    vm_id: str
    status: VMState
    config: VMConfig
    pid: Optional[int] = None
    supervisor_pid: Optional[int] = None
    accel: Optional[str] = None
    created_at: Optional[_dt.datetime] = None
    updated_at: Optional[_dt.datetime] = None
    last_error: Optional[str] = None
    boot_count: int = 0
    data_dir: Optional[Path] = None

    @classmethod
    def _from_native(cls, d: Mapping[str, Any]) -> "VMInfo":
        def when(ms: Optional[int]) -> Optional[_dt.datetime]:
            if ms is None:
                return None
            return _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc)

        config = VMConfig(
            vm_id=d["id"],
            vcpu_count=d["cpus"],
            memory=d["memory_mib"],
            disk_size_mib=d.get("disk_size_mib"),
            env_vars=dict(d.get("env") or {}),
            image=d["image"],
            guest_os="debian" if d["image"].startswith("debian") else None,
            backend="qemu",
            comm_channel="vsock",
            network=d["network"],
            internet_settings=_settings_of(d),
            ports=[PortForward._from_native(p) for p in d.get("ports") or []],
        )
        return cls(
            vm_id=d["id"],
            status=VMState(d["state"]),
            config=config,
            pid=d.get("vmm_pid"),
            supervisor_pid=d.get("supervisor_pid"),
            accel=d.get("accel"),
            created_at=when(d.get("created_at")),
            updated_at=when(d.get("updated_at")),
            last_error=d.get("last_error"),
            boot_count=d.get("boot_count", 0),
            data_dir=Path(d["vm_dir"]) if d.get("vm_dir") else None,
        )


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot (:meth:`SmolVM.snapshot`, :meth:`SmolVM.list_snapshots`).

    Attributes:
        snapshot_id: Its id (the VM naming rule: 1-63 of ``a-z 0-9 _ -``).
        vm_id: The VM it was taken of (a restore with ``vm_id=None`` goes
            back into that id).
        snapshot_type: ``FULL`` or ``DISK``.
        created_at: When it was taken.
        path: Its directory on the host.
        memory_mib: The source's guest memory (MiB).
        vcpus: The source's vCPUs.
        size_bytes: Bytes it takes on disk (device state, guest RAM and
            the disk layer it froze; the image under it is shared).
        used_by: The VMs whose disk is layered on it: its files stay while
            there are any, even after :meth:`SmolVM.delete_snapshot`.
        image: The source's guest image.
        state_bytes: Of ``size_bytes``: the device state.
        memory_bytes: Of ``size_bytes``: the guest RAM.
        disk_bytes: Of ``size_bytes``: the frozen disk layer.
    """

    snapshot_id: str
    vm_id: str
    snapshot_type: Union[SnapshotType, str] = SnapshotType.FULL
    created_at: Optional[_dt.datetime] = None
    path: Optional[Path] = None
    memory_mib: int = 0
    vcpus: int = 0
    size_bytes: int = 0
    used_by: List[str] = field(default_factory=list)
    image: Optional[str] = None
    state_bytes: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0

    @classmethod
    def _from_native(cls, d: Mapping[str, Any]) -> "SnapshotInfo":
        try:
            kind: Union[SnapshotType, str] = SnapshotType(d["kind"])
        except ValueError:
            kind = str(d["kind"])
        return cls(
            snapshot_id=d["id"],
            vm_id=d["source_vm"],
            snapshot_type=kind,
            created_at=_dt.datetime.fromtimestamp(d["created_at_ms"] / 1000, tz=_dt.timezone.utc),
            path=Path(d["dir"]) if d.get("dir") else None,
            memory_mib=int(d.get("memory_mib", 0)),
            vcpus=int(d.get("cpus", 0)),
            size_bytes=int(d.get("size_bytes", 0)),
            used_by=list(d.get("used_by") or []),
            image=d.get("image"),
            state_bytes=int(d.get("state_bytes", 0)),
            memory_bytes=int(d.get("memory_bytes", 0)),
            disk_bytes=int(d.get("disk_bytes", 0)),
        )


@dataclass(frozen=True)
class StreamEvent:
    """One event of :meth:`SmolVM.run_stream`.

    Attributes:
        type: ``"started"``, ``"stdout"``, ``"stderr"`` or ``"exit"``.
        data: The output chunk (``stdout``/``stderr``; UTF-8, undecodable
            bytes replaced; a character split across chunks is kept whole),
            else ``""``.
        timestamp: When it reached the host (``time.time()``).
        exit_code: With ``"exit"``: the exit status (128 + N when killed by
            signal N).
        pid: With ``"started"``: the guest pid.
    """

    type: str
    data: str = ""
    timestamp: float = 0.0
    exit_code: Optional[int] = None
    pid: Optional[int] = None


@dataclass(frozen=True)
class FileInfo:
    """A guest path's metadata (:meth:`SmolVM.files` ``.stat``/``.list``).

    Attributes:
        name: The entry's name (``list``) or the path (``stat``).
        kind: ``"file"``, ``"dir"``, ``"symlink"`` or ``"other"``.
        size: Bytes.
        mode: Permission bits (``0o644``...).
        mtime: Modification time, seconds since the epoch.
        link_target: Where a symlink points (not followed).
    """

    name: str
    kind: str
    size: int
    mode: int
    mtime: float
    link_target: Optional[str] = None

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @classmethod
    def _from_native(cls, name: str, d: dict) -> "FileInfo":
        return cls(
            name=name,
            kind=str(d["kind"]).lower(),
            size=int(d["size"]),
            mode=int(d["mode"]),
            mtime=int(d["mtime_ns"]) / 1e9,
            link_target=d.get("link_target"),
        )
