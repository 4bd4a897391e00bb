"""A warm pass's commits (RELIABILITY.md R5), driven from the event loop.

Every commit_bytes or commit_seconds the target is flushed and
commit(frontier) called, so the caller can journal that everything planned
below the frontier is durable. On an interruption the same flush and commit
happen before the Interrupted error; after any other error nothing more is
committed. A flush goes to each writer, which runs it on the thread that owns
its target Conn; its first failure is final (never retried, R6).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from .scheduler import Scheduler
from .shared import Shared
from .writer import Writer


class Commits:
    def __init__(self, plan: Scheduler, writers: list[Writer], shared: Shared,
                 commit: Callable[[int], None], *, every_bytes: int, every_seconds: float,
                 start: float) -> None:
        self.plan = plan
        self.writers = writers
        self.shared = shared
        self.commit = commit
        self.every_bytes = every_bytes
        self.every_seconds = every_seconds
        self.committed = 0  # the frontier last committed
        self.at, self.done = start, 0  # when the last commit was considered, and bytes done then

    async def tick(self, done: int, now: float) -> bool:
        """Commit when due (done: bytes done so far); True if a cancellation came meanwhile."""
        cancelled = False
        if done - self.done >= self.every_bytes or now - self.at >= self.every_seconds:
            frontier = self.plan.frontier()
            if frontier > self.committed:
                try:
                    cancelled = await to_the_end(self._commit, frontier)
                    self.committed = frontier
                except BaseException as e:  # a failed flush or journal: stop (R6)
                    self.shared.fail(e)
            self.at, self.done = time.monotonic(), done
        return cancelled

    async def last(self) -> None:
        """Flush and commit what is done, before an interruption ends the pass (P3)."""
        frontier = self.plan.frontier()
        if frontier > self.committed:
            await to_the_end(self._commit, frontier)

    def _commit(self, frontier: int) -> None:
        """Flush the target (its first failure is final, R6), then let the caller journal
        frontier."""
        flush(self.writers)
        self.commit(frontier)


def flush(writers: list[Writer]) -> None:
    """Make the target durable; the first failure is final (never retried).

    Every connection flushes, though with NBD multi-conn one flush would cover
    all: it costs little, and leans on no server's reading of the spec.
    """
    for w in writers:
        w.flush()


async def to_the_end(fn: Callable[..., None], *args: object) -> bool:
    """Run fn on a thread to its end even if cancelled meanwhile (a commit cut short would
    leave its thread using handles being closed); fn's error is raised. True if cancelled."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
            return cancelled
        except asyncio.CancelledError:
            if task.done():  # the cancellation was ours to absorb; fn's outcome stands
                task.result()
                return True
            cancelled = True
