"""smolvm: disposable, hardware-isolated Linux VMs for programs and agents.

    from smolvm import SmolVM

    with SmolVM() as vm:
        print(vm.run("hostname").output)

A native extension over the smolvm library: the same VMs, inventory and
images as the ``smolvm`` CLI (a VM made here shows in ``smolvm ls``).
"""

import os as _os
from pathlib import Path as _Path

from . import _native


def _companion_dir() -> str:
    """The wheel's per-VM supervisor and static guest agent. The library runs
    them only when nobody else can write them: an install under a group-
    writable umask (002) is tightened here when it is ours."""
    d = _Path(__file__).resolve().parent / "_bin"
    for p in (d, d / "smolvm-supervisor", d / "smolvm-agent"):
        try:
            st = p.lstat()
            if st.st_uid == _os.geteuid() and st.st_mode & 0o022:
                _os.chmod(p, st.st_mode & ~0o022 & 0o7777)
        except OSError:
            pass  # the library's error names the file and what is wrong
    return str(d)


_native.set_companion_dir(_companion_dir())

from ._files import Files  # noqa: E402
from ._procs import BackgroundProcess, ProcessInfo  # noqa: E402
from ._pty import PtySession  # noqa: E402
from ._vm import SmolVM  # noqa: E402
from .exceptions import (  # noqa: E402
    BootError,
    CommandExecutionUnavailableError,
    GuestFileError,
    HostError,
    ProcessNotFoundError,
    ImageError,
    InvalidStateError,
    NetworkError,
    OperationTimeoutError,
    SmolVMError,
    SnapshotAlreadyExistsError,
    SnapshotError,
    SnapshotNotFoundError,
    ValidationError,
    VMAlreadyExistsError,
    VMNotFoundError,
)
from .types import (  # noqa: E402
    CommandResult,
    FileInfo,
    InternetSettings,
    PortForward,
    StreamEvent,
    SnapshotInfo,
    SnapshotType,
    VMConfig,
    VMInfo,
    VMState,
)

__version__ = _native.__version__


def escape_text(text: str) -> str:
    """``text`` (guest output) with control characters and terminal escape
    sequences made visible, safe to print to a terminal."""
    return _native.escape_text(text)


__all__ = [
    "SmolVM",
    "escape_text",
    "VMState",
    "SnapshotType",
    "CommandResult",
    "VMConfig",
    "VMInfo",
    "SnapshotInfo",
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
    "InternetSettings",
    "PortForward",
    "StreamEvent",
    "FileInfo",
    "Files",
    "BackgroundProcess",
    "ProcessInfo",
    "PtySession",
]
