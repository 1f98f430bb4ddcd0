"""The :class:`SmolVM` handle."""

import asyncio
import codecs
import json
import os
import time
import warnings
import logging
import sys
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Union,
)

from . import _aio, _native
from ._net import NetworkMethods, _check_channel, _egress_spec, _ports_spec
from .exceptions import (
    OperationTimeoutError,
    SmolVMError,
    ValidationError,
    _from_native,
)
from .types import (
    CommandResult,
    InternetSettings,
    SnapshotInfo,
    SnapshotType,
    StreamEvent,
    VMConfig,
    VMInfo,
    VMState,
)

__all__ = ["SmolVM"]

log = logging.getLogger("smolvm")

ProgressCallback = Callable[[str], None]

# `os=` values of the older Python `smolvm` package, and our image for each.
_IMAGES_BY_OS = {"debian": "debian-12"}
_DEFAULT_IMAGE = "debian-12"


def _validation(message: str, op: str = "create", vm_id: Optional[str] = None) -> ValidationError:
    return _from_native("invalid_input", message, vm_id, None, op)  # type: ignore[return-value]


def _seconds(
    op: str, name: str, value: Any, *, vm_id: Optional[str] = None, allow_none: bool = False, positive: bool = False
) -> Optional[float]:
    """A number of seconds from the caller, or a ValidationError saying why not."""
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok and (value > 0 if positive else value >= 0) and value < 1e9:
        return float(value)
    what = "a positive" if positive else "a non-negative"
    none = " or None (no limit)" if allow_none else ""
    raise _validation(f"{name} must be {what} number of seconds{none}, not {value!r}", op, vm_id)


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _validation(f"{name} must be an integer, not {value!r}")
    return value


def _disk_mib(value: Union[int, str, None]) -> Optional[int]:
    """``disk_size``: MiB as an int, or a string such as ``"4G"``/``"512M"``."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("B")
        units = {"M": 1, "MI": 1, "G": 1024, "GI": 1024, "T": 1024 * 1024, "TI": 1024 * 1024}
        for suffix in sorted(units, key=len, reverse=True):
            if text.endswith(suffix) and text[: -len(suffix)].strip().isdigit():
                return int(text[: -len(suffix)]) * units[suffix]
        if text.isdigit():
            return int(text)
        raise _validation(f"disk_size {value!r} is not a size; use MiB as an int or a string like '4G'")
    return _check_int("disk_size", value)


def _env(name: str, env: Optional[Mapping[str, str]]) -> Dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise _validation(f"{name} must be a dict of str to str, not {type(env).__name__}")
    out = {}
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise _validation(f"{name} must map str to str; {k!r}: {v!r} does not")
        out[k] = v
    return out


def _value(x: Any) -> Any:
    """An enum member's value (the older package passes str enums)."""
    return getattr(x, "value", x)


def _image_for(image: Optional[str], os: Any) -> str:
    os = _value(os)
    if os is None:
        return image or _DEFAULT_IMAGE
    if not isinstance(os, str):
        raise _validation(f"os must be a string such as 'debian', not {os!r}")
    mapped = _IMAGES_BY_OS.get(os.lower())
    if mapped is None:
        known = ", ".join(f"os={k!r} (image {v!r})" for k, v in _IMAGES_BY_OS.items())
        raise _validation(f"no {os!r} guest image exists; available: {known}")
    if image is not None and image != mapped:
        raise _validation(f"os={os!r} means image {mapped!r}; drop os= or image=")
    return mapped


def _check_backend(backend: Any) -> None:
    backend = _value(backend)
    if backend is None:
        return
    if not isinstance(backend, str):
        raise _validation(f"backend must be a string such as 'qemu', not {backend!r}")
    _native.check_backend(backend)


def _stderr_progress(text: str) -> None:
    print(f"smolvm: {text}", file=sys.stderr, flush=True)


def _progress(on_progress: Optional[ProgressCallback]) -> Callable[[str, str], None]:
    """The native progress callback: image steps to ``on_progress`` (or
    stderr, since an image build takes a minute), the rest to logging."""

    def report(kind: str, text: str) -> None:
        if kind == "log":
            log.debug("%s", text)
            return
        log.info("%s", text)
        if on_progress is not None:
            on_progress(text)
        elif kind == "image":
            _stderr_progress(text)

    return report


def _result(vm_id: str, command: Any, timeout: Optional[float], out: tuple) -> CommandResult:
    code, signal, timed_out, stdout, stderr, truncated, duration_ms = out
    if timed_out:
        err = _from_native(
            "timeout",
            f"VM '{vm_id}': the command ran out of its {timeout:g}s timeout; it and its process "
            "group were killed in the guest (pass a larger timeout=, or None for no limit)",
            vm_id,
            None,
            "run",
            {"timeout_seconds": timeout, "command": command},
        )
        # What it printed before it was killed.
        err.stdout = stdout.decode("utf-8", "replace")  # type: ignore[attr-defined]
        err.stderr = stderr.decode("utf-8", "replace")  # type: ignore[attr-defined]
        raise err
    if code is None:
        code = 128 + signal if signal is not None else 255
    return CommandResult(
        exit_code=code,
        stdout=stdout.decode("utf-8", "replace"),
        stderr=stderr.decode("utf-8", "replace"),
        signal=signal,
        duration_ms=duration_ms,
        truncated=truncated,
    )


_DEFAULTS = {"memory": 512, "vcpus": 1, "network": True, "cold": False}

#: Most bytes :meth:`SmolVM.run` keeps of each output stream by default:
#: a guest cannot make one call hold gigabytes of host memory (decoded
#: text can be four times the bytes).
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024


class _Events:
    """Turns the native events of one command into :class:`StreamEvent`s
    (UTF-8 decoded incrementally, so a character split across chunks stays
    whole); raises the command's timeout or failure."""

    def __init__(
        self, vm_id: str, command: Any, timeout: Optional[float], op: str = "run", raise_timeout: bool = True
    ) -> None:
        self.vm_id, self.command, self.timeout = vm_id, command, timeout
        self.op, self.raise_timeout = op, raise_timeout
        self.ended = False
        self.dec = {k: codecs.getincrementaldecoder("utf-8")("replace") for k in ("stdout", "stderr")}

    def feed(self, ev: Any) -> List[StreamEvent]:
        now = time.time()
        if ev is None:
            self.ended = True
            return []
        kind, payload = ev
        if kind == "started":
            return [StreamEvent("started", "", now, pid=payload)]
        if kind in self.dec:
            text = self.dec[kind].decode(payload)
            return [StreamEvent(kind, text, now)] if text else []
        if kind == "attached":
            _offset, dropped = payload
            return [StreamEvent("dropped", str(dropped), now)] if dropped else []
        if kind == "exit":
            self.ended = True
            out = []
            for k, d in self.dec.items():
                rest = d.decode(b"", final=True)
                if rest:
                    out.append(StreamEvent(k, rest, now))
            code, signal, timed_out, duration_ms = payload
            if timed_out and self.raise_timeout:
                _result(self.vm_id, self.command, self.timeout, (code, signal, True, b"", b"", False, duration_ms))
            if code is None:
                code = 128 + signal if signal is not None else 255
            out.append(StreamEvent("exit", "", now, exit_code=code))
            return out
        if kind == "error":
            self.ended = True
            raise _from_native(payload[0], payload[1], self.vm_id, None, self.op)
        return []


def _guest(path: Any, op: str, vm: "SmolVM") -> str:
    if not isinstance(path, str):
        raise _validation(f"a guest path must be a string, not {path!r}", op, vm.vm_id)
    return path


if TYPE_CHECKING:  # pragma: no cover
    from ._files import Files
    from ._procs import BackgroundProcess, ProcessInfo
    from ._pty import PtySession


def _max_output(value: Any, vm_id: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _validation(f"max_output must be a non-negative number of bytes or None, not {value!r}", "run", vm_id)
    return value


def _create_spec(
    config: Optional[VMConfig],
    name: Optional[str],
    image: Optional[str],
    memory: int,
    vcpus: int,
    disk_size: Union[int, str, None],
    network: bool,
    env: Optional[Mapping[str, str]],
    backend: Optional[str],
    os: Optional[str],
    comm_channel: Optional[str],
    cold: bool = False,
    internet_settings: Any = None,
    ports: Any = None,
) -> str:
    """The library's SandboxConfig (JSON) for these arguments, checked."""
    if config is not None and not isinstance(config, VMConfig):
        raise _validation(
            f"config must be a smolvm.types.VMConfig, not {type(config).__name__} "
            "(the other arguments are keyword-only: SmolVM(memory=1024))"
        )
    if config is not None:
        given = sorted(
            k
            for k, v in dict(
                name=name, image=image, disk_size=disk_size, env=env, os=os,
                memory=memory, vcpus=vcpus, network=network,
                internet_settings=internet_settings, ports=ports,
            ).items()
            if v is not None and v != _DEFAULTS.get(k)
        )
        if given:
            raise _validation(f"pass either config= or {', '.join(given)}, not both")
        for field_name in ("kernel_path", "initrd_path", "rootfs_path", "boot_args"):
            if getattr(config, field_name) is not None:
                raise _validation(
                    f"VMConfig.{field_name} is not supported: smolvm boots its own kernel "
                    "and images; choose an image with image= (SmolVM.list() shows what VMs use)"
                )
        backend = backend if backend is not None else config.backend
        comm_channel = comm_channel if comm_channel is not None else config.comm_channel
        name, memory, vcpus = config.vm_id, config.memory, config.vcpu_count
        disk_size, network, env = config.disk_size_mib, config.network, config.env_vars
        internet_settings, ports = config.internet_settings, config.ports
        image = _image_for(config.image, config.guest_os)
    else:
        image = _image_for(image, os)
    _check_backend(backend)
    _check_channel(comm_channel)
    if name is not None and not isinstance(name, str):
        raise _validation(f"name must be a string, not {name!r}")
    if not isinstance(network, bool):
        raise _validation(f"network must be True or False, not {network!r}")
    if not isinstance(cold, bool):
        raise _validation(f"cold must be True or False, not {cold!r}")
    egress, network = _egress_spec(internet_settings, network)
    spec: Dict[str, Any] = {
        "name": name,
        "image": image,
        "memory_mib": _check_int("memory", memory),
        "cpus": _check_int("vcpus", vcpus),
        "disk_size_mib": _disk_mib(disk_size),
        "network": network,
        "env": _env("env", env),
        "cold": cold,
        "ports": _ports_spec(ports),
    }
    if egress is not None:
        spec["egress"] = egress
    for key in ("memory_mib", "cpus", "disk_size_mib"):
        if spec[key] is not None and spec[key] < 0:
            raise _validation(f"{key} must not be negative")
    return json.dumps(spec)


def _opt_str(name: str, value: Any, op: str, vm_id: Optional[str] = None) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise _validation(f"{name} must be a string or None, not {value!r}", op, vm_id)
    return value


def _flag(name: str, value: Any, op: str, vm_id: Optional[str] = None) -> bool:
    if not isinstance(value, bool):
        raise _validation(f"{name} must be True or False, not {value!r}", op, vm_id)
    return value


def _disk_only(snapshot_type: Any, vm_id: str) -> bool:
    """Whether ``snapshot_type`` asks for a disk-only snapshot."""
    kind = _value(snapshot_type)
    if isinstance(kind, str):
        kind = kind.lower()
    if kind == "diff":
        raise _validation(
            "diff snapshots are not supported: every snapshot's disk is a layer over what the VM "
            "was made from already (a full snapshot stores only what the VM wrote); use "
            "SnapshotType.FULL (or SnapshotType.DISK for a stopped VM)",
            "snapshot",
            vm_id,
        )
    if kind not in ("full", "disk"):
        raise _validation(
            f"snapshot_type must be SnapshotType.FULL or SnapshotType.DISK, not {snapshot_type!r}", "snapshot", vm_id
        )
    return kind == "disk"


def _restore_args(snapshot_id: Any, vm_id: Any, backend: Any, resume_vm: Any, boot_timeout: Any) -> tuple:
    """Checked arguments of :meth:`SmolVM.from_snapshot` for the native call."""
    if not isinstance(snapshot_id, str):
        raise _validation(f"snapshot_id must be a string, not {snapshot_id!r}", "from_snapshot")
    into = _opt_str("vm_id", vm_id, "from_snapshot")
    _check_backend(backend)
    resume = _flag("resume_vm", resume_vm, "from_snapshot", into)
    t = _seconds("from_snapshot", "boot_timeout", boot_timeout, vm_id=into, positive=True)
    return snapshot_id, into, resume, t


#: Most VMs one :meth:`SmolVM.fork` makes.
MAX_FORK = 256


def _fork_count(count: Any, vm_id: str) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORK:
        raise _validation(f"count must be an int from 1 to {MAX_FORK}, not {count!r}", "fork", vm_id)
    return count


def _snapshot_id_arg(snapshot_id: Any, op: str) -> str:
    if not isinstance(snapshot_id, str):
        raise _validation(f"snapshot_id must be a string, not {snapshot_id!r}", op)
    return snapshot_id


def _no_running_loop(method: str) -> None:
    """Warns when a blocking call is made on an event loop's thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    warnings.warn(
        f"SmolVM.{method}() blocks the running event loop; await SmolVM.async_{method}() instead",
        RuntimeWarning,
        stacklevel=3,
    )


class SmolVM(NetworkMethods):
    """A disposable, hardware-isolated Linux VM.

    ``SmolVM()`` creates a VM (state ``CREATED``; its image is built first
    when missing, with progress on stderr). As a context manager it is
    started on entry, and on exit deleted when this handle created it (only
    stopped when it came from :meth:`from_id`); a VM whose start fails on
    entry is deleted at once when this handle created it::

        with SmolVM() as vm:
            print(vm.run("hostname").output)

    A running VM can be snapshotted (:meth:`snapshot`), restored
    (:meth:`from_snapshot`: into a new VM or back into itself) and forked
    into copies (:meth:`fork`), each in well under a second.

    A VM outlives its handle: ``close()`` it, and ``SmolVM.from_id(vm_id)``
    reaches it again from any process (closing a handle inside a ``with``
    block keeps the VM: the block then leaves it alone). A handle is safe to
    use from many threads at once; blocking calls release the GIL. In
    asyncio code use ``await SmolVM.async_create(...)`` and the ``async_*``
    methods.

    Args:
        config: A :class:`VMConfig` (instead of the keyword arguments).
        name: The VM's id: 1-63 of ``a-z 0-9 _ -``; generated when None.
        image: Guest image (default ``debian-12``).
        memory: Guest memory in MiB (128-16384).
        vcpus: vCPUs (1-32).
        disk_size: Root disk size: MiB as an int, or a string like ``"4G"``;
            the image's size when None.
        network: Outbound network for the guest; the guest never reaches
            the host's own services. False: no network device at all.
        internet_settings: What the guest may reach: an
            :class:`InternetSettings` or a dict with its keys (``mode``
            ``"open"``/``"off"``/``"allowlist"``/``"restricted"``,
            ``allowed_domains``, ``allowed_cidrs``). ``mode="off"`` is
            ``network=False``.
        ports: Host ports forwarded to the guest whenever it starts: guest
            ports (``8080``: on a free host port), ``"HOST:GUEST"`` strings
            (``"ADDR:HOST:GUEST"`` to listen beyond 127.0.0.1), ``(host,
            guest)`` tuples, dicts ``{"host_port": ..., "guest_port":
            ...}`` or :class:`PortForward` objects. A taken host port fails the
            start (:class:`NetworkError`). :meth:`list_ports` shows them.
        env: Environment variables for every command run in the VM.
        vm_id: Reconnect to this existing VM instead (as :meth:`from_id`).
        backend: ``"auto"`` or ``"qemu"``; a VMM that cannot run here is a
            :class:`HostError`.
        os: ``"debian"``; other systems have no image yet
            (:class:`ValidationError`).
        comm_channel: How :meth:`run` reaches the guest: ``"vsock"`` (the
            guest agent's channel, the default) or ``"ssh"`` (a real SSH
            login, one kept connection per VM). A choice of this handle:
            other handles on the VM choose their own.
        cold: Always boot the guest. By default a VM's first start
            continues the warm boot snapshot of its image and shape (made
            by the first VM of that shape to boot): much faster, with
            identity (hostname, entropy, clock) made anew; ``cold=True``
            neither uses one nor leaves one.
        on_progress: Called with a line of text at each step of an image
            build or boot, instead of printing image steps to stderr.

    Raises:
        ValidationError: A bad value (the message says which and why).
        VMAlreadyExistsError: ``name`` is taken.
        ImageError: The image cannot be built or found.
        HostError: A tool or host feature is missing.
    """

    def __init__(
        self,
        config: Optional[VMConfig] = None,
        *,
        name: Optional[str] = None,
        image: Optional[str] = None,
        memory: int = 512,
        vcpus: int = 1,
        disk_size: Union[int, str, None] = None,
        network: bool = True,
        env: Optional[Mapping[str, str]] = None,
        vm_id: Optional[str] = None,
        backend: Optional[str] = None,
        os: Optional[str] = None,
        comm_channel: Optional[str] = None,
        cold: bool = False,
        internet_settings: Union[InternetSettings, Mapping[str, Any], None] = None,
        ports: Optional[Sequence[Any]] = None,
        on_progress: Optional[ProgressCallback] = None,
    ) -> None:
        self._on_progress = on_progress
        self._closed = False
        self._channel = "vsock"
        if vm_id is not None:
            given = sorted(
                k
                for k, v in dict(
                    config=config, name=name, image=image, disk_size=disk_size, env=env, os=os,
                    memory=memory, vcpus=vcpus, network=network, cold=cold,
                    internet_settings=internet_settings, ports=ports,
                ).items()
                if v is not None and v != _DEFAULTS.get(k)
            )
            if given:
                raise _validation(f"vm_id= reconnects to an existing VM; drop {', '.join(given)}", "from_id", vm_id)
            _check_backend(backend)
            self._channel = _check_channel(comm_channel, "from_id", vm_id)
            self._native = _native.Sandbox.from_id(_vm_id_arg(vm_id), _progress(on_progress))
            self._owns_vm = False
            return
        spec = _create_spec(
            config, name, image, memory, vcpus, disk_size, network, env, backend, os, comm_channel, cold,
            internet_settings, ports,
        )
        self._channel = _channel_of(config, comm_channel)
        # No warning on an event loop: `async with SmolVM() as vm` is the
        # documented form, and a create takes milliseconds once the image
        # exists (`await SmolVM.async_create()` when it may not).
        self._native = _native.Sandbox.create(spec, _progress(on_progress))
        self._owns_vm = True

    @classmethod
    def _adopt(
        cls, handle: Any, owns: bool, on_progress: Optional[ProgressCallback], channel: str = "vsock"
    ) -> "SmolVM":
        vm = cls.__new__(cls)
        vm._native = handle
        vm._owns_vm = owns
        vm._closed = False
        vm._on_progress = on_progress
        vm._channel = channel
        return vm

    @classmethod
    async def async_create(
        cls,
        config: Optional[VMConfig] = None,
        *,
        name: Optional[str] = None,
        image: Optional[str] = None,
        memory: int = 512,
        vcpus: int = 1,
        disk_size: Union[int, str, None] = None,
        network: bool = True,
        env: Optional[Mapping[str, str]] = None,
        backend: Optional[str] = None,
        os: Optional[str] = None,
        comm_channel: Optional[str] = None,
        cold: bool = False,
        internet_settings: Union[InternetSettings, Mapping[str, Any], None] = None,
        ports: Optional[Sequence[Any]] = None,
        on_progress: Optional[ProgressCallback] = None,
    ) -> "SmolVM":
        """``SmolVM(...)`` without blocking the event loop (an image build
        can take a minute); cancelling it undoes the VM's creation::

            async with await SmolVM.async_create(memory=1024) as vm:
                print((await vm.async_run("hostname")).output)
        """
        spec = _create_spec(
            config, name, image, memory, vcpus, disk_size, network, env, backend, os, comm_channel, cold,
            internet_settings, ports,
        )
        channel = _channel_of(config, comm_channel)
        progress = _progress(on_progress)
        handle = await _aio.call(
            lambda done: _native.Sandbox.create(spec, progress, done),
            # Made just as the await was cancelled: remove it in the background.
            orphan=lambda h: h.delete(lambda ok, value: None),
        )
        return cls._adopt(handle, True, on_progress, channel)

    # -- reconnecting and listing -------------------------------------

    @classmethod
    def from_id(
        cls,
        vm_id: str,
        *,
        comm_channel: Optional[str] = None,
        on_progress: Optional[ProgressCallback] = None,
    ) -> "SmolVM":
        """A handle on an existing VM, from any process.

        Leaving a ``with`` block of such a handle stops the VM but does not
        delete it. ``comm_channel="ssh"`` makes this handle's :meth:`run`
        go through SSH (as ``SmolVM(comm_channel=...)``).

        Raises:
            VMNotFoundError: No VM has that id.
            ValidationError: No VM can have that id.
        """
        channel = _check_channel(comm_channel, "from_id", vm_id if isinstance(vm_id, str) else None)
        _no_running_loop("from_id")
        handle = _native.Sandbox.from_id(_vm_id_arg(vm_id), _progress(on_progress))
        return cls._adopt(handle, False, on_progress, channel)

    @classmethod
    async def async_from_id(
        cls,
        vm_id: str,
        *,
        comm_channel: Optional[str] = None,
        on_progress: Optional[ProgressCallback] = None,
    ) -> "SmolVM":
        """:meth:`from_id` without blocking the event loop."""
        vm_id = _vm_id_arg(vm_id)
        channel = _check_channel(comm_channel, "from_id", vm_id)
        progress = _progress(on_progress)
        handle = await _aio.call(lambda done: _native.Sandbox.from_id(vm_id, progress, done))
        return cls._adopt(handle, False, on_progress, channel)

    @staticmethod
    def list() -> List[VMInfo]:
        """Every VM of this user (``smolvm ls --all`` shows the same ones)."""
        return [VMInfo._from_native(d) for d in _native.Sandbox.list()]

    @staticmethod
    async def async_list() -> List[VMInfo]:
        """:meth:`list` without blocking the event loop."""
        items = await _aio.call(lambda done: _native.Sandbox.list(done))
        return [VMInfo._from_native(d) for d in items]

    # -- identity and state ------------------------------------------

    @property
    def _h(self) -> Any:
        if self._closed:
            vm_id = self._native.vm_id
            raise _from_native(
                "invalid_state",
                f"this handle on VM '{vm_id}' is closed; SmolVM.from_id({vm_id!r}) opens another",
                vm_id,
                None,
                "handle",
            )
        return self._native

    @property
    def vm_id(self) -> str:
        """The VM's id (its name)."""
        return self._native.vm_id

    @property
    def name(self) -> str:
        """The VM's name (the same as its id)."""
        return self._native.vm_id

    @property
    def info(self) -> VMInfo:
        """The VM as the inventory has it now (read afresh each time)."""
        return VMInfo._from_native(self._h.info())

    async def async_info(self) -> VMInfo:
        """:attr:`info` without blocking the event loop."""
        h = self._h
        return VMInfo._from_native(await _aio.call(lambda done: h.info(done)))

    @property
    def status(self) -> VMState:
        """The VM's state now (read afresh each time)."""
        return self.info.status

    def refresh(self) -> "SmolVM":
        """Re-reads the VM's record (crash truth applied); returns self.

        Raises:
            VMNotFoundError: The VM was deleted.
        """
        self._h.info()
        return self

    def can_run_commands(self) -> bool:
        """Whether this VM takes commands (its guest agent channel): True
        for every smolvm VM while the handle is open. Whether it does *now*
        depends on its state; :meth:`wait_for_ready` waits for that."""
        return not self._closed

    # -- lifecycle ---------------------------------------------------

    def start(self, boot_timeout: float = 30.0) -> "SmolVM":
        """Boots the VM (created or stopped), resumes it (paused), or does
        nothing (running); returns once its guest agent answers. Interrupted
        (Ctrl-C) before that, the boot is ended and the VM left as it was.

        Raises:
            BootError: It did not boot in time (``console_tail`` holds the
                guest console's last lines).
            InvalidStateError: It is in ``ERROR`` (delete it).
        """
        t = _seconds("start", "boot_timeout", boot_timeout, vm_id=self.vm_id, positive=True)
        _no_running_loop("start")
        self._h.start(t)
        return self

    def stop(self, timeout: float = 3.0) -> "SmolVM":
        """Shuts the guest down gracefully; its VMM is killed after
        ``timeout`` seconds. No-op when it is not running."""
        t = _seconds("stop", "timeout", timeout, vm_id=self.vm_id)
        _no_running_loop("stop")
        self._h.stop(t)
        return self

    def pause(self) -> "SmolVM":
        """Freezes the vCPUs; memory and processes stay as they are."""
        _no_running_loop("pause")
        self._h.pause()
        return self

    def resume(self) -> "SmolVM":
        """Continues a paused VM exactly where it was."""
        _no_running_loop("resume")
        self._h.resume()
        return self

    def delete(self) -> None:
        """Removes the VM and everything it has on disk (killing it first).
        Deleting a VM that is gone already does nothing; any other call on
        this handle then raises :class:`VMNotFoundError`. Ctrl-C does not
        cut a delete short (it takes about a second): it is raised after."""
        _no_running_loop("delete")
        self._h.delete()

    def wait_for_ready(self, timeout: float = 60.0) -> "SmolVM":
        """Waits until the guest agent answers (the VM is running, or
        another process is starting it); returns self.

        Raises:
            InvalidStateError: It is not running and nobody is starting it.
            OperationTimeoutError: It did not become ready in time.
        """
        t = _seconds("wait_for_ready", "timeout", timeout, vm_id=self.vm_id)
        _no_running_loop("wait_for_ready")
        self._h.wait_until_ready(t)
        return self

    def close(self) -> None:
        """Releases this handle; the VM keeps running (reach it again with
        :meth:`from_id`). Later calls on this handle raise
        :class:`InvalidStateError`."""
        self._closed = True

    # -- commands ----------------------------------------------------

    def _exec_args(
        self,
        command: Union[str, Sequence[str]],
        timeout: Optional[float],
        shell: str,
        env: Optional[Mapping[str, str]],
        cwd: Optional[str],
    ) -> tuple:
        vm_id = self.vm_id
        if isinstance(command, str):
            if shell == "login":
                argv = ["bash", "-lc", command]
            elif shell == "raw":
                argv = ["/bin/sh", "-c", command]
            else:
                raise _validation(f"shell must be 'login' or 'raw', not {shell!r}", "run", vm_id)
        elif isinstance(command, (list, tuple)) and command and all(isinstance(a, str) for a in command):
            argv = list(command)
        else:
            raise _validation(
                "command must be a string (run by a shell) or a non-empty list of strings (argv)", "run", vm_id
            )
        t = _seconds("run", "timeout", timeout, vm_id=vm_id, allow_none=True, positive=True)
        if cwd is not None and not isinstance(cwd, str):
            raise _validation(f"cwd must be a string, not {cwd!r}", "run", vm_id)
        try:
            env_items = sorted(_env("env", env).items())
        except ValidationError as e:
            raise _validation(e.message, "run", vm_id) from None
        return argv, env_items, cwd, t

    def run(
        self,
        command: Union[str, Sequence[str]],
        timeout: Optional[float] = 30,
        shell: str = "login",
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        max_output: Optional[int] = DEFAULT_MAX_OUTPUT,
        on_stdout: Optional[Callable[[str], Any]] = None,
        on_stderr: Optional[Callable[[str], Any]] = None,
    ) -> CommandResult:
        """Runs a command in the guest and waits for it.

        Args:
            command: A shell command line, or a list (argv, run without a
                shell).
            timeout: Seconds before the command and its process group are
                killed (:class:`OperationTimeoutError`, with the output so
                far); None for no limit.
            shell: ``"login"``: ``bash -lc`` (the login profile, as over
                SSH); ``"raw"``: ``/bin/sh -c``, nothing else (faster: a
                login shell costs ~0.2 s more under emulation).
            env: Variables for this command (over the VM's own ``env``).
            cwd: Working directory in the guest.
            max_output: Most bytes kept of each of stdout and stderr
                (16 MiB); the rest is dropped and ``truncated`` set. None
                for the library's limit (256 MiB).
            on_stdout, on_stderr: Called with each chunk of output (text)
                as it arrives, on this thread.

        With ``comm_channel="ssh"`` the command runs through a real SSH
        login (set up on first use; one kept connection per VM), with the
        VM's ``env``, ``cwd`` and ``timeout`` applied in the guest's shell
        line; the result is the same. With ``on_stdout``/``on_stderr`` (and
        :meth:`run_stream`, :meth:`spawn`, :meth:`pty`, files) it uses the
        agent channel. Over SSH an exit status of 255 is SSH's own failure
        (:class:`NetworkError`), and ``max_output`` trims what came back.

        Returns:
            A :class:`CommandResult`; a non-zero exit code is not an error
            (a shell's "command not found" is exit code 127). Its output is
            the guest's, raw: escape it before printing it to a terminal
            you care about (:func:`smolvm.escape_text`).

        Raises:
            InvalidStateError: The VM is not running (the message says what
                to call).
            OperationTimeoutError: ``timeout`` passed.
            ValidationError: A bad argument, or the guest could not start
                it: an argv program that does not exist, a ``cwd`` that does
                not exist.
            VMNotFoundError: The VM was deleted.
            CommandExecutionUnavailableError: The guest agent cannot take
                commands (the VM is going away) or failed the request.
        """
        if on_stdout is not None or on_stderr is not None:
            cap = _max_output(max_output, self.vm_id)
            return self._run_with_callbacks(command, timeout, shell, env, cwd, on_stdout, on_stderr, cap)
        argv, env_items, cwd, t = self._exec_args(command, timeout, shell, env, cwd)
        cap = _max_output(max_output, self.vm_id)
        _no_running_loop("run")
        if self._channel == "ssh":
            return self._run_ssh(command, argv, env_items, cwd, t, cap)
        out = self._h.exec(argv, env_items, cwd, t, None, cap)
        return _result(self.vm_id, command, t, out)

    def _blocking(self) -> Any:
        """The native handle, for blocking calls (not public)."""
        _no_running_loop("files")
        return self._h

    def run_stream(
        self,
        command: Union[str, Sequence[str]],
        timeout: Optional[float] = 30,
        shell: str = "login",
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> Iterator[StreamEvent]:
        """Runs a command and yields its events as they happen: ``started``,
        then ``stdout``/``stderr`` chunks, then ``exit`` (with
        ``exit_code``). Output is not kept: a consumer that stops reading
        pauses the command (its output waits in the guest; nothing is lost),
        and closing the generator early kills the command.

        Raises:
            OperationTimeoutError: ``timeout`` passed (the command and its
                process group were killed in the guest).
            InvalidStateError, VMNotFoundError, ValidationError: as
                :meth:`run`.
        """
        argv, env_items, cwd, t = self._exec_args(command, timeout, shell, env, cwd)
        _no_running_loop("run_stream")
        proc = self._h.exec_stream(argv, env_items, cwd, t, False)
        events = _Events(self.vm_id, command, t)
        try:
            while not events.ended:
                yield from events.feed(proc.next())
        finally:
            proc.cancel()

    async def async_run_stream(
        self,
        command: Union[str, Sequence[str]],
        timeout: Optional[float] = 30,
        shell: str = "login",
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> AsyncIterator[StreamEvent]:
        """:meth:`run_stream` as an async iterator (``async for ev in
        vm.async_run_stream(...)``); leaving the loop early, or cancelling
        the task, kills the command."""
        argv, env_items, cwd, t = self._exec_args(command, timeout, shell, env, cwd)
        h = self._h
        proc = await _aio.call(lambda done: h.exec_stream(argv, env_items, cwd, t, False, None, done))
        events = _Events(self.vm_id, command, t)
        try:
            while not events.ended:
                ev = await _aio.call(lambda done: proc.next(done))
                for e in events.feed(ev):
                    yield e
        finally:
            proc.cancel()

    def _run_with_callbacks(
        self,
        command: Union[str, Sequence[str]],
        timeout: Optional[float],
        shell: str,
        env: Optional[Mapping[str, str]],
        cwd: Optional[str],
        on_stdout: Optional[Callable[[str], Any]],
        on_stderr: Optional[Callable[[str], Any]],
        cap: Optional[int] = None,
    ) -> CommandResult:
        out: Dict[str, List[str]] = {"stdout": [], "stderr": []}
        kept = {"stdout": 0, "stderr": 0}
        truncated = False
        code = 255
        start = time.monotonic()
        try:
            for ev in self.run_stream(command, timeout, shell, env, cwd):
                if ev.type in out:
                    # Callbacks see everything; the result keeps at most
                    # `cap` characters a stream.
                    room = (cap - kept[ev.type]) if cap is not None else len(ev.data)
                    if room < len(ev.data):
                        truncated = True
                    if room > 0:
                        out[ev.type].append(ev.data[:room])
                        kept[ev.type] += min(room, len(ev.data))
                    cb = on_stdout if ev.type == "stdout" else on_stderr
                    if cb is not None:
                        cb(ev.data)
                elif ev.type == "exit":
                    code = ev.exit_code if ev.exit_code is not None else 255
        except OperationTimeoutError as e:
            e.stdout = "".join(out["stdout"])  # type: ignore[attr-defined]
            e.stderr = "".join(out["stderr"])  # type: ignore[attr-defined]
            raise
        return CommandResult(
            exit_code=code,
            stdout="".join(out["stdout"]),
            stderr="".join(out["stderr"]),
            duration_ms=int((time.monotonic() - start) * 1000),
            truncated=truncated,
        )

    def pty(
        self,
        command: Union[str, Sequence[str], None] = None,
        rows: int = 24,
        cols: int = 80,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> "PtySession":
        """Starts ``command`` (default: a login shell) on a new guest
        terminal of ``rows`` x ``cols``, and returns the session: ``write``
        keys (``"\x03"`` is Ctrl-C, which reaches the guest process),
        ``read`` output, ``resize``, ``wait`` for the exit status."""
        from ._pty import PtySession

        for name, v in (("rows", rows), ("cols", cols)):
            if not isinstance(v, int) or not 0 < v < 65536:
                raise _validation(f"{name} must be 1-65535, not {v!r}", "pty", self.vm_id)
        if command is None:
            command = ["bash", "-l"]
        argv, env_items, cwd, _ = self._exec_args(command, None, "login", env, cwd)
        proc = self._blocking().exec_stream(argv, env_items, cwd, None, True, (rows, cols))
        return PtySession(proc, self.vm_id)

    def spawn(
        self,
        command: Union[str, Sequence[str]],
        shell: str = "login",
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout: Optional[float] = None,
        stdin: bool = False,
    ) -> "BackgroundProcess":
        """Starts ``command`` in the background and returns at once. It runs
        on when this handle, this Python process or the connection go away;
        re-attach from anywhere with :meth:`attach` (``proc.handle``). Its
        output is kept in the guest (the last 1 MiB). ``timeout`` still
        kills it (None: no limit). Its stdin is ``/dev/null`` unless
        ``stdin=True`` (then feed it with ``write_stdin``/``close_stdin``)."""
        from ._procs import BackgroundProcess

        argv, env_items, cwd, t = self._exec_args(command, timeout, shell, env, cwd)
        handle, pid = self._blocking().spawn(argv, env_items, cwd, t, bool(stdin))
        return BackgroundProcess(self, handle, pid)

    def processes(self) -> List["ProcessInfo"]:
        """The VM's background processes (running, and the last finished)."""
        from ._procs import ProcessInfo

        return [ProcessInfo._from_native(d) for d in self._blocking().procs("list")]

    def attach(self, handle: int) -> "BackgroundProcess":
        """A background process by its handle (from :meth:`spawn`, in any
        process); :class:`ProcessNotFoundError` if unknown."""
        from ._procs import BackgroundProcess

        if not isinstance(handle, int) or handle <= 0:
            raise _validation(f"handle must be a positive int, not {handle!r}", "attach", self.vm_id)
        p = BackgroundProcess(self, handle, None)
        p.pid = p.info().pid
        return p

    # -- files ---------------------------------------------------------

    @property
    def files(self) -> "Files":
        """Filesystem requests in the guest: ``list``, ``stat``, ``mkdir``,
        ``remove``, ``rename``, ``exists``."""
        from ._files import Files

        return Files(self)

    def upload_file(self, local_path: Union[str, "os.PathLike[str]"], guest_path: str, make_dirs: bool = True) -> int:
        """Copies a local file to ``guest_path`` (absolute), atomically (a
        finished temporary file is renamed into place), keeping its mode and
        mtime. ``make_dirs`` creates missing guest directories. Returns the
        bytes copied. Streams: the size is not bounded by memory."""
        return int(self._blocking().upload_file(os.fspath(local_path), _guest(guest_path, "upload_file", self), make_dirs))

    def download_file(
        self,
        guest_path: str,
        local_path: Union[str, "os.PathLike[str]"],
        make_dirs: bool = True,
        max_bytes: Optional[int] = None,
    ) -> int:
        """Copies a guest file to ``local_path``, atomically, keeping its mode
        (without setuid/setgid) and mtime. ``max_bytes`` refuses a larger
        file (:class:`ValidationError`) and writes nothing. Returns the bytes
        copied."""
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
            raise _validation(f"max_bytes must be a non-negative int, not {max_bytes!r}", "download_file", self.vm_id)
        return int(
            self._blocking().download_file(_guest(guest_path, "download_file", self), os.fspath(local_path), make_dirs, max_bytes)
        )

    def upload_dir(self, local_dir: Union[str, "os.PathLike[str]"], guest_dir: str) -> Dict[str, int]:
        """Copies a local directory tree into ``guest_dir`` (created):
        files, empty directories and symlinks (as symlinks), with modes and
        mtimes. Returns counts (``files``, ``dirs``, ``symlinks``, ``bytes``,
        ``skipped``)."""
        return dict(self._blocking().upload_dir(os.fspath(local_dir), _guest(guest_dir, "upload_dir", self)))

    def download_dir(
        self, guest_dir: str, local_dir: Union[str, "os.PathLike[str]"], max_bytes: Optional[int] = None
    ) -> Dict[str, int]:
        """Copies a guest directory tree into ``local_dir``. Nothing is
        written outside ``local_dir``: guest symlinks are recreated as
        symlinks, never followed. ``max_bytes`` refuses a tree whose files
        add up to more (:class:`ValidationError`, nothing written). Returns
        counts as :meth:`upload_dir`."""
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
            raise _validation(f"max_bytes must be a non-negative int, not {max_bytes!r}", "download_dir", self.vm_id)
        return dict(
            self._blocking().download_dir(_guest(guest_dir, "download_dir", self), os.fspath(local_dir), max_bytes)
        )

    def sync(self) -> None:
        """Flushes the guest's filesystems to its disk."""
        self._blocking().fs("sync", "/")

    def wait_for_port(self, port: int, timeout: float = 30.0) -> None:
        """Waits until something in the guest accepts TCP connections on
        ``127.0.0.1:port``; :class:`OperationTimeoutError` after ``timeout``."""
        if not isinstance(port, int) or not 0 < port < 65536:
            raise _validation(f"port must be 1-65535, not {port!r}", "wait_for_port", self.vm_id)
        t = _seconds("wait_for_port", "timeout", timeout, vm_id=self.vm_id, positive=True)
        self._blocking().wait_for_port(port, t)

    # -- environment -----------------------------------------------------

    def set_env_vars(self, env_vars: Mapping[str, str], merge: bool = True) -> Dict[str, str]:
        """Sets variables every later command sees (kept across stop/start,
        seen from every process): merged into the current ones, or replacing
        them all (``merge=False``). Keys match ``^[A-Za-z_][A-Za-z0-9_]*$``.
        Returns the environment now."""
        return dict(self._blocking().env("set", _env("env_vars", env_vars), merge))

    def unset_env_vars(self, keys: Sequence[str]) -> Dict[str, str]:
        """Removes variables (absent ones are fine); returns the environment now."""
        if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
            raise _validation("keys must be a list of strings", "unset_env_vars", self.vm_id)
        return dict(self._blocking().env("unset", {k: "" for k in keys}))

    def list_env_vars(self) -> Dict[str, str]:
        """The VM's persistent environment."""
        return dict(self._blocking().env("list", {}))

    # -- snapshots -----------------------------------------------------

    def _snapshot_args(self, snapshot_id: Any, resume_source: Any, snapshot_type: Any) -> tuple:
        vm_id = self.vm_id
        name = _opt_str("snapshot_id", snapshot_id, "snapshot", vm_id)
        resume = _flag("resume_source", resume_source, "snapshot", vm_id)
        return name, resume, _disk_only(snapshot_type, vm_id)

    def snapshot(
        self,
        snapshot_id: Optional[str] = None,
        resume_source: bool = False,
        snapshot_type: Union[SnapshotType, str] = SnapshotType.FULL,
    ) -> SnapshotInfo:
        """Takes a snapshot of the VM and returns it.

        ``SnapshotType.FULL`` (the default) keeps the memory, device state
        and disk of a running or paused VM: a restore continues it where it
        was, processes and all. The VM is left paused (``resume_source=True``
        continues it: it is paused only while its RAM is saved).
        ``SnapshotType.DISK`` keeps the disk of a stopped VM (a restore boots
        it). The snapshot does not depend on the VM: it stays when the VM is
        deleted, until :meth:`delete_snapshot`. Ctrl-C does not cut a
        snapshot short (that could damage the VM's disk): it is raised after.

        Args:
            snapshot_id: Its id (the VM naming rule); generated
                (``snap-xxxxxxxx``) when None.
            resume_source: Leave the VM running afterwards.
            snapshot_type: ``SnapshotType.FULL`` or ``SnapshotType.DISK``
                (``DIFF``: :class:`ValidationError`).

        Raises:
            InvalidStateError: A full snapshot of a VM that is not running
                or paused, or a disk snapshot of one that is not stopped.
            SnapshotAlreadyExistsError: ``snapshot_id`` is taken.
            ValidationError: A bad argument or id.
        """
        args = self._snapshot_args(snapshot_id, resume_source, snapshot_type)
        _no_running_loop("snapshot")
        return SnapshotInfo._from_native(self._h.snapshot(*args))

    async def async_snapshot(
        self,
        snapshot_id: Optional[str] = None,
        resume_source: bool = False,
        snapshot_type: Union[SnapshotType, str] = SnapshotType.FULL,
    ) -> SnapshotInfo:
        """:meth:`snapshot` without blocking the event loop. Once begun it
        finishes even if the awaiting task is cancelled."""
        name, resume, disk_only = self._snapshot_args(snapshot_id, resume_source, snapshot_type)
        h = self._h
        d = await _aio.call(lambda done: h.snapshot(name, resume, disk_only, done), cancel_op=False)
        return SnapshotInfo._from_native(d)

    @classmethod
    def from_snapshot(
        cls,
        snapshot_id: str,
        vm_id: Optional[str] = None,
        backend: Optional[str] = None,
        resume_vm: bool = False,
        *,
        boot_timeout: float = 30.0,
        on_progress: Optional[ProgressCallback] = None,
    ) -> "SmolVM":
        """Restores a snapshot and returns a handle on the restored VM.

        A full snapshot's VM continues exactly where it was (under a
        second); its guest is told of its new identity (a new ``vm_id``
        gets its own hostname and fresh entropy). A disk snapshot's VM is
        booted. The VM is left paused unless ``resume_vm`` (``start()`` or
        ``resume()`` continues it; a ``with`` block starts it). The handle
        is like one from :meth:`from_id`: leaving a ``with`` block stops the
        VM but does not delete it. Ctrl-C does not cut a restore short: it
        is raised after, and a new VM it made is deleted.

        Args:
            snapshot_id: The snapshot (:meth:`list_snapshots`).
            vm_id: The new VM's id. None: back into the snapshot's source
                VM, whose current run and disk are replaced (it is
                re-created when it was deleted).
            backend: None, ``"auto"`` or ``"qemu"`` (as for ``SmolVM()``).
            resume_vm: Leave the VM running.
            boot_timeout: Seconds for the VM to be ready.
            on_progress: As for ``SmolVM()``.

        Raises:
            SnapshotNotFoundError: No snapshot has that id.
            SnapshotError: The snapshot cannot be used (damaged, or made by
                another VMM build); nothing was changed.
            VMAlreadyExistsError: ``vm_id`` is taken (or the source's id is,
                by another VM since).
            BootError: The restored VM did not come up.
        """
        sid, into, resume, t = _restore_args(snapshot_id, vm_id, backend, resume_vm, boot_timeout)
        _no_running_loop("from_snapshot")
        handle = _native.Sandbox.restore_snapshot(sid, into, resume, t, _progress(on_progress))
        return cls._adopt(handle, False, on_progress)

    @classmethod
    async def async_from_snapshot(
        cls,
        snapshot_id: str,
        vm_id: Optional[str] = None,
        backend: Optional[str] = None,
        resume_vm: bool = False,
        *,
        boot_timeout: float = 30.0,
        on_progress: Optional[ProgressCallback] = None,
    ) -> "SmolVM":
        """:meth:`from_snapshot` without blocking the event loop. Once begun
        it finishes even if the awaiting task is cancelled (then a new VM
        it made is deleted)."""
        sid, into, resume, t = _restore_args(snapshot_id, vm_id, backend, resume_vm, boot_timeout)
        progress = _progress(on_progress)
        handle = await _aio.call(
            lambda done: _native.Sandbox.restore_snapshot(sid, into, resume, t, progress, done),
            orphan=(lambda h: h.delete(lambda ok, value: None)) if into is not None else None,
            cancel_op=False,
        )
        return cls._adopt(handle, False, on_progress)

    def fork(self, count: int) -> List["SmolVM"]:
        """``count`` new VMs (1-256), each continuing from this VM's state
        now: its processes, memory and disk, with its own id, hostname
        (its id), machine identity and entropy; each writes a disk of its
        own. This VM goes on as it was (paused only while its RAM is
        saved). The children are running. All or nothing: if one cannot
        be made, none is left. Ctrl-C does not cut a fork short: it is
        raised after, and the children are deleted.

        The handles are like :meth:`from_id`'s: leaving a ``with`` block
        stops a child but does not delete it; ``delete()`` each when done.

        Raises:
            InvalidStateError: The VM is not running or paused.
            ValidationError: A bad ``count``.
        """
        n = _fork_count(count, self.vm_id)
        _no_running_loop("fork")
        return [type(self)._adopt(h, False, None, self._channel) for h in self._h.fork(n)]

    async def async_fork(self, count: int) -> List["SmolVM"]:
        """:meth:`fork` without blocking the event loop. Once begun it
        finishes even if the awaiting task is cancelled (then the children
        are deleted)."""
        n = _fork_count(count, self.vm_id)
        h = self._h

        def orphan(handles: Any) -> None:
            for c in handles:
                c.delete(lambda ok, value: None)

        handles = await _aio.call(lambda done: h.fork(n, done), orphan=orphan, cancel_op=False)
        return [type(self)._adopt(c, False, None, self._channel) for c in handles]

    @staticmethod
    def list_snapshots() -> List[SnapshotInfo]:
        """Every snapshot of this user (``smolvm snapshot ls`` shows the
        same ones), oldest first."""
        return [SnapshotInfo._from_native(d) for d in _native.Sandbox.list_snapshots()]

    @staticmethod
    async def async_list_snapshots() -> List[SnapshotInfo]:
        """:meth:`list_snapshots` without blocking the event loop."""
        items = await _aio.call(lambda done: _native.Sandbox.list_snapshots(done))
        return [SnapshotInfo._from_native(d) for d in items]

    @staticmethod
    def delete_snapshot(snapshot_id: str) -> None:
        """Removes a snapshot: it is no longer listed or restorable. Its
        files stay while VMs restored from it use them (they go with the
        last of those VMs).

        Raises:
            SnapshotNotFoundError: No snapshot has that id.
        """
        sid = _snapshot_id_arg(snapshot_id, "delete_snapshot")
        _no_running_loop("delete_snapshot")
        _native.Sandbox.delete_snapshot(sid)

    @staticmethod
    async def async_delete_snapshot(snapshot_id: str) -> None:
        """:meth:`delete_snapshot` without blocking the event loop."""
        sid = _snapshot_id_arg(snapshot_id, "delete_snapshot")
        await _aio.call(lambda done: _native.Sandbox.delete_snapshot(sid, done), cancel_op=False)

    # -- asyncio -----------------------------------------------------

    async def async_start(self, boot_timeout: float = 30.0) -> "SmolVM":
        """:meth:`start` without blocking the event loop; cancelling it
        ends the boot."""
        t = _seconds("start", "boot_timeout", boot_timeout, vm_id=self.vm_id, positive=True)
        h = self._h
        await _aio.call(lambda done: h.start(t, done))
        return self

    async def async_stop(self, timeout: float = 3.0) -> "SmolVM":
        """:meth:`stop` without blocking the event loop."""
        t = _seconds("stop", "timeout", timeout, vm_id=self.vm_id)
        h = self._h
        await _aio.call(lambda done: h.stop(t, done))
        return self

    async def async_pause(self) -> "SmolVM":
        """:meth:`pause` without blocking the event loop."""
        h = self._h
        await _aio.call(lambda done: h.pause(done))
        return self

    async def async_resume(self) -> "SmolVM":
        """:meth:`resume` without blocking the event loop."""
        h = self._h
        await _aio.call(lambda done: h.resume(done))
        return self

    async def async_delete(self) -> None:
        """:meth:`delete` without blocking the event loop. Once begun it
        finishes even if the awaiting task is cancelled."""
        h = self._h
        await asyncio.shield(_aio.call(lambda done: h.delete(done)))

    async def async_wait_for_ready(self, timeout: float = 60.0) -> "SmolVM":
        """:meth:`wait_for_ready` without blocking the event loop."""
        t = _seconds("wait_for_ready", "timeout", timeout, vm_id=self.vm_id)
        h = self._h
        await _aio.call(lambda done: h.wait_until_ready(t, done))
        return self

    async def async_run(
        self,
        command: Union[str, Sequence[str]],
        timeout: Optional[float] = 30,
        shell: str = "login",
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        max_output: Optional[int] = DEFAULT_MAX_OUTPUT,
    ) -> CommandResult:
        """:meth:`run` without blocking the event loop. Cancelling the
        awaiting task kills the command in the guest."""
        argv, env_items, cwd, t = self._exec_args(command, timeout, shell, env, cwd)
        cap = _max_output(max_output, self.vm_id)
        if self._channel == "ssh":
            return await self._async_run_ssh(command, argv, env_items, cwd, t, cap)
        h = self._h
        out = await _aio.call(lambda done: h.exec(argv, env_items, cwd, t, None, cap, done))
        return _result(self.vm_id, command, t, out)

    async def async_upload_file(
        self, local_path: Union[str, "os.PathLike[str]"], guest_path: str, make_dirs: bool = True
    ) -> int:
        """:meth:`upload_file` without blocking the event loop (cancelling it
        abandons the upload; the destination is left as it was)."""
        h, g, lp = self._h, _guest(guest_path, "upload_file", self), os.fspath(local_path)
        return int(await _aio.call(lambda done: h.upload_file(lp, g, make_dirs, done)))

    async def async_download_file(
        self,
        guest_path: str,
        local_path: Union[str, "os.PathLike[str]"],
        make_dirs: bool = True,
        max_bytes: Optional[int] = None,
    ) -> int:
        """:meth:`download_file` without blocking the event loop."""
        h, g, lp = self._h, _guest(guest_path, "download_file", self), os.fspath(local_path)
        return int(await _aio.call(lambda done: h.download_file(g, lp, make_dirs, max_bytes, done)))

    async def async_upload_dir(self, local_dir: Union[str, "os.PathLike[str]"], guest_dir: str) -> Dict[str, int]:
        """:meth:`upload_dir` without blocking the event loop."""
        h, g, lp = self._h, _guest(guest_dir, "upload_dir", self), os.fspath(local_dir)
        return dict(await _aio.call(lambda done: h.upload_dir(lp, g, done)))

    async def async_download_dir(
        self, guest_dir: str, local_dir: Union[str, "os.PathLike[str]"], max_bytes: Optional[int] = None
    ) -> Dict[str, int]:
        """:meth:`download_dir` without blocking the event loop."""
        h, g, lp = self._h, _guest(guest_dir, "download_dir", self), os.fspath(local_dir)
        return dict(await _aio.call(lambda done: h.download_dir(g, lp, max_bytes, done)))

    async def async_wait_for_port(self, port: int, timeout: float = 30.0) -> None:
        """:meth:`wait_for_port` without blocking the event loop."""
        if not isinstance(port, int) or not 0 < port < 65536:
            raise _validation(f"port must be 1-65535, not {port!r}", "wait_for_port", self.vm_id)
        t = _seconds("wait_for_port", "timeout", timeout, vm_id=self.vm_id, positive=True)
        h = self._h
        await _aio.call(lambda done: h.wait_for_port(port, t, done))

    # -- context managers ---------------------------------------------

    def __enter__(self) -> "SmolVM":
        try:
            self.start()
        except BaseException:
            # Nobody else knows of a VM this handle made: it must not stay.
            if self._owns_vm and not self._closed:
                try:
                    self.delete()
                except SmolVMError:
                    log.warning("removing VM %s after its failed start failed", self.vm_id, exc_info=True)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self._closed:
                return
            if self._owns_vm:
                # Deleting stops it (at once: nothing of it is kept).
                self.delete()
            else:
                self.stop()
        except SmolVMError:
            if exc is None:
                raise
            log.warning("cleaning up VM %s after an error failed", self.vm_id, exc_info=True)
        finally:
            self.close()

    async def __aenter__(self) -> "SmolVM":
        try:
            await self.async_start()
        except BaseException:
            if self._owns_vm and not self._closed:
                try:
                    await self.async_delete()
                except SmolVMError:
                    log.warning("removing VM %s after its failed start failed", self.vm_id, exc_info=True)
            raise
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self._closed:
                return
            if self._owns_vm:
                await self.async_delete()
            else:
                await self.async_stop()
        except SmolVMError:
            if exc is None:
                raise
            log.warning("cleaning up VM %s after an error failed", self.vm_id, exc_info=True)
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"<SmolVM {self.vm_id!r}{' closed' if self._closed else ''}>"


SmolVM.__module__ = "smolvm"


def _channel_of(config: Optional[VMConfig], comm_channel: Any) -> str:
    """The channel a new VM's handle runs commands through."""
    if comm_channel is None and config is not None:
        comm_channel = config.comm_channel
    return _check_channel(comm_channel)


def _vm_id_arg(vm_id: Any) -> str:
    if not isinstance(vm_id, str):
        raise _validation(f"vm_id must be a string, not {vm_id!r}", "from_id")
    return vm_id
