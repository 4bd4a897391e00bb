"""Extents from untrusted servers, validated, and turned into block-aligned runs.

Block status replies are not validated by libnbd ("apart from that we don't
validate them"; the last extent may run past the request, a reply may cover
less than asked, or nothing at all). Before any extent is used:

    request     |<-------------- window -------------->|
    reply       |--a--|---b---|-------c--------------------|    c runs past: clipped
    reply       |--a--|-b-|                                     short: ask again from the end of b
    reply       |--a--|0|                                       zero-length: rejected
    reply       (none)                                          no progress: rejected
    reply       |a|b|a|b|... more than MAX_EXTENTS              cut: the rest is unknown
                                                                (data, or dirty)

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
# Extents kept of one reply (after merging runs of equal flags); the rest of the request counts
# as unknown. 128 Ki per 1 GiB window is an 8 KiB average: a real disk rarely comes close, and
# a hostile reply of 8,000,000 extents then costs tens of MiB, not hundreds (RELIABILITY.md S8).
MAX_EXTENTS = 1 << 17

Extent = tuple[int, int, int]  # (offset, length, flags)


def reply_extents(reply: tuple[int, list[Extent], int, bool], offset: int, end: int, *,
                  unknown: int, disk: str) -> list[Extent] | None:
    """The extents of one block status reply, as the block_status kernel read it; None when
    the server sent none for the context at offset.

    A reply cut at MAX_EXTENTS has the rest of the request filled with one
    extent of flags `unknown`: what is safe for the context (data for
    base:allocation, dirty for a dirty bitmap). An odd entry count, a
    zero-length extent or a reply that covers nothing raise SourceError.
    """
    from ._native._reference import BS_NO_REPLY, BS_ODD, BS_OK

    status, extents, pos, truncated = reply
    if status == BS_NO_REPLY:
        return None
    if status == BS_ODD:
        raise SourceError("block status reply has an odd number of entries", disk=disk,
                          offset=offset)
    if status != BS_OK:
        raise SourceError("block status reply has an extent of length 0", disk=disk, offset=pos)
    if not extents:
        raise SourceError("block status reply covers nothing", disk=disk, offset=offset)
    if truncated and pos < end:
        extents.append((pos, end - pos, unknown))
    return extents


def clip_extents(pairs: Iterable[int], offset: int, end: int, *, disk: str) -> list[Extent]:
    """libnbd's flat [length, flags, length, flags, ...] base:allocation reply as extents (the
    pure-Python path of reply_extents)."""
    from ._native._reference import reply_extents as read

    extents = reply_extents(read(list(pairs), offset, end - offset, MAX_EXTENTS), offset, end,
                            unknown=0, disk=disk)
    assert extents is not None
    return extents


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
