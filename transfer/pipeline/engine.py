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

The modules: plan.py decides (pure), scheduler.py hands its requests to the
workers and keeps the frontier, worker.py reads and inspects, writer.py
writes, retry.py reads again, commits.py journals a warm pass, shared.py has
the stop and the counters. Thread rules: each Conn has one owner thread (a
source Conn its worker, a target Conn its writer; a flush reaches the target
through the writer's queue), each thread counts into its own Stats (summed
here), and nothing on the event loop blocks on I/O (connecting, flushing and
committing run on threads).

First error wins: it is recorded, every worker stops issuing, drains what it
has in flight and returns; the caller gets that first error. Progress counts
completed writes.

Warm passes (transfer.sync) add three things: a plan over some ranges only;
compare mode, where a block whose new digest equals the manifest's old one
is not written (unless it lies in a `force` range, whose target contents
are unknown after a crash); and commits (commits.py).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from .._native import Kernels
from ..disks import Conn, Disk
from ..errors import Interrupted
from ..integrity import Manifest
from ..observe.events import Progress
from .commits import Commits, flush
from .retry import RETRIES
from .scheduler import Scheduler
from .shared import Shared, Stats, total
from .worker import Worker


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
    writers = [w.writer for w in workers]
    start = time.monotonic()
    progress = Reporter(workers, plan.bytes, start, on_progress)
    commits = None if commit is None else Commits(
        plan, writers, shared, commit, every_bytes=commit_bytes, every_seconds=commit_seconds,
        start=start)
    executor = ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="transfer-io")
    futures = [loop.run_in_executor(executor, w.run) for w in workers]
    try:
        interrupted = await _wait(futures, shared, progress, commits, interval)
        if interrupted or shared.error is None and shared.stop.is_set():
            if commits is not None and shared.error is None:  # P3: flush and commit, then stop
                await commits.last()
            raise Interrupted(f"interrupted before the end; {target.display} is incomplete")
        if shared.error is not None:
            raise shared.error
        await asyncio.to_thread(flush, writers)
    finally:
        executor.shutdown(wait=True)
        for s, d in pairs:
            s.close()
            d.close()
    progress.report(final=True)
    return Result(total([w.totals() for w in workers]), len(workers), in_flight, request_size,
                  time.monotonic() - start)


async def _wait(futures: list[asyncio.Future], shared: Shared, progress: "Reporter",
                commits: Commits | None, interval: float) -> bool:
    """Tick until every worker returned: progress every interval, commits when due.

    A cancellation stops the workers, and the waiting goes on: they must drain
    before handles close. True if the pass was interrupted.
    """
    interrupted = False
    tick = min(interval, 0.1) if commits is not None else interval
    last_report = progress.start
    while True:
        try:
            finished, _ = await asyncio.wait(futures, timeout=tick)
        except asyncio.CancelledError:
            interrupted = True
            shared.stop.set()
            continue
        if len(finished) == len(futures):
            return interrupted
        now = time.monotonic()
        if now - last_report >= interval:
            progress.report()
            last_report = now
        if commits is not None and not shared.stop.is_set():
            if await commits.tick(progress.done(), now):
                interrupted = True  # a signal came during the commit
                shared.stop.set()


class Reporter:
    """Progress events from the workers' counts, with how long done has not grown (S5)."""

    def __init__(self, workers: list[Worker], total_bytes: int, start: float,
                 on_progress: Callable[[Progress], None] | None) -> None:
        self.workers = workers
        self.total_bytes = total_bytes
        self.start = start
        self.on_progress = on_progress
        self.moved = (0, start)  # bytes done at the last report, and when they last grew

    def done(self) -> int:
        return sum(w.totals().done for w in self.workers)

    def report(self, final: bool = False) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        t = total([w.totals() for w in self.workers])
        if t.done != self.moved[0]:
            self.moved = (t.done, now)
        self.on_progress(Progress(t.done, self.total_bytes, now - self.start, final,
                                  retries=t.retries, reconnects=t.reconnects,
                                  stalled=0.0 if final else now - self.moved[1]))


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


__all__ = ["RETRIES", "Result", "run"]
