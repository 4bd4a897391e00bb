"""What the verbs print and write: the JSON report, the summary lines, human byte counts."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from ..durable import write_atomic
from ..observe import human_bytes
from ..reports import MigrateReport, PassInfo, Report, SyncReport, VerifyReport


def write_report(path: str, data: dict[str, Any]) -> None:
    """Write atomically (transfer.durable): a reader never sees half a report."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def sayer(quiet: bool, prefix: str = "transfer: ") -> Callable[[str], None]:
    """A line on stderr, or nothing under --progress none."""
    if quiet:
        return lambda s: None
    return lambda s: print(f"{prefix}{s}", file=sys.stderr)


def copy_summary(r: Report) -> str:
    rate = human_bytes(r.size / r.seconds) + "/s" if r.seconds > 0 else "-"
    return (f"copied {human_bytes(r.bytes_copied)}, zeroed {human_bytes(r.bytes_zeroed)}, "
            f"skipped {human_bytes(r.bytes_skipped)} of {human_bytes(r.size)} in "
            f"{r.seconds:.2f} s ({rate}); digest {r.digest}")


def verify_line(r: VerifyReport) -> str:
    if r.equal and r.source is None:
        return f"equal: {r.target} has the expected digest {r.target_digest}"
    if r.equal:
        return (f"equal: {r.target} holds what {r.source} holds ({human_bytes(r.size)}, "
                f"{r.target_digest})")
    if r.differing_blocks is None:
        return f"DIFFER: {r.target} has digest {r.target_digest}, expected {r.source_digest}"
    first = ", ".join(str(o) for o in r.first_differences[:10])
    return (f"DIFFER: {r.differing_blocks} of {r.blocks} blocks of 64 KiB differ between "
            f"{r.source} and {r.target}; first at offsets {first}")


def sync_line(r: SyncReport) -> str:
    """One sync pass, as the line after it."""
    how = r.change_source + (f" ({r.fallback})" if r.fallback else "")
    done = " verified and complete" if r.complete else ""
    if r.read_back:
        done += f"; read back {human_bytes(r.read_back['bytes'])}"
    return (f"pass {r.pass_} [{how}]: {human_bytes(r.delta_bytes)} planned, copied "
            f"{human_bytes(r.bytes_copied)}, zeroed {human_bytes(r.bytes_zeroed)}, unchanged "
            f"{human_bytes(r.bytes_unchanged)} in {r.seconds:.2f} s; digest {r.digest}{done}")


def pass_line(p: PassInfo, disk: bool = False) -> str:
    """One migrate pass, as it ends; disk: name its disk (one of a VM's several)."""
    def rate(x: float | None) -> str:
        return "-" if x is None else human_bytes(x) + "/s"

    pred = "-" if p.predicted_downtime is None else f"{p.predicted_downtime:.2f} s"
    node = f" {p.disk}" if disk and p.disk else ""
    return (f"pass {p.pass_:>3}{node}{' final' if p.final else ''}: "
            f"{human_bytes(p.delta_bytes):>10} "
            f"in {p.seconds:6.2f} s, copy {rate(p.copy_rate)}, guest dirties {rate(p.dirty_rate)}, "
            f"predicted downtime {pred}" + (f" [{p.fallback}]" if p.fallback else "")
            + (f" [{p.note}]" if p.note else ""))


def cutover_line(r: MigrateReport) -> str:
    """The end of a migration: its downtime, and the prediction's."""
    c = r.cutover
    digest = f"digest {r.digest}"
    if len(r.disks) > 1:  # a VM's disks: one downtime, a digest each
        digest = "digests " + ", ".join(f"{d['node']} {d['digest']}" for d in r.disks)
    if c.get("predicted_downtime") is not None:
        return (f"cutover: downtime {c['downtime']:.2f} s (predicted "
                f"{c['predicted_downtime']:.2f} s), {digest}")
    return f"cutover: downtime {c.get('downtime', 0):.2f} s, {digest}"
