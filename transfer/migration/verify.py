"""Reading a disk back and hashing it: the read-back of a target against the digests taken
while copying, and the scan that hashes a whole disk (checksum, --verify=source). The copy
engine does the reading, into null: (transfer.pipeline).

The read-back lives here, above the pipeline, not in integrity/ (the manifest's package) as
issue 13 proposed: it drives the copy engine, which itself stands on integrity's manifest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Callable

from .. import _native
from ..disks import Disk, open_disk
from ..integrity import POISON, Manifest
from ..pipeline import engine
from ..pipeline.retry import RETRIES
from ..observe.events import Progress
from ..pipeline.shape import shape
from ..state.records import State, pending_ranges
from ..tls import Tls
from ..tracking.areas import runs_bytes

VERIFY_OFFSETS = 1000  # differing offsets kept for a report (the count is always exact)


async def scan(disk: Disk, manifest: Manifest, kernels: _native.Kernels, *, size: int,
                connections: int | None, in_flight: int | None, request_size: int | None,
                on_progress: Callable[[Progress], None] | None,
                known_zero: Manifest | None = None,
                retries: int = RETRIES,
                ranges: list[tuple[int, int]] | None = None) -> engine.Result:
    """Read and hash the first size bytes of disk into manifest (the copy engine, to null:);
    with ranges, only those (sorted, block-aligned) ranges."""
    conns, flight, req_size = shape(disk, connections, in_flight, request_size)
    sink = open_disk("null:", "target")
    sink.create(size)
    return await engine.run(disk, sink, manifest, kernels, connections=conns, in_flight=flight,
                            request_size=req_size, target_zero=True, on_progress=on_progress,
                            size=size, known_zero=known_zero, retries=retries, ranges=ranges)


async def read_back(target: str, manifest: Manifest, kernels: _native.Kernels, *,
                     on_progress: Callable[[Progress], None] | None,
                     limit: int = VERIFY_OFFSETS,
                     tls: Tls | None = None,
                     ranges: list[tuple[int, int]] | None = None) -> tuple[int, list[int], int]:
    """Read target back (O_DIRECT where local) and compare with manifest: (count, offsets, bytes).

    Blocks the copy wrote as data are read back; blocks it zeroed or skipped (zero
    digest) are not read again, so the read-back costs at most one read of the
    allocated data, block devices included. `transfer verify` reads everything.
    ranges: read back only these (sorted, block-aligned) ranges; the rest is not compared.
    """
    if ranges is not None and not ranges:
        return 0, [], 0
    disk = await asyncio.to_thread(open_disk, target, "source", direct=True, kernels=kernels,
                                   tls=tls)
    back = Manifest(manifest.size)
    try:
        if ranges is not None:  # blocks outside ranges are not read: they compare equal
            back.view[:] = manifest.view
        result = await scan(disk, back, kernels, size=manifest.size, connections=None,
                             in_flight=None, request_size=None, on_progress=on_progress,
                             known_zero=manifest, ranges=ranges)
        count, offsets = manifest.differences(back, limit)
        return count, offsets, result.stats.bytes_read
    finally:
        back.close()
        disk.close()


async def verify_pending(target: str, manifest: Manifest, st: State, kernels: _native.Kernels, *,
                  on_progress: Callable[[Progress], None] | None,
                  tls: Tls | None) -> tuple[int, list[int], dict[str, Any]]:
    """Read back what is pending (pending_ranges) and compare it with the manifest; the blocks that
    differ get the POISON digest (msynced), so that the next pass writes them again. Returns
    (count, the first offsets, the report's read_back record)."""
    ranges = pending_ranges(st, manifest.size)
    began = time.monotonic()
    phase = None if on_progress is None else (
        lambda p: on_progress(dataclasses.replace(p, phase="read-back")))
    count, offsets, read = await read_back(target, manifest, kernels, on_progress=phase,
                                            limit=manifest.blocks, tls=tls, ranges=ranges)
    if count:
        for off in offsets:
            manifest.slice(off, 1)[:] = POISON
        manifest.sync()
    return count, offsets[:VERIFY_OFFSETS], {
        "bytes": read, "planned": runs_bytes(ranges), "mismatched": count,
        "seconds": round(time.monotonic() - began, 6)}
