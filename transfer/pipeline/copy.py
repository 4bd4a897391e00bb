"""The copy engine: asyncio orchestrates, threads per connection move the bytes.

    plan ──► worker 0 (thread): src conn 0 ──aio_pread──► buffer ──► zero scan + hash
         ├─► worker 1 (thread): src conn 1 ...                        (native, no GIL)
         └─► ...                                       │         manifest[block] = digest
                                                       ▼
              writer i (thread): dst conn i: write data runs, zero or skip zero runs
                                                       │
                       progress (completed writes) ◄───┘    the buffer goes back to worker i

Why threads under asyncio: on these 2-core machines one asyncio thread doing
the socket reads of every connection topped out at 0.67-0.93x nbdcopy, while
one thread per connection driving libnbd aio with 8-16 requests in flight
reached 1.06x (DESIGN.md "What fast means here"). So the event loop starts
the workers, ticks progress, and turns the first error or a cancellation into
a stop; each worker keeps its own reads in flight and inspects each buffer in
native code with the GIL released, and its writer applies it to the target.

Bounds: each worker holds at most `in_flight` buffers of `request_size`
bytes, each either being read or waiting for its write (backpressure by
requests and by bytes); each worker's Writer thread applies its buffers to the
target in order. First error wins: it is recorded, every worker stops issuing, drains what it has in
flight (nbdkit aborts when a client leaves with reads in flight) and returns;
the caller gets that first error. Progress counts completed writes.

A failed read is issued again after a backoff (reads are idempotent, R4),
up to `retries` times per request; a connection the server dropped is
reopened (and the export's size checked again) within the same budget; the
reads lost with it are read again one at a time, so that only the read that
kills a connection is charged to the budget and named (S2). A persistent
failure ends the copy with an error naming the offset (R9).

Warm passes (transfer.sync) add three things: a plan over some ranges only;
compare mode, where a block whose new digest equals the manifest's old one
is not written (unless it lies in a `force` range, whose target contents
are unknown after a crash); and commits: every commit_bytes or
commit_seconds the target is flushed and commit(frontier) called, so the
caller can journal that everything planned below the frontier is durable
(R5). On an interruption the same flush and commit happen before the
Interrupted error; after any other error nothing more is committed.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from .._native import Kernels
from ..disks import Conn, Disk
from ..errors import ConnectionLost, Interrupted, SourceChanged, SourceError, TransferError
from ..integrity import BLOCK, Manifest, zero_digest
from ..observe.events import Progress
from ..ranges import Extent, mark_zero
from .buffers import BufferPool
from .plan import Request
from .scheduler import Scheduler


DATA, ZERO, SAME = 0, 1, 2  # per-block flags: write, zero, unchanged (compare mode: skip)
RETRIES = 8  # failed reads of one request before the copy fails: 0.1 s doubling to 5 s, ~16 s


def backoff(attempt: int) -> float:
    return min(0.1 * 2 ** (attempt - 1), 5.0)


@dataclass
class Stats:
    bytes_read: int = 0
    bytes_copied: int = 0
    bytes_zeroed: int = 0
    bytes_skipped: int = 0  # zeroes not written: the target reads as zero there
    bytes_unchanged: int = 0  # compare mode: digest equal to the manifest's, not written
    requests: int = 0  # reads issued
    zero_requests: int = 0
    retries: int = 0  # reads issued again after an error
    reconnects: int = 0

    @property
    def done(self) -> int:
        return self.bytes_copied + self.bytes_zeroed + self.bytes_skipped + self.bytes_unchanged

    def add(self, other: "Stats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Shared:
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, e: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = e
        self.stop.set()


class Writer:
    """Applies one worker's inspected buffers to the target, in order, on its own thread.

    Writing on the reading thread stalled the reads behind every write: measured
    here to a regular file with O_DIRECT, 1.9-2.0 s against nbdcopy's 1.5-1.7 s,
    while reading alone takes 0.8 s and writing alone 1.4 s (the disk's ~1.1 GiB/s).
    With a writer beside each reader the two overlap. A buffer's slot goes back
    to the reader only after its write completed, so progress and the bytes
    counted are completed writes. A null target is applied inline (nothing to
    overlap). The target Conn is used by this thread only.
    """

    def __init__(self, dst: Conn, stats: Stats, shared: Shared, plan: Scheduler, *, target_zero: bool,
                 inline: bool) -> None:
        self.dst = dst
        self.plan = plan
        self.stats = stats
        self.shared = shared
        self.target_zero = target_zero
        self.inline = inline
        self.returned: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if not inline:
            self._thread = threading.Thread(target=self._loop, name="transfer-write", daemon=True)
            self._thread.start()

    def submit(self, offset: int, length: int, view: memoryview | None, flags: bytes | None,
               slot: int | None) -> None:
        """Write view or zero [offset, +length); flags per block: DATA, ZERO or SAME (skip).

        flags None: all data. offset is the request's; it is done once applied.
        """
        item = (offset, length, view, flags, slot)
        if self.inline:
            self._apply(item)
        else:
            self._queue.put(item)

    def close(self) -> None:
        """Finish every submitted item, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            self._apply(item)

    def _apply(self, item: tuple) -> None:
        offset, length, view, flags, slot = item
        try:
            if not self.shared.stop.is_set():
                if view is None:
                    self._zero(offset, length)
                else:
                    self._write(offset, length, view, flags)
                self.plan.done(offset)
        except BaseException as e:
            self.shared.fail(e)
        finally:
            if slot is not None:
                self.returned.put(slot)

    def _zero(self, offset: int, length: int) -> None:
        if self.target_zero:
            self.stats.bytes_skipped += length
        else:
            self.dst.zero(offset, length)
            self.stats.bytes_zeroed += length

    def _write(self, offset: int, length: int, view: memoryview, flags: bytes | None) -> None:
        st = self.stats
        if flags is None:
            self.dst.write(view, offset)
            st.bytes_copied += length
            return
        pos, nblocks = 0, len(flags)
        while pos < nblocks:
            kind = flags[pos]
            end = pos + 1
            while end < nblocks and flags[end] == kind:
                end += 1
            start, stop = pos * BLOCK, min(end * BLOCK, length)
            if kind == ZERO:
                self._zero(offset + start, stop - start)
            elif kind == SAME:
                st.bytes_unchanged += stop - start
            else:
                self.dst.write(view[start:stop], offset + start)
                st.bytes_copied += stop - start
            pos = end


class Worker:
    """Reads one connection's share of the plan and inspects each buffer; its Writer writes."""

    def __init__(self, src: Conn, dst: Conn, plan: Scheduler, manifest: Manifest, kernels: Kernels,
                 *, target_zero: bool, inline_writes: bool, in_flight: int, request_size: int,
                 shared: Shared, source_name: str, known_zero: Manifest | None = None,
                 retries: int = RETRIES, compare: bool = False,
                 force: list[tuple[int, int]] | None = None) -> None:
        self.src = src
        self.compare = compare
        self.force = force or []
        self._force_starts = [s for s, _ in self.force]
        self.known_zero = known_zero
        self.dst = dst
        self.plan = plan
        self.manifest = manifest
        self.k = kernels
        self.target_zero = target_zero
        self.inline_writes = inline_writes
        self.in_flight = in_flight
        self.request_size = request_size
        self.shared = shared
        self.source_name = source_name
        self.retries = retries
        self._retry: collections.deque[tuple[float, int, Request]] = collections.deque()
        # reads lost with a connection, culprit unknown: read again one at a time (see _lost)
        self._suspects: collections.deque[tuple[int, Request]] = collections.deque()
        self._attempts: dict = {}  # offset (or ("extents", offset)) -> failures so far
        self._last_error: BaseException | None = None
        self.stats = Stats()
        self.flags = bytearray(request_size // BLOCK + 1)
        self.zero_digest = zero_digest(BLOCK)

    def run(self) -> None:
        pool = BufferPool(self.in_flight, self.request_size)
        writer = Writer(self.dst, self.stats, self.shared, self.plan,
                        target_zero=self.target_zero, inline=self.inline_writes)
        outstanding: dict[int, Request] = {}  # slot -> the read in flight into it
        try:
            exhausted = False
            while not self.shared.stop.is_set():
                self._reclaim(pool, writer, block=False)
                self._ensure_connected()
                if self._suspects:  # reads lost with a connection: one at a time, nothing else
                    if not outstanding and not self.src.dead:
                        slot, req = self._suspects.popleft()
                        self._read(slot, req, pool, outstanding)
                else:
                    now = time.monotonic()
                    while self._retry and self._retry[0][0] <= now and not self._suspects:
                        _, slot, req = self._retry.popleft()
                        self._read(slot, req, pool, outstanding)
                while (pool.free and not exhausted and not self._suspects
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
                        writer.submit(req.offset, req.length, None, None, None)
                        self.stats.zero_requests += 1
                if not outstanding:
                    if self._suspects:
                        continue
                    if self._retry:  # nothing in flight: sleep until the next retry is due
                        self.shared.stop.wait(max(0.0, self._retry[0][0] - time.monotonic()))
                    elif exhausted:
                        break
                    elif not pool.free:  # every buffer is with the writer: wait for one
                        self._reclaim(pool, writer, block=True)
                    continue
                try:
                    completions = self.src.reap()
                except ConnectionLost as e:
                    self._lost(outstanding, e)
                    continue
                failed = []
                for (slot, req), err in completions:
                    del outstanding[slot]
                    if err is not None:
                        failed.append((slot, req, err))
                        continue
                    view = pool.slots[slot][: req.length]
                    writer.submit(req.offset, req.length, view, self._inspect(req, view), slot)
                if failed and self.src.dead:  # they failed because the connection died (S2)
                    outstanding.update((slot, req) for slot, req, _ in failed)
                    err = failed[0][2]
                    self._lost(outstanding, ConnectionLost(
                        f"connection lost: {getattr(err, 'strerror', None) or err}",
                        disk=self.source_name, errno=getattr(err, "errno", None)))
                    continue
                for slot, req, err in failed:
                    self._schedule_retry(slot, req, err)
        except BaseException as e:
            self.shared.fail(e)
        finally:
            self._drain(len(outstanding))
            writer.close()
            pool.close()

    def _read(self, slot: int, req: Request, pool: BufferPool,
              outstanding: dict[int, Request]) -> None:
        try:
            self.src.start_read(pool.slots[slot][: req.length], req.offset, (slot, req))
        except ConnectionLost as e:  # the server hung up since the last reply (S2, S4)
            self._lost(outstanding, e, unsent=(slot, req))
            return
        outstanding[slot] = req
        self.stats.requests += 1

    def _schedule_retry(self, slot: int, req: Request, err: BaseException) -> None:
        """Read again after a backoff (reads are idempotent), or fail when the budget is spent."""
        attempt = self._attempts.get(req.offset, 0) + 1
        if attempt > self.retries:
            why = getattr(err, "message", None) or getattr(err, "strerror", None) or str(err)
            raise SourceError(f"read failed ({why}), {attempt} attempts", disk=self.source_name,
                              offset=req.offset, length=req.length,
                              errno=getattr(err, "errno", None))
        self._attempts[req.offset] = attempt
        self._last_error = err
        self.stats.retries += 1
        self._retry.append((time.monotonic() + backoff(attempt), slot, req))

    def _lost(self, outstanding: dict[int, Request], err: ConnectionLost,
              what: tuple | None = None, unsent: tuple[int, Request] | None = None) -> None:
        """The connection died; it is dropped, to be reopened within the retry budget.

        Which request killed it is known only when one was in flight alone
        (qemu-nbd hangs up on a backend read error, RELIABILITY.md S2): that
        one is charged a retry. Reads lost together are suspects, charged
        nothing: they are read again one at a time, so a request that kills
        every connection is found, and the error names its offset, not that of
        a read that happened to be in flight beside it. what: a request that
        is not a read (extents), charged to the same budget. unsent: a read
        that never left (the handle was already dead), read again as a suspect.
        """
        lost = list(outstanding.items())
        outstanding.clear()
        if what is not None:
            attempt = self._attempts.get(what, 0) + 1  # type: ignore[call-overload]
            if attempt > self.retries:
                raise err
            self._attempts[what] = attempt  # type: ignore[index]
            self._last_error = err
            self.stats.retries += 1
        if unsent is not None:
            lost.append(unsent)
        if len(lost) == 1 and what is None:
            self._schedule_retry(*lost[0], err)
        else:  # each is read again (counted as a retry), none is charged to the budget
            self._suspects.extend(sorted(lost, key=lambda r: r[1].offset))
            self.stats.retries += len(lost)
        self._last_error = err
        self.src.drop()

    def _ensure_connected(self) -> None:
        """Reconnect a connection the server dropped, with backoff, within the retry budget."""
        if not self.src.dead:
            return
        for attempt in range(1, self.retries + 2):
            try:
                self.src.reconnect()
                self.stats.reconnects += 1
                return
            except SourceChanged:
                raise
            except SourceError as e:
                if attempt > self.retries:
                    if self._last_error is not None:  # say what started it
                        e.message += f", after: {self._last_error}"
                    raise
            if self.shared.stop.wait(backoff(attempt)):
                return

    def _extents(self, offset: int, length: int) -> list[Extent]:
        extents = self.src.extents(offset, length)
        if self.known_zero is None:
            return extents
        return mark_zero(extents, self.known_zero.zero_runs(offset, length))

    @staticmethod
    def _reclaim(pool: BufferPool, writer: Writer, *, block: bool) -> None:
        """Take back the slots whose writes completed (waiting for one when block)."""
        if block:
            pool.free.append(writer.returned.get())
        while not writer.returned.empty():
            pool.free.append(writer.returned.get_nowait())

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

    def _forced(self, offset: int, length: int) -> bool:
        """Does [offset, +length) touch a force range (target contents unknown)?"""
        i = bisect.bisect_right(self._force_starts, offset + length - 1) - 1
        return i >= 0 and self.force[i][1] > offset

    def _unchanged_zero(self, req: Request) -> bool:
        """Compare mode: the manifest already says all of this zero request is zero."""
        if self._forced(req.offset, req.length):
            return False
        runs = self.manifest.zero_runs(req.offset, req.length)
        return len(runs) == 1 and runs[0] == (req.offset, min(req.length, self.manifest.size -
                                                                req.offset))

    def _inspect(self, req: Request, view: memoryview) -> bytes | None:
        """Zero scan and hash (native, GIL released); the per-block flags, or None when all data."""
        k, flags = self.k, self.flags
        self.stats.bytes_read += req.length
        digests = self.manifest.slice(req.offset, req.length)
        old = bytes(digests) if self.compare and not self._forced(req.offset, req.length) else None
        zeros = k.zero_blocks(view, BLOCK, flags)
        k.hash_blocks(view, BLOCK, digests, flags, self.zero_digest)
        n = (req.length + BLOCK - 1) // BLOCK
        if old is not None:
            same = 0
            for i in range(n):
                if digests[i * 16 : i * 16 + 16] == old[i * 16 : i * 16 + 16]:
                    flags[i] = SAME
                    same += 1
            if same:
                return bytes(flags[:n])
        if zeros == 0:
            return None
        return bytes(flags[:n])


@dataclass
class Result:
    stats: Stats
    connections: int
    in_flight: int
    request_size: int
    seconds: float


async def run(source: Disk, target: Disk, manifest: Manifest, kernels: Kernels, *,
              connections: int, in_flight: int, request_size: int, target_zero: bool,
              on_progress: Callable[[Progress], None] | None = None,
              interval: float = 1.0, size: int | None = None,
              known_zero: Manifest | None = None, retries: int = RETRIES,
              ranges: list[tuple[int, int]] | None = None, compare: bool = False,
              force: list[tuple[int, int]] | None = None,
              commit: Callable[[int], None] | None = None, commit_bytes: int = 1 << 30,
              commit_seconds: float = 10.0) -> Result:
    """Copy source onto target; flush the target only when every request succeeded.

    size: copy only the first size bytes of the source (default: all of it).
    known_zero: a manifest whose zero-digest blocks are not read but taken as
    zero (copy --verify reads back only what the copy wrote as data).
    ranges: copy only these sorted, block-aligned [start, end) ranges.
    compare: do not write blocks whose digest equals the manifest's, except
    in force ranges. commit(frontier): called (on a worker thread) after the
    target was flushed with everything planned below frontier written.
    """
    loop = asyncio.get_running_loop()
    size = source.size if size is None else size
    plan = Scheduler(size, request_size=request_size, ranges=ranges)
    shared = Shared()
    pairs = await asyncio.to_thread(_connect, source, target, connections)
    inline = target.kind == "null"
    workers = [Worker(s, d, plan, manifest, kernels, target_zero=target_zero, inline_writes=inline,
                      in_flight=in_flight, request_size=request_size, shared=shared,
                      source_name=source.display, known_zero=known_zero, retries=retries,
                      compare=compare, force=force)
               for s, d in pairs]
    start = time.monotonic()

    moved = [0, start]  # bytes done at the last report, and when they last grew

    def report(final: bool = False) -> None:
        if on_progress is not None:
            now = time.monotonic()
            done = sum(w.stats.done for w in workers)
            if done != moved[0]:
                moved[:] = [done, now]
            on_progress(Progress(done, plan.bytes, now - start, final,
                                 retries=sum(w.stats.retries for w in workers),
                                 reconnects=sum(w.stats.reconnects for w in workers),
                                 stalled=0.0 if final else now - moved[1]))

    executor = ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="transfer-io")
    futures = [loop.run_in_executor(executor, w.run) for w in workers]
    interrupted = False
    committed, committed_at, committed_done = 0, start, 0
    tick = min(interval, 0.1) if commit is not None else interval
    last_report = start
    try:
        while True:
            try:
                finished, _ = await asyncio.wait(futures, timeout=tick)
            except asyncio.CancelledError:
                interrupted = True
                shared.stop.set()
                continue  # keep waiting: the workers must drain before handles close
            if len(finished) == len(futures):
                break
            now = time.monotonic()
            if now - last_report >= interval:
                report()
                last_report = now
            if commit is not None and not shared.stop.is_set():
                done = sum(w.stats.done for w in workers)
                if done - committed_done >= commit_bytes or now - committed_at >= commit_seconds:
                    frontier = plan.frontier()
                    if frontier > committed:
                        try:
                            if await _to_the_end(_commit, pairs, commit, frontier):
                                interrupted = True  # a signal came during the commit
                                shared.stop.set()
                            committed = frontier
                        except BaseException as e:  # a failed flush or journal: stop (R6)
                            shared.fail(e)
                    committed_at, committed_done = time.monotonic(), done
        if interrupted or shared.error is None and shared.stop.is_set():
            if commit is not None and shared.error is None:  # P3: flush and commit, then stop
                frontier = plan.frontier()
                if frontier > committed:
                    await _to_the_end(_commit, pairs, commit, frontier)
            raise Interrupted(f"interrupted before the end; {target.display} is incomplete")
        if shared.error is not None:
            raise shared.error
        await asyncio.to_thread(_flush, pairs)
    finally:
        executor.shutdown(wait=True)
        for s, d in pairs:
            s.close()
            d.close()
    report(final=True)
    total = Stats()
    for w in workers:
        total.add(w.stats)
    return Result(total, len(workers), in_flight, request_size, time.monotonic() - start)


def _connect(source: Disk, target: Disk, connections: int) -> list[tuple[Conn, Conn]]:
    pairs: list[tuple[Conn, Conn]] = []
    try:
        while len(pairs) < connections:
            s = source.connect()
            if s is None:
                break
            d = target.connect()
            if d is None:
                s.close()
                break
            pairs.append((s, d))
    except BaseException:
        for s, d in pairs:
            s.close()
            d.close()
        raise
    return pairs


async def _to_the_end(fn: Callable[..., None], *args: object) -> bool:
    """Run fn on a thread to its end even if cancelled meanwhile (a commit cut short would
    leave its thread using handles being closed); fn's error is raised. True if cancelled."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
            return cancelled
        except asyncio.CancelledError:
            if task.done():  # the cancellation was ours to absorb; fn's outcome stands
                task.result()
                return True
            cancelled = True


def _commit(pairs: list[tuple[Conn, Conn]], commit: Callable[[int], None], frontier: int) -> None:
    """Flush the target (its first failure is final, R6), then let the caller journal frontier."""
    _flush(pairs)
    commit(frontier)


def _flush(pairs: list[tuple[Conn, Conn]]) -> None:
    """Make the target durable; the first failure is final (never retried).

    Every connection flushes, though with NBD multi-conn one flush would cover
    all: it costs little, and leans on no server's reading of the spec.
    """
    for _, d in pairs:
        d.flush()


__all__ = ["Progress", "Result", "Stats", "run"]
