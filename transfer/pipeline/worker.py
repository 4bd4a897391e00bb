"""A worker: one source connection's share of the plan, read, inspected, handed to its writer.

Each worker keeps its own reads in flight and inspects each buffer in native
code with the GIL released (zero scan and hash); its Writer applies it to the
target. It holds at most `in_flight` buffers of `request_size` bytes, each
either being read or waiting for its write (backpressure by requests and by
bytes). Its source Conn, its buffers and its Retries are used on its thread
only. On a stop (the first error anywhere, or a cancellation) it stops
issuing, drains what it has in flight (nbdkit aborts when a client leaves with
reads in flight) and returns.
"""

from __future__ import annotations

import time
from typing import Hashable

from .._native import Kernels
from ..disks import Conn
from ..errors import ConnectionLost, TransferError
from ..integrity import BLOCK, Manifest, zero_digest
from ..ranges import Extent, mark_zero
from .buffers import BufferPool
from .plan import Force, Request, all_zero, mark_same
from .retry import RETRIES, Read, Retries
from .scheduler import Scheduler
from .shared import Shared, Stats, total
from .writer import Writer

Outstanding = dict[int, Request]  # slot -> the read in flight into it


class Worker:
    """Reads one connection's share of the plan and inspects each buffer; its Writer writes."""

    def __init__(self, src: Conn, dst: Conn, plan: Scheduler, manifest: Manifest,
                 kernels: Kernels, *, target_zero: bool, inline_writes: bool, in_flight: int,
                 request_size: int, shared: Shared, source_name: str,
                 known_zero: Manifest | None = None, retries: int = RETRIES,
                 compare: bool = False, force: list[tuple[int, int]] | None = None) -> None:
        self.src = src
        self.compare = compare
        self.force = Force(force)
        self.known_zero = known_zero
        self.plan = plan
        self.manifest = manifest
        self.k = kernels
        self.in_flight = in_flight
        self.request_size = request_size
        self.shared = shared
        self.source_name = source_name
        self.stats = Stats()  # this thread's; the writer counts into its own
        self.retries = Retries(retries, source_name, self.stats)
        self.writer = Writer(dst, shared, plan, target_zero=target_zero, inline=inline_writes)
        self.flags = bytearray(request_size // BLOCK + 1)
        self.zero_digest = zero_digest(BLOCK)

    def totals(self) -> Stats:
        """This worker's counts and its writer's (read from any thread)."""
        return total([self.stats, self.writer.stats])

    def run(self) -> None:
        pool = BufferPool(self.in_flight, self.request_size)
        self.writer.start()
        outstanding: Outstanding = {}
        try:
            self._loop(pool, outstanding)
        except BaseException as e:
            self.shared.fail(e)
        finally:
            self._drain(len(outstanding))
            self.writer.close()
            pool.close()

    def _loop(self, pool: BufferPool, outstanding: Outstanding) -> None:
        exhausted = False
        while not self.shared.stop.is_set():
            self._reclaim(pool, block=False)
            self.retries.reconnect(self.src, self.shared.stop)
            self._read_again(pool, outstanding)
            exhausted = self._issue(pool, outstanding, exhausted)
            if not outstanding:
                if self._idle(pool, exhausted):
                    return
                continue
            self._complete(pool, outstanding)

    def _read_again(self, pool: BufferPool, outstanding: Outstanding) -> None:
        """Suspects one at a time and nothing else; else the retries whose backoff is over."""
        retries = self.retries
        if retries.suspects:
            if not outstanding and not self.src.dead:
                self._read(*retries.suspects.popleft(), pool, outstanding)
            return
        now = time.monotonic()
        while (due := retries.ready(now)) is not None:
            self._read(*due, pool, outstanding)

    def _issue(self, pool: BufferPool, outstanding: Outstanding, exhausted: bool) -> bool:
        """Take requests from the plan while buffers are free; True once the plan is exhausted."""
        while (pool.free and not exhausted and not self.retries.suspects
               and not self.shared.stop.is_set()):
            try:
                req = self.plan.next(self._extents)
            except ConnectionLost as e:  # asking for extents: the same as a read
                self._lost(outstanding, e, what=("extents", e.offset))
                break
            if req is None:
                exhausted = True
            elif req.data:
                self._read(pool.free.pop(), req, pool, outstanding)
            elif self.compare and self._unchanged_zero(req):
                self.stats.bytes_unchanged += req.length
                self.stats.zero_requests += 1
                self.plan.done(req.offset)
            else:
                self.manifest.set_zero(req.offset, req.length)
                self.writer.submit(req.offset, req.length, None, None, None)
                self.stats.zero_requests += 1
        return exhausted

    def _idle(self, pool: BufferPool, exhausted: bool) -> bool:
        """Nothing in flight: wait for what comes next; True when this worker is finished."""
        retries = self.retries
        if retries.suspects:
            return False
        if retries.due:  # nothing in flight: sleep until the next retry is due
            self.shared.stop.wait(max(0.0, retries.due[0][0] - time.monotonic()))
        elif exhausted:
            return True
        elif not pool.free:  # every buffer is with the writer: wait for one
            self._reclaim(pool, block=True)
        return False

    def _complete(self, pool: BufferPool, outstanding: Outstanding) -> None:
        """Reap completed reads: inspect and hand them to the writer; retry the failed ones."""
        try:
            completions = self.src.reap()
        except ConnectionLost as e:
            self._lost(outstanding, e)
            return
        failed = []
        for (slot, req), err in completions:
            del outstanding[slot]
            if err is not None:
                failed.append((slot, req, err))
                continue
            view = pool.slots[slot][: req.length]
            self.writer.submit(req.offset, req.length, view, self._inspect(req, view), slot)
        if failed and self.src.dead:  # they failed because the connection died (S2)
            outstanding.update((slot, req) for slot, req, _ in failed)
            err = failed[0][2]
            self._lost(outstanding, ConnectionLost(
                f"connection lost: {getattr(err, 'strerror', None) or err}",
                disk=self.source_name, errno=getattr(err, "errno", None)))
            return
        for slot, req, err in failed:
            self.retries.failed(slot, req, err)

    def _read(self, slot: int, req: Request, pool: BufferPool, outstanding: Outstanding) -> None:
        try:
            self.src.start_read(pool.slots[slot][: req.length], req.offset, (slot, req))
        except ConnectionLost as e:  # the server hung up since the last reply (S2, S4)
            self._lost(outstanding, e, unsent=(slot, req))
            return
        outstanding[slot] = req
        self.stats.requests += 1

    def _lost(self, outstanding: Outstanding, err: ConnectionLost, what: Hashable | None = None,
              unsent: Read | None = None) -> None:
        """The connection died; it is dropped, to be reopened within the retry budget.

        The reads in flight are read again (Retries.lost says how). what: a
        request that is not a read (extents), charged to the same budget.
        unsent: a read that never left (the handle was already dead), read
        again as a suspect.
        """
        lost = list(outstanding.items())
        outstanding.clear()
        if what is not None:
            self.retries.charge(what, err)
        if unsent is not None:
            lost.append(unsent)
        self.retries.lost(lost, err, culprit_known=what is None)
        self.src.drop()

    def _extents(self, offset: int, length: int) -> list[Extent]:
        extents = self.src.extents(offset, length)
        if self.known_zero is None:
            return extents
        return mark_zero(extents, self.known_zero.zero_runs(offset, length))

    def _reclaim(self, pool: BufferPool, *, block: bool) -> None:
        """Take back the slots whose writes completed (waiting for one when block)."""
        returned = self.writer.returned
        if block:
            pool.free.append(returned.get())
        while not returned.empty():
            pool.free.append(returned.get_nowait())

    def _drain(self, inflight: int) -> None:
        """Wait for reads still in flight; their buffers must not be freed under them."""
        try:
            while inflight > 0:
                got = self.src.reap()
                if not got:
                    break
                inflight -= len(got)
        except TransferError:
            pass  # a dead connection has nothing more in flight

    def _unchanged_zero(self, req: Request) -> bool:
        """Compare mode: the manifest already says all of this zero request is zero."""
        if self.force.touches(req.offset, req.length):
            return False
        return all_zero(self.manifest.zero_runs(req.offset, req.length), req, self.manifest.size)

    def _inspect(self, req: Request, view: memoryview) -> bytes | None:
        """Zero scan and hash (native, GIL released); the per-block flags, or None when all data."""
        k, flags = self.k, self.flags
        self.stats.bytes_read += req.length
        digests = self.manifest.slice(req.offset, req.length)
        compare = self.compare and not self.force.touches(req.offset, req.length)
        old = bytes(digests) if compare else None
        zeros = k.zero_blocks(view, BLOCK, flags)
        k.hash_blocks(view, BLOCK, digests, flags, self.zero_digest)
        n = (req.length + BLOCK - 1) // BLOCK
        if old is not None and mark_same(digests, old, flags, n):
            return bytes(flags[:n])
        if zeros == 0:
            return None
        return bytes(flags[:n])
