"""Pure-Python twins of the native kernels: their specification.

Each function here gives the same output as its compiled namesake in
native/*.pyx for every input (tests/native_test.py proves it on random
inputs). They run when TRANSFER_NATIVE=python asks for them, never as a
silent fallback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import struct

import xxhash

from ..runs import Runs

_BLKZEROOUT = 0x127F  # _IO(0x12, 127), linux/fs.h
_BLKSSZGET = 0x1268  # _IO(0x12, 104)


def zero_blocks(buf, block_size: int, out) -> int:
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    view = memoryview(buf).cast("B")
    n = len(view)
    nblocks = (n + block_size - 1) // block_size
    if len(out) < nblocks:
        raise ValueError(f"out holds {len(out)} flags, {nblocks} needed")
    zeros = 0
    for i in range(nblocks):
        block = view[i * block_size : (i + 1) * block_size]
        is_zero = block.tobytes().count(0) == len(block)
        out[i] = 1 if is_zero else 0
        zeros += is_zero
    return zeros


def hash_blocks(buf, block_size: int, out, zero=None, zero_digest=None) -> int:
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    view = memoryview(buf).cast("B")
    n = len(view)
    nblocks = (n + block_size - 1) // block_size
    if len(out) < 16 * nblocks:
        raise ValueError(f"out holds {len(out)} bytes, {16 * nblocks} needed")
    if zero is not None:
        if len(zero) < nblocks:
            raise ValueError(f"zero holds {len(zero)} flags, {nblocks} needed")
        if zero_digest is None or len(zero_digest) != 16:
            raise ValueError("zero flags need the 16-byte zero_digest")
    for i in range(nblocks):
        block = view[i * block_size : (i + 1) * block_size]
        if zero is not None and zero[i] and len(block) == block_size:
            digest = bytes(zero_digest)
        else:
            digest = xxhash.xxh3_128(block).digest()
        out[16 * i : 16 * i + 16] = digest
    return nblocks


_libc = None


def _load_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        lib.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                        ctypes.c_uint]
        _libc = lib
    return _libc


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _load_libc().fallocate(fd, mode, offset, length) != 0:
        raise OSError(ctypes.get_errno(), "fallocate failed")


def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
    if _load_libc().sync_file_range(fd, offset, nbytes, flags) != 0:
        raise OSError(ctypes.get_errno(), "sync_file_range failed")


def blkzeroout(fd: int, offset: int, length: int) -> None:
    fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("=QQ", offset, length))


def blksszget(fd: int) -> int:
    return struct.unpack("=i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]


# Interval algebra (native/intervals.pyx). Runs are (start, end) pairs of byte offsets, taken as
# a Runs or any iterable of pairs and returned as a Runs (transfer/runs.py); the offsets fit in
# int64 (the compiled twin's domain).

def merge_runs(runs, size: int, block: int = 65536) -> Runs:
    """[start, end) runs in any order -> sorted, merged, rounded outward to block, clipped."""
    out: list = []
    for s, e in sorted((s - s % block, min(-(-e // block) * block, size)) for s, e in runs):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return Runs(out)


def subtract_runs(a, b) -> Runs:
    """Runs of a not covered by b (both sorted and disjoint)."""
    b = list(b)
    out: list = []
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k = j
        while s < e:
            if k >= len(b) or b[k][0] >= e:
                out.append((s, e))
                break
            if b[k][0] > s:
                out.append((s, b[k][0]))
            s = max(s, b[k][1])
            k += 1
    return Runs(out)


def clip_runs(a, start: int, end: int) -> Runs:
    """The parts of runs a inside [start, end)."""
    return Runs((max(s, start), min(e, end)) for s, e in a if max(s, start) < min(e, end))


def runs_bytes(a) -> int:
    """The bytes the runs cover (the sum of end - start)."""
    return sum(e - s for s, e in a)


__all__ = [
    "blksszget",
    "blkzeroout",
    "clip_runs",
    "fallocate",
    "hash_blocks",
    "merge_runs",
    "runs_bytes",
    "subtract_runs",
    "sync_file_range",
    "zero_blocks",
]


BS_OK, BS_NO_REPLY, BS_ODD, BS_ZERO_LENGTH = 0, 1, 2, 3  # as in native/blockstatus.pyx


def block_status(handle, context: str, offset: int, length: int, cap: int):
    """The binding's block_status (its whole reply as one Python list: RELIABILITY.md S8, what
    the compiled kernel avoids), then the kernel's algorithm, reply_extents()."""
    if cap < 1 or length < 1:
        raise ValueError("cap and length must be positive")
    import nbd

    replies: list[list[int]] = []

    def cb(metacontext: str, off: int, entries: list[int], err) -> int:
        if not replies and metacontext == context and off == offset:
            replies.append(entries)
        return 0

    try:
        handle.block_status(length, offset, cb)
    except nbd.Error as e:
        raise OSError(e.errnum or 0, e.string or "block status failed") from None
    if not replies:
        return BS_NO_REPLY, [], offset, False
    return reply_extents(replies[0], offset, length, cap)


def reply_extents(entries, offset: int, length: int, cap: int):
    """One reply's flat [length, flags, ...] entries -> (status, extents, pos, truncated): the
    extents clipped at offset + length, runs of equal flags merged, at most cap of them."""
    if len(entries) % 2:
        return BS_ODD, [], offset, False
    end, pos, out = offset + length, offset, []
    for i in range(0, len(entries), 2):
        n, flags = entries[i], entries[i + 1]
        if n <= 0:
            return BS_ZERO_LENGTH, [], pos, False
        n = min(n, end - pos)
        if out and out[-1][2] == flags:
            out[-1] = (out[-1][0], out[-1][1] + n, flags)
        elif len(out) == cap:
            return BS_OK, out, pos, True
        else:
            out.append((pos, n, flags))
        pos += n
        if pos >= end:
            break
    return BS_OK, out, pos, False
