"""The tracker audit: does the change source tell the truth about what did NOT change?

A delta pass trusts its change source (a dirty bitmap, a changed-areas file)
for every block it does not copy. A tracker that misses writes, or another
disk of the same size served where the source was, would leave a wrong
target with nothing noticing before `sync --final --verify=source`
(RELIABILITY.md P6). So before each delta pass begins, a sample of the
blocks the change source calls unchanged is read from the source and
hashed (xxh3_128 per 64 KiB block, the manifest's digest) and compared with
the manifest: they must be what the last passes copied.

The sample: blocks outside the pass's planned ranges (which hold the blocks
an interrupted pass left uncommitted, so every candidate's digest in the
manifest is committed), half of them spread evenly over the disk (at fixed
offsets, each moved to the next unchanged block: the same blocks pass after
pass whatever the delta, so a source with a cache has them there), the other
half drawn at random (a fresh seed each pass, so a tracker cannot keep
missing the same blocks unseen). Blocks the manifest marks for rewriting (a
failed read-back's poison digest) are left out. Zero blocks are sampled like
any other (their digest is a zero block's).

What it costs is the random half's reads, cold on most storage: 32 reads of
64 KiB by default, a few milliseconds.

Reads go through one Conn of the source on the calling thread, a batch of
requests in flight at a time: for an NBD source the handle no copy worker
holds yet (the one block status and signature checks use), so a
single-connection server (qemu-nbd) still serves the copy afterwards.
"""

from __future__ import annotations

import bisect
import mmap
import random
import time
from dataclasses import dataclass

import xxhash

from ..disks import Disk
from ..disks.base import Conn
from ..errors import SourceError
from ..integrity import BLOCK, Manifest

BATCH = 8  # reads in flight at once: 512 KiB of buffers (more is no faster, measured)


@dataclass
class AuditResult:
    sampled: int
    mismatched: int
    seconds: float
    offsets: list[int] | None = None  # the mismatching blocks, in disk order

    @property
    def first(self) -> int | None:
        return self.offsets[0] if self.offsets else None

    def record(self) -> dict:
        return {"sampled": self.sampled, "mismatched": self.mismatched,
                "seconds": round(self.seconds, 6)}


def choose(unchanged: list[tuple[int, int]], size: int, count: int, *,
           rng: random.Random | None = None) -> list[int]:
    """Offsets of up to count blocks inside the runs unchanged (sorted, disjoint, block-aligned
    starts, ends block-aligned or size): half spread evenly over the disk, each at the first
    unchanged block from its place on (the last one when none follows), the rest at random;
    sorted, distinct."""
    starts, ends, before = [], [], [0]
    for s, e in unchanged:
        e = min(e, size)
        first, last = s // BLOCK, (e + BLOCK - 1) // BLOCK
        if last > first:
            starts.append(first)
            ends.append(last)
            before.append(before[-1] + last - first)
    total = before[-1]
    n = min(count, total)
    if n <= 0:
        return []

    def block(i: int) -> int:  # the i-th candidate block, counting in disk order
        r = bisect.bisect_right(before, i) - 1
        return starts[r] + i - before[r]

    if n == total:
        picked = set(range(total))
    else:
        even, blocks = (n + 1) // 2, (size + BLOCK - 1) // BLOCK
        picked = set()
        for k in range(even):
            place = int((k + 0.5) * blocks / even)
            r = bisect.bisect_right(ends, place)  # the first run ending after place
            picked.add(total - 1 if r == len(ends) else before[r] + max(place - starts[r], 0))
        rng = rng or random.Random()
        while len(picked) < n:
            picked.add(rng.randrange(total))
    return [block(i) * BLOCK for i in sorted(picked)]


def _sample_conn(disk: Disk) -> tuple[Conn, bool]:
    """A Conn to read the sample with, and whether to close it after.

    An NBD source lends the handle it opened first and keeps it as its spare: copy workers
    take it later (NbdDisk.connect), and a server allowing one connection has no other.
    """
    if disk.kind == "nbd":
        conn = disk.spare_conn()  # type: ignore[attr-defined]
        if conn is None:
            raise SourceError("no idle connection left to read the audit sample",
                              disk=disk.display)
        return conn, False
    conn = disk.connect()
    if conn is None:
        raise SourceError("no connection to read the audit sample", disk=disk.display)
    return conn, True


def audit(disk: Disk, manifest: Manifest, unchanged: list[tuple[int, int]], count: int, *,
          skip_digest: bytes | None = None, rng: random.Random | None = None) -> AuditResult:
    """Read a sample of the blocks in unchanged from disk and count those whose digest differs
    from the manifest's. Blocks whose manifest digest is skip_digest are not sampled."""
    started = time.monotonic()
    offsets = choose(unchanged, manifest.size, count, rng=rng)
    if skip_digest is not None:
        offsets = [o for o in offsets if bytes(manifest.slice(o, 1)) != skip_digest]
    mismatched: list[int] = []
    if offsets:
        conn, owned = _sample_conn(disk)
        buf = mmap.mmap(-1, BATCH * BLOCK)  # page-aligned: good for O_DIRECT reads too
        view = memoryview(buf)
        try:
            for b in range(0, len(offsets), BATCH):
                batch = offsets[b : b + BATCH]
                for i, off in enumerate(batch):
                    length = min(BLOCK, manifest.size - off)
                    conn.start_read(view[i * BLOCK : i * BLOCK + length], off, i)
                pending = len(batch)
                while pending:
                    done = conn.reap()
                    if not done:
                        raise SourceError("the audit's reads did not complete", disk=disk.display)
                    for i, err in done:
                        off = batch[i]
                        if err is not None:
                            raise SourceError(f"audit read failed: {err}", disk=disk.display,
                                              offset=off, length=min(BLOCK, manifest.size - off))
                        pending -= 1
                for i, off in enumerate(batch):
                    length = min(BLOCK, manifest.size - off)
                    got = xxhash.xxh3_128(view[i * BLOCK : i * BLOCK + length]).digest()
                    if got != bytes(manifest.slice(off, 1)):
                        mismatched.append(off)
        finally:
            view.release()
            buf.close()
            if owned:
                conn.close()
    return AuditResult(len(offsets), len(mismatched), time.monotonic() - started, mismatched)
