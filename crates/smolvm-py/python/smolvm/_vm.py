"""The :class:`SmolVM` handle."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from . import _aio, _native
from .exceptions import (
    OperationTimeoutError,
    SmolVMError,
    ValidationError,
    _from_native,
)
from .types import CommandResult, VMConfig, VMInfo, VMState

__all__ = ["SmolVM"]

log = logging.getLogger("smolvm")

ProgressCallback = Callable[[str], None]

# `os=` values of the older Python `smolvm` package, and our image for each.
_IMAGES_BY_OS = {"debian": "debian-12"}
_DEFAULT_IMAGE = "debian-12"


def _validation(message: str) -> ValidationError:
    return _from_native("invalid_input", message, None, None, "create")  # type: ignore[return-value]


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


def _check_channel(comm_channel: Any) -> None:
    comm_channel = _value(comm_channel)
    if comm_channel in (None, "vsock"):
        return
    if comm_channel == "ssh":
        raise _validation(
            "comm_channel='ssh' is not available yet: commands run through the guest "
            "agent's channel; use comm_channel='vsock' (or leave it out)"
        )
    raise _validation(f"comm_channel must be 'vsock' or 'ssh', not {comm_channel!r}")


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
        err = OperationTimeoutError(
            "run",
            float(timeout or 0),
            recovery_command="the command and its process group were killed in the guest; "
            "pass a larger timeout= (or None for no limit)",
        )
        err.details["vm_id"] = vm_id
        err.details["command"] = command
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


class SmolVM:
    """A disposable, hardware-isolated Linux VM.

    ``SmolVM()`` creates a VM (state ``CREATED``; its image is built first
    when missing, with progress on stderr). As a context manager it is
    started on entry, and on exit deleted when this handle created it (only
    stopped when it came from :meth:`from_id`)::

        with SmolVM() as vm:
            print(vm.run("hostname").output)

    A VM outlives its handle: ``close()`` it, and ``SmolVM.from_id(vm_id)``
    reaches it again from any process. A handle is safe to use from many
    threads at once; blocking calls release the GIL.

    Args:
        config: A :class:`VMConfig` (instead of the keyword arguments).
        name: The VM's id: 1-63 of ``a-z 0-9 _ -``; generated when None.
        image: Guest image (default ``debian-12``).
        memory: Guest memory in MiB (128-16384, default 512).
        vcpus: vCPUs (1-32, default 1).
        disk_size: Root disk size: MiB as an int, or a string like ``"4G"``;
            the image's size when None.
        network: Outbound network for the guest (default True); the guest
            never reaches the host's own services.
        env: Environment variables for every command run in the VM.
        vm_id: Reconnect to this existing VM instead (as :meth:`from_id`).
        backend: ``"auto"`` or ``"qemu"``; a VMM that cannot run here is a
            :class:`HostError`.
        os: ``"debian"``; other systems have no image yet
            (:class:`ValidationError`).
        comm_channel: ``"vsock"`` (the guest agent's channel, the default).
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
        memory: Optional[int] = None,
        vcpus: Optional[int] = None,
        disk_size: Union[int, str, None] = None,
        network: Optional[bool] = None,
        env: Optional[Mapping[str, str]] = None,
        vm_id: Optional[str] = None,
        backend: Optional[str] = None,
        os: Optional[str] = None,
        comm_channel: Optional[str] = None,
        on_progress: Optional[ProgressCallback] = None,
        _native_handle: Any = None,
    ) -> None:
        self._on_progress = on_progress
        self._closed = False
        if _native_handle is not None:
            self._native = _native_handle
            self._owns_vm = False
            return
        _check_backend(backend if config is None or backend is not None else config.backend)
        _check_channel(comm_channel if config is None or comm_channel is not None else config.comm_channel)
        given = {
            k: v
            for k, v in dict(
                name=name, image=image, memory=memory, vcpus=vcpus, disk_size=disk_size,
                network=network, env=env, os=os,
            ).items()
            if v is not None
        }
        if vm_id is not None:
            if config is not None or given:
                raise _validation(
                    f"vm_id= reconnects to an existing VM; drop {', '.join(sorted(given)) or 'config'}"
                )
            self._native = _native.Sandbox.from_id(vm_id, _progress(on_progress))
            self._owns_vm = False
            return
        if config is not None:
            if not isinstance(config, VMConfig):
                raise _validation(f"config must be a smolvm.types.VMConfig, not {type(config).__name__}")
            if given:
                raise _validation(
                    f"pass either config= or {', '.join(sorted(given))}, not both"
                )
            for field_name in ("kernel_path", "initrd_path", "rootfs_path", "boot_args"):
                if getattr(config, field_name) is not None:
                    raise _validation(
                        f"VMConfig.{field_name} is not supported: smolvm boots its own kernel "
                        "and images; choose one with image= (see `smolvm image ls`)"
                    )
            name, memory, vcpus = config.vm_id, config.memory, config.vcpu_count
            disk_size, network, env = config.disk_size_mib, config.network, config.env_vars
            image = _image_for(config.image, config.guest_os)
        else:
            image = _image_for(image, os)
        if name is not None and not isinstance(name, str):
            raise _validation(f"name must be a string, not {name!r}")
        if network is not None and not isinstance(network, bool):
            raise _validation(f"network must be True or False, not {network!r}")
        spec: Dict[str, Any] = {
            "name": name,
            "image": image,
            "memory_mib": _check_int("memory", 512 if memory is None else memory),
            "cpus": _check_int("vcpus", 1 if vcpus is None else vcpus),
            "disk_size_mib": _disk_mib(disk_size),
            "network": True if network is None else network,
            "env": _env("env", env),
        }
        for key in ("memory_mib", "cpus"):
            if spec[key] < 0:
                raise _validation(f"{key} must not be negative")
        self._native = _native.Sandbox.create(json.dumps(spec), _progress(on_progress))
        self._owns_vm = True

    # -- reconnecting and listing -------------------------------------

    @classmethod
    def from_id(cls, vm_id: str, *, on_progress: Optional[ProgressCallback] = None) -> "SmolVM":
        """A handle on an existing VM, from any process.

        Leaving a ``with`` block of such a handle stops the VM but does not
        delete it.

        Raises:
            VMNotFoundError: No VM has that id.
        """
        if not isinstance(vm_id, str):
            raise _validation(f"vm_id must be a string, not {vm_id!r}")
        return cls(_native_handle=_native.Sandbox.from_id(vm_id, _progress(on_progress)), on_progress=on_progress)

    @classmethod
    async def async_from_id(cls, vm_id: str, *, on_progress: Optional[ProgressCallback] = None) -> "SmolVM":
        """:meth:`from_id` without blocking the event loop."""
        handle = await _aio.call(lambda done: _native.Sandbox.from_id(vm_id, _progress(on_progress), done))
        return cls(_native_handle=handle, on_progress=on_progress)

    @classmethod
    async def async_create(cls, **kwargs: Any) -> "SmolVM":
        """``SmolVM(**kwargs)`` without blocking the event loop (an image
        build can take a minute)."""
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, lambda: cls(**kwargs))

    @staticmethod
    def list() -> List[VMInfo]:
        """Every VM of this user (``smolvm ls`` shows the same ones)."""
        return [VMInfo._from_native(d) for d in _native.Sandbox.list()]

    # -- identity and state ------------------------------------------

    @property
    def _h(self) -> Any:
        if self._closed:
            raise SmolVMError(
                f"this handle on VM '{self._native.vm_id}' is closed; "
                f"SmolVM.from_id({self._native.vm_id!r}) opens another",
                {"vm_id": self._native.vm_id},
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
        """The VM as the inventory has it now."""
        return VMInfo._from_native(self._h.info())

    @property
    def status(self) -> VMState:
        """The VM's state now (read afresh each time)."""
        return self.info.status

    def refresh(self) -> "SmolVM":
        """Re-reads the VM's record (crash truth applied).

        Raises:
            VMNotFoundError: The VM was deleted.
        """
        self._h.info()
        return self

    def can_run_commands(self) -> bool:
        """Whether this VM takes commands (its guest agent channel): True
        for every smolvm VM. Whether it does *now* depends on its state;
        :meth:`wait_for_ready` waits for that."""
        return not self._closed

    # -- lifecycle ---------------------------------------------------

    def start(self, boot_timeout: float = 30.0) -> "SmolVM":
        """Boots the VM (created or stopped), resumes it (paused), or does
        nothing (running); returns once its guest agent answers.

        Raises:
            BootError: It did not boot in time (``console_tail`` holds the
                guest console's last lines).
            InvalidStateError: It is in ``ERROR`` (delete it).
        """
        self._h.start(float(boot_timeout))
        return self

    def stop(self, timeout: float = 3.0) -> "SmolVM":
        """Shuts the guest down gracefully; its VMM is killed after
        ``timeout`` seconds. No-op when it is not running."""
        self._h.stop(float(timeout))
        return self

    def pause(self) -> "SmolVM":
        """Freezes the vCPUs; memory and processes stay as they are."""
        self._h.pause()
        return self

    def resume(self) -> "SmolVM":
        """Continues a paused VM exactly where it was."""
        self._h.resume()
        return self

    def delete(self) -> None:
        """Removes the VM and everything it has on disk (stopping it
        first). Later calls on this handle raise :class:`VMNotFoundError`."""
        self._h.delete()

    def wait_for_ready(self, timeout: float = 60.0) -> "SmolVM":
        """Waits until the guest agent answers (the VM is running, or
        another process is starting it).

        Raises:
            InvalidStateError: It is not running and nobody is starting it.
            OperationTimeoutError: It did not become ready in time.
        """
        self._h.wait_until_ready(float(timeout))
        return self

    def close(self) -> None:
        """Releases this handle; the VM keeps running (reach it again with
        :meth:`from_id`)."""
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
        if isinstance(command, str):
            if shell == "login":
                argv = ["bash", "-lc", command]
            elif shell == "raw":
                argv = ["/bin/sh", "-c", command]
            else:
                raise _validation(f"shell must be 'login' or 'raw', not {shell!r}")
        elif isinstance(command, (list, tuple)) and all(isinstance(a, str) for a in command):
            argv = list(command)
        else:
            raise _validation("command must be a string (run by a shell) or a list of strings (argv)")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
                raise _validation(f"timeout must be a positive number of seconds or None, not {timeout!r}")
            timeout = float(timeout)
        if cwd is not None and not isinstance(cwd, str):
            raise _validation(f"cwd must be a string, not {cwd!r}")
        return argv, sorted(_env("env", env).items()), cwd, timeout

    def run(
        self,
        command: Union[str, Sequence[str]],
        timeout: Optional[float] = 30,
        shell: str = "login",
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> CommandResult:
        """Runs a command in the guest and waits for it.

        Args:
            command: A shell command line, or a list (argv, run without a
                shell).
            timeout: Seconds before the command and its process group are
                killed (:class:`OperationTimeoutError`); None for no limit.
            shell: ``"login"``: ``bash -lc`` (the login profile, as over
                SSH); ``"raw"``: ``/bin/sh -c``, nothing else.
            env: Variables for this command (over the VM's own ``env``).
            cwd: Working directory in the guest.

        Returns:
            A :class:`CommandResult`; a non-zero exit code is not an error.

        Raises:
            InvalidStateError: The VM is not running (the message says how
                to start it).
            OperationTimeoutError: ``timeout`` passed.
        """
        argv, env_items, cwd, timeout = self._exec_args(command, timeout, shell, env, cwd)
        out = self._h.exec(argv, env_items, cwd, timeout)
        return _result(self.vm_id, command, timeout, out)

    # -- asyncio -----------------------------------------------------

    async def async_start(self, boot_timeout: float = 30.0) -> "SmolVM":
        """:meth:`start` without blocking the event loop."""
        h = self._h
        await _aio.call(lambda done: h.start(float(boot_timeout), done))
        return self

    async def async_stop(self, timeout: float = 3.0) -> "SmolVM":
        """:meth:`stop` without blocking the event loop."""
        h = self._h
        await _aio.call(lambda done: h.stop(float(timeout), done))
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
        """:meth:`delete` without blocking the event loop."""
        h = self._h
        await _aio.call(lambda done: h.delete(done))

    async def async_wait_for_ready(self, timeout: float = 60.0) -> "SmolVM":
        """:meth:`wait_for_ready` without blocking the event loop."""
        h = self._h
        await _aio.call(lambda done: h.wait_until_ready(float(timeout), done))
        return self

    async def async_run(
        self,
        command: Union[str, Sequence[str]],
        timeout: Optional[float] = 30,
        shell: str = "login",
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> CommandResult:
        """:meth:`run` without blocking the event loop. Cancelling the
        awaiting task kills the command in the guest."""
        argv, env_items, cwd, timeout = self._exec_args(command, timeout, shell, env, cwd)
        h = self._h
        out = await _aio.call(lambda done: h.exec(argv, env_items, cwd, timeout, None, done))
        return _result(self.vm_id, command, timeout, out)

    # -- context managers ---------------------------------------------

    def __enter__(self) -> "SmolVM":
        self.start()
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
        await self.async_start()
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

