"""What one disk of a plan runs, by its VM's type, with what the engine has.

    cold        (source:) one sync pass with final=True: the whole disk, read back and the
                state completed; killed, the same call resumes from its last commit
    conversion  (source:) the target, populated by someone else, verified against the source
    warm        (source:) sync passes: the first whole, then one per `changes:` file but the
                last, each its own checkpoint (plan-K); at the cutover (its time, or `transfer
                plan cutover`) the final pass with the last changes file (none: --compare)
    warm, live  (qmp: + node:) transfer.migration.migrate.migrate_async on the disk's own state:
                it runs its precopy passes and its cutover itself; its pass_gate holds the
                disk's slot around each pass and gives it back between them, as a `sync`
                warm disk does

A disk holds one slot of its host while it copies. The scheduler took the slot of its first
pass when its VM started; `gate.release` gives it back, `gate.acquire` takes one for a later
pass (waiting for the host's limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from ..errors import VerifyFailed
from ..state.journal import Journal
from .spec import DiskSpec, VmSpec
from .state import cutover_path, disk_dir, mark_verified

POLL = 0.2  # seconds between looks for a cutover's time or request


class Gate(Protocol):
    async def acquire(self, host: str) -> None: ...
    async def release(self, host: str) -> None: ...
    def changed(self) -> None: ...


@dataclass
class DiskRun:
    """One disk's row in the status: where it is, what it has done."""

    vm: str
    disk: str
    host: str
    type: str
    target: str
    state: str = "waiting"  # waiting, copying, precopied, cutover, done, failed, stopped
    pass_: int | None = None
    bytes: int = 0
    total: int = 0
    rate: float | None = None
    predicted_downtime: float | None = None
    passes: int = 0
    seconds: float = 0.0
    digest: str | None = None
    finished_before: bool = False  # done by an earlier run: not opened by this one
    error: str | None = None
    exit_code: int = 0
    started: float | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("pass_", "started")}
        out["pass"] = self.pass_
        return out

    def progress(self, gate: Gate):
        def on_progress(p: Any) -> None:
            self.bytes, self.total = p.done, p.total
            self.rate = p.rate or self.rate
            gate.changed()
        return on_progress


class Slot:
    """The one slot of its host a disk holds while it copies, taken and given back once."""

    def __init__(self, gate: Gate, host: str) -> None:
        self.gate, self.host, self.held = gate, host, True  # the scheduler took it

    async def take(self) -> None:
        if not self.held:
            await self.gate.acquire(self.host)
            self.held = True

    async def give(self) -> None:
        if self.held:
            self.held = False
            await self.gate.release(self.host)


async def run_disk(vm: VmSpec, d: DiskSpec, row: DiskRun, state: str, gate: Gate) -> None:
    """The disk's work by its VM's type; its slot is held on entry and given back by the end."""
    started = time.monotonic()
    row.state, row.started = "copying", time.time()
    gate.changed()
    slot = Slot(gate, vm.host)
    try:
        if vm.type == "conversion":
            await _verify(vm, d, row, state, gate)
        elif d.qmp is not None:
            await _migrate(vm, d, row, state, gate, slot)
        elif vm.type == "cold":
            await _sync(d, row, state, gate, final=True, checkpoint=None)
        else:
            await _warm(vm, d, row, state, gate, slot)
        row.state = "done"
    finally:
        row.seconds = round(row.seconds + time.monotonic() - started, 3)
        await asyncio.shield(slot.give())


async def _sync(d: DiskSpec, row: DiskRun, state: str, gate: Gate, *, final: bool,
                checkpoint: str | None, changes: str | None = None) -> Any:
    from ..migration.warm import sync_async  # loads the engine when a disk runs

    compare = final and changes is None and checkpoint is not None
    r = await sync_async(d.source, d.target, state=disk_dir(state, row.vm, row.disk),
                         final=final, checkpoint=checkpoint, changed_areas=changes,
                         compare=compare, on_progress=row.progress(gate))
    row.passes += 1
    row.pass_, row.digest = r.pass_, r.digest
    row.bytes = row.total = r.delta_bytes
    if r.seconds > 0 and r.delta_bytes:
        row.rate = r.delta_bytes / r.seconds
    return r


async def _verify(vm: VmSpec, d: DiskSpec, row: DiskRun, state: str, gate: Gate) -> None:
    from ..migration.conversion import verify_async

    r = await verify_async(d.source, d.target, on_progress=row.progress(gate))
    if not r.equal:
        raise VerifyFailed(f"{r.differing_blocks} blocks differ from the source",
                           disk=r.target, kind="target")
    row.digest, row.passes, row.pass_ = r.target_digest, 1, 0
    row.bytes = row.total = r.size
    await asyncio.to_thread(mark_verified, state, vm.name, d.name, r.to_dict())


def _ended_checkpoints(state: str, vm: str, disk: str) -> set[str]:
    """The checkpoints of the disk's sync passes that ended (its journal, read before the
    pass runs: the plan's lock keeps every other engine off it)."""
    path = os.path.join(disk_dir(state, vm, disk), "journal")
    if not os.path.exists(path):
        return set()
    with Journal.open(path, create=False) as j:
        return {str(r.get("checkpoint")) for r in j.records if r.get("t") == "end"}


async def _warm(vm: VmSpec, d: DiskSpec, row: DiskRun, state: str, gate: Gate,
                slot: Slot) -> None:
    """The precopy passes (each with a slot, none between them), the wait for the cutover
    (no slot), the final pass (a slot)."""
    precopy = [None] + d.changes[:-1]  # pass 0 whole, then one per changes file but the last
    ended = await asyncio.to_thread(_ended_checkpoints, state, vm.name, d.name)
    for k, changes in enumerate(precopy):
        if f"plan-{k}" in ended:
            continue
        await slot.take()
        row.state = "copying"
        await _sync(d, row, state, gate, final=False, checkpoint=f"plan-{k}", changes=changes)
        await slot.give()
        row.state = "precopied"
        if row.rate:
            row.predicted_downtime = round(row.bytes / row.rate, 3)
        gate.changed()
    await slot.give()
    await _wait_cutover(vm, state)
    await slot.take()
    row.state = "cutover"
    gate.changed()
    await _sync(d, row, state, gate, final=True, checkpoint="plan-final",
                changes=d.changes[-1] if d.changes else None)


async def _wait_cutover(vm: VmSpec, state: str) -> None:
    """Until the VM's cutover time, or a `plan cutover` request for it."""
    path = cutover_path(state, vm.name)
    while not os.path.exists(path) and (vm.cutover is None or time.time() < vm.cutover):
        await asyncio.sleep(POLL)


class Migrating:
    """A migration's disks as its passes come (migrate_async's pass_gate and on_pass): each
    pass holds their slots and none is held between passes; each disk's PassInfo (its node)
    updates that disk's row."""

    def __init__(self, rows: dict[str | None, DiskRun], slots: list[Slot], gate: Gate) -> None:
        self.rows, self.slots, self.gate = rows, slots, gate

    @contextlib.asynccontextmanager
    async def copying(self, n_disks: int) -> AsyncIterator[None]:
        for slot in self.slots:
            await slot.take()
        for row in self.rows.values():
            row.state = "copying"
        self.gate.changed()
        try:
            yield
        finally:
            for slot in self.slots:
                await slot.give()
            self.gate.changed()

    def on_pass(self, p: Any) -> None:
        row = self.rows.get(p.disk)
        if row is not None:
            row.passes += 1
            row.pass_, row.predicted_downtime = p.pass_, p.predicted_downtime
            row.bytes, row.rate = p.bytes_copied, p.copy_rate or row.rate
            row.state = "cutover" if p.final else "precopied"  # (after the pass: copying)
            self.gate.changed()


def _cutover_at(vm: VmSpec) -> str | None:
    if vm.cutover is None:
        return None
    return datetime.datetime.fromtimestamp(vm.cutover, datetime.timezone.utc).isoformat()


async def _migrate(vm: VmSpec, d: DiskSpec, row: DiskRun, state: str, gate: Gate,
                   slot: Slot) -> None:
    from ..migration.migrate import migrate_async

    m = Migrating({d.node: row}, [slot], gate)
    r = await migrate_async(d.target, kind=vm.type, qmp=d.qmp, node=d.node,
                            state=disk_dir(state, vm.name, d.name), cutover=_cutover_at(vm),
                            on_pass=m.on_pass, on_progress=row.progress(gate),
                            pass_gate=m.copying)
    row.digest = r.digest


async def run_vm_migration(vm: VmSpec, rows: dict[str, DiskRun], state: str,
                           gate: Gate) -> None:
    """A VM's disks as one migration (state.one_migration): one transaction per pass, one
    cutover. Each pass holds the slots of the VM's disks that still copy (the scheduler took
    them when the VM started), none between passes."""
    from ..migration.migrate import migrate_async

    slots = [Slot(gate, vm.host) for _ in rows]
    m = Migrating({d.node: rows[d.name] for d in vm.disks if d.name in rows}, slots, gate)
    started = time.monotonic()
    for row in rows.values():
        row.state, row.started = "copying", time.time()
    gate.changed()
    try:
        r = await migrate_async(kind=vm.type, qmp=str(vm.disks[0].qmp),
                                disks=[(str(d.node), d.target) for d in vm.disks],
                                state=os.path.dirname(cutover_path(state, vm.name)),
                                cutover=_cutover_at(vm), on_pass=m.on_pass,
                                pass_gate=m.copying)
        digests = {x["node"]: x["digest"] for x in r.disks}
        for node, row in m.rows.items():
            row.digest, row.state = digests.get(node), "done"
    finally:
        for row in rows.values():
            row.seconds = round(row.seconds + time.monotonic() - started, 3)
        for slot in slots:
            await asyncio.shield(slot.give())
