"""Value types of the smolvm SDK: states, configs, results, infos."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

__all__ = [
    "VMState",
    "SnapshotType",
    "CommandResult",
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
        comm_channel: ``"vsock"`` (the guest agent channel) or None.
        network: Outbound network for the guest (never the host's own
            services).
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
    kernel_path: Optional[Any] = None
    initrd_path: Optional[Any] = None
    rootfs_path: Optional[Any] = None
    boot_args: Optional[str] = None


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
