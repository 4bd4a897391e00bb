"""live-converge: a live migration of a disk a guest keeps writing to, at several write rates.

The issue: "On a 2 GiB disk, for guest write rates of 1, 4, 16 and 64 MiB/s: the passes until
convergence, the final delta, the predicted and the measured downtime (prediction within ±25 % of
the measurement), as a table and a plot."

For every rate and rep, from scratch: the bench image (transfer.synth, same size and seed as the
other scenarios) copied to a fresh raw disk, a fresh qemu-storage-daemon holding it as node disk0
(QMP socket, NBD server exporting it writable as `rw`), and a guest (bench/live_guest.py, a child
process running transfer.workload.GuestWriter, scattered writes at the rate) writing through that
export. After --warmup seconds of writing:

  transfer migrate TARGET --type live --qmp QMP --node disk0 --state STATE --nbd-socket NBD
      --max-downtime 5s --on-cutover CMD --report R --progress none --max-passes 30

CMD is the handshake of tests/migrate_test.py: it touches STOP (the guest stops writing once its
write in flight completes, then touches STOPPED) and waits for STOPPED. Exit 0: converged and cut
over; then `transfer verify nbd+unix:///rw?socket=NBD TARGET` must say equal (the guest is stopped,
the daemon still runs) and its digest must be the report's. Exit 7: did not converge within the
budget, a result, recorded with what the engine said (its pass log in STATE, its message).

Measured downtime: from the STOP file's creation (the moment the stop command acts) to the
migrate process being reaped (the target is complete and verified, and the VM could start there):
what an orchestrator waiting for `transfer migrate` sees. The engine's own figure (stop command +
final pass, its clock) is shown beside. Bar: |predicted / measured - 1| <= 0.25, on every
converged run of a rate. CPU of the engine, the guest, the daemon and the whole machine over the
migration is recorded (2 CPUs here: a 64 MiB/s guest competes with the engine). See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, TextIO

from transfer.cli import parse_size
from transfer.errors import BadInput
from transfer.migrate import parse_duration
from transfer.servers import QemuStorageDaemon, ServerError

from .cold_copy import (
    ENGINE,
    ROOT,
    TIME,
    GiB,
    MiB,
    _cmd_output,
    _fmt,
    _median,
    _prepare_image,
    _say,
    _size_text,
    engine_fingerprint,
    machine_busy_seconds,
    proc_cpu_seconds,
    proc_peak_rss_mib,
    provenance,
    spawn_and_reap,
    wait_quiet,
)
from .warm_delta import sparse_copy

SCENARIO = "live-converge"
DEFAULT_SIZE = 2 * GiB
QUICK_SIZE = 256 * MiB
RATES = (1.0, 4.0, 16.0, 64.0)  # MiB/s, from the issue
QUICK_RATES = (1.0, 16.0)
DEFAULT_REPS = 5
MAX_DOWNTIME = "5s"
MAX_PASSES = 30
WARMUP_S = 1.0     # the guest writes this long before the migration starts
PATTERN = "scattered"
# The issue's bar: the predicted downtime within ±25 % of the measured one.
BAR_PREDICTION = 0.25
NOT_CONVERGING = 7
PYTHON = str(ROOT / ".venv" / "bin" / "python")


# ---------------------------------------------------------------- one run

class Live:
    def __init__(self, args: argparse.Namespace, workdir: str, image: str, prov: dict[str, Any],
                 out: TextIO) -> None:
        self.args = args
        self.workdir = workdir
        self.image = image
        self.prov = prov
        self.out = out
        self.runs: list[dict[str, Any]] = []
        self.timeout = max(180.0, 90.0 * args.size / GiB)
        self.nproc = len(os.sched_getaffinity(0))
        # The engine's and the guest's bytecode under the work directory (as warm-delta does):
        # never in the tree, and not compiled again by every run in a PYTHONDONTWRITEBYTECODE shell.
        self.pycache = os.path.join(workdir, "pycache")
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.env["PYTHONPYCACHEPREFIX"] = self.pycache

    def warm_bytecode(self) -> float:
        t = time.perf_counter()
        imports = ("import transfer.cli, transfer.migrate, transfer.api, transfer.workload, "
                   "bench.live_guest, nbd, numpy")
        subprocess.run([PYTHON, "-c", imports], cwd=ROOT, env=self.env, check=True,
                       capture_output=True)
        subprocess.run([str(ENGINE), "migrate", "--help"], env=self.env, check=True,
                       capture_output=True)
        return time.perf_counter() - t

    def emit(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record, sort_keys=True) + "\n")
        self.out.flush()

    def run(self, rate_mib: float, rep: int, seed: int) -> dict[str, Any]:
        a = self.args
        d = os.path.join(self.workdir, f"run-{rate_mib:g}-{rep + 1}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        p = {name: os.path.join(d, name) for name in (
            "disk.img", "target.img", "state", "qmp.sock", "nbd.sock", "STOP", "STOPPED",
            "READY", "guest.json", "guest.log", "window-start", "report.json", "migrate.out",
            "migrate.log", "maxrss.txt")}
        on_cutover = (f"sh -c 'touch {shlex.quote(p['STOP'])}; while [ ! -e "
                      f"{shlex.quote(p['STOPPED'])} ]; do sleep 0.01; done'")
        argv = [str(ENGINE), "migrate", p["target.img"], "--type", "live", "--qmp", p["qmp.sock"],
                "--node", "disk0", "--state", p["state"], "--nbd-socket", p["nbd.sock"],
                "--max-downtime", a.max_downtime, "--on-cutover", on_cutover,
                "--report", p["report.json"], "--progress", "none",
                "--max-passes", str(a.max_passes)]
        rec: dict[str, Any] = {"type": "run", "scenario": SCENARIO, "rate_mib_s": rate_mib,
                               "rep": rep, "guest_seed": seed, "pattern": a.pattern,
                               "argv": argv}
        problems: list[str] = []
        notes: list[str] = []
        t = time.perf_counter()
        sparse_copy(self.image, p["disk.img"])  # a fresh disk for every run
        rec["disk_copy_s"] = round(time.perf_counter() - t, 2)
        guest: subprocess.Popen[bytes] | None = None
        qsd = QemuStorageDaemon(p["nbd.sock"], p["disk.img"], qmp=p["qmp.sock"], fmt="raw")
        try:
            with qsd:
                os.sync()
                rec["idle_wait_s"] = round(wait_quiet(), 2)
                with open("/proc/loadavg") as f:
                    rec["loadavg_before"] = f.read().split()[0]
                with open(p["guest.log"], "wb") as glog:
                    guest = subprocess.Popen(
                        [PYTHON, "-m", "bench.live_guest", "--uri", qsd.uri,
                         "--rate", str(rate_mib * MiB), "--pattern", a.pattern,
                         "--seed", str(seed), "--ready", p["READY"], "--stop", p["STOP"],
                         "--stopped", p["STOPPED"], "--summary", p["guest.json"],
                         "--window-start", p["window-start"]],
                        cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=glog,
                        stderr=glog)
                deadline = time.monotonic() + 30
                while not os.path.exists(p["READY"]):
                    if guest.poll() is not None or time.monotonic() > deadline:
                        raise _RunFailed("the guest did not start writing: "
                                         + _tail(p["guest.log"]))
                    time.sleep(0.01)
                time.sleep(a.warmup)
                with open(p["window-start"], "w") as f:
                    f.write(repr(time.time()))
                g_cpu0, q_cpu0 = proc_cpu_seconds(guest.pid), proc_cpu_seconds(qsd.pid)
                busy0 = machine_busy_seconds()
                t0 = time.perf_counter()
                code, usage, timed_out, maxrss_kib = spawn_and_reap(
                    argv, p["migrate.out"], p["migrate.log"], p["maxrss.txt"], self.timeout,
                    env=self.env)
                ended = time.time()
                wall = time.perf_counter() - t0
                busy = machine_busy_seconds() - busy0
                g_cpu = _cpu_or_none(guest.pid, g_cpu0)   # not reaped yet: readable as a zombie
                q_cpu = proc_cpu_seconds(qsd.pid) - q_cpu0
                q_rss = proc_peak_rss_mib(qsd.pid)  # a fresh daemon per run: this run's peak
                stop_at = None
                if os.path.exists(p["STOP"]):
                    stop_at = os.stat(p["STOP"]).st_mtime_ns / 1e9
                else:
                    open(p["STOP"], "w").close()  # no cutover: stop the guest ourselves
                try:
                    guest.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    guest.kill()  # our own child
                    guest.wait()
                    problems.append("the guest did not stop within 60 s of STOP")
                if guest.returncode != 0:
                    problems.append(f"the guest exited {guest.returncode}: "
                                    + _tail(p["guest.log"]))
                guest = None
                g = _load_json(p["guest.json"]) or {}
                rec.update({
                    "exit": code, "timed_out": timed_out, "wall_s": round(wall, 4),
                    "engine_user_s": round(usage.ru_utime, 3),
                    "engine_sys_s": round(usage.ru_stime, 3),
                    "engine_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                    "engine_maxrss_mib": None if maxrss_kib is None
                    else round(maxrss_kib / 1024, 1),
                    "guest_cpu_s": None if g_cpu is None else round(g_cpu, 3),
                    "qsd_cpu_s": round(q_cpu, 3), "qsd_maxrss_mib": q_rss,
                    "machine_busy_cpu_s": round(busy, 3),
                    "other_cpu_s": round(busy - usage.ru_utime - usage.ru_stime - q_cpu
                                         - (g_cpu or 0.0), 3),
                    "cpu_pct": {
                        "engine": _pct(usage.ru_utime + usage.ru_stime, wall),
                        "guest": _pct(g_cpu, wall), "qsd": _pct(q_cpu, wall),
                        "machine": _pct(busy, wall * self.nproc)},
                    "guest": g, "engine_fingerprint": engine_fingerprint(),
                })
                stderr = _tail(p["migrate.log"], 4000)
                if code not in (0, NOT_CONVERGING):
                    rec["output_tail"] = stderr
                    problems.append(f"migrate exited {code}" + (" (timed out)" if timed_out
                                                                 else ""))
                log = _load_json(os.path.join(p["state"], "migrate.json")) or {}
                if code == 0:
                    report = _load_json(p["report.json"])
                    if report is None:
                        problems.append("exit 0 but no report")
                        report = {}
                    rec.update(self._converged(report, log, stop_at, ended, g, notes))
                    rec["verify"] = self._verify(qsd.uri, p["target.img"], report, problems, d)
                elif code == NOT_CONVERGING:
                    rec.update(self._not_converged(log, stderr, g, notes))
        except (_RunFailed, ServerError, OSError, subprocess.SubprocessError) as e:
            problems.append(f"{type(e).__name__}: {e}")
        finally:
            if guest is not None and guest.poll() is None:
                guest.kill()  # our own child, still running after a failure
                guest.wait()
            for name in ("disk.img", "target.img"):
                try:
                    os.unlink(p[name])
                except OSError:
                    pass
            if not a.keep:
                shutil.rmtree(d, ignore_errors=True)
        rec["valid"] = not problems
        rec["problems"] = problems
        rec["notes"] = notes
        rec["provenance"] = self.prov
        self.emit(rec)
        self.runs.append(rec)
        _say(run_line(rec))
        for n in notes:
            _say(f"      note: {n}")
        return rec

    def _converged(self, report: dict[str, Any], log: dict[str, Any], stop_at: float | None,
                   ended: float, g: dict[str, Any], notes: list[str]) -> dict[str, Any]:
        passes = report.get("passes") or []
        cut = report.get("cutover") or {}
        pre = [x for x in passes if not x.get("final")]
        final = next((x for x in passes if x.get("final")), None)
        measured = None if stop_at is None else ended - stop_at
        predicted = cut.get("predicted_downtime")
        ratio = (predicted / measured) if predicted is not None and measured else None
        out: dict[str, Any] = {
            "result": "converged" if report.get("converged") else "cut over",
            "converged": report.get("converged"),
            "passes": [_pass_fields(x) for x in passes], "precopy_passes": len(pre),
            "final_delta_bytes": cut.get("final_delta_bytes"),
            "predicted_downtime_s": predicted, "measured_downtime_s": _r(measured),
            "engine_downtime_s": cut.get("downtime"), "stop_seconds": cut.get("stop_seconds"),
            "final_pass_s": None if final is None else final.get("seconds"),
            "pred_over_measured": _r(ratio),
            "pred_over_engine_downtime": _r(predicted / cut["downtime"])
            if predicted is not None and cut.get("downtime") else None,
            "within_bar": None if ratio is None else abs(ratio - 1) <= BAR_PREDICTION,
            "engine_seconds": report.get("seconds"), "digest": report.get("digest"),
            "stop_at": stop_at, "ended_at": ended,
        }
        if predicted is None:
            notes.append("converged, but the report has no predicted_downtime")
        if not report.get("converged"):
            notes.append(f"exit 0 with converged={report.get('converged')!r}")
        # What the model assumed against what happened (see transfer/migrate.py, Model): the
        # final delta it expected is the last dirty rate over the time since the last hand-over.
        hand = {int(k): v for k, v in (log.get("handover") or {}).items()}
        if final is not None and len(pre) >= 1 and stop_at is not None:
            k = final.get("pass")
            last = pre[-1]
            if isinstance(k, int) and k - 1 in hand and last.get("dirty_rate"):
                since = stop_at - hand[k - 1]
                exp_delta = last["dirty_rate"] * since
                out["model"] = {
                    "dirty_rate": last["dirty_rate"], "copy_rate": last.get("copy_rate"),
                    "since_handover_s": _r(since),
                    "expected_final_delta_bytes": int(exp_delta),
                    "final_delta_over_expected": _r(final["delta_bytes"] / exp_delta)
                    if exp_delta else None,
                    "expected_copy_s": _r(exp_delta / last["copy_rate"])
                    if last.get("copy_rate") else None,
                    "rest_of_prediction_s": _r(predicted - exp_delta / last["copy_rate"])
                    if predicted is not None and last.get("copy_rate") else None,
                }
        if g.get("rate_achieved") and pre and pre[-1].get("dirty_rate"):
            out["dirty_over_write_rate"] = _r(pre[-1]["dirty_rate"] / g.get("window_rate",
                                                                             g["rate_achieved"]))
        return out

    def _not_converged(self, log: dict[str, Any], stderr: str, g: dict[str, Any],
                       notes: list[str]) -> dict[str, Any]:
        passes = [dict(x, **{"pass": x.get("pass_", x.get("pass"))}) for x in
                  log.get("passes") or []]
        m = re.search(r"predicted downtime (\S+) s", stderr)
        pred = None
        if m:
            try:
                pred = float(m.group(1))
            except ValueError:
                pass
        if "not converging" not in stderr:
            notes.append("exit 7 without the 'not converging' message")
        if "Traceback" in stderr:
            notes.append("exit 7 with a traceback on stderr")
        last = passes[-1] if passes else {}
        return {"result": "not converging", "converged": False,
                "passes": [_pass_fields(x) for x in passes], "precopy_passes": len(passes),
                "final_delta_bytes": None, "last_delta_bytes": last.get("delta_bytes"),
                "predicted_downtime_s": None if pred is None or math.isnan(pred) else pred,
                "measured_downtime_s": None, "engine_downtime_s": None,
                "pred_over_measured": None, "within_bar": None,
                "message": stderr.strip().splitlines()[-1] if stderr.strip() else ""}

    def _verify(self, uri: str, target: str, report: dict[str, Any], problems: list[str],
                d: str) -> dict[str, Any]:
        """The target against the daemon's disk (guest stopped, daemon running)."""
        t = time.perf_counter()
        try:
            v = subprocess.run([str(ENGINE), "verify", uri, target, "--json", "--progress",
                                "none"], env=self.env, capture_output=True, text=True,
                               timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            problems.append("transfer verify timed out")
            return {"exit": None}
        out: dict[str, Any] = {"exit": v.returncode, "seconds": round(time.perf_counter() - t, 2)}
        try:
            j = json.loads(v.stdout)
            out.update({k: j.get(k) for k in ("equal", "target_digest", "source_digest",
                                              "differing_blocks", "first_differences")})
        except ValueError:
            out["output"] = (v.stdout + v.stderr)[-1000:]
        if v.returncode != 0:
            problems.append(f"TARGET DIFFERS from the daemon's disk: transfer verify exited "
                            f"{v.returncode}: {(v.stdout + v.stderr).strip()[-300:]}")
        elif report.get("digest") and out.get("target_digest") not in (None, report["digest"]):
            problems.append(f"the report's digest {report['digest']} is not the target's "
                            f"{out.get('target_digest')}")
        return out


class _RunFailed(Exception):
    pass


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def _pct(cpu: float | None, seconds: float) -> float | None:
    return None if cpu is None or seconds <= 0 else round(100 * cpu / seconds, 1)


def _cpu_or_none(pid: int, before: float) -> float | None:
    try:
        return proc_cpu_seconds(pid) - before
    except (OSError, IndexError, ValueError):
        return None


def _load_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tail(path: str, n: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode(errors="replace").strip()
    except OSError:
        return ""


PASS_FIELDS = ("pass", "change_source", "fallback", "delta_bytes", "bytes_copied", "seconds",
               "copy_rate", "dirty_rate", "predicted_downtime", "final")


def _pass_fields(x: dict[str, Any]) -> dict[str, Any]:
    return {k: x.get(k) for k in PASS_FIELDS}


def run_line(r: dict[str, Any]) -> str:
    head = f"  {r['rate_mib_s']:5g} MiB/s rep {r['rep'] + 1}: "
    g = r.get("guest") or {}
    wrote = (f"guest {g['window_rate'] / MiB:.1f} MiB/s" if g.get("window_rate")
             else "guest ?")
    cpu = r.get("cpu_pct") or {}
    cpus = (f"cpu % engine {_fmt(cpu.get('engine'), '.0f')} guest {_fmt(cpu.get('guest'), '.0f')}"
            f" qsd {_fmt(cpu.get('qsd'), '.0f')} machine {_fmt(cpu.get('machine'), '.0f')}")
    if r.get("result") == "converged" or r.get("result") == "cut over":
        deltas = ", ".join(_mib_text(x["delta_bytes"]) for x in r["passes"])
        v = r.get("verify") or {}
        body = (f"{r['result']} after {r['precopy_passes']} passes (deltas MiB {deltas}), "
                f"final delta {_mib_text(r['final_delta_bytes'])} MiB, downtime predicted "
                f"{_fmt(r['predicted_downtime_s'], '.3f')} s, measured "
                f"{_fmt(r['measured_downtime_s'], '.3f')} s (engine's own "
                f"{_fmt(r['engine_downtime_s'], '.3f')}), ratio "
                f"{_fmt(r['pred_over_measured'], '.2f')}; wall {r['wall_s']:.2f} s; {wrote}; "
                f"{cpus}; verify {'equal' if v.get('exit') == 0 else v.get('exit')}")
    elif r.get("result") == "not converging":
        deltas = ", ".join(_mib_text(x["delta_bytes"]) for x in r["passes"])
        body = (f"NOT CONVERGING (exit 7) after {r['precopy_passes']} passes (deltas MiB "
                f"{deltas}); last predicted {_fmt(r['predicted_downtime_s'], '.2f')} s; wall "
                f"{r['wall_s']:.2f} s; {wrote}; {cpus}")
    else:
        body = f"exit {r.get('exit')}"
    if r["problems"]:
        body += "  INVALID: " + "; ".join(r["problems"])
    return head + body


def _mib_text(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "–"
    if x < 10 * MiB:
        return f"{x / MiB:.2f}"
    return f"{x / MiB:.1f}" if x < 100 * MiB else f"{x / MiB:.0f}"


# ---------------------------------------------------------------- summary

def _span(xs: list[float], spec: str) -> str:
    if not xs:
        return "–"
    med = format(statistics.median(xs), spec)
    if len(xs) == 1 or min(xs) == max(xs):
        return med
    return f"{med} ({format(min(xs), spec)}–{format(max(xs), spec)})"


def summarize(live: Live, rates: list[float]) -> dict[str, Any]:
    per_rate = []
    for rate in rates:
        runs = [r for r in live.runs if r["rate_mib_s"] == rate]
        good = [r for r in runs if r["valid"]]
        conv = [r for r in good if r.get("result") in ("converged", "cut over")]
        ratios = [r["pred_over_measured"] for r in conv if r.get("pred_over_measured")]
        worst = max((abs(x - 1) for x in ratios), default=None)

        def vals(key: str, rs: list[dict[str, Any]] = conv) -> list[float]:
            return [r[key] for r in rs if isinstance(r.get(key), (int, float))]

        def cpu(key: str, rs: list[dict[str, Any]] = good) -> list[float]:
            return [r["cpu_pct"][key] for r in rs
                    if isinstance((r.get("cpu_pct") or {}).get(key), (int, float))]

        per_rate.append({
            "rate_mib_s": rate, "runs": len(runs), "valid": len(good), "converged": len(conv),
            "not_converging": sum(r.get("result") == "not converging" for r in good),
            "guest_rate_mib_s": [round(r["guest"]["window_rate"] / MiB, 2) for r in good
                                 if (r.get("guest") or {}).get("window_rate")],
            "precopy_passes": vals("precopy_passes", good),
            "final_delta_bytes": vals("final_delta_bytes"),
            "predicted_downtime_s": vals("predicted_downtime_s"),
            "measured_downtime_s": vals("measured_downtime_s"),
            "engine_downtime_s": vals("engine_downtime_s"),
            "pred_over_measured": ratios, "worst_error": None if worst is None else round(worst, 4),
            "pred_over_engine_downtime": vals("pred_over_engine_downtime"),
            "within_bar": sum(bool(r.get("within_bar")) for r in conv),
            "wall_s": vals("wall_s", good),
            "cpu_pct": {k: cpu(k) for k in ("engine", "guest", "qsd", "machine")},
            "engine_maxrss_mib": max((r["engine_maxrss_mib"] for r in runs
                                      if r.get("engine_maxrss_mib") is not None), default=None),
            "qsd_maxrss_mib": max((r["qsd_maxrss_mib"] for r in runs
                                   if r.get("qsd_maxrss_mib") is not None), default=None),
            "verified": sum((r.get("verify") or {}).get("exit") == 0 for r in conv),
            "dirty_over_write_rate": vals("dirty_over_write_rate"),
            "model_final_delta_over_expected": [r["model"]["final_delta_over_expected"]
                                                for r in conv if (r.get("model") or {}).get(
                                                    "final_delta_over_expected")],
        })
    return {"type": "summary", "scenario": SCENARIO, "size": live.args.size,
            "max_downtime_s": parse_duration(live.args.max_downtime), "rates": per_rate,
            "provenance": live.prov}


def table(s: dict[str, Any]) -> str:
    head = ("| guest MiB/s | achieved MiB/s | converged | passes until convergence | "
            "final delta MiB | predicted downtime s | measured downtime s | predicted ÷ measured "
            "| engine's own downtime s | wall s | CPU % engine / guest / qsd / machine "
            "| peak RSS MiB engine / qsd | verified |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for x in s["rates"]:
        c = x["cpu_pct"]
        cpu = " / ".join(_fmt(_median(c[k]), ".0f") for k in ("engine", "guest", "qsd",
                                                                "machine"))
        conv = f"{x['converged']}/{x['runs']}"
        if x["not_converging"]:
            conv += f" ({x['not_converging']} exit 7)"
        lines.append(
            f"| {x['rate_mib_s']:g} | {_span(x['guest_rate_mib_s'], '.1f')} | {conv} | "
            f"{_span(x['precopy_passes'], '.0f')} | "
            f"{_span([b / MiB for b in x['final_delta_bytes']], '.2f')} | "
            f"{_span(x['predicted_downtime_s'], '.2f')} | "
            f"{_span(x['measured_downtime_s'], '.2f')} | "
            f"{_span(x['pred_over_measured'], '.2f')} | {_span(x['engine_downtime_s'], '.2f')} | "
            f"{_span(x['wall_s'], '.1f')} | {cpu} | {_fmt(x['engine_maxrss_mib'], '.0f')} / "
            f"{_fmt(x.get('qsd_maxrss_mib'), '.0f')} | {x['verified']}/{x['converged']} |")
    return "\n".join(lines)


def runs_table(runs: list[dict[str, Any]]) -> str:
    head = ("| MiB/s | rep | result | passes | deltas MiB (pass 0, 1, …, final) | predicted s | "
            "measured s | ratio | ±25 % | engine s | stop s | final pass s | pass 0 s | wall s "
            "| verify |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in runs:
        deltas = ", ".join(_mib_text(x["delta_bytes"]) for x in r.get("passes") or [])
        within = r.get("within_bar")
        lines.append(
            f"| {r['rate_mib_s']:g} | {r['rep'] + 1} | "
            f"{r.get('result') or ('INVALID' if r['problems'] else '?')} | "
            f"{r.get('precopy_passes', '–')} | {deltas} | "
            f"{_fmt(r.get('predicted_downtime_s'), '.3f')} | "
            f"{_fmt(r.get('measured_downtime_s'), '.3f')} | "
            f"{_fmt(r.get('pred_over_measured'), '.2f')} | "
            f"{'–' if within is None else ('yes' if within else 'NO')} | "
            f"{_fmt(r.get('engine_downtime_s'), '.3f')} | {_fmt(r.get('stop_seconds'), '.3f')} | "
            f"{_fmt(r.get('final_pass_s'), '.3f')} | {_fmt(_pass0_s(r), '.3f')} | "
            f"{_fmt(r.get('wall_s'), '.2f')} | "
            f"{_verify_text(r)} |")
    return "\n".join(lines)


def _verify_text(r: dict[str, Any]) -> str:
    v = r.get("verify")
    if not v:
        return "–"
    return "equal" if v.get("exit") == 0 else f"DIFFER (exit {v.get('exit')})"


def _pass0_s(r: dict[str, Any]) -> float | None:
    ps = r.get("passes") or []
    return ps[0].get("seconds") if ps and ps[0].get("pass") == 0 else None


def bars(s: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for x in s["rates"]:
        name = (f"{x['rate_mib_s']:g} MiB/s: predicted downtime within ±{BAR_PREDICTION:.0%} of "
                f"the measured one, every converged run")
        if not x["converged"]:
            out.append({"bar": name, "value": None, "met": None,
                        "why": "no run converged (exit 7 is the result)" if x["not_converging"]
                        else "no valid run"})
            continue
        ok = x["within_bar"] == x["converged"] and len(x["pred_over_measured"]) == x["converged"]
        own = max((abs(r - 1) for r in x["pred_over_engine_downtime"]), default=None)
        out.append({"bar": name, "value": x["worst_error"], "met": ok,
                    "ratios": x["pred_over_measured"],
                    "worst_error_against_engine_downtime": own})
    return out


def bar_line(b: dict[str, Any]) -> str:
    if b["met"] is None:
        return f"  n/a    {b['bar']}: {b['why']}"
    ratios = ", ".join(f"{r:.2f}" for r in b["ratios"])
    return (f"  {'met   ' if b['met'] else 'MISSED'} {b['bar']}: worst |predicted/measured - 1| "
            f"= {_fmt(b['value'] and 100 * b['value'], '.0f')} % (ratios {ratios}; against the "
            f"engine's own downtime: "
            f"{_fmt(_pct_of(b.get('worst_error_against_engine_downtime')), '.0f')} %)")


def _pct_of(x: float | None) -> float | None:
    return None if x is None else 100 * x


# ---------------------------------------------------------------- the plot

def ascii_plot(runs: list[dict[str, Any]], width: int = 50) -> str:
    """Predicted (P) against measured (M) downtime per run, as horizontal bars."""
    conv = [r for r in runs if r.get("measured_downtime_s") is not None]
    top = max([r["measured_downtime_s"] for r in conv]
              + [r["predicted_downtime_s"] or 0 for r in conv] + [1e-9])
    lines = [f"downtime per run, 0 … {top:.2f} s ({width} columns; ] marks measured ±25 %)"]
    for r in runs:
        label = f"{r['rate_mib_s']:>5g} MiB/s #{r['rep'] + 1}"
        if r.get("measured_downtime_s") is None:
            lines.append(f"{label}  {r.get('result') or 'INVALID'}")
            continue
        m, pr = r["measured_downtime_s"], r["predicted_downtime_s"]

        def bar(v: float, ch: str, m: float = m) -> str:
            n = round(v / top * width)
            s = list(ch * n + " " * (width + 1 - n))
            for edge in (m * (1 - BAR_PREDICTION), m * (1 + BAR_PREDICTION)):
                i = min(width, round(edge / top * width))
                s[i] = "]" if s[i] == " " else s[i]
            return "".join(s)

        lines.append(f"{label}  M {bar(m, '#')} {m:.3f}")
        if pr is not None:
            lines.append(f"{'':{len(label)}}  P {bar(pr, '=')} {pr:.3f}")
    return "\n".join(lines)


COLORS = {1.0: "#1f77b4", 4.0: "#2ca02c", 16.0: "#ff7f0e", 64.0: "#d62728"}
EXTRA = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _color(rate: float, rates: list[float]) -> str:
    return COLORS.get(rate) or EXTRA[rates.index(rate) % len(EXTRA)]


def svg_plot(s: dict[str, Any], runs: list[dict[str, Any]], title: str) -> str:
    """Three panels, drawn by hand (no matplotlib here): the delta of every pass (log scale) per
    rate; predicted against measured downtime per rate (with the ±25 % band); the passes until
    convergence per rate."""
    rates = [x["rate_mib_s"] for x in s["rates"]]
    W, H, PW, PH, L, T = 1260, 420, 330, 280, 70, 70
    el: list[str] = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
         'font-family="sans-serif" font-size="12">'),
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="15">{_esc(title)}</text>']

    def frame(i: int, name: str, xlabel: str, ylabel: str) -> tuple[float, float]:
        x0, y0 = L + i * (PW + 90), T
        el.append(f'<rect x="{x0}" y="{y0}" width="{PW}" height="{PH}" fill="none" '
                  f'stroke="#444"/>')
        el.append(f'<text x="{x0 + PW / 2}" y="{y0 - 10}" text-anchor="middle" '
                  f'font-weight="bold">{_esc(name)}</text>')
        el.append(f'<text x="{x0 + PW / 2}" y="{y0 + PH + 36}" text-anchor="middle">'
                  f'{_esc(xlabel)}</text>')
        el.append(f'<text transform="translate({x0 - 48},{y0 + PH / 2}) rotate(-90)" '
                  f'text-anchor="middle">{_esc(ylabel)}</text>')
        return x0, y0

    def cat_x(x0: float, rate: float) -> float:
        return x0 + PW * (rates.index(rate) + 0.5) / len(rates)

    def cat_axis(x0: float, y0: float) -> None:
        for rate in rates:
            el.append(f'<text x="{cat_x(x0, rate)}" y="{y0 + PH + 16}" text-anchor="middle">'
                      f'{rate:g}</text>')

    def lin_axis(x0: float, y0: float, top: float, fmt: str) -> Any:
        step = _nice_step(top / 5)
        v = 0.0
        while v <= top + 1e-9:
            y = y0 + PH - PH * v / top
            el.append(f'<line x1="{x0}" x2="{x0 + PW}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
            el.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">'
                      f'{format(v, fmt)}</text>')
            v += step
        return lambda val: y0 + PH - PH * val / top

    # 1: delta per pass, log scale
    x0, y0 = frame(0, "delta of each pass", "pass (the last one: final, guest stopped)",
                   "delta MiB (log)")
    series = [r for r in runs if r.get("passes")]
    deltas = [p["delta_bytes"] / MiB for r in series for p in r["passes"]
              if p.get("delta_bytes")]
    lo = 10 ** math.floor(math.log10(min(deltas))) if deltas else 0.1
    hi = 10 ** math.ceil(math.log10(max(deltas))) if deltas else 1000
    n_pass = max((len(r["passes"]) for r in series), default=2)

    def ly(v: float) -> float:
        return y0 + PH - PH * (math.log10(max(v, lo)) - math.log10(lo)) / (
            math.log10(hi) - math.log10(lo))

    def px(i: int) -> float:
        return x0 + 15 + (PW - 30) * i / max(1, n_pass - 1)

    dec = lo
    while dec <= hi * 1.0001:
        y = ly(dec)
        el.append(f'<line x1="{x0}" x2="{x0 + PW}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        el.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{dec:g}</text>')
        dec *= 10
    for i in range(n_pass):
        el.append(f'<text x="{px(i):.1f}" y="{y0 + PH + 16}" text-anchor="middle">{i}</text>')
    for r in series:
        c = _color(r["rate_mib_s"], rates)
        pts = [(px(i), ly(p["delta_bytes"] / MiB)) for i, p in enumerate(r["passes"])
               if p.get("delta_bytes")]
        dash = "" if r.get("result") != "not converging" else ' stroke-dasharray="4 3"'
        el.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" opacity="0.8"{dash} '
                  f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>')
        for (x, y), p in zip(pts, r["passes"]):
            fill = c if p.get("final") else "white"
            el.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{fill}" stroke="{c}"/>')
    for i, rate in enumerate(rates):
        y = y0 + 14 + 15 * i
        el.append(f'<line x1="{x0 + PW - 88}" x2="{x0 + PW - 70}" y1="{y - 4}" y2="{y - 4}" '
                  f'stroke="{_color(rate, rates)}" stroke-width="2"/>')
        el.append(f'<text x="{x0 + PW - 66}" y="{y}">{rate:g} MiB/s</text>')

    # 2: downtime, predicted against measured
    x0, y0 = frame(1, "downtime: measured ● predicted ◇", "guest write rate MiB/s",
                   "seconds")
    conv = [r for r in runs if r.get("measured_downtime_s") is not None]
    top = max([r["measured_downtime_s"] * (1 + BAR_PREDICTION) for r in conv]
              + [r["predicted_downtime_s"] or 0 for r in conv] + [0.1]) * 1.1
    y_of = lin_axis(x0, y0, top, ".2g" if top < 1 else ".1f")
    cat_axis(x0, y0)
    for rate in rates:
        rs = [r for r in runs if r["rate_mib_s"] == rate]
        c = _color(rate, rates)
        for j, r in enumerate(rs):
            x = cat_x(x0, rate) + (j - (len(rs) - 1) / 2) * 12
            m, pr = r.get("measured_downtime_s"), r.get("predicted_downtime_s")
            if m is None:
                el.append(f'<text x="{x:.1f}" y="{y0 + PH - 6}" text-anchor="middle" fill="{c}">'
                          f'×</text>')
                continue
            band_top, band_bottom = y_of(m * (1 + BAR_PREDICTION)), y_of(m * (1 - BAR_PREDICTION))
            el.append(f'<rect x="{x - 4:.1f}" y="{band_top:.1f}" width="8" '
                      f'height="{band_bottom - band_top:.1f}" fill="{c}" opacity="0.15"/>')
            el.append(f'<circle cx="{x:.1f}" cy="{y_of(m):.1f}" r="4" fill="{c}"/>')
            if pr is not None:
                yy = y_of(pr)
                el.append(f'<polygon points="{x:.1f},{yy - 5:.1f} {x + 5:.1f},{yy:.1f} '
                          f'{x:.1f},{yy + 5:.1f} {x - 5:.1f},{yy:.1f}" fill="white" '
                          f'stroke="{c}" stroke-width="1.5"/>')
    budget = s["max_downtime_s"]
    if budget <= top:
        yb = y_of(budget)
        el.append(f'<line x1="{x0}" x2="{x0 + PW}" y1="{yb:.1f}" y2="{yb:.1f}" stroke="#c00" '
                  f'stroke-dasharray="6 4"/>')
        el.append(f'<text x="{x0 + 4}" y="{yb - 4:.1f}" fill="#c00">--max-downtime</text>')
    else:
        el.append(f'<text x="{x0 + 4}" y="{y0 + 14}" fill="#c00">--max-downtime {budget:g} s '
                  f'(above the scale)</text>')
    el.append(f'<text x="{x0 + 4}" y="{y0 + 28}" fill="#666">band: measured ±25 %</text>')

    # 3: passes until convergence
    x0, y0 = frame(2, "passes until convergence", "guest write rate MiB/s",
                   "pre-copy passes (pass 0 included)")
    top = max([r.get("precopy_passes") or 0 for r in runs] + [2]) + 1
    y_of = lin_axis(x0, y0, top, ".0f")
    cat_axis(x0, y0)
    for rate in rates:
        rs = [r for r in runs if r["rate_mib_s"] == rate]
        c = _color(rate, rates)
        for j, r in enumerate(rs):
            if r.get("precopy_passes") is None:
                continue
            x = cat_x(x0, rate) + (j - (len(rs) - 1) / 2) * 12
            y = y_of(r["precopy_passes"])
            if r.get("result") == "not converging":
                el.append(f'<text x="{x:.1f}" y="{y + 5:.1f}" text-anchor="middle" fill="{c}" '
                          f'font-size="16">×</text>')
            else:
                el.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{c}"/>')
    el.append(f'<text x="{x0 + 4}" y="{y0 + 14}" fill="#666">● converged  × exit 7 (not '
              f'converging)</text>')
    el.append("</svg>")
    return "\n".join(el) + "\n"


def _esc(t: str) -> str:
    return t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _nice_step(x: float) -> float:
    if x <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * e >= x:
            return m * e
    return 10 * e


# ---------------------------------------------------------------- the scenario

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m bench {SCENARIO}",
        description="Live-migrate a qemu-storage-daemon disk while a guest writes to it at "
                    "1, 4, 16 and 64 MiB/s: passes until convergence, the final delta, the "
                    "predicted against the measured downtime.")
    p.add_argument("--size", type=parse_size, help="disk size (default 2G; 256M with --quick)")
    p.add_argument("--seed", type=int, default=1, help="image seed (default 1)")
    p.add_argument("--rates", help="guest write rates in MiB/s, comma-separated "
                                   "(default 1,4,16,64; 1,16 with --quick)")
    p.add_argument("--reps", type=int, help=f"runs per rate, interleaved over the rates "
                                            f"(default {DEFAULT_REPS}; 1 with --quick)")
    p.add_argument("--pattern", default=PATTERN, choices=("scattered", "hotspot", "sequential"),
                   help=f"the guest's write pattern (default {PATTERN})")
    p.add_argument("--guest-seed", type=int, default=1,
                   help="seed of the guest's writes (with the rate and rep; default 1)")
    p.add_argument("--max-downtime", default=MAX_DOWNTIME,
                   help=f"transfer migrate --max-downtime (default {MAX_DOWNTIME})")
    p.add_argument("--max-passes", type=int, default=MAX_PASSES,
                   help=f"transfer migrate --max-passes (default {MAX_PASSES})")
    p.add_argument("--warmup", type=float, default=WARMUP_S,
                   help=f"seconds the guest writes before the migration starts "
                        f"(default {WARMUP_S:g})")
    p.add_argument("--workdir", help="directory for the image, disks, targets, states and "
                                     "sockets (default: a fresh directory under /var/tmp); a "
                                     "source.img made there with --keep (by any scenario) with "
                                     "the same size and seed is reused")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (each run's logs, report and state; the "
                        "run's disk and target are deleted after it all the same)")
    p.add_argument("--out", help=f"JSON lines output (default bench/out/{SCENARIO}-<time>.jsonl)")
    p.add_argument("--plot", help="SVG plot (default: the --out path with .svg)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 256 MiB disk, rates 1 and 16 MiB/s, 1 rep")
    p.add_argument("--require-bars", action="store_true",
                   help="exit 3 when a valid run misses the issue's bar")
    a = p.parse_args(argv)
    a.size = a.size if a.size is not None else (QUICK_SIZE if a.quick else DEFAULT_SIZE)
    a.reps = a.reps if a.reps is not None else (1 if a.quick else DEFAULT_REPS)
    try:
        a.rate_list = ([float(x) for x in a.rates.split(",") if x.strip()] if a.rates
                       else list(QUICK_RATES if a.quick else RATES))
    except ValueError:
        p.error("--rates takes numbers (MiB/s), comma-separated")
    if not a.rate_list or any(r <= 0 for r in a.rate_list) or len(set(a.rate_list)) != len(
            a.rate_list):
        p.error("--rates must be distinct positive numbers")
    if a.reps < 1 or a.size < 16 * MiB or a.size % (64 * 1024):
        p.error("--reps must be at least 1 and --size a multiple of 64K, at least 16M")
    try:
        if parse_duration(a.max_downtime) <= 0:
            raise ValueError
    except (BadInput, ValueError):
        p.error(f"--max-downtime {a.max_downtime!r} is not a positive duration (5s, 500ms, ...)")
    if a.max_passes < 2 or a.warmup < 0:
        p.error("--max-passes must be at least 2 and --warmup not negative")
    return a


def reproduce_command(a: argparse.Namespace) -> str:
    parts = ["cd", shlex.quote(str(ROOT)), "&&", ".venv/bin/python", "-m", "bench", SCENARIO,
             "--size", _size_text(a.size), "--seed", str(a.seed),
             "--rates", ",".join(f"{r:g}" for r in a.rate_list), "--reps", str(a.reps),
             "--pattern", a.pattern, "--guest-seed", str(a.guest_seed),
             "--max-downtime", a.max_downtime, "--max-passes", str(a.max_passes),
             "--warmup", f"{a.warmup:g}"]
    return " ".join(parts)


def _preflight(a: argparse.Namespace) -> list[str]:
    missing = [n for n in ("qemu-storage-daemon",) if not shutil.which(n)]
    if not os.access(TIME, os.X_OK):
        missing.append(f"{TIME} (GNU time: apt-get install time)")
    try:
        import nbd  # noqa: F401  (the guest writes through libnbd's Python binding)
    except ImportError:
        missing.append("the nbd Python module (Debian package python3-libnbd)")
    if not ENGINE.exists():
        missing.append(f"{ENGINE} (run tools/setup)")
    else:
        try:
            out = subprocess.run([str(ENGINE), "migrate", "--help"], capture_output=True,
                                 text=True, timeout=60, check=False)
            if out.returncode != 0:
                missing.append(f"`transfer migrate` (exits {out.returncode})")
            else:
                for opt in ("--type", "--qmp", "--on-cutover", "--max-downtime", "--report",
                            "--nbd-socket", "--max-passes"):
                    if opt not in out.stdout:
                        missing.append(f"`transfer migrate {opt}`")
        except (OSError, subprocess.TimeoutExpired) as e:
            missing.append(f"`transfer migrate` ({e})")
    return missing


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    missing = _preflight(a)
    if missing:
        print(f"{SCENARIO}: missing " + ", ".join(missing), file=sys.stderr)
        return 2
    started = time.time()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = a.out or str(ROOT / "bench" / "out" / f"{SCENARIO}-{stamp}.jsonl")
    plot_path = a.plot or os.path.splitext(out_path)[0] + ".svg"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(plot_path)), exist_ok=True)

    made_dir = a.workdir is None or not os.path.exists(a.workdir)
    if a.workdir is None:
        workdir = tempfile.mkdtemp(prefix=f"bench-{SCENARIO}-", dir="/var/tmp")
    else:
        workdir = os.path.abspath(a.workdir)
        os.makedirs(workdir, exist_ok=True)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    code = 0
    try:
        with open(out_path, "w") as out:
            image, meta = _prepare_image(workdir, a)
            image_info = {"size": a.size, "seed": a.seed, "allocated_fraction": meta.get(
                "allocated_fraction"), "alloc_bytes": meta["alloc_bytes"],
                "layout": meta["layout"], "digest": meta["digest"]}
            prov = provenance(image_info, workdir)
            prov["qemu_storage_daemon"] = _cmd_output(["qemu-storage-daemon",
                                                       "--version"]).splitlines()[0]
            prov["guest"] = {"pattern": a.pattern, "seed": a.guest_seed, "warmup_s": a.warmup,
                             "process": "bench.live_guest (transfer.workload.GuestWriter)"}
            prov["migrate"] = {"max_downtime": a.max_downtime, "max_passes": a.max_passes}
            _say(f"engine {prov['engine_commit']} (fingerprint {prov['engine_fingerprint']}), "
                 f"{prov['qemu_storage_daemon']}, kernel {prov['kernel']}, "
                 f"{prov['cpu_model']} x {prov['nproc']}")
            live = Live(a, workdir, image, prov, out)
            _say(f"bytecode compiled into {live.pycache} in {live.warm_bytecode():.1f} s")
            rates_text = ", ".join(f"{r:g}" for r in a.rate_list)
            _say(f"{a.reps} rep{'s' if a.reps > 1 else ''} of guest rates {rates_text} MiB/s "
                 f"({a.pattern}), each on a fresh copy of the image, daemon, state and target; "
                 f"the guest writes {a.warmup:g} s before transfer migrate --type live "
                 f"--max-downtime {a.max_downtime} starts")
            for rep in range(a.reps):
                for i, rate in enumerate(a.rate_list):
                    live.run(rate, rep, a.guest_seed * 100_000 + rep * 1000 + i)
            summary = summarize(live, a.rate_list)
            live.emit(summary)
            verdict_bars = bars(summary)
            fp_end = engine_fingerprint()
            fps = sorted({r["engine_fingerprint"] for r in live.runs if "engine_fingerprint" in r}
                         | {prov["engine_fingerprint"], fp_end})
            valid = all(r["valid"] for r in live.runs)
            duration = time.time() - started
            title = (f"live-converge: {_size_text(a.size)} disk, guest {a.pattern}, "
                     f"--max-downtime {a.max_downtime}, {a.reps} rep{'s' if a.reps > 1 else ''}, "
                     f"engine {prov['engine_commit']}, {stamp}")
            with open(plot_path, "w") as f:
                f.write(svg_plot(summary, live.runs, title))
            live.emit({"type": "verdict", "scenario": SCENARIO, "valid": valid,
                       "bars": verdict_bars, "duration_s": round(duration, 1),
                       "engine_changed_during_run": len(fps) > 1, "engine_fingerprints": fps,
                       "plot": plot_path, "command": reproduce_command(a), "provenance": prov})
        _say()
        _say(f"{SCENARIO}: {_size_text(a.size)} raw disk (image seed {a.seed}) in "
             f"qemu-storage-daemon, guest {a.pattern} writes through NBD in its own process, "
             f"transfer migrate --type live --max-downtime {a.max_downtime}; {a.reps} "
             f"rep{'s' if a.reps > 1 else ''} per rate; engine {prov['engine_commit']}; "
             f"{prov['nproc']} CPUs")
        _say()
        _say(table(summary))
        _say()
        _say("Medians over the reps (min–max). passes: pre-copy passes before the cutover, pass "
             "0 (the whole disk) included, the final pass not; final delta: what the final pass "
             "copied with the guest stopped; measured downtime: STOP created (the stop command "
             "acts) to transfer migrate reaped; engine's own: its report (stop command + final "
             "pass, read-back included); CPU %: of one CPU over the migration's wall (machine: of "
             "all CPUs); verified: transfer verify of the daemon's disk against the target "
             "said equal.")
        _say()
        _say(runs_table(live.runs))
        _say()
        _say(ascii_plot(live.runs))
        models = [r for r in live.runs if r.get("model")]
        if models:
            _say()
            _say("the model against what happened (final pass): expected delta = last dirty rate "
                 "× time since the last hand-over; expected copy s = that / copy rate")
            for r in models:
                m = r["model"]
                wrote = (r.get("guest") or {}).get("window_rate")
                _say(f"  {r['rate_mib_s']:5g} MiB/s #{r['rep'] + 1}: dirty rate "
                     f"{m['dirty_rate'] / MiB:.1f} MiB/s (guest wrote "
                     f"{_fmt(wrote and wrote / MiB, '.1f')}"
                     f" MiB/s), copy rate {_fmt(m['copy_rate'] and m['copy_rate'] / MiB, '.0f')} "
                     f"MiB/s; final delta {_mib_text(r['final_delta_bytes'])} MiB, expected "
                     f"{_mib_text(m['expected_final_delta_bytes'])} MiB (× "
                     f"{_fmt(m['final_delta_over_expected'], '.2f')}); predicted "
                     f"{_fmt(r['predicted_downtime_s'], '.3f')} s = copy "
                     f"{_fmt(m['expected_copy_s'], '.3f')} + overhead & read-back "
                     f"{_fmt(m['rest_of_prediction_s'], '.3f')} (pass 0 took "
                     f"{_fmt(_pass0_s(r), '.3f')} s); final pass took "
                     f"{_fmt(r['final_pass_s'], '.3f')} s + stop {_fmt(r['stop_seconds'], '.3f')}"
                     f" s; measured {_fmt(r['measured_downtime_s'], '.3f')} s")
        _say()
        for b in verdict_bars:
            _say(bar_line(b))
        if len(fps) > 1:
            _say(f"WARNING: the engine's files changed during the run ({len(fps)} versions: "
                 f"{', '.join(fps)}); each run's JSON line has its engine_fingerprint")
        if not valid:
            _say("INVALID: a run failed or a correctness check failed (see 'problems' in the "
                 "JSON lines)")
            code = 1
        elif a.require_bars and any(b["met"] is False for b in verdict_bars):
            code = 3
        _say(f"duration {duration / 60:.1f} min; JSON lines: {out_path}; plot: {plot_path}")
        _say(f"reproduce: {reproduce_command(a)}")
        return code
    except KeyboardInterrupt:
        print(f"{SCENARIO}: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if a.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        elif made_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for name in ("source.img", "source.json"):
                try:
                    os.unlink(os.path.join(workdir, name))
                except OSError:
                    pass
            for name in os.listdir(workdir):
                if name.startswith("run-") or name == "pycache":
                    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
