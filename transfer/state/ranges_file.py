"""A pass's planned ranges on disk: written durably before the pass's first write.

    file = "TRRANGE1" | u64le count | count x (u64le start, u64le end) | u64le xxh3_64(all before)

A resumed pass needs the plan of the attempt that was interrupted (its
uncommitted part must be copied again, R3/R4), and a change source may not
answer the same way twice, so the plan is kept, not recomputed. Written as a
temp file, fsynced, renamed, directory fsynced (T9). Read back as untrusted
input: checksum, count, order, alignment and bounds are checked.
"""

from __future__ import annotations

import os
import struct

import xxhash

from ..integrity import BLOCK
from .journal import JournalError, _fsync_dir

MAGIC = b"TRRANGE1"
_COUNT = struct.Struct("<Q")


def write_ranges(path: str, ranges) -> str:
    """Write ranges ((n, 2) int64) to path durably; return the xxh3-64 hex of the file body."""
    import numpy as np

    body = MAGIC + _COUNT.pack(len(ranges)) + np.ascontiguousarray(ranges, dtype="<u8").tobytes()
    check = xxhash.xxh3_64_hexdigest(body)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(body + bytes.fromhex(check)[::-1])  # u64le of the checksum
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    _fsync_dir(path)
    return check


def read_ranges(path: str, size: int, check: str, count: int):
    """The ranges written by write_ranges, validated against the journal's checksum and count."""
    import numpy as np

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
    ranges = np.frombuffer(data, "<u8", 2 * n, head).astype(np.int64).reshape(n, 2)
    if n:
        starts, ends = ranges[:, 0], ranges[:, 1]
        if ((starts >= ends).any() or (starts[1:] < ends[:-1]).any() or (starts % BLOCK).any()
                or ((ends % BLOCK != 0) & (ends != size)).any() or ends[-1] > size
                or starts[0] < 0):
            raise bad("ranges are not sorted, disjoint, block-aligned and inside the disk")
    return ranges
