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

Every pass ends by reading back (O_DIRECT where local) what the passes since
the last read-back planned, and comparing it with the manifest (read_back=
"pass", the default; "final" leaves it all to --final). So a warm migration's
cutover reads back only its final delta, plus whatever a crash or a failed
read-back left unverified: the guarantee of --final is unchanged (every data
block of the target was read back after its last write, and matched), and the
downtime no longer grows with the disk. A block that does not match gets the
POISON digest in the manifest, and every later pass plans it again (a
--final cannot complete while one is left).

The state directory holds three kinds of file:

    journal         transfer.state.journal records, each carrying the state's id:
                      bind    source and target identities, size, block, hash (again
                              when the source is served at a new address: recorded, not
                              refused; the source is its --source-id, or its export name,
                              or a local file's inode; version 1, the fields added since
                              optional)
                      begin   pass, checkpoint, change source, planned ranges, audit
                      commit  pass, upto: every planned byte below is durable
                      end     pass, checkpoint, digest, delta bytes
                      verified pass, bytes, mismatched: every begin record before
                              it was read back (its mismatches POISONed first)
                      complete
    manifest        the per-block digests (transfer.integrity), memory-mapped
    pass-K-S.ranges pass K's planned ranges, for the begin record S (transfer.state.ranges_file);
                    kept: the audit trail of what each pass was told had changed

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
import bisect
import dataclasses
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from .. import _native
from ..api import VERIFY_OFFSETS, _check_target, _read_back, _scan, _shape
from ..disks import Disk, open_disk
from ..disks.lock import TargetLock, lock_target
from ..tls import Tls
from ..errors import BadInput, TargetRefused, VerifyFailed
from ..integrity import BLOCK, Manifest
from ..pipeline import copy as engine
from ..pipeline.copy import Progress
from ..reports import SyncReport
from ..tracking.areas import (clip_runs, load_changed_areas, runs_bytes, subtract_runs,
                              union_runs)
from ..tracking.audit import audit as audit_sample
from ..tracking.bitmap import TrackingUnavailable, context_name, dirty_ranges
from .journal import Journal, JournalError
from .ranges_file import read_ranges, write_ranges

VERSION = 1
HASH = "xxh3-128"
POISON = b"\xff" * 16  # a manifest digest no block has (2^-128): "rewrite this block"
COMMIT_BYTES = 1 << 30  # commit at least every GiB copied...
COMMIT_SECONDS = 10.0  # ...or every 10 s: a kill re-copies at most this much
AUDIT_BLOCKS = 64  # unchanged blocks a delta pass reads to check its change source (P6)
MAX_AUDIT_BLOCKS = 1 << 20
MAX_SUSPECTS = 1 << 16  # blocks a live audit may leave for the next pass to explain
_CHECKPOINT = re.compile(r"^[\x20-\x7e]{1,256}$")


@dataclass
class PassState:
    number: int
    begin: dict[str, Any]
    ranges: Any | None  # (n, 2) planned ranges; None for the whole disk
    upto: int = 0  # last committed frontier (the begin record's start before any commit)
    plan_known: bool = True
    ended: dict[str, Any] | None = None


@dataclass
class State:
    """The journal, read and checked: every record of one state, in an order that makes sense."""

    path: str
    id: str | None = None
    bind: dict[str, Any] | None = None
    passes: list[PassState] = field(default_factory=list)
    complete: bool = False
    resized: tuple | None = None  # (old, new) size of a bind no pass has begun after
    pending: list[dict[str, Any]] = field(default_factory=list)  # begins not yet read back

    @property
    def last(self) -> PassState | None:
        return self.passes[-1] if self.passes else None


def _load(directory: str, journal: Journal) -> State:
    """Validate the journal's records (untrusted input, P5); JournalError names the first bad one."""
    st = State(directory)

    def bad(i: int, why: str) -> JournalError:
        return JournalError(f"record {i + 1} {why}; the state cannot be trusted (start again "
                            "with an empty state directory)", disk=journal.path)

    for i, rec in enumerate(journal.records):
        kind = rec.get("t")
        if i == 0:
            if kind != "bind" or not isinstance(rec.get("state"), str):
                raise bad(i, "is not the state's first (bind) record")
            st.id = rec["state"]
        elif rec.get("state") != st.id:
            raise bad(i, f"belongs to another state ({rec.get('state')!r}, not {st.id!r})")
        if st.complete:
            raise bad(i, "follows the record that completed the state")
        if kind == "bind":
            if st.bind is not None and rec.get("size") != st.bind["size"]:
                st.resized = (st.bind["size"], rec.get("size"))  # until a pass begins after it
            for key, typ in (("source", dict), ("target", dict), ("size", int), ("block", int),
                             ("hash", str), ("version", int)):
                if not isinstance(rec.get(key), typ):
                    raise bad(i, f"(bind) has no valid {key!r}")
            if rec["version"] != VERSION or rec["block"] != BLOCK or rec["hash"] != HASH:
                raise bad(i, f"(bind) is for version {rec['version']}, block {rec['block']}, "
                             f"hash {rec['hash']}; this engine has {VERSION}, {BLOCK}, {HASH}")
            if st.bind is not None and rec["state"] != st.id:
                raise bad(i, "(bind) names another state")
            st.bind = rec  # a later one: the source moved, or its size changed (maybe mid-pass)
        elif kind == "begin":
            n = rec.get("pass")
            if not isinstance(n, int) or isinstance(n, bool):
                raise bad(i, "(begin) has no pass number")
            last = st.last
            want = {0} if last is None else (
                {last.number + 1} if last.ended else {last.number, last.number + 1})
            if n not in want:
                raise bad(i, f"(begin) starts pass {n} where {sorted(want)} was expected")
            if st.bind and rec.get("size") != st.bind["size"]:
                raise bad(i, "(begin) is for another disk size")
            plan = rec.get("ranges")
            if not (plan == "all" or isinstance(plan, dict)
                    and isinstance(plan.get("count"), int) and isinstance(plan.get("check"), str)
                    and isinstance(plan.get("file"), str)
                    and re.fullmatch(r"pass-\d+-\d+\.ranges", plan["file"])):
                raise bad(i, "(begin) has no valid planned ranges")
            start = rec.get("start", 0)
            if (not _offset(start, rec.get("size")) or not isinstance(rec.get("change_source"), str)
                    or not isinstance(rec.get("compare"), bool)):
                raise bad(i, f"(begin) has an invalid start {start!r}, change source or mode")
            audit = rec.get("audit")
            suspects = audit.get("suspects", []) if isinstance(audit, dict) else None
            if audit is not None and not (
                    isinstance(suspects, list) and len(suspects) <= MAX_SUSPECTS
                    and all(_offset(o, rec["size"]) and o < rec["size"] for o in suspects)):
                raise bad(i, "(begin) has an invalid audit record")
            st.resized = None
            st.passes.append(PassState(n, rec, None, upto=start))
            st.pending.append(rec)
        elif kind == "commit":
            last = st.last
            upto = rec.get("upto")
            if last is None or last.ended or rec.get("pass") != last.number:
                raise bad(i, "(commit) is for no pass in progress")
            if not _offset(upto, last.begin["size"]) or not last.upto < upto:
                raise bad(i, f"(commit) up to {upto!r} does not advance within the disk")
            last.upto = upto
        elif kind == "end":
            last = st.last
            if last is None or last.ended or rec.get("pass") != last.number:
                raise bad(i, "(end) is for no pass in progress")
            last.ended = rec
        elif kind == "verified":
            last = st.last
            if last is None or not last.ended or rec.get("pass") != last.number:
                raise bad(i, "(verified) follows no finished pass")
            if type(rec.get("mismatched")) is not int or rec["mismatched"] < 0:
                raise bad(i, "(verified) has no valid count of mismatched blocks")
            st.pending = []
        elif kind == "complete":
            if st.last is None or not st.last.ended:
                raise bad(i, "(complete) follows no finished pass")
            st.complete = True
        else:
            raise bad(i, f"has an unknown type {kind!r}")
    last = st.last
    if last is not None and last.begin["ranges"] != "all":
        plan = last.begin["ranges"]  # only the last pass's plan is ever needed
        try:
            last.ranges = read_ranges(os.path.join(directory, plan["file"]),
                                      last.begin["size"], plan["check"], plan["count"])
        except JournalError:
            if not last.ended:  # an unfinished pass cannot be resumed without its plan
                raise
            last.plan_known = False  # an ended one: a rerun of its checkpoint copies more
    return st


def _offset(value: Any, size: Any) -> bool:
    """A journal offset: a whole number, block-aligned or the disk's end, inside the disk."""
    return (type(value) is int and type(size) is int and 0 <= value <= size
            and (value % BLOCK == 0 or value == size))


def _differences(bound: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a bound identity and the disk's now, the size aside (a source's
    size change makes a full pass, R2; a target may grow with its source)."""
    return [f"{k} {bound.get(k)!r} is now {now.get(k)!r}"
            for k in sorted(set(bound) | set(now)) if k != "size" and bound.get(k) != now.get(k)]


def _export_name(uri: str) -> str:
    """The export name an NBD URI asks for: its path without the leading slash."""
    import urllib.parse

    return urllib.parse.unquote(urllib.parse.urlsplit(uri).path[1:])


def _source_identity(src: Disk, source_id: str | None) -> dict[str, Any]:
    """What the state binds the source to: the disk's identity fields, with its address
    (redacted) recorded beside them, and the orchestrator's --source-id when given."""
    ident = dict(src.identity())
    if ident.get("kind") == "nbd":
        ident["export"] = _export_name(ident.get("uri", ""))
    if source_id is not None:
        ident["id"] = source_id
    return ident


def _disk_key(ident: dict[str, Any]) -> dict[str, Any]:
    """Which disk an identity names, wherever it is served: an NBD export's name; a file's
    device and inode (it may be renamed); a block device's number, or a loop device's backing
    file. The address (uri, path) is not part of it: orchestrators serve every stage from a
    new socket or URL. Bind records before --source-id have no "export": the uri's."""
    kind = ident.get("kind")
    if kind == "nbd":
        return {"kind": kind, "export": ident.get("export", _export_name(ident.get("uri", "")))}
    if kind == "file":
        return {"kind": kind, "dev": ident.get("dev"), "inode": ident.get("inode")}
    if kind == "block":
        if ident.get("loop_backing"):
            return {"kind": kind, "loop_backing": ident["loop_backing"]}
        return {"kind": kind, "rdev": ident.get("rdev")}
    return {k: v for k, v in ident.items() if k not in ("uri", "path", "size", "id")}


def _check_source(bound: dict[str, Any], now: dict[str, Any], source_id: str | None,
                  source_moved: bool, display: str, notes: list[str]) -> None:
    """Refuse a source that is not the bound disk (TargetRefused, exit 2); note what changed.

    With a bound --source-id, the id decides: the same id is the same disk wherever it is
    served, another id (or none) is refused. Without one, the disk key decides (_disk_key);
    --source-moved accepts a different key on the operator's word, as before. The tracker
    audit (transfer.tracking.audit) then checks the disk's content before any delta pass.
    """
    bound_id = bound.get("id")
    if bound_id is not None and source_id is None:
        raise TargetRefused(f"this state is bound to source id {bound_id!r}; pass --source-id "
                            f"{bound_id}", disk=display, kind="source")
    if bound_id is not None and bound_id != source_id:
        raise TargetRefused(f"this state belongs to source id {bound_id!r}, not {source_id!r}",
                            disk=display, kind="source")
    if bound_id is None:
        diff = _differences(_disk_key(bound), _disk_key(now))
        if diff and not source_moved:
            raise TargetRefused("this state belongs to another source: " + "; ".join(diff)
                                + " (if it is the same disk, pass --source-id or --source-moved)",
                                disk=display, kind="source")
        if diff:
            notes.append("source accepted on --source-moved: " + "; ".join(diff))
        elif source_moved:
            notes.append("--source-moved is no longer needed: the state is bound to the disk, "
                         "not to its address")
    moved = _differences({k: v for k, v in bound.items() if k != "id"},
                         {k: now.get(k) for k in bound if k != "id"})
    if moved:
        notes.append("source moved: " + "; ".join(moved))
    if bound_id is None and source_id is not None:
        notes.append(f"the state is now bound to source id {source_id!r}")


@dataclass
class _Pass:
    """What this run will copy and how."""

    number: int
    ranges: Any | None  # None: the whole disk
    compare: bool
    change_source: str
    fallback: str | None = None
    force: Any | None = None  # tainted ranges: written even when the digest matches
    resumed: bool = False
    carries: int | None = None
    skip: bool = False  # the checkpoint was committed already: nothing to copy (R4)
    start: int = 0  # planned bytes below this were committed by an earlier attempt
    tainted: Any | None = None  # what an interrupted pass left uncommitted (inside ranges)
    audit: dict[str, Any] | None = None  # the tracker audit's record, when one ran
    suspects: list[int] | None = None  # live audit: changed blocks the next tracker must name


async def sync_async(source: str, target: str, *, state: str,
                     dirty_bitmap: str | None = None, changed_areas: str | None = None,
                     compare: bool = False, checkpoint: str | None = None, final: bool = False,
                     verify_source: bool = False, force: bool = False, source_moved: bool = False,
                     source_id: str | None = None, audit_blocks: int = AUDIT_BLOCKS,
                     audit_live: bool = False,
                     connections: int | None = None, in_flight: int | None = None,
                     request_size: int | None = None, timeout: float | None = None,
                     retries: int = engine.RETRIES,
                     on_progress: Callable[[Progress], None] | None = None,
                     native: str | None = None, commit_bytes: int = COMMIT_BYTES,
                     commit_seconds: float = COMMIT_SECONDS, tls: Tls | None = None,
                     read_back: str = "pass") -> SyncReport:
    """Run one warm-migration pass of source onto target, keeping state in the directory state.

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
    if sum(x is not None and x is not False for x in (dirty_bitmap, changed_areas, compare)) > 1:
        raise BadInput("give one change source: --dirty-bitmap, --changed-areas or --compare")
    if verify_source and not final:
        raise BadInput("--verify=source belongs to the --final pass")
    if read_back not in ("pass", "final"):
        raise BadInput(f"--read-back must be pass or final, not {read_back!r}")
    if checkpoint is not None and not _CHECKPOINT.match(checkpoint):
        raise BadInput("--checkpoint must be 1-256 printable ASCII characters")
    if timeout is not None and timeout <= 0:
        raise BadInput(f"timeout must be positive, not {timeout}")
    if retries < 0:
        raise BadInput(f"retries must be 0 or more, not {retries}")
    if source_id is not None and not _CHECKPOINT.match(source_id):
        raise BadInput("--source-id must be 1-256 printable ASCII characters")
    if (isinstance(audit_blocks, bool) or not isinstance(audit_blocks, int)
            or not 0 <= audit_blocks <= MAX_AUDIT_BLOCKS):
        raise BadInput(f"--audit-blocks must be a whole number from 0 to {MAX_AUDIT_BLOCKS}, "
                       f"not {audit_blocks!r}")
    contexts = (context_name(dirty_bitmap),) if dirty_bitmap is not None else ()
    kernels = _native.kernels(native)
    notes: list[str] = []
    started = time.monotonic()
    try:
        os.makedirs(state, mode=0o700, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create the state directory: {os.strerror(e.errno)}",
                       disk=state, kind="state") from None
    journal = Journal.open(os.path.join(state, "journal"))
    src: Disk | None = None
    dst: Disk | None = None
    manifest: Manifest | None = None
    target_lock: TargetLock | None = None
    try:
        st = _load(state, journal)
        if st.complete:
            raise BadInput("this state is complete: its final pass ran; a new migration needs "
                           "an empty state directory", disk=state, kind="state")
        opening = partial(open_disk, timeout=timeout, kernels=kernels, tls=tls)
        src = await asyncio.to_thread(opening, source, "source", contexts=contexts)
        target_lock = lock_target(target)  # an NBD target: one engine per host (P4)
        dst = await asyncio.to_thread(opening, target, "target")
        if dst.kind == "null":
            raise BadInput("null: keeps nothing for a later pass", disk=dst.display,
                           kind="target")
        size_changed: str | None = None
        moved = False
        src_ident = _source_identity(src, source_id)
        if st.bind is not None:
            bound_src, bound_dst = st.bind["source"], st.bind["target"]
            _check_source(bound_src, src_ident, source_id, source_moved, src.display, notes)
            moved = bool(_differences(bound_src, src_ident))  # the size aside (R2: a full pass)
            diff = _differences(bound_dst, dst.identity())
            if diff:  # its size may grow with the source's (a PVC resized); nothing else may
                raise TargetRefused("this state belongs to another target: " + "; ".join(diff),
                                    disk=dst.display)
            if src.size != st.bind["size"]:
                size_changed = (f"the source's size changed from {st.bind['size']} to "
                                f"{src.size} bytes")
            elif st.resized is not None:  # a run died after rebinding, before its pass began
                size_changed = (f"the source's size changed from {st.resized[0]} to "
                                f"{st.resized[1]} bytes")
            if dst.size < src.size:
                raise TargetRefused(f"the target ({dst.size} bytes) is smaller than the source "
                                    f"({src.size} bytes)", disk=dst.display)
        else:
            _check_target(src, dst, force=force)
            if dst.size is None:
                dst.create(src.size)
        mpath = os.path.join(state, "manifest")
        if st.bind is None or size_changed:
            manifest = Manifest.create(mpath, src.size)
            manifest.save()
            bind = {"t": "bind", "state": st.id or uuid.uuid4().hex, "version": VERSION,
                    "block": BLOCK, "hash": HASH, "size": src.size,
                    "source": src_ident, "target": dst.identity()}
            journal.append(bind)
            st.id, st.bind = bind["state"], bind
        else:
            manifest = Manifest.open(mpath, writable=True)
            if manifest.size != src.size:
                raise JournalError(f"the manifest is for a {manifest.size}-byte disk, the "
                                   f"state for {src.size} bytes", disk=mpath)

        plan = _choose(st, src, checkpoint=checkpoint, dirty_bitmap=dirty_bitmap,
                       changed_areas=changed_areas, size_changed=size_changed)
        if not plan.skip:
            plan = _check_suspects(st, plan)
        rewritten = 0
        if not size_changed:  # (a new size makes a new manifest and a full pass)
            before = runs_bytes(plan.ranges) if plan.ranges is not None else 0
            plan = _rewrite(plan, manifest)
            rewritten = (runs_bytes(plan.ranges) - before) if plan.ranges is not None else 0
        if audit_blocks and not plan.skip and not plan.compare and plan.ranges is not None:
            plan = await _audit(src, manifest, plan, audit_blocks, source_id, live=audit_live)
        if moved and not size_changed:  # a new address, or an id given: bind the new identity
            bind = {**st.bind, "source": src_ident}  # (after the audit: a refused pass writes
            journal.append(bind)  # nothing, to the state either)
            st.bind = bind
        report = SyncReport(
            source=src.display, target=dst.display, state=state, pass_=plan.number,
            checkpoint=checkpoint, change_source=plan.change_source, fallback=plan.fallback,
            resumed=plan.resumed, delta_bytes=0, bytes_copied=0, bytes_zeroed=0,
            bytes_skipped=0, bytes_unchanged=0, bytes_read=0, seconds=0.0, digest="", size=src.size,
            commits=0, final=final, verify_source=verify_source, native=kernels.describe(),
            notes=notes, audit=plan.audit)
        if rewritten:
            report.rewritten = rewritten
            notes.append(f"{rewritten} bytes that a read-back found wrong on the target are "
                         "written again")
        if not plan.skip:
            await _copy(st, journal, src, dst, manifest, plan, report, kernels,
                        checkpoint=checkpoint, final=final, connections=connections,
                        in_flight=in_flight, request_size=request_size, retries=retries,
                        on_progress=on_progress, commit_bytes=commit_bytes,
                        commit_seconds=commit_seconds)
        report.digest = manifest.digest_string()
        if final or read_back == "pass":
            if dst.kind == "nbd":  # a single-connection server would make a second one wait
                dst.close()
            st = _load(state, journal)  # with this pass's begin and end
            count, offsets = 0, []
            if st.pending:
                count, offsets, report.read_back = await _verify(
                    target, manifest, st, kernels, on_progress=on_progress, tls=tls)
                journal.append({"t": "verified", "state": st.id, "pass": st.last.number,
                                "bytes": report.read_back["bytes"], "mismatched": count})
            if count:
                found = (f"{count} blocks of {BLOCK} bytes read back from the target differ "
                         "from the manifest (the next pass writes them again)")
                if final:
                    raise VerifyFailed(found + "; the first", disk=dst.display,
                                       offset=offsets[0])
                notes.append(f"{found}; the first at offset {offsets[0]}")
        if final:
            if verify_source:
                src.close()
                again = await asyncio.to_thread(opening, source, "source", direct=True)
                fresh = Manifest(manifest.size)
                try:
                    await _scan(again, fresh, kernels, size=manifest.size, connections=None,
                                in_flight=None, request_size=None, on_progress=on_progress)
                    count, offsets = manifest.differences(fresh, VERIFY_OFFSETS)
                finally:
                    fresh.close()
                    again.close()
                if count:
                    raise VerifyFailed(f"{count} blocks of {BLOCK} bytes of the source differ "
                                       "from what was copied (a change tracker missed writes; "
                                       "run a --compare pass); the first", disk=src.display,
                                       offset=offsets[0])
            report.verified = True
            journal.append({"t": "complete", "state": st.id, "digest": report.digest})
            report.complete = True
        report.seconds = round(time.monotonic() - started, 6)
        return report
    finally:
        if manifest is not None:
            manifest.close()
        if dst is not None:
            dst.close()
        if src is not None:
            src.close()
        if target_lock is not None:
            target_lock.close()
        journal.close()


def sync(source: str, target: str, **options: Any) -> SyncReport:
    """Blocking form of sync_async() for callers without an event loop."""
    return asyncio.run(sync_async(source, target, **options))


def _choose(st: State, src: Disk, *, checkpoint: str | None, dirty_bitmap: str | None,
            changed_areas: str | None, size_changed: str | None) -> _Pass:
    """Which pass this run is, which ranges it plans, and where in them it starts.

    A pass resumed under its own checkpoint keeps its plan and starts at the
    last commit: attempts of one pass commit increasing frontiers of one
    plan, so everything below the frontier is done whatever attempt did it.
    """
    size = src.size
    last = st.last
    if size_changed:  # R2: a new size invalidates every tracker and the manifest
        number = 0 if last is None else last.number + (1 if last.ended else 0)
        return _Pass(number, None, False, "full", fallback=size_changed + ": full pass")
    if last is None:
        return _Pass(0, None, False, "full (first pass)")
    if last.ended:
        if checkpoint is not None and last.ended.get("checkpoint") == checkpoint:
            return _again(last, src, checkpoint, dirty_bitmap, changed_areas)
        number, tainted, same = last.number + 1, None, False
    else:
        tainted = clip_runs(last.ranges if last.ranges is not None else [(0, size)],
                            last.upto, size)
        same = last.begin.get("checkpoint") == checkpoint
        number = last.number if same else last.number + 1
        if same and last.begin.get("change_source", "").startswith("full"):
            # a full pass resumed under its checkpoint: it continues where it was committed
            return _Pass(last.number, None, False, last.begin["change_source"], resumed=True,
                         start=min(last.upto, size))
    if dirty_bitmap is not None:
        try:
            new, kind, fallback = dirty_ranges(src, dirty_bitmap), f"dirty bitmap {dirty_bitmap}", None
        except TrackingUnavailable as e:
            new, kind, fallback = None, "compare", f"{e}: compare pass"
    elif changed_areas is not None:
        new, kind, fallback = load_changed_areas(changed_areas, size), "changed areas", None
    else:
        new, kind, fallback = None, "compare", None
    compare = new is None
    if tainted is None:
        return _Pass(number, new, compare, kind, fallback)
    carries = None if same else last.number
    if compare:  # everything is read again; the tainted blocks are written whatever they hash to
        start = last.upto if same and last.begin.get("compare") else 0
        return _Pass(number, None, True, kind, fallback, force=tainted, resumed=True,
                     carries=carries, start=start)
    if same and last.ranges is not None and len(subtract_runs(new, last.ranges)) == 0:
        # the same tracker names nothing new: the plan goes on from its last commit
        return _Pass(number, last.ranges, False, kind, fallback, resumed=True, start=last.upto,
                     tainted=tainted)
    # a new checkpoint (R3: B_k and B_k+1), or a tracker that grew: its ranges and the tainted
    return _Pass(number, union_runs(new, tainted, size), False, kind, fallback, resumed=True,
                 carries=carries, tainted=tainted)


def _again(last: PassState, src: Disk, checkpoint: str, dirty_bitmap: str | None,
           changed_areas: str | None) -> _Pass:
    """A pass for a checkpoint that was committed already (R4: harmless).

    Its change source is asked again; what it names beyond the committed plan
    (an areas file that grew, a bitmap still recording) is copied, together
    with the committed plan so that the new pass covers the whole checkpoint:
    a reused checkpoint never hides a change. A tracker that is gone (R3 lets the
    orchestrator drop it once committed): nothing. --compare (or no change source)
    always runs: it is how a failed --final is repaired.
    """
    done = f"checkpoint {checkpoint} was committed by pass {last.number}"
    if changed_areas is None and dirty_bitmap is None:  # compare: it reads all, so it runs
        return _Pass(last.number + 1, None, True, f"compare (again for {checkpoint})")
    new = None
    if changed_areas is not None:
        new, kind = load_changed_areas(changed_areas, src.size), "changed areas"
    elif dirty_bitmap is not None:
        try:
            new, kind = dirty_ranges(src, dirty_bitmap), f"dirty bitmap {dirty_bitmap}"
        except TrackingUnavailable:
            pass
    if new is not None and last.begin["ranges"] != "all":
        if not last.plan_known or subtract_runs(new, last.ranges):
            # copied again whole (harmless, R4), so that this pass's plan covers the checkpoint
            plan = union_runs(new, last.ranges, src.size) if last.plan_known else new
            return _Pass(last.number + 1, plan, False, f"{kind} beyond what {done}")
    return _Pass(last.number, _empty(), False, f"none ({done})", skip=True)


def _check_suspects(st: State, plan: _Pass) -> _Pass:
    """The deferred verdict of a live audit: blocks the last pass's audit found changed while
    the VM ran must be named by this pass's change source (the tracker that recorded the VM
    then). A resumed attempt of the same pass carries them on to the next checkpoint; a
    compare or full pass reads them anyway. One that is not named: the tracker missed a write,
    so this pass compares (R2)."""
    last = st.last
    suspects = (last.begin.get("audit") or {}).get("suspects") if last is not None else None
    if not suspects:
        return plan
    if plan.number == last.number:  # the same checkpoint again: the next one must name them
        plan.suspects = list(suspects)
        return plan
    if plan.compare or plan.ranges is None:
        return plan
    starts = [a for a, _ in plan.ranges]
    outside = [o for o in suspects
               if (i := bisect.bisect_right(starts, o) - 1) < 0 or plan.ranges[i][1] <= o]
    if not outside:
        return plan
    why = (f"the tracker audit of pass {last.number} found {len(outside)} sampled blocks "
           f"changed that neither its change source nor this pass's ({plan.change_source}) "
           f"names (the first at offset {outside[0]}): the change source missed writes: "
           "compare pass")
    return _Pass(plan.number, None, True, "compare",
                 "; ".join(x for x in (plan.fallback, why) if x), force=plan.tainted,
                 resumed=plan.resumed, carries=plan.carries)


async def _audit(src: Disk, manifest: Manifest, plan: _Pass, count: int,
                 source_id: str | None, *, live: bool = False) -> _Pass:
    """The tracker audit (RELIABILITY.md P6), before the pass's begin record: a sample of the
    blocks the change source calls unchanged is read and hashed, and compared with the
    manifest. All equal: the delta pass goes ahead. Any differing: the change source missed
    writes (or this is another disk), so the pass becomes a compare pass (R2: fail closed),
    which reads everything and writes what differs. With source_id, most samples differing
    means another disk than the bound one: refused, before anything is written."""
    size = manifest.size
    unchanged = subtract_runs([(0, size)], plan.ranges)  # the plan holds the tainted ranges
    result = await asyncio.to_thread(audit_sample, src, manifest, unchanged, count,
                                     skip_digest=POISON)
    plan.audit = result.record()
    if not result.mismatched:
        return plan
    if live and not (source_id is not None and 2 * result.mismatched > result.sampled):
        # the VM may have written them since the hand-over: the next pass's tracker must say
        plan.suspects = sorted(set(plan.suspects or []) | set(result.offsets or []))
        return plan
    found = (f"the tracker audit found {result.mismatched} of {result.sampled} sampled blocks "
             f"that the change source ({plan.change_source}) calls unchanged differ from "
             f"what was copied "
             f"(the first at offset {result.first})")
    if source_id is not None and 2 * result.mismatched > result.sampled:
        raise TargetRefused(found + f": this is not the disk bound as source id {source_id!r}; "
                            "nothing was written", disk=src.display, kind="source")
    why = found + ": the change source missed writes, or this is another disk: compare pass"
    return _Pass(plan.number, None, True, "compare",
                 "; ".join(x for x in (plan.fallback, why) if x), force=plan.tainted,
                 resumed=plan.resumed, carries=plan.carries, audit=plan.audit)


def _empty() -> list[tuple[int, int]]:
    return []


def _pending(st: State, size: int) -> list[tuple[int, int]]:
    """What the passes begun since the last read-back planned: the target ranges that may
    have been written and not read back since. A plan that is the whole disk, or whose ranges
    file is unusable or for another size, makes it the whole disk (read more, never less)."""
    runs: list[tuple[int, int]] = []
    for rec in st.pending:
        plan = rec["ranges"]
        if plan == "all" or rec["size"] != size:
            return [(0, size)]
        try:
            got = read_ranges(os.path.join(st.path, plan["file"]), size, plan["check"],
                              plan["count"])
        except JournalError:
            return [(0, size)]
        runs = union_runs(runs, [(int(a), int(b)) for a, b in got], size)
    return runs


def _rewrite(plan: _Pass, manifest: Manifest) -> _Pass:
    """Blocks a read-back found wrong on the target (POISON in the manifest) are planned by
    every pass until one rewrites them: a delta pass adds them to its ranges, a compare or full
    pass writes them anyway (no read digest is POISON), and a checkpoint committed already
    becomes a new pass of just them (R4: harmless to run again)."""
    bad = manifest.runs_of(POISON)
    if not bad or plan.compare or plan.ranges is None:
        return plan
    if plan.skip:
        return _Pass(plan.number + 1, bad, False,
                     f"blocks a read-back found wrong ({plan.change_source})",
                     suspects=plan.suspects)
    plan.ranges = union_runs(plan.ranges, bad, manifest.size)
    return plan


async def _verify(target: str, manifest: Manifest, st: State, kernels: _native.Kernels, *,
                  on_progress: Callable[[Progress], None] | None,
                  tls: Tls | None) -> tuple[int, list[int], dict[str, Any]]:
    """Read back what is pending (_pending) and compare it with the manifest; the blocks that
    differ get the POISON digest (msynced), so that the next pass writes them again. Returns
    (count, the first offsets, the report's read_back record)."""
    ranges = _pending(st, manifest.size)
    began = time.monotonic()
    phase = None if on_progress is None else (
        lambda p: on_progress(dataclasses.replace(p, phase="read-back")))
    count, offsets, read = await _read_back(target, manifest, kernels, on_progress=phase,
                                            limit=manifest.blocks, tls=tls, ranges=ranges)
    if count:
        for off in offsets:
            manifest.slice(off, 1)[:] = POISON
        manifest.sync()
    return count, offsets[:VERIFY_OFFSETS], {
        "bytes": read, "planned": runs_bytes(ranges), "mismatched": count,
        "seconds": round(time.monotonic() - began, 6)}


async def _copy(st: State, journal: Journal, src: Disk, dst: Disk, manifest: Manifest,
                plan: _Pass, report: SyncReport, kernels: _native.Kernels, *,
                checkpoint: str | None, final: bool, connections: int | None,
                in_flight: int | None, request_size: int | None, retries: int,
                on_progress: Callable[[Progress], None] | None, commit_bytes: int,
                commit_seconds: float) -> None:
    """Journal the pass's plan, copy it with commits, and journal its end."""
    size = src.size
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
    report.delta_bytes = delta
    journal.append(begin)
    commits, upto = 0, plan.start

    def commit(frontier: int) -> None:
        nonlocal commits, upto
        if frontier <= upto:  # nothing new below the frontier since the last commit
            return
        manifest.sync()
        journal.append({"t": "commit", "state": st.id, "pass": plan.number, "upto": frontier,
                        "time": round(time.time(), 6)})  # wall clock, for audits and tests
        commits, upto = commits + 1, frontier

    conns, flight, req_size = _shape(src, connections, in_flight, request_size)
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
    manifest.sync()
    s = result.stats
    report.bytes_copied, report.bytes_zeroed = s.bytes_copied, s.bytes_zeroed
    report.bytes_skipped, report.bytes_unchanged = s.bytes_skipped, s.bytes_unchanged
    report.bytes_read, report.retries, report.reconnects = s.bytes_read, s.retries, s.reconnects
    report.connections = result.connections
    journal.append({"t": "end", "state": st.id, "pass": plan.number, "checkpoint": checkpoint,
                    "digest": manifest.digest_string(), "bytes": delta, "final": final})
    report.commits = commits + 1
