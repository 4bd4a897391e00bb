"""qemu dirty bitmaps over NBD: the metadata context qemu:dirty-bitmap:NAME.

qemu-nbd -B NAME (or a qemu-storage-daemon export with "bitmaps": [NAME])
offers the context; in its block status replies flag 1 means "dirty since the
bitmap was created or last cleared". Measured with qemu-nbd 7.2: a 64 KiB
write gives one dirty extent of 64 KiB (the bitmap's granularity), and the
whole export is answered in a few replies.

Fail closed (RELIABILITY.md R2): a context the server did not agree to, a
reply without extents for it, a block status error or an invalid reply raise
TrackingUnavailable with the reason in words; the caller then compares or
copies everything. Dirty extents are rounded outward to whole blocks.
"""

from __future__ import annotations

import re

from ..errors import BadInput, TransferError
from ..integrity import BLOCK

DIRTY = 1
PREFIX = "qemu:dirty-bitmap:"
_NAME = re.compile(r"^[\x21-\x7e]{1,1023}$")  # qemu's limit; printable, no spaces


class TrackingUnavailable(Exception):
    """The change tracker cannot be trusted for this pass; str() says why."""


def context_name(name: str) -> str:
    if not _NAME.match(name):
        raise BadInput(f"--dirty-bitmap {name!r} is not a bitmap name (1-1023 printable "
                       "characters, no spaces)")
    return PREFIX + name


def dirty_ranges(disk, name: str, block: int = BLOCK):
    """The dirty ranges of an NBD source as (start, end) pairs, rounded outward to block.

    disk: an NbdDisk opened with contexts=(context_name(name),), before the
    copy connects (its spare handle answers), or an https:// disk of a serve
    --dirty-bitmap NAME (transfer.disks.http: the server's dirty extents).
    """
    from .areas import merge_runs

    ctx = context_name(name)
    if not hasattr(disk, "context_extents"):  # NBD, or https:// from serve --dirty-bitmap
        raise TrackingUnavailable(f"the source is a {disk.kind}, which has no dirty bitmaps")
    if ctx not in disk.negotiated:
        raise TrackingUnavailable(f"the server does not offer the dirty bitmap {name!r} "
                                  f"(metadata context {ctx} not negotiated)")
    runs: list[tuple[int, int]] = []
    pos, size = 0, disk.size
    while pos < size:
        try:
            extents = disk.context_extents(ctx, pos, size - pos)
        except TransferError as e:
            raise TrackingUnavailable(f"block status of the dirty bitmap {name!r} failed at "
                                      f"offset {pos}: {e.message}") from None
        if extents is None:
            raise TrackingUnavailable(f"the server sent no extents of the dirty bitmap "
                                      f"{name!r} for offset {pos}")
        for off, length, flags in extents:
            if flags & DIRTY:
                if runs and runs[-1][1] == off:
                    runs[-1] = (runs[-1][0], off + length)
                else:
                    runs.append((off, off + length))
        pos = extents[-1][0] + extents[-1][1]
    return merge_runs(runs, size, block)
