"""The scheduler: hands the plan's requests to the workers, under a lock, and keeps the frontier.

The plan (plan.py) decides; this module adds the threads and the I/O. A
window's extents are fetched by whichever worker finds the queue empty, on
its own connection, while the others wait for the lock. The frontier has its
own lock, never held across I/O: the event loop asks for the frontier while a
worker may be waiting on a slow block status reply under the queue's lock.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Iterable

from ..ranges import Extent, walk_extents
from .plan import WINDOW, Frontier, Request, Windows, check_request_size, window_requests


class Scheduler:
    """Requests for the ranges to copy, one window at a time, and the frontier of done ones.

    ranges: sorted, non-overlapping [start, end) pairs, block-aligned (an end
    may be the disk's size); None means the whole disk.
    """

    def __init__(self, size: int, *, request_size: int, window: int = WINDOW,
                 ranges: Iterable[tuple[int, int]] | None = None) -> None:
        check_request_size(request_size, window)
        self.size = size
        self.request_size = request_size
        self._windows = Windows(size, window=window, spans=ranges)
        self.bytes = self._windows.bytes
        self._queue: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()  # the queue and windows; held while extents are fetched
        self._flock = threading.Lock()  # the frontier's (see the module's docstring)
        self._frontier = Frontier(self._windows.pos)

    def next(self, fetch: Callable[[int, int], list[Extent]]) -> Request | None:
        """The next request, or None at the end; fetch(offset, length) gives extents."""
        with self._lock:
            while not self._queue:
                if not self._fill(fetch):
                    with self._flock:
                        self._frontier.ended(self.size)
                    return None
            req = self._queue.popleft()
            after = self._queue[0].offset if self._queue else self._windows.pos
            with self._flock:
                self._frontier.issued(req.offset, after)
            return req

    def _fill(self, fetch: Callable[[int, int], list[Extent]]) -> bool:
        """Queue the requests of the next window; False at the end of the plan."""
        window = self._windows.peek()
        if window is None:
            return False
        # a failed fetch is raised to the worker and leaves the window untaken
        extents = list(walk_extents(fetch, window.start, window.end))
        self._windows.take(window)
        self._queue.extend(window_requests(window, extents, self.request_size))
        return True

    def done(self, offset: int) -> None:
        """The request at offset has been written (or needed no write)."""
        with self._flock:
            self._frontier.done(offset)

    def frontier(self) -> int:
        """Every planned byte below this offset is done."""
        with self._flock:
            return self._frontier.value()
