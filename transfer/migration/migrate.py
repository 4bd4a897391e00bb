"""transfer migrate: a whole cold, warm or live migration of a disk held by qemu-storage-daemon.

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
transfer.migration.cutover.

A signal (the CLI cancels the task) acts in every phase: QMP exchanges and
--on-cutover run off the event loop, a pass commits what it finished, and
a running --on-cutover is terminated with its process group. Interrupted
(and every TransferError) carries .report: the passes so far and whether
the VM was stopped.
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from ..durable import write_atomic
from ..units import parse_when
from ..errors import BadInput, Interrupted, NotConverging, TransferError
from ..integrity import POISON, Manifest
from ..qmp import QmpError
from ..reports import MigrateReport, PassInfo
from ..state.journal import Journal
from ..state.records import load_state, pending_ranges
from ..tracking.areas import union_runs
from .checkpoints import PREFIX, Daemon, Monitor, connect_qmp
from .cutover import run_stop_command
from .live import Model, converged
from .warm import sync_async

__all__ = ["migrate_async", "request_cutover"]

@dataclass
class Plan:
    """What migrate_async was asked to do (its keyword arguments, checked)."""

    kind: str
    node: str
    qmp: str
    nbd_socket: str | None
    precopy_interval: float
    cutover_at: float | None
    cutover_now: bool
    max_downtime: float
    on_cutover: str | None
    cutover_timeout: float
    max_passes: int
    verify_source: bool
    stop_estimate: float = 0.0


async def migrate_async(target: str, *, kind: str, qmp: str, node: str, state: str,
                        nbd_socket: str | None = None, precopy_interval: float = 3600.0,
                        cutover: str | None = None, max_downtime: float = 5.0,
                        on_cutover: str | None = None, cutover_timeout: float = 300.0,
                        max_passes: int = 100, on_pass: Callable[[PassInfo], None] | None = None,
                        on_progress: Callable | None = None, verify_source: bool = False,
                        stop_estimate: float = 0.0, **sync_options: Any) -> MigrateReport:
    """Migrate the block node `node` of the qemu-storage-daemon at `qmp` onto target.

    Cancelled (or a pass interrupted), it raises Interrupted saying where it stopped and
    whether the VM was stopped; a TransferError raised here has .report (the MigrateReport
    so far, cutover["vm_stopped"] and cutover["on_cutover"] included). Run it again to resume.
    verify_source: the final pass also reads and hashes the whole source again (the VM is
    stopped: downtime that grows with the disk's data, and the prediction counts it).
    stop_estimate: the seconds stopping the VM (on_cutover) is expected to take, counted in the
    predicted downtime until a cutover has measured it (only the caller knows its stop before
    the first one: a QMP stop takes milliseconds, a guest shutdown seconds).
    """
    if kind not in ("cold", "warm", "live"):
        raise BadInput(f"--type must be cold, warm or live, not {kind!r}")
    if precopy_interval < 0 or max_downtime <= 0 or cutover_timeout <= 0 or stop_estimate < 0:
        raise BadInput("durations must be positive")
    when = parse_when(cutover) if cutover is not None else None
    plan = Plan(kind, node, qmp, nbd_socket, precopy_interval, when, cutover == "now",
                max_downtime, on_cutover, cutover_timeout, max_passes, verify_source,
                stop_estimate)
    m = Migration(target, state, plan, on_pass=on_pass, on_progress=on_progress,
                  sync_options=sync_options)
    return await m.run()


def request_cutover(state: str) -> None:
    """`transfer cutover`: ask the migration running on state to cut over after its pass."""
    if not os.path.isdir(state):
        raise BadInput("no migration state here", disk=state, kind="state")
    fd = os.open(os.path.join(state, "cutover"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)


class Migration:
    def __init__(self, target: str, state: str, plan: Plan, *,
                 on_pass: Callable[[PassInfo], None] | None, on_progress: Callable | None,
                 sync_options: dict[str, Any]) -> None:
        self.target, self.state, self.p = target, state, plan
        self.on_pass, self.on_progress, self.sync_options = on_pass, on_progress, sync_options
        self.model = Model()
        self.model.stop_seconds = plan.stop_estimate  # until a cutover measures the stop
        self.sync_state = os.path.join(state, "sync")
        self.log_path = os.path.join(state, "migrate.json")
        self.signal_path = os.path.join(state, "cutover")
        self.report = MigrateReport(plan.kind, target, plan.node, 0)
        self.phase = "before the first pass"  # where a signal finds the migration
        self.vm = "not stopped"  # the VM as --on-cutover left it

    # -- the migration's own log: which pass is next, and the passes so far

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.log_path) as f:
                log = json.load(f)
        except FileNotFoundError:
            return {"next": 0, "passes": [], "handover": {}}
        except (OSError, ValueError) as e:
            raise BadInput(f"unreadable migration log: {e}", disk=self.log_path,
                           kind="state") from None
        if (not isinstance(log, dict) or not isinstance(log.get("next"), int)
                or not isinstance(log.get("passes"), list)
                or not isinstance(log.get("handover"), dict) or log.get("node") != self.p.node
                or log.get("type") != self.p.kind):
            raise BadInput("the migration log is not for this node and type", disk=self.log_path,
                           kind="state")
        return log

    def _save(self, log: dict[str, Any]) -> None:
        log.update(node=self.p.node, type=self.p.kind)
        write_atomic(self.log_path, json.dumps(log).encode())

    # -- one pass

    async def _pass(self, d: Daemon, log: dict[str, Any], *, final: bool) -> PassInfo:
        entered = time.monotonic()  # the pass's whole cost: QMP hand-over and export included
        await d.unexport()  # a killed run's export keeps its bitmap busy (merge, remove)
        cold = self.p.kind == "cold"
        note = await d.merge_unlogged(log, self._save, cold) if final else None
        k = log["next"]
        bitmap, fallback = await d.hand_over(log, final=final, cold=cold)
        self._save(log)
        recorded = None
        if k >= 1 and str(k - 1) in log["handover"]:
            recorded = log["handover"][str(k)] - log["handover"][str(k - 1)]
        uri = await d.export(bitmap)
        began = time.time()
        try:  # the guest still writes before the final pass: what the tracker audit finds
            # changed there, bitmap k+1 (the next pass's) must name (sync's audit_live)
            r = await sync_async(uri, self.target, state=self.sync_state, dirty_bitmap=bitmap,
                                 compare=bitmap is None and k > 0, checkpoint=f"{PREFIX}{k}",
                                 final=final, on_progress=self.on_progress, audit_live=not final,
                                 verify_source=final and self.p.verify_source,
                                 **self.sync_options)
        finally:
            await d.unexport()
        copy_rate, dirty_rate = self.model.add(r, recorded, time.monotonic() - entered)
        self.report.digest = r.digest
        start = datetime.datetime.fromtimestamp(began).isoformat(timespec="milliseconds")
        info = PassInfo(k, start, r.change_source, fallback or r.fallback, r.delta_bytes,
                        r.bytes_copied, r.seconds, copy_rate, dirty_rate, None, final, note)
        log["next"] = k + 1
        log["passes"].append(asdict(info))
        self._save(log)
        if bitmap is not None and not final:  # R3: only once the pass is committed and logged
            await d.drop(bitmap)
        self.report.passes.append(info)
        return info

    def _manifest(self) -> Manifest:
        return Manifest.open(os.path.join(self.sync_state, "manifest"))

    def _source_data(self) -> int:
        """With --verify source: the source's data as copied (the manifest's non-zero blocks),
        which the final pass reads and hashes again; else 0."""
        if not self.p.verify_source:
            return 0
        m = self._manifest()
        try:
            return m.size - sum(n for _, n in m.zero_runs(0, m.size))
        finally:
            m.close()

    def _unverified_bytes(self) -> int:
        """The target's data that a final pass would read back besides its own delta: what
        the passes since the last read-back wrote (a crash before a pass's read-back, or a
        pass run with --read-back final), and blocks a read-back found wrong."""
        with Journal.open(os.path.join(self.sync_state, "journal"), create=False) as j:
            st = load_state(self.sync_state, j)
        m = self._manifest()
        try:
            runs = union_runs(pending_ranges(st, m.size), m.runs_of(POISON), m.size)
            return sum(e - s - sum(n for _, n in m.zero_runs(s, e - s)) for s, e in runs)
        finally:
            m.close()

    def _predict(self, log: dict[str, Any]) -> tuple[float, float | None]:
        """(seconds since the last hand-over, the downtime a cutover now would take)."""
        since = time.time() - log["handover"][str(log["next"] - 1)]
        return since, self.model.predict(since, self._unverified_bytes(), self._source_data())

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

    def _interrupted(self) -> Interrupted:
        """The one line a signal ends a migration with: where it was, and the VM's state."""
        where = self.phase
        if self.vm.startswith("stopped"):
            vm = "the VM was stopped (--on-cutover completed)"
        elif self.vm != "not stopped":
            vm = ("the --on-cutover command was terminated before it completed: the VM may "
                  "still run")
        elif self.p.on_cutover:
            vm = "the VM was not stopped (--on-cutover had not run)"
        else:
            vm = "no --on-cutover command was given"
        return Interrupted(f"interrupted by a signal {where}; {vm}; no final pass finished; "
                           "the same command resumes the migration")

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
            e = self._interrupted()
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
            try:
                await q.node(self.p.node)
            except QmpError as e:
                raise BadInput(e.message, disk=self.p.qmp, kind="qmp") from None
            d = Daemon(q, self.p.node, self.p.qmp, self.state, self.p.nbd_socket)
            await d.nbd_server()
            log = self._load()
            report = self.report
            for p in log["passes"]:  # from an earlier, interrupted run
                p = dict(p)
                report.passes.append(PassInfo(p.pop("pass_"), **p))
            done = self._completed()
            if done is not None:  # killed after its final pass completed, before logging it
                report.digest = done
                report.cutover = {"note": "the final pass completed in an earlier run"}
            elif self.p.kind == "cold":
                report.cutover = await self._cutover(d, log, predicted=None)
            else:
                await self._precopy(d, log)
                report.cutover = await self._cutover(d, log, predicted=self._predict(log)[1])
            if done is None:
                self._note_vm()
            report.size = self._manifest_size()
        finally:
            q.close()
        report.seconds = round(time.monotonic() - started, 3)
        return report

    def _completed(self) -> str | None:
        """The digest of the state's final pass if it completed (sync's journal says so)."""
        path = os.path.join(self.sync_state, "journal")
        if not os.path.exists(path):
            return None
        with Journal.open(path, create=False) as j:
            last = j.records[-1] if j.records else {}
        return str(last.get("digest", "")) if last.get("t") == "complete" else None

    def _manifest_size(self) -> int:
        m = self._manifest()
        try:
            return m.size
        finally:
            m.close()

    async def _precopy(self, d: Daemon, log: dict[str, Any]) -> None:
        """Warm: a pass every --precopy-interval until the cutover is due; live: passes back
        to back until they converge (transfer.migration.live) or the cutover is due."""
        deltas: list[int] = []
        while True:
            if log["next"] == 0 or not self._cutover_due():
                self.phase = f"during pass {log['next']}"
                info = await self._pass(d, log, final=False)
                if info.pass_ >= 1:
                    deltas.append(info.delta_bytes)
                since, info.predicted_downtime = self._predict(log)
                self.report.passes[-1] = info
                if self.on_pass is not None:
                    self.on_pass(info)
            if self._cutover_due():
                return
            if self.p.kind == "live":
                try:
                    if converged(self.model, info, since, deltas, len(self.report.passes),
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

    async def _cutover(self, d: Daemon, log: dict[str, Any],
                       predicted: float | None) -> dict[str, Any]:
        """Stop the VM and take the final pass; the report's cutover record."""
        self.phase = "while the --on-cutover command ran"
        stop = await self._stop_vm()
        began = time.monotonic()
        self.phase = "during the final pass"
        info = await self._pass(d, log, final=True)
        downtime = stop + time.monotonic() - began
        if self.p.kind == "cold":
            return {"stop_seconds": stop, "downtime": downtime}
        self.model.stop_seconds = stop
        if self.on_pass is not None:
            self.on_pass(info)
        return {"predicted_downtime": predicted, "downtime": round(downtime, 3),
                "stop_seconds": round(stop, 3), "stop_estimate": self.p.stop_estimate,
                "final_delta_bytes": info.delta_bytes}
