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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..ranges import Extent

if TYPE_CHECKING:  # for annotations only: the kinds that use them import them
    from .._native import Kernels
    from ..tls import Tls

# errnos that mean "this kind of zeroing is not supported here", and only those.
NOT_SUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS}

# An NBD server's deadlines (here, not in nbd.py, so the CLI's help can name them without
# loading libnbd):
CONNECT_TIMEOUT = 30.0  # seconds for one handshake
IO_TIMEOUT = 120.0  # seconds without any reply while requests are in flight
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


@dataclass(frozen=True)
class Options:
    """What open_disk was asked besides the address and role; each kind takes what concerns it
    (see open_disk)."""

    direct: bool = False
    timeout: float | None = None
    kernels: Kernels | None = None
    contexts: tuple[str, ...] = ()
    tls: Tls | None = None
    compress: int | None = None  # a zstd level for what a kind encodes as frames, or None
    compress_auto: bool = False  # --compress auto: the kind may choose per request


class Disk:
    """A disk, opened once in one role; connect() hands out its Conns.

    Its capabilities are declared here, once; each kind sets those that differ when
    it opens. zero_method, reads_zero, created and a missing target's size change
    later, when the target is created or a kind of zeroing turns out unsupported.
    """

    kind = "disk"
    """One of "file", "block", "nbd", "null", "stream": for reports, identity and the engine's
    choices."""
    display: str
    """The address as shown in messages (url.Address.display: without its secrets)."""
    size: int | None
    """Bytes; None for a target that takes the source's size (create() sets it)."""
    can_extents = False
    """Conn.extents() tells holes and zeroes apart from data (else all of it is data)."""
    max_connections = 1
    """More than one: the disk serves parallel connections (the request shape is chosen for
    it); an NBD disk's connect() hands out no more than this."""
    reads_zero = False
    """Known to read as zeroes everywhere (a file this run created or one holding no data;
    null:): zero runs are skipped."""
    zero_method = "none"
    """How zeroes are written, for the report: the method in use, "write" (zero buffers)
    once the target said it supports no other."""
    created = False
    """create() made the target in this run (a failed copy removes it)."""
    shape: tuple[int, int, int] | None = None
    """As a source: the (connections, requests in flight, request size) it is best read
    with, when the pipeline's defaults (tuned for NBD) are not."""

    def create(self, size: int) -> None:
        """Make the target that open_disk found missing (size None), at size."""
        raise NotImplementedError

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
