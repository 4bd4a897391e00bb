"""NBD disks through libnbd (Debian's python3-libnbd), both roles: the handshake, what the
export offers, and its connections (one libnbd handle each: nbd_conn).

Extra connections are opened only when the server advertises multi-conn:
qemu-nbd -r does not, and with its default --shared=1 a second handshake
just waits (measured: it hangs until our connect timeout). Every connect has
a deadline, because libnbd has none.

The handle opened first checks the export and stays the spare: it answers
block status and signature probes before the copy, and the first worker to
connect takes it.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import BadInput, SourceError, TargetError, TargetRefused
from .._native import Kernels, kernels as native_kernels
from ..ranges import MAX_EXTENTS, STATE_ZERO, Extent, reply_extents
from ..tls import Tls, resolve as resolve_tls
from ..url import Address, scrub
from .base import CONNECT_TIMEOUT, IO_TIMEOUT, Conn, Disk, Options
from .nbd_conn import MAX_BLOCK_STATUS, NbdConn, Watchdog, errnum, nbd, why

MAX_SIZE = 1 << 62  # a larger export size is rejected as absurd (RELIABILITY.md S9)
MAX_CONNECTIONS = 8
DIRTY = 1  # qemu:dirty-bitmap flag: the block changed


def opener(addr: Address, role: str, options: Options) -> Disk:
    """open_disk for nbd:// and its kin: timeout (both deadlines), contexts, kernels and tls
    concern it."""
    t = options.timeout
    return NbdDisk(addr, role, connect_timeout=CONNECT_TIMEOUT if t is None else t,
                   io_timeout=IO_TIMEOUT if t is None else t, contexts=options.contexts,
                   kernels=options.kernels, tls=options.tls)


class NbdDisk(Disk):
    kind = "nbd"

    def __init__(self, addr: Address, role: str, *, connect_timeout: float = CONNECT_TIMEOUT,
                 io_timeout: float = IO_TIMEOUT, contexts: tuple[str, ...] = (),
                 kernels: Kernels | None = None, tls: Tls | None = None) -> None:
        if nbd is None:
            raise BadInput("NBD disks need libnbd's Python bindings (Debian: python3-libnbd); "
                           "run tools/setup")
        self.tls = resolve_tls(tls)  # None: the operator's $TRANSFER_TLS_* (transfer.tls)
        self.tls.check_address(addr, kind=role)
        self.addr = addr
        self.display = addr.display
        self.role = role
        self.io_timeout = io_timeout
        self.connect_timeout = connect_timeout
        self._error = SourceError if role == "source" else TargetError
        self._handles: list[Any] = []  # every handle open, the spare's first
        self.watchdog = Watchdog(io_timeout)
        self.contexts = contexts  # extra metadata contexts asked for (qemu:dirty-bitmap:NAME)
        self.kernels = kernels or native_kernels()  # block status is read by a native kernel
        self.negotiated: set[str] = set()
        h = self.open_handle()
        try:
            self._check(h)
        except BaseException:
            self.close()
            raise
        self.spare: Any | None = h  # the handle opened first, until a worker connects

    def open_handle(self) -> Any:
        """A new handle, connected (within connect_timeout) and counted against
        max_connections."""
        h = nbd.NBD()
        self._handles.append(h)
        try:
            h.set_pread_initialize(False)  # our buffers are never read after a failed read
            if self.role == "source":
                h.add_meta_context("base:allocation")
                for ctx in self.contexts:
                    h.add_meta_context(ctx)
            with self.tls.configure(h, self.addr, nbd):  # a CA directory lives until connected
                h.aio_connect_uri(self.addr.url)
                deadline = time.monotonic() + self.connect_timeout
                while h.aio_is_connecting():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._error(f"no NBD handshake within {self.connect_timeout:g} s",
                                          disk=self.display)
                    h.poll(int(min(left, 1.0) * 1000) + 1)
            if not h.aio_is_ready():
                raise self._error("NBD connection failed", disk=self.display)
            if self.tls.wanted(self.addr) and not h.get_tls_negotiated():  # X1: no downgrade
                raise self._error("the connection is not encrypted (TLS was not negotiated)",
                                  disk=self.display)
        except nbd.Error as e:
            raise self._error(f"cannot connect: {scrub(why(e), self.addr.url)}",
                              disk=self.display, errno=errnum(e)) from None
        return h

    def forget(self, h: Any) -> None:
        """A handle given up on (NbdConn.drop): no longer counted, nor shut down by close()."""
        if h in self._handles:
            self._handles.remove(h)

    def _check(self, h: Any) -> None:
        """The capabilities, from the export as the first handle found it."""
        try:
            size = h.get_size()
        except nbd.Error as e:  # libnbd raises for sizes >= 2^63 (RELIABILITY.md S9)
            raise self._error(f"export size is out of range: {why(e)}", disk=self.display) from None
        if size < 0 or size > MAX_SIZE or size == 0 and self.role == "source":
            raise self._error(f"export size {size} is out of range"
                              + (" (an empty export: nothing to copy)" if size == 0 else ""),
                              disk=self.display)
        self.size = size
        self.max_connections = MAX_CONNECTIONS if h.can_multi_conn() else 1
        if self.role == "source":
            self.can_extents = bool(h.can_meta_context("base:allocation"))
            self.negotiated = {c for c in self.contexts if h.can_meta_context(c)}
        else:
            if h.is_read_only():
                raise TargetRefused("the export is read-only, cannot write to it", disk=self.display)
            if not h.can_flush():
                raise TargetRefused("the export cannot flush, so the copy could not be made "
                                    "durable", disk=self.display)
            self.zero_method = "nbd-zero" if h.can_zero() else "write"

    def connect(self) -> Conn | None:
        if self.spare is not None:
            h, self.spare = self.spare, None
            return NbdConn(self, h)
        if len(self._handles) >= self.max_connections:
            return None
        return NbdConn(self, self.open_handle())

    def spare_conn(self) -> NbdConn | None:
        """A Conn lent on the spare handle, which stays the spare (the next connect() takes
        it): for a few reads before the copy, on a server that may allow no other
        connection. None once a worker took it."""
        return None if self.spare is None else NbdConn(self, self.spare)

    def identities(self) -> set[tuple]:
        return {("nbd", self.addr.url)}

    def block_status(self, h: Any, context: str, offset: int, length: int, *,
                     unknown: int) -> list[Extent] | None:
        """The validated extents of context over [offset, offset + length) (at most
        MAX_BLOCK_STATUS), asked on handle h; None when the reply has none for it. What the
        reply leaves out is flagged unknown. A failed request raises OSError; a reply that
        does not add up, SourceError (transfer.ranges)."""
        reply = self.kernels.block_status(h, context, offset, length, MAX_EXTENTS)
        return reply_extents(reply, offset, offset + length, unknown=unknown, disk=self.display)

    def context_extents(self, context: str, offset: int, length: int) -> list[Extent] | None:
        """Validated extents of a negotiated metadata context at [offset, ...), on the spare
        handle (before the copy connects); None when the reply has no extents for it.

        A block status error raises SourceError: for a change tracker, the caller
        fails closed (RELIABILITY.md R2).
        """
        length = min(length, MAX_BLOCK_STATUS)
        try:
            # a reply cut short leaves the rest unknown: dirty, for a change tracker (R2)
            return self.block_status(self._handles[0], context, offset, length, unknown=DIRTY)
        except OSError as e:
            raise SourceError(f"block status for {context} failed: {e.strerror}",
                              disk=self.display, offset=offset, length=length,
                              errno=e.errno or None) from None

    def data_bytes(self) -> int:
        """The export's data per base:allocation (asked on the spare handle, 1 GiB at a time);
        an error or no answer counts as data."""
        if not self.can_extents:
            return self.size
        data, pos = 0, 0
        while pos < self.size:
            n = min(MAX_BLOCK_STATUS, self.size - pos)
            try:
                extents = self.block_status(self._handles[0], "base:allocation", pos, n, unknown=0)
            except (OSError, SourceError):
                extents = None
            if not extents:
                data += self.size - pos
                break
            data += sum(length for _, length, flags in extents if not flags & STATE_ZERO)
            pos = extents[-1][0] + extents[-1][1]
        return data

    def signature(self) -> str | None:
        from .probe import probe_signature

        h = self._handles[0]

        def read(offset: int, length: int) -> bytes:
            length = min(length, self.size - offset)
            return h.pread(length, offset) if length > 0 else b""

        try:
            return probe_signature(read)
        except nbd.Error as e:
            raise TargetError(f"cannot read to check for signatures: {why(e)}",
                              disk=self.display) from None

    def close(self) -> None:
        self.watchdog.stop()
        for h in self._handles:
            try:
                h.shutdown()
            except Exception:
                pass  # a dead handle cannot shut down; dropping it closes the socket
        self._handles.clear()


__all__ = ["NbdDisk"]
