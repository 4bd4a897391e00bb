"""Which pass a warm-migration run is and what it plans to copy (the pass's decisions).

From the state's journal (transfer.state.records) and the change source this run was given:
a first pass copies everything; a later one what its change source names, with whatever an
interrupted pass left uncommitted (R3: B_k and B_k+1); a resumed pass keeps its plan and
starts at its last commit; a committed checkpoint copies nothing again unless its change
source now names more (R4); a missing tracker makes a compare pass and a new size a full one
(R2); blocks a read-back found wrong are planned until rewritten; suspects of a live audit
must be named. Reading the change source is the only I/O here.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from ..aio import to_the_end
from ..disks import Disk
from ..integrity import POISON, Manifest
from ..runs import Runs
from ..state.records import PassState, State
from ..errors import TargetRefused
from ..tracking.areas import clip_runs, load_changed_areas, subtract_runs, union_runs
from ..tracking.audit import audit as audit_sample
from ..tracking.bitmap import TrackingUnavailable, dirty_ranges


@dataclass
class PassPlan:
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


def choose(st: State, src: Disk, *, checkpoint: str | None, dirty_bitmap: str | None,
            changed_areas: str | None, size_changed: str | None) -> PassPlan:
    """Which pass this run is, which ranges it plans, and where in them it starts.

    A pass resumed under its own checkpoint keeps its plan and starts at the
    last commit: attempts of one pass commit increasing frontiers of one
    plan, so everything below the frontier is done whatever attempt did it.
    """
    size = src.size
    last = st.last
    if size_changed:  # R2: a new size invalidates every tracker and the manifest
        number = 0 if last is None else last.number + (1 if last.ended else 0)
        return PassPlan(number, None, False, "full", fallback=size_changed + ": full pass")
    if last is None:
        return PassPlan(0, None, False, "full (first pass)")
    if last.ended:
        if checkpoint is not None and last.ended.get("checkpoint") == checkpoint:
            return again(last, src, checkpoint, dirty_bitmap, changed_areas)
        number, tainted, same = last.number + 1, None, False
    else:
        tainted = clip_runs(last.ranges if last.ranges is not None else [(0, size)],
                            last.upto, size)
        same = last.begin.get("checkpoint") == checkpoint
        number = last.number if same else last.number + 1
        if same and last.begin.get("change_source", "").startswith("full"):
            # a full pass resumed under its checkpoint: it continues where it was committed
            return PassPlan(last.number, None, False, last.begin["change_source"], resumed=True,
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
        return PassPlan(number, new, compare, kind, fallback)
    carries = None if same else last.number
    if compare:  # everything is read again; the tainted blocks are written whatever they hash to
        start = last.upto if same and last.begin.get("compare") else 0
        return PassPlan(number, None, True, kind, fallback, force=tainted, resumed=True,
                     carries=carries, start=start)
    if same and last.ranges is not None and len(subtract_runs(new, last.ranges)) == 0:
        # the same tracker names nothing new: the plan goes on from its last commit
        return PassPlan(number, last.ranges, False, kind, fallback, resumed=True, start=last.upto,
                     tainted=tainted)
    # a new checkpoint (R3: B_k and B_k+1), or a tracker that grew: its ranges and the tainted
    return PassPlan(number, union_runs(new, tainted, size), False, kind, fallback, resumed=True,
                 carries=carries, tainted=tainted)


def again(last: PassState, src: Disk, checkpoint: str, dirty_bitmap: str | None,
           changed_areas: str | None) -> PassPlan:
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
        return PassPlan(last.number + 1, None, True, f"compare (again for {checkpoint})")
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
            return PassPlan(last.number + 1, plan, False, f"{kind} beyond what {done}")
    return PassPlan(last.number, _empty(), False, f"none ({done})", skip=True)


def check_suspects(st: State, plan: PassPlan) -> PassPlan:
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
    starts = Runs.of(plan.ranges).starts()
    outside = [o for o in suspects
               if (i := bisect.bisect_right(starts, o) - 1) < 0 or plan.ranges[i][1] <= o]
    if not outside:
        return plan
    why = (f"the tracker audit of pass {last.number} found {len(outside)} sampled blocks "
           f"changed that neither its change source nor this pass's ({plan.change_source}) "
           f"names (the first at offset {outside[0]}): the change source missed writes: "
           "compare pass")
    return PassPlan(plan.number, None, True, "compare",
                 "; ".join(x for x in (plan.fallback, why) if x), force=plan.tainted,
                 resumed=plan.resumed, carries=plan.carries)


def _empty() -> list[tuple[int, int]]:
    return []


def rewrite(plan: PassPlan, manifest: Manifest) -> PassPlan:
    """Blocks a read-back found wrong on the target (POISON in the manifest) are planned by
    every pass until one rewrites them: a delta pass adds them to its ranges, a compare or full
    pass writes them anyway (no read digest is POISON), and a checkpoint committed already
    becomes a new pass of just them (R4: harmless to run again)."""
    bad = manifest.runs_of(POISON)
    if not bad or plan.compare or plan.ranges is None:
        return plan
    if plan.skip:
        return PassPlan(plan.number + 1, bad, False,
                     f"blocks a read-back found wrong ({plan.change_source})",
                     suspects=plan.suspects)
    plan.ranges = union_runs(plan.ranges, bad, manifest.size)
    return plan


async def audit_pass(src: Disk, manifest: Manifest, plan: PassPlan, count: int,
                 source_id: str | None, *, live: bool = False) -> PassPlan:
    """The tracker audit (RELIABILITY.md P6), before the pass's begin record: a sample of the
    blocks the change source calls unchanged is read and hashed, and compared with the
    manifest. All equal: the delta pass goes ahead. Any differing: the change source missed
    writes (or this is another disk), so the pass becomes a compare pass (R2: fail closed),
    which reads everything and writes what differs. With source_id, most samples differing
    means another disk than the bound one: refused, before anything is written."""
    size = manifest.size
    unchanged = subtract_runs([(0, size)], plan.ranges)  # the plan holds the tainted ranges
    # to its end even when a signal comes: the source is closed after, not under, its reads
    result = await to_the_end(audit_sample, src, manifest, unchanged, count,
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
    return PassPlan(plan.number, None, True, "compare",
                 "; ".join(x for x in (plan.fallback, why) if x), force=plan.tainted,
                 resumed=plan.resumed, carries=plan.carries, audit=plan.audit)
