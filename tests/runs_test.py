"""Runs (transfer/runs.py): one int64 array that reads as the list of (start, end) pairs it
replaced, and what the interval kernels take and give (both implementations)."""

from __future__ import annotations

import bisect
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transfer import _native
from transfer.runs import Runs, wrap
from transfer.state.ranges_file import read_ranges, write_ranges

pairs = st.lists(st.tuples(st.integers(0, 2**62), st.integers(0, 2**62)), max_size=20)


@given(pairs)
def test_reads_as_the_list_of_pairs(ps):
    r = Runs(ps)
    assert len(r) == len(ps) and bool(r) == bool(ps)
    assert list(r) == ps and r == ps and ps == r and not r != ps
    assert [r[i] for i in range(-len(ps), len(ps))] == ps + ps
    assert r[1:] == ps[1:] and r[::2] == ps[::2] and r[5:2] == []
    assert list(r.starts()) == [s for s, _ in ps]
    assert r + ps == ps + ps and ps + r == ps + ps and r + r == Runs(ps + ps)
    assert Runs.of(r) is r and Runs.of(iter(ps)) == r
    assert eval(repr(r), {"Runs": Runs}) == r


def test_compares_as_a_list_of_tuples_would():
    r = Runs([(0, 10)])
    assert r != [[0, 10]] and r != ((0, 10),) and r != [(0, 10), (10, 20)] and r != "x"
    assert Runs() == [] and Runs() != [(0, 1)]
    with pytest.raises(IndexError):
        r[1]
    with pytest.raises(TypeError):
        hash(r)
    with pytest.raises(OverflowError):
        Runs([(0, 2**63)])
    with pytest.raises((TypeError, ValueError)):
        Runs([(0, 1, 2)])


def test_bisect_over_the_starts():
    r = Runs([(0, 10), (20, 30), (40, 50)])
    assert [bisect.bisect_right(r.starts(), o) - 1 for o in (0, 15, 20, 49, 99)] == [0, 0, 1, 2, 2]


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_kernels_take_runs_or_pairs_and_give_runs(impl):
    k = _native.kernels(impl)
    a, b = [(0, 10), (20, 30)], [(5, 25)]
    for x, y in ((a, b), (Runs(a), Runs(b)), (Runs(a), b), (iter(a), iter(b))):
        out = k.subtract_runs(x, y)
        assert type(out) is Runs and out == [(0, 5), (25, 30)]
    assert k.merge_runs(Runs(a) + b, 100, 1) == [(0, 30)]
    assert k.clip_runs(Runs(a), 5, 25) == [(5, 10), (20, 25)]
    assert k.runs_bytes(Runs(a)) == 20
    if impl == "cython":  # outside the domain the compiled kernels refuse a Runs too
        with pytest.raises(ValueError, match="negative"):
            k.clip_runs(Runs([(0, 5), (-3, 4)]), 0, 9)


def test_the_kernels_leave_their_inputs_alone():
    k = _native.kernels("cython")
    r = Runs([(70, 80), (0, 10)])
    k.merge_runs(r, 100, 1)
    k.clip_runs(r, 0, 5)
    assert r == [(70, 80), (0, 10)]


def test_a_ranges_file_reads_back_as_runs(tmp_path):
    plan = Runs([(0, 65536), (131072, 200000)])
    path = str(tmp_path / "p.ranges")
    check = write_ranges(path, plan)
    assert write_ranges(str(tmp_path / "q.ranges"), list(plan)) == check
    got = read_ranges(path, 200000, check, 2)
    assert type(got) is Runs and got == plan


def test_an_offset_past_int64_in_a_ranges_file_is_refused(tmp_path):
    """Read as int64 it is negative: refused as out of order, as it was refused past the disk."""
    from transfer.state.journal import JournalError

    path = str(tmp_path / "p.ranges")
    check = write_ranges(path, [(2**63, 2**63 + 65536)])
    with pytest.raises(JournalError, match="not sorted"):
        read_ranges(path, 2**63 - 1, check, 1)


def test_wrap_shares_the_array():
    r = Runs([(1, 2)])
    assert wrap(r.flat) == r and wrap(r.flat).flat is r.flat


def test_the_engine_still_never_imports_numpy():
    code = ("import sys, transfer.runs, transfer.tracking.areas, transfer.state.ranges_file, "
            "transfer._native as n; n.kernels().merge_runs([(0, 1)], 10); "
            "print('numpy' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip() == "False"
