"""``vm.pty()``: an interactive terminal session in the guest."""

from __future__ import annotations

import queue
import threading
from typing import Any, Optional, Union

from .exceptions import OperationTimeoutError, _from_native


class PtySession:
    """A process on a guest terminal (:meth:`SmolVM.pty`).

    Output arrives as raw terminal bytes (escape sequences included: it is a
    terminal). A thread of the session reads it, so :meth:`read` can wait
    with a timeout; a reader that stops reading pauses the guest process
    (its output waits in the guest, nothing is lost). Use it as a context
    manager, or :meth:`close` it: that kills the process.
    """

    def __init__(self, proc: Any, vm_id: str) -> None:
        self._proc = proc
        self._vm_id = vm_id
        # Bounded: when the caller stops reading, the pump stops taking
        # events, and flow control holds the rest in the guest.
        self._events: "queue.Queue[tuple]" = queue.Queue(maxsize=64)
        self._exit: Optional[int] = None
        self._done = threading.Event()
        self._pump = threading.Thread(target=self._run, name=f"smolvm-pty-{vm_id}", daemon=True)
        self._pump.start()

    def _run(self) -> None:
        try:
            while True:
                ev = self._proc.next()
                if ev is None:
                    break
                self._events.put(ev)
                if ev[0] in ("exit", "error"):
                    break
        except BaseException as e:  # delivered to the reader
            self._events.put(("raise", e))
        finally:
            self._events.put(("end", None))

    def read(self, timeout: Optional[float] = None) -> bytes:
        """The next output bytes; ``b""`` once the process ended.
        :class:`OperationTimeoutError` when nothing came within ``timeout``."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                kind, payload = self._events.get(timeout=left)
            except queue.Empty:
                raise _from_native(
                    "timeout",
                    f"VM '{self._vm_id}': no terminal output within {timeout:g}s",
                    self._vm_id,
                    None,
                    "pty",
                    {"timeout_seconds": timeout},
                ) from None
            if kind == "stdout":
                return payload
            if kind == "exit":
                code, signal, _timed_out, _ms = payload
                self._exit = code if code is not None else (128 + signal if signal is not None else 255)
            elif kind == "raise":
                self._done.set()
                raise payload
            elif kind == "error":
                self._done.set()
                raise _from_native(payload[0], payload[1], self._vm_id, None, "pty")
            elif kind == "end":
                self._done.set()
            # "started" and anything else: nothing to hand back.
        return b""

    def read_until(self, marker: Union[bytes, str], timeout: float = 30.0) -> bytes:
        """Reads until ``marker`` shows up (returns all read, marker included)."""
        import time

        m = marker.encode() if isinstance(marker, str) else marker
        buf = b""
        deadline = time.monotonic() + timeout
        while m not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _from_native(
                    "timeout",
                    f"VM '{self._vm_id}': {m!r} did not appear on the terminal within {timeout:g}s",
                    self._vm_id,
                    None,
                    "pty",
                    {"timeout_seconds": timeout},
                )
            chunk = self.read(timeout=left)
            if not chunk:
                break
            buf += chunk
        return buf

    def write(self, data: Union[bytes, str]) -> None:
        """Types ``data`` on the terminal (``"\\x03"`` is Ctrl-C)."""
        self._proc.write_stdin(data.encode() if isinstance(data, str) else bytes(data))

    def resize(self, rows: int, cols: int) -> None:
        """Changes the terminal's size (the process gets SIGWINCH)."""
        self._proc.resize(int(rows), int(cols))

    def wait(self, timeout: Optional[float] = None) -> int:
        """Waits for the process to end (reading and dropping its output);
        returns its exit status."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                raise _from_native(
                    "timeout",
                    f"VM '{self._vm_id}': the terminal's process did not end within {timeout:g}s",
                    self._vm_id,
                    None,
                    "pty",
                    {"timeout_seconds": timeout},
                )
            try:
                self.read(timeout=left)
            except OperationTimeoutError:
                continue
        return self._exit if self._exit is not None else 255

    @property
    def exit_code(self) -> Optional[int]:
        """The exit status once it ended, else None."""
        return self._exit

    def close(self) -> None:
        """Ends the session (the process is killed if still running)."""
        self._proc.cancel()
        self._done.set()

    def __enter__(self) -> "PtySession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
