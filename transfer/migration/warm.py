"""transfer sync: one warm-migration pass, with state that survives a killed process.

An orchestrator runs one pass per checkpoint (RELIABILITY.md section (c)):

    pass 0      everything (as copy does), recording the per-block manifest
    pass k>0    only the ranges the change source names: a qemu dirty bitmap,
                a VMware changed-areas file, or --compare (read all, write
                only blocks whose digest differs from the manifest)
    --final     the last delta, then the target read back against the
                manifest where it was not yet (and with verify_source, the
                whole source hashed again); the state is then complete and
                takes no more passes

A run: bind (the state to its source and target disks, transfer.migration.identity), plan
(which pass, which ranges: transfer.migration.passplan, with the tracker audit), run (the
pass's begin record, the copy with its commits, its end record), finalize (the read-back and,
for --final, the completion).

Every pass ends by reading back (O_DIRECT where local) what the passes since
the last read-back planned, and comparing it with the manifest (read_back=
"pass", the default; "final" leaves it all to --final). So a warm migration's
cutover reads back only its final delta, plus whatever a crash or a failed
read-back left unverified: the guarantee of --final is unchanged (every data
block of the target was read back after its last write, and matched), and the
downtime no longer grows with the disk. A block that does not match gets the
POISON digest in the manifest, and every later pass plans it again (a
--final cannot complete while one is left).

The state directory holds three kinds of file: the journal (transfer.state.records says what
its records mean), the manifest (the per-block digests, transfer.integrity, memory-mapped),
and pass-K-S.ranges, pass K's planned ranges for the begin record S
(transfer.state.ranges_file), kept: the audit trail of what each pass was told had changed.

Order of durability (R5): the ranges file, then the begin record, then target
writes; at each commit the target is flushed, then the manifest msynced, then
the commit record appended. A crash leaves the pass's planned ranges above
the last commit "tainted": the target may hold anything there. Running the
same command again copies the tainted ranges (and, for a pass of the same
checkpoint, what its change source names that was not committed). A new
checkpoint on an unfinished pass copies the tainted ranges together with its
own (R3: B_k and B_k+1). In a --compare pass, tainted blocks are written even
when their digest matches: the manifest there may be ahead of the target.

Fail closed (R2): a missing or unanswered dirty bitmap becomes a compare pass,
a source whose size changed a full pass, and the report says so in words.
Before a delta pass begins, the tracker audit (transfer.tracking.audit, P6)
reads a sample of the blocks its change source calls unchanged: one differing
from the manifest makes the pass a compare pass; with --source-id, most
differing refuse it (another disk).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from .. import _native
from ..aio import to_the_end
from ..disks import Disk, open_disk
from ..disks.lock import TargetLock, lock_target
from ..errors import BadInput, TargetRefused, VerifyFailed
from ..integrity import BLOCK, Manifest
from ..pipeline.retry import RETRIES
from ..observe.events import Progress
from ..reports import SyncReport
from ..state.journal import Journal, JournalError
from ..state.records import HASH, VERSION, State, load_state
from ..tls import Tls
from ..tracking.areas import runs_bytes
from ..tracking.bitmap import context_name
from .cold import check_target
from .defaults import AUDIT_BLOCKS, COMMIT_BYTES, COMMIT_SECONDS, MAX_AUDIT_BLOCKS
from .identity import check_source, differences, source_identity
from .passplan import PassPlan, audit_pass, check_suspects, choose, rewrite
from .passrun import run_pass
from .verify import VERIFY_OFFSETS, scan, verify_pending

_CHECKPOINT = re.compile(r"^[\x20-\x7e]{1,256}$")


@dataclass
class SyncOptions:
    """sync_async's keyword options (see its docstring), checked once."""

    dirty_bitmap: str | None = None
    changed_areas: str | None = None
    compare: bool = False
    checkpoint: str | None = None
    final: bool = False
    verify_source: bool = False
    force: bool = False
    source_moved: bool = False
    source_id: str | None = None
    audit_blocks: int = AUDIT_BLOCKS
    audit_live: bool = False
    connections: int | None = None
    in_flight: int | None = None
    request_size: int | None = None
    timeout: float | None = None
    retries: int = RETRIES
    on_progress: Callable[[Progress], None] | None = None
    native: str | None = None
    commit_bytes: int = COMMIT_BYTES
    commit_seconds: float = COMMIT_SECONDS
    tls: Tls | None = None
    read_back: str = "pass"

    def check(self) -> None:
        sources = (self.dirty_bitmap, self.changed_areas, self.compare)
        if sum(x is not None and x is not False for x in sources) > 1:
            raise BadInput("give one change source: --dirty-bitmap, --changed-areas or --compare")
        if self.verify_source and not self.final:
            raise BadInput("--verify=source belongs to the --final pass")
        if self.read_back not in ("pass", "final"):
            raise BadInput(f"--read-back must be pass or final, not {self.read_back!r}")
        if self.checkpoint is not None and not _CHECKPOINT.match(self.checkpoint):
            raise BadInput("--checkpoint must be 1-256 printable ASCII characters")
        if self.timeout is not None and self.timeout <= 0:
            raise BadInput(f"timeout must be positive, not {self.timeout}")
        if self.retries < 0:
            raise BadInput(f"retries must be 0 or more, not {self.retries}")
        if self.source_id is not None and not _CHECKPOINT.match(self.source_id):
            raise BadInput("--source-id must be 1-256 printable ASCII characters")
        blocks = self.audit_blocks
        if (isinstance(blocks, bool) or not isinstance(blocks, int)
                or not 0 <= blocks <= MAX_AUDIT_BLOCKS):
            raise BadInput(f"--audit-blocks must be a whole number from 0 to "
                           f"{MAX_AUDIT_BLOCKS}, not {blocks!r}")


async def sync_async(source: str, target: str, *, state: str, **options: Any) -> SyncReport:
    """Run one warm-migration pass of source onto target, keeping state in the directory state.

    Options (SyncOptions): dirty_bitmap, changed_areas or compare (the change source),
    checkpoint, final, verify_source, force, source_moved, source_id, audit_blocks,
    audit_live, connections, in_flight, request_size, timeout, retries, on_progress, native,
    commit_bytes, commit_seconds, tls, read_back.

    Raises TransferError subclasses; an interrupted pass raises Interrupted
    after committing what it finished, and the same call later completes it.
    The state is bound to the source disk, not to its address: a new socket
    path, host or URL for the same disk is accepted (and recorded). source_id:
    the orchestrator's name for the disk (a VMware disk UUID, a qemu node
    name); once bound, another id (or none) is refused. Without one, the disk
    is an NBD export's name (and size), a local file's inode. source_moved:
    accept a source whose export name or inode differs, on the operator's word.
    audit_blocks: blocks a delta pass reads among those its change source calls
    unchanged, checked against the manifest before the pass begins; a mismatch
    makes it a compare pass, and with source_id, most samples differing refuses
    the pass (another disk). 0 disables the audit. audit_live: the source is
    live (a VM still writes it, recorded by the next checkpoint's tracker, as
    in a migration's precopy passes): a sampled block that differs is only a
    suspect, recorded in the begin record, and the next pass's change source
    must name it, or that pass becomes a compare pass. read_back: "pass" (each pass
    reads back what the passes since the last read-back wrote, after its copy, and marks
    a block that differs for the next pass, which writes it again) or "final" (only the
    --final pass reads back, all that was written since the last read-back).
    """
    o = SyncOptions(**options)
    o.check()
    run = _Run(source, target, state, o)
    try:
        return await run.go()
    finally:
        run.close()


def sync(source: str, target: str, **options: Any) -> SyncReport:
    """Blocking form of sync_async() for callers without an event loop."""
    return asyncio.run(sync_async(source, target, **options))


class _Run:
    """One sync_async call: the state, the disks and the manifest it holds open."""

    def __init__(self, source: str, target: str, state: str, o: SyncOptions) -> None:
        self.source, self.target, self.state, self.o = source, target, state, o
        self.kernels = _native.kernels(o.native)
        self.opening = partial(open_disk, timeout=o.timeout, kernels=self.kernels, tls=o.tls)
        self.notes: list[str] = []
        self.started = time.monotonic()
        self.journal: Journal | None = None
        self.src: Disk | None = None
        self.dst: Disk | None = None
        self.manifest: Manifest | None = None
        self.lock: TargetLock | None = None

    def close(self) -> None:
        for thing in (self.manifest, self.dst, self.src, self.lock, self.journal):
            if thing is not None:
                thing.close()

    async def go(self) -> SyncReport:
        st = await to_the_end(self._open_state)  # (files, fsyncs: off the loop)
        await self._open_disks()
        size_changed, ident = await to_the_end(self._bind, st)
        plan, rewritten = await self._plan(st, size_changed)
        if ident is not None:  # a new address, or an id given: bind the new identity (after
            bind = {**st.bind, "source": ident}  # the audit: a refused pass writes nothing,
            await to_the_end(self.journal.append, bind)  # to the state either)
            st.bind = bind
        report = self._report(plan, rewritten)
        if not plan.skip:
            o = self.o
            await run_pass(st, self.journal, self.src, self.dst, self.manifest, plan, report,
                           self.kernels, checkpoint=o.checkpoint, final=o.final,
                           connections=o.connections, in_flight=o.in_flight,
                           request_size=o.request_size, retries=o.retries,
                           on_progress=o.on_progress, commit_bytes=o.commit_bytes,
                           commit_seconds=o.commit_seconds)
        report.digest = self.manifest.digest_string()
        if self.o.final or self.o.read_back == "pass":
            st = await self._read_back(report)
        if self.o.final:
            await self._complete(st, report)
        report.seconds = round(time.monotonic() - self.started, 6)
        return report

    def _open_state(self) -> State:
        try:
            os.makedirs(self.state, mode=0o700, exist_ok=True)
        except OSError as e:
            raise BadInput(f"cannot create the state directory: {os.strerror(e.errno)}",
                           disk=self.state, kind="state") from None
        self.journal = Journal.open(os.path.join(self.state, "journal"))
        st = load_state(self.state, self.journal)
        if st.complete:
            raise BadInput("this state is complete: its final pass ran; a new migration needs "
                           "an empty state directory", disk=self.state, kind="state")
        return st

    async def _open_disks(self) -> None:
        bitmap = self.o.dirty_bitmap
        contexts = (context_name(bitmap),) if bitmap is not None else ()
        self.src = await asyncio.to_thread(self.opening, self.source, "source",
                                           contexts=contexts)
        self.lock = lock_target(self.target)  # an NBD target: one engine per host (P4)
        self.dst = await asyncio.to_thread(self.opening, self.target, "target")
        if self.dst.kind == "null":
            raise BadInput("null: keeps nothing for a later pass", disk=self.dst.display,
                           kind="target")

    def _bind(self, st: State) -> tuple[str | None, dict[str, Any] | None]:
        """Check (or make) the state's binding to the disks and open (or create) the manifest:
        (why the size changed or None, the source identity to bind anew or None)."""
        src, dst, o = self.src, self.dst, self.o
        size_changed, moved = None, False
        ident = source_identity(src, o.source_id)
        if st.bind is not None:
            size_changed, moved = self._check_bound(st, ident)
        else:
            check_target(src, dst, force=o.force)
            if dst.size is None:
                dst.create(src.size)
        mpath = os.path.join(self.state, "manifest")
        if st.bind is None or size_changed:
            self.manifest = Manifest.create(mpath, src.size)
            self.manifest.save()
            bind = {"t": "bind", "state": st.id or uuid.uuid4().hex, "version": VERSION,
                    "block": BLOCK, "hash": HASH, "size": src.size,
                    "source": ident, "target": dst.identity()}
            self.journal.append(bind)
            st.id, st.bind = bind["state"], bind
        else:
            self.manifest = Manifest.open(mpath, writable=True)
            if self.manifest.size != src.size:
                raise JournalError(f"the manifest is for a {self.manifest.size}-byte disk, "
                                   f"the state for {src.size} bytes", disk=mpath)
        return size_changed, (ident if moved and not size_changed else None)

    def _check_bound(self, st: State, ident: dict[str, Any]) -> tuple[str | None, bool]:
        """The bound state against the disks opened now: (why the size changed, moved)."""
        src, dst, o = self.src, self.dst, self.o
        bound_src, bound_dst = st.bind["source"], st.bind["target"]
        check_source(bound_src, ident, o.source_id, o.source_moved, src.display, self.notes)
        moved = bool(differences(bound_src, ident))  # the size aside (R2: a full pass)
        diff = differences(bound_dst, dst.identity())
        if diff:  # its size may grow with the source's (a PVC resized); nothing else may
            raise TargetRefused("this state belongs to another target: " + "; ".join(diff),
                                disk=dst.display)
        size_changed = None
        if src.size != st.bind["size"]:
            size_changed = (f"the source's size changed from {st.bind['size']} to "
                            f"{src.size} bytes")
        elif st.resized is not None:  # a run died after rebinding, before its pass began
            size_changed = (f"the source's size changed from {st.resized[0]} to "
                            f"{st.resized[1]} bytes")
        if dst.size < src.size:
            raise TargetRefused(f"the target ({dst.size} bytes) is smaller than the source "
                                f"({src.size} bytes)", disk=dst.display)
        return size_changed, moved

    async def _plan(self, st: State, size_changed: str | None) -> tuple[PassPlan, int]:
        """The pass to run and the bytes it writes again for a failed read-back."""
        o = self.o
        plan = await to_the_end(  # a changed-areas file, or a bitmap's block status
            partial(choose, st, self.src, checkpoint=o.checkpoint, dirty_bitmap=o.dirty_bitmap,
                    changed_areas=o.changed_areas, size_changed=size_changed))
        if not plan.skip:
            plan = check_suspects(st, plan)
        rewritten = 0
        if not size_changed:  # (a new size makes a new manifest and a full pass)
            before = runs_bytes(plan.ranges) if plan.ranges is not None else 0
            plan = rewrite(plan, self.manifest)
            rewritten = (runs_bytes(plan.ranges) - before) if plan.ranges is not None else 0
        if o.audit_blocks and not plan.skip and not plan.compare and plan.ranges is not None:
            plan = await audit_pass(self.src, self.manifest, plan, o.audit_blocks, o.source_id,
                                    live=o.audit_live)
        return plan, rewritten

    def _report(self, plan: PassPlan, rewritten: int) -> SyncReport:
        o, src = self.o, self.src
        report = SyncReport(
            source=src.display, target=self.dst.display, state=self.state, pass_=plan.number,
            checkpoint=o.checkpoint, change_source=plan.change_source, fallback=plan.fallback,
            resumed=plan.resumed, delta_bytes=0, bytes_copied=0, bytes_zeroed=0,
            bytes_skipped=0, bytes_unchanged=0, bytes_read=0, seconds=0.0, digest="",
            size=src.size, commits=0, final=o.final, verify_source=o.verify_source,
            native=self.kernels.describe(), notes=self.notes, audit=plan.audit)
        if rewritten:
            report.rewritten = rewritten
            self.notes.append(f"{rewritten} bytes that a read-back found wrong on the target "
                              "are written again")
        return report

    async def _read_back(self, report: SyncReport) -> State:
        """Read back what is pending, journal that it was; a difference is noted (a precopy
        pass: the next pass writes it again) or fails --final. The state as journalled."""
        if self.dst.kind == "nbd":  # a single-connection server would make a second one wait
            self.dst.close()
        st = await to_the_end(load_state, self.state, self.journal)  # (its end too)
        count, offsets = 0, []
        if st.pending:
            count, offsets, report.read_back = await verify_pending(
                self.target, self.manifest, st, self.kernels, on_progress=self.o.on_progress,
                tls=self.o.tls)
            await to_the_end(self.journal.append, {
                "t": "verified", "state": st.id, "pass": st.last.number,
                "bytes": report.read_back["bytes"], "mismatched": count})
        if count:
            found = (f"{count} blocks of {BLOCK} bytes read back from the target differ "
                     "from the manifest (the next pass writes them again)")
            if self.o.final:
                raise VerifyFailed(found + "; the first", disk=self.dst.display,
                                   offset=offsets[0])
            self.notes.append(f"{found}; the first at offset {offsets[0]}")
        return st

    async def _complete(self, st: State, report: SyncReport) -> None:
        """--final: with verify_source, hash the whole source again; then complete the state."""
        if self.o.verify_source:
            await self._verify_source()
        report.verified = True
        await to_the_end(self.journal.append,
                                {"t": "complete", "state": st.id, "digest": report.digest})
        report.complete = True

    async def _verify_source(self) -> None:
        self.src.close()
        again = await asyncio.to_thread(self.opening, self.source, "source", direct=True)
        fresh = Manifest(self.manifest.size)
        try:
            await scan(again, fresh, self.kernels, size=self.manifest.size, connections=None,
                       in_flight=None, request_size=None, on_progress=self.o.on_progress)
            count, offsets = self.manifest.differences(fresh, VERIFY_OFFSETS)
        finally:
            fresh.close()
            again.close()
        if count:
            raise VerifyFailed(f"{count} blocks of {BLOCK} bytes of the source differ from what "
                               "was copied (a change tracker missed writes; run a --compare "
                               "pass); the first", disk=self.src.display, offset=offsets[0])
