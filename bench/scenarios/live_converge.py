"""live-converge: a live migration of a disk a guest keeps writing to, at several write rates.

The issue: "On a 2 GiB disk, for guest write rates of 1, 4, 16 and 64 MiB/s: the passes until
convergence, the final delta, the predicted and the measured downtime (prediction within ±25 % of
the measurement), as a table and a plot." With --sizes, the same runs on several disk sizes (the
size axis, at 4 MiB/s unless --rates). Every run from scratch: a fresh disk copied from the bench
image, a fresh qemu-storage-daemon, the guest (live_guest.py, a child process) writing through its
NBD export, then `transfer migrate --type live`. Measured downtime: the STOP file's creation (the
stop command acts) to the migrate process being reaped. How it is set up, run, checked and
barred: bench/README.md, "live-converge".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import time
from typing import Any

from transfer.cli import parse_size
from transfer.demo.servers import QemuStorageDaemon, ServerError
from transfer.errors import BadInput
from transfer.units import parse_duration

from ..harness.images import image_info, prepare_image
from ..harness.machine import (
    ENGINE,
    PYTHON,
    ROOT,
    GiB,
    MiB,
    cmd_output,
    engine_env,
    engine_lacks,
    fmt,
    invalid_text,
    loadavg,
    md_table,
    median,
    missing_programs,
    provenance,
    say,
    say_engine,
    size_text,
    sparse_copy,
    wait_quiet,
    warm_bytecode,
)
from ..harness.measure import load_json, measure
from ..harness.plots import Panel, Series, draw_png, draw_svg
from ..harness.plots import title as plot_title
from ..harness.report import Run
from ..harness.runner import Context, Outcome, defaults, parser, reproduce

NAME = "live-converge"
# What run() leaves in a --workdir given by the user (removed at the end without --keep).
CLEANUP = ("source.img", "source.json", "run-*", "pycache")
DEFAULT_SIZE = 2 * GiB
QUICK_SIZE = 256 * MiB
RATES = (1.0, 4.0, 16.0, 64.0)  # MiB/s, from the issue
QUICK_RATES = (1.0, 16.0)
SIZES_RATES = (4.0,)  # MiB/s: the size axis's guest rate (--sizes without --rates), its issue's
DEFAULT_REPS = 5
MAX_DOWNTIME = "5s"
MAX_PASSES = 30
WARMUP_S = 1.0     # the guest writes this long before the migration starts
PATTERN = "scattered"
# The issue's bar: the predicted downtime within ±25 % of the measured one.
BAR_PREDICTION = 0.25
# The size axis's bar: the measured downtime at the largest size within 1.5× the smallest's.
BAR_SIZE_RATIO = 1.5
NOT_CONVERGING = 7


# ---------------------------------------------------------------- one run

class Live:
    """The migrations of one run (its options, provenance and records: the context's)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.args, self.prov, self.runs = ctx.a, ctx.prov, ctx.runs
        self.workdir = ctx.workdir
        self.nproc = len(os.sched_getaffinity(0))
        self.env = engine_env(ctx.workdir)
        self._stop_estimate: float | None = None

    def stop_command(self, stop: str, stopped: str) -> str:
        """The --on-cutover command: touch STOP, wait for the guest's STOPPED."""
        return (f"sh -c 'touch {shlex.quote(stop)}; while [ ! -e {shlex.quote(stopped)} ]; "
                "do sleep 0.001; done'")

    def stop_estimate(self) -> float:
        """What an orchestrator knows of its own stop before a cutover: the stop command
        timed (median of 5) against a guest that has already stopped (its spawn and touch
        and one test; the guest's reaction is not in it), passed as --stop-estimate."""
        if self._stop_estimate is None:
            d = os.path.join(self.workdir, "stop-estimate")
            os.makedirs(d, exist_ok=True)
            stopped = os.path.join(d, "STOPPED")
            open(stopped, "w").close()
            times = []
            for _ in range(5):
                t = time.perf_counter()
                subprocess.run(self.stop_command(os.path.join(d, "STOP"), stopped), shell=True,
                               check=True)
                times.append(time.perf_counter() - t)
            self._stop_estimate = round(median(times), 4)
        return self._stop_estimate

    def run(self, size: int, image: str, rate_mib: float, rep: int, seed: int) -> dict[str, Any]:
        """One migration from scratch: image (of size bytes) copied to a fresh disk, a fresh
        daemon, the guest at rate_mib, transfer migrate; its record is emitted and returned."""
        a = self.args
        timeout = max(180.0, 90.0 * size / GiB)
        d = os.path.join(self.workdir, f"run-{size_text(size)}-{rate_mib:g}-{rep + 1}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        p = {name: os.path.join(d, name) for name in (
            "disk.img", "target.img", "state", "qmp.sock", "nbd.sock", "STOP", "STOPPED",
            "READY", "RELEASE", "guest.json", "guest.log", "window-start", "report.json",
            "migrate.out", "migrate")}
        on_cutover = self.stop_command(p["STOP"], p["STOPPED"])
        argv = [str(ENGINE), "migrate", p["target.img"], "--type", "live", "--qmp", p["qmp.sock"],
                "--node", "disk0", "--state", p["state"], "--nbd-socket", p["nbd.sock"],
                "--max-downtime", a.max_downtime, "--on-cutover", on_cutover,
                "--stop-estimate", f"{self.stop_estimate() * 1000:.1f}ms",
                "--report", p["report.json"], "--progress", "none",
                "--max-passes", str(a.max_passes)]
        rec: dict[str, Any] = {"type": "run", "scenario": NAME, "size": size,
                               "rate_mib_s": rate_mib, "rep": rep, "guest_seed": seed,
                               "pattern": a.pattern, "argv": argv,
                               "stop_estimate_s": self.stop_estimate()}
        problems: list[str] = []
        notes: list[str] = []
        t = time.perf_counter()
        sparse_copy(image, p["disk.img"])  # a fresh disk for every run
        rec["disk_copy_s"] = round(time.perf_counter() - t, 2)
        guest: subprocess.Popen[bytes] | None = None
        qsd = QemuStorageDaemon(p["nbd.sock"], p["disk.img"], qmp=p["qmp.sock"], fmt="raw")
        try:
            with qsd:
                os.sync()
                rec["idle_wait_s"] = round(wait_quiet(), 2)
                rec["loadavg_before"] = loadavg()
                with open(p["guest.log"], "wb") as glog:
                    guest = subprocess.Popen(
                        [PYTHON, "-m", "bench.scenarios.live_guest", "--uri", qsd.uri,
                         "--rate", str(rate_mib * MiB), "--pattern", a.pattern,
                         "--seed", str(seed), "--ready", p["READY"], "--stop", p["STOP"],
                         "--stopped", p["STOPPED"], "--summary", p["guest.json"],
                         "--window-start", p["window-start"], "--release", p["RELEASE"]],
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
                m = measure(argv, p["migrate"], timeout, server_pid=qsd.pid,
                            side={"guest": guest.pid}, env=self.env, wait=False)
                ended, wall, g_cpu = m["ended_at"], m["wall_s"], m["guest_cpu_s"]
                stop_at = None
                if os.path.exists(p["STOP"]):
                    stop_at = os.stat(p["STOP"]).st_mtime_ns / 1e9
                else:
                    open(p["STOP"], "w").close()  # no cutover: stop the guest ourselves
                open(p["RELEASE"], "w").close()
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
                g = load_json(p["guest.json"]) or {}
                # the engine is the client, the daemon the server
                rec.update({k: v for k, v in m.items() if k not in ("argv", "ended_at")})
                code = m["exit"]
                rec.update({
                    "cpu_pct": {
                        "engine": _pct(m["client_cpu_s"], wall), "guest": _pct(g_cpu, wall),
                        "qsd": _pct(m["server_cpu_s"], wall),
                        "machine": _pct(m["machine_busy_cpu_s"], wall * self.nproc)},
                    "guest": g,
                })
                stderr = _tail(p["migrate"] + ".log", 4000)
                if code not in (0, NOT_CONVERGING):
                    rec["output_tail"] = stderr
                    problems.append(f"migrate exited {code}" + (" (timed out)" if m["timed_out"]
                                                                 else ""))
                log = load_json(os.path.join(p["state"], "migrate.json")) or {}
                if code == 0:
                    report = load_json(p["report.json"])
                    if report is None:
                        problems.append("exit 0 but no report")
                        report = {}
                    rec.update(self._converged(report, log, stop_at, ended, g, notes))
                    rec["verify"] = self._verify(qsd.uri, p["target.img"], report, problems,
                                                 timeout)
                elif code == NOT_CONVERGING:
                    rec.update(self._not_converged(log, stderr, g, notes))
        except (_RunFailed, ServerError, OSError, subprocess.SubprocessError) as e:
            problems.append(f"{type(e).__name__}: {e}")
        finally:
            if guest is not None and guest.poll() is None:
                guest.kill()  # our own child, still running after a failure
                guest.wait()
            for name in ("disk.img", "target.img"):
                with contextlib.suppress(OSError):
                    os.unlink(p[name])
            if not a.keep:
                shutil.rmtree(d, ignore_errors=True)
        self.ctx.record(rec, problems, True, notes)
        say(run_line(rec))
        for n in notes:
            say(f"      note: {n}")
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
        with contextlib.suppress(ValueError):
            pred = float(m.group(1)) if m else None
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
                timeout: float) -> dict[str, Any]:
        """The target against the daemon's disk (guest stopped, daemon running)."""
        t = time.perf_counter()
        try:
            v = subprocess.run([str(ENGINE), "verify", uri, target, "--json", "--progress",
                                "none"], env=self.env, capture_output=True, text=True,
                               timeout=timeout, check=False)
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
    head = f"  {size_text(r['size'])} {r['rate_mib_s']:5g} MiB/s rep {r['rep'] + 1}: "
    g = r.get("guest") or {}
    wrote = (f"guest {g['window_rate'] / MiB:.1f} MiB/s" if g.get("window_rate")
             else "guest ?")
    cpu = r.get("cpu_pct") or {}
    cpus = (f"cpu % engine {fmt(cpu.get('engine'), '.0f')} guest {fmt(cpu.get('guest'), '.0f')}"
            f" qsd {fmt(cpu.get('qsd'), '.0f')} machine {fmt(cpu.get('machine'), '.0f')}")
    if r.get("result") == "converged" or r.get("result") == "cut over":
        deltas = ", ".join(_mib_text(x["delta_bytes"]) for x in r["passes"])
        v = r.get("verify") or {}
        body = (f"{r['result']} after {r['precopy_passes']} passes (deltas MiB {deltas}), "
                f"final delta {_mib_text(r['final_delta_bytes'])} MiB, downtime predicted "
                f"{fmt(r['predicted_downtime_s'], '.3f')} s, measured "
                f"{fmt(r['measured_downtime_s'], '.3f')} s (engine's own "
                f"{fmt(r['engine_downtime_s'], '.3f')}), ratio "
                f"{fmt(r['pred_over_measured'], '.2f')}; wall {r['wall_s']:.2f} s; {wrote}; "
                f"{cpus}; verify {'equal' if v.get('exit') == 0 else v.get('exit')}")
    elif r.get("result") == "not converging":
        deltas = ", ".join(_mib_text(x["delta_bytes"]) for x in r["passes"])
        body = (f"NOT CONVERGING (exit 7) after {r['precopy_passes']} passes (deltas MiB "
                f"{deltas}); last predicted {fmt(r['predicted_downtime_s'], '.2f')} s; wall "
                f"{r['wall_s']:.2f} s; {wrote}; {cpus}")
    else:
        body = f"exit {r.get('exit')}"
    return head + body + invalid_text(r["problems"])


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


def summarize(live: Live, sizes: list[int], rates: list[float]) -> dict[str, Any]:
    """Per (size, rate), over its reps (the list keeps its old name, `rates`): passes, final
    delta, predicted and measured downtime, CPU, peak RSS, verified; with more than one size,
    `size_axis`: per rate, the largest size's downtime against the smallest's."""
    groups = []
    for size in sizes:
        for rate in rates:
            groups.append(_group(size, rate, [r for r in live.runs
                                              if r["size"] == size and r["rate_mib_s"] == rate]))
    budget = parse_duration(live.args.max_downtime)
    return {"type": "summary", "scenario": NAME, "sizes": sizes, "max_downtime_s": budget,
            "rates": groups,
            "size_axis": _size_axis(groups, sizes, rates, budget) if len(sizes) > 1 else None,
            "provenance": live.prov}


def _group(size: int, rate: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if r["valid"]]
    conv = [r for r in good if r.get("result") in ("converged", "cut over")]
    seven = [r for r in good if r.get("result") == "not converging"]
    ratios = [r["pred_over_measured"] for r in conv if r.get("pred_over_measured")]
    worst = max((abs(x - 1) for x in ratios), default=None)

    def vals(key: str, rs: list[dict[str, Any]] = conv) -> list[float]:
        return [r[key] for r in rs if isinstance(r.get(key), (int, float))]

    def cpu(key: str, rs: list[dict[str, Any]] = good) -> list[float]:
        return [r["cpu_pct"][key] for r in rs
                if isinstance((r.get("cpu_pct") or {}).get(key), (int, float))]

    return {
        "size": size, "rate_mib_s": rate, "runs": len(runs), "valid": len(good),
        "converged": len(conv), "not_converging": len(seven),
        "guest_rate_mib_s": [round(r["guest"]["window_rate"] / MiB, 2) for r in good
                             if (r.get("guest") or {}).get("window_rate")],
        "precopy_passes": vals("precopy_passes", good),
        "final_delta_bytes": vals("final_delta_bytes"),
        "predicted_downtime_s": vals("predicted_downtime_s"),
        # exit 7: the engine's last prediction, from its message (no downtime to compare)
        "predicted_not_converging_s": vals("predicted_downtime_s", seven),
        "measured_downtime_s": vals("measured_downtime_s"),
        "engine_downtime_s": vals("engine_downtime_s"),
        "pred_over_measured": ratios, "worst_error": None if worst is None else round(worst, 4),
        "pred_over_engine_downtime": vals("pred_over_engine_downtime"),
        "within_bar": sum(bool(r.get("within_bar")) for r in conv),
        "wall_s": vals("wall_s", good),
        "cpu_pct": {k: cpu(k) for k in ("engine", "guest", "qsd", "machine")},
        "engine_maxrss_mib": max((r["client_maxrss_mib"] for r in runs
                                  if r.get("client_maxrss_mib") is not None), default=None),
        "qsd_maxrss_mib": max((r["server_maxrss_mib"] for r in runs
                               if r.get("server_maxrss_mib") is not None), default=None),
        "verified": sum((r.get("verify") or {}).get("exit") == 0 for r in conv),
        "dirty_over_write_rate": vals("dirty_over_write_rate"),
        "model_final_delta_over_expected": [r["model"]["final_delta_over_expected"]
                                            for r in conv if (r.get("model") or {}).get(
                                                "final_delta_over_expected")],
    }


def _size_axis(groups: list[dict[str, Any]], sizes: list[int], rates: list[float],
               budget: float) -> list[dict[str, Any]]:
    """Per rate: the median measured downtime at the largest size over the smallest's (the
    issue's "within 1.5×"), the largest size's median prediction (exit 7 runs' included: the
    downtime the engine refused), and its runs that converged with a measured downtime within
    the --max-downtime budget."""
    out = []
    for rate in rates:
        small, large = (next(g for g in groups if g["size"] == n and g["rate_mib_s"] == rate)
                        for n in (sizes[0], sizes[-1]))
        m_small, m_large = median(small["measured_downtime_s"]), median(
            large["measured_downtime_s"])
        p_large = median(large["predicted_downtime_s"] + large["predicted_not_converging_s"])
        out.append({
            "rate_mib_s": rate, "smallest": sizes[0], "largest": sizes[-1],
            "measured_smallest_s": m_small, "measured_largest_s": m_large,
            "ratio": _r(m_large / m_small) if m_small and m_large is not None else None,
            "predicted_largest_s": p_large,
            "predicted_largest_over_measured_smallest": _r(p_large / m_small)
            if m_small and p_large is not None else None,
            "largest_runs": large["runs"],
            "largest_within_budget": sum(x <= budget for x in large["measured_downtime_s"]),
        })
    return out


def _sizes(s: dict[str, Any]) -> list[int]:
    """The summary's disk sizes (a summary from before the size axis has one, `size`)."""
    return s.get("sizes") or [s["size"]]


def table(s: dict[str, Any]) -> str:
    """A row per size and rate (medians over the reps, min–max beside); with a size axis, its
    table below (size_table)."""
    head = ("| disk | guest MiB/s | achieved MiB/s | converged | passes until convergence | "
            "final delta MiB | predicted downtime s | measured downtime s | predicted ÷ measured "
            "| engine's own downtime s | wall s | CPU % engine / guest / qsd / machine "
            "| peak RSS MiB engine / qsd | verified |")
    lines = []
    for x in s["rates"]:
        c = x["cpu_pct"]
        cpu = " / ".join(fmt(median(c[k]), ".0f") for k in ("engine", "guest", "qsd",
                                                                "machine"))
        lines.append(
            f"| {size_text(x.get('size') or _sizes(s)[0])} | {x['rate_mib_s']:g} | "
            f"{_span(x['guest_rate_mib_s'], '.1f')} | {_cells(x)} | "
            f"{_span(x['pred_over_measured'], '.2f')} | {_span(x['engine_downtime_s'], '.2f')} | "
            f"{_span(x['wall_s'], '.1f')} | {cpu} | {fmt(x['engine_maxrss_mib'], '.0f')} / "
            f"{fmt(x.get('qsd_maxrss_mib'), '.0f')} | {x['verified']}/{x['converged']} |")
    return md_table(head, lines) + ("\n\n" + size_table(s) if s.get("size_axis") else "")


def _cells(x: dict[str, Any]) -> str:
    """What both tables show of a size and rate: converged (exit 7 runs beside), passes, final
    delta, predicted downtime (with no converged run, the exit 7 runs' last one, marked so) and
    measured downtime."""
    conv = f"{x['converged']}/{x['runs']}" + (f" ({x['not_converging']} exit 7)"
                                             if x["not_converging"] else "")
    predicted = _span(x["predicted_downtime_s"], ".2f")
    if not x["predicted_downtime_s"] and x.get("predicted_not_converging_s"):
        predicted = f"– (exit 7: {_span(x['predicted_not_converging_s'], '.2f')})"
    return (f"{conv} | {_span(x['precopy_passes'], '.0f')} | "
            f"{_span([b / MiB for b in x['final_delta_bytes']], '.2f')} | {predicted} | "
            f"{_span(x['measured_downtime_s'], '.2f')}")


def size_table(s: dict[str, Any]) -> str:
    """The size axis: per size and rate, the passes, final delta, predicted and measured
    downtime (medians) and the measured downtime over the smallest size's at that rate; then
    per rate the line "downtime at the largest size ÷ at the smallest"."""
    sizes = _sizes(s)
    lines = []
    for x in s["rates"]:
        base = next(median(g["measured_downtime_s"]) for g in s["rates"]
                    if g["size"] == sizes[0] and g["rate_mib_s"] == x["rate_mib_s"])
        m = median(x["measured_downtime_s"])
        lines.append(f"| {size_text(x['size'])} | {x['rate_mib_s']:g} | {_cells(x)} | "
                     f"{fmt(m / base if m is not None and base else None, '.2f')} |")
    lines.append("")
    for ax in s["size_axis"]:
        small, large = size_text(ax["smallest"]), size_text(ax["largest"])
        if ax["ratio"] is not None:
            value = (f"{ax['measured_largest_s']:.2f} s ÷ {ax['measured_smallest_s']:.2f} s = "
                     f"{ax['ratio']:.2f}")
        else:
            value = (f"– (no converged run at {large}; its predicted downtime "
                     f"{fmt(ax['predicted_largest_s'], '.2f')} s is "
                     f"{fmt(ax['predicted_largest_over_measured_smallest'], '.1f')}× the "
                     f"{small} measured downtime)" if ax["measured_smallest_s"] else
                     f"– (no converged run at {small})")
        lines.append(f"downtime at the largest size ÷ at the smallest ({large} ÷ {small}, "
                     f"{ax['rate_mib_s']:g} MiB/s): {value} (bar ≤ {BAR_SIZE_RATIO:g}); "
                     f"converged within the {s['max_downtime_s']:g} s budget at {large}: "
                     f"{ax['largest_within_budget']} of {ax['largest_runs']} runs")
    return md_table("| disk | guest MiB/s | converged | passes | final delta MiB | predicted "
                    "downtime s | measured downtime s | measured ÷ smallest disk's |", lines)


def runs_table(runs: list[dict[str, Any]]) -> str:
    head = ("| disk | MiB/s | rep | result | passes | deltas MiB (pass 0, 1, …, final) | "
            "predicted s | measured s | ratio | ±25 % | engine s | stop s | final pass s "
            "| pass 0 s | wall s | verify |")
    lines = []
    for r in runs:
        deltas = ", ".join(_mib_text(x["delta_bytes"]) for x in r.get("passes") or [])
        within = r.get("within_bar")
        lines.append(
            f"| {size_text(r['size'])} | {r['rate_mib_s']:g} | {r['rep'] + 1} | "
            f"{r.get('result') or ('INVALID' if r['problems'] else '?')} | "
            f"{r.get('precopy_passes', '–')} | {deltas} | "
            f"{fmt(r.get('predicted_downtime_s'), '.3f')} | "
            f"{fmt(r.get('measured_downtime_s'), '.3f')} | "
            f"{fmt(r.get('pred_over_measured'), '.2f')} | "
            f"{'–' if within is None else ('yes' if within else 'NO')} | "
            f"{fmt(r.get('engine_downtime_s'), '.3f')} | {fmt(r.get('stop_seconds'), '.3f')} | "
            f"{fmt(r.get('final_pass_s'), '.3f')} | {fmt(_pass0_s(r), '.3f')} | "
            f"{fmt(r.get('wall_s'), '.2f')} | "
            f"{_verify_text(r)} |")
    return md_table(head, lines)


def _verify_text(r: dict[str, Any]) -> str:
    v = r.get("verify")
    if not v:
        return "–"
    return "equal" if v.get("exit") == 0 else f"DIFFER (exit {v.get('exit')})"


def _pass0_s(r: dict[str, Any]) -> float | None:
    ps = r.get("passes") or []
    return ps[0].get("seconds") if ps and ps[0].get("pass") == 0 else None


def bars(s: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's bars, each with its `kind`: per size and rate, every converged run's
    prediction within ±25 % (`prediction`); with a size axis, per rate, the largest size's
    measured downtime within 1.5× the smallest's (`size_ratio`) and every run at the largest
    size converged with its measured downtime within the budget (`largest_converged`)."""
    out = []
    multi = len(_sizes(s)) > 1
    for x in s["rates"]:
        where = f"{size_text(x['size'])}, " if multi else ""
        name = (f"{where}{x['rate_mib_s']:g} MiB/s: predicted downtime within "
                f"±{BAR_PREDICTION:.0%} of the measured one, every converged run")
        if not x["converged"]:
            out.append({"bar": name, "kind": "prediction", "value": None, "met": None,
                        "why": "no run converged (exit 7 is the result)" if x["not_converging"]
                        else "no valid run"})
            continue
        ok = x["within_bar"] == x["converged"] and len(x["pred_over_measured"]) == x["converged"]
        own = max((abs(r - 1) for r in x["pred_over_engine_downtime"]), default=None)
        out.append({"bar": name, "kind": "prediction", "value": x["worst_error"], "met": ok,
                    "ratios": x["pred_over_measured"],
                    "worst_error_against_engine_downtime": own})
    for ax in s.get("size_axis") or []:
        small, large = size_text(ax["smallest"]), size_text(ax["largest"])
        rate = f"{ax['rate_mib_s']:g} MiB/s"
        b = {"bar": f"{rate}: measured downtime at {large} ÷ at {small} ≤ {BAR_SIZE_RATIO:g} "
                    "(medians)", "kind": "size_ratio", "value": ax["ratio"], "format": ".2f"}
        if ax["measured_smallest_s"] is None:
            b.update(met=None, why=f"no converged run at {small}")
        elif ax["ratio"] is None:  # nothing at the largest size cut over: over the budget
            b.update(met=False, why=(
                f"no converged run at {large}: predicted "
                f"{fmt(ax['predicted_largest_s'], '.2f')} s there, "
                f"{fmt(ax['predicted_largest_over_measured_smallest'], '.1f')}× the {small} "
                "measured downtime"))
        else:
            b["met"] = ax["ratio"] <= BAR_SIZE_RATIO
        out.append(b)
        out.append({"bar": f"{rate}: every run at {large} converged, its measured downtime "
                           f"within the {s['max_downtime_s']:g} s budget",
                    "kind": "largest_converged", "value": ax["largest_within_budget"],
                    "runs": ax["largest_runs"],
                    "met": ax["largest_runs"] > 0
                    and ax["largest_within_budget"] == ax["largest_runs"]})
    return out


def bar_value(b: dict[str, Any]) -> str:
    """A bar's value as text, on stdout and in the markdown report."""
    kind = b.get("kind", "prediction")  # runs before the size axis: predictions only
    if kind == "size_ratio":
        return b.get("why") or f"{b['value']:.2f}"
    if kind == "largest_converged":
        return f"{b['value']} of {b['runs']} runs"
    ratios = ", ".join(f"{r:.2f}" for r in b.get("ratios") or [])
    own = b.get("worst_error_against_engine_downtime")
    return (f"worst |predicted/measured - 1| = {fmt(b['value'] and 100 * b['value'], '.0f')} % "
            f"(ratios {ratios}; against the engine's own downtime: "
            f"{fmt(own and 100 * own, '.0f')} %)")


# ---------------------------------------------------------------- the plot

PALETTE = ("#1f77b4", "#2ca02c", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")  # a color per (size, rate)
MEASURED, PREDICTED = "#1f77b4", "#ff7f0e"


def panels(s: dict[str, Any], runs: list[dict[str, Any]]) -> list[Panel]:
    """The scenario's plot, drawn as the PNG and as its own SVG: the delta of every pass (log
    scale), a line per run; the downtime against the guest's write rate (with a size axis,
    against the disk size, the medians joined per rate): every run's measured (●) and predicted
    (◇) downtime, the medians joined, the ±25 % band around the measured median; the passes
    until convergence (× exit 7)."""
    groups = s.get("rates") or []
    by_size = len(_sizes(s)) > 1
    cats = [(g["size"], g["rate_mib_s"]) for g in groups]

    def x_of(r: dict[str, Any]) -> float:
        return r["size"] / GiB if by_size else r["rate_mib_s"]

    deltas = []
    for r in (r for r in runs if r.get("passes")):
        cat = (r["size"], r["rate_mib_s"])
        first = next(x for x in runs if (x["size"], x["rate_mib_s"]) == cat)
        deltas.append(Series(
            (f"{size_text(cat[0])} " if by_size else "") + f"{cat[1]:g} MiB/s" if r is first
            else None, [(i, p["delta_bytes"] / MiB) for i, p in enumerate(r["passes"])
                        if p.get("delta_bytes")],
            PALETTE[cats.index(cat) % len(PALETTE)] if cat in cats else PALETTE[0],
            line="--" if r.get("result") == "not converging" else "-"))
    conv = [r for r in runs if r.get("measured_downtime_s") is not None]
    down = [Series("measured", [(x_of(r), r["measured_downtime_s"]) for r in conv], MEASURED),
            Series("predicted", [(x_of(r), r["predicted_downtime_s"]) for r in conv
                                 if r.get("predicted_downtime_s") is not None], PREDICTED, "D")]
    for k, rate in enumerate(sorted({g["rate_mib_s"] for g in groups}) if by_size else [None]):
        gs = [g for g in groups if rate is None or g["rate_mib_s"] == rate]
        down += [Series(f"measured median ±{BAR_PREDICTION:.0%}" if k == 0 else None,
                        [(x_of(g), statistics.median(g["measured_downtime_s"])) for g in gs
                         if g["measured_downtime_s"]], MEASURED, "", "-", BAR_PREDICTION),
                 Series(None, [(x_of(g), statistics.median(g["predicted_downtime_s"]))
                               for g in gs if g["predicted_downtime_s"]], PREDICTED, "", "--")]
    seven = [r.get("result") == "not converging" for r in runs]
    passes = [Series(label, [(x_of(r), r["precopy_passes"]) for r, s7 in zip(runs, seven)
                             if s7 == want and r.get("precopy_passes") is not None], color, marker)
              for label, want, color, marker in (("converged", False, "#2ca02c", "o"),
                                                 ("exit 7 (not converging)", True, "#d62728", "x"))]
    xlabel = "disk size, GiB" if by_size else "guest write rate, MiB/s"
    xticks = sorted({x_of(g) for g in groups})
    budget = s.get("max_downtime_s")
    return [Panel("delta of each pass", "pass (the last one: final, guest stopped)",
                  "delta MiB (log)", deltas,
                  list(range(max((len(r["passes"]) for r in runs if r.get("passes")),
                                 default=2))), ylog=True),
            Panel("downtime: measured ● predicted ◇", xlabel, "downtime, s", down, xticks,
                  xlog=True, hline=(budget, f"--max-downtime {budget:g} s")
                  if by_size and budget else None),
            Panel("passes until convergence", xlabel, "pre-copy passes (pass 0 included)",
                  passes, xticks, xlog=True)]


# ---------------------------------------------------------------- the scenario

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = parser(NAME, "Live-migrate a qemu-storage-daemon disk while a guest writes to it "
                         "at 1, 4, 16 and 64 MiB/s: passes until convergence, the final delta, "
                         "the predicted against the measured downtime.",
               "256 MiB disk, rates 1 and 16 MiB/s, 1 rep",
               "the image, disks, targets, states and sockets (with --keep each run's logs, "
               "report and state stay; its disk and target are deleted after it all the same)")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--size", type=parse_size,
                       help="disk size (default 2G; 256M with --quick)")
    sizes.add_argument("--sizes",
                       help="the size axis: disk sizes, comma-separated (1G,4G,16G), each "
                            "with every rate and rep; the rates default to 4 MiB/s")
    p.add_argument("--seed", type=int, default=1, help="image seed (default 1)")
    p.add_argument("--rates", help="guest write rates in MiB/s, comma-separated "
                                   "(default 1,4,16,64; 1,16 with --quick; 4 with --sizes)")
    p.add_argument("--reps", type=int, help=f"runs per size and rate, interleaved over the "
                                            f"rates (default {DEFAULT_REPS}; 1 with --quick)")
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
    p.add_argument("--plot", help="SVG plot (default: the --out path with .svg)")
    a = p.parse_args(argv)
    if a.sizes is not None:
        try:
            a.size_list = sorted(parse_size(x) for x in a.sizes.split(",") if x.strip())
        except argparse.ArgumentTypeError as e:
            p.error(f"--sizes: {e}")
        if not a.size_list or len(set(a.size_list)) != len(a.size_list):
            p.error("--sizes must be distinct sizes, comma-separated")
    else:
        a.size_list = [a.size if a.size is not None
                       else (QUICK_SIZE if a.quick else DEFAULT_SIZE)]
    defaults(a, reps=(DEFAULT_REPS, 1))
    try:
        a.rate_list = ([float(x) for x in a.rates.split(",") if x.strip()] if a.rates
                       else list(SIZES_RATES if a.sizes is not None
                                 else QUICK_RATES if a.quick else RATES))
    except ValueError:
        p.error("--rates takes numbers (MiB/s), comma-separated")
    if not a.rate_list or any(r <= 0 for r in a.rate_list) or len(set(a.rate_list)) != len(
            a.rate_list):
        p.error("--rates must be distinct positive numbers")
    if a.reps < 1 or any(n < 16 * MiB or n % (64 * 1024) for n in a.size_list):
        p.error("--reps must be at least 1 and every size a multiple of 64K, at least 16M")
    try:
        if parse_duration(a.max_downtime) <= 0:
            raise ValueError
    except (BadInput, ValueError):
        p.error(f"--max-downtime {a.max_downtime!r} is not a positive duration (5s, 500ms, ...)")
    if a.max_passes < 2 or a.warmup < 0:
        p.error("--max-passes must be at least 2 and --warmup not negative")
    return a


def reproduce_command(a: argparse.Namespace) -> str:
    return reproduce(NAME, "--sizes" if a.sizes is not None else "--size",
                     ",".join(size_text(n) for n in a.size_list), "--seed", str(a.seed),
                     "--rates", ",".join(f"{r:g}" for r in a.rate_list), "--reps", str(a.reps),
                     "--pattern", a.pattern, "--guest-seed", str(a.guest_seed),
                     "--max-downtime", a.max_downtime, "--max-passes", str(a.max_passes),
                     "--warmup", f"{a.warmup:g}")


def preflight(a: argparse.Namespace) -> list[str]:
    missing = missing_programs("qemu-storage-daemon")
    if importlib.util.find_spec("nbd") is None:  # the guest writes through libnbd's binding
        missing.append("the nbd Python module (Debian package python3-libnbd)")
    if ENGINE.exists():
        missing += engine_lacks("migrate", "--type", "--qmp", "--on-cutover", "--stop-estimate",
                                "--max-downtime",
                                "--report", "--nbd-socket", "--max-passes")
    return missing


def run(ctx: Context) -> Outcome:
    a = ctx.a
    plot_path = a.plot or os.path.splitext(ctx.path)[0] + ".svg"
    os.makedirs(os.path.dirname(os.path.abspath(plot_path)), exist_ok=True)
    sizes_text = ", ".join(size_text(n) for n in a.size_list)
    images: dict[str, Any] = {}  # size text -> the image's provenance, as each is made

    def image_of(size: int) -> str:
        """The synth image of this size, made in workdir as source.img: it replaces the
        previous size's (truncated), so one image at a time takes the disk."""
        image, meta = prepare_image(ctx.workdir, argparse.Namespace(size=size, seed=a.seed))
        images[size_text(size)] = image_info(meta)
        return image

    size_started = time.time()
    image = image_of(a.size_list[0])
    prov = ctx.prov = provenance(ctx.workdir, images[size_text(a.size_list[0])])
    if len(a.size_list) > 1:
        prov["images"] = images  # filled in as each size's image is made
    prov["qemu_storage_daemon"] = cmd_output(["qemu-storage-daemon",
                                              "--version"]).splitlines()[0]
    prov["guest"] = {"pattern": a.pattern, "seed": a.guest_seed, "warmup_s": a.warmup,
                     "process": "bench.scenarios.live_guest "
                                "(transfer.demo.workload.GuestWriter)"}
    prov["migrate"] = {"max_downtime": a.max_downtime, "max_passes": a.max_passes}
    say_engine(prov, "qemu_storage_daemon")
    live = Live(ctx)
    seconds = warm_bytecode(live.env, "transfer.cli, transfer.migration.migrate, transfer.api, "
                            "transfer.demo.workload, bench.scenarios.live_guest, nbd, numpy",
                            "migrate")
    say(f"bytecode compiled into {live.env['PYTHONPYCACHEPREFIX']} in {seconds:.1f} s")
    rates_text = ", ".join(f"{r:g}" for r in a.rate_list)
    reps = f"{a.reps} rep{'s' if a.reps > 1 else ''}"
    say(f"{reps} of guest rates {rates_text} MiB/s ({a.pattern}) on {sizes_text} "
        f"disk{'s' if len(a.size_list) > 1 else ''}, each on a fresh copy of the image, daemon, "
        f"state and target; the guest writes {a.warmup:g} s before transfer migrate --type "
        f"live --max-downtime {a.max_downtime} starts")
    size_seconds: dict[str, float] = {}  # per size: its image and its runs
    for k, size in enumerate(a.size_list):
        if k:
            size_started = time.time()
            image = image_of(size)
        for rep in range(a.reps):
            for i, rate in enumerate(a.rate_list):
                live.run(size, image, rate, rep, a.guest_seed * 100_000 + rep * 1000 + i)
        size_seconds[size_text(size)] = round(time.time() - size_started, 1)
        if len(a.size_list) > 1:
            say(f"{size_text(size)}: {size_seconds[size_text(size)] / 60:.1f} min, "
                "its image included")
    summary = summarize(live, a.size_list, a.rate_list)
    ctx.emit(summary)
    with open(plot_path, "w") as f:
        f.write(draw_svg(panels(summary, live.runs), f"live-converge: {sizes_text} disk, guest "
                         f"{a.pattern}, --max-downtime {a.max_downtime}, {reps}, engine "
                         f"{prov['engine_commit']}, {os.path.basename(ctx.path)}"))
    text = [f"{NAME}: {sizes_text} raw disk{'s' if len(a.size_list) > 1 else ''} (image "
            f"seed {a.seed}) in qemu-storage-daemon, guest {a.pattern} writes through NBD in "
            f"its own process, transfer migrate --type live --max-downtime {a.max_downtime}; "
            f"{reps} per {'size and ' if len(a.size_list) > 1 else ''}rate; engine "
            f"{prov['engine_commit']}; {prov['nproc']} CPUs", "", table(summary), "",
            "Medians over the reps (min–max). passes: pre-copy passes before the cutover, pass "
            "0 (the whole disk) included, the final pass not; final delta: what the final pass "
            "copied with the guest stopped; measured downtime: STOP created (the stop command "
            "acts) to transfer migrate reaped; engine's own: its report (stop command + final "
            "pass, read-back included); CPU %: of one CPU over the migration's wall (machine: of "
            "all CPUs); verified: transfer verify of the daemon's disk against the target "
            "said equal.", "", runs_table(live.runs), "", f"plot: {plot_path}"]
    text += model_lines(live.runs)
    return Outcome(bars(summary), text, {"size_seconds": size_seconds, "plot": plot_path})


def model_lines(runs: list[dict[str, Any]]) -> list[str]:
    """What the model assumed against what happened, per converged run."""
    models = [r for r in runs if r.get("model")]
    if not models:
        return []
    out = ["", "the model against what happened (final pass): expected delta = last dirty rate "
           "× time since the last hand-over; expected copy s = that / copy rate"]
    for r in models:
        m = r["model"]
        wrote = (r.get("guest") or {}).get("window_rate")
        out.append(
            f"  {size_text(r['size'])} {r['rate_mib_s']:5g} MiB/s #{r['rep'] + 1}: dirty rate "
            f"{m['dirty_rate'] / MiB:.1f} MiB/s (guest wrote {fmt(wrote and wrote / MiB, '.1f')}"
            f" MiB/s), copy rate {fmt(m['copy_rate'] and m['copy_rate'] / MiB, '.0f')} "
            f"MiB/s; final delta {_mib_text(r['final_delta_bytes'])} MiB, expected "
            f"{_mib_text(m['expected_final_delta_bytes'])} MiB (× "
            f"{fmt(m['final_delta_over_expected'], '.2f')}); predicted "
            f"{fmt(r['predicted_downtime_s'], '.3f')} s = copy "
            f"{fmt(m['expected_copy_s'], '.3f')} + overhead & read-back "
            f"{fmt(m['rest_of_prediction_s'], '.3f')} (pass 0 took "
            f"{fmt(_pass0_s(r), '.3f')} s); final pass took "
            f"{fmt(r['final_pass_s'], '.3f')} s + stop {fmt(r['stop_seconds'], '.3f')}"
            f" s; measured {fmt(r['measured_downtime_s'], '.3f')} s")
    return out


# ---------------------------------------------------------------- the report

def report_notes(run: Run) -> list[str]:
    s = next(iter(run.of_type("summary")), None)
    if not s:
        return []
    sizes = ", ".join(f"{n / GiB:.2g}" for n in _sizes(s))
    return [f"- disk {sizes} GiB, --max-downtime {fmt(s.get('max_downtime_s'), 'g')} s; medians "
            "over the reps (min–max)"]


def best_peer_rows(run: Run) -> list[tuple[str, str, Any]]:
    return [("downtime prediction", "none (no peer predicts downtime)", "see its bars")]


def plot(run: Run, png: str) -> None:
    """The panels (see panels()) of the run's summary and runs."""
    s = run.of_type("summary")[0]  # a plot is made of a run with a summary
    sizes = ", ".join(f"{n / GiB:g}" for n in _sizes(s))
    rates = ", ".join(f"{x:g}" for x in sorted({g["rate_mib_s"] for g in s.get("rates", [])}))
    draw_png(panels(s, run.of_type("run")), png, plot_title(
        run, f"{sizes} GiB disk, transfer migrate --type live"
        + (f", guest {rates} MiB/s" if len(_sizes(s)) > 1 else "")))
