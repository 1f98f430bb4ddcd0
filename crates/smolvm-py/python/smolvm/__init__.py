"""smolvm: disposable, hardware-isolated Linux VMs for programs and agents.

    from smolvm import SmolVM

    with SmolVM() as vm:
        print(vm.run("hostname").output)

A native extension over the smolvm library: the same VMs, inventory and
images as the ``smolvm`` CLI (a VM made here shows in ``smolvm ls``).
"""

from pathlib import Path as _Path

from . import _native

# The wheel carries the per-VM supervisor and the static guest agent here.
_native.set_companion_dir(str(_Path(__file__).resolve().parent / "_bin"))

from ._vm import SmolVM  # noqa: E402
from .exceptions import (  # noqa: E402
    BootError,
    CommandExecutionUnavailableError,
    HostError,
    ImageError,
    InvalidStateError,
    OperationTimeoutError,
    SmolVMError,
    ValidationError,
    VMAlreadyExistsError,
    VMNotFoundError,
)
from .types import (  # noqa: E402
    CommandResult,
    SnapshotInfo,
    SnapshotType,
    VMConfig,
    VMInfo,
    VMState,
)

__version__ = _native.__version__

__all__ = [
    "SmolVM",
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
]
