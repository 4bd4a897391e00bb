"""The markdown summary and PNG plots of benchmark runs, made from their JSON lines alone.

Used by `python -m bench` after a run (a summary of that run's scenarios in --out DIR) and by
`python -m bench results` (bench/RESULTS.md from the newest run of each scenario). The tables are
the scenarios' own (their `table` functions take the summary records the JSON lines hold), so
the markdown says what the run printed. Plots need matplotlib (optional: without it they are
skipped, with a note; live-converge's own SVG is still there).
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import shlex
import shutil
import statistics
from dataclasses import dataclass, field
from typing import Any

SCENARIOS = {
    "cold-copy": "bench.cold_copy",
    "warm-delta": "bench.warm_delta",
    "live-converge": "bench.live_converge",
    "kernels": "bench.kernels",
    "overhead": "bench.overhead",
}
GiB = 1 << 30
MiB = 1 << 20
NO_MATPLOTLIB = "plots skipped: matplotlib not installed"


# ---------------------------------------------------------------- reading a run

@dataclass
class Run:
    """One scenario's JSON lines file."""
    path: str
    scenario: str
    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0

    @property
    def verdict(self) -> dict[str, Any] | None:
        return next((r for r in reversed(self.records) if r.get("type") == "verdict"), None)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == kind]

    @property
    def provenance(self) -> dict[str, Any]:
        v = self.verdict
        if v and v.get("provenance"):
            return v["provenance"]
        return next((r["provenance"] for r in self.records if r.get("provenance")), {})


def load_run(path: str, scenario: str | None = None) -> Run:
    """Read a JSON lines file; a line that does not parse (a run killed mid-write) is counted,
    not fatal."""
    records: list[dict[str, Any]] = []
    bad = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
    if scenario is None:
        scenario = next((r["scenario"] for r in records if r.get("scenario")), "?")
    return Run(path, scenario, records, bad)


def _module(scenario: str) -> Any:
    return importlib.import_module(SCENARIOS[scenario])


def _command_tail(command: str) -> str:
    """What follows `-m bench` in a reproduce command (the directory in front varies)."""
    parts = shlex.split(command)
    try:
        i = parts.index("-m")
    except ValueError:
        return command
    return " ".join(parts[i + 2:])


def is_default_run(run: Run) -> bool:
    """A full run: the scenario with all its defaults (not --quick, no option changed), i.e. its
    reproduce command is what `python -m bench NAME` alone would print."""
    v = run.verdict
    if v is None or not v.get("command"):
        return False
    mod = _module(run.scenario)
    default = mod.reproduce_command(mod.parse_args([]))
    return _command_tail(v["command"]) == _command_tail(default)


def latest_runs(directory: str, include_reduced: bool = False) -> dict[str, Run]:
    """The newest finished run (one with a verdict line) of each scenario in directory, by the
    file's modification time (when the run ended); only full runs unless include_reduced."""
    found: dict[str, tuple[float, Run]] = {}
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return {}
    for name in names:
        if not name.endswith(".jsonl"):
            continue
        path = os.path.join(directory, name)
        try:
            run = load_run(path)
            mtime = os.path.getmtime(path)
        except OSError:
            continue
        if run.scenario not in SCENARIOS or run.verdict is None:
            continue
        if not include_reduced and not is_default_run(run):
            continue
        if run.scenario not in found or mtime > found[run.scenario][0]:
            found[run.scenario] = (mtime, run)
    return {s: found[s][1] for s in SCENARIOS if s in found}


# ---------------------------------------------------------------- markdown

def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _order(d: dict[str, Any], order: Any) -> dict[str, Any]:
    """The JSON lines are written with sort_keys: put the tools back in the scenario's order."""
    return {k: d[k] for k in order if k in d} | {k: v for k, v in d.items() if k not in order}


def scenario_table(run: Run) -> str:
    mod = _module(run.scenario)
    summaries = run.of_type("summary")
    if not summaries:
        return "_no summary line (planning only, or the run stopped before its summary)_"
    if run.scenario == "cold-copy":
        return mod.table([dict(s, tools=_order(s["tools"], mod.TOOLS)) for s in summaries])
    if run.scenario == "warm-delta":
        s = summaries[-1]
        return mod.table(dict(s, tools=_order(s["tools"], mod.TOOLS)))
    return mod.table(summaries[-1])


def bar_lines(run: Run) -> list[str]:
    v = run.verdict or {}
    out = []
    for b in v.get("bars") or []:
        if b.get("met") is None:
            out.append(f"- n/a: {b['bar']}" + (f" ({b['why']})" if b.get("why") else ""))
            continue
        mark = "met" if b["met"] else "**MISSED**"
        if run.scenario == "live-converge" and b.get("kind", "prediction") != "prediction":
            value = _module(run.scenario).bar_value(b)
        elif run.scenario == "live-converge":
            ratios = ", ".join(f"{r:.2f}" for r in b.get("ratios") or [])
            value = (f"worst \\|predicted ÷ measured − 1\\| = "
                     f"{_fmt(b['value'] and 100 * b['value'], '.0f')} % (ratios {ratios})")
        else:
            value = _fmt(b.get("value"), b.get("format", ".2f"))
        out.append(f"- {mark}: {b['bar']}: {value}")
    return out or ["- (no bars in this run)"]


def extra_lines(run: Run) -> list[str]:
    """What the scenario prints below its table that a reader needs (not every detail)."""
    out: list[str] = []
    if run.scenario == "cold-copy":
        mod = _module(run.scenario)
        summaries = run.of_type("summary")
        for s in summaries:
            where = f"{s.get('case', mod.PRIMARY)} → {s['target']}"
            c = s.get("checksum_over_nbdcopy")
            if c and c.get("median") is not None:
                out.append(f"- {where}: checksum ÷ nbdcopy (nbdcopy wall ÷ checksum wall, "
                           f"per rep): median {c['median']:.2f}")
            vc = s.get("verify_cost")
            if vc and vc.get("wall_ratio") and vc["wall_ratio"].get("median") is not None:
                out.append(f"- {where}: copy --verify costs {vc['wall_ratio']['median']:.2f}"
                           f" × the plain copy's wall (+{_fmt(vc['extra_s']['median'], '.2f')} s)"
                           f"; read back {_fmt(vc['verify_bytes_read_over_alloc'], '.3f')} × the "
                           "allocated bytes")
        if any(s.get("best_peer") for s in summaries):
            out += ["", ("The engine against each peer, per case and target (median of per-rep "
                         "`peer wall ÷ engine wall`; the best peer is the one the engine is least "
                         "ahead of):"), "", mod.best_peer_table(summaries)]
        for sk in (run.verdict or {}).get("skipped") or []:
            out.append(f"- skipped {sk.get('case')}: {sk.get('why')}")
    elif run.scenario == "warm-delta":
        plan = next((r for r in run.of_type("plan")), None)
        if plan and plan.get("available", True) and plan.get("total_s_median") is not None:
            best = _fmt(plan.get("total_s_best"), ".3f")
            out.append(f"- planning {plan.get('areas', 0):,} areas: load + plan median "
                       f"{plan['total_s_median']:.3f} s (best {best}"
                       f" s; load {_fmt(plan.get('load_s_median'), '.3f')} + plan "
                       f"{_fmt(plan.get('plan_s_median'), '.3f')})")
        for n in (run.verdict or {}).get("notes") or []:
            out.append(f"- note (sync report): {n}")
    elif run.scenario == "kernels":
        s = next(iter(run.of_type("summary")), None)
        if s:
            out.append(f"- {_fmt(s.get('size') and s['size'] / MiB, 'g')} MiB per buffer, "
                       f"64 KiB blocks, {s.get('reps')} interleaved samples per implementation; "
                       "on `random` every block's first bytes are non-zero, so the compiled "
                       "scan stops at once per block: its GiB/s there is per-block overhead, "
                       "not memory bandwidth")
            if s.get("areas"):
                disk = s.get("disk") or 0
                made = "; ".join(
                    f"{i.get('input', '?')}: {_fmt(i.get('new_runs'), ',')} runs once merged, "
                    f"{_fmt(i.get('grew_runs'), ',')} beyond the last plan, a plan of "
                    f"{_fmt(i.get('plan_runs'), ',')} runs"
                    for i in s.get("interval_inputs") or [])
                ms = s.get("numpy_import_s")
                out.append(f"- interval algebra: {s['areas']:,} changed areas on a "
                           + (f"{disk >> 40} TiB" if disk and disk % (1 << 40) == 0 else
                              f"{disk / GiB:g} GiB")
                           + " disk; a call is a warm pass's range work (merge the areas, clip "
                           "the interrupted plan, subtract, union, clip, count the bytes); "
                           + (f"{made}; " if made else "")
                           + "numpy's import in a fresh interpreter: "
                           f"{_fmt(ms and ms * 1e3, '.0f')} ms, in no sample")
            if s.get("pytest_benchmark"):
                out.append(f"- timed by pytest-benchmark {s['pytest_benchmark']} (pedantic: a "
                           "benchmark per round and implementation, 1 round of `number` calls, "
                           "rounds interleaved A B C A B C …); its JSON is kept beside the JSON "
                           "lines")
    elif run.scenario == "overhead":
        out += [f"- {n}" for n in (run.verdict or {}).get("notes") or []]
    elif run.scenario == "live-converge":
        s = next(iter(run.of_type("summary")), None)
        if s:
            sizes = ", ".join(f"{n / GiB:.2g}" for n in _module(run.scenario)._sizes(s))
            out.append(f"- disk {sizes} GiB, --max-downtime {_fmt(s.get('max_downtime_s'), 'g')}"
                       " s; medians over the reps (min–max)")
    return out


def provenance_lines(run: Run) -> list[str]:
    p = run.provenance
    image = p.get("image") or {}
    peers = [p[k] for k in ("nbdcopy", "qemu_img", "nbdkit", "qemu_nbd", "qemu_storage_daemon")
             if p.get(k)]
    peers += [f"{k}: `{v}`" for k, v in (p.get("tuned") or {}).items()]
    peers += [f"{k} {p[k]}" for k in ("numpy", "xxhash") if p.get(k)]
    mem = p.get("mem_total_bytes")
    if not peers and not p.get("kernel"):  # warm-delta --plan-only: the engine alone
        return [f"- engine commit `{p.get('engine_commit', '?')}`; "
                + ", ".join(f"{k} {v}" for k, v in p.items()
                            if k != "engine_commit" and not isinstance(v, (dict, list)))]
    alloc = image.get("alloc_bytes")
    if p.get("workload"):  # kernels, overhead: no image
        workload = [f"- workload: {p['workload']}"]
    elif p.get("images"):  # cold-copy: an image per kind
        workload = [(f"- image `{kind}`: {_fmt(im.get('size') and im['size'] / GiB, 'g')} GiB, "
                     f"seed {im.get('seed', '?')}, "
                     f"{_fmt(im.get('alloc_bytes') and im['alloc_bytes'] / GiB, '.2f')} GiB "
                     f"allocated, digest `{im.get('digest', '?')}`")
                    for kind, im in p["images"].items()]
    else:
        workload = [(f"- image: {_fmt(image.get('size') and image['size'] / GiB, 'g')} GiB, "
                     f"seed {image.get('seed', '?')}, {_fmt(alloc and alloc / GiB, '.2f')}"
                     f" GiB allocated, digest `{image.get('digest', '?')}`")]
    return [
        (f"- engine commit `{p.get('engine_commit', '?')}` (fingerprint "
         f"`{p.get('engine_fingerprint', '?')}`)"),
        f"- peers: {'; '.join(peers) or '?'}",
        (f"- kernel {p.get('kernel', '?')}; CPU {p.get('cpu_model', '?')}, "
         f"{p.get('nproc', '?')} cores; memory {_fmt(mem and mem / GiB, '.1f')} GiB; "
         f"Python {p.get('python', '?')}; work directory on {p.get('workdir_fs', '?')}; "
         f"cache {p.get('cache', '?')}"),
    ] + workload


def scenario_section(run: Run, md_dir: str, plots: dict[str, Any]) -> str:
    v = run.verdict or {}
    lines = [f"## {run.scenario}", ""]
    state = ("valid" if v.get("valid") else "**INVALID** (see `problems` in the JSON lines)"
             ) if v else "**unfinished** (no verdict line)"
    dur = v.get("duration_s")
    lines.append(f"Run `{os.path.relpath(run.path, md_dir)}`: {state}"
                 + (f", {dur / 60:.1f} min" if dur is not None else "")
                 + (f"; {run.bad_lines} unreadable line(s)" if run.bad_lines else "")
                 + ("; **the engine's files changed during the run**"
                    if v.get("engine_changed_during_run") else "") + ".")
    if v and not is_default_run(run):
        lines += ["", ("_A reduced run (not the scenario's default options; `--quick` is one): "
                       "at these sizes the ratios mostly measure start-up, so its bars mean "
                       "little._")]
    lines += ["", scenario_table(run), ""]
    extra = extra_lines(run)
    if extra:
        lines += extra + [""]
    lines += ["Bars:", ""] + bar_lines(run) + [""]
    png = plots.get("png")
    if png:
        lines += [f"![{run.scenario}]({os.path.relpath(png, md_dir)})", ""]
    elif plots.get("note"):
        lines += [f"_{plots['note']}_", ""]
    svg = plots.get("svg")
    if svg:
        lines += [(f"The scenario's own plot: [{os.path.basename(svg)}]"
                   f"({os.path.relpath(svg, md_dir)})"), ""]
    if v.get("command"):
        lines += ["Reproduce:", "", "```sh", v["command"], "```", ""]
    lines += ["Provenance:", ""] + provenance_lines(run) + [""]
    return "\n".join(lines)


def glance(runs: dict[str, Run]) -> str:
    """Every bar of every scenario in one table."""
    lines = ["| scenario | bar | value | |", "|---|---|---|---|"]
    for name, run in runs.items():
        for b in (run.verdict or {}).get("bars") or []:
            met = "n/a" if b.get("met") is None else ("met" if b["met"] else "**MISSED**")
            value = b.get("value")
            if name == "live-converge" and b.get("kind", "prediction") != "prediction":
                value = _module(name).bar_value(b)
            elif name == "live-converge":
                value = "–" if value is None else f"worst error {100 * value:.0f} %"
            else:
                value = _fmt(value, b.get("format", ".3g"))
            lines.append(f"| {name} | {b['bar'].replace('|', '∣')} | {value} | {met} |")
    return "\n".join(lines)


def best_peers(runs: dict[str, Run]) -> str:
    """Every scenario's ratio to its best peer, in one table: cold-copy per case and target (the
    fastest of nbdcopy, qemu-img and their tuned runs), kernels per kernel and input (the fastest
    twin or baseline), overhead per source (nbdcopy), warm-delta's full and delta passes against
    nbdcopy copying the whole disk (it takes no changed-block list); live-converge has no peer
    (nothing else predicts downtime)."""
    lines = ["| scenario | workload | best peer | engine ÷ best peer |", "|---|---|---|---|"]
    for name, run in runs.items():
        v = run.verdict or {}
        if name == "cold-copy":
            for b in v.get("best_peer") or []:
                r = b.get("engine_over_peer_median")
                lines.append(f"| {name} | {b['case']} → {b['target']} | {b['tool']} | "
                             f"{_fmt(r, '.2f')}{'' if r is None or r >= 1 else ' (behind)'} |")
        elif name in ("kernels", "overhead"):
            for b in v.get("bars") or []:
                if "÷" not in b["bar"]:
                    continue
                what, _, rest = b["bar"].partition(":")
                peer = b.get("peer") or rest.split("÷", 1)[1].split("≥")[0].strip(" ()")
                r = b.get("value")
                lines.append(f"| {name} | {what} | {peer} | {_fmt(r, '.2f')}"
                             f"{'' if r is None or r >= 1 else ' (behind)'} |")
        elif name == "warm-delta":
            # nbdcopy takes no changed-block list: its alternative to a pass is a whole copy.
            s = (run.of_type("summary") or [{}])[-1]
            mod = _module(name)
            full = (s.get("full_over_nbdcopy") or {}).get("median")
            lines.append(f"| {name} | full pass (`transfer sync`, the whole disk) | nbdcopy "
                         f"(whole disk) | {_fmt(full and 1 / full, '.2f')}"
                         f"{'' if not full or full <= 1 else ' (behind)'} |")
            for kind in mod.DELTAS:
                r = (s.get(f"{kind}_over_nbdcopy") or {}).get("median")
                if r:
                    lines.append(f"| {name} | {mod.NAMES.get(kind, kind)} pass | nbdcopy "
                                 f"(whole disk: no changed-block list) | {1 / r:.2f} |")
        elif name == "live-converge":
            lines.append(f"| {name} | downtime prediction | none (no peer predicts downtime) | "
                         "see its bars |")
    return "\n".join(lines)


def render(runs: dict[str, Run], md_path: str, title: str, intro: list[str],
           plot_dir: str, missing: dict[str, str] | None = None, stable: bool = False) -> str:
    """Write the plots into plot_dir and return the markdown (links relative to md_path).
    stable: the plots are named after the scenario (RESULTS.md), not after the run's file."""
    md_dir = os.path.dirname(os.path.abspath(md_path))
    have_mpl = matplotlib_available()
    parts = [f"# {title}", ""] + intro + [""]
    if runs:
        parts += ["Every bar, at a glance:", "", glance(runs), ""]
        parts += [("Every scenario against its best peer (engine ÷ peer: above 1 the engine is "
                   "faster):"), "", best_peers(runs), ""]
    if not have_mpl:
        parts += [f"_{NO_MATPLOTLIB}_", ""]
    for name, reason in (missing or {}).items():
        parts += [f"## {name}", "", f"_{reason}_", ""]
    for name, run in runs.items():
        plots: dict[str, Any] = {}
        if have_mpl:
            png = os.path.join(plot_dir, plot_stem(run, stable) + ".png")
            try:
                if run.of_type("summary"):
                    plot(run, png)
                    plots["png"] = png
                else:
                    plots["note"] = "no plot: the run has no summary line"
            except Exception as e:  # noqa: BLE001  (a plot must never lose the tables)
                plots["note"] = f"plot failed: {type(e).__name__}: {e}"
        else:
            plots["note"] = NO_MATPLOTLIB
        svg = (run.verdict or {}).get("plot")
        if svg and os.path.exists(svg):
            if os.path.dirname(os.path.abspath(svg)) != os.path.abspath(plot_dir):
                dst = os.path.join(plot_dir, plot_stem(run, stable) + ".svg")
                os.makedirs(plot_dir, exist_ok=True)
                shutil.copyfile(svg, dst)
                svg = dst
            plots["svg"] = svg
        parts.append(scenario_section(run, md_dir, plots))
    return "\n".join(parts).rstrip() + "\n"


def plot_stem(run: Run, stable: bool) -> str:
    return run.scenario if stable else os.path.splitext(os.path.basename(run.path))[0]


# ---------------------------------------------------------------- plots (matplotlib)

def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _title(run: Run, what: str) -> str:
    p = run.provenance
    return (f"{run.scenario}: {what}\nengine {p.get('engine_commit', '?')}, "
            f"{p.get('cpu_model', '?')} × {p.get('nproc', '?')}, kernel {p.get('kernel', '?')}")


def plot(run: Run, png: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    {"cold-copy": plot_cold_copy, "warm-delta": plot_warm_delta,
     "live-converge": plot_live_converge, "kernels": plot_kernels,
     "overhead": plot_overhead}[run.scenario](run, png)


def plot_cold_copy(run: Run, png: str) -> None:
    """A panel per case: throughput (allocated GiB/s of the median wall, min–max as whiskers)
    per target, the engine and its peers side by side; engine ÷ peer above each peer's bar."""
    plt = _pyplot()
    mod = _module(run.scenario)
    summaries = run.of_type("summary")
    cases = list(dict.fromkeys(s.get("case", mod.PRIMARY) for s in summaries))
    tools = [t for t in mod.TOOLS if any(t in s["tools"] for s in summaries)]
    fig, axes = plt.subplots(len(cases), 1, figsize=(11, 1.2 + 3.0 * len(cases)), squeeze=False)
    width = 0.8 / max(1, len(tools))
    colors = plt.get_cmap("tab10")
    for ax, case in zip(axes[:, 0], cases):
        mine = [s for s in summaries if s.get("case", mod.PRIMARY) == case]
        for i, tool in enumerate(tools):
            xs, ys, lo, hi, labels = [], [], [], [], []
            for j, s in enumerate(mine):
                t = s["tools"].get(tool)
                if not t or not t.get("wall_s_median"):
                    continue
                alloc = s["alloc_bytes"] / GiB
                y = alloc / t["wall_s_median"]
                xs.append(j + (i - (len(tools) - 1) / 2) * width)
                ys.append(y)
                lo.append(y - alloc / t["wall_s_max"])
                hi.append(alloc / t["wall_s_min"] - y)
                r = s["throughput_ratio"].get(tool, {}).get("engine_over_peer_median")
                labels.append("" if tool == "engine" or r is None else f"{r:.2f}")
            if not xs:
                continue
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=tool, color=colors(i))
            for x, y, top, text in zip(xs, ys, hi, labels):
                if text:  # above the whisker
                    ax.annotate(text, (x, y + top), textcoords="offset points", xytext=(0, 2),
                                ha="center", fontsize=6)
        ax.set_xticks(range(len(mine)), [s["target"] for s in mine])
        ax.set_xlim(-0.5, max(len(mine), 1) - 0.5)
        ax.set_ylabel("alloc GiB/s")
        ax.set_title(case, fontsize=9)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=len(tools), loc="upper right")
    axes[-1, 0].set_xlabel("target (numbers: engine ÷ tool, median of per-rep wall ratios; "
                           "GiB/s of the raw image's allocated data per median wall)")
    size = summaries[0]["size"] / GiB if summaries else 0
    fig.suptitle(_title(run, f"{size:g} GiB images, whole-disk copy, a panel per "
                             "image/server/cache"), fontsize=10)
    _save(plt, fig, png)


def plot_warm_delta(run: Run, png: str) -> None:
    """Median wall per pass kind (min–max whiskers): the delta passes (the mixed 1 % one and the
    1 % / 10 % scattered / clustered kinds) beside the full pass and nbdcopy's full copy; each
    one's ratio to the full pass, and the bar in the title."""
    plt = _pyplot()
    mod = _module(run.scenario)
    s = next(iter(run.of_type("summary")), None)
    n_bars = len([t for t in mod.TOOLS if s and s["tools"].get(t, {}).get("wall_s_median")
                  is not None])
    fig, ax = plt.subplots(figsize=(9, max(4.5, 1.2 + 0.42 * n_bars)))
    if s is None:
        ax.text(0.5, 0.5, "no summary (planning only?)", ha="center")
    else:
        tools = [t for t in mod.TOOLS if s["tools"].get(t, {}).get("wall_s_median") is not None]
        ys = [s["tools"][t]["wall_s_median"] for t in tools]
        lo = [y - s["tools"][t]["wall_s_min"] for t, y in zip(tools, ys)]
        hi = [s["tools"][t]["wall_s_max"] - y for t, y in zip(tools, ys)]
        colors = ["#ff7f0e" if t in ("nbdcopy",) else "#1f77b4" for t in tools]
        ax.barh(range(len(tools)), ys, xerr=[lo, hi], capsize=3, color=colors)
        ax.set_yticks(range(len(tools)), [getattr(mod, "NAMES", {}).get(t, t) for t in tools])
        ax.invert_yaxis()
        for k, (t, y, right) in enumerate(zip(tools, ys, hi)):
            r = s.get(f"{t}_over_full", {}).get("median")
            ax.annotate(f"{y:.3f} s" + (f"  ({r:.3f} × full)" if r is not None else ""),
                        (y + right, k), textcoords="offset points", xytext=(6, -3), fontsize=8)
        ax.set_xlabel("wall seconds, spawn to reaping (median; whiskers min–max)")
        d = s.get("delta_over_full", {}).get("median")
        ax.set_xlim(0, max(ys) * 1.35 if ys else 1)
        ax.grid(axis="x", alpha=0.3)
        frac = (run.provenance.get("dirty") or {}).get("fraction")
        ax.set_title(_title(run, f"{s['size'] / GiB:g} GiB, {_fmt(frac and 100 * frac, 'g')} % "
                                 f"dirty; delta ÷ full = {_fmt(d, '.3f')} (bar ≤ "
                                 f"{mod.BAR_DELTA_OVER_FULL:g})"), fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_live_converge(run: Run, png: str) -> None:
    """Downtime against the guest's write rate: every run's measured (●) and predicted (◇)
    downtime, the medians joined, the ±25 % band around the measured median; beside it the
    passes until convergence per rate. With a size axis (more than one disk size), the same
    against the disk size, the medians joined per rate."""
    plt = _pyplot()
    mod = _module(run.scenario)
    s = next(iter(run.of_type("summary")), None)
    runs = run.of_type("run")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [2, 1]})
    groups = (s or {}).get("rates", [])
    by_size = bool(s) and len(mod._sizes(s)) > 1

    def x_of(r: dict[str, Any]) -> float:
        return r["size"] / GiB if by_size else r["rate_mib_s"]

    xs_all = sorted({x_of(x) for x in groups})
    if xs_all:
        conv = [r for r in runs if r.get("measured_downtime_s") is not None]
        ax.scatter([x_of(r) for r in conv], [r["measured_downtime_s"] for r in conv],
                   marker="o", color="#1f77b4", label="measured", zorder=3)
        ax.scatter([x_of(r) for r in conv if r.get("predicted_downtime_s") is not None],
                   [r["predicted_downtime_s"] for r in conv
                    if r.get("predicted_downtime_s") is not None],
                   marker="D", facecolors="none", edgecolors="#ff7f0e", label="predicted",
                   zorder=3)
        # the medians joined: over the rates, or per rate over the sizes
        series = sorted({x["rate_mib_s"] for x in groups}) if by_size else [None]
        for k, rate in enumerate(series):
            gs = [x for x in groups if rate is None or x["rate_mib_s"] == rate]
            med_m = [(x_of(x), statistics.median(x["measured_downtime_s"]))
                     for x in gs if x["measured_downtime_s"]]
            med_p = [(x_of(x), statistics.median(x["predicted_downtime_s"]))
                     for x in gs if x["predicted_downtime_s"]]
            if med_m:
                xs, ys = zip(*med_m)
                ax.plot(xs, ys, color="#1f77b4", alpha=0.6)
                band = mod.BAR_PREDICTION
                ax.fill_between(xs, [y * (1 - band) for y in ys], [y * (1 + band) for y in ys],
                                color="#1f77b4", alpha=0.12,
                                label=f"measured median ±{band:.0%}" if k == 0 else None)
            if med_p:
                xs, ys = zip(*med_p)
                ax.plot(xs, ys, color="#ff7f0e", alpha=0.6, linestyle="--")
        if by_size:
            budget = s.get("max_downtime_s")
            if budget:
                ax.axhline(budget, color="#d62728", linestyle=":",
                           label=f"--max-downtime {budget:g} s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        passes = [(x_of(r), r.get("precopy_passes")) for r in runs
                  if r.get("precopy_passes") is not None]
        seven = [x_of(r) for r in runs if r.get("result") == "not converging"]
        if passes:
            ax2.scatter(*zip(*passes), color="#2ca02c", label="converged")
        if seven:
            ax2.scatter(seven, [max([p for _, p in passes] or [1])] * len(seven), marker="x",
                        color="#d62728", label="exit 7 (not converging)")
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
        ax2.set_ylim(bottom=0)
        ax2.yaxis.get_major_locator().set_params(integer=True)
        ax2.legend(fontsize=8)
    xlabel = "disk size, GiB" if by_size else "guest write rate, MiB/s"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("downtime, s")
    ax.grid(alpha=0.3)
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel("pre-copy passes until convergence")
    ax2.grid(alpha=0.3)
    sizes = ", ".join(f"{n / GiB:g}" for n in mod._sizes(s)) if s else "?"
    rates = ", ".join(f"{x:g}" for x in sorted({x["rate_mib_s"] for x in groups}))
    fig.suptitle(_title(run, f"{sizes} GiB disk, transfer migrate --type live"
                             + (f", guest {rates} MiB/s" if by_size else "")),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_kernels(run: Run, png: str) -> None:
    """A panel per kernel: throughput per input (median, min–max whiskers, log scale; GiB/s for
    the zero scan and the block hash, M areas/s for the interval algebra), the engine's
    implementation beside its pure-Python twin and the baselines; engine ÷ this (this time ÷ the
    engine's, the median of per-sample ratios) above each peer's bar. Runs from before the
    interval algebra (GiB/s only, cython the engine) plot their two panels."""
    plt = _pyplot()
    mod = _module(run.scenario)
    s = next(iter(run.of_type("summary")), None)
    rows = (s or {}).get("rows") or []
    kernels = [k for k in mod.KERNELS if any(r["kernel"] == k for r in rows)] or list(mod.KERNELS)
    fig, axes = plt.subplots(1, len(kernels), figsize=(5.2 * len(kernels), 4.8), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, kernel in zip(axes[0], kernels):
        # What the run itself says (an older run's engine may differ from today's), else today's.
        impls = list(dict.fromkeys(r["impl"] for r in rows if r["kernel"] == kernel)) \
            or list(mod.KERNELS[kernel])
        inputs = list(dict.fromkeys(r["buffer"] for r in rows if r["kernel"] == kernel)) \
            or list(mod.INPUTS[kernel])
        engine = next((r["impl"] for r in rows if r["kernel"] == kernel and r.get("engine")),
                      mod.ENGINE[kernel])
        unit = next((r["unit"] for r in rows if r["kernel"] == kernel and r.get("unit")),
                    "GiB/s")
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            xs, ys, lo, hi, labels = [], [], [], [], []
            for j, inp in enumerate(inputs):
                r = next((r for r in rows if r["kernel"] == kernel and r["buffer"] == inp
                          and r["impl"] == impl), None)
                rate = r and r.get("per_s", r.get("gib_per_s"))
                if not r or not rate:
                    continue
                xs.append(j + (i - (len(impls) - 1) / 2) * width)
                ys.append(rate)
                lo.append(rate - (r.get("per_s_min", r.get("gib_per_s_min")) or rate))
                hi.append((r.get("per_s_max", r.get("gib_per_s_max")) or rate) - rate)
                ratio = (r.get("engine_over_this") or r.get("cython_over_this") or {}).get("median")
                labels.append("" if impl == engine or ratio is None
                              else f"{ratio:,.0f}×" if ratio >= 100 else f"{ratio:.3g}×")
            if not xs:
                continue
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colors(i),
                   label=impl + (" (engine)" if impl == engine else ""))
            for x, y, top, text in zip(xs, ys, hi, labels):
                if text:
                    ax.annotate(text, (x, y + top), textcoords="offset points", xytext=(0, 3),
                                ha="center", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(inputs)), list(inputs))
        ax.set_title(kernel + (" (the engine's was plain Python)" if engine == "python" else ""),
                     fontsize=10)
        ax.set_ylabel(f"{unit} (median per call; log scale)")
        ax.set_xlabel("input (numbers: engine ÷ this, per-sample medians)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    size = (s or {}).get("size") or 0
    what = f"{size / MiB:g} MiB buffers, 64 KiB blocks"
    if (s or {}).get("areas"):
        disk = s.get("disk") or 0
        what += (f"; {s['areas']:,} areas on a "
                 + (f"{disk >> 40} TiB" if disk and disk % (1 << 40) == 0 else
                    f"{disk / GiB:g} GiB") + " disk")
    fig.suptitle(_title(run, what), fontsize=10)
    _save(plt, fig, png)


def plot_overhead(run: Run, png: str) -> None:
    """Per source: GiB/s of the disk's virtual size (median wall, min–max whiskers), the engine
    beside nbdcopy with engine ÷ nbdcopy above; beside it client and server CPU-s per GiB."""
    plt = _pyplot()
    mod = _module(run.scenario)
    s = next(iter(run.of_type("summary")), None)
    sources = (s or {}).get("sources") or []
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    width = 0.8 / len(mod.TOOLS)
    colors = {"engine": "#1f77b4", "nbdcopy": "#ff7f0e"}
    for i, tool in enumerate(mod.TOOLS):
        xs, ys, lo, hi, cli, srv = [], [], [], [], [], []
        for j, src in enumerate(sources):
            t = src["tools"].get(tool) or {}
            if not t.get("wall_s_median"):
                continue
            gib = src["size"] / GiB
            xs.append(j + (i - (len(mod.TOOLS) - 1) / 2) * width)
            ys.append(gib / t["wall_s_median"])
            lo.append(ys[-1] - gib / t["wall_s_max"])
            hi.append(gib / t["wall_s_min"] - ys[-1])
            cli.append(t["client_cpu_s_per_gib"] or 0)
            srv.append(t["server_cpu_s_per_gib"] or 0)
            if tool != "engine" and src["engine_over_nbdcopy"]["median"] is not None:
                ax.annotate(f"{src['engine_over_nbdcopy']['median']:.2f}",
                            (xs[-1], ys[-1] + hi[-1]), textcoords="offset points",
                            xytext=(0, 3), ha="center", fontsize=8)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=tool, color=colors[tool])
        ax2.bar(xs, cli, width, label=f"{tool} client", color=colors[tool])
        ax2.bar(xs, srv, width, bottom=cli, label=f"{tool}: nbdkit", color=colors[tool],
                alpha=0.4, hatch="//")
    for a in (ax, ax2):
        a.set_xticks(range(len(sources)), [src["source"] for src in sources])
        a.grid(axis="y", alpha=0.3)
        a.legend(fontsize=8)
    ax.set_ylabel("GiB/s of the virtual size (median wall)")
    ax.set_xlabel("source, to null: (numbers: engine ÷ nbdcopy, per-rep medians)")
    ax2.set_ylabel("CPU-s per virtual GiB (medians)")
    ax2.set_xlabel("source: client (solid) and nbdkit (hatched)")
    size = (s or {}).get("size") or 0
    fig.suptitle(_title(run, f"{size / GiB:g} GiB from nbdkit to null:, engine overhead"),
                 fontsize=10)
    _save(plt, fig, png)


def _save(plt: Any, fig: Any, png: str) -> None:
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the two entry points

def write_run_summary(out_dir: str, stamp: str, done: dict[str, Run],
                      missing: dict[str, str], argv: list[str]) -> str:
    """After `python -m bench`: DIR/summary-<stamp>.md, the PNGs beside the JSON lines."""
    md = os.path.join(out_dir, f"summary-{stamp}.md")
    intro = [(f"`python -m bench {' '.join(shlex.quote(a) for a in argv)}`, started {stamp}. "
              "Only the ratios taken within one run mean anything on this machine "
              "(bench/README.md).")]
    if os.environ.get("BENCH_IDLE_WAIT_MAX") is not None:
        intro.append(f"BENCH_IDLE_WAIT_MAX={os.environ['BENCH_IDLE_WAIT_MAX']}: the wait for an "
                     "idle machine before each run was capped at that many seconds.")
    text = render(done, md, "Benchmark run", intro, out_dir, missing)
    with open(md, "w") as f:
        f.write(text)
    return md


def write_results(from_dir: str, to: str, include_reduced: bool = False
                  ) -> tuple[str, dict[str, Run]]:
    """bench/RESULTS.md from the newest run of each scenario in from_dir; PNGs in results/
    beside it."""
    runs = latest_runs(from_dir, include_reduced)
    missing = {s: f"no {'finished' if include_reduced else 'full (default options)'} run in "
                  f"{from_dir}" for s in SCENARIOS if s not in runs}
    plot_dir = os.path.join(os.path.dirname(os.path.abspath(to)), "results")
    which = "finished" if include_reduced else "full (default options, not `--quick`)"
    intro = [
        (f"The engine against its peers, the newest {which} run of each scenario; each scenario "
         "was a separate run, so compare ratios within a scenario, not across them. How each is "
         "measured: [README.md](README.md)."),
        "",
        ("Regenerate this file from the newest runs in `bench/out`: "
         "`cd /work/main && .venv/bin/python -m bench results`; reproduce every figure: "
         "`.venv/bin/python -m bench` (all scenarios, full size, ~40 min), then that command. "
         f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}."),
    ]
    text = render(runs, to, "Benchmark results", intro, plot_dir, missing, stable=True)
    with open(to, "w") as f:
        f.write(text)
    return to, runs
