"""kernels: the engine's kernels (zero scan, block hash, interval algebra), each beside its
pure-Python twin and a baseline, timed by pytest-benchmark.

kernels_bench.py holds the inputs, the implementations (KERNELS, in their interleaving order) and
the cross-checks; this module runs it with pytest in a child process (and is its pytest plugin,
`-p bench.scenarios.kernels`), turns pytest-benchmark's JSON into the JSON lines, and makes the
table, bars and plot. The inputs, the method and the bars: bench/README.md, "kernels".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from transfer import _native
from transfer.cli import parse_size
from transfer.integrity.manifest import BLOCK

from ..harness.machine import (
    ROOT,
    GiB,
    MiB,
    cmd_output,
    engine_commit,
    fmt,
    invalid_text,
    md_table,
    paired,
    provenance,
    say,
    size_text,
    stats,
)
from ..harness.plots import bar_groups, pyplot, save, title
from ..harness.report import Run
from ..harness.runner import Context, Outcome, defaults, parser, reproduce

NAME = "kernels"
WORKDIR = False  # the inputs live in memory
DEFAULT_SIZE = 64 * MiB
QUICK_SIZE = 4 * MiB
DEFAULT_AREAS = 100_000
QUICK_AREAS = 10_000
DEFAULT_DISK = 1 << 40
BUFFERS = ("random", "half-zero")
# Per kernel: its implementations in the interleaving order, the engine's first.
KERNELS: dict[str, tuple[str, ...]] = {
    "zero-scan": ("cython", "python", "numpy", "numpy-u64"),
    "block-hash": ("cython", "python", "xxhash-loop"),
    "interval-algebra": ("cython", "python", "numpy", "numpy-arrays"),
}
# The engine's implementation of each kernel: the compiled one (native/*.pyx).
ENGINE: dict[str, str] = {"zero-scan": "cython", "block-hash": "cython",
                          "interval-algebra": "cython"}
TWIN = "python"  # the pure-Python twin (transfer/_native/_reference.py)
INPUTS: dict[str, tuple[str, ...]] = {
    "zero-scan": BUFFERS, "block-hash": BUFFERS, "interval-algebra": ("scattered", "clustered"),
}
UNIT = {"zero-scan": "GiB/s", "block-hash": "GiB/s", "interval-algebra": "M areas/s"}
# What kernels_bench.py uses when run by hand without --kernels-* options: the full run's.
DEFAULTS: dict[str, Any] = {"size": DEFAULT_SIZE, "seed": 1, "reps": 15, "min_sample": 0.005,
                            "areas": DEFAULT_AREAS, "disk": DEFAULT_DISK}
BAR_OVER_PEER = 1.0       # the engine's kernel at least as fast as its best peer
INTERVAL_PEERS = ("python", "numpy")  # the interval algebra's barred peers: the drop-ins
BENCH_FILE = "bench/scenarios/kernels_bench.py"


# -------------------------------------------------- pytest plugin (-p bench.scenarios.kernels)

def pytest_addoption(parser: Any) -> None:
    """The kernels_bench.py options, when pytest loads this module with -p
    bench.scenarios.kernels."""
    g = parser.getgroup("kernels", "bench/scenarios/kernels_bench.py (defaults: the full run's)")
    g.addoption("--kernels-size", type=int, help="bytes per buffer")
    g.addoption("--kernels-seed", type=int, help="input seed")
    g.addoption("--kernels-reps", type=int, help="interleaved rounds (samples per impl)")
    g.addoption("--kernels-min-sample", type=float, help="seconds a sample lasts at least")
    g.addoption("--kernels-areas", type=int, help="changed areas per interval input")
    g.addoption("--kernels-disk", type=int, help="disk bytes of the interval inputs")


try:  # the harness itself runs without pytest; the hook must come before pytest-benchmark's
    from pytest import hookimpl as _hookimpl
    _tryfirst = _hookimpl(tryfirst=True)
except ImportError:  # pragma: no cover
    def _tryfirst(f: Any) -> Any:
        return f


@_tryfirst
def pytest_benchmark_generate_commit_info(config: Any) -> dict[str, Any]:
    """pytest-benchmark's commit info without its `git describe --dirty`, which may write the
    index while others work in the tree: read-only git, --no-optional-locks."""
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]
    branch = cmd_output(git + ["rev-parse", "--abbrev-ref", "HEAD"])
    return {"id": cmd_output(git + ["rev-parse", "HEAD"]) or "unknown",
            "time": cmd_output(git + ["show", "-s", "--format=%cI", "HEAD"]) or None,
            "dirty": bool(cmd_output(git + ["status", "--porcelain", "--untracked-files=no"])),
            "engine_commit": engine_commit(), "project": "transfer",
            "branch": "(detached head)" if branch == "HEAD" else branch or "(unknown)"}


# ---------------------------------------------------------------- pytest-benchmark -> JSON lines

def run_pytest(a: argparse.Namespace, json_path: str) -> tuple[int, str]:
    """Run kernels_bench.py's benchmarks; pytest's exit code and its output."""
    cmd = [sys.executable, "-m", "pytest", BENCH_FILE, "-p", "bench.scenarios.kernels", "-p",
           "no:cacheprovider", "-q", "--benchmark-disable-gc", f"--benchmark-json={json_path}",
           "--benchmark-columns=min,median,max,iterations", "--benchmark-sort=name",
           "--kernels-size", str(a.size), "--kernels-seed", str(a.seed), "--kernels-reps",
           str(a.reps), "--kernels-min-sample", repr(a.min_sample), "--kernels-areas",
           str(a.areas), "--kernels-disk", str(a.disk)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    return p.returncode, p.stdout + p.stderr


Rows = list[dict[str, Any]]


def records_of(doc: dict[str, Any], reps: int) -> tuple[Rows, Rows]:
    """From pytest-benchmark's JSON: a record per kernel, input and implementation (every round's
    per-call seconds, stats.data: one per benchmark, in round order; round 0's cross-check), and
    the summary's row of each, with its ratios pair by pair: the twin's time ÷ its time (how many
    times faster than the pure-Python twin) and its time ÷ the engine's (how many times slower
    than the engine's kernel; `cython_over_this` too for the compiled kernels, as before)."""
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for b in doc.get("benchmarks") or []:
        x = b.get("extra_info") or {}
        by.setdefault((x.get("kernel"), x.get("input"), x.get("impl")), []).append(b)
    records, rows = [], []
    for kernel, impls in KERNELS.items():
        for inp in INPUTS[kernel]:
            group = {}
            for impl in impls:
                found = sorted(by.get((kernel, inp, impl), []),
                               key=lambda b: b["extra_info"]["round"])
                seconds = [t for b in found for t in b["stats"]["data"]]
                first = next((b["extra_info"] for b in found if b["extra_info"]["round"] == 0),
                             None)
                problems = list(first["problems"]) if first else [
                    f"{impl}: no round 0 (its warm-up and cross-check) in pytest-benchmark's JSON"]
                if len(seconds) != reps:
                    problems.append(f"{impl}: {len(seconds)} of {reps} samples")
                x = found[0]["extra_info"] if found else {}
                s = stats(seconds)
                amount, gib = x.get("amount"), UNIT[kernel] == "GiB/s"
                rate = _rate(kernel, amount, s["median"])
                group[impl] = rec = {
                    "type": "run", "scenario": NAME, "kernel": kernel, "buffer": inp,
                    "impl": impl, "engine": impl == ENGINE[kernel], "block": BLOCK,
                    "bytes": amount if gib else None, "areas": amount if not gib else None,
                    "number": x.get("number"), "seconds": [round(t, 9) for t in seconds],
                    "seconds_stats": s, "unit": UNIT[kernel], "per_s": rate,
                    "gib_per_s": rate if gib else None,
                    "benchmarks": [b["name"] for b in found],
                    "valid": not problems, "problems": problems,
                }
                if first and first.get("input_info"):
                    rec["input_info"] = first["input_info"]
                records.append(rec)
            engine = group[ENGINE[kernel]]["seconds"]
            for impl, r in group.items():
                s, gib = r["seconds_stats"], r["unit"] == "GiB/s"
                amount = r["bytes"] if gib else r["areas"]
                lo, hi = _rate(kernel, amount, s["max"]), _rate(kernel, amount, s["min"])
                over_engine = paired(r["seconds"], engine)
                rows.append({
                    "kernel": kernel, "buffer": inp, "impl": impl, "engine": r["engine"],
                    "bytes": r["bytes"], "areas": r["areas"], "number": r["number"],
                    "seconds_median": s["median"], "seconds_min": s["min"],
                    "seconds_max": s["max"], "unit": r["unit"], "per_s": r["per_s"],
                    "per_s_min": lo, "per_s_max": hi, "gib_per_s": r["gib_per_s"],
                    "gib_per_s_min": lo if gib else None, "gib_per_s_max": hi if gib else None,
                    "over_twin": paired(group[TWIN]["seconds"], r["seconds"]),
                    "engine_over_this": over_engine,
                    "cython_over_this": over_engine if ENGINE[kernel] == "cython" else None,
                    "valid": r["valid"],
                })
    return records, rows


def _rate(kernel: str, amount: int | None, seconds: float | None) -> float | None:
    if not amount or not seconds:
        return None
    if UNIT[kernel] == "GiB/s":
        return round(amount / GiB / seconds, 3)
    return round(amount / 1e6 / seconds, 4)


def _time_text(x: float | None) -> str:
    if x is None:
        return "–"
    if x < 1e-3:
        return f"{x * 1e6:.1f} µs"
    if x < 1:
        return f"{x * 1e3:.2f} ms"
    return f"{x:.2f} s"


def table(summary: dict[str, Any]) -> str:
    head = ("| kernel | input | implementation | median per call (min–max) | throughput "
            "| × python twin | engine ÷ this | check |")
    lines = []
    for r in summary["rows"]:
        t = (f"{_time_text(r['seconds_median'])} ({_time_text(r['seconds_min'])}–"
             f"{_time_text(r['seconds_max'])})")
        unit = r.get("unit", "GiB/s")  # runs before the interval algebra: GiB/s only
        rate = r.get("per_s", r.get("gib_per_s"))
        engine = r.get("engine", r["impl"] == "cython")
        ratio = (r.get("engine_over_this") or r.get("cython_over_this") or {}).get("median")
        lines.append(f"| {r['kernel']} | {r['buffer']} | "
                     f"{r['impl']}{' (engine)' if engine else ''} | {t} | "
                     f"{fmt(rate, '.2f')} {unit} | {fmt(r['over_twin']['median'], '.2f')} | "
                     f"{fmt(ratio, '.2f')} | {'ok' if r['valid'] else 'FAIL'} |")
    return md_table(head, lines)


def bars(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kernel and input: cython against its best peer (twin or baseline), the median of
    per-sample ratios peer time ÷ cython time. For the interval algebra the peers are the twin
    and the drop-in numpy (lists of pairs in and out; the engine's take the same lists and give
    Runs); numpy-arrays is shown, not barred: it leaves out the conversions a drop-in pays."""
    out = []
    for kernel in KERNELS:
        engine = ENGINE[kernel]
        for inp in INPUTS[kernel]:
            peers = [r for r in rows if r["kernel"] == kernel and r["buffer"] == inp
                     and r["impl"] != engine and r["engine_over_this"]["median"] is not None]
            if kernel == "interval-algebra":
                peers = [r for r in peers if r["impl"] in INTERVAL_PEERS]
            if not peers:
                continue
            best = min(peers, key=lambda r: r["engine_over_this"]["median"])
            v = best["engine_over_this"]["median"]
            text = f"{kernel}, {inp}: cython ÷ best peer ({best['impl']}) ≥ {BAR_OVER_PEER:g}"
            out.append({"bar": text, "value": v, "peer": best["impl"], "met": v >= BAR_OVER_PEER})
    return out


def numpy_import_seconds(n: int) -> float | None:
    """The median of n `import numpy` times in fresh interpreters (the start-up left out): what
    a pass would pay first to use a numpy interval algebra (why the engine has its own)."""
    code = "import time; t = time.perf_counter(); import numpy; print(time.perf_counter() - t)"
    times = []
    for _ in range(n):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=False)
        try:
            times.append(float(p.stdout.strip()))
        except ValueError:
            return None
    return round(statistics.median(times), 4)


# ---------------------------------------------------------------- the scenario

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = parser(NAME, "Time the native zero scan, block hash and interval algebra against "
                         "their pure-Python twins and numpy / xxhash-loop baselines, with "
                         "pytest-benchmark.",
               "4 MiB buffers, 10,000 areas, 3 samples")
    p.add_argument("--size", type=parse_size,
                   help="bytes per buffer (default 64M; 4M with --quick), a multiple of 64K")
    p.add_argument("--seed", type=int, default=1, help="input seed (default 1)")
    p.add_argument("--reps", type=int, help="timed samples per implementation, interleaved "
                                            "(default 15; 3 with --quick)")
    p.add_argument("--min-sample", type=float,
                   help="seconds a sample lasts at least: fast calls are repeated within it "
                        "(default 0.005; 0.001 with --quick)")
    p.add_argument("--areas", type=int, help="changed areas per interval-algebra input "
                                             "(default 100000; 10000 with --quick)")
    p.add_argument("--disk", type=parse_size, default=DEFAULT_DISK,
                   help="disk size of the interval-algebra inputs (default 1T), a multiple of 64K")
    a = p.parse_args(argv)
    defaults(a, size=(DEFAULT_SIZE, QUICK_SIZE), reps=(15, 3), areas=(DEFAULT_AREAS, QUICK_AREAS),
             min_sample=(0.005, 0.001))
    if (a.reps < 1 or a.size < 2 * BLOCK or a.size % BLOCK or a.min_sample < 0 or a.areas < 1
            or a.disk < 16 * BLOCK or a.disk % BLOCK):
        p.error("--reps and --areas must be at least 1, --size a multiple of 64K (at least "
                "128K), --disk a multiple of 64K (at least 1M), --min-sample not negative")
    return a


def reproduce_command(a: argparse.Namespace) -> str:
    return reproduce(NAME, "--size", size_text(a.size), "--seed", str(a.seed), "--reps",
                     str(a.reps), "--min-sample", f"{a.min_sample:g}", "--areas", str(a.areas),
                     "--disk", size_text(a.disk))


def preflight(a: argparse.Namespace) -> list[str]:
    try:
        _native.kernels("cython")
    except Exception as e:  # noqa: BLE001  (NativeMissing: say how to build, exit 2)
        return [str(e)]
    if importlib.util.find_spec("pytest_benchmark") is None:
        return ["pytest-benchmark (.venv/bin/pip install -e '.[test]')"]
    return []


def _cache_sizes() -> str:
    out = []
    try:
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            level, kind, size = ((index / n).read_text().strip() for n in ("level", "type", "size"))
            if kind != "Instruction":
                out.append(f"L{level} {size}")
    except OSError:
        pass
    return ", ".join(out) or "unknown"


def run(ctx: Context) -> Outcome:
    import pytest  # there: preflight found pytest-benchmark

    a = ctx.a
    bench_json = os.path.splitext(ctx.path)[0] + ".pytest-benchmark.json"
    workload = (f"two {size_text(a.size)} buffers in memory (random; half its 64 KiB blocks "
                f"zeroed); {a.areas:,} changed areas (scattered; clustered) and a previous "
                f"plan on a {size_text(a.disk)} disk; seed {a.seed}")
    prov = ctx.prov = provenance(str(ROOT), workload=workload,
                                 cache=f"inputs in memory ({_cache_sizes()})",
                                 numpy=np.__version__, xxhash=xxhash.VERSION,
                                 machine=platform.machine())
    say(f"{NAME}: {workload}; {a.reps} interleaved samples of >= {a.min_sample:g} s "
        f"per implementation, by pytest-benchmark; engine {prov['engine_commit']}")
    code, output = run_pytest(a, bench_json)
    try:
        with open(bench_json) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        doc = {}
        output += f"\n(pytest-benchmark's JSON {bench_json}: {e})"
    if code != 0:
        tail = "\n".join(output.rstrip().splitlines()[-40:])
        print(f"{NAME}: pytest exited {code}; its output ends:\n{tail}", file=sys.stderr)
    if code == 2 and not doc:  # interrupted
        raise KeyboardInterrupt
    import_s = numpy_import_seconds(1 if a.quick else 3)
    # pytest-benchmark's machine_info without the CPU's long flag list
    info = dict(doc.get("machine_info") or {})
    cpu = {k: v for k, v in (info.pop("cpu", None) or {}).items() if k != "flags"}
    prov.update(pytest_benchmark=doc.get("version"), pytest=pytest.__version__,
                pytest_benchmark_machine_info=info | ({"cpu": cpu} if cpu else {}),
                pytest_benchmark_commit_info=doc.get("commit_info"))
    records, rows = records_of(doc, a.reps)
    for rec in records:
        rec["provenance"] = prov
        ctx.emit(rec)
        say(f"  {rec['kernel']:16} {rec['buffer']:9} {rec['impl']:12} "
            f"{_time_text(rec['seconds_stats']['median']):>10} per call (× {rec['number']}) "
            f"{fmt(rec['per_s'], '9.2f')} {rec['unit']}" + invalid_text(rec["problems"]))
    inputs = [{"input": r["buffer"]} | r["input_info"] for r in records
              if r.get("input_info") and r["engine"]]
    summary = {"type": "summary", "scenario": NAME, "size": a.size, "block": BLOCK,
               "reps": a.reps, "min_sample": a.min_sample, "areas": a.areas,
               "disk": a.disk, "interval_inputs": inputs, "numpy_import_s": import_s,
               "pytest_benchmark": doc.get("version"),
               "method": {"runner": "pytest-benchmark, pedantic mode", "timer":
                          "time.perf_counter", "rounds_per_benchmark": 1,
                          "interleaving": "per kernel and input: round 0: A B C, "
                                          "round 1: A B C, ...",
                          "disable_gc": True, "pytest_exit": code},
               "rows": rows, "provenance": prov}
    ctx.emit(summary)
    text = [table(summary), "",
            "throughput: the input's bytes (GiB/s) or areas (M areas/s) ÷ median seconds per "
            "call; × python twin: median of per-sample twin time ÷ this time; engine ÷ this: "
            "median of this time ÷ the engine's (> 1: the engine faster)."]
    if import_s is not None:
        text.append(f"numpy's import in a fresh interpreter: {import_s * 1e3:.0f} ms (in no "
                    "sample)")
    return Outcome(bars(rows), text, {"pytest_exit": code, "pytest_benchmark_json": bench_json},
                   code == 0 and bool(records) and all(r["valid"] for r in records),
                   "an implementation's output differs, or pytest failed")


# ---------------------------------------------------------------- the report

def report_notes(run: Run) -> list[str]:
    s = next(iter(run.of_type("summary")), None)
    if not s:
        return []
    out = [f"- {fmt(s.get('size') and s['size'] / MiB, 'g')} MiB per buffer, 64 KiB blocks, "
           f"{s.get('reps')} interleaved samples per implementation; on `random` every block's "
           "first bytes are non-zero, so the compiled scan stops at once per block: its GiB/s "
           "there is per-block overhead, not memory bandwidth"]
    if s.get("areas"):
        made = "; ".join(
            f"{i.get('input', '?')}: {fmt(i.get('new_runs'), ',')} runs once merged, "
            f"{fmt(i.get('grew_runs'), ',')} beyond the last plan, a plan of "
            f"{fmt(i.get('plan_runs'), ',')} runs"
            for i in s.get("interval_inputs") or [])
        ms = s.get("numpy_import_s")
        out.append(f"- interval algebra: {s['areas']:,} changed areas on a {_disk_text(s)} disk; "
                   "a call is a warm pass's range work (merge the areas, clip the interrupted "
                   "plan, subtract, union, clip, count the bytes); " + (f"{made}; " if made else "")
                   + f"numpy's import in a fresh interpreter: {fmt(ms and ms * 1e3, '.0f')} ms, "
                   "in no sample")
    if s.get("pytest_benchmark"):
        out.append(f"- timed by pytest-benchmark {s['pytest_benchmark']} (pedantic: a benchmark "
                   "per round and implementation, 1 round of `number` calls, rounds interleaved "
                   "A B C A B C …); its JSON is kept beside the JSON lines")
    return out


def _disk_text(s: dict[str, Any]) -> str:
    disk = s.get("disk") or 0
    return f"{disk >> 40} TiB" if disk and disk % (1 << 40) == 0 else f"{disk / GiB:g} GiB"


def plot(run: Run, png: str) -> None:
    """A panel per kernel: throughput per input (median, min–max whiskers, log scale; GiB/s for
    the zero scan and the block hash, M areas/s for the interval algebra), the engine's
    implementation beside its pure-Python twin and the baselines; engine ÷ this (this time ÷ the
    engine's, the median of per-sample ratios) above each peer's bar. Runs from before the
    interval algebra (GiB/s only, cython the engine) plot their two panels."""
    plt = pyplot()
    s = run.of_type("summary")[0]  # a plot is made of a run with a summary
    rows = s.get("rows") or []
    kernels = [k for k in KERNELS if any(r["kernel"] == k for r in rows)] or list(KERNELS)
    fig, axes = plt.subplots(1, len(kernels), figsize=(5.2 * len(kernels), 4.8), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, kernel in zip(axes[0], kernels):
        # What the run itself says (an older run's engine may differ from today's), else today's.
        mine = [r for r in rows if r["kernel"] == kernel]
        impls = list(dict.fromkeys(r["impl"] for r in mine)) or list(KERNELS[kernel])
        inputs = list(dict.fromkeys(r["buffer"] for r in mine)) or list(INPUTS[kernel])
        engine = next((r["impl"] for r in mine if r.get("engine")), ENGINE[kernel])
        unit = next((r["unit"] for r in mine if r.get("unit")), "GiB/s")
        shown = {impl + (" (engine)" if impl == engine else ""): impl for impl in impls}

        def value(inp: str, name: str, mine: Rows = mine, engine: str = engine,
                  shown: dict[str, str] = shown) -> tuple[float, float, float, str] | None:
            impl = shown[name]
            r = next((r for r in mine if r["buffer"] == inp and r["impl"] == impl), None)
            rate = r and r.get("per_s", r.get("gib_per_s"))
            if not r or not rate:
                return None
            ratio = (r.get("engine_over_this") or r.get("cython_over_this") or {}).get("median")
            return (rate, rate - (r.get("per_s_min", r.get("gib_per_s_min")) or rate),
                    (r.get("per_s_max", r.get("gib_per_s_max")) or rate) - rate,
                    "" if impl == engine or ratio is None
                    else f"{ratio:,.0f}×" if ratio >= 100 else f"{ratio:.3g}×")

        bar_groups(ax, inputs, list(shown), value, colors)
        ax.set_yscale("log")
        ax.set_xticks(range(len(inputs)), list(inputs))
        ax.set_title(kernel + (" (the engine's was plain Python)" if engine == "python" else ""),
                     fontsize=10)
        ax.set_ylabel(f"{unit} (median per call; log scale)")
        ax.set_xlabel("input (numbers: engine ÷ this, per-sample medians)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    what = f"{(s.get('size') or 0) / MiB:g} MiB buffers, 64 KiB blocks"
    if s.get("areas"):
        what += f"; {s['areas']:,} areas on a {_disk_text(s)} disk"
    save(plt, fig, png, title(run, what))
