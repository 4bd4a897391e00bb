"""A worker's failed reads: when to issue them again, and the budget that ends the copy.

A failed read is issued again after a backoff (reads are idempotent, R4),
up to `retries` times per request; a connection the server dropped is
reopened (and the export's size checked again) within the same budget; the
reads lost with it are read again one at a time, so that only the read that
kills a connection is charged to the budget and named (S2). A persistent
failure ends the copy with an error naming the offset (R9).

A Retries belongs to one worker and is used on its thread only.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Hashable

from ..disks import Conn
from ..errors import ConnectionLost, SourceChanged, SourceError
from .plan import Request
from .shared import Stats

RETRIES = 8  # failed reads of one request before the copy fails: 0.1 s doubling to 5 s, ~16 s

Read = tuple[int, Request]  # a buffer slot and the request read into it


def backoff(attempt: int) -> float:
    return min(0.1 * 2 ** (attempt - 1), 5.0)


class Retries:
    def __init__(self, budget: int, source_name: str, stats: Stats) -> None:
        self.budget = budget
        self.source_name = source_name
        self.stats = stats
        self.due: collections.deque[tuple[float, int, Request]] = collections.deque()
        # reads lost with a connection, culprit unknown: read again one at a time (see lost)
        self.suspects: collections.deque[Read] = collections.deque()
        self._attempts: dict[Hashable, int] = {}  # offset (or ("extents", offset)) -> failures
        self._last_error: BaseException | None = None

    def failed(self, slot: int, req: Request, err: BaseException) -> None:
        """Read again after a backoff (reads are idempotent), or fail when the budget is spent."""
        attempt = self._attempts.get(req.offset, 0) + 1
        if attempt > self.budget:
            why = getattr(err, "message", None) or getattr(err, "strerror", None) or str(err)
            raise SourceError(f"read failed ({why}), {attempt} attempts", disk=self.source_name,
                              offset=req.offset, length=req.length,
                              errno=getattr(err, "errno", None))
        self._attempts[req.offset] = attempt
        self._last_error = err
        self.stats.retries += 1
        self.due.append((time.monotonic() + backoff(attempt), slot, req))

    def ready(self, now: float) -> Read | None:
        """A read whose backoff is over, if any (none while there are suspects)."""
        if self.due and self.due[0][0] <= now and not self.suspects:
            _, slot, req = self.due.popleft()
            return slot, req
        return None

    def charge(self, what: Hashable, err: ConnectionLost) -> None:
        """A request that is not a read (extents) lost its connection: charged to the budget."""
        attempt = self._attempts.get(what, 0) + 1
        if attempt > self.budget:
            raise err
        self._attempts[what] = attempt
        self._last_error = err
        self.stats.retries += 1

    def lost(self, lost: list[Read], err: ConnectionLost, *, culprit_known: bool) -> None:
        """Reads lost with a connection: one alone (culprit_known) is charged a retry.

        Which request killed it is known only when one was in flight alone
        (qemu-nbd hangs up on a backend read error, RELIABILITY.md S2): that
        one is charged a retry. Reads lost together are suspects, charged
        nothing: they are read again one at a time, so a request that kills
        every connection is found, and the error names its offset, not that of
        a read that happened to be in flight beside it.
        """
        if len(lost) == 1 and culprit_known:
            self.failed(*lost[0], err)
        else:  # each is read again (counted as a retry), none is charged to the budget
            self.suspects.extend(sorted(lost, key=lambda r: r[1].offset))
            self.stats.retries += len(lost)
        self._last_error = err

    def reconnect(self, src: Conn, stop: threading.Event) -> None:
        """Reconnect a connection the server dropped, with backoff, within the retry budget."""
        if not src.dead:
            return
        for attempt in range(1, self.budget + 2):
            try:
                src.reconnect()
                self.stats.reconnects += 1
                return
            except SourceChanged:
                raise
            except SourceError as e:
                if attempt > self.budget:
                    if self._last_error is not None:  # say what started it
                        e.message += f", after: {self._last_error}"
                    raise
            if stop.wait(backoff(attempt)):
                return
