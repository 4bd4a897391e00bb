"""How long `transfer migrate` takes to exit after SIGINT, in each phase (RELIABILITY.md P3).

    PYTHONPATH=. .venv/bin/python tools/migrate_sigint_latency.py [--size 1G] [--reps 3]

A qemu-storage-daemon holds a synthetic disk; for each phase a migration is
started, the phase is waited for (its event), SIGINT is sent and the time to
the process's exit is printed with its exit code and last stderr line:

    precopy wait   after pass 0's line, in the --precopy-interval wait
    pass 0         after the first JSON progress line of pass 0
    on-cutover     once the command (`sleep 600` under a shell) wrote its pids
    final pass     0.5 s into the final pass (its copy or read-back of the target)

A measurement, not a test: it sleeps where a test would wait for an event.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from transfer.cli import parse_size
from transfer.demo.servers import QemuStorageDaemon
from transfer.demo.synth import make_image


def wait_line(stream, prefix: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise SystemExit(f"the migration ended before {prefix!r}")
        if line.startswith(prefix):
            return
    raise SystemExit(f"no {prefix!r} within {timeout} s")


def one(phase: str, work: str, image: str, size: int) -> tuple[float, int, str]:
    qmp, nbd = os.path.join(work, "qmp.sock"), os.path.join(work, "nbd.sock")
    state, target = os.path.join(work, "st"), os.path.join(work, "t.img")
    pids = os.path.join(work, "pids")
    for p in (state, target, pids):
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (
            os.path.exists(p) and os.unlink(p))
    with QemuStorageDaemon(nbd, image, qmp=qmp, fmt="raw"):
        argv = [sys.executable, "-m", "transfer.cli", "migrate", target, "--type", "warm",
                "--qmp", qmp, "--node", "disk0", "--state", state, "--nbd-socket", nbd,
                "--cutover-timeout", "600s"]
        if phase == "precopy wait":
            argv += ["--precopy-interval", "600s", "--on-cutover", "true"]
        elif phase == "pass 0":
            argv += ["--precopy-interval", "600s", "--on-cutover", "true", "--progress", "json"]
        elif phase == "on-cutover":
            argv += ["--cutover", "now", "--on-cutover",
                     f"sh -c 'sleep 600 & echo $$ $! > {pids}; wait'"]
        else:
            argv += ["--cutover", "now", "--on-cutover", "true"]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if phase == "precopy wait":
                wait_line(p.stderr, "transfer: pass   0:")
            elif phase == "pass 0":
                wait_line(p.stdout, "{")
            elif phase == "on-cutover":
                while not os.path.exists(pids) or len(open(pids).read().split()) < 2:
                    time.sleep(0.005)
            else:
                wait_line(p.stderr, "transfer: pass   0:")
                time.sleep(0.5)
            if p.poll() is not None:
                raise SystemExit(f"{phase}: the migration ended before the signal")
            sent = time.monotonic()
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=600)
            took = time.monotonic() - sent
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        if phase == "on-cutover":
            for pid in map(int, open(pids).read().split()):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                            err += f"\n(pid {pid} of the --on-cutover command still runs)"
                except FileNotFoundError:
                    pass
        last = err.strip().splitlines()[-1] if err.strip() else ""
        return took, p.returncode, last


def main() -> int:
    a = argparse.ArgumentParser()
    a.add_argument("--size", type=parse_size, default=1 << 30)
    a.add_argument("--reps", type=int, default=3)
    a.add_argument("--phase", action="append",
                   choices=("precopy wait", "pass 0", "on-cutover", "final pass"))
    args = a.parse_args()
    with tempfile.TemporaryDirectory(prefix="sigint-") as work:
        image = os.path.join(work, "disk.raw")
        make_image(image, args.size, 26, allocated=0.9)
        for phase in args.phase or ("precopy wait", "pass 0", "on-cutover", "final pass"):
            for _ in range(args.reps):
                took, code, last = one(phase, work, image, args.size)
                print(f"{phase:13} SIGINT to exit {took:6.3f} s, exit {code}: {last}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
