"""What `transfer serve` exports: disks opened read-only, each under an unguessable ticket.

A ticket is 32 random bytes (secrets.token_urlsafe) with an expiry; it is the only credential
of a plain or TLS-without-client-certificate export, so it is never logged, never put in an
error, and appears only on serve's stdout line and in --ticket-file (mode 0600) that hand it
over. Each export keeps a pool of its disk's connections (one per request at a time: a Conn
belongs to one thread while it is borrowed).
"""

from __future__ import annotations

import hmac
import os
import queue
import re
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..disks import Conn, Disk, open_disk
from ..errors import BadInput, SourceError
from ..tracking.bitmap import context_name

READ_TIMEOUT = 60.0  # seconds a request waits for one of the export's connections


@dataclass
class Export:
    ticket: str
    disk: Disk
    expires: float
    pool: queue.LifoQueue = field(default_factory=queue.LifoQueue)
    made: int = 0
    dirty: str | None = None  # the NBD metadata context of --dirty-bitmap
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def display(self) -> str:
        return self.disk.display

    @contextmanager
    def conn(self) -> Iterator[Conn]:
        """A connection of this export's disk for one request, returned to the pool after."""
        try:
            c = self.pool.get_nowait()
        except queue.Empty:
            with self.lock:
                c = self.disk.connect() if self.made < self.disk.max_connections else None
                self.made += c is not None
            if c is None:
                try:
                    c = self.pool.get(timeout=READ_TIMEOUT)
                except queue.Empty:
                    raise SourceError("every connection to the source is busy",
                                      disk=self.display) from None
        ok = False
        try:
            yield c
            ok = True
        finally:
            if ok and not c.dead:
                self.pool.put(c)
            else:
                c.close()
                with self.lock:
                    self.made -= 1

    def read(self, conn: Conn, view: memoryview, offset: int) -> None:
        """view's bytes at offset, through conn (an asynchronous read, waited for)."""
        conn.start_read(view, offset, None)
        while True:
            for _, err in conn.reap():
                if err is not None:
                    raise err
                return


class Exports:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.by_ticket: dict[str, Export] = {}

    def add(self, source: str, dirty_bitmap: str | None = None, **options: Any) -> Export:
        """Open source; with dirty_bitmap, its NBD server must offer that bitmap."""
        context = None
        if dirty_bitmap is not None:
            context = context_name(dirty_bitmap)
            options["contexts"] = (context,)
        disk = open_disk(source, "source", **options)
        if context is not None and context not in getattr(disk, "negotiated", ()):
            disk.close()
            raise BadInput(f"the source does not offer the dirty bitmap {dirty_bitmap!r} "
                           f"(an NBD export with it, e.g. qemu-nbd -B NAME)", disk=disk.display)
        ticket = secrets.token_urlsafe(32)
        e = Export(ticket, disk, time.time() + self.ttl, dirty=context)
        self.by_ticket[ticket] = e
        return e

    def resume(self, path: str) -> bool:
        """Take the tickets of an earlier serve from its ticket file, when it exported the
        same sources in the same order and its tickets have not expired (they expire --ticket-
        ttl after the file was written): a restarted serve keeps its clients' URLs."""
        try:
            with open(path) as fh:
                lines = [line.split(" ", 1) for line in fh.read().splitlines()]
            written = os.stat(path).st_mtime
        except (OSError, UnicodeDecodeError):
            return False
        exports = list(self.by_ticket.values())
        if (len(lines) != len(exports) or written + self.ttl <= time.time()
                or any(len(p) != 2 or p[1] != e.display for p, e in zip(lines, exports))):
            return False
        tickets = [p[0].rsplit("/images/", 1)[-1] for p in lines]
        if not all(re.fullmatch(r"[A-Za-z0-9_-]{32,128}", t) for t in tickets):
            return False
        self.by_ticket = {}
        for t, e in zip(tickets, exports):
            e.ticket, e.expires = t, written + self.ttl
            self.by_ticket[t] = e
        return True

    def find(self, ticket: str) -> Export | None:
        """The live export of ticket; None for an unknown or expired one (compared in
        constant time: a ticket is a password)."""
        for t, e in self.by_ticket.items():
            if hmac.compare_digest(t.encode(), ticket.encode()):
                return e if time.time() < e.expires else None
        return None

    def close(self) -> None:
        for e in self.by_ticket.values():
            while True:
                try:
                    e.pool.get_nowait().close()
                except queue.Empty:
                    break
            e.disk.close()


def write_ticket_file(path: str, lines: list[str]) -> None:
    """The hand-over lines, readable by the owner only (0600 from the start)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in lines))
    except OSError as e:
        raise BadInput(f"cannot write the ticket file: {os.strerror(e.errno)}",
                       disk=path, kind="ticket file") from None

