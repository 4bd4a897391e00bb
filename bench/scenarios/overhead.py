"""overhead: the engine's own cost, with a source that costs next to nothing to serve.

nbdkit serves a disk from memory (`memory`: all hole; `sparse-random`: runs of data and holes),
read-only on a unix socket, fresh for every run, and the engine and nbdcopy copy it to `null:`:
per source a reference digest, a warm-up per tool (the engine's digest checked), then --reps runs
interleaved. Details: bench/README.md, "overhead".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from typing import Any

from transfer.cli import parse_size
from transfer.demo import file_digest
from transfer.demo.servers import Nbdkit

from ..harness.machine import (
    ENGINE,
    GiB,
    MiB,
    cmd_output,
    fmt,
    invalid_text,
    md_table,
    median,
    missing_programs,
    paired,
    provenance,
    rep_stats,
    say,
    size_text,
    walls,
)
from ..harness.measure import cost_text, measured
from ..harness.plots import bar_groups, pyplot, save, title
from ..harness.report import Run
from ..harness.runner import Context, Outcome, defaults, parser, reproduce

NAME = "overhead"
SOURCES = ("memory", "sparse-random")
TOOLS = ("engine", "nbdcopy")
DEFAULT_SIZE = 4 * GiB
QUICK_SIZE = 256 * MiB
REPORT_FIELDS = ("seconds", "bytes_read", "bytes_copied", "bytes_zeroed", "bytes_skipped",
                 "requests", "zero_requests", "connections", "request_size", "in_flight",
                 "digest", "native")
BAR_NBDCOPY = 1.0
BAR_RSS_MIB = 200


def plugin_args(source: str, a: argparse.Namespace) -> list[str]:
    if source == "memory":
        return ["memory", size_text(a.size)]
    return (["sparse-random", size_text(a.size), f"seed={a.seed}", f"percent={a.percent}"]
            + (["random-content=true"] if a.random_content else []))


def data_bytes(uri: str) -> int:
    """Bytes the server's extents call data (not hole, not zero), from nbdinfo --map --totals:
    lines `BYTES PERCENT TYPE DESCRIPTION`, type 0 being data."""
    out = subprocess.run(["nbdinfo", "--map", "--totals", uri], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    total = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "0":
            total += int(parts[0])
    return total


def reference_digest(uri: str) -> str:
    """The disk digest, read by nbdcopy to a pipe and hashed by the xxhash package alone."""
    proc = subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        digest = file_digest(f"/proc/self/fd/{proc.stdout.fileno()}")
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"nbdcopy {uri} - exited {code}")
    return digest


def run_one(ctx: Context, source: str, tool: str, rep: int | None, ref: dict[str, Any]) -> None:
    """One timed run against a fresh server; rep None is the warm-up, also checked."""
    a = ctx.a
    report, files = (os.path.join(ctx.workdir, n) for n in ("report.json", "child"))
    rec: dict[str, Any] = {"type": "run", "scenario": NAME, "source": source, "tool": tool,
                           "rep": rep, "warmup": rep is None}
    problems, data = measured(
        rec, lambda uri: ([str(ENGINE), "copy", uri, "null:", "--progress", "none", "--report",
                           report] if tool == "engine" else ["nbdcopy", uri, "null:"]),
        files, max(120.0, 60.0 * a.size / GiB), server_of(ctx, source),
        report if tool == "engine" else None)
    rec["virtual_gib_per_s"] = round(a.size / GiB / rec["wall_s"], 4)
    if tool == "engine" and rec["exit"] == 0:
        rec["engine_report"] = {k: data.get(k) for k in REPORT_FIELDS}
        if rep is None:
            rec["checks"] = {"engine_digest": {"expected": ref["digest"],
                                               "reported": data.get("digest")}}
            if data.get("digest") != ref["digest"]:
                problems.append(f"engine digest {data.get('digest')} != reference "
                                f"{ref['digest']}")
    ctx.record(rec, problems, tool == "engine")
    own = (rec.get("engine_report") or {}).get("seconds")
    label = "warm-up" if rep is None else f"rep {rep + 1}/{a.reps}"
    say(f"  {source:13} {tool:7} {label:9} {rec['wall_s']:6.2f} s "
        f"{rec['virtual_gib_per_s']:6.2f} GiB/s  {cost_text(rec)} "
        f"(server {fmt(rec['server_maxrss_mib'], '.1f')})"
        + ("" if own is None else f", engine's own {own:.2f} s") + invalid_text(problems))


def server_of(ctx: Context, source: str) -> Nbdkit:
    plugin, *args = plugin_args(source, ctx.a)
    return Nbdkit(os.path.join(ctx.workdir, "nbd.sock"), plugin, *args, readonly=True)


def summarize_source(a: argparse.Namespace, runs: list[dict[str, Any]], source: str,
                     ref: dict[str, Any]) -> dict[str, Any]:
    gib = a.size / GiB
    mine = [r for r in runs if r["source"] == source]
    reps = {t: sorted((r for r in mine if r["tool"] == t and not r["warmup"]),
                      key=lambda r: r["rep"]) for t in TOOLS}
    tools: dict[str, Any] = {}
    for tool in TOOLS:
        good = [r for r in reps[tool] if r["valid"]]
        t = tools[tool] = rep_stats(reps[tool], [r for r in mine if r["tool"] == tool
                                                 and r["warmup"]], gib, virtual=gib,
                                    data=ref["data_bytes"] / GiB or None)
        cpu, srv = (median([r[k] for r in good]) for k in ("client_cpu_s", "server_cpu_s"))
        t["cpu_s_per_gib"] = None if cpu is None or srv is None else round((cpu + srv) / gib, 4)
        t["other_cpu_s_per_gib"] = median([r["other_cpu_s"] / gib for r in good])
        if tool == "engine":
            t["engine_own_seconds_median"] = median(
                [r["engine_report"]["seconds"] for r in good if r.get("engine_report")])
            t["bytes_read_median"] = median(
                [r["engine_report"]["bytes_read"] for r in good if r.get("engine_report")])
    cpus = {t: [r["client_cpu_s"] + r["server_cpu_s"] if r["valid"] else None for r in reps[t]]
            for t in TOOLS}
    return {
        "source": source, "plugin": plugin_args(source, a), "size": a.size,
        "data_bytes": ref["data_bytes"], "digest": ref["digest"], "tools": tools,
        # engine ÷ nbdcopy: nbdcopy's wall (CPU) ÷ the engine's, rep by rep (> 1: engine better).
        "engine_over_nbdcopy": paired(walls(reps["nbdcopy"]), walls(reps["engine"])),
        "cpu_engine_over_nbdcopy": paired(cpus["nbdcopy"], cpus["engine"]),
    }


def table(summary: dict[str, Any]) -> str:
    head = ("| source | tool | median s (min–max) | GiB/s virtual | GiB/s data | engine ÷ tool "
            "| CPU-s/GiB client | CPU-s/GiB server | CPU-s/GiB client+server | peak RSS MiB "
            "client / server | check |")
    lines = []
    for s in summary["sources"]:
        for tool, t in s["tools"].items():
            if tool == "engine":
                ratio = "1.00" if t["wall_s_median"] else "–"
            else:
                ratio = fmt(s["engine_over_nbdcopy"]["median"], ".2f")
            med = (f"{t['wall_s_median']:.2f} ({t['wall_s_min']:.2f}–{t['wall_s_max']:.2f})"
                   if t["wall_s_median"] else "–")
            ok = t["warmup_valid"] and t["valid_reps"] == t["reps"]
            check = ("ok" if tool == "engine" else "exit 0") if ok else "FAIL"
            lines.append(
                f"| {s['source']} | {tool} | {med} | {fmt(t['virtual_gib_per_s'], '.2f')} | "
                f"{fmt(t['data_gib_per_s'], '.2f')} | {ratio} | "
                f"{fmt(t['client_cpu_s_per_gib'], '.3f')} | "
                f"{fmt(t['server_cpu_s_per_gib'], '.3f')} | {fmt(t['cpu_s_per_gib'], '.3f')} | "
                f"{fmt(t['peak_rss_mib'], '.0f')} / {fmt(t['server_peak_rss_mib'], '.0f')} | "
                f"{check} |")
    return md_table(head, lines)


def notes(summary: dict[str, Any]) -> list[str]:
    """What the table does not say: the engine's own seconds against its wall, CPU pair by pair,
    the bytes it read."""
    out = []
    for s in summary["sources"]:
        e = s["tools"]["engine"]
        cpu = s["cpu_engine_over_nbdcopy"]["median"]
        out.append(
            f"{s['source']}: {s['data_bytes'] / GiB:.2f} GiB data of {s['size'] / GiB:g} GiB; "
            f"engine's own seconds {fmt(e.get('engine_own_seconds_median'), '.2f')} of wall "
            f"{fmt(e['wall_s_median'], '.2f')} (the rest: interpreter start and imports); it read "
            f"{fmt(e.get('bytes_read_median') and e['bytes_read_median'] / GiB, '.2f')} GiB; "
            f"client+server CPU nbdcopy ÷ engine {fmt(cpu, '.2f')} (per rep, median); "
            f"wall pairs {', '.join(f'{x:.2f}' for x in s['engine_over_nbdcopy']['pairs'])}")
    return out


def bars(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for s in summary["sources"]:
        v = s["engine_over_nbdcopy"]["median"]
        out.append({"bar": f"{s['source']}: engine ÷ nbdcopy ≥ {BAR_NBDCOPY:g}", "value": v,
                    "met": None if v is None else v >= BAR_NBDCOPY})
    rss = [s["tools"]["engine"]["peak_rss_mib"] for s in summary["sources"]
           if s["tools"]["engine"]["peak_rss_mib"] is not None]
    if rss:
        out.append({"bar": f"engine peak RSS ≤ {BAR_RSS_MIB} MiB", "value": max(rss),
                    "format": ".0f", "met": max(rss) <= BAR_RSS_MIB})
    return out


# ---------------------------------------------------------------- the scenario

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = parser(NAME, "Copy an nbdkit memory and sparse-random disk to null: with the engine "
                         "and nbdcopy: the engine's overhead alone, no disk or slow server in the "
                         "way.", "256 MiB, 1 rep")
    p.add_argument("--size", type=parse_size, help="disk size (default 4G; 256M with --quick)")
    p.add_argument("--sources", default=",".join(SOURCES),
                   help=f"comma-separated, of {','.join(SOURCES)} (default both)")
    p.add_argument("--reps", type=int, help="timed runs per tool and source, after one warm-up "
                                            "(default 5; 1 with --quick)")
    p.add_argument("--seed", type=int, default=1, help="sparse-random seed (default 1)")
    p.add_argument("--percent", type=int, default=50,
                   help="sparse-random: percent of the disk that is data (default 50)")
    p.add_argument("--random-content", action="store_true",
                   help="sparse-random: every byte random (default: a random byte repeated per "
                        "block; random content makes nbdkit the bottleneck)")
    a = p.parse_args(argv)
    defaults(a, size=(DEFAULT_SIZE, QUICK_SIZE), reps=(5, 1))
    a.sources = [s for s in a.sources.split(",") if s]
    bad = [s for s in a.sources if s not in SOURCES]
    if bad or not a.sources:
        p.error(f"unknown or no source: {', '.join(bad)} (of {', '.join(SOURCES)})")
    if a.reps < 1 or a.size < MiB or a.size % (64 << 10) or not 0 <= a.percent <= 100:
        p.error("--reps must be at least 1, --size a multiple of 64K (at least 1M), --percent "
                "0 to 100")
    a.sources = [s for s in SOURCES if s in a.sources]
    return a


def reproduce_command(a: argparse.Namespace) -> str:
    return reproduce(NAME, "--size", size_text(a.size), "--sources", ",".join(a.sources),
                     "--reps", str(a.reps), "--seed", str(a.seed), "--percent", str(a.percent),
                     *(["--random-content"] if a.random_content else []))


def preflight(a: argparse.Namespace) -> list[str]:
    return missing_programs("nbdkit", "nbdcopy", "nbdinfo")


def run(ctx: Context) -> Outcome:
    a = ctx.a
    workload = ", ".join(" ".join(plugin_args(s, a)) for s in a.sources)
    prov = ctx.prov = provenance(ctx.workdir, workload=f"nbdkit -r {workload}, to null:",
                                 cache="n/a (nbdkit serves from memory)",
                                 nbdinfo=cmd_output(["nbdinfo", "--version"]).splitlines()[0])
    say(f"{NAME}: nbdkit {workload} on a unix socket, fresh per run, copied to "
        f"null:; warm-up and check, then {a.reps} interleaved reps of "
        f"{', '.join(TOOLS)}; engine {prov['engine_commit']}")
    sources = []
    for source in a.sources:
        t = time.perf_counter()
        with server_of(ctx, source) as server:
            ref = {"data_bytes": data_bytes(server.uri), "digest": reference_digest(server.uri)}
        say(f"  {source}: {ref['data_bytes'] / GiB:.2f} GiB data (nbdinfo), reference "
            f"digest {ref['digest']} ({time.perf_counter() - t:.1f} s)")
        for rep in (None, *range(a.reps)):
            for tool in TOOLS:
                run_one(ctx, source, tool, rep, ref)
        sources.append(summarize_source(a, ctx.runs, source, ref))
    summary = {"type": "summary", "scenario": NAME, "size": a.size,
               "reps": a.reps, "sources": sources, "provenance": prov}
    ctx.emit(summary)
    text = [table(summary), "",
            "GiB/s virtual: disk size ÷ median wall (spawn to reaping); GiB/s data: nbdinfo's "
            "data bytes ÷ median wall; engine ÷ tool: median of per-rep tool wall ÷ engine wall "
            "(> 1: engine faster); CPU-s per virtual GiB, medians; server = nbdkit; peak RSS: "
            "the max over all runs, warm-up included."] + [f"  {n}" for n in notes(summary)]
    return Outcome(bars(summary), text, {"notes": notes(summary)},
                   invalid="a run failed or the engine's digest differs")


# ---------------------------------------------------------------- the report

def plot(run: Run, png: str) -> None:
    """Per source: GiB/s of the disk's virtual size (median wall, min–max whiskers), the engine
    beside nbdcopy with engine ÷ nbdcopy above; beside it client and server CPU-s per GiB."""
    plt = pyplot()
    s = run.of_type("summary")[0]  # a plot is made of a run with a summary
    sources, colors = s["sources"], plt.get_cmap("tab10")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))

    def value(src: dict[str, Any], tool: str) -> tuple[float, float, float, str] | None:
        t = src["tools"].get(tool) or {}
        if not t.get("wall_s_median"):
            return None
        gib, r = src["size"] / GiB, src["engine_over_nbdcopy"]["median"]
        y = gib / t["wall_s_median"]
        return (y, y - gib / t["wall_s_max"], gib / t["wall_s_min"] - y,
                "" if tool == "engine" or r is None else f"{r:.2f}")

    bar_groups(ax, sources, list(TOOLS), value, colors, fontsize=8, ytext=3)
    width = 0.8 / len(TOOLS)
    for i, tool in enumerate(TOOLS):
        shown = [(j, src["tools"][tool]) for j, src in enumerate(sources) if value(src, tool)]
        xs = [j + (i - (len(TOOLS) - 1) / 2) * width for j, _ in shown]
        cli = [t["client_cpu_s_per_gib"] or 0 for _, t in shown]
        ax2.bar(xs, cli, width, label=f"{tool} client", color=colors(i))
        ax2.bar(xs, [t["server_cpu_s_per_gib"] or 0 for _, t in shown], width, bottom=cli,
                label=f"{tool}: nbdkit", color=colors(i), alpha=0.4, hatch="//")
    for a in (ax, ax2):
        a.set_xticks(range(len(sources)), [src["source"] for src in sources])
        a.grid(axis="y", alpha=0.3)
        a.legend(fontsize=8)
    ax.set_ylabel("GiB/s of the virtual size (median wall)")
    ax.set_xlabel("source, to null: (numbers: engine ÷ nbdcopy, per-rep medians)")
    ax2.set_ylabel("CPU-s per virtual GiB (medians)")
    ax2.set_xlabel("source: client (solid) and nbdkit (hatched)")
    save(plt, fig, png, title(run, f"{s['size'] / GiB:g} GiB from nbdkit to null:, engine "
                                   "overhead"))
