"""transfer migrate: a whole cold, warm or live migration of a disk held by qemu-storage-daemon.

    pass 0     bitmap transfer-1 is added (recording) before the first read (R1),
               then everything is copied
    pass k     one QMP transaction adds transfer-(k+1) and disables transfer-k,
               the node is exported read-only with transfer-k, and `sync` copies
               what it names (merged with base:allocation); once the pass is
               committed, the export and transfer-k are removed (R3)
    cutover    the --on-cutover command stops the VM; the last bitmap is
               disabled, the final pass copies it, the target is read back
               against the manifest, and the state is complete

Each pass is transfer.state.sync under the hood, so a killed migration run
again resumes the interrupted pass (the bitmaps it needs are still on the
node: they are removed only after their pass committed). If they are gone
(the daemon restarted), the pass becomes a compare pass and says so, and a
new bitmap starts recording. A run killed after a hand-over but before it
logged that pass leaves transfer-k disabled and transfer-(k+1) recording:
a later pass k resumes under transfer-k (transfer-(k+1) goes on recording),
and a final pass merges transfer-k into transfer-(k+1) and copies that (R3:
B_k and B_k+1). A warm pass that finds its bitmap disabled with none after
it (an interrupted final pass; the VM may have run since) compares (R2).

A signal (the CLI cancels the task) acts in every phase: QMP exchanges and
--on-cutover run off the event loop, a pass commits what it finished, and
a running --on-cutover is terminated with its process group. Interrupted
(and every TransferError) carries .report: the passes so far and whether
the VM was stopped.

The change-rate model, after each pass k >= 1: the guest's dirty rate is
what bitmap k named over the time it recorded; a pass is taken to last a
fixed overhead plus what it moves over the copy rate, the copy rate coming
from big passes (pass 0) and the overhead from the smallest remainder of
the others; the predicted downtime if cutover happened now is the stop
command's time (from the last cutover, else 0) + overhead + the delta the
guest has dirtied since the last hand-over over the copy rate + the final
read-back: that delta and what is still unverified (a pass killed before
its read-back, blocks a read-back found wrong) over the read-back rate,
measured by pass 0's own read-back of everything it wrote (every pass
reads back what it wrote, so this does not grow with the disk) + with
--verify source, the source's data over the copy rate.
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict
from typing import Any, Callable

from .durable import write_atomic
from .errors import BadInput, Interrupted, NotConverging, SourceError, TransferError
from .qmp import Qmp, QmpError
from .state.journal import Journal
from .reports import MigrateReport, PassInfo, SyncReport
from .state.sync import sync_async

PREFIX = "transfer-"
BIG_PASS = 64 << 20  # bytes moved by a pass that says more about the copy rate than overhead
EXPORT = "transfer-src"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    """'90', '90s', '1.5m', '60m', '2h', '500ms' -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise BadInput(f"not a duration: {text!r} (examples: 30s, 60m, 1h)")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def parse_when(text: str) -> float | None:
    """'now' -> None (at once); an ISO 8601 time -> its epoch seconds (naive means local)."""
    if text == "now":
        return None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(f"--cutover {text!r} is not 'now' or an ISO 8601 time") from None
    return when.timestamp()


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


class Migration:
    def __init__(self, target: str, *, kind: str, qmp: str, node: str, state: str,
                 nbd_socket: str | None, precopy_interval: float, cutover: float | None,
                 cutover_now: bool, max_downtime: float, on_cutover: str | None,
                 cutover_timeout: float, max_passes: int,
                 on_pass: Callable[[PassInfo], None] | None,
                 on_progress: Callable | None, sync_options: dict[str, Any]) -> None:
        if kind not in ("cold", "warm", "live"):
            raise BadInput(f"--type must be cold, warm or live, not {kind!r}")
        self.target, self.kind, self.node, self.state = target, kind, node, state
        self.qmp_path, self.nbd_socket = qmp, nbd_socket
        self.precopy_interval, self.cutover_at, self.cutover_now = (precopy_interval, cutover,
                                                                    cutover_now)
        self.max_downtime, self.on_cutover, self.cutover_timeout = (max_downtime, on_cutover,
                                                                    cutover_timeout)
        self.max_passes = max_passes
        self.on_pass, self.on_progress, self.sync_options = on_pass, on_progress, sync_options
        self.model = Model()
        self.verify_source = False  # the final pass hashes the whole source again
        self.sync_state = os.path.join(state, "sync")
        self.log_path = os.path.join(state, "migrate.json")
        self.signal_path = os.path.join(state, "cutover")
        self.report = MigrateReport(kind, target, node, 0)
        self.phase = "before the first pass"  # where a signal finds the migration
        self.vm = "not stopped"  # the VM as --on-cutover left it

    # -- the daemon side

    async def _export(self, q: _Monitor, bitmap: str | None) -> str:
        await self._unexport(q)
        args: dict[str, Any] = {"type": "nbd", "id": EXPORT, "node-name": self.node,
                                "name": EXPORT, "writable": False}
        if bitmap:
            args["bitmaps"] = [bitmap]
        await q.execute("block-export-add", **args)
        return f"nbd+unix:///{EXPORT}?socket={self.nbd_socket}"

    async def _unexport(self, q: _Monitor) -> None:
        """Remove our export (if any) and wait until it is gone: its name is then free."""
        exports = await q.execute("query-block-exports")
        if not any(isinstance(e, dict) and e.get("id") == EXPORT for e in exports):
            return
        try:
            await q.execute("block-export-del", id=EXPORT)
        except QmpError:
            pass  # being deleted already
        deadline = time.monotonic() + 30
        while any(isinstance(e, dict) and e.get("id") == EXPORT
                  for e in await q.execute("query-block-exports")):
            if time.monotonic() > deadline:
                raise SourceError("the daemon did not remove our NBD export within 30 s",
                                  disk=self.qmp_path)
            await asyncio.sleep(0.02)

    async def _nbd_server(self, q: _Monitor) -> None:
        if self.nbd_socket is not None:
            return
        self.nbd_socket = os.path.join(os.path.abspath(self.state), "nbd.sock")
        try:
            await q.execute("nbd-server-start",
                            addr={"type": "unix", "data": {"path": self.nbd_socket}})
        except QmpError as e:
            if "already running" in e.message:
                raise BadInput("the daemon already runs an NBD server: name its socket with "
                               "--nbd-socket", disk=self.qmp_path) from None
            raise

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
                or not isinstance(log.get("handover"), dict) or log.get("node") != self.node
                or log.get("type") != self.kind):
            raise BadInput("the migration log is not for this node and type", disk=self.log_path,
                           kind="state")
        return log

    def _save(self, log: dict[str, Any]) -> None:
        log.update(node=self.node, type=self.kind)
        write_atomic(self.log_path, json.dumps(log).encode())

    # -- one pass

    async def _merge_unlogged(self, q: _Monitor, log: dict[str, Any]) -> str | None:
        """Before a final pass: if an earlier run handed over from bitmap k to k+1 and died
        before pass k was logged (before its sync began, during it, or after its commit), the
        target may lack what bitmap k names, and bitmap k+1 holds every write since the
        hand-over. R3: copy B_k and B_k+1. Bitmap k is merged into bitmap k+1 (the VM is
        stopped: k+1 is the last; merging again is harmless) and the final pass runs as pass
        k+1 under it, so that sync copies the union (with the tainted ranges of an unfinished
        pass k). Returns a note for the report, or None when there was no such hand-over."""
        k = log["next"]
        cur, nxt = f"{PREFIX}{k}", f"{PREFIX}{k + 1}"
        bitmaps = await q.bitmaps(self.node)
        if self.kind == "cold" or k == 0 or cur not in bitmaps or nxt not in bitmaps:
            return None
        if bitmaps[cur].get("inconsistent") or bitmaps[nxt].get("inconsistent"):
            return None  # _pass falls back to a compare pass (R2)
        await q.execute("block-dirty-bitmap-merge", node=self.node, target=nxt, bitmaps=[cur])
        # when the hand-over happened is unknown if the run died before logging it: now is
        # later than it, which only makes the bitmaps look younger than they are
        log["handover"].setdefault(str(k), time.time())
        log["next"] = k + 1
        self._save(log)  # from here pass k+1 holds the union; bitmap k may go (it is < next)
        return (f"pass {k} was not logged by an earlier run after its hand-over: bitmap {cur} "
                f"was merged into {nxt}, which the final pass copies")

    async def _pass(self, q: _Monitor, log: dict[str, Any], report: MigrateReport, *,
                    final: bool) -> PassInfo:
        entered = time.monotonic()  # the pass's whole cost: QMP hand-over and export included
        await self._unexport(q)  # a killed run's export keeps its bitmap busy (merge, remove)
        note = await self._merge_unlogged(q, log) if final else None
        k = log["next"]
        bitmaps = await q.bitmaps(self.node)
        cur, nxt = f"{PREFIX}{k}", f"{PREFIX}{k + 1}"
        for name in bitmaps:  # left by a run killed between its commit and their removal
            m = re.fullmatch(re.escape(PREFIX) + r"(\d+)", name)
            if m and int(m.group(1)) < k:
                await q.execute("block-dirty-bitmap-remove", node=self.node, name=name)
        fallback = None
        if self.kind == "cold":
            bitmap = None
        elif k == 0:
            if nxt not in bitmaps:  # R1 base case: recording before the first read
                await q.execute("block-dirty-bitmap-add", node=self.node, name=nxt)
            log["handover"]["0"] = log["handover"].get("0", time.time())
            bitmap = None
        elif (cur not in bitmaps or bitmaps[cur].get("inconsistent")
              or final and nxt in bitmaps
              or not final and nxt not in bitmaps and not bitmaps[cur].get("recording")):
            # the daemon lost it (restarted): everything may have changed (R2); or a final
            # pass found bitmap k+1 unusable for the merge; or an interrupted final pass
            # disabled bitmap k and a warm pass follows: the VM may have run unrecorded since
            if cur not in bitmaps:
                fallback = f"bitmap {cur} is gone from node {self.node}"
            elif bitmaps[cur].get("inconsistent") or final:
                fallback = f"bitmap {cur} or {nxt} of node {self.node} is inconsistent"
            else:
                fallback = (f"bitmap {cur} stopped recording (an interrupted final pass) with "
                            "no bitmap after it")
            if nxt not in bitmaps:
                await q.execute("block-dirty-bitmap-add", node=self.node, name=nxt)
            log["handover"][str(k)] = time.time()
            bitmap = None
        else:
            if nxt not in bitmaps and not final:
                await q.execute("transaction", actions=[
                    {"type": "block-dirty-bitmap-add", "data": {"node": self.node, "name": nxt}},
                    {"type": "block-dirty-bitmap-disable", "data": {"node": self.node,
                                                                    "name": cur}}])
            elif bitmaps[cur].get("recording"):  # final: the VM is stopped, nothing to hand to
                await q.execute("block-dirty-bitmap-disable", node=self.node, name=cur)
            log["handover"].setdefault(str(k), time.time())
            bitmap = cur
        self._save(log)
        recorded = None
        if k >= 1 and str(k - 1) in log["handover"]:
            recorded = log["handover"][str(k)] - log["handover"][str(k - 1)]
        uri = await self._export(q, bitmap)
        began = time.time()
        try:  # the guest still writes before the final pass: what the tracker audit finds
            # changed there, bitmap k+1 (the next pass's) must name (sync's audit_live)
            r = await sync_async(uri, self.target, state=self.sync_state, dirty_bitmap=bitmap,
                                 compare=bitmap is None and k > 0, checkpoint=cur, final=final,
                                 on_progress=self.on_progress, audit_live=not final,
                                 verify_source=final and self.verify_source,
                                 **self.sync_options)
        finally:
            await self._unexport(q)
        copy_rate, dirty_rate = self.model.add(r, recorded, time.monotonic() - entered)
        report.digest = r.digest
        info = PassInfo(k, datetime.datetime.fromtimestamp(began).isoformat(timespec="milliseconds"),
                        r.change_source, fallback or r.fallback, r.delta_bytes, r.bytes_copied,
                        r.seconds, copy_rate, dirty_rate, None, final, note)
        log["next"] = k + 1
        log["passes"].append(asdict(info))
        self._save(log)
        if bitmap is not None and not final:  # R3: only once the pass is committed and logged
            await q.execute("block-dirty-bitmap-remove", node=self.node, name=bitmap)
        report.passes.append(info)
        return info

    def _source_data(self) -> int:
        """With --verify source: the source's data as copied (the manifest's non-zero blocks),
        which the final pass reads and hashes again; else 0."""
        if not self.verify_source:
            return 0
        from .integrity import Manifest

        m = Manifest.open(os.path.join(self.sync_state, "manifest"))
        try:
            return m.size - sum(n for _, n in m.zero_runs(0, m.size))
        finally:
            m.close()

    def _unverified_bytes(self) -> int:
        """The target's data that a final pass would read back besides its own delta: what
        the passes since the last read-back wrote (a crash before a pass's read-back, or a
        pass run with --read-back final), and blocks a read-back found wrong."""
        from .integrity import Manifest
        from .state.sync import POISON, _load, _pending
        from .tracking.areas import union_runs

        with Journal.open(os.path.join(self.sync_state, "journal"), create=False) as j:
            st = _load(self.sync_state, j)
        m = Manifest.open(os.path.join(self.sync_state, "manifest"))
        try:
            runs = union_runs(_pending(st, m.size), m.runs_of(POISON), m.size)
            return sum(e - s - sum(n for _, n in m.zero_runs(s, e - s)) for s, e in runs)
        finally:
            m.close()

    def _cutover_due(self) -> bool:
        if self.cutover_now or os.path.exists(self.signal_path):
            return True
        return self.cutover_at is not None and time.time() >= self.cutover_at

    async def _stop_vm(self) -> float:
        """Run --on-cutover, without blocking the event loop: a signal meanwhile terminates
        it (its process group: it runs in a session of its own) and interrupts at once."""
        if not self.on_cutover:
            return 0.0
        began = time.monotonic()
        with tempfile.TemporaryFile() as errors:  # a file, not a pipe: nothing to drain
            try:
                proc = subprocess.Popen(shlex.split(self.on_cutover), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=errors,
                                        start_new_session=True)
            except OSError as e:
                raise BadInput(f"cannot run the --on-cutover command: {e.strerror or e}") \
                    from None
            self.vm = "unknown: --on-cutover was terminated before it completed"
            waiter = asyncio.ensure_future(asyncio.to_thread(proc.wait))
            try:
                await asyncio.wait_for(asyncio.shield(waiter), self.cutover_timeout)
            except asyncio.TimeoutError:
                self.vm = "unknown: --on-cutover timed out and was terminated"
                await _end_group(proc, waiter)
                raise SourceError(f"the --on-cutover command did not finish within "
                                  f"{self.cutover_timeout:g} s and was terminated; the VM may "
                                  "still run, no final pass was taken") from None
            except BaseException:  # cancelled (a signal): the command must not outlive us
                await _end_group(proc, waiter)
                raise
            if proc.returncode != 0:
                self.vm = f"unknown: --on-cutover failed (exit {proc.returncode})"
                errors.seek(0)
                tail = errors.read()[-4096:].decode(errors="replace").strip()[-300:]
                raise SourceError(f"the --on-cutover command failed (exit {proc.returncode}): "
                                  f"{tail}; no final pass was taken")
        self.vm = "stopped: --on-cutover completed"
        return time.monotonic() - began

    def _interrupted(self) -> Interrupted:
        """The one line a signal ends a migration with: where it was, and the VM's state."""
        where = self.phase
        if self.vm.startswith("stopped"):
            vm = "the VM was stopped (--on-cutover completed)"
        elif self.vm != "not stopped":
            vm = ("the --on-cutover command was terminated before it completed: the VM may "
                  "still run")
        elif self.on_cutover:
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
        if not self.on_cutover:
            self.report.cutover.update(on_cutover="none given", vm_stopped=None)
        else:
            self.report.cutover.update(on_cutover=self.vm, vm_stopped=self.vm.startswith("stopped"))

    async def _run(self, started: float) -> MigrateReport:
        q = _Monitor(await _connect(self.qmp_path))
        try:
            try:
                await q.node(self.node)
            except QmpError as e:
                raise BadInput(e.message, disk=self.qmp_path, kind="qmp") from None
            await self._nbd_server(q)
            log = self._load()
            report = self.report
            for p in log["passes"]:  # from an earlier, interrupted run
                p = dict(p)
                report.passes.append(PassInfo(p.pop("pass_"), **p))
            done = self._completed()
            if done is not None:  # killed after its final pass completed, before logging it
                report.digest = done
                report.cutover = {"note": "the final pass completed in an earlier run"}
                report.size = self._manifest_size()
                report.seconds = round(time.monotonic() - started, 3)
                return report
            if self.kind == "cold":
                self.phase = "while the --on-cutover command ran"
                stop = await self._stop_vm()
                began = time.monotonic()
                self.phase = "during the final pass"
                await self._pass(q, log, report, final=True)
                report.cutover = {"stop_seconds": stop, "downtime": stop + time.monotonic() - began}
            else:
                report.cutover = await self._warm(q, log, report)
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
        from .integrity import Manifest

        m = Manifest.open(os.path.join(self.sync_state, "manifest"))
        try:
            return m.size
        finally:
            m.close()

    async def _warm(self, q: _Monitor, log: dict[str, Any],
                    report: MigrateReport) -> dict[str, Any]:
        deltas: list[int] = []
        while True:
            if log["next"] == 0 or not self._cutover_due():
                self.phase = f"during pass {log['next']}"
                info = await self._pass(q, log, report, final=False)
                if info.pass_ >= 1:
                    deltas.append(info.delta_bytes)
                since = time.time() - log["handover"][str(log["next"] - 1)]
                info.predicted_downtime = self.model.predict(since, self._unverified_bytes(),
                                                             self._source_data())
                report.passes[-1] = info
                if self.on_pass is not None:
                    self.on_pass(info)
            if self._cutover_due():
                break
            if self.kind == "live":
                pred = info.predicted_downtime
                if pred is not None and pred <= self.max_downtime:
                    # it fits; cut over unless one more short pass would at least halve the
                    # final delta (a long pass, e.g. the first delta of a big disk, leaves a
                    # big one): passes then shrink to the floor the fixed cost sets
                    final = (self.model.dirty_rate or 0.0) * since
                    if info.delta_bytes <= 2 * final or len(report.passes) >= self.max_passes:
                        report.converged = True
                        break
                    continue
                # the deltas stopped shrinking (or never will fit): say so, do not loop forever
                if (len(deltas) >= 4 and deltas[-1] >= 0.9 * deltas[-2] >= 0.81 * deltas[-3]
                        and (pred is None or pred > self.max_downtime)
                        or len(report.passes) >= self.max_passes):
                    report.converged = False
                    raise NotConverging(
                        f"not converging after {len(report.passes)} passes: the guest dirties "
                        f"{(self.model.dirty_rate or 0) / 2**20:.1f} MiB/s, the engine copies "
                        f"{(self.model.copy_rate or 0) / 2**20:.1f} MiB/s, predicted downtime "
                        f"{pred if pred is not None else float('nan'):.1f} s over the "
                        f"{self.max_downtime:g} s budget, the last deltas "
                        f"{', '.join(f'{d / 2**20:.1f}' for d in deltas[-4:])} MiB stopped "
                        "shrinking; cut over anyway with `transfer cutover`, or slow the guest")
                continue
            self.phase = "in the precopy wait"
            wait_until = time.monotonic() + self.precopy_interval
            while time.monotonic() < wait_until and not self._cutover_due():
                await asyncio.sleep(min(0.2, max(0.0, wait_until - time.monotonic())))
        predicted = self.model.predict(time.time() - log["handover"][str(log["next"] - 1)],
                                       self._unverified_bytes(), self._source_data())
        self.phase = "while the --on-cutover command ran"
        stop = await self._stop_vm()
        began = time.monotonic()
        self.phase = "during the final pass"
        info = await self._pass(q, log, report, final=True)
        downtime = stop + time.monotonic() - began
        self.model.stop_seconds = stop
        if self.on_pass is not None:
            self.on_pass(info)
        return {"predicted_downtime": predicted, "downtime": round(downtime, 3),
                "stop_seconds": round(stop, 3), "final_delta_bytes": info.delta_bytes}


class _Monitor:
    """The daemon's QMP monitor for coroutines: each exchange runs on a thread (the event
    loop stays free for signals) to its end even if cancelled meanwhile (a reply left unread
    would be taken for the next command's); the cancellation is raised after it."""

    def __init__(self, q: Qmp) -> None:
        self.q = q

    async def execute(self, command: str, **arguments: Any) -> Any:
        return await _to_the_end(self.q.execute, command, **arguments)

    async def node(self, name: str) -> dict[str, Any]:
        return await _to_the_end(self.q.node, name)

    async def bitmaps(self, node: str) -> dict[str, dict[str, Any]]:
        return await _to_the_end(self.q.bitmaps, node)

    def close(self) -> None:
        self.q.close()


async def _to_the_end(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kw))
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})  # a cancelled wait leaves the task running
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        task.exception()  # retrieved: the cancellation is what the caller hears of
        raise asyncio.CancelledError
    return task.result()


async def _connect(path: str) -> Qmp:
    """Qmp(path) on a thread; cancelled meanwhile, the connection is closed once made."""
    task = asyncio.ensure_future(asyncio.to_thread(Qmp, path))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(
            lambda t: t.cancelled() or t.exception() is not None or t.result().close())
        raise


async def _end_group(proc: subprocess.Popen, waiter: asyncio.Future) -> None:
    """Terminate the process group of proc (its own session, started by us): SIGTERM, then
    after half a second SIGKILL for what is left of it; waiter (proc.wait on a thread) ends."""
    cancelled = False
    for sig, grace in ((signal.SIGTERM, 0.5), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break  # the group is gone
        if grace is not None:
            try:
                await asyncio.wait_for(asyncio.shield(waiter), grace)
            except asyncio.TimeoutError:
                pass
            except asyncio.CancelledError:  # a second signal: go on to SIGKILL
                cancelled = True
    while not waiter.done():
        try:
            await asyncio.wait({waiter})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def migrate_async(target: str, *, kind: str, qmp: str, node: str, state: str,
                        nbd_socket: str | None = None, precopy_interval: float = 3600.0,
                        cutover: str | None = None, max_downtime: float = 5.0,
                        on_cutover: str | None = None, cutover_timeout: float = 300.0,
                        max_passes: int = 100, on_pass: Callable[[PassInfo], None] | None = None,
                        on_progress: Callable | None = None, verify_source: bool = False,
                        **sync_options: Any) -> MigrateReport:
    """Migrate the block node `node` of the qemu-storage-daemon at `qmp` onto target.

    Cancelled (or a pass interrupted), it raises Interrupted saying where it stopped and
    whether the VM was stopped; a TransferError raised here has .report (the MigrateReport
    so far, cutover["vm_stopped"] and cutover["on_cutover"] included). Run it again to resume.
    verify_source: the final pass also reads and hashes the whole source again (the VM is
    stopped: downtime that grows with the disk's data, and the prediction counts it).
    """
    if precopy_interval < 0 or max_downtime <= 0 or cutover_timeout <= 0:
        raise BadInput("durations must be positive")
    when = parse_when(cutover) if cutover is not None else None
    m = Migration(target, kind=kind, qmp=qmp, node=node, state=state, nbd_socket=nbd_socket,
                  precopy_interval=precopy_interval, cutover=when,
                  cutover_now=cutover == "now", max_downtime=max_downtime, on_cutover=on_cutover,
                  cutover_timeout=cutover_timeout, max_passes=max_passes, on_pass=on_pass,
                  on_progress=on_progress, sync_options=sync_options)
    m.verify_source = verify_source
    return await m.run()


def request_cutover(state: str) -> None:
    """`transfer cutover`: ask the migration running on state to cut over after its pass."""
    if not os.path.isdir(state):
        raise BadInput("no migration state here", disk=state, kind="state")
    fd = os.open(os.path.join(state, "cutover"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)


__all__ = ["MigrateReport", "NotConverging", "PassInfo", "migrate_async", "parse_duration",
           "request_cutover"]
