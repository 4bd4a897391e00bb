"""Blocking work off the event loop, carried to its end.

The event loop stays free for signals while a QMP exchange, a journal append or an fsync runs
on a thread. A cancellation (a signal) meanwhile does not cut the call short: a QMP reply left
unread would be taken for the next command's, a journal append whose file is closed under it
could write through a reused descriptor. The call ends, then the cancellation is raised.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable


async def to_the_end(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """fn(*args, **kw) on a thread; its result (or error). Cancelled meanwhile: once fn has
    returned, CancelledError."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kw))
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})  # a cancelled wait leaves the task running
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        task.exception()  # retrieved: the cancellation is what the caller hears of
        raise asyncio.CancelledError
    return task.result()
