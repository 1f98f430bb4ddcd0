"""asyncio faces of the native operations.

A native call given a ``done`` callback starts the operation on smolvm's own
runtime and returns a task at once; ``done(ok, value)`` is called from a
runtime thread when it ends. Here that becomes an awaitable: the result is
handed to the event loop thread-safely, and cancelling the awaiting task
cancels the operation (the library undoes what it had begun).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional


async def call(
    start: Callable[[Callable[[bool, Any], None]], Any],
    orphan: Optional[Callable[[Any], None]] = None,
    cancel_op: bool = True,
) -> Any:
    """Runs ``start(done)`` and waits for ``done`` without blocking the loop.

    ``orphan(value)`` is called with a result that arrives after the
    awaiting task was cancelled (a VM made just before: nobody has it).
    With ``cancel_op=False`` cancelling the awaiting task lets the
    operation finish (one cut short would do damage: a snapshot, a
    restore); its result then goes to ``orphan``."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            if ok and orphan is not None:
                orphan(value)
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def done(ok: bool, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    task = start(done)
    try:
        return await fut
    except asyncio.CancelledError:
        if cancel_op:
            task.cancel()
        raise
