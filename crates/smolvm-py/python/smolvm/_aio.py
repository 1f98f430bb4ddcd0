"""asyncio faces of the native operations.

A native call given a ``done`` callback starts the operation on smolvm's own
runtime and returns a task at once; ``done(ok, value)`` is called from a
runtime thread when it ends. Here that becomes an awaitable: the result is
handed to the event loop thread-safely, and cancelling the awaiting task
cancels the operation (the library undoes what it had begun).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable


async def call(start: Callable[[Callable[[bool, Any], None]], Any]) -> Any:
    """Runs ``start(done)`` and waits for ``done`` without blocking the loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
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
        task.cancel()
        raise
