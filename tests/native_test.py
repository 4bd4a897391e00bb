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
                                            "fileops": "python"}
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
