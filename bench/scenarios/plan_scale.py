"""plan-scale: a cold plan of 100 small VMs over 1, 4 and 5 source hosts, each host saturating.

The issue: "100 small VMs (tens of MiB each, one to three disks) spread over 1, 4 and 5 simulated
source hosts (one nbdkit per host with a per-host rate limit, so a host saturates as an ESXi host
does) ... reproduce the shape of the seed's table (speed-up from 1 to 4 and 5 hosts), and compare
the predicted plan time with the measured one." The seed's table (Forklift's cold migration
tests): 100 VMs on 1 ESXi host ~3 h 25 min, on 4 ~1 h 22 min (2.5x), on 5 ~1 h 05 min (3.2x).

Per host count: H nbdkits (file plugin, dir= mode: one export per disk file; the rate filter's
rate= caps the host's total over all its connections), VM i on host i mod H, the plan with the
seed's limits (Forklift's defaults: 20 disks in flight per host), `transfer plan run --dry-run
--json` for the prediction, then `transfer plan run` measured (spawn to reaping), every target
compared with its source afterwards. Details: bench/README.md, "plan-scale".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import time
from typing import Any

import xxhash

from transfer.cli import parse_size
from transfer.units import parse_duration

from ..harness.machine import (ENGINE, MiB, engine_lacks, fmt, invalid_text, md_table,
                               missing_programs, provenance, say)
from ..harness.measure import failed, json_result, measure
from ..harness.runner import Context, Outcome, defaults, parser, reproduce

NAME = "plan-scale"
WORKDIR = True
SEED_TABLE = {1: 3 * 3600 + 25 * 60, 4: 3600 + 22 * 60, 5: 3600 + 5 * 60}  # seconds
BAR_PREDICTION = 0.20  # predicted plan time within ±20 % of the measured one


def make_disks(root: str, vms: int, seed: int, disk_size: int) -> list[list[str]]:
    """vms VMs of one to three disks of disk_size bytes, about half of each written with random
    data in 1 MiB pieces (the rest holes); the disk files per VM, made once per work dir."""
    rng = random.Random(seed)
    out = []
    for v in range(vms):
        disks = []
        for d in range(rng.randint(1, 3)):
            path = os.path.join(root, f"vm{v:03d}-d{d}.img")
            disks.append(path)
            pieces = [i for i in range(disk_size // MiB) if rng.random() < 0.5]
            if os.path.exists(path):
                continue
            with open(path + ".tmp", "wb") as f:
                f.truncate(disk_size)
                for i in pieces:
                    f.seek(i * MiB)
                    f.write(rng.randbytes(MiB))
            os.rename(path + ".tmp", path)
        out.append(disks)
    return out


def file_hash(path: str) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while b := f.read(8 * MiB):
            h.update(b)
    return h.hexdigest()


class Hosts:
    """H nbdkits, each serving its VMs' disk files (symlinks in its own dir) at a capped rate."""

    def __init__(self, workdir: str, vms: list[list[str]], n: int, rate: str) -> None:
        self.procs: list[subprocess.Popen] = []
        self.sockets = []
        for h in range(n):
            d = os.path.join(workdir, f"host{h}")
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            for v in range(h, len(vms), n):
                for disk in vms[v]:
                    os.symlink(disk, os.path.join(d, os.path.basename(disk)))
            sock = os.path.join(workdir, f"hosts{n}-{h}.sock")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)  # a stale one would look like a listening nbdkit
            self.sockets.append(sock)
            self.procs.append(subprocess.Popen(
                ["nbdkit", "-f", "-r", "-U", sock, "--filter=rate", "file", f"dir={d}",
                 f"rate={rate}"], stderr=subprocess.DEVNULL))
        for sock, p in zip(self.sockets, self.procs):
            for _ in range(100):
                if os.path.exists(sock) or p.poll() is not None:
                    break
                time.sleep(0.05)  # nbdkit makes its socket when it listens
            if not os.path.exists(sock):
                self.close()
                raise RuntimeError(f"nbdkit did not listen on {sock}")

    def close(self) -> None:
        for p in self.procs:
            p.terminate()  # our own children
        for p in self.procs:
            p.wait(timeout=30)


def write_plan(path: str, vms: list[list[str]], hosts: Hosts, targets: str) -> list[tuple]:
    """The plan file (cold VMs, the seed's limits left at their defaults); (source, target)
    of every disk."""
    n = len(hosts.sockets)
    lines, pairs = ["vms:"], []
    for v, disks in enumerate(vms):
        lines += [f"  - name: vm{v:03d}", f"    host: esx{v % n}", "    type: cold", "    disks:"]
        for disk in disks:
            name = os.path.basename(disk)
            target = os.path.join(targets, name)
            lines += [f"      - source: nbd+unix:///{name}?socket={hosts.sockets[v % n]}",
                      f"        target: {target}"]
            pairs.append((disk, target))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return pairs


def run_hosts(ctx: Context, vms: list[list[str]], n: int) -> dict[str, Any]:
    a, w = ctx.a, ctx.workdir
    plan, state, targets = (os.path.join(w, x) for x in (f"plan-{n}.yaml", f"state-{n}", "t"))
    report, files = os.path.join(w, "report.json"), os.path.join(w, "child")
    for d in (state, targets):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(targets)
    rec: dict[str, Any] = {"type": "run", "scenario": NAME, "hosts": n, "vms": len(vms),
                           "disks": sum(map(len, vms)), "rate": a.rate, "warmup": False}
    hosts = Hosts(w, vms, n, a.rate)
    try:
        pairs = write_plan(plan, vms, hosts, targets)
        dry = subprocess.run([str(ENGINE), "plan", "run", plan, "--state", state, "--dry-run",
                              "--json"], capture_output=True, text=True, timeout=600)
        problems = [] if dry.returncode == 0 else [f"dry run: exit {dry.returncode}: "
                                                   f"{dry.stderr.strip()[-300:]}"]
        predicted = json.loads(dry.stdout).get("predicted_seconds") if not problems else None
        rec.update(measure([str(ENGINE), "plan", "run", plan, "--state", state, "--report",
                            report, "--progress", "none"], files, a.timeout))
        problems += failed(rec, files)
        data = json_result(report, problems, "plan run") if rec["exit"] == 0 else {}
    finally:
        hosts.close()
    rec.update(predicted_s=predicted, predicted_in_run_s=data.get("predicted_seconds"),
               bytes=sum(os.path.getsize(s) for s, _ in pairs))
    rec["pred_over_measured"] = (predicted / rec["wall_s"]) if predicted and rec["wall_s"] else None
    bad = [t for s, t in pairs if not os.path.exists(t) or file_hash(s) != file_hash(t)]
    if bad:
        problems.append(f"{len(bad)} targets differ from their sources, e.g. {bad[0]}")
    shutil.rmtree(targets, ignore_errors=True)
    ctx.record(rec, problems, True)
    say(f"  {n} host(s): {rec['wall_s']:.1f} s measured, {fmt(predicted, '.1f')} s predicted "
        f"(ratio {fmt(rec['pred_over_measured'], '.2f')}), CPU {rec['client_cpu_s']:.1f} s"
        + invalid_text(problems))
    return rec


def table(summary: dict[str, Any]) -> str:
    head = ("| source hosts | VMs / disks | measured s | predicted s | predicted ÷ measured | "
            "speed-up over 1 host | the seed's (Forklift, 100 VMs) |")
    rows = []
    for r in summary["rows"]:
        seed = SEED_TABLE.get(r["hosts"])
        seed_up = SEED_TABLE[1] / seed if seed else None
        rows.append(f"| {r['hosts']} | {r['vms']} / {r['disks']} | {fmt(r['wall_s'], '.1f')} | "
                    f"{fmt(r['predicted_s'], '.1f')} | {fmt(r['ratio'], '.2f')} | "
                    f"{fmt(r['speedup'], '.2f')} | {fmt(seed_up, '.1f')}x |")
    return md_table(head, rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = parser(NAME, "A cold plan of small VMs over 1, 4 and 5 rate-capped source hosts: "
                     "predicted against measured plan time, and the speed-up with hosts.",
               "12 VMs of 4 MiB disks over 1 and 3 hosts", workdir="the disks and targets")
    p.add_argument("--vms", type=int, help="VMs in the plan (default 100)")
    p.add_argument("--hosts", help="comma-separated host counts (default 1,4,5)")
    p.add_argument("--disk-size", type=parse_size, help="each disk's size (default 16M)")
    p.add_argument("--rate", help="each host's cap, nbdkit's rate= (bits/s; default 80M)")
    p.add_argument("--seed", type=int, default=1, help="the disks' seed (default 1)")
    p.add_argument("--timeout", type=parse_duration, default=3600.0, help="per plan run")
    a = p.parse_args(argv)
    defaults(a, vms=(100, 12), hosts=("1,4,5", "1,3"), disk_size=(16 * MiB, 4 * MiB),
             rate=("80M", "80M"))
    a.hosts = [int(x) for x in a.hosts.split(",") if x]
    if a.vms < 1 or not a.hosts or min(a.hosts) < 1 or a.disk_size % MiB:
        p.error("--vms and --hosts at least 1, --disk-size whole MiB")
    return a


def reproduce_command(a: argparse.Namespace) -> str:
    return reproduce(NAME, "--vms", str(a.vms), "--hosts", ",".join(map(str, a.hosts)),
                     "--disk-size", f"{a.disk_size // MiB}M", "--rate", a.rate,
                     "--seed", str(a.seed))


def preflight(a: argparse.Namespace) -> list[str]:
    missing = missing_programs("nbdkit")
    if ENGINE.exists():
        missing += engine_lacks("plan", "run")
    return missing


def run(ctx: Context) -> Outcome:
    a = ctx.a
    disks = os.path.join(ctx.workdir, "disks")
    os.makedirs(disks, exist_ok=True)
    vms = make_disks(disks, a.vms, a.seed, a.disk_size)
    ctx.prov = provenance(ctx.workdir, workload=f"{a.vms} VMs, {sum(map(len, vms))} disks of "
                          f"{a.disk_size // MiB} MiB (about half data), hosts capped at "
                          f"rate={a.rate}")
    recs = [run_hosts(ctx, vms, n) for n in a.hosts]
    one = next((r["wall_s"] for r in recs if r["hosts"] == 1 and r["valid"]), None)
    rows = [{"hosts": r["hosts"], "vms": r["vms"], "disks": r["disks"], "wall_s": r["wall_s"],
             "predicted_s": r["predicted_s"], "ratio": r["pred_over_measured"],
             "speedup": one / r["wall_s"] if one and r["valid"] else None} for r in recs]
    summary = {"type": "summary", "scenario": NAME, "rows": rows, "provenance": ctx.prov}
    ctx.emit(summary)
    bars = [{"bar": f"{r['hosts']} host(s): predicted plan time within ±20 % of the measured",
             "value": r["ratio"], "met": None if r["ratio"] is None
             else abs(r["ratio"] - 1) <= BAR_PREDICTION} for r in rows]
    return Outcome(bars, [table(summary), "", "Measured: `transfer plan run` spawn to reaping; "
                          "predicted: `plan run --dry-run` before it; the seed's column: "
                          "3 h 25 min over 1 h 22 min and 1 h 05 min."])
