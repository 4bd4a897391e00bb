"""Extents from untrusted servers, validated, and turned into block-aligned runs.

Block status replies are not validated by libnbd ("apart from that we don't
validate them"; the last extent may run past the request, a reply may cover
less than asked, or nothing at all). Before any extent is used:

    request     |<-------------- window -------------->|
    reply       |--a--|---b---|-------c--------------------|    c runs past: clipped
    reply       |--a--|-b-|                                     short: ask again from the end of b
    reply       |--a--|0|                                       zero-length: rejected
    reply       (none)                                          no progress: rejected

An extent reads as zeroes when its flags have NBD_STATE_ZERO (2); a hole
without that flag (a backing file shows through) is data and must be read.
Data runs are rounded outward to whole blocks, so every block is either read
whole or known to be zero without reading (its digest needs nothing else).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from .errors import SourceError

STATE_HOLE = 1
STATE_ZERO = 2
MAX_EXTENTS = (2**32 - 1) // 4096  # per reply, as ovirt-imageio caps it

Extent = tuple[int, int, int]  # (offset, length, flags)


def clip_extents(pairs: Iterable[int], offset: int, end: int, *, disk: str) -> list[Extent]:
    """Turn libnbd's flat [length, flags, length, flags, ...] reply into extents.

    Extents start at offset and are clipped at end; a zero-length extent, too
    many extents or a reply that covers nothing raise SourceError.
    """
    out: list[Extent] = []
    it = iter(pairs)
    pos = offset
    for length in it:
        try:
            flags = next(it)
        except StopIteration:
            raise SourceError("block status reply has an odd number of entries", disk=disk,
                              offset=offset) from None
        if length <= 0:
            raise SourceError(f"block status reply has an extent of length {length}", disk=disk,
                              offset=pos)
        if len(out) >= MAX_EXTENTS:
            raise SourceError(f"block status reply has more than {MAX_EXTENTS} extents",
                              disk=disk, offset=offset)
        length = min(length, end - pos)
        if out and out[-1][2] == flags:
            prev = out[-1]
            out[-1] = (prev[0], prev[1] + length, flags)
        else:
            out.append((pos, length, flags))
        pos += length
        if pos >= end:
            break
    if not out:
        raise SourceError("block status reply covers nothing", disk=disk, offset=offset)
    return out


def walk_extents(fetch: Callable[[int, int], list[Extent]], offset: int, end: int) -> Iterator[Extent]:
    """All extents of [offset, end), asking again where a reply covered less."""
    pos = offset
    while pos < end:
        extents = fetch(pos, end - pos)
        for ext in extents:
            yield ext
        pos = extents[-1][0] + extents[-1][1]


def block_runs(extents: Iterable[Extent], start: int, end: int, block: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_data) runs covering [start, end), data rounded outward to blocks.

    start must be block-aligned; end is block-aligned or the disk's end.
    """
    runs: list[list[int]] = []  # [start, end] of merged data runs
    for off, length, flags in extents:
        if flags & STATE_ZERO:
            continue
        s = max(start, off - off % block)
        e = min(end, -(-(off + length) // block) * block)
        if s >= e:
            continue
        if runs and s <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], e)
        else:
            runs.append([s, e])
    pos = start
    for s, e in runs:
        if s > pos:
            yield (pos, s - pos, False)
        yield (s, e - s, True)
        pos = e
    if pos < end:
        yield (pos, end - pos, False)


def mark_zero(extents: list[Extent], zero_runs: list[tuple[int, int]]) -> list[Extent]:
    """extents with the (offset, length) runs in zero_runs flagged as reading zero.

    Both are sorted and non-overlapping; the result covers what extents cover.
    """
    out: list[Extent] = []
    runs = iter(zero_runs)
    run = next(runs, None)
    for off, length, flags in extents:
        end = off + length
        pos = off
        while pos < end:
            while run is not None and run[0] + run[1] <= pos:
                run = next(runs, None)
            if run is None or run[0] >= end:
                out.append((pos, end - pos, flags))
                break
            if run[0] > pos:
                out.append((pos, run[0] - pos, flags))
                pos = run[0]
            stop = min(end, run[0] + run[1])
            out.append((pos, stop - pos, flags | STATE_ZERO))
            pos = stop
    return out
