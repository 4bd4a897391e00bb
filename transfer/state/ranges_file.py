"""A pass's planned ranges on disk: written durably before the pass's first write.

    file = "TRRANGE1" | u64le count | count x (u64le start, u64le end) | u64le xxh3_64(all before)

A resumed pass needs the plan of the attempt that was interrupted (its
uncommitted part must be copied again, R3/R4), and a change source may not
answer the same way twice, so the plan is kept, not recomputed. Written as a
temp file, fsynced, renamed, directory fsynced (T9); a file system that is full
or failing raises StateIOError (exit 4) and leaves no temp file behind. Read
back as untrusted input: checksum, count, order, alignment and bounds are checked.
"""

from __future__ import annotations

import array
import os
import struct
import sys

import xxhash

from ..integrity import BLOCK
from ..errors import StateIOError
from ..durable import why, write_atomic
from ..runs import TYPECODE, Runs, wrap
from .journal import JournalError

MAGIC = b"TRRANGE1"
_COUNT = struct.Struct("<Q")


def write_ranges(path: str, ranges: Runs | list[tuple[int, int]]) -> str:
    """Write ranges to path durably; return the xxh3-64 hex of the file body."""
    flat = array.array("Q", ranges.flat if isinstance(ranges, Runs)
                       else (x for pair in ranges for x in pair))
    if sys.byteorder != "little":
        flat.byteswap()
    body = MAGIC + _COUNT.pack(len(ranges)) + flat.tobytes()
    check = xxhash.xxh3_64_hexdigest(body)
    try:
        write_atomic(path, body + bytes.fromhex(check)[::-1])  # u64le of the checksum
    except OSError as e:
        raise StateIOError(f"cannot write the pass's ranges file: {why(e)}", disk=path,
                           kind="state") from None
    return check


def read_ranges(path: str, size: int, check: str, count: int) -> Runs:
    """The ranges written by write_ranges, validated against the journal's checksum and count."""

    def bad(why: str) -> JournalError:
        return JournalError(f"the pass's ranges file is unusable: {why}", disk=path)

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise bad(os.strerror(e.errno) if e.errno else str(e)) from None
    head = len(MAGIC) + _COUNT.size
    if len(data) < head + 8 or data[: len(MAGIC)] != MAGIC:
        raise bad("not a ranges file")
    (n,) = _COUNT.unpack_from(data, len(MAGIC))
    if n != count or len(data) != head + 16 * n + 8:
        raise bad(f"{len(data)} bytes for {n} ranges, the journal says {count}")
    if xxhash.xxh3_64_hexdigest(data[:-8]) != check or data[-8:] != bytes.fromhex(check)[::-1]:
        raise bad("checksum mismatch")
    # Read as int64: an offset of 2**63 or more reads negative, which the check below refuses
    # as it refused it past the disk.
    flat = array.array(TYPECODE)
    flat.frombytes(data[head:-8])
    if sys.byteorder != "little":
        flat.byteswap()
    ranges = wrap(flat)
    prev = 0
    for s, e in ranges:
        if not prev <= s < e <= size or s % BLOCK or (e % BLOCK and e != size):
            raise bad("ranges are not sorted, disjoint, block-aligned and inside the disk")
        prev = e
    return ranges
