"""NBD disks through libnbd (Debian's python3-libnbd), both roles.

One libnbd handle per worker thread. Reads are asynchronous: aio_pread into
the worker's own buffers (pread would allocate and zero-fill a new buffer
per call), completions collected by a callback that only records them, and
the handle's poll() driving the socket on the worker's thread. Writes, zeroing
and flush are synchronous calls on the worker's handle.

Extra connections are opened only when the server advertises multi-conn:
qemu-nbd -r does not, and with its default --shared=1 a second handshake
just waits (measured: it hangs until our connect timeout). Every connect has
a deadline, because libnbd has none.

Facts of libnbd 1.14 this module relies on (DESIGN.md): nbd.Error.errnum is
the number and .errno a string; a completion callback gets the error as an
object with .value and retires the command by returning 1; a handle has no
close(), so it is shut down and dropped; block status replies are not
validated by libnbd (transfer.ranges does that), and the Python binding turns
a whole reply into one list, so the native block_status kernel reads it in C.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import threading
import time
from typing import Any

from ..errors import (BadInput, ConnectionLost, SourceChanged, SourceError, TargetError,
                      TargetRefused)
from .._native import Kernels, kernels as native_kernels
from ..ranges import MAX_EXTENTS, Extent, reply_extents
from ..tls import Tls, resolve as resolve_tls
from ..url import Address, scrub
from .base import NOT_SUPPORTED, Conn, Disk, Options

try:
    import nbd
except ImportError:  # reported when an NBD disk is opened, not at import
    nbd = None

CONNECT_TIMEOUT = 30.0  # seconds for one handshake
IO_TIMEOUT = 120.0  # seconds without any reply while requests are in flight
MAX_ZERO = 1 << 30  # one NBD zero request; the protocol's count is 32 bits
MAX_BLOCK_STATUS = 1 << 30  # one block status request (count must stay below 2^32)
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


def _errnum(e: Exception) -> int | None:
    return getattr(e, "errnum", None) or None


def _why(e: Exception) -> str:
    s = getattr(e, "string", None) or str(e) or type(e).__name__
    name = getattr(e, "errno", None)
    return f"{s} ({name})" if name and name not in s else s


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
        self._handles: list[Any] = []
        self._busy: dict[int, tuple["NbdConn", float]] = {}  # synchronous calls in progress
        self._watch_lock = threading.Lock()
        self._watch_seq = 0
        self._watchdog: threading.Thread | None = None
        self._closed = threading.Event()
        self.contexts = contexts  # extra metadata contexts asked for (qemu:dirty-bitmap:NAME)
        self.kernels = kernels or native_kernels()  # block status is read by a native kernel
        self.negotiated: set[str] = set()
        h = self._open(connect_timeout)
        try:
            self._check(h)
        except BaseException:
            self.close()
            raise
        self._spare: Any | None = h

    def _open(self, timeout: float) -> Any:
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
                deadline = time.monotonic() + timeout
                while h.aio_is_connecting():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._error(f"no NBD handshake within {timeout:g} s",
                                          disk=self.display)
                    h.poll(int(min(left, 1.0) * 1000) + 1)
            if not h.aio_is_ready():
                raise self._error("NBD connection failed", disk=self.display)
            if self.tls.wanted(self.addr) and not h.get_tls_negotiated():  # X1: no downgrade
                raise self._error("the connection is not encrypted (TLS was not negotiated)",
                                  disk=self.display)
        except nbd.Error as e:
            raise self._error(f"cannot connect: {scrub(_why(e), self.addr.url)}",
                              disk=self.display, errno=_errnum(e)) from None
        return h

    def _check(self, h: Any) -> None:
        try:
            size = h.get_size()
        except nbd.Error as e:  # libnbd raises for sizes >= 2^63 (RELIABILITY.md S9)
            raise self._error(f"export size is out of range: {_why(e)}", disk=self.display) from None
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
            self.can_zero = bool(h.can_zero())
            self.zero_method = "nbd-zero" if self.can_zero else "write"

    def connect(self) -> Conn | None:
        if self._spare is not None:
            h, self._spare = self._spare, None
            return NbdConn(self, h)
        if len(self._handles) >= self.max_connections:
            return None
        h = self._open(self.connect_timeout)
        return NbdConn(self, h)

    def identities(self) -> set[tuple]:
        return {("nbd", self.addr.url)}

    def context_extents(self, context: str, offset: int, length: int) -> list[Extent] | None:
        """Validated extents of a negotiated metadata context at [offset, ...), on the spare
        handle (before the copy connects); None when the reply has no extents for it.

        A block status error raises SourceError: for a change tracker, the caller
        fails closed (RELIABILITY.md R2).
        """
        length = min(length, MAX_BLOCK_STATUS)
        try:
            reply = self.kernels.block_status(self._handles[0], context, offset, length,
                                              MAX_EXTENTS)
        except OSError as e:
            raise SourceError(f"block status for {context} failed: {e.strerror}",
                              disk=self.display, offset=offset, length=length,
                              errno=e.errno or None) from None
        # a reply cut short leaves the rest unknown: dirty, for a change tracker (R2)
        return reply_extents(reply, offset, offset + length, unknown=DIRTY, disk=self.display)

    def data_bytes(self) -> int:
        """The export's data per base:allocation (asked on the spare handle, 1 GiB at a time);
        an error or no answer counts as data."""
        if not self.can_extents:
            return self.size
        from ..ranges import STATE_ZERO

        data, pos = 0, 0
        while pos < self.size:
            n = min(MAX_BLOCK_STATUS, self.size - pos)
            try:
                reply = self.kernels.block_status(self._handles[0], "base:allocation", pos, n,
                                                  MAX_EXTENTS)
                extents = reply_extents(reply, pos, pos + n, unknown=0, disk=self.display)
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
            raise TargetError(f"cannot read to check for signatures: {_why(e)}",
                              disk=self.display) from None

    def _watch(self, conn: "NbdConn") -> int:
        """Note a synchronous call starting on conn; start the watchdog on first use."""
        with self._watch_lock:
            self._watch_seq += 1
            self._busy[self._watch_seq] = (conn, time.monotonic())
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_loop, daemon=True,
                                                  name="transfer-nbd-watchdog")
                self._watchdog.start()
            return self._watch_seq

    def _unwatch(self, key: int) -> None:
        with self._watch_lock:
            self._busy.pop(key, None)

    def _watch_loop(self) -> None:
        while not self._closed.wait(0.25):
            now = time.monotonic()
            with self._watch_lock:
                late = [c for c, t in self._busy.values()
                        if now - t > self.io_timeout and not c.timed_out]
            for conn in late:
                conn.timed_out = True
                try:  # wake the blocked call: its socket is shut down under it
                    with socket.socket(fileno=os.dup(conn.fd)) as s:
                        s.shutdown(socket.SHUT_RDWR)
                except (OSError, AttributeError, nbd.Error):
                    pass

    def close(self) -> None:
        self._closed.set()
        for h in self._handles:
            try:
                h.shutdown()
            except Exception:
                pass  # a dead handle cannot shut down; dropping it closes the socket
        self._handles.clear()


class NbdConn(Conn):
    def __init__(self, disk: NbdDisk, h: Any) -> None:
        self.disk = disk
        self.h = h
        self.inflight = 0
        self.timed_out = False  # the watchdog shut this connection down (a call hung)
        # The socket, asked for now: aio_get_fd() takes the handle's lock, which a hung
        # synchronous call holds, so the watchdog could not ask for it then.
        self.fd = h.aio_get_fd()
        # Completions, appended by libnbd's callbacks during poll(); never rebound, since the
        # callbacks of reads in flight hold a reference to this very deque.
        self._done: collections.deque[tuple[Any, int]] = collections.deque()
        self._cookies: dict[int, int] = {}  # id(tag) -> cookie of each read in flight

    def _fail(self, cls: type, what: str, e: Exception, offset: int | None = None,
              length: int | None = None) -> Exception:
        return cls(f"{what} failed: {_why(e)}", disk=self.disk.display, offset=offset,
                   length=length, errno=_errnum(e))

    def extents(self, offset: int, length: int) -> list[Extent]:
        if not self.disk.can_extents:
            return [(offset, length, 0)]
        length = min(length, MAX_BLOCK_STATUS)
        try:
            reply = self.disk.kernels.block_status(self.h, "base:allocation", offset, length,
                                                   MAX_EXTENTS)
        except OSError as e:
            if self.h.aio_is_dead() or self.h.aio_is_closed():  # R9: reconnect and ask again
                raise ConnectionLost(f"block status failed: {e.strerror}",
                                     disk=self.disk.display, offset=offset, length=length,
                                     errno=e.errno or None) from None
            # A per-command error: read the range as data (what CDI does); never as zero.
            return [(offset, length, 0)]
        extents = reply_extents(reply, offset, offset + length, unknown=0,
                                disk=self.disk.display)
        return [(offset, length, 0)] if extents is None else extents

    def start_read(self, view: memoryview, offset: int, tag: Any) -> None:
        done = self._done

        def completed(err: Any) -> int:
            done.append((tag, err.value))
            return 0  # not retired here: reap() asks aio_command_completed for the verdict

        try:
            cookie = self.h.aio_pread(view, offset, completed)
        except nbd.Error as e:
            if self.dead:  # the server hung up since the last reply: as a lost connection
                raise self._fail(ConnectionLost, "read", e, offset, len(view)) from None
            raise self._fail(SourceError, "read", e, offset, len(view)) from None
        self._cookies[id(tag)] = cookie
        self.inflight += 1

    def reap(self) -> list[tuple[Any, BaseException | None]]:
        """Completed reads, each with its error or None.

        The completion callback's error is not the verdict: libnbd 1.14 calls it
        with 0 for a structured read whose chunks did not cover the request (a
        short read, RELIABILITY.md S11) and reports the EIO only through
        aio_command_completed(cookie). So the callback only notes that the
        command finished, and the command is retired here, where its error is
        seen.
        """
        deadline = time.monotonic() + self.disk.io_timeout
        while not self._done:
            if self.inflight == 0:
                return []
            if time.monotonic() > deadline:  # R9: treated as a lost connection
                raise ConnectionLost(f"no reply from the server for {self.disk.io_timeout:g} s "
                                     f"with {self.inflight} reads in flight",
                                     disk=self.disk.display)
            try:
                self.h.poll(1000)
            except nbd.Error as e:
                raise ConnectionLost(f"connection failed: {_why(e)}", disk=self.disk.display,
                                     errno=_errnum(e)) from None
        out: list[tuple[Any, BaseException | None]] = []
        while self._done:
            tag, err = self._done.popleft()
            cookie = self._cookies.pop(id(tag))
            try:
                ok = self.h.aio_command_completed(cookie)
            except nbd.Error as e:
                err = _errnum(e) or err or errno.EIO
                out.append((tag, OSError(err, _why(e))))
                continue
            if not ok:  # the callback ran, so the command is complete: never take it as read
                err = err or errno.EIO
            out.append((tag, OSError(err, os.strerror(err)) if err else None))
        self.inflight -= len(out)
        return out

    @property
    def dead(self) -> bool:
        return self.h is None or bool(self.h.aio_is_dead()) or bool(self.h.aio_is_closed())

    def drop(self) -> None:
        """Give up on this connection (dead, or silent past the timeout); reconnect() next.

        The handle is dropped, not shut down: shutdown would wait for replies to
        its reads, which a silent server never sends. Dropping it closes the
        socket, and libnbd writes into none of our buffers after that.
        """
        if self.h is not None and self.h in self.disk._handles:
            self.disk._handles.remove(self.h)
        self.h = None
        self._done.clear()
        self._cookies.clear()
        self.inflight = 0

    def reconnect(self) -> None:
        """A new handle in place of a dropped or dead one; the export must keep its size (S10)."""
        self.drop()
        d = self.disk
        h = d._open(d.connect_timeout)
        size = h.get_size()
        if size != d.size:
            raise SourceChanged(f"the export's size changed from {d.size} to {size} bytes",
                                disk=d.display)
        self.h = h
        self.fd = h.aio_get_fd()

    def _guarded(self, what: str, fn: Any, *args: Any, offset: int | None = None,
                  length: int | None = None) -> None:
        """A synchronous call with a deadline (R9): past io_timeout the watchdog shuts the
        socket down, so the call fails instead of waiting on a silent server for ever."""
        key = self.disk._watch(self)
        try:
            fn(*args)
        except nbd.Error as e:
            if self.timed_out:
                raise TargetError(f"{what}: no reply from the server for "
                                  f"{self.disk.io_timeout:g} s", disk=self.disk.display,
                                  offset=offset, length=length) from None
            raise self._fail(TargetError, what, e, offset, length) from None
        finally:
            self.disk._unwatch(key)

    def write(self, view: memoryview, offset: int) -> None:
        self._guarded("write", self.h.pwrite, view, offset, offset=offset, length=len(view))

    def zero(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(MAX_ZERO, end - offset)
            if self.disk.can_zero:
                try:
                    self._guarded("zero", self.h.zero, n, offset, offset=offset, length=n)
                    offset += n
                    continue
                except TargetError as e:
                    if self.timed_out or e.errno not in NOT_SUPPORTED:
                        raise
                    self.disk.can_zero = False
                    self.disk.zero_method = "write"
            self.write_zeros(offset, n)
            offset += n


    def flush(self) -> None:
        self._guarded("flush", self.h.flush)


__all__ = ["NbdDisk", "NbdConn"]
