"""cold-copy: the engine against nbdcopy and qemu-img convert, copying a whole disk from nbdkit.

A synthetic image (transfer.demo.synth, reproducible from a seed: random data, text-like data,
zero-filled allocated blocks and holes, half of it allocated) is served read-only by nbdkit's
file plugin on a unix socket, with the image hot in the page cache. Each tool copies it to
`null:`, a regular file and a loop device, ending with the data durable (or, for checksum, reads
and hashes it):

  engine         transfer copy URI TARGET --progress=none --report R   (hashing always on; flushes)
  engine-verify  the same with --verify: then reads the target back and compares (file, loop)
  checksum       transfer checksum URI --json --progress=none            (null only: no target)
  nbdcopy        nbdcopy --flush URI TARGET                              (its defaults)
  qemu-img       qemu-img convert -n -f raw -O raw URI TARGET, then fsync(TARGET) inside the
                 timed region (qemu-img convert never flushes); to null: a null-co target instead

Every run is a child process timed from spawn to reaping (os.wait4 gives its CPU, GNU time its
peak RSS) against a fresh nbdkit (its CPU read from /proc before it stops). One warm-up run per tool and
target, checked for correctness (qemu-img compare, and the engine's digest against one computed
here), then --reps runs interleaved engine, engine-verify, checksum, nbdcopy, qemu-img, engine, ...
Results are JSON lines (one per run, one summary per target, one verdict) and a markdown table on
stdout. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import hashlib
import json
import os
import platform
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from transfer.cli import parse_size
from transfer.demo import file_digest
from transfer.demo.servers import Nbdkit, QemuNbd, Server
from transfer.demo.synth import make_image

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / ".venv" / "bin" / "transfer"
TIME = "/usr/bin/time"  # GNU time, for each tool's own peak RSS (see Bench._spawn_and_reap)
GiB = 1 << 30
MiB = 1 << 20
TARGETS = ("null", "file", "loop")
IMAGES = ("mixed", "random")  # half allocated, of every kind of block; all random data
SERVERS = ("nbdkit", "qemu-nbd")  # nbdkit's file plugin on the raw image; qemu-nbd on a qcow2 copy
CACHES = ("hot", "dropped")
# A case: an image, the server in front of it and the page cache's state. The first one listed
# is the one the issue's bars are about ("the 4 GiB bench image on nbdkit").
DEFAULT_CASES = ("mixed/nbdkit/hot", "mixed/qemu-nbd/hot", "random/nbdkit/hot",
                 "random/qemu-nbd/hot", "mixed/nbdkit/dropped")
QUICK_CASES = ("mixed/nbdkit/hot", "random/qemu-nbd/dropped")
PRIMARY = "mixed/nbdkit/hot"
QUICK_SIZE = 256 * MiB
DEFAULT_SIZE = 4 * GiB
ALLOCATED = 0.5
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
    engine: bool = False        # an engine command (.venv/bin/transfer): its fingerprint is recorded
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
CLK_TCK = os.sysconf("SC_CLK_TCK")


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
    size: int
    alloc: int
    digest: str
    info: dict[str, Any]


class Invalid(Exception):
    """A run whose result cannot be trusted (a tool failed, or a correctness check did)."""


# ---------------------------------------------------------------- small helpers

def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _size_text(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _cmd_output(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"
    return (out.stdout or out.stderr).strip()


def allocated_bytes(path: str) -> int:
    """Bytes of the file that are not holes, from SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = total = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            total += hole - data
            pos = hole
        return total
    finally:
        os.close(fd)


def warm_cache(path: str) -> None:
    """Read the whole file once so the page cache holds it (cat path > /dev/null)."""
    buf = bytearray(4 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def cache_resident(path: str) -> int | None:
    """Bytes of path in the page cache (fincore), or None when fincore is missing."""
    if not shutil.which("fincore"):
        return None
    out = _cmd_output(["fincore", "--bytes", "--noheadings", "--output", "RES", path])
    try:
        return int(out.split()[0])
    except (ValueError, IndexError):
        return None


def drop_caches() -> None:
    """Write back dirty pages, then drop the clean page cache, dentries and inodes (root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def proc_peak_rss_mib(pid: int) -> float | None:
    """A live process's peak resident memory (VmHWM), from /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU of a live process, all its threads (also exited ones), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_quiet(limit: float = 30.0, sample: float = 0.25, busy_max: float = 0.15) -> float:
    """Wait (up to limit seconds) until the machine is idle: under busy_max of one CPU busy over
    a sample. Other people's work on a shared machine is the main source of noise. Returns the
    seconds waited beyond the first sample. BENCH_IDLE_WAIT_MAX (seconds) overrides limit: the
    test suite's smoke runs set it to 0, since their timings are never looked at."""
    limit = float(os.environ.get("BENCH_IDLE_WAIT_MAX", limit))
    t0 = time.perf_counter()
    while True:
        b0 = machine_busy_seconds()
        time.sleep(sample)
        if (machine_busy_seconds() - b0) / sample <= busy_max:
            break
        if time.perf_counter() - t0 > limit:
            break
    return max(0.0, time.perf_counter() - t0 - sample)


def engine_fingerprint() -> str:
    """sha256 over the engine's sources and built modules, to notice edits during a run."""
    h = hashlib.sha256()
    for base in ("transfer", "native"):
        for p in sorted((ROOT / base).rglob("*")):
            if "__pycache__" in p.parts or not p.is_file():
                continue
            h.update(str(p.relative_to(ROOT)).encode() + b"\0")
            try:
                h.update(p.read_bytes())
            except OSError:
                pass
    return h.hexdigest()[:16]


def engine_commit() -> str:
    commit = _cmd_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    # Dirty means the engine's own files differ from HEAD (bench/ itself is not counted).
    # --no-optional-locks: never write the index while others work in the tree.
    status = _cmd_output(["git", "--no-optional-locks", "-C", str(ROOT), "status", "--porcelain",
                          "--", "transfer", "native", "setup.py", "pyproject.toml"])
    return commit + ("-dirty" if status else "")


def provenance(image: dict[str, Any], workdir: str) -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "engine_commit": engine_commit(),
        "engine_fingerprint": engine_fingerprint(),
        "nbdcopy": "; ".join(_cmd_output(["nbdcopy", "--version"]).splitlines()),
        "qemu_img": _cmd_output(["qemu-img", "--version"]).splitlines()[0],
        "nbdkit": _cmd_output(["nbdkit", "--version"]),
        "kernel": platform.release(),
        "cpu_model": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "mem_total_bytes": mem,
        "python": platform.python_version(),
        "workdir_fs": _cmd_output(["stat", "-f", "-c", "%T", workdir]),
        "cache": "hot",
        "image": image,
    }


# ---------------------------------------------------------------- the loop device

class LoopDevice:
    """A loop device over a sparse backing file, attached by us and detached by its own path."""

    def __init__(self, backing: str, size: int) -> None:
        self.backing = os.path.realpath(backing)
        self.size = size
        self.dev: str | None = None

    def attach(self) -> str:
        with open(self.backing, "wb") as f:
            f.truncate(self.size)
        out = subprocess.run(["losetup", "-f", "--show", self.backing], capture_output=True,
                             text=True, check=True)
        self.dev = out.stdout.strip()
        return self.dev

    def reset(self) -> None:
        """Every run starts from the same state: the device discarded (reads zeroes, all holes)."""
        assert self.dev is not None
        subprocess.run(["blkdiscard", self.dev], check=True, capture_output=True)

    def detach(self) -> None:
        if self.dev is None:
            return
        name = os.path.basename(self.dev)
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                ours = os.path.realpath(f.read().strip()) == self.backing
        except OSError:
            ours = False
        if ours:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True, check=False)
        self.dev = None


# ---------------------------------------------------------------- one child process

def spawn_and_reap(argv: list[str], stdout: str, log: str, rss_file: str, timeout: float,
                   env: dict[str, str] | None = None) -> tuple[int, Any, bool, int | None]:
    """Run argv under GNU time as our child, its stdout to one file and stderr to another;
    return (exit code, rusage, timed out, peak RSS).

    CPU comes from os.wait4 on time(1), which includes its reaped child, the tool (time's
    own share is about a millisecond). Peak RSS comes from time's %M, not from wait4: a
    child spawned straight from this process inherits our (large) high-water mark, since
    exec records the old address space's peak and subprocess uses vfork, whereas time(1)
    forks the tool from its own ~1 MiB. env: the child's environment (None: ours).
    """
    timed_out = False
    wrapped = [TIME, "-f", "%M", "-o", rss_file, *argv]
    with open(stdout, "wb") as outf, open(log, "wb") as logf:
        proc = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=outf, stderr=logf,
                                env=env)
    try:
        pidfd = os.pidfd_open(proc.pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(int(timeout * 1000)):
                timed_out = True
                proc.kill()  # our own child, not yet reaped: its pid is still ours
        finally:
            os.close(pidfd)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            _, status, _ = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        raise
    maxrss = None
    try:
        with open(rss_file) as f:
            maxrss = int(f.read().split()[-1])  # KiB; a line before it tells a failure
    except (OSError, ValueError, IndexError):
        pass
    return proc.returncode, usage, timed_out, maxrss


# ---------------------------------------------------------------- one run

class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str, size: int,
                 prov: dict[str, Any], out: TextIO) -> None:
        self.args = args
        self.workdir = workdir
        self.size = size
        self.prov = prov
        self.out = out
        self.sock = os.path.join(workdir, "nbd.sock")
        self.file_target = os.path.join(workdir, "target.img")
        self.loop: LoopDevice | None = None
        self.timeout = max(120.0, 60.0 * size / GiB)
        self.runs: list[dict[str, Any]] = []
        self.case = Case("mixed", "nbdkit")
        self.src: Source | None = None
        self.reps = args.reps

    def use(self, case: Case, src: Source, reps: int) -> None:
        """The case the next runs are of."""
        self.case, self.src, self.reps = case, src, reps

    @property
    def image(self) -> str:
        assert self.src is not None
        return self.src.image

    @property
    def alloc(self) -> int:
        assert self.src is not None
        return self.src.alloc

    @property
    def ref_digest(self) -> str:
        assert self.src is not None
        return self.src.digest

    def server(self) -> Server:
        """A fresh server for one run: nbdkit's file plugin on the raw image, or qemu-nbd on
        its qcow2 copy (--shared=0: any number of clients, so every tool gets the connections
        it asks for; read-only, so it advertises multi-conn)."""
        assert self.src is not None
        if self.case.server == "nbdkit":
            return Nbdkit(self.sock, "file", self.src.served, readonly=True)
        return QemuNbd(self.sock, self.src.served, fmt="qcow2", readonly=True,
                       options=["--shared=0"])

    def emit(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record, sort_keys=True) + "\n")
        self.out.flush()

    def target_path(self, target: str) -> str:
        if target == "null":
            return "null:"
        if target == "file":
            return self.file_target
        assert self.loop is not None and self.loop.dev is not None
        return self.loop.dev

    def prepare(self, target: str) -> None:
        """The same starting state for every tool: an empty sparse file, or a discarded device."""
        if target == "file":
            try:
                os.unlink(self.file_target)
            except FileNotFoundError:
                pass
            fd = os.open(self.file_target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, self.size)
            finally:
                os.close(fd)
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

    def _spawn_and_reap(self, argv: list[str], stdout: str, log: str
                        ) -> tuple[int, Any, bool, int | None]:
        return spawn_and_reap(argv, stdout, log, os.path.join(self.workdir, "maxrss.txt"),
                              self.timeout)

    def run(self, tool: str, target: str, rep: int | None) -> dict[str, Any]:
        """One timed run; rep None is the warm-up, which is also checked for correctness."""
        spec = TOOLS[tool]
        warmup = rep is None
        label = "warm-up" if warmup else f"rep {rep + 1}/{self.reps}"
        report = os.path.join(self.workdir, "report.json")
        stdout = os.path.join(self.workdir, "child.out")
        log = os.path.join(self.workdir, "child.log")
        if os.path.exists(report):
            os.unlink(report)
        self.prepare(target)
        rec: dict[str, Any] = {"type": "run", "scenario": "cold-copy", "case": self.case.key,
                               "image": self.case.image, "server": self.case.server,
                               "cache": self.case.cache, "target": target, "tool": tool,
                               "rep": rep, "warmup": warmup}
        post_sync = 0.0
        if self.case.cache == "dropped":
            # Outside the timed region: the source is read from the disk, not from memory.
            assert self.src is not None
            drop_caches()
            rec["source_cache_resident_bytes"] = cache_resident(self.src.served)
        with self.server() as server:
            argv = self.argv(tool, target, server.uri, report)
            idle_wait = wait_quiet()
            with open("/proc/loadavg") as f:
                rec["loadavg_before"] = f.read().split()[0]
            server_cpu0 = proc_cpu_seconds(server.pid)
            busy0 = machine_busy_seconds()
            t0 = time.perf_counter()
            code, usage, timed_out, maxrss_kib = self._spawn_and_reap(argv, stdout, log)
            if tool.startswith("qemu-img") and target != "null" and code == 0:
                # qemu-img convert never flushes: make its data durable inside the timed region,
                # as nbdcopy --flush and the engine do.
                s0 = time.perf_counter()
                fd = os.open(self.target_path(target), os.O_WRONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                post_sync = time.perf_counter() - s0
            wall = time.perf_counter() - t0
            server_cpu = proc_cpu_seconds(server.pid) - server_cpu0
            busy = machine_busy_seconds() - busy0
            server_rss = proc_peak_rss_mib(server.pid)  # a fresh server: this run's own peak
        rec.update({
            "argv": argv, "exit": code, "timed_out": timed_out, "wall_s": round(wall, 6),
            "post_sync_s": round(post_sync, 6),
            "client_user_s": round(usage.ru_utime, 6), "client_sys_s": round(usage.ru_stime, 6),
            "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 6),
            "client_maxrss_mib": None if maxrss_kib is None else round(maxrss_kib / 1024, 1),
            "server_cpu_s": round(server_cpu, 3), "server_maxrss_mib": server_rss,
            # Everything else the machine did meanwhile: kernel threads working for the copy
            # (writeback, the loop device's workers) and other people's processes.
            "machine_busy_cpu_s": round(busy, 3),
            "other_cpu_s": round(busy - usage.ru_utime - usage.ru_stime - server_cpu, 3),
            "idle_wait_s": round(idle_wait, 2),
            "alloc_gib_per_s": round(self.alloc / GiB / wall, 4),
            "virtual_gib_per_s": round(self.size / GiB / wall, 4),
        })
        problems: list[str] = []
        if code != 0:
            tail = b""
            for path in (stdout, log):
                with open(path, "rb") as f:
                    tail += f.read()[-2000:]
            rec["output_tail"] = tail.decode(errors="replace")
            problems.append(f"exit {code}" + (" (timed out)" if timed_out else ""))
        if spec.engine:
            rec["engine_fingerprint"] = engine_fingerprint()
        if spec.result and code == 0:
            try:
                with open(report if spec.result == "report" else stdout) as f:
                    rep_data = json.load(f)
            except (OSError, ValueError) as e:
                rep_data = {}
                problems.append(f"{tool}: no JSON result ({e})")
            # engine_report: the engine's own JSON result (the copy report, or checksum's stdout).
            rec["engine_report"] = {k: rep_data.get(k) for k in spec.fields}
            problems += [f"{tool}: {k} is {rep_data.get(k)!r}, expected {v!r}"
                         for k, v in spec.expect if rep_data.get(k) != v]
            if warmup and rep_data.get("digest") != self.ref_digest:
                problems.append(f"{tool} digest {rep_data.get('digest')} != image digest "
                                f"{self.ref_digest}")
        if warmup and code == 0:
            checks: dict[str, Any] = {}
            if target != "null":
                t = time.perf_counter()
                cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", self.image,
                                      self.target_path(target)], capture_output=True, text=True,
                                     check=False)
                checks["qemu_img_compare"] = {"exit": cmp.returncode,
                                              "output": (cmp.stdout + cmp.stderr).strip()[-500:],
                                              "seconds": round(time.perf_counter() - t, 3)}
                if cmp.returncode != 0:
                    problems.append("qemu-img compare: " + (cmp.stdout + cmp.stderr).strip())
            if "engine_report" in rec:
                checks["engine_digest"] = {"expected": self.ref_digest,
                                           "reported": rec["engine_report"]["digest"]}
            rec["checks"] = checks
        rec["valid"] = not problems
        rec["problems"] = problems
        rec["provenance"] = self.prov
        self.emit(rec)
        self.runs.append(rec)
        extra = ""
        result = rec.get("engine_report") or {}
        if result.get("seconds") is not None:
            extra = f", engine's own {result['seconds']:.2f} s"
        if result.get("verify_seconds") is not None and result.get("verify_bytes_read") is not None:
            extra += (f" (verify {result['verify_seconds']:.2f} s, read back "
                      f"{result['verify_bytes_read'] / self.alloc:.3f} × allocated)")
        if post_sync:
            extra += f", fsync {post_sync:.2f} s"
        _say(f"  {target:4} {tool:14} {label:9} {wall:7.2f} s  {rec['alloc_gib_per_s']:5.2f} GiB/s  "
             f"cpu {rec['client_cpu_s']:5.2f} + server {server_cpu:5.2f} + other "
             f"{rec['other_cpu_s']:5.2f} s  "
             f"rss {_fmt(rec['client_maxrss_mib'], '6.1f')} MiB (server "
             f"{_fmt(server_rss, '.0f')}){extra}"
             + ("" if not problems else "  INVALID: " + "; ".join(problems)))
        return rec


# ---------------------------------------------------------------- summaries

def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _paired(reps: dict[str, list[dict[str, Any]]], a: str, b: str,
            f: Callable[[float, float], float]) -> dict[str, Any] | None:
    """f(wall of a, wall of b) pair by pair (rep i of a against rep i of b, both valid): the
    median and every pair; None when a or b was not run."""
    if a not in reps or b not in reps:
        return None
    walls_b = {r["rep"]: r["wall_s"] for r in reps[b] if r["valid"]}
    pairs = [f(r["wall_s"], walls_b[r["rep"]]) for r in reps[a]
             if r["valid"] and r["rep"] in walls_b]
    return {"median": round(statistics.median(pairs), 4) if pairs else None,
            "pairs": [round(x, 4) for x in pairs]}


def _ratio(x: float, y: float) -> float:
    return x / y


def _difference(x: float, y: float) -> float:
    return x - y


def summarize(bench: Bench, target: str, tools: list[str], resident: int | None
              ) -> dict[str, Any]:
    alloc_gib = bench.alloc / GiB
    per_tool: dict[str, Any] = {}
    case = bench.case.key
    mine = [r for r in bench.runs if r["case"] == case and r["target"] == target]
    reps = {t: [r for r in mine if r["tool"] == t and not r["warmup"]] for t in tools}
    for tool in tools:
        runs = reps[tool]
        good = [r for r in runs if r["valid"]]
        walls = [r["wall_s"] for r in good]
        med = _median(walls)
        cpu = _median([r["client_cpu_s"] for r in good])
        srv = _median([r["server_cpu_s"] for r in good])
        other = _median([r["other_cpu_s"] for r in good])
        warm = [r for r in mine if r["tool"] == tool and r["warmup"]]
        checked = [r for r in warm if r.get("checks")]
        s: dict[str, Any] = {
            "reps": len(runs), "valid_reps": len(good),
            "warmup_valid": all(r["valid"] for r in warm) and bool(warm),
            "checked": bool(checked and (checked[0]["checks"])),
            "wall_s_median": med, "wall_s_min": min(walls) if walls else None,
            "wall_s_max": max(walls) if walls else None,
            "alloc_gib_per_s": round(alloc_gib / med, 4) if med else None,
            "virtual_gib_per_s": round(bench.size / GiB / med, 4) if med else None,
            "client_cpu_s_per_gib": round(cpu / alloc_gib, 4) if cpu is not None else None,
            "server_cpu_s_per_gib": round(srv / alloc_gib, 4) if srv is not None else None,
            "other_cpu_s_per_gib": round(other / alloc_gib, 4) if other is not None else None,
            "peak_rss_mib": max((r["client_maxrss_mib"] for r in runs + warm
                                 if r["client_maxrss_mib"] is not None), default=None),
            "server_peak_rss_mib": max((r["server_maxrss_mib"] for r in runs + warm
                                        if r.get("server_maxrss_mib") is not None), default=None),
        }
        if TOOLS[tool].result:
            s["engine_own_seconds_median"] = _median(
                [r["engine_report"]["seconds"] for r in good if "engine_report" in r])
        if "verify_seconds" in TOOLS[tool].fields:
            s["verify_seconds_median"] = _median(
                [r["engine_report"]["verify_seconds"] for r in good if "engine_report" in r])
            # Every run counts here, the warm-up too: the bar is about each run's read-back.
            read_back = [r["engine_report"]["verify_bytes_read"] for r in runs + warm
                         if r["valid"] and "engine_report" in r]
            s["verify_bytes_read_max"] = max(read_back, default=None)
        if tool.startswith("qemu-img") and target != "null":
            s["post_sync_s_median"] = _median([r["post_sync_s"] for r in good])
        per_tool[tool] = s
    # engine ÷ peer throughput: peer wall / engine wall, rep by rep (engine-verify's is its cost).
    ratios: dict[str, Any] = {}
    for peer in tools:
        r = _paired(reps, peer, "engine", _ratio) if peer != "engine" else None
        if r is not None:
            ratios[peer] = {"engine_over_peer_median": r["median"], "pairs": r["pairs"]}
    # The best peer: the one the engine is least ahead of (or most behind).
    best = min(((p, ratios[p]["engine_over_peer_median"]) for p in PEERS
                if p in ratios and ratios[p]["engine_over_peer_median"] is not None),
               key=lambda x: x[1], default=None)
    summary = {"type": "summary", "scenario": "cold-copy", "case": case,
               "image": bench.case.image, "server": bench.case.server, "cache": bench.case.cache,
               "target": target, "alloc_bytes": bench.alloc, "size": bench.size,
               "image_cache_resident_bytes": resident, "tools": per_tool,
               "throughput_ratio": ratios,
               "best_peer": None if best is None else {"tool": best[0],
                                                       "engine_over_peer_median": best[1]},
               "provenance": bench.prov}
    # checksum ÷ nbdcopy throughput: nbdcopy wall / checksum wall (the same allocated bytes).
    checksum = _paired(reps, "nbdcopy", "checksum", _ratio)
    if checksum is not None:
        summary["checksum_over_nbdcopy"] = checksum
    if "engine-verify" in per_tool:
        v = per_tool["engine-verify"]
        read_back = v["verify_bytes_read_max"]
        summary["verify_cost"] = {
            "wall_ratio": _paired(reps, "engine-verify", "engine", _ratio),
            "extra_s": _paired(reps, "engine-verify", "engine", _difference),
            "verify_seconds_median": v["verify_seconds_median"],
            "verify_bytes_read_max": read_back,
            "verify_bytes_read_over_alloc": None if read_back is None
            else round(read_back / bench.alloc, 4),
        }
    return summary


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def table(summaries: list[dict[str, Any]]) -> str:
    head = ("| case | target | tool | median s (min–max) | GiB/s alloc | GiB/s virtual "
            "| engine ÷ tool | CPU-s/GiB client | CPU-s/GiB server | CPU-s/GiB other "
            "| peak RSS MiB client | peak RSS MiB server | check |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for s in summaries:
        for tool, t in s["tools"].items():
            if tool == "engine":
                ratio = "1.00" if t["wall_s_median"] else "–"
            else:
                ratio = _fmt(s["throughput_ratio"].get(tool, {}).get("engine_over_peer_median"),
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
                f"{_fmt(t['alloc_gib_per_s'], '.2f')} | "
                f"{_fmt(t['virtual_gib_per_s'], '.2f')} | {ratio} | "
                f"{_fmt(t['client_cpu_s_per_gib'], '.2f')} | "
                f"{_fmt(t['server_cpu_s_per_gib'], '.2f')} | "
                f"{_fmt(t['other_cpu_s_per_gib'], '.2f')} | "
                f"{_fmt(t['peak_rss_mib'], '.0f')} | {_fmt(t.get('server_peak_rss_mib'), '.0f')} "
                f"| {check} |")
    return "\n".join(lines)


def best_peer_table(summaries: list[dict[str, Any]]) -> str:
    """Per case and target: engine ÷ each peer, and the best peer (the one the engine is least
    ahead of)."""
    peers = [p for p in PEERS if any(p in s["throughput_ratio"] for s in summaries)]
    head = ("| case | target | " + " | ".join(f"engine ÷ {p}" for p in peers)
            + " | best peer | engine ÷ best peer |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for s in summaries:
        cells = [_fmt(s["throughput_ratio"].get(p, {}).get("engine_over_peer_median"), ".2f")
                 for p in peers]
        best = s.get("best_peer") or {}
        value = best.get("engine_over_peer_median")
        mark = "" if value is None else (" (ahead)" if value >= 1 else " (**behind**)")
        lines.append(f"| {s.get('case', PRIMARY)} | {s['target']} | {' | '.join(cells)} | "
                     f"{best.get('tool', '–')} | {_fmt(value, '.2f')}{mark} |")
    return "\n".join(lines)


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
    p = argparse.ArgumentParser(
        prog="python -m bench cold-copy",
        description="Copy a synthetic disk served by nbdkit or qemu-nbd with the engine (also with "
                    "--verify), nbdcopy and qemu-img convert (each at its defaults and tuned), to "
                    "null:, a file and a loop device, and checksum it with the engine; print a "
                    "table of medians.")
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
    p.add_argument("--workdir", help="directory for the images, targets and sockets (default: a "
                                     "fresh directory under /var/tmp); images made there with "
                                     "--keep and the same size and seed are reused")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--out", help="JSON lines output (default bench/out/cold-copy-<time>.jsonl)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: 256 MiB images, 1 rep, cases {','.join(QUICK_CASES)}")
    p.add_argument("--require-bars", action="store_true",
                   help="exit 3 when a valid run misses one of the issue's bars")
    a = p.parse_args(argv)
    a.size = a.size if a.size is not None else (QUICK_SIZE if a.quick else DEFAULT_SIZE)
    a.reps = a.reps if a.reps is not None else (1 if a.quick else 5)
    a.reps_rest = a.reps_rest if a.reps_rest is not None else (1 if a.quick else 3)
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


def main_case_of(a: argparse.Namespace) -> str:
    """The case that gets --reps (the others --reps-rest): the one the issue's bars are about
    when it is run, else the first listed."""
    keys = [c.key for c in a.cases]
    return PRIMARY if PRIMARY in keys else keys[0]


def case_targets(a: argparse.Namespace, case: Case) -> list[str]:
    """The targets a case runs to: --targets, and of them only --dropped-targets when the
    cache is dropped."""
    if case.cache == "dropped":
        return [t for t in a.targets if t in a.dropped_targets]
    return list(a.targets)


def reproduce_command(a: argparse.Namespace) -> str:
    parts = ["cd", shlex.quote(str(ROOT)), "&&", ".venv/bin/python", "-m", "bench", "cold-copy",
             "--size", _size_text(a.size), "--seed", str(a.seed),
             "--cases", ",".join(c.key for c in a.cases), "--reps", str(a.reps),
             "--reps-rest", str(a.reps_rest), "--targets", ",".join(a.targets),
             "--dropped-targets", ",".join(a.dropped_targets), "--tools", ",".join(a.tools)]
    return " ".join(parts)


def _preflight(a: argparse.Namespace) -> list[str]:
    missing = []
    need = ["nbdkit", "qemu-img"] + (["nbdcopy"] if any(t.startswith("nbdcopy") for t in a.tools)
                                     else [])
    if any(c.server == "qemu-nbd" for c in a.cases):
        need.append("qemu-nbd")
    if any("loop" in case_targets(a, c) for c in a.cases):
        need += ["losetup", "blkdiscard"]
        if os.geteuid() != 0:
            missing.append("root (for the loop device)")
    missing += [n for n in need if not shutil.which(n)]
    if not os.access(TIME, os.X_OK):
        missing.append(f"{TIME} (GNU time: apt-get install time)")
    if any(TOOLS[t].engine for t in a.tools) and not ENGINE.exists():
        missing.append(f"{ENGINE} (run tools/setup)")
    return missing


def make_random_image(path: str, size: int, seed: int) -> dict[str, int]:
    """Every byte random (numpy's PCG64 from the seed): no holes, no zero blocks, nothing to
    compress; the same size and seed give the same bytes."""
    import numpy as np

    rng = np.random.default_rng([seed, 0x72616E64])
    chunk = 64 * MiB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(rng.bytes(n))
            left -= n
    return {"random": size, "text": 0, "zero_allocated": 0, "hole": 0}


def _image_stem(kind: str) -> str:
    """The mixed image keeps the name every scenario knows (source.img: a --keep work directory
    is shared between them); the others are source-KIND.img."""
    return "source" if kind == "mixed" else f"source-{kind}"


def _prepare_image(workdir: str, a: argparse.Namespace, kind: str = "mixed"
                   ) -> tuple[str, dict[str, Any]]:
    """The image of this kind, --size and --seed in workdir: made, or reused when the one there
    was made with the same (its .json says so)."""
    image = os.path.join(workdir, f"{_image_stem(kind)}.img")
    meta_path = os.path.join(workdir, f"{_image_stem(kind)}.json")
    allocated = ALLOCATED if kind == "mixed" else 1.0
    want = {"kind": kind, "size": a.size, "seed": a.seed, "allocated_fraction": allocated}
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if {k: meta.get(k) for k in want} == want and os.path.getsize(image) == a.size:
            _say(f"reusing {image} ({kind}, size {_size_text(a.size)}, seed {a.seed})")
            return image, meta
    except (OSError, ValueError):
        pass
    try:  # a qcow2 copy of an older image would be served for this one
        os.unlink(os.path.join(workdir, f"{_image_stem(kind)}.qcow2"))
    except FileNotFoundError:
        pass
    t = time.perf_counter()
    if kind == "mixed":
        _say(f"making the {_size_text(a.size)} mixed image, seed {a.seed}, half allocated ...")
        layout = make_image(image, a.size, a.seed, allocated=ALLOCATED)
    else:
        _say(f"making the {_size_text(a.size)} random image, seed {a.seed} ...")
        layout = make_random_image(image, a.size, a.seed)
    meta = dict(want, layout=layout, alloc_bytes=allocated_bytes(image))
    _say(f"  made in {time.perf_counter() - t:.1f} s: "
         + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in layout.items()))
    t = time.perf_counter()
    meta["digest"] = file_digest(image)
    _say(f"  digest {meta['digest']} in {time.perf_counter() - t:.1f} s")
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return image, meta


def _prepare_qcow2(image: str) -> str:
    """A qcow2 copy of the raw image for qemu-nbd (qemu-img convert: zero blocks become
    unallocated clusters, as in a real qcow2 disk), made once."""
    qcow2 = image[:-len(".img")] + ".qcow2"
    if os.path.exists(qcow2):
        return qcow2
    t = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", image, qcow2 + ".part"],
                   check=True, capture_output=True)
    os.rename(qcow2 + ".part", qcow2)
    _say(f"  qcow2 copy for qemu-nbd made in {time.perf_counter() - t:.1f} s "
         f"({os.stat(qcow2).st_blocks * 512 / MiB:.0f} MiB on disk)")
    return qcow2


def _image_info(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in ("kind", "size", "seed", "allocated_fraction", "alloc_bytes",
                                     "layout", "digest")}


def _source(workdir: str, case: Case, a: argparse.Namespace, metas: dict[str, Any]) -> Source:
    """The case's image (made, or reused within the run), ready to serve."""
    image, meta = _prepare_image(workdir, a, case.image)
    metas[case.image] = meta
    served = _prepare_qcow2(image) if case.server == "qemu-nbd" else image
    return Source(image=image, served=served, size=a.size, alloc=meta["alloc_bytes"],
                  digest=meta["digest"], info=_image_info(meta))


def _say_summary_notes(s: dict[str, Any]) -> None:
    where = f"{s['case']} → {s['target']}"
    own = [f"{name} {t['engine_own_seconds_median']:.2f} s of {t['wall_s_median']:.2f} s"
           for name, t in s["tools"].items() if t.get("engine_own_seconds_median")]
    if own:
        _say(f"  {where}: the engine's own reported seconds (without interpreter start) against "
             f"wall, medians: {'; '.join(own)}")
    c = s.get("checksum_over_nbdcopy")
    if c is not None and c["median"] is not None:
        t = s["tools"]["checksum"]
        _say(f"  {where}: checksum ÷ nbdcopy throughput (nbdcopy wall / checksum wall per rep): "
             f"median {c['median']:.2f}, pairs {', '.join(f'{x:.2f}' for x in c['pairs'])}; "
             f"checksum {_fmt(t['alloc_gib_per_s'], '.2f')} GiB/s alloc")
    v = s.get("verify_cost")
    if v is not None:
        ratio, extra = v["wall_ratio"], v["extra_s"]
        cost = ("no plain engine runs to compare with" if ratio is None
                else f"costs {_fmt(ratio['median'], '.2f')} × the plain copy's wall, "
                     f"+{_fmt(extra['median'], '.2f')} s (medians of per-rep pairs)")
        read = v["verify_bytes_read_max"]
        _say(f"  {where}: copy --verify {cost}; its own verify_seconds median "
             f"{_fmt(v['verify_seconds_median'], '.2f')} s; read back "
             f"{_fmt(read and read / GiB, '.3f')} GiB = "
             f"{_fmt(v['verify_bytes_read_over_alloc'], '.3f')} × allocated (max)")
    for name in ("qemu-img", "qemu-img-tuned"):
        q = s["tools"].get(name, {})
        if q.get("post_sync_s_median") is not None:
            _say(f"  {where}: {name}'s wall includes our fsync of the target, median "
                 f"{q['post_sync_s_median']:.2f} s")


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    missing = _preflight(a)
    if missing:
        print("cold-copy: missing " + ", ".join(missing), file=sys.stderr)
        return 2
    started = time.time()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = a.out or str(ROOT / "bench" / "out" / f"cold-copy-{stamp}.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)

    made_dir = a.workdir is None or not os.path.exists(a.workdir)
    if a.workdir is None:
        workdir = tempfile.mkdtemp(prefix="bench-cold-copy-", dir="/var/tmp")
    else:
        workdir = os.path.abspath(a.workdir)
        os.makedirs(workdir, exist_ok=True)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    loop: LoopDevice | None = None
    code = 0
    try:
        metas: dict[str, Any] = {}
        # The images first, so the provenance names them all and no run waits on a make.
        sources = {c.key: _source(workdir, c, a, metas) for c in a.cases}
        first = metas.get("mixed") or next(iter(metas.values()))
        prov = provenance(_image_info(first), workdir)
        prov["images"] = {k: _image_info(m) for k, m in metas.items()}
        prov["qemu_nbd"] = _cmd_output(["qemu-nbd", "--version"]).splitlines()[0]
        prov["cache"] = ", ".join(f"{c.key}: {c.cache}" for c in a.cases)
        prov["tuned"] = {"nbdcopy-tuned": " ".join(NBDCOPY_TUNED),
                         "qemu-img-tuned": " ".join(QEMU_IMG_TUNED)}
        _say(f"engine {prov['engine_commit']} (fingerprint {prov['engine_fingerprint']}), "
             f"{prov['nbdcopy']}, {prov['qemu_img']}, {prov['nbdkit']}, {prov['qemu_nbd']}, "
             f"kernel {prov['kernel']}, {prov['cpu_model']} x {prov['nproc']}")
        summaries: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        with open(out_path, "w") as out:
            bench = Bench(a, workdir, a.size, prov, out)
            if any("loop" in case_targets(a, c) for c in a.cases):
                loop = LoopDevice(os.path.join(workdir, "loop-backing.img"), a.size)
                bench.loop = loop
                _say(f"loop device {loop.attach()} over {loop.backing}")
            main_case = main_case_of(a)
            for case in a.cases:
                src = sources[case.key]
                reps = a.reps if case.key == main_case else a.reps_rest
                bench.use(case, src, reps)
                if case.cache == "dropped":
                    try:
                        drop_caches()
                    except OSError as e:
                        why = f"the page cache cannot be dropped here ({e.strerror})"
                        _say(f"case {case.key}: skipped: {why}")
                        skipped.append({"case": case.key, "why": why})
                        continue
                    state = "dropped before every run"
                else:
                    t = time.perf_counter()
                    warm_cache(src.served)
                    state = f"hot ({time.perf_counter() - t:.1f} s to read it in)"
                resident = cache_resident(src.served)
                _say(f"case {case.key}: {os.path.basename(src.served)} on {case.server}, "
                     f"{src.alloc / MiB:.0f} MiB of {a.size / MiB:.0f} MiB allocated; cache "
                     f"{state}; fincore: "
                     f"{'?' if resident is None else f'{resident / MiB:.0f} MiB'} resident")
                for target in case_targets(a, case):
                    tools = [t for t in a.tools if target in TOOLS[t].targets]
                    if not tools:
                        _say(f"  target {target}: none of the tools runs to it; skipped")
                        continue
                    if case.cache == "hot":
                        # Again before every target: the previous target's writes and the
                        # warm-up's compare (another 4 GiB file) may have pushed it out.
                        warm_cache(src.served)
                    resident = cache_resident(src.served)
                    _say(f"  target {target}: warm-up and check, then {reps} interleaved reps "
                         f"of {', '.join(tools)}")
                    for tool in tools:
                        bench.run(tool, target, None)
                    for rep in range(reps):
                        for tool in tools:
                            bench.run(tool, target, rep)
                    if target == "file" and os.path.exists(bench.file_target):
                        os.unlink(bench.file_target)
                    s = summarize(bench, target, tools, resident)
                    bench.emit(s)
                    summaries.append(s)
            fp_end = engine_fingerprint()
            fps = sorted({r["engine_fingerprint"] for r in bench.runs if "engine_fingerprint" in r}
                         | {prov["engine_fingerprint"], fp_end})
            verdict_bars = bars(summaries)
            valid = all(r["valid"] for r in bench.runs)
            duration = time.time() - started
            best = [{"case": s["case"], "target": s["target"], **s["best_peer"]}
                    for s in summaries if s.get("best_peer")]
            bench.emit({"type": "verdict", "scenario": "cold-copy", "valid": valid,
                        "bars": verdict_bars, "best_peer": best, "skipped": skipped,
                        "duration_s": round(duration, 1),
                        "engine_changed_during_run": len(fps) > 1, "engine_fingerprints": fps,
                        "command": reproduce_command(a), "provenance": prov})
        _say()
        _say(f"cold-copy: {_size_text(a.size)} images, seed {a.seed}, cases "
             f"{', '.join(c.key for c in a.cases)}; {a.reps} reps in {main_case}, "
             f"{a.reps_rest} in the others, after a warm-up; engine {prov['engine_commit']}")
        _say()
        _say(table(summaries))
        _say()
        _say("GiB/s alloc: allocated (non-hole, of the raw image) GiB / median wall s; engine ÷ "
             "tool: median of per-rep ratios tool wall / engine wall (> 1: engine faster); "
             "CPU-s/GiB per allocated GiB, medians; server = nbdkit or qemu-nbd; other = the "
             "rest of the machine meanwhile (kernel writeback and loop workers, and anyone "
             "else's processes).")
        for s in summaries:
            _say_summary_notes(s)
        _say()
        _say(best_peer_table(summaries))
        _say()
        for sk in skipped:
            _say(f"  skipped {sk['case']}: {sk['why']}")
        for b in verdict_bars:
            _say(f"  {'met   ' if b['met'] else 'MISSED'} {b['bar']}: "
                 f"{_fmt(b['value'], b.get('format', '.2f'))}")
        if len(fps) > 1:
            _say(f"WARNING: the engine's files changed during the run ({len(fps)} versions: "
                 f"{', '.join(fps)}); each engine run's JSON line has its engine_fingerprint")
        if not valid:
            _say("INVALID: a run failed or a correctness check failed (see 'problems' in the "
                 "JSON lines)")
            code = 1
        elif a.require_bars and not all(b["met"] for b in verdict_bars):
            code = 3
        _say(f"duration {duration / 60:.1f} min; JSON lines: {out_path}")
        _say(f"reproduce: {reproduce_command(a)}")
        return code
    except KeyboardInterrupt:
        print("cold-copy: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if loop is not None:
            loop.detach()
        if a.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        elif made_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            names = ["target.img", "loop-backing.img", "nbd.sock", "report.json", "child.out",
                     "child.log", "maxrss.txt"]
            names += [f"{_image_stem(k)}{ext}" for k in IMAGES
                      for ext in (".img", ".json", ".qcow2", ".qcow2.part")]
            for name in names:
                try:
                    os.unlink(os.path.join(workdir, name))
                except OSError:
                    pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
