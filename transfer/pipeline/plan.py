"""The plan: a disk's extents turned into read (data) and zero requests.

requests() is pure: extents in, requests out. Plan walks the disk one
window at a time (WINDOW bytes of extents at once, never the whole disk, as
nbdcopy and ovirt-imageio do), so memory stays bounded on any disk size, and
hands requests to the pipeline's workers under a lock. A window's extents
are fetched by whichever worker finds the queue empty, on its own connection.

A plan may cover only some ranges of the disk (a warm pass's changed
blocks): the ranges of one window share one extents query, so a pass over
thousands of scattered 64 KiB runs asks the server a few times per GiB, not
once per run.

The frontier is what a warm pass commits (RELIABILITY.md R5): every planned
byte below it has been written (done() was called for its request). Requests
are handed out in offset order, so the frontier is the first handed-out
request not yet done, or the next one not handed out.
"""

from __future__ import annotations

import bisect
import collections
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ..integrity import BLOCK
from ..ranges import STATE_ZERO, Extent, block_runs, walk_extents

WINDOW = 1 << 30  # extents asked for at once: 1 GiB, as ovirt-imageio (2 GiB) and CDI (2 GiB) cap it
MAX_ZERO_REQUEST = 256 << 20  # one zero request: long enough to be cheap, short for smooth progress


@dataclass(frozen=True, slots=True)
class Request:
    offset: int
    length: int
    data: bool  # True: read, inspect and write; False: known zero, never read


def requests(extents: Iterable[Extent], start: int, end: int, *, request_size: int,
             block: int = BLOCK, zero_size: int = MAX_ZERO_REQUEST) -> Iterator[Request]:
    """Requests covering [start, end): data split at request_size, zeros at zero_size."""
    for offset, length, data in block_runs(extents, start, end, block):
        step = request_size if data else zero_size
        stop = offset + length
        while offset < stop:
            n = min(step, stop - offset)
            yield Request(offset, n, data)
            offset += n


class Plan:
    """Requests for the ranges to copy, one window at a time, and the frontier of done ones.

    ranges: sorted, non-overlapping [start, end) pairs, block-aligned (an end
    may be the disk's size); None means the whole disk.
    """

    def __init__(self, size: int, *, request_size: int, window: int = WINDOW,
                 ranges: Iterable[tuple[int, int]] | None = None) -> None:
        if request_size <= 0 or request_size % BLOCK:
            raise ValueError(f"request size {request_size} is not a positive multiple of {BLOCK}")
        if window % BLOCK:
            raise ValueError(f"window {window} is not a multiple of {BLOCK}")
        self.size = size
        self.request_size = request_size
        self.window = window
        if ranges is None:
            spans = [(0, size)] if size > 0 else []
        else:
            spans = list(ranges)
            _check_spans(spans, size)
        self._spans = spans
        self._span = 0  # index of the span the next window starts in
        self._pos = spans[0][0] if spans else size  # where the next window starts
        self.bytes = sum(e - s for s, e in spans)
        self._queue: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()  # the queue and windows; held while extents are fetched
        # The frontier's own lock, never held across I/O: the event loop asks for the frontier
        # while a worker may be waiting on a slow block status reply under _lock.
        self._flock = threading.Lock()
        self._issued: collections.deque[int] = collections.deque()  # offsets, in issue order
        self._done: set[int] = set()
        self._unissued = self._pos if spans else size  # where the next request not handed out is

    def next(self, fetch: Callable[[int, int], list[Extent]]) -> Request | None:
        """The next request, or None at the end; fetch(offset, length) gives extents."""
        with self._lock:
            while not self._queue:
                if not self._fill(fetch):
                    with self._flock:
                        self._unissued = self.size
                    return None
            req = self._queue.popleft()
            after = self._queue[0].offset if self._queue else (
                self._pos if self._span < len(self._spans) else self.size)
            with self._flock:
                self._issued.append(req.offset)
                self._unissued = after
            return req

    def _fill(self, fetch: Callable[[int, int], list[Extent]]) -> bool:
        """Queue the requests of the next window; False at the end of the plan."""
        spans, i = self._spans, self._span
        if i >= len(spans):
            return False
        start = self._pos
        limit = min(start + self.window, self.size)
        pieces: list[tuple[int, int]] = []
        while i < len(spans) and spans[i][0] < limit:
            s, e = max(spans[i][0], start), min(spans[i][1], limit)
            pieces.append((s, e))
            if spans[i][1] > limit:
                break
            i += 1
        # the window is taken only once its extents arrived: a failed fetch (raised to the
        # worker) leaves the plan where it was, so the frontier never passes an unplanned window
        extents = list(walk_extents(fetch, pieces[0][0], pieces[-1][1]))
        self._span = i
        self._pos = limit if i < len(spans) and spans[i][0] < limit else (
            spans[i][0] if i < len(spans) else self.size)
        if len(extents) == 1 and not extents[0][2] & STATE_ZERO:  # all data: no extents to cut
            step, queue = self.request_size, self._queue
            for s, e in pieces:
                for off in range(s, e, step):
                    queue.append(Request(off, min(step, e - off), True))
            return True
        if len(pieces) == 1:
            s, e = pieces[0]
            self._queue.extend(requests(extents, s, e, request_size=self.request_size))
            return True
        starts = [x[0] for x in extents]
        for s, e in pieces:  # only the extents under each piece, found by bisection
            lo = max(bisect.bisect_right(starts, s) - 1, 0)
            hi = bisect.bisect_left(starts, e)
            self._queue.extend(requests(extents[lo:hi], s, e, request_size=self.request_size))
        return True

    def done(self, offset: int) -> None:
        """The request at offset has been written (or needed no write)."""
        with self._flock:
            self._done.add(offset)

    def frontier(self) -> int:
        """Every planned byte below this offset is done."""
        with self._flock:
            issued, done = self._issued, self._done
            while issued and issued[0] in done:
                done.discard(issued.popleft())
            return issued[0] if issued else self._unissued


def _check_spans(spans: list[tuple[int, int]], size: int) -> None:
    prev = 0
    for s, e in spans:
        if not prev <= s < e <= size or s % BLOCK or (e % BLOCK and e != size):
            raise ValueError(f"plan range [{s}, {e}) is not sorted, non-empty, block-aligned "
                             f"and inside the {size}-byte disk")
        prev = e
