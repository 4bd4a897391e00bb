"""The plan: a disk's extents turned into read (data) and zero requests.

requests() is pure: extents in, requests out. Plan walks the disk one
window at a time (WINDOW bytes of extents at once, never the whole disk, as
nbdcopy and ovirt-imageio do), so memory stays bounded on any disk size, and
hands requests to the pipeline's workers under a lock. A window's extents
are fetched by whichever worker finds the queue empty, on its own connection.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ..integrity import BLOCK
from ..ranges import Extent, block_runs, walk_extents

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
    def __init__(self, size: int, *, request_size: int, window: int = WINDOW) -> None:
        if request_size <= 0 or request_size % BLOCK:
            raise ValueError(f"request size {request_size} is not a positive multiple of {BLOCK}")
        if window % BLOCK:
            raise ValueError(f"window {window} is not a multiple of {BLOCK}")
        self.size = size
        self.request_size = request_size
        self.window = window
        self._next_window = 0
        self._queue: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()

    def next(self, fetch: Callable[[int, int], list[Extent]]) -> Request | None:
        """The next request, or None at the end; fetch(offset, length) gives extents."""
        with self._lock:
            while not self._queue:
                start = self._next_window
                if start >= self.size:
                    return None
                end = min(start + self.window, self.size)
                self._queue.extend(requests(walk_extents(fetch, start, end), start, end,
                                            request_size=self.request_size))
                self._next_window = end
            return self._queue.popleft()
