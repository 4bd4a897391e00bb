"""Live migration's arithmetic: the change-rate model behind the predicted downtime, and the
rule that decides when passes have converged.

The model, after each pass k >= 1: the guest's dirty rate is what bitmap k named over the time
it recorded; a pass is taken to last a fixed overhead plus what it moves over the copy rate
plus what it reads back over the read-back rate, the copy rate coming from big passes (pass 0)
and the overhead from the median remainder of the others (their whole wall in migrate: the QMP
hand-over and export included); the predicted downtime if cutover happened now is the stop
command's time (measured by the last cutover, else the caller's --stop-estimate, default 0) +
overhead + the delta the guest has dirtied since the last hand-over over the copy rate + the
final read-back: that delta and what is still unverified (a pass killed before its read-back,
blocks a read-back found wrong) over the read-back rate, measured by pass 0's own read-back
of everything it wrote (every pass reads back what it wrote, so this does not grow with the
disk) + with --verify source, the source's data over the copy rate.

A VM with several disks is one model, not one per disk: its disks' passes run side by side
and share the copy bandwidth and the read-back, and it stops once. Each pass is folded in as
one (transfer.migration.vmdisks.aggregate): the bytes planned, moved and read back summed
over the disks, the copy's seconds the longest disk's copy and the read-back's the longest
disk's read-back, so that the copy and read-back rates are the aggregate rates measured over
parallel passes, and the dirty rate is the VM's (the disks' deltas summed, over the time the
bitmaps recorded: one transaction hands all of them over at once). The prediction is then

    downtime = stop + overhead + (D + S) / copy_rate + (U + D) / read_rate
    D = dirty_rate * seconds since the last hand-over    (the final delta, summed over disks)
    U = sum over disks of their unverified data, S = sum of their source data (--verify source)

with one fixed overhead (one pass of the VM: one hand-over, the disks' exports, their syncs
side by side) and one stop. With one disk every sum has one term: the formula above.
"""

from __future__ import annotations

import statistics

from ..errors import NotConverging
from ..reports import PassInfo, SyncReport

BIG_PASS = 64 << 20  # bytes moved by a pass that says more about the copy rate than overhead


class Model:
    """Dirty and copy rates from the passes so far; the downtime a cutover now would take."""

    def __init__(self) -> None:
        self.overhead: float | None = None  # seconds of a pass that copies nothing
        self._fixed: list[float] = []  # each small pass's cost beyond its copy and read-back
        self.copy_rate: float | None = None
        self.dirty_rate: float | None = None
        self.read_rate: float | None = None  # read-back of the target, bytes/s
        self.stop_seconds = 0.0

    def add(self, report: SyncReport, recorded: float | None,
            wall: float | None = None) -> tuple[float | None, float | None]:
        """Fold one pass in: a pass takes overhead + moved / copy_rate + read back / read_rate
        seconds. Big passes (pass 0) give the copy rate and, by their read-back of all they
        wrote, the read-back rate; small ones the overhead: the median of their wall (the
        sync pass and migrate's QMP hand-over and export around it, when given) beyond their
        copy and read-back."""
        back = report.read_back or {}
        back_bytes, back_seconds = back.get("bytes", 0), back.get("seconds", 0.0)
        if (back_bytes >= BIG_PASS or self.read_rate is None and back_bytes) and back_seconds > 0:
            rate = back_bytes / back_seconds
            self.read_rate = rate if self.read_rate is None else 0.5 * (self.read_rate + rate)
        seconds = max(report.seconds - back_seconds, 1e-3)  # the copy's own
        moved = report.bytes_copied + report.bytes_zeroed
        if moved >= BIG_PASS or self.copy_rate is None and moved:
            rate = moved / seconds
            self.copy_rate = rate if self.copy_rate is None else 0.5 * (self.copy_rate + rate)
        elif self.copy_rate:  # a small pass: mostly the fixed cost, its read-back's included
            reading = back_bytes / self.read_rate if self.read_rate else back_seconds
            total = report.seconds if wall is None else max(wall, report.seconds)
            self._fixed.append(max(0.0, total - moved / self.copy_rate - reading))
            self.overhead = statistics.median(self._fixed[-8:])
        if recorded is not None and recorded > 0:
            self.dirty_rate = report.delta_bytes / recorded
        return self.copy_rate, self.dirty_rate

    def predict(self, since_handover: float, unverified: int,
                source_data: int = 0) -> float | None:
        """The downtime of a cutover now: the stop, a pass's fixed cost, the delta dirtied
        since the last hand-over copied and read back, the unverified target data read back,
        and (--verify source) the source's data read and hashed at the copy rate."""
        if self.copy_rate is None or self.dirty_rate is None:
            return None
        delta = self.dirty_rate * since_handover
        verify = (unverified + delta) / self.read_rate if self.read_rate else 0.0
        return (self.stop_seconds + (self.overhead or 0.0) + (delta + source_data) / self.copy_rate
                + verify)


def converged(model: Model, info: PassInfo, since: float, deltas: list[int], passes: int, *,
              max_downtime: float, max_passes: int) -> bool:
    """After a live precopy pass: cut over now (True), make another pass (False), or give up
    (NotConverging). It fits the budget: cut over, unless one more short pass would at least
    halve the final delta (a long pass, e.g. the first delta of a big disk, leaves a big one:
    passes then shrink to the floor the fixed cost sets). It does not fit and the deltas
    stopped shrinking (or the passes ran out): say so, do not loop forever."""
    pred = info.predicted_downtime
    if pred is not None and pred <= max_downtime:
        final = (model.dirty_rate or 0.0) * since
        return info.delta_bytes <= 2 * final or passes >= max_passes
    if (len(deltas) >= 4 and deltas[-1] >= 0.9 * deltas[-2] >= 0.81 * deltas[-3]
            or passes >= max_passes):
        raise NotConverging(
            f"not converging after {passes} passes: the guest dirties "
            f"{(model.dirty_rate or 0) / 2**20:.1f} MiB/s, the engine copies "
            f"{(model.copy_rate or 0) / 2**20:.1f} MiB/s, predicted downtime "
            f"{pred if pred is not None else float('nan'):.1f} s over the "
            f"{max_downtime:g} s budget, the last deltas "
            f"{', '.join(f'{d / 2**20:.1f}' for d in deltas[-4:])} MiB stopped "
            "shrinking; cut over anyway with `transfer cutover`, or slow the guest")
    return False
