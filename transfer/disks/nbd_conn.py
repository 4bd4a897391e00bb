"""One libnbd handle (Debian's python3-libnbd) as a worker's connection to an NBD disk.

One handle per worker thread. Reads are asynchronous: aio_pread into the
worker's own buffers (pread would allocate and zero-fill a new buffer per
call), completions collected by a callback that only records them, and the
handle's poll() driving the socket on the worker's thread. Writes, zeroing
and flush are synchronous calls on the worker's handle, each with a deadline
kept by the disk's Watchdog (libnbd has none).

Facts of libnbd 1.14 this module and nbd.py rely on (DESIGN.md): nbd.Error.errnum
is the number and .errno a string; a completion callback gets the error as an
object with .value and retires the command by returning 1; a handle has no
close(), so it is shut down and dropped; block status replies are not
validated by libnbd (transfer.ranges does that), and the Python binding turns
a whole reply into one list, so the native block_status kernel reads it in C.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import ConnectionLost, SourceChanged, SourceError, TargetError
from ..ranges import Extent
from .base import NOT_SUPPORTED, Conn

if TYPE_CHECKING:
    from .nbd import NbdDisk

try:
    import nbd
except ImportError:  # reported when an NBD disk is opened, not at import
    nbd = None

MAX_ZERO = 1 << 30  # one NBD zero request; the protocol's count is 32 bits
MAX_BLOCK_STATUS = 1 << 30  # one block status request (count must stay below 2^32)


def errnum(e: Exception) -> int | None:
    return getattr(e, "errnum", None) or None


def why(e: Exception) -> str:
    s = getattr(e, "string", None) or str(e) or type(e).__name__
    name = getattr(e, "errno", None)
    return f"{s} ({name})" if name and name not in s else s


class Watchdog:
    """Deadlines for a disk's synchronous calls (R9): a call past io_timeout has its socket
    shut down under it, so it fails instead of waiting on a silent server for ever."""

    def __init__(self, io_timeout: float) -> None:
        self.io_timeout = io_timeout
        self._busy: dict[int, tuple[NbdConn, float]] = {}  # synchronous calls in progress
        self._lock = threading.Lock()
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @contextlib.contextmanager
    def watching(self, conn: NbdConn) -> Iterator[None]:
        """Around a synchronous call on conn; starts the watchdog's thread on first use."""
        with self._lock:
            self._seq += 1
            key = self._seq
            self._busy[key] = (conn, time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="transfer-nbd-watchdog")
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._busy.pop(key, None)

    def _loop(self) -> None:
        while not self._stopped.wait(0.25):
            now = time.monotonic()
            with self._lock:
                late = [c for c, t in self._busy.values()
                        if now - t > self.io_timeout and not c.timed_out]
            for conn in late:
                conn.timed_out = True
                try:  # wake the blocked call: its socket is shut down under it
                    with socket.socket(fileno=os.dup(conn.fd)) as s:
                        s.shutdown(socket.SHUT_RDWR)
                except (OSError, AttributeError, nbd.Error):
                    pass

    def stop(self) -> None:
        self._stopped.set()


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
        return cls(f"{what} failed: {why(e)}", disk=self.disk.display, offset=offset,
                   length=length, errno=errnum(e))

    def extents(self, offset: int, length: int) -> list[Extent]:
        if not self.disk.can_extents:
            return [(offset, length, 0)]
        length = min(length, MAX_BLOCK_STATUS)
        try:
            extents = self.disk.block_status(self.h, "base:allocation", offset, length, unknown=0)
        except OSError as e:
            if self.h.aio_is_dead() or self.h.aio_is_closed():  # R9: reconnect and ask again
                raise ConnectionLost(f"block status failed: {e.strerror}",
                                     disk=self.disk.display, offset=offset, length=length,
                                     errno=e.errno or None) from None
            # A per-command error: read the range as data (what CDI does); never as zero.
            return [(offset, length, 0)]
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
                raise ConnectionLost(f"connection failed: {why(e)}", disk=self.disk.display,
                                     errno=errnum(e)) from None
        out: list[tuple[Any, BaseException | None]] = []
        while self._done:
            tag, err = self._done.popleft()
            cookie = self._cookies.pop(id(tag))
            try:
                ok = self.h.aio_command_completed(cookie)
            except nbd.Error as e:
                err = errnum(e) or err or errno.EIO
                out.append((tag, OSError(err, why(e))))
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
        if self.h is not None:
            self.disk.forget(self.h)
        self.h = None
        self._done.clear()
        self._cookies.clear()
        self.inflight = 0

    def reconnect(self) -> None:
        """A new handle in place of a dropped or dead one; the export must keep its size (S10)."""
        self.drop()
        d = self.disk
        h = d.open_handle()
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
        with self.disk.watchdog.watching(self):
            try:
                fn(*args)
            except nbd.Error as e:
                if self.timed_out:
                    raise TargetError(f"{what}: no reply from the server for "
                                      f"{self.disk.io_timeout:g} s", disk=self.disk.display,
                                      offset=offset, length=length) from None
                raise self._fail(TargetError, what, e, offset, length) from None

    def write(self, view: memoryview, offset: int) -> None:
        self._guarded("write", self.h.pwrite, view, offset, offset=offset, length=len(view))

    def zero(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(MAX_ZERO, end - offset)
            if self.disk.zero_method == "nbd-zero":
                try:
                    self._guarded("zero", self.h.zero, n, offset, offset=offset, length=n)
                    offset += n
                    continue
                except TargetError as e:
                    if self.timed_out or e.errno not in NOT_SUPPORTED:
                        raise
                    self.disk.zero_method = "write"
            self.write_zeros(offset, n)
            offset += n

    def flush(self) -> None:
        self._guarded("flush", self.h.flush)
