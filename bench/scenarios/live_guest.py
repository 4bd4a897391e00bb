"""The live-converge scenario's guest, in a process of its own (python -m bench.live_guest ...).

A transfer.demo.workload.GuestWriter writes to the daemon's writable NBD export at --rate bytes/s
until the file --stop appears (the --on-cutover command touches it: the VM is being stopped);
then it stops (every logged write has completed), touches --stopped (the command then returns
and the engine takes its final pass) and writes a JSON summary of what it wrote to --summary.
It runs apart from the harness so that its Python (the random bytes, libnbd calls) does not
share a GIL with anything the harness does; on a 2-CPU machine it still competes with the
engine for CPU, which the harness measures.

--ready FILE is touched once the first write has completed (the guest is writing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import nbd

from transfer.demo.workload import GuestWriter

BLOCK = 64 * 1024  # the dirty bitmap's granularity on a raw file (qemu's default)
POLL = 0.005
STOP_POLL = 0.001  # the stop's reaction, part of the measured downtime: as quick as a QMP stop


def summarize(log: list, rate: float, stop_seen: float | None, stopped: float,
              window: tuple[float, float] | None) -> dict:
    """What the guest did: writes, bytes, the rate it achieved, and the distinct 64 KiB blocks
    it touched (over the whole run and inside window, the migration's (start, stop))."""
    out: dict = {"rate_asked": rate, "writes": len(log), "stop_seen": stop_seen,
                 "stopped": stopped}
    if not log:
        return out
    first, last = log[0].began, max(w.ended for w in log)
    nbytes = sum(w.length for w in log)
    blocks = set()
    for w in log:
        blocks.update(range(w.offset // BLOCK, (w.offset + w.length - 1) // BLOCK + 1))
    out.update({"bytes": nbytes, "zero_writes": sum(w.zero for w in log),
                "first_began": first, "last_ended": last,
                "rate_achieved": nbytes / max(last - first, 1e-6),
                "distinct_blocks": len(blocks), "distinct_block_bytes": len(blocks) * BLOCK,
                "max_write_s": max(w.ended - w.began for w in log)})
    if window is not None:
        a, b = window
        inside = [w for w in log if a <= w.began < b]
        if inside:
            span = max(b - a, 1e-6)
            out["window_bytes"] = sum(w.length for w in inside)
            out["window_rate"] = out["window_bytes"] / span
            out["window_writes"] = len(inside)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.live_guest")
    p.add_argument("--uri", required=True)
    p.add_argument("--rate", type=float, required=True, help="bytes per second")
    p.add_argument("--pattern", default="scattered")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ready", required=True)
    p.add_argument("--stop", required=True)
    p.add_argument("--stopped", required=True)
    p.add_argument("--summary", required=True)
    p.add_argument("--release", help="a file to wait for after --stopped before summing up: "
                   "a stopped VM uses no CPU, so neither may this during the final pass")
    p.add_argument("--window-start", help="a file holding the epoch time the migration began "
                                          "(read at the end, for the rate inside the migration)")
    a = p.parse_args(argv)
    w = GuestWriter(a.uri, rate=a.rate, pattern=a.pattern, seed=a.seed).start()
    stop_seen = None
    try:
        while not w.log and w.alive():
            time.sleep(POLL)
        Path(a.ready).touch()
        while not os.path.exists(a.stop):
            if not w.alive():  # the writer failed: stop() raises its error
                break
            time.sleep(STOP_POLL)
        else:
            stop_seen = time.time()
        log = w.stop()
    finally:
        stopped = time.time()
        Path(a.stopped).touch()
    while a.release and not os.path.exists(a.release):
        time.sleep(POLL)
    window = None
    if a.window_start:
        with contextlib.suppress(OSError, ValueError), open(a.window_start) as f:
            window = (float(f.read().strip()), stop_seen or stopped)
    s = summarize(log, a.rate, stop_seen, stopped, window)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    s["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 3)
    with open(a.summary, "w") as f:
        json.dump(s, f)
    try:
        w.close()
    except nbd.Error as e:  # the summary is written: only say it
        print(f"live_guest: closing the connection: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
