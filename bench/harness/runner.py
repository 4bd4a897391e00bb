"""A scenario's run, from its options to its exit code, the same for every scenario.

A scenario is a module (bench/scenarios/) with:

  NAME                     its name on the command line and in its records
  parse_args(argv)         its options (argparse: bad ones exit 2 before anything runs)
  reproduce_command(a)     the command that runs it again with these options
  preflight(a)             what the machine lacks to run it (a list; empty: go)
  run(ctx) -> Outcome      the measuring: ctx.prov set, records through ctx.emit and ctx.record,
                           the verdict's content back
  table(summary), plot(run, png)
                           its part of the markdown summary and its PNG (harness/report.py),
                           from the JSON lines alone; optional: TOOLS (the order its summaries'
                           tools are shown in), report_table(run) (default: table of the last
                           summary), report_notes(run) (default: the verdict's notes),
                           best_peer_rows(run) (default: report.peer_bars)
  bar_value(b)             optional: a bar's value as text (default: its value, its format)
  WORKDIR, CLEANUP         optional: False for no work directory; the names (globs) run() leaves
                           in a --workdir given by the user, removed at the end without --keep

The runner writes the JSON lines (flushed as written: a killed run keeps what it measured), makes
and removes the work directory, turns SIGTERM into Ctrl-C so `with` and `finally` clean up, writes
the verdict line (bars, validity, duration, the engine's fingerprints, the reproduce command,
provenance), then prints the outcome's text, the bars and the ending. Exit: 0 valid, 1 invalid,
2 missing prerequisites, 3 a bar missed with --require-bars, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TextIO

from .machine import ROOT, engine_fingerprint, fingerprints, fmt, say


class Abort(Exception):
    """The run cannot go on (pass 0 failed): invalid, exit 1."""


@dataclass
class Outcome:
    """What a scenario's run() found: the verdict's content and what to print after it. The run
    is valid when valid is and every record of ctx.record is."""
    bars: list[dict[str, Any]]
    text: list[str] = field(default_factory=list)  # printed once the JSON lines are written
    verdict: dict[str, Any] = field(default_factory=dict)  # more fields of the verdict line
    valid: bool = True
    invalid: str = "a run failed or a correctness check failed"


class Context:
    """What run() gets: the options, the work directory, the JSON lines; what it keeps: the
    provenance (every record carries it) and the run records."""

    def __init__(self, a: argparse.Namespace, out: TextIO, path: str, workdir: str) -> None:
        self.a = a
        self.out = out
        self.path = path
        self.workdir = workdir
        self.prov: dict[str, Any] = {}
        self.runs: list[dict[str, Any]] = []

    def emit(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record, sort_keys=True) + "\n")
        self.out.flush()

    def record(self, rec: dict[str, Any], problems: list[str], engine: bool,
               notes: list[str] | None = None) -> dict[str, Any]:
        """A run's record finished: valid when it has no problems (notes: what the engine said
        that it should not, not fatal), the provenance, and for an engine run the engine's
        fingerprint now (edits during the run show); emitted, kept in runs and returned."""
        rec.update(valid=not problems, problems=problems, provenance=self.prov)
        if engine:
            rec["engine_fingerprint"] = engine_fingerprint()
        if notes is not None:
            rec["notes"] = notes
        self.emit(rec)
        self.runs.append(rec)
        return rec


def parser(scenario: str, description: str, quick: str, workdir: str | None = None
           ) -> argparse.ArgumentParser:
    """An argument parser with the options every scenario has: --out, --quick, --require-bars;
    with workdir (what lives there), --workdir and --keep too."""
    p = argparse.ArgumentParser(prog=f"python -m bench {scenario}", description=description)
    if workdir:
        p.add_argument("--workdir", help=f"directory for {workdir} (default: a fresh directory "
                                         "under /var/tmp); images made there with --keep and the "
                                         "same size and seed are reused")
        p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--out", help=f"JSON lines output (default bench/out/{scenario}-<time>.jsonl)")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {quick}")
    p.add_argument("--require-bars", action="store_true",
                   help="exit 3 when a valid run misses one of the issue's bars")
    return p


def defaults(a: argparse.Namespace, **full_and_quick: tuple[Any, Any]) -> None:
    """Each option NAME=(full run's default, --quick's) that was not given gets its default."""
    for name, (full, quick) in full_and_quick.items():
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)


def reproduce(scenario: str, *options: str) -> str:
    return " ".join(["cd", shlex.quote(str(ROOT)), "&&", ".venv/bin/python", "-m", "bench",
                     scenario, *options])


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block, so `with` and `finally` clean up."""
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def bar_line(b: dict[str, Any], value: str) -> str:
    """A bar on stdout: met / MISSED / n/a, its name and its value."""
    if b["met"] is None:
        return f"  n/a    {b['bar']}: {b.get('why') or value}"
    return f"  {'met   ' if b['met'] else 'MISSED'} {b['bar']}: {value}"


def bar_value(mod: ModuleType, b: dict[str, Any]) -> str:
    if hasattr(mod, "bar_value"):
        return mod.bar_value(b)
    return fmt(b.get("value"), b.get("format", ".2f"))


def _workdir(mod: ModuleType, a: argparse.Namespace) -> tuple[str, bool]:
    """The work directory and whether we made it (then it is removed whole at the end)."""
    given = getattr(a, "workdir", None)
    if not getattr(mod, "WORKDIR", True):
        return str(ROOT), False
    if given is None:
        return tempfile.mkdtemp(prefix=f"bench-{mod.NAME}-", dir="/var/tmp"), True
    made = not os.path.exists(given)
    os.makedirs(given, exist_ok=True)
    return os.path.abspath(given), made


def _clean(mod: ModuleType, a: argparse.Namespace, workdir: str, made: bool) -> None:
    if not getattr(mod, "WORKDIR", True):
        return
    if getattr(a, "keep", False):
        print(f"work directory kept: {workdir}", file=sys.stderr)
    elif made:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        for pattern in getattr(mod, "CLEANUP", ()):
            for path in glob.glob(os.path.join(workdir, pattern)):
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)


def main(mod: ModuleType, argv: list[str]) -> int:
    """`python -m bench NAME [options]`: run the scenario mod."""
    a = mod.parse_args(argv)
    missing = mod.preflight(a)
    if missing:
        print(f"{mod.NAME}: missing " + ", ".join(missing), file=sys.stderr)
        return 2
    started = time.time()
    path = a.out  # python -m bench gives every scenario its --out
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    workdir, made = _workdir(mod, a)
    command = mod.reproduce_command(a)
    try:
        with sigterm_interrupts(), open(path, "w") as f:
            ctx = Context(a, f, path, workdir)
            o = mod.run(ctx)
            fps = fingerprints(ctx.prov.get("engine_fingerprint", ""), ctx.runs)
            duration = time.time() - started
            valid = o.valid and all(r["valid"] for r in ctx.runs)
            ctx.emit({"type": "verdict", "scenario": mod.NAME, "valid": valid, "bars": o.bars,
                      "duration_s": round(duration, 1), "engine_changed_during_run": len(fps) > 1,
                      "engine_fingerprints": fps, "command": command, "provenance": ctx.prov,
                      **o.verdict})
        say()
        for line in o.text:
            say(line)
        say()
        for b in o.bars:
            say(bar_line(b, bar_value(mod, b)))
        if len(fps) > 1:
            say(f"WARNING: the engine's files changed during the run ({len(fps)} versions: "
                f"{', '.join(fps)}); each engine run's JSON line has its engine_fingerprint")
        code = 0
        if not valid:
            say(f"INVALID: {o.invalid} (see 'problems' in the JSON lines)")
            code = 1
        elif a.require_bars and any(b["met"] is False for b in o.bars):
            code = 3
        say(f"duration {duration / 60:.1f} min; JSON lines: {path}")
        say(f"reproduce: {command}")
        return code
    except Abort as e:
        say(f"{mod.NAME}: INVALID: {e} (JSON lines: {path})")
        return 1
    except KeyboardInterrupt:
        print(f"{mod.NAME}: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        _clean(mod, a, workdir, made)
