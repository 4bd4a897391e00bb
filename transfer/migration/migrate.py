"""transfer migrate: a whole cold, warm or live migration of the disks of a VM held by
qemu-storage-daemon (one node, or several: `--disk NODE=TARGET`, repeated).

    pass 0     bitmap transfer-1 is added (recording) before the first read (R1),
               then everything is copied
    pass k     one QMP transaction adds transfer-(k+1) and disables transfer-k,
               the node is exported read-only with transfer-k, and `sync` copies
               what it names (merged with base:allocation); once the pass is
               committed, the export and transfer-k are removed (R3)
    cutover    the --on-cutover command stops the VM; the last bitmap is
               disabled, the final pass copies it, the target is read back
               where it was not yet, and the state is complete

Each pass is transfer.migration.warm (sync) under the hood, so a killed migration run
again resumes the interrupted pass (the bitmaps it needs are still on the
node: they are removed only after their pass committed). If they are gone
(the daemon restarted), the pass becomes a compare pass and says so, and a
new bitmap starts recording. A run killed after a hand-over but before it
logged that pass leaves transfer-k disabled and transfer-(k+1) recording:
a later pass k resumes under transfer-k (transfer-(k+1) goes on recording),
and a final pass merges transfer-k into transfer-(k+1) and copies that (R3:
B_k and B_k+1). A warm pass that finds its bitmap disabled with none after
it (an interrupted final pass; the VM may have run since) compares (R2).
The daemon side lives in transfer.migration.checkpoints, the model and the
live rule in transfer.migration.live, the stop command in
transfer.migration.cutover, the disks in transfer.migration.vmdisks.

Several disks: every pass runs over all of them. One QMP transaction hands all the nodes'
bitmaps over together (the disks' deltas cut at the same instant), the disks' sync passes
run side by side (each on its own state, DIR/disks/NODE), and the pass is logged for all of
them in one durable write of the migration's log. Before the VM is stopped (once) every
target is checked ready; a refused one fails the migration naming its disk, with the VM
still running: all or nothing before the stop. Then the final passes run side by side, each
read back. The downtime prediction is the whole VM's (transfer.migration.live).

A signal (the CLI cancels the task) acts in every phase: QMP exchanges and
--on-cutover run off the event loop, a pass commits what it finished, and
a running --on-cutover is terminated with its process group. Interrupted
(and every TransferError) carries .report: the passes so far and whether
the VM was stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import os
import time
from dataclasses import asdict
from typing import Any, AsyncContextManager, Callable

from ..units import parse_when
from ..errors import BadInput, Interrupted, NotConverging, TransferError
from ..qmp import QmpError
from ..reports import MigrateReport, PassInfo, SyncReport
from .checkpoints import PREFIX, Daemon, Monitor, connect_qmp, hand_over, merge_unlogged
from .cutover import run_stop_command
from .live import Model, converged
from .vmdisks import VmDisk, aggregate, check_ready, named, run_all
from .vmplan import MigrationLog, PassGate, Plan, disk_pairs, interrupted, request_cutover
from .warm import sync_async

__all__ = ["migrate_async", "request_cutover"]


async def migrate_async(target: str | None = None, *, kind: str, qmp: str, state: str,
                        node: str | None = None, disks: list[tuple[str, str]] | None = None,
                        nbd_socket: str | None = None, precopy_interval: float = 3600.0,
                        cutover: str | None = None, max_downtime: float = 5.0,
                        on_cutover: str | None = None, cutover_timeout: float = 300.0,
                        max_passes: int = 100, on_pass: Callable[[PassInfo], None] | None = None,
                        on_progress: Callable | None = None, verify_source: bool = False,
                        stop_estimate: float = 0.0, pass_gate: PassGate | None = None,
                        **sync_options: Any) -> MigrateReport:
    """Migrate the block node `node` of the qemu-storage-daemon at `qmp` onto target, or the
    VM's disks `disks`, a list of (node, target): one migration, one stop.

    Cancelled (or a pass interrupted), it raises Interrupted saying where it stopped and
    whether the VM was stopped; a TransferError raised here has .report (the MigrateReport
    so far, cutover["vm_stopped"] and cutover["on_cutover"] included). Run it again to resume.
    verify_source: the final pass also reads and hashes the whole source again (the VM is
    stopped: downtime that grows with the disk's data, and the prediction counts it).
    stop_estimate: the seconds stopping the VM (on_cutover) is expected to take, counted in the
    predicted downtime until a cutover has measured it (only the caller knows its stop before
    the first one: a QMP stop takes milliseconds, a guest shutdown seconds).
    pass_gate: pass_gate(n_disks) returns an async context manager that is entered before
    each pass copies (a final pass's before the VM is stopped) and left once it ended: a
    scheduler's slots, one per disk while copying, none between precopy passes.
    With several disks, a source_id is made each disk's as SOURCE_ID/NODE.
    """
    if kind not in ("cold", "warm", "live"):
        raise BadInput(f"--type must be cold, warm or live, not {kind!r}")
    if precopy_interval < 0 or max_downtime <= 0 or cutover_timeout <= 0 or stop_estimate < 0:
        raise BadInput("durations must be positive")
    pairs = disk_pairs(target, node, disks)
    when = parse_when(cutover) if cutover is not None else None
    plan = Plan(kind, pairs, qmp, nbd_socket, precopy_interval, when, cutover == "now",
                max_downtime, on_cutover, cutover_timeout, max_passes, verify_source,
                stop_estimate, pass_gate)
    m = Migration(state, plan, on_pass=on_pass, on_progress=on_progress,
                  sync_options=sync_options)
    return await m.run()


class Migration:
    def __init__(self, state: str, plan: Plan, *,
                 on_pass: Callable[[PassInfo], None] | None, on_progress: Callable | None,
                 sync_options: dict[str, Any]) -> None:
        self.state, self.p = state, plan
        self.on_pass, self.on_progress, self.sync_options = on_pass, on_progress, sync_options
        self.model = Model()
        self.model.stop_seconds = plan.stop_estimate  # until a cutover measures the stop
        self.disks = VmDisk.layout(plan.disks, state)
        self.several = len(self.disks) > 1
        # the log names its node (one disk, as it always did) or its nodes, in order
        self.log = MigrationLog(os.path.join(state, "migrate.json"),
                                [x.node for x in self.disks] if self.several
                                else plan.disks[0][0], plan.kind)
        self.signal_path = os.path.join(state, "cutover")
        self.report = MigrateReport(plan.kind, ",".join(x.target for x in self.disks),
                                    ",".join(x.node for x in self.disks), 0)
        self.phase = "before the first pass"  # where a signal finds the migration
        self.vm = "not stopped"  # the VM as --on-cutover left it

    # -- one pass over every disk

    def _gate(self, n: int) -> AsyncContextManager[Any]:
        return self.p.pass_gate(n) if self.p.pass_gate is not None else contextlib.nullcontext()

    async def _sync(self, x: VmDisk, bitmap: str | None, k: int, final: bool) -> SyncReport:
        """Disk x's sync pass k, from its export (with bitmap); errors name the disk."""
        d = x.daemon
        assert d is not None
        options = dict(self.sync_options)
        if self.several and options.get("source_id") is not None:
            options["source_id"] = f"{options['source_id']}/{x.node}"
        try:
            uri = await d.export(bitmap)
            try:  # the guest still writes before the final pass: what the tracker audit
                # finds changed there, bitmap k+1 (the next pass's) must name (audit_live)
                return await sync_async(
                    uri, x.target, state=x.state, dirty_bitmap=bitmap,
                    compare=bitmap is None and k > 0, checkpoint=f"{PREFIX}{k}", final=final,
                    on_progress=self.on_progress, audit_live=not final,
                    verify_source=final and self.p.verify_source, **options)
            finally:
                await d.unexport()
        except TransferError as e:
            if self.several:
                raise named(e, x.node)
            raise

    async def _pass(self, log: dict[str, Any], *, final: bool) -> list[PassInfo]:
        entered = time.monotonic()  # the pass's whole cost: QMP hand-over and export included
        todo = [x for x in self.disks if not final or x.completed() is None]
        daemons: list[Daemon] = [x.daemon for x in todo]  # type: ignore[misc]
        for d in daemons:
            await d.unexport()  # a killed run's export keeps its bitmap busy (merge, remove)
        cold = self.p.kind == "cold"
        notes = await merge_unlogged(daemons, log, self.log.save, cold) if final else {}
        k = log["next"]
        chosen = await hand_over(daemons, log, final=final, cold=cold)
        self.log.save(log)
        recorded = None
        if k >= 1 and str(k - 1) in log["handover"]:
            recorded = log["handover"][str(k)] - log["handover"][str(k - 1)]
        began = time.time()
        reports = await run_all([self._sync(x, bitmap, k, final)
                                 for x, (bitmap, _) in zip(todo, chosen)])
        copy_rate, dirty_rate = self.model.add(aggregate(reports), recorded,
                                               time.monotonic() - entered)
        start = datetime.datetime.fromtimestamp(began).isoformat(timespec="milliseconds")
        infos = [PassInfo(k, start, r.change_source, fallback or r.fallback, r.delta_bytes,
                          r.bytes_copied, r.seconds, copy_rate, dirty_rate, None, final,
                          notes.get(x.node), x.node)
                 for x, (_, fallback), r in zip(todo, chosen, reports)]
        log["next"] = k + 1
        log["passes"] += [asdict(i) for i in infos]
        self.log.save(log)  # one durable write: pass k of every disk
        for d, (bitmap, _) in zip(daemons, chosen):
            if bitmap is not None and not final:  # R3: only once committed and logged
                await d.drop(bitmap)
        self.report.passes += infos
        for x, r in zip(todo, reports):
            self._digest(x, r.digest)
        return infos

    def _digest(self, x: VmDisk, digest: str) -> None:
        """Disk x's digest so far, in report.disks (and report.digest for one disk)."""
        entry = next(e for e in self.report.disks if e["node"] == x.node)
        entry["digest"] = digest
        if not self.several:
            self.report.digest = digest

    def _predict(self, log: dict[str, Any]) -> tuple[float, float | None]:
        """(seconds since the last hand-over, the downtime a cutover now would take): the
        VM's, every disk's unverified data and (--verify source) source data summed."""
        since = time.time() - log["handover"][str(log["next"] - 1)]
        unverified = sum(x.unverified_bytes() for x in self.disks)
        source = sum(x.source_data() for x in self.disks) if self.p.verify_source else 0
        return since, self.model.predict(since, unverified, source)
    # -- the run

    def _cutover_due(self) -> bool:
        if self.p.cutover_now or os.path.exists(self.signal_path):
            return True
        return self.p.cutover_at is not None and time.time() >= self.p.cutover_at

    async def _stop_vm(self) -> float:
        """Run --on-cutover (transfer.migration.cutover); its seconds, 0 without one."""
        if not self.p.on_cutover:
            return 0.0

        def note(vm: str) -> None:
            self.vm = vm

        return await run_stop_command(self.p.on_cutover, self.p.cutover_timeout, note)

    async def run(self) -> MigrateReport:
        os.makedirs(self.state, mode=0o700, exist_ok=True)
        started = time.monotonic()
        lock = os.open(os.path.join(self.state, "migrate.lock"),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise BadInput("another migration runs on this state", disk=self.state,
                           kind="state") from None
        try:
            return await self._run(started)
        except (asyncio.CancelledError, Interrupted):
            # a signal (the CLI cancels this task) or a cancelled caller: the pass under way
            # committed what it finished (sync); say where it stopped and what the VM is
            e = interrupted(self.phase, self.vm, self.p.on_cutover)
            self._note_vm()
            e.report = self.report  # type: ignore[attr-defined]
            raise e from None
        except TransferError as e:
            self._note_vm()
            e.report = self.report  # type: ignore[attr-defined]
            raise
        finally:
            os.close(lock)

    def _note_vm(self) -> None:
        """cutover.vm_stopped: True once --on-cutover completed, None without one (the VM is
        the caller's), else False (not run, failed, timed out or terminated: see on_cutover)."""
        if not self.p.on_cutover:
            self.report.cutover.update(on_cutover="none given", vm_stopped=None)
        else:
            self.report.cutover.update(on_cutover=self.vm, vm_stopped=self.vm.startswith("stopped"))

    async def _run(self, started: float) -> MigrateReport:
        q = Monitor(await connect_qmp(self.p.qmp))
        try:
            await self._attach(q)
            log = self.log.load()
            report = self.report
            for p in log["passes"]:  # from an earlier, interrupted run
                p = dict(p)
                report.passes.append(PassInfo(p.pop("pass_"), **p))
            done = [x.completed() for x in self.disks]
            for x, digest in zip(self.disks, done):
                if digest is not None:
                    self._digest(x, digest)
            if all(digest is not None for digest in done):  # killed after the final passes
                report.cutover = {"note": "the final pass completed in an earlier run"}
            else:
                await check_ready(self.disks)  # a refused target fails before any pass
                if self.p.kind != "cold":
                    await self._precopy(log)
                predicted = None if self.p.kind == "cold" else self._predict(log)[1]
                report.cutover = await self._cutover(log, predicted)
                self._note_vm()
            for x, entry in zip(self.disks, report.disks):
                entry["size"] = x.size()
            report.size = sum(e["size"] for e in report.disks)
        finally:
            q.close()
        report.seconds = round(time.monotonic() - started, 3)
        return report

    async def _attach(self, q: Monitor) -> None:
        """Every node exists; each disk gets its daemon view, the daemon an NBD server."""
        for x in self.disks:
            try:
                await q.node(x.node)
            except QmpError as e:
                raise BadInput(e.message, disk=self.p.qmp, kind="qmp") from None
        socket = self.p.nbd_socket
        for x in self.disks:
            x.attach(q, self.p.qmp, self.state, socket, self.several)
            assert x.daemon is not None
            await x.daemon.nbd_server()  # the first starts it (unless named), the rest share it
            socket = x.daemon.nbd_socket
        self.report.disks = [{"node": x.node, "target": x.target, "size": 0, "digest": ""}
                             for x in self.disks]

    async def _precopy(self, log: dict[str, Any]) -> None:
        """Warm: a pass every --precopy-interval until the cutover is due; live: passes back
        to back until they converge (transfer.migration.live) or the cutover is due."""
        deltas: list[int] = []
        while True:
            if log["next"] == 0 or not self._cutover_due():
                self.phase = f"during pass {log['next']}"
                async with self._gate(len(self.disks)):
                    infos = await self._pass(log, final=False)
                since, predicted = self._predict(log)
                for info in infos:
                    info.predicted_downtime = predicted  # the VM's, on each disk's pass
                vm = _whole(infos)
                if vm.pass_ >= 1:
                    deltas.append(vm.delta_bytes)
                if self.on_pass is not None:
                    for info in infos:
                        self.on_pass(info)
            if self._cutover_due():
                return
            if self.p.kind == "live":
                try:
                    if converged(self.model, vm, since, deltas, log["next"],
                                 max_downtime=self.p.max_downtime, max_passes=self.p.max_passes):
                        self.report.converged = True
                        return
                except NotConverging:
                    self.report.converged = False
                    raise
                continue
            self.phase = "in the precopy wait"
            wait_until = time.monotonic() + self.p.precopy_interval
            while time.monotonic() < wait_until and not self._cutover_due():
                await asyncio.sleep(min(0.2, max(0.0, wait_until - time.monotonic())))

    async def _cutover(self, log: dict[str, Any], predicted: float | None) -> dict[str, Any]:
        """Check every disk ready, stop the VM (once), take the disks' final passes side by
        side; the report's one cutover record."""
        self.phase = "before the --on-cutover command"
        todo = [x for x in self.disks if x.completed() is None]
        await check_ready(todo)  # all or nothing: a refused target fails before the stop
        async with self._gate(len(todo)):  # slots taken before the stop: no downtime waiting
            self.phase = "while the --on-cutover command ran"
            stop = await self._stop_vm()
            began = time.monotonic()
            self.phase = "during the final pass"
            infos = await self._pass(log, final=True)
        downtime = stop + time.monotonic() - began
        if self.p.kind == "cold":
            return {"stop_seconds": stop, "downtime": downtime}
        self.model.stop_seconds = stop
        if self.on_pass is not None:
            for info in infos:
                self.on_pass(info)
        return {"predicted_downtime": predicted, "downtime": round(downtime, 3),
                "stop_seconds": round(stop, 3), "stop_estimate": self.p.stop_estimate,
                "final_delta_bytes": _whole(infos).delta_bytes}


def _whole(infos: list[PassInfo]) -> PassInfo:
    """One pass of every disk as the VM's (the live rule's view): the deltas summed."""
    if len(infos) == 1:
        return infos[0]
    return PassInfo(infos[0].pass_, infos[0].start, infos[0].change_source, None,
                    sum(i.delta_bytes for i in infos), sum(i.bytes_copied for i in infos),
                    max(i.seconds for i in infos), infos[0].copy_rate, infos[0].dirty_rate,
                    infos[0].predicted_downtime, infos[0].final)
