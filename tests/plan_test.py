"""The pure plan: windows, a window's requests, the frontier and compare mode's decisions,
tested without servers, threads or callbacks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transfer.pipeline.plan import (DATA, SAME, ZERO, Force, Frontier, Request, Windows, all_zero,
                                    check_request_size, mark_same, requests, window_requests)
from transfer.ranges import STATE_ZERO

B = 64 * 1024


def drain(windows: Windows) -> list:
    out = []
    while (w := windows.peek()) is not None:
        out.append(w)
        windows.take(w)
    return out


def test_whole_disk_in_windows_the_last_one_short():
    ws = drain(Windows(5 * B + 7, window=2 * B))
    assert [w.pieces for w in ws] == [[(0, 2 * B)], [(2 * B, 4 * B)], [(4 * B, 5 * B + 7)]]
    assert [w.pos for w in ws] == [2 * B, 4 * B, 5 * B + 7]


def test_peek_does_not_take():
    windows = Windows(4 * B, window=B)
    first = windows.peek()
    assert windows.peek() == first and windows.pos == 0  # a failed fetch leaves it untaken
    windows.take(first)
    assert windows.peek().pieces == [(B, 2 * B)]


def test_ranges_of_one_window_share_it_and_a_window_starts_at_the_next_range():
    ws = drain(Windows(100 * B, window=4 * B, spans=[(0, B), (2 * B, 3 * B), (10 * B, 16 * B)]))
    assert [w.pieces for w in ws] == [[(0, B), (2 * B, 3 * B)], [(10 * B, 14 * B)],
                                      [(14 * B, 16 * B)]]
    assert [(w.start, w.end) for w in ws] == [(0, 3 * B), (10 * B, 14 * B), (14 * B, 16 * B)]
    assert ws[0].pos == 10 * B and ws[-1].pos == 100 * B


def test_empty_plans():
    assert Windows(0).peek() is None
    assert Windows(10 * B, spans=[]).peek() is None
    assert Windows(10 * B, spans=[]).pos == 10 * B
    assert Windows(10 * B, spans=[(B, 3 * B)]).bytes == 2 * B


@pytest.mark.parametrize("spans", [[(B, B)], [(2 * B, 3 * B), (B, 2 * B)], [(1, B)],
                                   [(0, 11 * B)], [(0, B), (B // 2, 2 * B)]])
def test_bad_spans_are_refused(spans):
    with pytest.raises(ValueError):
        Windows(10 * B, spans=spans)


def test_bad_request_size_or_window_is_refused():
    check_request_size(2 * B, 4 * B)
    for request_size, window in [(0, B), (B + 1, B), (B, B + 1)]:
        with pytest.raises(ValueError):
            check_request_size(request_size, window)


def test_all_data_window_is_cut_at_request_size_without_extents():
    w = Windows(10 * B, window=8 * B, spans=[(0, 3 * B), (4 * B, 5 * B)]).peek()
    got = list(window_requests(w, [(0, 5 * B, 0)], 2 * B))
    assert got == [Request(0, 2 * B, True), Request(2 * B, B, True), Request(4 * B, B, True)]


def test_zero_extents_become_zero_requests():
    w = Windows(8 * B, window=8 * B).peek()
    extents = [(0, B, 0), (B, 6 * B, STATE_ZERO), (7 * B, B, 0)]
    assert list(window_requests(w, extents, 4 * B)) == [
        Request(0, B, True), Request(B, 6 * B, False), Request(7 * B, B, True)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.booleans()), min_size=1, max_size=10),
       st.lists(st.tuples(st.integers(0, 6), st.integers(1, 6)), min_size=1, max_size=8),
       st.sampled_from([B, 2 * B, 3 * B]), st.integers(1, 9))
def test_window_requests_equal_requests_per_piece(raw_extents, raw_spans, request_size,
                                                  window_blocks):
    """Whatever the extents, a window's requests are those of requests() over each piece with
    every extent of the window (the bisection only skips extents outside a piece, the all-data
    shortcut cuts as requests() would), and the windows cover exactly the spans."""
    size = 60 * B
    extents, pos = [], 0
    while pos < size:
        for n, zero in raw_extents:
            length = min(n * 4096 * 5, size - pos)
            extents.append((pos, length, STATE_ZERO if zero else 0))
            pos += length
            if pos >= size:
                break
    spans, at = [], 0
    for gap, n in raw_spans:
        s, e = at + gap * B, min(at + (gap + n) * B, size)
        if s >= size:
            break
        spans.append((s, e))
        at = e
    windows = Windows(size, window=window_blocks * B, spans=spans)
    covered = []
    for w in drain(windows):
        under = [x for x in extents if x[0] < w.end and w.start < x[0] + x[1]]
        got = list(window_requests(w, under, request_size))
        want = [r for s, e in w.pieces for r in requests(under, s, e, request_size=request_size)]
        assert got == want
        covered += [(r.offset, r.offset + r.length) for r in got]
    merged: list[list[int]] = []
    for s, e in sorted(covered):
        if merged and s == merged[-1][1]:
            merged[-1][1] = e
        else:
            merged.append([s, e])
    assert [tuple(m) for m in merged] == _merge(spans)


def _merge(spans):
    out: list[list[int]] = []
    for s, e in spans:
        if out and s == out[-1][1]:
            out[-1][1] = e
        else:
            out.append([s, e])
    return [tuple(m) for m in out]


def test_frontier_waits_for_the_first_unfinished_request():
    f = Frontier(0)
    assert f.value() == 0
    f.issued(0, B)
    f.issued(B, 2 * B)
    f.issued(2 * B, 5 * B)  # the next request not handed out starts at 5 B
    f.done(B)
    assert f.value() == 0
    f.done(0)
    assert f.value() == 2 * B
    f.done(2 * B)
    assert f.value() == 5 * B
    f.ended(9 * B)
    assert f.value() == 9 * B


def test_force_ranges():
    force = Force([(2 * B, 4 * B), (8 * B, 9 * B)])
    assert not force.touches(0, 2 * B)
    assert force.touches(B, B + 1)
    assert force.touches(3 * B, B)
    assert not force.touches(4 * B, 4 * B)
    assert force.touches(7 * B, 5 * B)
    assert not force.touches(9 * B, B)
    assert not Force(None).touches(0, 100 * B)


def test_all_zero_needs_one_run_covering_the_request():
    req = Request(2 * B, 2 * B, False)
    assert all_zero([(2 * B, 2 * B)], req, 10 * B)
    assert not all_zero([(2 * B, B)], req, 10 * B)
    assert not all_zero([(2 * B, B), (3 * B, B)], req, 10 * B)
    assert not all_zero([], req, 10 * B)
    tail = Request(8 * B, 2 * B, False)  # the disk ends inside the request
    assert all_zero([(8 * B, B + 5)], tail, 9 * B + 5)


def test_mark_same_flags_equal_digests_only():
    old = bytes(range(16)) + b"\x01" * 16 + b"\x02" * 16
    new = bytearray(old)
    new[16] = 9  # block 1 changed
    flags = bytearray([DATA, ZERO, DATA, ZERO])
    assert mark_same(memoryview(new), old, flags, 3) == 2
    assert list(flags) == [SAME, ZERO, SAME, ZERO]
    assert mark_same(memoryview(new), old, flags, 0) == 0
