"""The disks of one migrated VM: each node's target, sync state and daemon view; what is
still to read back on each; whether every target is ready before the VM is stopped; running
the disks' passes side by side; and one pass's reports folded into the VM's (the model's).

One disk (the `TARGET --node NODE` form, or a single `--disk`) keeps the layout migrate
always had: its sync state is DIR/sync and its export `transfer-src`. Several disks each get
DIR/disks/NODE (a sync state of its own, with its own journal, manifest and checkpoints) and
the export `transfer-src-NODE`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Iterable, TypeVar

from ..disks import open_disk
from ..errors import BadInput, Interrupted, TargetRefused, TransferError
from ..integrity import POISON, Manifest
from ..reports import SyncReport
from ..state.journal import Journal
from ..state.records import load_state, pending_ranges
from ..tracking.areas import union_runs
from .checkpoints import EXPORT, Daemon

T = TypeVar("T")

# qemu's node names: a letter, then letters, digits, '-', '.', '_' (at most 31 in all)
_NODE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")


def check_disks(disks: list[tuple[str, str]]) -> None:
    """Each (node, target) well formed, no node or target twice."""
    if not disks:
        raise BadInput("no disk to migrate: give TARGET --node NODE or --disk NODE=TARGET")
    for node, target in disks:
        if not isinstance(node, str) or not _NODE.match(node):
            raise BadInput(f"not a block node name: {node!r}")
        if not isinstance(target, str) or not target:
            raise BadInput(f"disk {node}: no target")
    nodes, targets = [n for n, _ in disks], [t for _, t in disks]
    for names, what in ((nodes, "node"), (targets, "target")):
        twice = sorted({x for x in names if names.count(x) > 1})
        if twice:
            raise BadInput(f"the same {what} is named twice: {', '.join(twice)}")


@dataclass
class VmDisk:
    """One disk of the VM: its node, target, sync state directory and daemon view."""

    node: str
    target: str
    state: str
    daemon: Daemon | None = None

    @classmethod
    def layout(cls, disks: list[tuple[str, str]], state: str) -> list["VmDisk"]:
        if len(disks) == 1:
            return [cls(disks[0][0], disks[0][1], os.path.join(state, "sync"))]
        return [cls(n, t, os.path.join(state, "disks", n)) for n, t in disks]

    def attach(self, q: Any, qmp: str, state: str, nbd_socket: str | None, several: bool) -> None:
        export = f"{EXPORT}-{self.node}" if several else EXPORT
        self.daemon = Daemon(q, self.node, qmp, state, nbd_socket, export)

    def manifest(self) -> Manifest:
        return Manifest.open(os.path.join(self.state, "manifest"))

    def size(self) -> int:
        m = self.manifest()
        try:
            return m.size
        finally:
            m.close()

    def source_data(self) -> int:
        """The source's data as copied (the manifest's non-zero blocks)."""
        m = self.manifest()
        try:
            return m.size - sum(n for _, n in m.zero_runs(0, m.size))
        finally:
            m.close()

    def unverified_bytes(self) -> int:
        """The target's data that a final pass would read back besides its own delta: what
        the passes since the last read-back wrote (a crash before a pass's read-back, or a
        pass run with --read-back final), and blocks a read-back found wrong."""
        with Journal.open(os.path.join(self.state, "journal"), create=False) as j:
            st = load_state(self.state, j)
        m = self.manifest()
        try:
            runs = union_runs(pending_ranges(st, m.size), m.runs_of(POISON), m.size)
            return sum(e - s - sum(n for _, n in m.zero_runs(s, e - s)) for s, e in runs)
        finally:
            m.close()

    def completed(self) -> str | None:
        """The digest of this disk's final pass if it completed (sync's journal says so)."""
        path = os.path.join(self.state, "journal")
        if not os.path.exists(path):
            return None
        with Journal.open(path, create=False) as j:
            last = j.records[-1] if j.records else {}
        return str(last.get("digest", "")) if last.get("t") == "complete" else None

    def check_ready(self) -> None:
        """The target opens for writing, or (a file not made yet) its directory takes a new
        file; else TargetRefused naming this disk. Blocking: run it on a thread."""
        try:
            d = open_disk(self.target, "target")
        except TransferError as e:
            raise named(e, self.node) from None
        try:
            if d.size is None:  # a file the first pass creates
                where = os.path.dirname(os.path.abspath(getattr(d, "path", self.target)))
                if not os.path.isdir(where):
                    raise TargetRefused(f"disk {self.node}: the target's directory {where} "
                                        "does not exist", disk=self.target)
                if not os.access(where, os.W_OK | os.X_OK):
                    raise TargetRefused(f"disk {self.node}: the target's directory {where} "
                                        "is not writable", disk=self.target)
        finally:
            d.close()


def named(e: TransferError, node: str) -> TransferError:
    """e, its message prefixed with the disk it happened on (once)."""
    prefix = f"disk {node}: "
    if not e.message.startswith(prefix):
        e.message = prefix + e.message
        e.args = (str(e),)
    return e


async def check_ready(disks: Iterable[VmDisk]) -> None:
    """Every disk's target is ready (VmDisk.check_ready), checked side by side; the first
    refusal (in the disks' order) is raised, naming its disk."""
    disks = list(disks)
    results = await asyncio.gather(*(asyncio.to_thread(x.check_ready) for x in disks),
                                   return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


async def run_all(coros: list[Awaitable[T]]) -> list[T]:
    """Await the coroutines side by side (asyncio.gather's results, in order). One failing
    cancels the others and waits for them to end (a sync pass commits what it finished),
    then its error is raised; cancelled, every one is cancelled and waited for."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        while pending:
            try:
                await asyncio.wait(pending)
            except asyncio.CancelledError:
                pass  # a second signal: the passes still end first
            pending = [t for t in pending if not t.done()]
    errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
    errors = [e for e in errors if not isinstance(e, asyncio.CancelledError)]
    if errors:  # the failure itself, before the Interrupted of the passes it cancelled
        raise next((e for e in errors if not isinstance(e, Interrupted)), errors[0])
    if any(t.cancelled() for t in tasks):
        raise asyncio.CancelledError
    return [t.result() for t in tasks]


def aggregate(reports: list[SyncReport]) -> SyncReport:
    """One pass of all the disks as one report for the model (transfer.migration.live): the
    bytes planned, copied, zeroed and read back summed; the copy's seconds the longest
    disk's copy and the read-back's the longest disk's read-back (they ran side by side, so
    the aggregate rates are the VM's, the disks sharing the bandwidth). One disk: its own."""
    if len(reports) == 1:
        return reports[0]
    backs = [r.read_back or {} for r in reports]
    back_seconds = max(b.get("seconds", 0.0) for b in backs)
    copy_seconds = max(r.seconds - b.get("seconds", 0.0) for r, b in zip(reports, backs))
    return dataclasses.replace(
        reports[0], delta_bytes=sum(r.delta_bytes for r in reports),
        bytes_copied=sum(r.bytes_copied for r in reports),
        bytes_zeroed=sum(r.bytes_zeroed for r in reports),
        seconds=copy_seconds + back_seconds,
        read_back={"bytes": sum(b.get("bytes", 0) for b in backs), "seconds": back_seconds})
