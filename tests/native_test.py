"""The native kernels against their pure-Python twins, and the explicit choice between them."""

from __future__ import annotations

import os
import random
import sys

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from transfer import _native
from transfer._native import _reference as ref
from transfer.errors import BadInput, NativeMissing

cy = _native.kernels("cython")
BLOCK = 64 * 1024


@st.composite
def buffers(draw):
    """Random buffers of odd lengths, with whole zero blocks and near-zero blocks mixed in."""
    block = draw(st.sampled_from([1, 7, 16, 17, 512, 4096, 65536]))
    nblocks = draw(st.integers(0, 12 if block >= 4096 else 64))
    tail = draw(st.integers(0, block - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    data = bytearray(random.Random(seed).randbytes(nblocks * block + tail))
    kinds = draw(st.lists(st.sampled_from("dzl"), min_size=nblocks + 1, max_size=nblocks + 1))
    for i, kind in enumerate(kinds):
        start, end = i * block, min((i + 1) * block, len(data))
        if kind in "zl" and start < end:
            data[start:end] = bytes(end - start)
            if kind == "l":  # zero but for one byte, anywhere in the block
                data[start + draw(st.integers(0, end - start - 1))] = draw(st.integers(1, 255))
    return bytes(data), block


@settings(max_examples=300, deadline=None)
@given(buffers())
def test_zero_blocks_parity(case):
    data, block = case
    n = (len(data) + block - 1) // block
    a, b = bytearray(n + 1), bytearray(n + 1)
    assert cy.zero_blocks(data, block, a) == ref.zero_blocks(data, block, b)
    assert a == b
    # and both against the definition
    assert [bool(x) for x in a[:n]] == [data[i * block : (i + 1) * block].count(0) ==
                                        len(data[i * block : (i + 1) * block]) for i in range(n)]


@settings(max_examples=300, deadline=None)
@given(buffers(), st.booleans())
def test_hash_blocks_parity(case, use_zero):
    data, block = case
    n = (len(data) + block - 1) // block
    flags = bytearray(n)
    cy.zero_blocks(data, block, flags)
    zd = xxhash.xxh3_128(bytes(block)).digest()
    a, b = bytearray(16 * n), bytearray(16 * n)
    kw = {"zero": flags, "zero_digest": zd} if use_zero else {}
    assert cy.hash_blocks(data, block, a, **kw) == ref.hash_blocks(data, block, b, **kw) == n
    assert a == b
    expected = b"".join(xxhash.xxh3_128(data[i * block : (i + 1) * block]).digest() for i in range(n))
    assert bytes(a) == expected


def test_hash_blocks_uses_given_zero_digest_only_for_flagged_full_blocks():
    data = bytes(BLOCK) + b"\0" * 100
    out = bytearray(32)
    marker = b"M" * 16
    cy.hash_blocks(data, BLOCK, out, bytearray([1, 1]), marker)
    assert out[:16] == marker  # full block flagged: the given digest, not hashed
    assert out[16:] == xxhash.xxh3_128(b"\0" * 100).digest()  # short last block: hashed


@pytest.mark.parametrize("k", [cy, _native.kernels("python")], ids=["cython", "python"])
def test_kernels_reject_small_outputs(k):
    with pytest.raises(ValueError):
        k.zero_blocks(bytes(3 * BLOCK), BLOCK, bytearray(2))
    with pytest.raises(ValueError):
        k.hash_blocks(bytes(3 * BLOCK), BLOCK, bytearray(47))
    with pytest.raises(ValueError):
        k.zero_blocks(b"x", 0, bytearray(1))


@pytest.mark.parametrize("k", [cy, _native.kernels("python")], ids=["cython", "python"])
def test_fallocate_punch_hole(tmp_path, k):
    path = tmp_path / "f"
    path.write_bytes(b"\xff" * 3 * BLOCK)
    fd = os.open(path, os.O_RDWR)
    try:
        k.fallocate(fd, 0x02 | 0x01, BLOCK, BLOCK)  # PUNCH_HOLE | KEEP_SIZE
        with pytest.raises(OSError):
            k.fallocate(fd, 0x02, 0, BLOCK)  # punch without KEEP_SIZE: EOPNOTSUPP
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\xff" * BLOCK + bytes(BLOCK) + b"\xff" * BLOCK


def test_choice_is_explicit_and_reported(monkeypatch):
    monkeypatch.setenv(_native.ENV, "python")
    assert _native.kernels().implementation == "python"
    assert _native.kernels().describe() == {"zeroscan": "python", "blockhash": "python",
                                            "fileops": "python", "intervals": "python",
                                            "blockstatus": "python"}
    monkeypatch.setenv(_native.ENV, "cython")
    assert _native.kernels().implementation == "cython"
    monkeypatch.setenv(_native.ENV, "fast")
    with pytest.raises(BadInput, match="TRANSFER_NATIVE"):
        _native.kernels()


def test_missing_extension_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setitem(sys.modules, "transfer._native.blockhash", None)  # import now fails
    with pytest.raises(NativeMissing, match="blockhash is not built"):
        _native.kernels("cython")


# ---------------------------------------------------------------- interval algebra

offsets = st.integers(0, 2**40)


@st.composite
def run_lists(draw, max_size=40):
    """Pairs in any order, overlapping, touching, empty or inverted (start > end): what
    merge_runs may be given, including nonsense it must treat as the twin does."""
    return draw(st.lists(st.tuples(offsets, offsets) | st.tuples(offsets, st.integers(0, 2**20))
                         .map(lambda p: (p[0], p[0] + p[1])), max_size=max_size))


@st.composite
def sorted_runs(draw):
    """Sorted, disjoint runs, as merge_runs makes them (and subtract_runs expects)."""
    block = draw(st.sampled_from([1, 4096, 65536]))
    size = draw(st.integers(0, 2**36))
    # Clipped: merging areas beyond the disk leaves inverted runs (validation refuses those
    # areas before any merge).
    return ref.clip_runs(ref.merge_runs(draw(run_lists()), size, block), 0, size)


@settings(max_examples=400, deadline=None)
@given(runs=run_lists(), size=st.integers(0, 2**41), block=st.sampled_from([1, 3, 512, 65536]))
def test_merge_runs_matches_its_twin(runs, size, block):
    assert cy.merge_runs(runs, size, block) == ref.merge_runs(runs, size, block)
    # Any iterable of pairs, as the twin takes.
    assert cy.merge_runs(iter(runs), size, block) == ref.merge_runs(runs, size, block)


@settings(max_examples=400, deadline=None)
@given(a=sorted_runs(), b=sorted_runs(), start=offsets, end=offsets)
def test_subtract_clip_and_count_match_their_twins(a, b, start, end):
    assert cy.subtract_runs(a, b) == ref.subtract_runs(a, b)
    assert cy.clip_runs(a, start, end) == ref.clip_runs(a, start, end)
    assert cy.runs_bytes(a) == ref.runs_bytes(a)
    # And they mean what they say, block by block (4 KiB blocks keep the sets small).
    k = 4096
    a4 = ref.merge_runs([(s // k, -(-e // k)) for s, e in a], 2**40)
    b4 = ref.merge_runs([(s // k, -(-e // k)) for s, e in b], 2**40)
    blocks = {x for s, e in a4 for x in range(s, min(e, s + 5000))}
    if sum(e - s for s, e in a4) <= 5000 and sum(e - s for s, e in b4) <= 5000:
        other = {x for s, e in b4 for x in range(s, e)}
        left = {x for s, e in cy.subtract_runs(a4, b4) for x in range(s, e)}
        assert left == blocks - other
        assert cy.runs_bytes(a4) == len(blocks)


@settings(max_examples=300, deadline=None)
@given(a=run_lists(max_size=12), b=sorted_runs())
def test_subtract_takes_what_its_twin_takes(a, b):
    """Overlapping, unsorted runs of a are outside the contract, but the twin subtracts them
    (more pieces than a and b have runs): the compiled one must give the same, not overrun."""
    a = a * 3  # repeats overlap themselves
    assert cy.subtract_runs(a, b) == ref.subtract_runs(a, b)


def test_interval_edges():
    assert cy.merge_runs([], 100) == [] == ref.merge_runs([], 100)
    assert cy.merge_runs([(0, 1), (1, 2)], 10, 1) == [(0, 2)]       # touching runs merge
    assert cy.merge_runs([(5, 7)], 6, 4) == [(4, 6)]                # rounded out, clipped
    assert cy.subtract_runs([(0, 10)], [(2, 3), (5, 20)]) == [(0, 2), (3, 5)]
    assert cy.clip_runs([(0, 10), (20, 30)], 5, 25) == [(5, 10), (20, 25)]
    assert cy.runs_bytes([(0, 2**62), (2**62, 2**63 - 1)]) == 2**63 - 1
    # Pairs given as lists come back as tuples, as the twin's do (only tuples are passed through).
    for f, args in ((cy.clip_runs, (0, 20)), (cy.subtract_runs, ([],)), (cy.merge_runs, (20, 1))):
        out = f([[0, 10]], *args)
        assert out == [(0, 10)] and type(out[0]) is tuple, f
    big = [(0, 2**62)] * 4  # not disjoint: the sum leaves int64 and must still be right
    assert cy.runs_bytes(big) == ref.runs_bytes(big) == 2**64
    with pytest.raises(OverflowError):
        cy.merge_runs([(0, 2**64)], 2**40)
    # The largest offsets: rounding up would pass 2**63 - 1; the answer is the size, as the twin's.
    top = 2**63 - 1
    for e in (top, top - 1, top - 65535, top - 65536):
        assert cy.merge_runs([(0, e)], top) == ref.merge_runs([(0, e)], top)
    with pytest.raises(ValueError, match="negative"):
        cy.merge_runs([(-1, 5)], 10)
    with pytest.raises(ValueError, match="negative"):
        cy.runs_bytes([(0, -5)])
    with pytest.raises(ValueError, match="block"):
        cy.merge_runs([], 10, 0)
    with pytest.raises((TypeError, ValueError)):
        cy.merge_runs([(0, 1, 2)], 10)
    with pytest.raises(TypeError):
        cy.clip_runs([("a", 1)], 0, 1)
