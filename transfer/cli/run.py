"""Running a verb's coroutine so that SIGINT and SIGTERM stop it cleanly."""

from __future__ import annotations

import asyncio
import signal
from typing import Any, Coroutine

from ..errors import Interrupted


async def _cancellable(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run coro; SIGINT and SIGTERM cancel it (the engine drains, then raises Interrupted)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        raise Interrupted("interrupted by a signal before the end") from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run(coro), cancelled by a signal."""
    return asyncio.run(_cancellable(coro))
