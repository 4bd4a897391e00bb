"""Untrusted extents: clipping, rejection, block rounding, and the plan built on them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transfer.errors import SourceError
from transfer.pipeline.plan import requests
from transfer.pipeline.scheduler import Scheduler as Plan
from transfer.integrity import Manifest, zero_digest
from transfer.ranges import (STATE_HOLE, STATE_ZERO, block_runs, clip_extents, mark_zero,
                             walk_extents)

B = BLOCK = 64 * 1024
Z = STATE_HOLE | STATE_ZERO


def test_extent_past_the_request_is_clipped():
    assert clip_extents([4 << 30, 0], 0, 1 << 20, disk="d") == [(0, 1 << 20, 0)]


def test_adjacent_extents_of_one_kind_merge():
    assert clip_extents([B, 0, B, 0, B, Z], 0, 3 * B, disk="d") == [(0, 2 * B, 0), (2 * B, B, Z)]


@pytest.mark.parametrize("pairs, match", [
    ([0, 0], "length 0"),
    ([B, 0, -5, 0], "length 0"),  # libnbd gives unsigned lengths; <= 0 is rejected
    ([B], "odd number"),
    ([], "covers nothing"),
])
def test_bad_replies_are_rejected(pairs, match):
    with pytest.raises(SourceError, match=match):
        clip_extents(pairs, 0, 4 * B, disk="nbd://x")


def test_short_replies_are_asked_again_from_where_they_ended():
    calls = []

    def fetch(offset, length):
        calls.append(offset)
        return [(offset, min(B, length), 0)]

    assert [e[0] for e in walk_extents(fetch, 0, 3 * B)] == [0, B, 2 * B]
    assert calls == [0, B, 2 * B]


def test_data_is_rounded_outward_to_blocks():
    # data at [B+100, B+200) and a 1-byte extent at the very end: both round out to whole blocks
    ext = [(0, B + 100, Z), (B + 100, 100, 0), (B + 200, 3 * B - 201, Z), (4 * B - 1, 1, 0)]
    assert list(block_runs(ext, 0, 4 * B, B)) == [(0, B, False), (B, B, True), (2 * B, B, False),
                                                  (3 * B, B, True)]


def test_a_hole_without_the_zero_flag_is_data():
    assert list(block_runs([(0, 2 * B, STATE_HOLE)], 0, 2 * B, B)) == [(0, 2 * B, True)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5 * B), st.sampled_from([0, Z, STATE_HOLE])), min_size=1,
                max_size=30), st.integers(1, 4) .map(lambda k: k * B))
def test_requests_cover_the_disk_exactly_once(raw, request_size):
    size = sum(n for n, _ in raw)
    pairs = [x for pair in raw for x in pair]
    ext = clip_extents(pairs, 0, size, disk="d")
    reqs = list(requests(ext, 0, size, request_size=request_size))
    pos = 0
    for r in reqs:
        assert r.offset == pos and r.length > 0
        assert r.offset % B == 0
        if r.data:
            assert r.length <= request_size
        pos += r.length
    assert pos == size
    # every byte of a data extent is inside a data request
    for off, n, flags in ext:
        if not flags & STATE_ZERO:
            assert all(any(r.data and r.offset <= b < r.offset + r.length for r in reqs)
                       for b in (off, off + n - 1))


def test_plan_walks_windows_and_ends():
    plan = Plan(5 * B + 7, request_size=2 * B, window=2 * B)
    seen = []
    while (r := plan.next(lambda o, n: [(o, n, 0)])) is not None:
        seen.append((r.offset, r.length))
    assert seen == [(0, 2 * B), (2 * B, 2 * B), (4 * B, B + 7)]


def test_plan_rejects_unaligned_request_size():
    with pytest.raises(ValueError):
        Plan(B, request_size=B + 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.sampled_from([0, Z])), min_size=1, max_size=12),
       st.lists(st.tuples(st.integers(0, 9), st.integers(1, 9)), max_size=6))
def test_mark_zero_flags_exactly_the_runs(raw, gaps):
    ext, pos = [], 0
    for n, flags in raw:
        ext.append((pos, n, flags))
        pos += n
    runs, at = [], 0
    for gap, n in gaps:
        runs.append((at + gap, n))
        at += gap + n
    out = mark_zero(ext, runs)
    assert out[0][0] == 0 and sum(n for _, n, _ in out) == pos
    assert all(a[0] + a[1] == b[0] for a, b in zip(out, out[1:]))
    for off, n, flags in out:
        for b in (off, off + n - 1):
            in_run = any(s <= b < s + k for s, k in runs)
            original = next(f for o, k, f in ext if o <= b < o + k)
            assert bool(flags & STATE_ZERO) == (in_run or bool(original & STATE_ZERO))


def test_manifest_zero_runs():
    m = Manifest(5 * B + 100)  # 6 blocks, the last one 100 bytes
    m.view[:] = b"\x01" * len(m.view)
    m.set_zero(B, 2 * B)
    m.set_zero(5 * B, 100)
    try:
        assert m.zero_runs(0, 6 * B) == [(B, 2 * B), (5 * B, 100)]
        assert m.zero_runs(2 * B, B) == [(2 * B, B)]
        assert m.slice(5 * B, 100).tobytes() == zero_digest(100)
    finally:
        m.close()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 6)), max_size=12),
       st.lists(st.tuples(st.integers(1, 9), st.booleans()), min_size=1, max_size=10),
       st.sampled_from([BLOCK, 2 * BLOCK, 5 * BLOCK]), st.integers(1, 5), st.randoms())
def test_plan_over_ranges_covers_them_and_the_frontier_is_honest(raw_ranges, raw_extents,
                                                                 request_size, window_blocks,
                                                                 rnd):
    """Requests cover exactly the planned ranges (whatever the windows and extents), zero
    requests only where the extents say zero, and the frontier never passes an unfinished
    request: every planned byte below it is done."""
    size = 48 * BLOCK - 1000  # a short last block
    ranges: list[list[int]] = []
    for start, n in sorted(raw_ranges):
        s, e = start * BLOCK, min((start + n) * BLOCK, size)
        if s >= size:
            continue
        if ranges and s <= ranges[-1][1]:
            ranges[-1][1] = max(ranges[-1][1], e)
        else:
            ranges.append([s, e])
    extents, pos = [], 0  # extents of 4 KiB multiples, cycled to cover the disk
    while pos < size:
        for n, zero in raw_extents:
            length = min(n * 4096 * 7, size - pos)
            extents.append((pos, length, STATE_ZERO if zero else 0))
            pos += length
            if pos >= size:
                break

    def fetch(offset, length):
        return [(max(o, offset), min(o + n, offset + length) - max(o, offset), f)
                for o, n, f in extents if o < offset + length and offset < o + n]

    plan = Plan(size, request_size=request_size, window=window_blocks * BLOCK,
                ranges=[tuple(r) for r in ranges])
    got, issued = [], []
    while (req := plan.next(fetch)) is not None:
        got.append(req)
        issued.append(req)
        if issued and rnd.random() < 0.6:  # finish some requests, out of order
            done = issued.pop(rnd.randrange(len(issued)))
            plan.done(done.offset)
        frontier = plan.frontier()
        assert all(r.offset >= frontier for r in issued)
    covered = sorted((r.offset, r.offset + r.length) for r in got)
    merged: list[list[int]] = []
    for s, e in covered:
        assert not merged or s >= merged[-1][1], "a byte planned twice"
        if merged and s == merged[-1][1]:
            merged[-1][1] = e
        else:
            merged.append([s, e])
    assert merged == ranges
    for r in got:
        if not r.data:  # a zero request lies wholly inside zero extents
            assert all(f & STATE_ZERO for o, n, f in extents if o < r.offset + r.length and
                       r.offset < o + n)
    for r in issued:
        plan.done(r.offset)
    assert plan.frontier() == size
