"""Running a planned warm pass: its begin record (after its ranges file), the copy with a
commit record at each flush, and its end record (the order of durability, R5, in
transfer.migration.warm's docstring).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from .. import _native
from ..aio import to_the_end
from ..disks import Disk
from ..integrity import Manifest
from ..pipeline import engine
from ..observe.events import Progress
from ..pipeline.shape import shape
from ..reports import SyncReport
from ..state.journal import Journal
from ..state.ranges_file import write_ranges
from ..state.records import State
from ..tracking.areas import clip_runs, runs_bytes
from .passplan import PassPlan


async def run_pass(st: State, journal: Journal, src: Disk, dst: Disk, manifest: Manifest,
                plan: PassPlan, report: SyncReport, kernels: _native.Kernels, *,
                checkpoint: str | None, final: bool, connections: int | None,
                in_flight: int | None, request_size: int | None, retries: int,
                on_progress: Callable[[Progress], None] | None, commit_bytes: int,
                commit_seconds: float) -> None:
    """Journal the pass's plan, copy it with commits, and journal its end."""
    size = src.size
    begin, todo, delta = await to_the_end(_begin_record, st, journal, plan, checkpoint,
                                                 size)  # the ranges file, fsynced
    report.delta_bytes = delta
    await to_the_end(journal.append, begin)
    commits, upto = 0, plan.start

    def commit(frontier: int) -> None:
        nonlocal commits, upto
        if frontier <= upto:  # nothing new below the frontier since the last commit
            return
        manifest.sync()
        journal.append({"t": "commit", "state": st.id, "pass": plan.number, "upto": frontier,
                        "time": round(time.time(), 6)})  # wall clock, for audits and tests
        commits, upto = commits + 1, frontier

    conns, flight, req_size = shape(src, connections, in_flight, request_size)
    fresh = plan.number == 0 and not plan.resumed and plan.fallback is None
    ranges = None if plan.ranges is None and plan.start == 0 else todo
    force = plan.force
    try:
        result = await engine.run(src, dst, manifest, kernels, connections=conns,
                                  in_flight=flight, request_size=req_size,
                                  target_zero=fresh and dst.reads_zero,
                                  on_progress=on_progress, retries=retries, ranges=ranges,
                                  compare=plan.compare, force=force, commit=commit,
                                  commit_bytes=commit_bytes, commit_seconds=commit_seconds)
    finally:
        report.commits = commits
    await to_the_end(manifest.sync)
    s = result.stats
    report.bytes_copied, report.bytes_zeroed = s.bytes_copied, s.bytes_zeroed
    report.bytes_skipped, report.bytes_unchanged = s.bytes_skipped, s.bytes_unchanged
    report.bytes_read, report.retries, report.reconnects = s.bytes_read, s.retries, s.reconnects
    report.connections = result.connections
    await to_the_end(journal.append, {
        "t": "end", "state": st.id, "pass": plan.number, "checkpoint": checkpoint,
        "digest": manifest.digest_string(), "bytes": delta, "final": final})
    report.commits = commits + 1


def _begin_record(st: State, journal: Journal, plan: PassPlan, checkpoint: str | None,
                  size: int) -> tuple[dict[str, Any], list[tuple[int, int]], int]:
    """The pass's begin record, its planned ranges file written first (R5): (the record, the
    ranges still to copy from the plan's start, their bytes)."""
    begin: dict[str, Any] = {"t": "begin", "state": st.id, "pass": plan.number,
                             "checkpoint": checkpoint, "change_source": plan.change_source,
                             "compare": plan.compare, "size": size}
    if plan.carries is not None:
        begin["carries"] = plan.carries
    if plan.audit is not None or plan.suspects:
        begin["audit"] = {**(plan.audit or {"sampled": 0, "mismatched": 0, "seconds": 0.0})}
        if plan.suspects:
            begin["audit"]["suspects"] = plan.suspects
    if plan.ranges is None:
        begin["ranges"] = "all"
    else:
        name = f"pass-{plan.number}-{len(journal.records) + 1}.ranges"  # one per begin record
        check = write_ranges(os.path.join(st.path, name), plan.ranges)
        begin["ranges"] = {"file": name, "count": len(plan.ranges), "check": check}
    todo = clip_runs(plan.ranges if plan.ranges is not None else [(0, size)], plan.start, size)
    delta = runs_bytes(todo)
    begin["start"] = plan.start
    begin["bytes"] = delta
    return begin, todo, delta
