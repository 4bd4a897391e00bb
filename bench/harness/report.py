"""The markdown summary and PNG plots of benchmark runs, made from their JSON lines alone.

Used by `python -m bench` after a run (a summary of that run's scenarios in --out DIR) and by
`python -m bench results` (bench/RESULTS.md from the newest run of each scenario). Each scenario
gives its part (its table, notes, best-peer rows and plot: bench/harness/runner.py), from the
records the JSON lines hold, so the markdown says what the run printed. Plots need matplotlib
(optional: without it they are skipped, with a note; live-converge's own SVG is still there).
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from typing import Any

from ..scenarios import SCENARIOS, module
from .machine import GiB, fmt
from .plots import NO_MATPLOTLIB, matplotlib_available
from .runner import bar_value


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
    mod = module(run.scenario)
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

def summaries_of(run: Run) -> list[dict[str, Any]]:
    """The run's summary lines, their tools back in the scenario's order (its TOOLS): the JSON
    lines are written with sort_keys."""
    names = getattr(module(run.scenario), "TOOLS", ())
    return [dict(s, tools={k: s["tools"][k] for k in names if k in s["tools"]}
                 | {k: v for k, v in s["tools"].items() if k not in names})
            if "tools" in s else s for s in run.of_type("summary")]


def scenario_table(run: Run) -> str:
    if not run.of_type("summary"):
        return "_no summary line (planning only, or the run stopped before its summary)_"
    mod = module(run.scenario)
    if hasattr(mod, "report_table"):
        return mod.report_table(run)
    return mod.table(summaries_of(run)[-1])


def bar_lines(run: Run) -> list[str]:
    out = []
    for b in (run.verdict or {}).get("bars") or []:
        if b.get("met") is None:
            out.append(f"- n/a: {b['bar']}" + (f" ({b['why']})" if b.get("why") else ""))
            continue
        value = bar_value(module(run.scenario), b).replace("|", "\\|")
        out.append(f"- {'met' if b['met'] else '**MISSED**'}: {b['bar']}: {value}")
    return out or ["- (no bars in this run)"]


def peer_bars(run: Run) -> list[tuple[str, str, float | None]]:
    """(workload, peer, engine ÷ peer) from the bars that compare the engine with a peer (those
    with a ÷; kernels and overhead)."""
    rows = []
    for b in (run.verdict or {}).get("bars") or []:
        if "÷" in b["bar"]:
            what, _, rest = b["bar"].partition(":")
            peer = b.get("peer") or rest.split("÷", 1)[1].split("≥")[0].strip(" ()")
            rows.append((what, peer, b.get("value")))
    return rows


def provenance_lines(run: Run) -> list[str]:
    p = run.provenance
    peers = [p[k] for k in ("nbdcopy", "qemu_img", "nbdkit", "qemu_nbd", "qemu_storage_daemon")
             if p.get(k)]
    peers += [f"{k}: `{v}`" for k, v in (p.get("tuned") or {}).items()]
    peers += [f"{k} {p[k]}" for k in ("numpy", "xxhash") if p.get(k)]
    mem = p.get("mem_total_bytes")
    if not peers and not p.get("kernel"):  # warm-delta --plan-only: the engine alone
        return [f"- engine commit `{p.get('engine_commit', '?')}`; "
                + ", ".join(f"{k} {v}" for k, v in p.items()
                            if k != "engine_commit" and not isinstance(v, (dict, list)))]
    # kernels, overhead: a workload, no image; cold-copy (and live-converge's size axis): an
    # image per kind (size)
    images = ({f" `{k}`": im for k, im in (p.get("images") or {}).items()}
              or {"": p.get("image") or {}})
    workload = [f"- workload: {p['workload']}"] if p.get("workload") else [
        (f"- image{k}: {fmt(im.get('size') and im['size'] / GiB, 'g')} GiB, seed "
         f"{im.get('seed', '?')}, {fmt(im.get('alloc_bytes') and im['alloc_bytes'] / GiB, '.2f')}"
         f" GiB allocated, digest `{im.get('digest', '?')}`") for k, im in images.items()]
    return [
        (f"- engine commit `{p.get('engine_commit', '?')}` (fingerprint "
         f"`{p.get('engine_fingerprint', '?')}`)"),
        f"- peers: {'; '.join(peers) or '?'}",
        (f"- kernel {p.get('kernel', '?')}; CPU {p.get('cpu_model', '?')}, "
         f"{p.get('nproc', '?')} cores; memory {fmt(mem and mem / GiB, '.1f')} GiB; "
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
    mod = module(run.scenario)
    extra = (mod.report_notes(run) if hasattr(mod, "report_notes")
             else [f"- {n}" for n in (run.verdict or {}).get("notes") or []])
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
            value = bar_value(module(name), b).replace("|", "∣")
            lines.append(f"| {name} | {b['bar'].replace('|', '∣')} | {value} | {met} |")
    return "\n".join(lines)


def best_peers(runs: dict[str, Run]) -> str:
    """Every scenario's ratio to its best peer, in one table (each scenario's best_peer_rows:
    workload, best peer, engine ÷ it; by default its bars with a ÷, peer_bars)."""
    lines = ["| scenario | workload | best peer | engine ÷ best peer |", "|---|---|---|---|"]
    for name, run in runs.items():
        for what, peer, r in getattr(module(name), "best_peer_rows", peer_bars)(run):
            mark = "" if not isinstance(r, (int, float)) or r >= 1 else " (behind)"
            value = r if isinstance(r, str) else fmt(r, ".2f")
            lines.append(f"| {name} | {what} | {peer} | {value}{mark} |")
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
                    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
                    module(run.scenario).plot(run, png)
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
