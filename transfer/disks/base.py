"""What every disk kind provides: a Disk (opened once) and its Conns (one per worker).

A Disk states its capabilities once, before the copy (size, extents, zero,
flush, how many connections). Each pipeline worker thread gets its own Conn
and is the only thread that uses it, so no Conn needs a lock (the way
nbdcopy keeps per-thread state). Reads are asynchronous (start_read, then
reap the completions); writes, zeroing and flush are synchronous and
complete in full or raise.

Zeroing is discovered by trying: a target answers "not supported" once, the
Conn remembers it on the Disk, and from then on writes zero buffers
(nbdcopy's file_synch_zero, ovirt-imageio's BlockBackend._zero). Any other
errno is a TargetError.
"""

from __future__ import annotations

import errno
import mmap
import threading
from typing import Any

from ..ranges import Extent

# errnos that mean "this kind of zeroing is not supported here", and only those.
NOT_SUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS}

ZERO_BUFFER_SIZE = 1024 * 1024
_zero_buffer: memoryview | None = None
_zero_lock = threading.Lock()


def zero_buffer() -> memoryview:
    """A shared, page-aligned, read-only 1 MiB of zeros (usable with O_DIRECT)."""
    global _zero_buffer
    with _zero_lock:
        if _zero_buffer is None:
            m = mmap.mmap(-1, ZERO_BUFFER_SIZE, prot=mmap.PROT_READ)
            _zero_buffer = memoryview(m)
    return _zero_buffer


class Conn:
    """One worker's handle on a disk. Default: extents say everything is data."""

    dead = False  # the connection is gone; reconnect() before using it again

    def drop(self) -> None:
        """Give up on the connection; its reads in flight are lost."""

    def reconnect(self) -> None:
        raise NotImplementedError

    def extents(self, offset: int, length: int) -> list[Extent]:
        return [(offset, length, 0)]

    def start_read(self, view: memoryview, offset: int, tag: Any) -> None:
        raise NotImplementedError

    def reap(self) -> list[tuple[Any, BaseException | None]]:
        """Wait for at least one read to complete; return (tag, error) pairs."""
        raise NotImplementedError

    def write(self, view: memoryview, offset: int) -> None:
        raise NotImplementedError

    def zero(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def write_zeros(self, offset: int, length: int) -> None:
        """Zeroing's last resort, for targets that said "not supported": write zero buffers."""
        zeros = zero_buffer()
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.write(zeros[:n], offset)
            offset += n

    def flush(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Disk:
    kind = "disk"
    display: str
    size: int
    can_extents = False
    max_connections = 1
    reads_zero = False  # known to read as zeroes everywhere (a file this run created)
    zero_method = "none"  # how zeroes were written: for the report
    created = False

    def connect(self) -> Conn | None:
        """A new Conn for another worker, or None when the disk allows no more."""
        raise NotImplementedError

    def identities(self) -> set[tuple]:
        """Names of the storage under this disk, to refuse copying a disk onto itself."""
        return set()

    def identity(self) -> dict[str, Any]:
        """What a warm-migration state binds this disk to (RELIABILITY.md R7): JSON values."""
        return {"kind": self.kind, "uri": self.display, "size": self.size}

    def signature(self) -> str | None:
        """A filesystem or partition-table signature found on the disk, if any."""
        return None

    def data_bytes(self) -> int:
        """An upper bound of the bytes a copy of this source reads as data (not holes or zero
        extents); the whole size where the disk cannot say."""
        return self.size

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"url": self.display, "kind": self.kind, "size": self.size}
