"""Exceptions raised by smolvm: one class per kind of the library's errors.

Every error is a :class:`SmolVMError` with ``.message`` (for people),
``.kind`` (for code: ``"not_found"``, ``"invalid_state"``, ... — stable across
versions, see ``docs/errors.md``) and ``.details`` (a dict). Messages name
the VM, its state and what to do next.

=======================================  ==========================================
kind                                     exception
=======================================  ==========================================
``not_found``                            :class:`VMNotFoundError`
``already_exists``                       :class:`VMAlreadyExistsError`
``invalid_input``                        :class:`ValidationError`
``invalid_state``                        :class:`InvalidStateError`
``timeout``                              :class:`OperationTimeoutError`
``boot_failed`` (and ``vmm_died`` at     :class:`BootError`
start)
``agent_incompatible``,                  :class:`CommandExecutionUnavailableError`
``agent_unavailable``, ``guest``
``image``                                :class:`ImageError`
``host_tool_missing``,                   :class:`HostError`
``host_unsupported``
``snapshot_not_found``                   :class:`SnapshotNotFoundError`
``snapshot_already_exists``              :class:`SnapshotAlreadyExistsError`
``snapshot_invalid``                     :class:`SnapshotError`
``network``                              :class:`NetworkError`
``busy``, ``vmm_died``, ``io``           :class:`SmolVMError`
=======================================  ==========================================
"""

from __future__ import annotations

import re
from typing import Any, Optional

__all__ = [
    "SmolVMError",
    "ValidationError",
    "VMAlreadyExistsError",
    "VMNotFoundError",
    "InvalidStateError",
    "OperationTimeoutError",
    "BootError",
    "CommandExecutionUnavailableError",
    "ImageError",
    "HostError",
    "GuestFileError",
    "ProcessNotFoundError",
    "SnapshotError",
    "SnapshotNotFoundError",
    "SnapshotAlreadyExistsError",
    "NetworkError",
]


class SmolVMError(Exception):
    """Base class of every smolvm error.

    Attributes:
        message: What went wrong and what to do about it.
        kind: The library's error kind (``"io"`` for errors made in Python
            without one).
        details: Extra facts (``vm_id``, ``state``, ``timeout_seconds``...).
    """

    kind: str = "io"

    def __init__(self, message: str, details: Optional[dict] = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict = dict(details or {})

    @property
    def vm_id(self) -> Optional[str]:
        """The VM the error is about, when there is one."""
        return self.details.get("vm_id")

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:
        # Subclasses take other constructor arguments: rebuild from state,
        # so errors cross process pools (pickle) and copy.copy intact.
        return (_rebuild, (type(self), dict(self.__dict__)))


def _rebuild(cls: type, state: dict) -> "SmolVMError":
    exc = cls.__new__(cls)
    Exception.__init__(exc, state.get("message", ""))
    exc.__dict__.update(state)
    return exc


class ValidationError(SmolVMError):
    """Invalid input: a config value, a name, an argument."""

    kind = "invalid_input"


class VMAlreadyExistsError(SmolVMError):
    """A VM with that name (id) exists already."""

    kind = "already_exists"

    def __init__(self, vm_id: str) -> None:
        super().__init__(
            f"VM '{vm_id}' already exists; pick another name or use SmolVM.from_id({vm_id!r})",
            {"vm_id": vm_id},
        )


class VMNotFoundError(SmolVMError):
    """No VM with that id (or it was deleted)."""

    kind = "not_found"

    def __init__(self, vm_id: str) -> None:
        super().__init__(
            f"VM '{vm_id}' not found; SmolVM.list() shows the VMs there are",
            {"vm_id": vm_id},
        )


class InvalidStateError(SmolVMError):
    """The operation is not possible in the VM's current state.

    ``details["state"]`` is that state; the message says what to call first.
    """

    kind = "invalid_state"

    @property
    def state(self) -> Optional[str]:
        return self.details.get("state")


class OperationTimeoutError(SmolVMError):
    """An operation ran out of time.

    For :meth:`SmolVM.run` the command's process group was killed in the
    guest; for a guest that stopped answering, the VM is marked with the
    reason.
    """

    kind = "timeout"

    def __init__(
        self,
        operation: str,
        timeout_seconds: float,
        *,
        recovery_command: Optional[str] = None,
    ) -> None:
        message = f"{operation} timed out after {timeout_seconds:g}s"
        details: dict[str, Any] = {"operation": operation, "timeout_seconds": timeout_seconds}
        if recovery_command:
            message += f"; {recovery_command}"
            details["recovery_command"] = recovery_command
        super().__init__(message, details)

    @property
    def operation(self) -> Optional[str]:
        return self.details.get("operation")

    @property
    def timeout_seconds(self) -> Optional[float]:
        return self.details.get("timeout_seconds")


class BootError(SmolVMError):
    """The VM did not boot (or its VMM died while starting).

    Attributes:
        console_tail: The last lines of the guest console (raw guest text:
            escape it before printing it to a terminal), or None.
    """

    kind = "boot_failed"

    def __init__(self, message: str, console_tail: Optional[str] = None) -> None:
        super().__init__(message)
        self.console_tail = console_tail


class CommandExecutionUnavailableError(SmolVMError):
    """The guest agent cannot run commands now (not ready, going away,
    another protocol version, or it failed the request)."""

    kind = "agent_unavailable"

    def __init__(self, vm_id: str, reason: str, remediation: Optional[str] = None) -> None:
        message = f"cannot run a command in VM '{vm_id}': {reason}"
        if remediation:
            message += f"; {remediation}"
        super().__init__(message, {"vm_id": vm_id, "reason": reason})
        self.remediation = remediation

    @property
    def reason(self) -> Optional[str]:
        return self.details.get("reason")


class ImageError(SmolVMError):
    """A guest image could not be built or used."""

    kind = "image"


class HostError(SmolVMError):
    """The host lacks something smolvm needs: a tool (the message names
    the package), or support (user namespaces, /dev/net/tun, a backend)."""

    kind = "host_unsupported"


class GuestFileError(SmolVMError):
    """A file operation in the guest failed. ``.kind`` says why:
    ``"path_not_found"``, ``"path_exists"`` (or a directory not empty),
    ``"permission_denied"`` or ``"no_space"``. The message quotes the guest
    path (guest text: escaped)."""

    kind = "path_not_found"


class ProcessNotFoundError(SmolVMError):
    """No background process with that handle in the VM (never started in
    this boot, or forgotten: the last 32 finished ones are kept)."""

    kind = "process_not_found"


class SnapshotError(SmolVMError):
    """A snapshot cannot be used: its files are missing, truncated or
    corrupt, or it was made by another VMM build (nothing was changed).
    The base class of the other snapshot errors; ``.snapshot_id`` names
    the snapshot."""

    kind = "snapshot_invalid"

    @property
    def snapshot_id(self) -> Optional[str]:
        return self.details.get("snapshot_id")


class SnapshotNotFoundError(SnapshotError):
    """No snapshot with that id (or it was deleted)."""

    kind = "snapshot_not_found"

    def __init__(self, snapshot_id: str) -> None:
        super().__init__(
            f"snapshot '{snapshot_id}' not found; SmolVM.list_snapshots() lists snapshots",
            {"snapshot_id": snapshot_id},
        )


class SnapshotAlreadyExistsError(SnapshotError):
    """A snapshot with that id exists already."""

    kind = "snapshot_already_exists"

    def __init__(self, snapshot_id: str) -> None:
        super().__init__(
            f"a snapshot named '{snapshot_id}' exists already; choose another name or "
            f"remove it with SmolVM.delete_snapshot({snapshot_id!r})",
            {"snapshot_id": snapshot_id},
        )


class NetworkError(SmolVMError):
    """A network operation failed: a host port is taken (a forward cannot
    listen), an SSH login or tunnel failed (a changed guest host key is
    refused), the VM has no network (:meth:`SmolVM.get_ip` of a VM made
    with ``network=False``), or an egress policy could not be applied."""

    kind = "network"


_BY_KIND: dict[str, type[SmolVMError]] = {
    "snapshot_not_found": SnapshotNotFoundError,
    "snapshot_already_exists": SnapshotAlreadyExistsError,
    "snapshot_invalid": SnapshotError,
    "process_not_found": ProcessNotFoundError,
    "path_not_found": GuestFileError,
    "path_exists": GuestFileError,
    "permission_denied": GuestFileError,
    "no_space": GuestFileError,
    "not_found": VMNotFoundError,
    "already_exists": VMAlreadyExistsError,
    "invalid_input": ValidationError,
    "invalid_state": InvalidStateError,
    "timeout": OperationTimeoutError,
    "boot_failed": BootError,
    "agent_incompatible": CommandExecutionUnavailableError,
    "agent_unavailable": CommandExecutionUnavailableError,
    "guest": CommandExecutionUnavailableError,
    "image": ImageError,
    "host_tool_missing": HostError,
    "host_unsupported": HostError,
    "network": NetworkError,
}

# The library's messages name CLI commands as the fix; from Python the fix
# is a method. Each pattern is one the library writes (error.rs,
# transitions.rs, record.rs).
_CLI_TO_PYTHON = [
    (re.compile(r"remove it with `smolvm snapshot rm ([^`]*)`"), r"remove it with SmolVM.delete_snapshot('\1')"),
    (re.compile(r"`smolvm snapshot ls`"), "SmolVM.list_snapshots()"),
    (re.compile(r"take a disk-only snapshot"), "take a disk-only snapshot (snapshot_type=SnapshotType.DISK)"),
    (re.compile(r"take a full snapshot"), "take a full snapshot (snapshot_type=SnapshotType.FULL)"),
    (re.compile(r"remove it with `smolvm rm ([^`]*)`"), r"reach it with SmolVM.from_id('\1') (and .delete() it)"),
    (re.compile(r"run `smolvm (start|resume|pause) [^`]*` first"), r"call vm.\1() first"),
    (re.compile(r"`smolvm (start|resume|pause|stop) [^`]*`"), r"vm.\1()"),
    (re.compile(r"`smolvm rm(?: -f)? [^`]*`"), "vm.delete()"),
    (re.compile(r"`smolvm ls(?: --all)?`"), "SmolVM.list()"),
]


def _python_terms(message: str) -> str:
    for pattern, repl in _CLI_TO_PYTHON:
        message = pattern.sub(repl, message)
    return message


# Operations during which a dying VMM means the boot failed.
_BOOTING = frozenset({"start", "from_snapshot", "fork"})


def _from_native(
    kind: str,
    message: str,
    vm_id: Optional[str],
    console_tail: Optional[str],
    op: str,
    details: Optional[dict] = None,
) -> SmolVMError:
    """The exception for an error of the native library (not public)."""
    cls = _BY_KIND.get(kind, SmolVMError)
    if kind == "vmm_died" and op in _BOOTING:
        cls = BootError
    if kind == "not_found" and (details or {}).get("subject") == "image":
        # An image, not a VM.
        cls = ImageError
    exc = cls.__new__(cls)
    info: dict[str, Any] = {"operation": op}
    if vm_id is not None:
        info["vm_id"] = vm_id
    info.update(details or {})
    SmolVMError.__init__(exc, _python_terms(message), info)
    exc.kind = kind
    if cls is BootError:
        exc.console_tail = console_tail
    if cls is CommandExecutionUnavailableError:
        exc.remediation = None
        exc.details.setdefault("reason", message)
    return exc
