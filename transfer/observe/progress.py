"""Renderers for the engine's progress events (bytes done counts completed writes).

- TerminalBar: one line redrawn in place on a terminal (stderr).
- JsonProgress: one JSON object per line, per event (the engine emits one a
  second and a final one): {"event": "progress", "bytes_done", "bytes_total",
  "percent", "rate" (bytes/s), "seconds", "final", "retries", "reconnects",
  "stalled" (seconds since bytes_done last grew), "phase" ("copy", or "read-back":
  the target read back against the digests taken while copying)}.

Both show a stall (no completed write for STALL seconds or more: a silent
server, RELIABILITY.md S5) and the retries and reconnects so far.
"""

from __future__ import annotations

import json
import sys
from typing import Callable, TextIO

from .events import Progress

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
STALL = 5.0  # seconds without a completed write before the bar says "stalled"


def human_bytes(n: float) -> str:
    for unit in UNITS:
        if abs(n) < 1024 or unit == UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class TerminalBar:
    WIDTH = 30

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream

    def __call__(self, p: Progress) -> None:
        frac = p.done / p.total if p.total else 1.0
        filled = int(frac * self.WIDTH)
        eta = (p.total - p.done) / p.rate if p.rate > 0 else 0.0
        line = (f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {frac * 100:5.1f}% "
                f"{human_bytes(p.done)} / {human_bytes(p.total)}  {human_bytes(p.rate)}/s")
        line += "  done" if p.final else f"  ETA {eta:4.0f} s"
        if p.phase != "copy":
            line += f"  ({p.phase})"
        if p.retries or p.reconnects:
            line += f"  retries {p.retries}, reconnects {p.reconnects}"
        if p.stalled >= STALL:
            line += f"  stalled {p.stalled:.0f} s"
        self.stream.write(line + ("\n" if p.final else ""))
        self.stream.flush()


class JsonProgress:
    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream

    def __call__(self, p: Progress) -> None:
        event = {
            "event": "progress",
            "bytes_done": p.done,
            "bytes_total": p.total,
            "percent": round(p.done * 100 / p.total, 2) if p.total else 100.0,
            "rate": round(p.rate),
            "seconds": round(p.seconds, 3),
            "final": p.final,
            "retries": p.retries,
            "reconnects": p.reconnects,
            "stalled": round(p.stalled, 1),
            "phase": p.phase,
        }
        self.stream.write(json.dumps(event) + "\n")
        self.stream.flush()


def make_renderer(mode: str, *, json_stream: TextIO | None = None) -> Callable[[Progress], None] | None:
    """auto: a bar when stderr is a terminal, else nothing; bar; json (on stdout, or
    json_stream where stdout carries something else); none."""
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "none"
    if mode == "bar":
        return TerminalBar()
    if mode == "json":
        return JsonProgress(json_stream or sys.stdout)
    if mode == "none":
        return None
    raise ValueError(f"unknown progress mode {mode!r}")
