"""cold-copy: the engine against nbdcopy and qemu-img convert, copying a whole disk over NBD.

Per case (an image, the server in front of it, the page cache's state) and target (null:, a file,
a loop device), each tool of TOOLS copies the disk, ending with the data durable: a warm-up run
checked for correctness, then --reps runs interleaved tool by tool, each a child process timed
from spawn to reaping against a fresh server. The tools' commands, the cases and how to read the
output: bench/README.md, "cold-copy".
"""

from __future__ import annotations

import argparse
import contextlib
import operator
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from transfer.cli import parse_size
from transfer.demo.servers import Nbdkit, QemuNbd, Server

from ..harness.images import KINDS as IMAGES
from ..harness.images import image_info, prepare_image, prepare_qcow2
from ..harness.machine import (
    ENGINE,
    GiB,
    MiB,
    cache_resident,
    cmd_output,
    drop_caches,
    fmt,
    invalid_text,
    md_table,
    median,
    missing_programs,
    paired,
    provenance,
    rep_stats,
    resident_text,
    say,
    say_engine,
    size_text,
    walls,
    warm_cache,
)
from ..harness.measure import cost_text, measured
from ..harness.plots import bar_groups, pyplot, save, title
from ..harness.report import Run, summaries_of
from ..harness.runner import Context, Outcome, defaults, parser, reproduce

NAME = "cold-copy"
TARGETS = ("null", "file", "loop")
SERVERS = ("nbdkit", "qemu-nbd")  # nbdkit's file plugin on the raw image; qemu-nbd on a qcow2 copy
CACHES = ("hot", "dropped")
# What run() leaves in a --workdir given by the user (removed at the end without --keep).
CLEANUP = ("target.img", "loop-backing.img", "nbd.sock", "report.json", "child.*",
           "source*.img", "source*.json", "source*.qcow2*")
# A case: an image, the server in front of it and the page cache's state. The first one listed
# is the one the issue's bars are about ("the 4 GiB bench image on nbdkit").
DEFAULT_CASES = ("mixed/nbdkit/hot", "mixed/qemu-nbd/hot", "random/nbdkit/hot",
                 "random/qemu-nbd/hot", "mixed/nbdkit/dropped")
QUICK_CASES = ("mixed/nbdkit/hot", "random/qemu-nbd/dropped")
PRIMARY = "mixed/nbdkit/hot"
QUICK_SIZE = 256 * MiB
DEFAULT_SIZE = 4 * GiB
# Bars from the issue: engine >= 1.0x nbdcopy on each target, >= 2x qemu-img, peak RSS <= 200 MiB;
# checksum >= 1.0x nbdcopy to null (hashing nearly free); copy --verify reads back at most the
# allocated data once.
BAR_NBDCOPY = 1.0
BAR_QEMU_IMG = 2.0
BAR_RSS_MIB = 200
BAR_CHECKSUM = 1.0
BAR_VERIFY_READ = 1.0
COPY_FIELDS = ("seconds", "bytes_copied", "bytes_zeroed", "bytes_skipped", "bytes_read",
               "connections", "requests", "zero_requests", "request_size", "in_flight",
               "zero_method", "target_created", "flushed", "digest", "native")


@dataclass(frozen=True)
class Tool:
    """One measured command: the targets it runs against and what it tells about itself."""
    targets: tuple[str, ...] = TARGETS
    engine: bool = False        # an engine command (.venv/bin/transfer): fingerprint recorded
    result: str | None = None   # where its JSON result is: "report" (--report R) or "stdout"
    fields: tuple[str, ...] = ()  # the result's fields kept in the run's JSON line
    expect: tuple[tuple[str, Any], ...] = ()  # result fields checked on every run


# The canonical order is the interleaving order.
TOOLS: dict[str, Tool] = {
    "engine": Tool(engine=True, result="report", fields=COPY_FIELDS),
    "engine-verify": Tool(targets=("file", "loop"), engine=True, result="report",
                          fields=COPY_FIELDS + ("verified", "verify_seconds", "verify_bytes_read"),
                          expect=(("verified", True),)),
    "checksum": Tool(targets=("null",), engine=True, result="stdout",
                     fields=("seconds", "bytes_read", "size", "connections", "digest", "native")),
    "nbdcopy": Tool(),
    "nbdcopy-tuned": Tool(),
    "qemu-img": Tool(),
    "qemu-img-tuned": Tool(),
}
# The engine's peers; "-tuned": the best settings of a sweep on these machines (bench/README.md).
PEERS = ("nbdcopy", "nbdcopy-tuned", "qemu-img", "qemu-img-tuned")
NBDCOPY_TUNED = ("--connections=8", "--request-size=1048576")
QEMU_IMG_TUNED = ("-W", "-m", "16")


@dataclass(frozen=True)
class Case:
    """What the tools copy from: an image kind, the server in front of it, the cache's state."""
    image: str
    server: str
    cache: str = "hot"

    @property
    def key(self) -> str:
        return f"{self.image}/{self.server}/{self.cache}"

    @classmethod
    def parse(cls, text: str) -> Case:
        """IMAGE/SERVER[/CACHE], e.g. mixed/nbdkit or random/qemu-nbd/dropped."""
        parts = text.split("/")
        if len(parts) == 2:
            parts.append("hot")
        if (len(parts) != 3 or parts[0] not in IMAGES or parts[1] not in SERVERS
                or parts[2] not in CACHES):
            raise ValueError(f"bad case {text!r}: IMAGE/SERVER[/CACHE] with IMAGE one of "
                             f"{', '.join(IMAGES)}, SERVER one of {', '.join(SERVERS)}, CACHE "
                             f"one of {', '.join(CACHES)}")
        return cls(*parts)


@dataclass
class Source:
    """One image as a case serves it: the raw image (what targets are compared with), the file
    the server reads (the raw image, or its qcow2 copy for qemu-nbd) and what is known of it."""
    image: str
    served: str
    alloc: int
    digest: str


# ---------------------------------------------------------------- the loop device

class LoopDevice:
    """A loop device over a sparse backing file, attached by us (with) and detached by its own
    path: only if it is still ours."""

    def __init__(self, backing: str, size: int) -> None:
        self.backing = os.path.realpath(backing)
        self.size = size

    def __enter__(self) -> LoopDevice:
        with open(self.backing, "wb") as f:
            f.truncate(self.size)
        self.dev = subprocess.run(["losetup", "-f", "--show", self.backing], capture_output=True,
                                  text=True, check=True).stdout.strip()
        say(f"loop device {self.dev} over {self.backing}")
        return self

    def reset(self) -> None:
        """Every run starts from the same state: the device discarded (reads zeroes, all holes)."""
        subprocess.run(["blkdiscard", self.dev], check=True, capture_output=True)

    def __exit__(self, *exc: object) -> None:
        ours = False
        with contextlib.suppress(OSError), open(
                f"/sys/block/{os.path.basename(self.dev)}/loop/backing_file") as f:
            ours = os.path.realpath(f.read().strip()) == self.backing
        if ours:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True, check=False)


# ---------------------------------------------------------------- one run

@dataclass
class Bench:
    """The runs of one case (its source, the reps of each tool) to the targets."""
    ctx: Context
    case: Case
    src: Source
    reps: int
    loop: LoopDevice | None

    def __post_init__(self) -> None:
        self.size = self.ctx.a.size
        self.sock = os.path.join(self.ctx.workdir, "nbd.sock")
        self.file_target = os.path.join(self.ctx.workdir, "target.img")
        self.timeout = max(120.0, 60.0 * self.size / GiB)

    def server(self) -> Server:
        """A fresh server for one run: nbdkit's file plugin on the raw image, or qemu-nbd on
        its qcow2 copy (--shared=0: any number of clients, so every tool gets the connections
        it asks for; read-only, so it advertises multi-conn)."""
        if self.case.server == "nbdkit":
            return Nbdkit(self.sock, "file", self.src.served, readonly=True)
        return QemuNbd(self.sock, self.src.served, fmt="qcow2", readonly=True,
                       options=["--shared=0"])

    def target_path(self, target: str) -> str:
        if target == "null":
            return "null:"
        if target == "file":
            return self.file_target
        assert self.loop is not None
        return self.loop.dev

    def prepare(self, target: str) -> None:
        """The same starting state for every tool: an empty sparse file, or a discarded device."""
        if target == "file":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file_target)
            with open(self.file_target, "xb") as f:  # created anew, not by the tool
                f.truncate(self.size)
        elif target == "loop":
            assert self.loop is not None
            self.loop.reset()
        if target != "null":
            os.sync()  # nothing of the previous run (unlink, discard) left to write back

    def argv(self, tool: str, target: str, uri: str, report: str) -> list[str]:
        dst = self.target_path(target)
        if tool in ("engine", "engine-verify"):
            verify = ["--verify"] if tool == "engine-verify" else []
            return [str(ENGINE), "copy", uri, dst, *verify, "--progress=none", "--report", report]
        if tool == "checksum":
            return [str(ENGINE), "checksum", uri, "--json", "--progress=none"]
        if tool in ("nbdcopy", "nbdcopy-tuned"):
            tuned = list(NBDCOPY_TUNED) if tool == "nbdcopy-tuned" else []
            return ["nbdcopy", "--flush", *tuned, uri, dst]
        if tool in ("qemu-img", "qemu-img-tuned"):
            tuned = list(QEMU_IMG_TUNED) if tool == "qemu-img-tuned" else []
            if target == "null":
                return ["qemu-img", "convert", *tuned, "-n", "-f", "raw", "--target-image-opts",
                        uri, f"driver=null-co,size={self.size}"]
            return ["qemu-img", "convert", *tuned, "-n", "-f", "raw", "-O", "raw", uri, dst]
        raise ValueError(tool)

    def fsync_target(self, target: str) -> None:
        """qemu-img convert never flushes: make its data durable inside the timed region, as
        nbdcopy --flush and the engine do."""
        fd = os.open(self.target_path(target), os.O_WRONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def run(self, tool: str, target: str, rep: int | None) -> dict[str, Any]:
        """One timed run; rep None is the warm-up, which is also checked for correctness: the
        engine's own JSON result (the copy report, or checksum's stdout) kept as engine_report,
        its expected fields checked, and on the warm-up its digest and the target."""
        spec = TOOLS[tool]
        report = os.path.join(self.ctx.workdir, "report.json")
        files = os.path.join(self.ctx.workdir, "child")
        self.prepare(target)
        rec: dict[str, Any] = {"type": "run", "scenario": NAME, "case": self.case.key,
                               "image": self.case.image, "server": self.case.server,
                               "cache": self.case.cache, "target": target, "tool": tool,
                               "rep": rep, "warmup": rep is None}
        if self.case.cache == "dropped":
            # Outside the timed region: the source is read from the disk, not from memory.
            drop_caches()
            rec["source_cache_resident_bytes"] = cache_resident(self.src.served)
        after = (lambda: self.fsync_target(target)) if (
            tool.startswith("qemu-img") and target != "null") else None
        result = report if spec.result == "report" else files + ".out" if spec.result else None
        problems, data = measured(rec, lambda uri: self.argv(tool, target, uri, report), files,
                                  self.timeout, self.server(), result, after=after)
        rec["alloc_gib_per_s"] = round(self.src.alloc / GiB / rec["wall_s"], 4)
        rec["virtual_gib_per_s"] = round(self.size / GiB / rec["wall_s"], 4)
        if spec.result and rec["exit"] == 0:
            rec["engine_report"] = {k: data.get(k) for k in spec.fields}
            problems += [f"{tool}: {k} is {data.get(k)!r}, expected {v!r}"
                         for k, v in spec.expect if data.get(k) != v]
            if rep is None and data.get("digest") != self.src.digest:
                problems.append(f"{tool} digest {data.get('digest')} != image digest "
                                f"{self.src.digest}")
        if rep is None and rec["exit"] == 0:
            problems += self.check_target(rec, target)
        say(self.run_line(self.ctx.record(rec, problems, spec.engine)))
        return rec

    def check_target(self, rec: dict[str, Any], target: str) -> list[str]:
        """The warm-up's target against the raw image (qemu-img compare), and the engine's
        digest against the image's."""
        checks: dict[str, Any] = {}
        problems = []
        if target != "null":
            t = time.perf_counter()
            cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", self.src.image,
                                  self.target_path(target)], capture_output=True, text=True,
                                 check=False)
            output = (cmp.stdout + cmp.stderr).strip()
            checks["qemu_img_compare"] = {"exit": cmp.returncode, "output": output[-500:],
                                          "seconds": round(time.perf_counter() - t, 3)}
            if cmp.returncode != 0:
                problems.append("qemu-img compare: " + output)
        if "engine_report" in rec:
            checks["engine_digest"] = {"expected": self.src.digest,
                                       "reported": rec["engine_report"]["digest"]}
        rec["checks"] = checks
        return problems

    def run_line(self, rec: dict[str, Any]) -> str:
        label = "warm-up" if rec["warmup"] else f"rep {rec['rep'] + 1}/{self.reps}"
        extra = ""
        result = rec.get("engine_report") or {}
        if result.get("seconds") is not None:
            extra = f", engine's own {result['seconds']:.2f} s"
        if result.get("verify_seconds") is not None and result.get("verify_bytes_read") is not None:
            extra += (f" (verify {result['verify_seconds']:.2f} s, read back "
                      f"{result['verify_bytes_read'] / self.src.alloc:.3f} × allocated)")
        if rec["post_sync_s"]:
            extra += f", fsync {rec['post_sync_s']:.2f} s"
        return (f"  {rec['target']:4} {rec['tool']:14} {label:9} {rec['wall_s']:7.2f} s  "
                f"{rec['alloc_gib_per_s']:5.2f} GiB/s  {cost_text(rec)} (server "
                f"{fmt(rec['server_maxrss_mib'], '.0f')}){extra}" + invalid_text(rec["problems"]))


# ---------------------------------------------------------------- summaries

def summarize(bench: Bench, target: str, tools: list[str], resident: int | None
              ) -> dict[str, Any]:
    """Per tool its medians, rates and CPU per allocated GiB; the engine against each peer (and
    checksum against nbdcopy, engine-verify against the engine) rep by rep."""
    alloc, alloc_gib = bench.src.alloc, bench.src.alloc / GiB
    per_tool: dict[str, Any] = {}
    case = bench.case.key
    mine = [r for r in bench.ctx.runs if r["case"] == case and r["target"] == target]
    reps = {t: [r for r in mine if r["tool"] == t and not r["warmup"]] for t in tools}
    for tool in tools:
        runs = reps[tool]
        good = [r for r in runs if r["valid"]]
        warm = [r for r in mine if r["tool"] == tool and r["warmup"]]
        s = rep_stats(runs, warm, alloc_gib, alloc=alloc_gib, virtual=bench.size / GiB)
        checked = [r for r in warm if r.get("checks")]
        s["checked"] = bool(checked and (checked[0]["checks"]))
        if TOOLS[tool].result:
            s["engine_own_seconds_median"] = median(
                [r["engine_report"]["seconds"] for r in good if "engine_report" in r])
        if "verify_seconds" in TOOLS[tool].fields:
            s["verify_seconds_median"] = median(
                [r["engine_report"]["verify_seconds"] for r in good if "engine_report" in r])
            # Every run counts here, the warm-up too: the bar is about each run's read-back.
            read_back = [r["engine_report"]["verify_bytes_read"] for r in runs + warm
                         if r["valid"] and "engine_report" in r]
            s["verify_bytes_read_max"] = max(read_back, default=None)
        if tool.startswith("qemu-img") and target != "null":
            s["post_sync_s_median"] = median([r["post_sync_s"] for r in good])
        per_tool[tool] = s

    def pair(a: str, b: str, f: Any = operator.truediv) -> dict[str, Any] | None:
        """f(wall of a, wall of b) rep by rep; None when a or b was not run."""
        return paired(walls(reps[a]), walls(reps[b]), f) if a in reps and b in reps else None

    # engine ÷ peer throughput: peer wall / engine wall, rep by rep (engine-verify's is its cost).
    ratios = {peer: {"engine_over_peer_median": r["median"], "pairs": r["pairs"]}
              for peer in tools if peer != "engine" and (r := pair(peer, "engine"))}
    # The best peer: the one the engine is least ahead of (or most behind).
    best = min(((p, ratios[p]["engine_over_peer_median"]) for p in PEERS
                if p in ratios and ratios[p]["engine_over_peer_median"] is not None),
               key=lambda x: x[1], default=None)
    summary = {"type": "summary", "scenario": "cold-copy", "case": case,
               "image": bench.case.image, "server": bench.case.server, "cache": bench.case.cache,
               "target": target, "alloc_bytes": alloc, "size": bench.size,
               "image_cache_resident_bytes": resident, "tools": per_tool,
               "throughput_ratio": ratios,
               "best_peer": None if best is None else {"tool": best[0],
                                                       "engine_over_peer_median": best[1]},
               "provenance": bench.ctx.prov}
    # checksum ÷ nbdcopy throughput: nbdcopy wall / checksum wall (the same allocated bytes).
    checksum = pair("nbdcopy", "checksum")
    if checksum is not None:
        summary["checksum_over_nbdcopy"] = checksum
    if "engine-verify" in per_tool:
        v = per_tool["engine-verify"]
        read_back = v["verify_bytes_read_max"]
        summary["verify_cost"] = {
            "wall_ratio": pair("engine-verify", "engine"),
            "extra_s": pair("engine-verify", "engine", operator.sub),
            "verify_seconds_median": v["verify_seconds_median"],
            "verify_bytes_read_max": read_back,
            "verify_bytes_read_over_alloc": None if read_back is None
            else round(read_back / alloc, 4),
        }
    return summary


def table(summaries: list[dict[str, Any]]) -> str:
    head = ("| case | target | tool | median s (min–max) | GiB/s alloc | GiB/s virtual "
            "| engine ÷ tool | CPU-s/GiB client | CPU-s/GiB server | CPU-s/GiB other "
            "| peak RSS MiB client | peak RSS MiB server | check |")
    lines = []
    for s in summaries:
        for tool, t in s["tools"].items():
            if tool == "engine":
                ratio = "1.00" if t["wall_s_median"] else "–"
            else:
                ratio = fmt(s["throughput_ratio"].get(tool, {}).get("engine_over_peer_median"),
                             ".2f")
            med = (f"{t['wall_s_median']:.2f} ({t['wall_s_min']:.2f}–{t['wall_s_max']:.2f})"
                   if t["wall_s_median"] else "–")
            if not t["warmup_valid"] or t["valid_reps"] < t["reps"]:
                check = "FAIL"
            elif not t["checked"]:
                check = "exit 0"  # nothing to compare: nbdcopy, qemu-img to null
            else:
                check = "ok"
            lines.append(
                f"| {s.get('case', PRIMARY)} | {s['target']} | {tool} | {med} | "
                f"{fmt(t['alloc_gib_per_s'], '.2f')} | "
                f"{fmt(t['virtual_gib_per_s'], '.2f')} | {ratio} | "
                f"{fmt(t['client_cpu_s_per_gib'], '.2f')} | "
                f"{fmt(t['server_cpu_s_per_gib'], '.2f')} | "
                f"{fmt(t['other_cpu_s_per_gib'], '.2f')} | "
                f"{fmt(t['peak_rss_mib'], '.0f')} | {fmt(t.get('server_peak_rss_mib'), '.0f')} "
                f"| {check} |")
    return md_table(head, lines)


def best_peer_table(summaries: list[dict[str, Any]]) -> str:
    """Per case and target: engine ÷ each peer, and the best peer (the one the engine is least
    ahead of)."""
    peers = [p for p in PEERS if any(p in s["throughput_ratio"] for s in summaries)]
    head = ("| case | target | " + " | ".join(f"engine ÷ {p}" for p in peers)
            + " | best peer | engine ÷ best peer |")
    lines = []
    for s in summaries:
        cells = [fmt(s["throughput_ratio"].get(p, {}).get("engine_over_peer_median"), ".2f")
                 for p in peers]
        best = s.get("best_peer") or {}
        value = best.get("engine_over_peer_median")
        mark = "" if value is None else (" (ahead)" if value >= 1 else " (**behind**)")
        lines.append(f"| {s.get('case', PRIMARY)} | {s['target']} | {' | '.join(cells)} | "
                     f"{best.get('tool', '–')} | {fmt(value, '.2f')}{mark} |")
    return md_table(head, lines)


def bars(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's bars, on the case they were set for (the mixed image on nbdkit, hot); peak
    RSS on every case."""
    out: list[dict[str, Any]] = []
    for s in summaries:
        if s.get("case", PRIMARY) != PRIMARY:
            continue
        for peer, bar in (("nbdcopy", BAR_NBDCOPY), ("qemu-img", BAR_QEMU_IMG)):
            r = s["throughput_ratio"].get(peer)
            if r is None:
                continue
            v = r["engine_over_peer_median"]
            out.append({"bar": f"{s['target']}: engine ÷ {peer} ≥ {bar:g}", "value": v,
                         "met": v is not None and v >= bar})
        if "checksum_over_nbdcopy" in s:
            v = s["checksum_over_nbdcopy"]["median"]
            out.append({"bar": f"{s['target']}: checksum ÷ nbdcopy ≥ {BAR_CHECKSUM:g}",
                        "value": v, "met": v is not None and v >= BAR_CHECKSUM})
        if "verify_cost" in s:
            v = s["verify_cost"]["verify_bytes_read_over_alloc"]
            out.append({"bar": f"{s['target']}: engine-verify verify_bytes_read ÷ allocated ≤ "
                               f"{BAR_VERIFY_READ:g}", "value": v, "format": ".3f",
                        "met": v is not None and v <= BAR_VERIFY_READ})
    # Every engine command counts: copy, copy --verify and checksum are all the engine.
    rss = [t["peak_rss_mib"] for s in summaries for name, t in s["tools"].items()
           if TOOLS[name].engine and t["peak_rss_mib"] is not None]
    if rss:
        out.append({"bar": f"engine peak RSS ≤ {BAR_RSS_MIB} MiB", "value": max(rss),
                    "met": max(rss) <= BAR_RSS_MIB})
    return out


# ---------------------------------------------------------------- the scenario

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = parser(NAME, "Copy a synthetic disk served by nbdkit or qemu-nbd with the engine (also "
                     "with --verify), nbdcopy and qemu-img convert (each at its defaults and "
                     "tuned), to null:, a file and a loop device, and checksum it with the "
                     "engine; print a table of medians.",
               f"256 MiB images, 1 rep, cases {','.join(QUICK_CASES)}",
               "the images, targets and sockets")
    p.add_argument("--size", type=parse_size, help="image size (default 4G; 256M with --quick)")
    p.add_argument("--seed", type=int, default=1, help="image seed (default 1)")
    p.add_argument("--cases", help="comma-separated IMAGE/SERVER[/CACHE]: IMAGE mixed or random, "
                                   "SERVER nbdkit or qemu-nbd, CACHE hot (default) or dropped "
                                   f"(default {','.join(DEFAULT_CASES)}; with --quick "
                                   f"{','.join(QUICK_CASES)}); the issue's bars are about "
                                   f"{PRIMARY}")
    p.add_argument("--reps", type=int, help=f"timed runs per tool and target in {PRIMARY} (or, "
                                            "when it is not run, the first case), after one "
                                            "warm-up (default 5; 1 with --quick)")
    p.add_argument("--reps-rest", type=int, help="the same in the other cases (default 3; 1 with "
                                                 "--quick)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="comma-separated, of null,file,loop (default all)")
    p.add_argument("--dropped-targets", default="null",
                   help="the targets of the cases with the cache dropped, comma-separated "
                        "(default null: the read side is what the cache changes)")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help=f"comma-separated, of {','.join(TOOLS)} (default all; engine-verify runs "
                        "to file and loop only, checksum to null only)")
    a = p.parse_args(argv)
    defaults(a, size=(DEFAULT_SIZE, QUICK_SIZE), reps=(5, 1), reps_rest=(3, 1))
    try:
        a.cases = [Case.parse(c) for c in
                   (a.cases.split(",") if a.cases else QUICK_CASES if a.quick else DEFAULT_CASES)
                   if c]
    except ValueError as e:
        p.error(str(e))
    if not a.cases or len({c.key for c in a.cases}) != len(a.cases):
        p.error("--cases must name at least one case, each once")
    a.targets = [t for t in a.targets.split(",") if t]
    a.dropped_targets = [t for t in a.dropped_targets.split(",") if t]
    a.tools = [t for t in a.tools.split(",") if t]
    bad = ([t for t in a.targets + a.dropped_targets if t not in TARGETS]
           + [t for t in a.tools if t not in TOOLS])
    if bad:
        p.error(f"unknown target or tool: {', '.join(bad)}")
    if not any(t in TOOLS[tool].targets for t in a.targets for tool in a.tools):
        p.error("none of the tools runs to any of the targets (engine-verify: file, loop; "
                "checksum: null)")
    if a.reps < 1 or a.reps_rest < 1 or a.size < MiB or a.size % (64 << 10):
        p.error("--reps and --reps-rest must be at least 1 and --size a multiple of 64K, at "
                "least 1M")
    a.tools = [t for t in TOOLS if t in a.tools]  # interleave in the canonical order
    return a


def case_targets(a: argparse.Namespace, case: Case) -> list[str]:
    """The targets a case runs to: --targets, and of them only --dropped-targets when the
    cache is dropped."""
    if case.cache == "dropped":
        return [t for t in a.targets if t in a.dropped_targets]
    return list(a.targets)


def reproduce_command(a: argparse.Namespace) -> str:
    return reproduce(NAME, "--size", size_text(a.size), "--seed", str(a.seed),
                     "--cases", ",".join(c.key for c in a.cases), "--reps", str(a.reps),
                     "--reps-rest", str(a.reps_rest), "--targets", ",".join(a.targets),
                     "--dropped-targets", ",".join(a.dropped_targets), "--tools", ",".join(a.tools))


def preflight(a: argparse.Namespace) -> list[str]:
    need = ["nbdkit", "qemu-img"] + (["nbdcopy"] if any(t.startswith("nbdcopy") for t in a.tools)
                                     else [])
    if any(c.server == "qemu-nbd" for c in a.cases):
        need.append("qemu-nbd")
    missing = []
    if any("loop" in case_targets(a, c) for c in a.cases):
        need += ["losetup", "blkdiscard"]
        if os.geteuid() != 0:
            missing.append("root (for the loop device)")
    return missing + missing_programs(*need, engine=any(TOOLS[t].engine for t in a.tools))


def source(workdir: str, case: Case, a: argparse.Namespace, metas: dict[str, Any]) -> Source:
    """The case's image (made, or reused within the run), ready to serve."""
    image, meta = prepare_image(workdir, a, case.image)
    metas[case.image] = meta
    served = prepare_qcow2(image) if case.server == "qemu-nbd" else image
    return Source(image, served, meta["alloc_bytes"], meta["digest"])


def notes(s: dict[str, Any]) -> list[str]:
    """Below the table, per case and target: the engine's own seconds, checksum ÷ nbdcopy, what
    --verify costs, qemu-img's fsync."""
    where = f"{s.get('case', PRIMARY)} → {s['target']}"
    out = []
    own = [f"{name} {t['engine_own_seconds_median']:.2f} s of {t['wall_s_median']:.2f} s"
           for name, t in s["tools"].items() if t.get("engine_own_seconds_median")]
    if own:
        out.append(f"{where}: the engine's own reported seconds (without interpreter start) "
                   f"against wall, medians: {'; '.join(own)}")
    c = s.get("checksum_over_nbdcopy")
    if c is not None and c["median"] is not None:
        t = s["tools"]["checksum"]
        out.append(f"{where}: checksum ÷ nbdcopy throughput (nbdcopy wall / checksum wall per "
                   f"rep): median {c['median']:.2f}, pairs "
                   f"{', '.join(f'{x:.2f}' for x in c['pairs'])}; checksum "
                   f"{fmt(t['alloc_gib_per_s'], '.2f')} GiB/s alloc")
    v = s.get("verify_cost")
    if v is not None:
        ratio, extra = v["wall_ratio"], v["extra_s"]
        cost = ("no plain engine runs to compare with" if ratio is None
                else f"costs {fmt(ratio['median'], '.2f')} × the plain copy's wall, "
                     f"+{fmt(extra['median'], '.2f')} s (medians of per-rep pairs)")
        read = v["verify_bytes_read_max"]
        out.append(f"{where}: copy --verify {cost}; its own verify_seconds median "
                   f"{fmt(v['verify_seconds_median'], '.2f')} s; read back "
                   f"{fmt(read and read / GiB, '.3f')} GiB = "
                   f"{fmt(v['verify_bytes_read_over_alloc'], '.3f')} × allocated (max)")
    for name in ("qemu-img", "qemu-img-tuned"):
        q = s["tools"].get(name, {})
        if q.get("post_sync_s_median") is not None:
            out.append(f"{where}: {name}'s wall includes our fsync of the target, median "
                       f"{q['post_sync_s_median']:.2f} s")
    return out


def run_case(bench: Bench) -> list[dict[str, Any]]:
    """Every target of the case: a warm-up per tool, then the reps interleaved; a summary per
    target (emitted and returned)."""
    a, case, src = bench.ctx.a, bench.case, bench.src
    if case.cache == "dropped":
        state = "dropped before every run"
    else:
        t = time.perf_counter()
        warm_cache(src.served)
        state = f"hot ({time.perf_counter() - t:.1f} s to read it in)"
    say(f"case {case.key}: {os.path.basename(src.served)} on {case.server}, "
        f"{src.alloc / MiB:.0f} MiB of {a.size / MiB:.0f} MiB allocated; cache "
        f"{state}; fincore: {resident_text(src.served)} resident")
    summaries = []
    for target in case_targets(a, case):
        tools = [t for t in a.tools if target in TOOLS[t].targets]
        if not tools:
            say(f"  target {target}: none of the tools runs to it; skipped")
            continue
        if case.cache == "hot":
            # Again before every target: the previous target's writes and the
            # warm-up's compare (another 4 GiB file) may have pushed it out.
            warm_cache(src.served)
        resident = cache_resident(src.served)
        say(f"  target {target}: warm-up and check, then {bench.reps} interleaved reps "
            f"of {', '.join(tools)}")
        for rep in (None, *range(bench.reps)):
            for tool in tools:
                bench.run(tool, target, rep)
        if target == "file" and os.path.exists(bench.file_target):
            os.unlink(bench.file_target)
        s = summarize(bench, target, tools, resident)
        bench.ctx.emit(s)
        summaries.append(s)
    return summaries


def run(ctx: Context) -> Outcome:
    a = ctx.a
    metas: dict[str, Any] = {}
    # The images first, so the provenance names them all and no run waits on a make.
    sources = {c.key: source(ctx.workdir, c, a, metas) for c in a.cases}
    first = metas.get("mixed") or next(iter(metas.values()))
    prov = ctx.prov = provenance(
        ctx.workdir, image_info(first), images={k: image_info(m) for k, m in metas.items()},
        qemu_nbd=cmd_output(["qemu-nbd", "--version"]).splitlines()[0],
        cache=", ".join(f"{c.key}: {c.cache}" for c in a.cases),
        tuned={"nbdcopy-tuned": " ".join(NBDCOPY_TUNED),
               "qemu-img-tuned": " ".join(QEMU_IMG_TUNED)})
    say_engine(prov, "nbdcopy", "qemu_img", "nbdkit", "qemu_nbd")
    summaries: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    # The case that gets --reps (the others --reps-rest): the one the issue's bars are about
    # when it is run, else the first listed.
    main_case = PRIMARY if PRIMARY in sources else a.cases[0].key
    with (LoopDevice(os.path.join(ctx.workdir, "loop-backing.img"), a.size)
          if any("loop" in case_targets(a, c) for c in a.cases)
          else contextlib.nullcontext()) as loop:
        for case in a.cases:
            if case.cache == "dropped":
                try:
                    drop_caches()
                except OSError as e:
                    why = f"the page cache cannot be dropped here ({e.strerror})"
                    say(f"case {case.key}: skipped: {why}")
                    skipped.append({"case": case.key, "why": why})
                    continue
            reps = a.reps if case.key == main_case else a.reps_rest
            summaries += run_case(Bench(ctx, case, sources[case.key], reps, loop))
    best = [{"case": s["case"], "target": s["target"], **s["best_peer"]}
            for s in summaries if s.get("best_peer")]
    text = [f"cold-copy: {size_text(a.size)} images, seed {a.seed}, cases "
            f"{', '.join(c.key for c in a.cases)}; {a.reps} reps in {main_case}, "
            f"{a.reps_rest} in the others, after a warm-up; engine {prov['engine_commit']}", "",
            table(summaries), "",
            "GiB/s alloc: allocated (non-hole, of the raw image) GiB / median wall s; engine ÷ "
            "tool: median of per-rep ratios tool wall / engine wall (> 1: engine faster); "
            "CPU-s/GiB per allocated GiB, medians; server = nbdkit or qemu-nbd; other = the "
            "rest of the machine meanwhile (kernel writeback and loop workers, and anyone "
            "else's processes)."]
    text += [f"  {n}" for s in summaries for n in notes(s)]
    text += ["", best_peer_table(summaries), ""]
    text += [f"  skipped {sk['case']}: {sk['why']}" for sk in skipped]
    return Outcome(bars(summaries), text, {"best_peer": best, "skipped": skipped})


# ---------------------------------------------------------------- the report

def report_table(run: Run) -> str:
    return table(summaries_of(run))


def report_notes(run: Run) -> list[str]:
    summaries = summaries_of(run)
    out = [f"- {n}" for s in summaries for n in notes(s)]
    if any(s.get("best_peer") for s in summaries):
        out += ["", ("The engine against each peer, per case and target (median of per-rep "
                     "`peer wall ÷ engine wall`; the best peer is the one the engine is least "
                     "ahead of):"), "", best_peer_table(summaries)]
    for sk in (run.verdict or {}).get("skipped") or []:
        out.append(f"- skipped {sk.get('case')}: {sk.get('why')}")
    return out


def best_peer_rows(run: Run) -> list[tuple[str, str, float | None]]:
    """Per case and target, the fastest of nbdcopy, qemu-img and their tuned runs."""
    return [(f"{b['case']} → {b['target']}", b["tool"], b.get("engine_over_peer_median"))
            for b in (run.verdict or {}).get("best_peer") or []]


def plot(run: Run, png: str) -> None:
    """A panel per case: throughput (allocated GiB/s of the median wall, min–max as whiskers)
    per target, the engine and its peers side by side; engine ÷ peer above each peer's bar."""
    plt = pyplot()
    summaries = run.of_type("summary")
    cases = list(dict.fromkeys(s.get("case", PRIMARY) for s in summaries))
    tools = [t for t in TOOLS if any(t in s["tools"] for s in summaries)]
    fig, axes = plt.subplots(len(cases), 1, figsize=(11, 1.2 + 3.0 * len(cases)), squeeze=False)
    for ax, case in zip(axes[:, 0], cases):
        mine = [s for s in summaries if s.get("case", PRIMARY) == case]

        def value(s: dict[str, Any], tool: str) -> tuple[float, float, float, str] | None:
            t = s["tools"].get(tool)
            if not t or not t.get("wall_s_median"):
                return None
            alloc = s["alloc_bytes"] / GiB
            y = alloc / t["wall_s_median"]
            r = s["throughput_ratio"].get(tool, {}).get("engine_over_peer_median")
            return (y, y - alloc / t["wall_s_max"], alloc / t["wall_s_min"] - y,
                    "" if tool == "engine" or r is None else f"{r:.2f}")

        bar_groups(ax, mine, tools, value, plt.get_cmap("tab10"), capsize=2, fontsize=6)
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
    save(plt, fig, png, title(run, f"{size:g} GiB images, whole-disk copy, a panel per "
                                   "image/server/cache"))
