"""``vm.files``: filesystem requests in the guest."""

from __future__ import annotations

from typing import TYPE_CHECKING, List

from .types import FileInfo

if TYPE_CHECKING:  # pragma: no cover
    from ._vm import SmolVM


def _path(p: object, op: str, vm: "SmolVM") -> str:
    from ._vm import _validation

    if not isinstance(p, str):
        raise _validation(f"a guest path must be a string, not {p!r}", op, vm.vm_id)
    return p


class Files:
    """Filesystem requests in the guest (``vm.files``). Guest paths are
    absolute; a relative one is a :class:`ValidationError`. Failures are
    :class:`GuestFileError` (``.kind`` says why)."""

    def __init__(self, vm: "SmolVM") -> None:
        self._vm = vm

    def list(self, path: str) -> List[FileInfo]:
        """The entries of a guest directory (one level), sorted by name."""
        p = _path(path, "files.list", self._vm)
        entries = self._vm._blocking().fs("list", p)
        return sorted((FileInfo._from_native(e["name"], e["stat"]) for e in entries), key=lambda f: f.name)

    def stat(self, path: str, follow_symlinks: bool = True) -> FileInfo:
        """Metadata of a guest path."""
        p = _path(path, "files.stat", self._vm)
        d = self._vm._blocking().fs("stat" if follow_symlinks else "lstat", p)
        return FileInfo._from_native(p, d)

    def exists(self, path: str) -> bool:
        """Whether a guest path exists (a dangling symlink does)."""
        return bool(self._vm._blocking().fs("exists", _path(path, "files.exists", self._vm)))

    def mkdir(self, path: str, parents: bool = True) -> None:
        """Creates a guest directory (``parents``: and missing parents; an
        existing directory is then fine)."""
        self._vm._blocking().fs("mkdir", _path(path, "files.mkdir", self._vm), None, parents)

    def remove(self, path: str, recursive: bool = False) -> None:
        """Removes a file, symlink or empty directory; ``recursive``: a whole
        tree (symlinks in it are removed, never followed)."""
        self._vm._blocking().fs("remove", _path(path, "files.remove", self._vm), None, recursive)

    def rename(self, src: str, dst: str) -> None:
        """Renames a guest path (replacing a file at ``dst``)."""
        self._vm._blocking().fs("rename", _path(src, "files.rename", self._vm), _path(dst, "files.rename", self._vm))
