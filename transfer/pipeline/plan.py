"""The plan: a pass's decisions, pure (no threads, no I/O, testable without servers).

requests() turns a disk's extents into read (data) and zero requests. Windows
walks the disk one window at a time (WINDOW bytes of extents at once, never
the whole disk, as nbdcopy and ovirt-imageio do), so memory stays bounded on
any disk size; the scheduler (scheduler.py) asks for a window's extents and
hands its requests to the pipeline's workers.

A plan may cover only some ranges of the disk (a warm pass's changed
blocks): the ranges of one window share one extents query, so a pass over
thousands of scattered 64 KiB runs asks the server a few times per GiB, not
once per run.

The frontier is what a warm pass commits (RELIABILITY.md R5): every planned
byte below it has been written (done() was called for its request). Requests
are handed out in offset order, so the frontier is the first handed-out
request not yet done, or the next one not handed out.

Compare mode (warm passes) decides per block: a block whose new digest equals
the manifest's old one is not written, unless it lies in a force range, whose
target contents are unknown after a crash.
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

from ..integrity import BLOCK
from ..ranges import STATE_ZERO, Extent, block_runs

WINDOW = 1 << 30  # extents asked for at once: 1 GiB, as ovirt-imageio (2 GiB) and CDI (2 GiB) cap it
MAX_ZERO_REQUEST = 256 << 20  # one zero request: long enough to be cheap, short for smooth progress
DATA, ZERO, SAME = 0, 1, 2  # per-block flags: write, zero, unchanged (compare mode: skip)
DIGEST = 16  # bytes of one block's digest in a manifest


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


def check_request_size(request_size: int, window: int) -> None:
    if request_size <= 0 or request_size % BLOCK:
        raise ValueError(f"request size {request_size} is not a positive multiple of {BLOCK}")
    if window % BLOCK:
        raise ValueError(f"window {window} is not a multiple of {BLOCK}")


def check_spans(spans: list[tuple[int, int]], size: int) -> None:
    prev = 0
    for s, e in spans:
        if not prev <= s < e <= size or s % BLOCK or (e % BLOCK and e != size):
            raise ValueError(f"plan range [{s}, {e}) is not sorted, non-empty, block-aligned "
                             f"and inside the {size}-byte disk")
        prev = e


@dataclass(frozen=True, slots=True)
class Window:
    pieces: list[tuple[int, int]]  # the planned [start, end) ranges inside the window
    span: int  # after it: the index of the span the next window starts in
    pos: int  # after it: where the next window starts (the disk's size at the end)

    @property
    def start(self) -> int:
        return self.pieces[0][0]

    @property
    def end(self) -> int:
        return self.pieces[-1][1]


class Windows:
    """The spans to copy, one window at a time.

    spans: sorted, non-overlapping [start, end) pairs, block-aligned (an end
    may be the disk's size); None means the whole disk. A window is taken
    only once its extents arrived (peek, then take): a failed fetch leaves the
    plan where it was, so the frontier never passes an unplanned window.
    """

    def __init__(self, size: int, *, window: int = WINDOW,
                 spans: Iterable[tuple[int, int]] | None = None) -> None:
        if spans is None:
            self.spans = [(0, size)] if size > 0 else []
        else:
            self.spans = list(spans)
            check_spans(self.spans, size)
        self.size = size
        self.window = window
        self.span = 0  # index of the span the next window starts in
        self.pos = self.spans[0][0] if self.spans else size  # where the next window starts
        self.bytes = sum(e - s for s, e in self.spans)

    def peek(self) -> Window | None:
        """The next window, not yet taken; None at the end of the plan."""
        spans, i = self.spans, self.span
        if i >= len(spans):
            return None
        start = self.pos
        limit = min(start + self.window, self.size)
        pieces: list[tuple[int, int]] = []
        while i < len(spans) and spans[i][0] < limit:
            s, e = max(spans[i][0], start), min(spans[i][1], limit)
            pieces.append((s, e))
            if spans[i][1] > limit:
                break
            i += 1
        pos = limit if i < len(spans) and spans[i][0] < limit else (
            spans[i][0] if i < len(spans) else self.size)
        return Window(pieces, i, pos)

    def take(self, window: Window) -> None:
        self.span, self.pos = window.span, window.pos


def window_requests(window: Window, extents: list[Extent], request_size: int) -> Iterator[Request]:
    """The requests of a window's pieces, given the extents of [window.start, window.end)."""
    pieces = window.pieces
    if len(extents) == 1 and not extents[0][2] & STATE_ZERO:  # all data: no extents to cut
        for s, e in pieces:
            for off in range(s, e, request_size):
                yield Request(off, min(request_size, e - off), True)
        return
    if len(pieces) == 1:
        s, e = pieces[0]
        yield from requests(extents, s, e, request_size=request_size)
        return
    starts = [x[0] for x in extents]
    for s, e in pieces:  # only the extents under each piece, found by bisection
        lo = max(bisect.bisect_right(starts, s) - 1, 0)
        hi = bisect.bisect_left(starts, e)
        yield from requests(extents[lo:hi], s, e, request_size=request_size)


class Frontier:
    """Every planned byte below value() is done; requests must be issued in offset order."""

    def __init__(self, start: int) -> None:
        self._issued: collections.deque[int] = collections.deque()  # offsets, in issue order
        self._done: set[int] = set()
        self._unissued = start  # where the next request not handed out is

    def issued(self, offset: int, after: int) -> None:
        """The request at offset was handed out; the next one not handed out is at after."""
        self._issued.append(offset)
        self._unissued = after

    def ended(self, size: int) -> None:
        """Every request was handed out."""
        self._unissued = size

    def done(self, offset: int) -> None:
        """The request at offset has been written (or needed no write)."""
        self._done.add(offset)

    def value(self) -> int:
        issued, done = self._issued, self._done
        while issued and issued[0] in done:
            done.discard(issued.popleft())
        return issued[0] if issued else self._unissued


class Force:
    """Force ranges: sorted [start, end) pairs whose target contents are unknown (after a
    crash), so compare mode writes every block there."""

    def __init__(self, ranges: list[tuple[int, int]] | None) -> None:
        self.ranges = ranges or []
        self._starts = [s for s, _ in self.ranges]

    def touches(self, offset: int, length: int) -> bool:
        """Does [offset, +length) touch a force range?"""
        i = bisect.bisect_right(self._starts, offset + length - 1) - 1
        return i >= 0 and self.ranges[i][1] > offset


def all_zero(runs: Sequence[tuple[int, int]], req: Request, size: int) -> bool:
    """Do a manifest's zero runs over req (a disk of size bytes) cover all of it?"""
    return len(runs) == 1 and runs[0] == (req.offset, min(req.length, size - req.offset))


def mark_same(digests: Any, old: bytes, flags: bytearray, blocks: int) -> int:
    """Flag SAME each of the first blocks whose new digest equals the old one; how many."""
    same = 0
    for i in range(blocks):
        if digests[i * DIGEST : i * DIGEST + DIGEST] == old[i * DIGEST : i * DIGEST + DIGEST]:
            flags[i] = SAME
            same += 1
    return same
