"""What the kernels and overhead scenarios share beyond cold_copy.py's helpers (which they import
from there): their common options, provenance without an image, where the JSON lines go, a SIGTERM
that unwinds like Ctrl-C, median/min/max, pair-by-pair ratios, the verdict line and the ending
(bars, the engine-changed check, the exit code)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import statistics
import time
from collections.abc import Iterator
from typing import Any, TextIO

from .cold_copy import ROOT, _fmt, _say, engine_fingerprint, provenance


def parser(scenario: str, description: str, quick: str) -> argparse.ArgumentParser:
    """An argument parser with the options every scenario has: --out, --quick, --require-bars."""
    p = argparse.ArgumentParser(prog=f"python -m bench {scenario}", description=description)
    p.add_argument("--out", help=f"JSON lines output (default bench/out/{scenario}-<time>.jsonl)")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {quick}")
    p.add_argument("--require-bars", action="store_true",
                   help="exit 3 when a valid run misses a bar")
    return p


def provenance_of(workdir: str, workload: str, **extra: Any) -> dict[str, Any]:
    """cold_copy.provenance (engine commit, peers, kernel, CPU, ...) with a workload described
    instead of an image."""
    prov = provenance({}, workdir)
    prov.pop("image")
    prov.update(extra, workload=workload)
    return prov


def out_path(scenario: str, given: str | None) -> str:
    """--out FILE, else bench/out/SCENARIO-<time>.jsonl; its directory made."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = given or str(ROOT / "bench" / "out" / f"{scenario}-{stamp}.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


class JsonLines:
    """One JSON object per line, flushed as written (a killed run keeps what it measured)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def emit(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record, sort_keys=True) + "\n")
        self.out.flush()


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


def stats(xs: list[float], digits: int = 9) -> dict[str, Any]:
    """median, min and max of xs (None when empty) and how many."""
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits), "n": len(xs)}


def paired(a: list[float | None], b: list[float | None]) -> dict[str, Any]:
    """a[i] / b[i] pair by pair (pairs with a None left out): the median and every pair."""
    pairs = [x / y for x, y in zip(a, b) if x is not None and y]
    return {"median": round(statistics.median(pairs), 4) if pairs else None,
            "pairs": [round(p, 4) for p in pairs]}


def fingerprints(start: str, seen: list[str]) -> list[str]:
    """Every engine fingerprint of the run (start, each run's, the end's): more than one means
    the engine's files changed while it ran (the tree is shared)."""
    return sorted(set(seen) | {start, engine_fingerprint()})


def say_bars(bars: list[dict[str, Any]], changed: list[str]) -> None:
    for b in bars:
        mark = "n/a   " if b["met"] is None else ("met   " if b["met"] else "MISSED")
        _say(f"  {mark} {b['bar']}: {_fmt(b['value'], b.get('format', '.2f'))}")
    if len(changed) > 1:
        _say(f"WARNING: the engine's files changed during the run ({len(changed)} versions: "
             f"{', '.join(changed)})")


def finish(out: JsonLines, scenario: str, started: float, valid: bool, bars: list[dict[str, Any]],
           fps: list[str], command: str, prov: dict[str, Any], **extra: Any) -> float:
    """Write the verdict line; return the run's duration."""
    duration = time.time() - started
    out.emit({"type": "verdict", "scenario": scenario, "valid": valid, "bars": bars,
              "duration_s": round(duration, 1), "engine_changed_during_run": len(fps) > 1,
              "engine_fingerprints": fps, "command": command, "provenance": prov, **extra})
    return duration


def conclude(a: argparse.Namespace, valid: bool, bars: list[dict[str, Any]], fps: list[str],
             duration: float, path: str, command: str, invalid: str) -> int:
    """Print the bars and the ending; the exit code: 1 invalid, 3 a bar missed with
    --require-bars, else 0."""
    say_bars(bars, fps)
    code = 0
    if not valid:
        _say(f"INVALID: {invalid} (see 'problems' in the JSON lines)")
        code = 1
    elif a.require_bars and not all(b["met"] for b in bars):
        code = 3
    _say(f"duration {duration:.1f} s; JSON lines: {path}")
    _say(f"reproduce: {command}")
    return code
