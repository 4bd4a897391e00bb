"""`transfer plan run`: every VM of a plan, each disk in its own resumable state, within the
plan's limits (transfer.plans.schedule), with the status and the prediction kept current.

A run: lock the state directory (a second run is refused), find the disks an earlier run
finished (their journals say so; they are not opened again), measure the rest (allocated
bytes, a sample per host: transfer.plans.measure), predict, then start VMs as their host's
slots allow, each disk as transfer.plans.work says for its type. Killed at any point, the next
run finishes the plan: each disk's own state resumes it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Callable

from ..errors import Interrupted, TransferError
from .measure import Measured, jobs, measure, predict
from .schedule import Slots, Vm, admit, queues, simulate
from .spec import Plan, VmSpec
from .state import PlanLock, done_digest, one_migration, write_json
from .work import DiskRun, run_disk, run_vm_migration

STATUS_EVERY = 0.5  # seconds between rewrites of status.json while disks progress


def finished_disks(plan: Plan, state: str) -> dict[tuple[str, str], str]:
    """(vm, disk) -> digest of each disk an earlier run finished."""
    out = {}
    for vm in plan.vms:
        for d in vm.disks:
            digest = done_digest(state, vm, d)
            if digest is not None:
                out[(vm.name, d.name)] = digest
    return out


def dry_run(plan: Plan, state: str | None) -> dict[str, Any]:
    """The schedule and the prediction, without copying (reads extents and a sample)."""
    done = set(finished_disks(plan, state)) if state and os.path.isdir(state) else set()
    return predict(plan, measure(plan, done), done, time.time())


async def run_plan(plan: Plan, state: str, *, say: Callable[[str], None] = lambda s: None
                   ) -> dict[str, Any]:
    """Run the plan to its end; the report (failed disks are in it, not raised)."""
    lock = PlanLock(state)
    try:
        return await _PlanRun(plan, state, say).go()
    finally:
        lock.close()


class _PlanRun:
    def __init__(self, plan: Plan, state: str, say: Callable[[str], None]) -> None:
        self.plan, self.state, self.say = plan, state, say
        self.slots = Slots(plan.per_host, plan.overall)
        self.cond = asyncio.Condition()
        self.waiting: dict[str, int] = {}  # host -> later passes waiting for a slot
        self.rows: dict[tuple[str, str], DiskRun] = {}
        self.tasks: set[asyncio.Task] = set()
        self.started = time.time()
        self.measured: Measured | None = None
        self.prediction: dict[str, Any] = {}
        self.refreshed: float | None = None
        self.last_write = 0.0
        self.last_shape: list = []
        self.crashed: BaseException | None = None
        self.measure_seconds = 0.0  # reading extents and samples, before the prediction

    async def go(self) -> dict[str, Any]:
        done = await asyncio.to_thread(finished_disks, self.plan, self.state)
        for vm in self.plan.vms:
            for d in vm.disks:
                row = DiskRun(vm.name, d.name, vm.host, vm.type, d.target)
                if (vm.name, d.name) in done:
                    row.state, row.finished_before = "done", True
                    row.digest = done[(vm.name, d.name)]
                self.rows[(vm.name, d.name)] = row
        self.measured = await asyncio.to_thread(measure, self.plan, set(done))
        self.measure_seconds = round(time.time() - self.started, 3)
        self.prediction = predict(self.plan, self.measured, set(done), self.started)
        for (v, d), row in self.rows.items():
            row.total = row.total or self.measured.bytes.get((v, d), 0)
        write_json(os.path.join(self.state, "plan.json"),
                   {**self.plan.to_dict(), "predicted_seconds":
                    self.prediction["predicted_seconds"]})
        self.say(f"plan: {len(done)} disks finished before, predicted "
                 f"{self.prediction['predicted_seconds']:.1f} s for the rest")
        self._write_status(force=True)
        try:
            await self._drive(jobs(self.plan, self.measured, set(done), self.started))
        finally:
            for t in self.tasks:
                t.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            for row in self.rows.values():
                if row.state not in ("done", "failed", "waiting"):
                    row.state = "stopped"
            self._write_status(force=True)
        return self._report()

    async def _drive(self, vms: list[Vm]) -> None:
        """Start VMs as slots free, until every VM has ended."""
        pending = queues(vms)
        by_name = {vm.name: vm for vm in self.plan.vms}
        async with self.cond:
            while True:
                open_hosts = {h: q for h, q in pending.items() if not self.waiting.get(h)}
                for vm in admit(open_hosts, self.slots):
                    task = asyncio.create_task(self._vm(by_name[vm.name], vm))
                    self.tasks.add(task)
                    task.add_done_callback(self._ended)
                if self.crashed is not None:
                    raise self.crashed
                if not self.tasks and not any(pending.values()):
                    return
                await self.cond.wait()

    def _ended(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.crashed = self.crashed or task.exception()  # a bug: not a TransferError
        asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self.cond:
            self.cond.notify_all()

    async def _vm(self, vm: VmSpec, sched: Vm) -> None:
        """The VM's unfinished disks at once (their slots are taken)."""
        disks = [d for d in vm.disks if d.name in {j.disk for j in sched.jobs}]
        self.say(f"{vm.name}: starting {len(disks)} disk(s) on {vm.host}")
        if one_migration(vm):
            await self._vm_migration(vm, disks)
        else:
            await asyncio.gather(*(self._disk(vm, d) for d in disks))
        await self._notify()

    async def _vm_migration(self, vm: VmSpec, disks: list) -> None:
        rows = {d.name: self.rows[(vm.name, d.name)] for d in disks}
        try:
            await run_vm_migration(vm, rows, self.state, self)
            self.say(f"{vm.name}: done, {len(rows)} disks in one migration")
        except Interrupted:
            for row in rows.values():
                row.state = "stopped"
        except TransferError as e:
            for row in rows.values():
                row.state, row.error, row.exit_code = "failed", str(e), e.exit_code
            self.say(f"{vm.name}: failed: {e}")
        self._write_status(force=True)

    async def _disk(self, vm: VmSpec, d) -> None:
        row = self.rows[(vm.name, d.name)]
        try:
            await run_disk(vm, d, row, self.state, self)
            self.say(f"{vm.name}/{d.name}: done ({row.digest})")
        except Interrupted:  # a signal cancelled the run (which raises it): the disk's own
            row.state = "stopped"  # state resumes it in the next run
        except TransferError as e:
            row.state, row.error, row.exit_code = "failed", str(e), e.exit_code
            self.say(f"{vm.name}/{d.name}: failed: {e}")
        self._write_status(force=True)

    # the gate work.run_disk passes its slots through
    async def acquire(self, host: str) -> None:
        async with self.cond:
            self.waiting[host] = self.waiting.get(host, 0) + 1
            try:
                await self.cond.wait_for(lambda: self.slots.fits(host, 1))
            finally:
                self.waiting[host] -= 1
            self.slots.take(host)

    async def release(self, host: str) -> None:
        async with self.cond:
            self.slots.give(host)
            self.cond.notify_all()

    def changed(self) -> None:
        self._write_status()

    def _write_status(self, force: bool = False) -> None:
        """status.json again: at once when a disk's state or pass changed, else at most every
        STATUS_EVERY seconds."""
        now = time.monotonic()
        shape = [(r.state, r.pass_) for r in self.rows.values()]
        if not force and shape == self.last_shape and now - self.last_write < STATUS_EVERY:
            return
        self.last_write, self.last_shape = now, shape
        self.refreshed = self._refresh()
        write_json(os.path.join(self.state, "status.json"), {
            "started": self.started, "updated": time.time(),
            "elapsed": round(time.time() - self.started, 3),
            "predicted_seconds": self.prediction.get("predicted_seconds"),
            "predicted_remaining": self.refreshed,
            "limits": self.prediction.get("limits"),
            "disks": [r.to_dict() for r in self.rows.values()]})

    def _refresh(self) -> float | None:
        """The plan's remaining seconds, simulated again with the hosts' measured rates (the
        sum of the rates of the disks copying there now) and the bytes left."""
        if self.measured is None:
            return None
        rates = dict(self.measured.rates)
        live: dict[str, float] = {}
        for r in self.rows.values():
            if r.state in ("copying", "cutover") and r.rate:
                live[r.host] = live.get(r.host, 0.0) + r.rate
        rates.update(live)
        vms: dict[str, Vm] = {}
        for vm in jobs(self.plan, self.measured, set(), self.started):
            left = [j for j in vm.jobs if self.rows[(vm.name, j.disk)].state != "done"]
            for j in left:
                row = self.rows[(vm.name, j.disk)]
                j.bytes = max(0, (row.total or j.bytes) - row.bytes)
                j.cutover = None if j.cutover is None else max(
                    0.0, j.cutover - (time.time() - self.started))
            if left:
                vms[vm.name] = Vm(vm.name, vm.host, left)
        return round(simulate(vms.values(), rates, self.plan.per_host, self.plan.overall)[0], 3)

    def _hosts(self) -> dict[str, Any]:
        """The predicted hosts, each with its measured rate: the bytes its disks copied in
        this run over the span from its first start to its last end."""
        hosts = {h: dict(v) for h, v in (self.prediction.get("hosts") or {}).items()}
        for host, h in hosts.items():
            ran = [r for r in self.rows.values() if r.host == host and r.started is not None]
            span = (max((r.started + r.seconds for r in ran), default=0.0)
                    - min((r.started for r in ran), default=0.0))
            copied = sum(r.total for r in ran if r.state == "done")
            h["measured_rate"] = round(copied / span, 1) if ran and span > 0 else None
        return hosts

    def _report(self) -> dict[str, Any]:
        rows = self.rows.values()
        failed = [r for r in rows if r.state == "failed"]
        return {"predicted_seconds": self.prediction.get("predicted_seconds"),
                "seconds": round(time.time() - self.started, 3),
                "measure_seconds": self.measure_seconds,  # in seconds, not in the prediction
                "limits": self.prediction.get("limits"),
                "hosts": self._hosts(),
                "schedule": self.prediction.get("schedule"),
                "vms": [{"name": vm.name, "host": vm.host, "type": vm.type,
                         "disks": [self.rows[(vm.name, d.name)].to_dict() for d in vm.disks]}
                        for vm in self.plan.vms],
                "failed": len(failed), "done": sum(r.state == "done" for r in rows),
                "exit_code": max((r.exit_code for r in failed), default=0)}
