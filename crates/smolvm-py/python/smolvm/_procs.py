"""Background processes: ``vm.spawn()`` and ``vm.attach()``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

from .exceptions import _from_native
from .types import CommandResult, StreamEvent

if TYPE_CHECKING:  # pragma: no cover
    from ._vm import SmolVM


@dataclass(frozen=True)
class ProcessInfo:
    """A background process, as :meth:`SmolVM.processes` lists it.

    Attributes:
        handle: Its handle in this boot of the VM.
        pid: Its guest pid.
        command: Its command line (cut to 256 bytes; guest text).
        running: Whether it still runs.
        exit_code: Its exit status once ended (128 + N for signal N).
        output_bytes: Output produced so far (stdout + stderr).
        buffered_from: The oldest output offset still buffered (the guest
            keeps the last 1 MiB; what came before is dropped).
    """

    handle: int
    pid: int
    command: str
    running: bool
    exit_code: Optional[int]
    output_bytes: int
    buffered_from: int

    @classmethod
    def _from_native(cls, d: dict) -> "ProcessInfo":
        e = d.get("exit")
        code = None
        if e is not None:
            code = e["code"] if e.get("code") is not None else 128 + (e.get("signal") or 127)
        return cls(
            handle=int(d["handle"]),
            pid=int(d["pid"]),
            command=str(d["command"]),
            running=e is None,
            exit_code=code,
            output_bytes=int(d["output_bytes"]),
            buffered_from=int(d["buffered_from"]),
        )


class BackgroundProcess:
    """A process started by :meth:`SmolVM.spawn` (or found again with
    :meth:`SmolVM.attach`, from any process): it runs on its own in the
    guest, whatever happens to this object or this Python process."""

    def __init__(self, vm: "SmolVM", handle: int, pid: Optional[int]) -> None:
        self._vm = vm
        self.handle = handle
        self.pid = pid

    def __repr__(self) -> str:
        return f"<BackgroundProcess {self.handle} (pid {self.pid}) in {self._vm.vm_id}>"

    def info(self) -> ProcessInfo:
        for p in self._vm.processes():
            if p.handle == self.handle:
                return p
        raise _from_native(
            "process_not_found",
            f"no background process {self.handle} in VM '{self._vm.vm_id}' (forgotten, or the VM restarted)",
            self._vm.vm_id,
            None,
            "processes",
        )

    def _cancel_attach(self) -> None:
        proc = getattr(self, "_attach", None)
        if proc is not None:
            proc.cancel()

    def stream(self, from_start: bool = True) -> Iterator[StreamEvent]:
        """Its output as events (all still buffered, or only new output),
        then ``exit``. Closing the generator detaches; the process runs on.
        A ``dropped`` event says how many bytes were no longer buffered."""
        from ._vm import _Events

        proc = self._vm._blocking().attach(self.handle, 0 if from_start else None)
        self._attach = proc
        # Its own timeout already ended it: the exit says so, it is no error here.
        events = _Events(self._vm.vm_id, None, None, op="attach", raise_timeout=False)
        try:
            while not events.ended:
                yield from events.feed(proc.next())
        finally:
            proc.cancel()

    def wait(self, timeout: Optional[float] = None) -> CommandResult:
        """Waits for it to end; returns its exit status and the output still
        buffered (the last 1 MiB; ``truncated`` when older output was
        dropped). :class:`OperationTimeoutError` after ``timeout`` (it keeps
        running; wait again or :meth:`kill` it)."""
        import queue
        import threading

        events: "queue.Queue" = queue.Queue()
        gen = self.stream(from_start=True)

        def pump() -> None:
            try:
                for ev in gen:
                    events.put(ev)
            except BaseException as e:  # handed to the waiter
                events.put(e)
            finally:
                events.put(None)

        t = threading.Thread(target=pump, name=f"smolvm-wait-{self.handle}", daemon=True)
        t.start()
        out = {"stdout": [], "stderr": []}  # type: dict
        truncated = False
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    ev = events.get(timeout=left)
                except queue.Empty:
                    raise _from_native(
                        "timeout",
                        f"VM '{self._vm.vm_id}': background process {self.handle} did not end within "
                        f"{timeout:g}s; it keeps running",
                        self._vm.vm_id,
                        None,
                        "wait",
                        {"timeout_seconds": timeout},
                    ) from None
                if ev is None:
                    raise _from_native(
                        "agent_unavailable", "the process stream ended early", self._vm.vm_id, None, "wait"
                    )
                if isinstance(ev, BaseException):
                    raise ev
                if ev.type in out:
                    out[ev.type].append(ev.data)
                elif ev.type == "dropped":
                    truncated = True
                elif ev.type == "exit":
                    return CommandResult(
                        exit_code=ev.exit_code if ev.exit_code is not None else 255,
                        stdout="".join(out["stdout"]),
                        stderr="".join(out["stderr"]),
                        truncated=truncated,
                    )
        finally:
            # Detach: the pump's attach is cancelled even mid-wait.
            try:
                gen.close()
            except ValueError:  # the pump thread is inside it: cancel under it
                self._cancel_attach()
            t.join(timeout=5)

    def write_stdin(self, data: Union[bytes, str]) -> None:
        """Writes to its stdin (paced by the process)."""
        b = data.encode() if isinstance(data, str) else bytes(data)
        self._vm._blocking().procs("stdin", self.handle, 0, b, False)

    def close_stdin(self) -> None:
        """Closes its stdin (it sees end of input)."""
        self._vm._blocking().procs("stdin", self.handle, 0, b"", True)

    def signal(self, signal: int) -> None:
        """Sends ``signal`` to its process group."""
        self._vm._blocking().procs("signal", self.handle, int(signal))

    def kill(self) -> None:
        """SIGKILL to its process group."""
        self.signal(9)

    def forget(self) -> None:
        """Drops a finished process's record and buffered output."""
        self._vm._blocking().procs("forget", self.handle)
