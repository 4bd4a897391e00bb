"""What every scenario asks of the machine and the tree: where the engine is, sizes and number
formatting, the page cache, /proc (a process's CPU and peak RSS, the whole machine's busy time),
the wait for an idle machine, the engine's fingerprint and commit, and the provenance line."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import operator
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
ENGINE = ROOT / ".venv" / "bin" / "transfer"
PYTHON = str(ROOT / ".venv" / "bin" / "python")
TIME = "/usr/bin/time"  # GNU time, for each tool's own peak RSS (see measure.spawn_and_reap)
GiB = 1 << 30
MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(msg: str = "") -> None:
    print(msg, flush=True)


def say_engine(prov: dict[str, Any], *peers: str) -> None:
    """The run's engine, its peers' versions (provenance keys) and the machine, on stdout."""
    say(f"engine {prov['engine_commit']} (fingerprint {prov['engine_fingerprint']}), "
        + "".join(f"{prov[k]}, " for k in peers)
        + f"kernel {prov['kernel']}, {prov['cpu_model']} x {prov['nproc']}")


def fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def invalid_text(problems: list[str]) -> str:
    """What ends a run's progress line when the run is invalid."""
    return "  INVALID: " + "; ".join(problems) if problems else ""


def size_text(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def median_of(rows: list[dict[str, Any]], key: str, kind: Any = (int, float)) -> float | None:
    """The median of the rows' key where it is a number of that kind (None without any)."""
    return median([r[key] for r in rows if isinstance(r.get(key), kind)])


def stats(xs: list[float], digits: int = 9) -> dict[str, Any]:
    """median, min and max of xs (None when empty) and how many."""
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits), "n": len(xs)}


def tool_stats(good: list[dict[str, Any]], every: list[dict[str, Any]]) -> dict[str, Any]:
    """A tool's wall over its valid timed runs (median, min, max; None without any) and the peak
    RSS of the tool and of its server over every run of it, the warm-up too."""
    walls = [r["wall_s"] for r in good]
    return {"wall_s_median": median(walls), "wall_s_min": min(walls, default=None),
            "wall_s_max": max(walls, default=None),
            "peak_rss_mib": max((r["client_maxrss_mib"] for r in every
                                 if r["client_maxrss_mib"] is not None), default=None),
            "server_peak_rss_mib": max((r["server_maxrss_mib"] for r in every
                                        if r.get("server_maxrss_mib") is not None), default=None)}


def rep_stats(timed: list[dict[str, Any]], warmups: list[dict[str, Any]], per_gib: float,
              **gib: float | None) -> dict[str, Any]:
    """tool_stats of a tool's timed runs and warm-ups, and: how many reps (valid ones), whether
    there were warm-ups and all were valid, NAME_gib_per_s of the median wall for each NAME=GiB
    given, and the median client, server and other CPU seconds per per_gib GiB."""
    good = [r for r in timed if r["valid"]]
    out = tool_stats(good, timed + warmups)
    med = out["wall_s_median"]
    out.update(reps=len(timed), valid_reps=len(good),
               warmup_valid=bool(warmups) and all(r["valid"] for r in warmups))
    out |= {f"{k}_gib_per_s": round(g / med, 4) if med and g is not None else None
            for k, g in gib.items()}
    for k in ("client", "server", "other"):
        m = median([r[f"{k}_cpu_s"] for r in good])
        out[f"{k}_cpu_s_per_gib"] = None if m is None else round(m / per_gib, 4)
    return out


def paired(a: list[float | None], b: list[float | None], f: Any = operator.truediv,
           spread: bool = False) -> dict[str, Any]:
    """f(a[i], b[i]) pair by pair (pairs with a None left out): the median (with spread the min
    and max too) and every pair."""
    pairs = [f(x, y) for x, y in zip(a, b) if x is not None and y]
    out = {"median": round(statistics.median(pairs), 4) if pairs else None,
           "pairs": [round(p, 4) for p in pairs]}
    if spread:
        out.update(min=round(min(pairs), 4) if pairs else None,
                   max=round(max(pairs), 4) if pairs else None)
    return out


def walls(runs: list[dict[str, Any]]) -> list[float | None]:
    """The runs' walls, None for an invalid one: what paired() pairs, rep by rep."""
    return [r["wall_s"] if r["valid"] else None for r in runs]


def md_table(head: str, rows: list[str]) -> str:
    """A markdown table: its head row, the separator, the rows."""
    return "\n".join([head, "|---" * (head.count("|") - 1) + "|", *rows])


def cmd_output(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"
    return (out.stdout or out.stderr).strip()


def missing_programs(*programs: str, engine: bool = True) -> list[str]:
    """What a scenario needs and the machine lacks: programs on PATH, GNU time, the engine."""
    missing = [n for n in programs if not shutil.which(n)]
    if not os.access(TIME, os.X_OK):
        missing.append(f"{TIME} (GNU time: apt-get install time)")
    if engine and not ENGINE.exists():
        missing.append(f"{ENGINE} (run tools/setup)")
    return missing


def engine_lacks(command: str, *options: str) -> list[str]:
    """What `transfer COMMAND --help` does not offer of options (or why it does not run)."""
    try:
        out = subprocess.run([str(ENGINE), command, "--help"], capture_output=True, text=True,
                             timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"`transfer {command}` ({e})"]
    if out.returncode != 0:
        return [f"`transfer {command}` (`{ENGINE} {command} --help` exits {out.returncode}: "
                f"{(out.stderr or out.stdout).strip().splitlines()[-1:]})"]
    return [f"`transfer {command} {opt}`" for opt in options if opt not in out.stdout]


def engine_env(workdir: str) -> dict[str, str]:
    """The environment of the engine's (and the live guest's) runs: their bytecode under the
    work directory (never in the tree), as an installed program has it, even when
    PYTHONDONTWRITEBYTECODE is set here."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = os.path.join(workdir, "pycache")
    return env


def warm_bytecode(env: dict[str, str], modules: str, command: str) -> float:
    """Compile the modules an engine run imports, and `transfer COMMAND --help`, into env's
    PYTHONPYCACHEPREFIX (not timed); the seconds it took."""
    t = time.perf_counter()
    subprocess.run([PYTHON, "-c", f"import {modules}"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    subprocess.run([str(ENGINE), command, "--help"], env=env, check=True, capture_output=True)
    return time.perf_counter() - t


# ---------------------------------------------------------------- files and the page cache

def allocated_bytes(path: str) -> int:
    """Bytes of the file that are not holes, from SEEK_DATA/SEEK_HOLE."""
    return sum(end - start for start, end in data_runs(path))


def data_runs(path: str) -> list[tuple[int, int]]:
    """The file's (start, end) runs of data, from SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        runs = []
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            runs.append((data, hole))
            pos = hole
        return runs
    finally:
        os.close(fd)


def sparse_copy(src: str, dst: str) -> None:
    """Copy src to dst keeping its holes (SEEK_DATA/SEEK_HOLE + copy_file_range), then fsync."""
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fo, os.fstat(fi).st_size)
        for data, hole in data_runs(src):
            off = data
            while off < hole:
                n = os.copy_file_range(fi, fo, hole - off, off, off)
                if n <= 0:
                    raise OSError(f"copy_file_range returned {n} at {off}")
                off += n
        os.fsync(fo)
    finally:
        os.close(fi)
        os.close(fo)


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
    out = cmd_output(["fincore", "--bytes", "--noheadings", "--output", "RES", path])
    try:
        return int(out.split()[0])
    except (ValueError, IndexError):
        return None


def resident_text(path: str) -> str:
    resident = cache_resident(path)
    return "?" if resident is None else f"{resident / MiB:.0f} MiB"


def drop_caches() -> None:
    """Write back dirty pages, then drop the clean page cache, dentries and inodes (root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


# ---------------------------------------------------------------- /proc

def proc_peak_rss_mib(pid: int) -> float | None:
    """A live process's peak resident memory (VmHWM), from /proc."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
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


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


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


# ---------------------------------------------------------------- the engine and provenance

def engine_fingerprint() -> str:
    """sha256 over the engine's sources and built modules, to notice edits during a run."""
    h = hashlib.sha256()
    for base in ("transfer", "native"):
        for p in sorted((ROOT / base).rglob("*")):
            if "__pycache__" in p.parts or not p.is_file():
                continue
            h.update(str(p.relative_to(ROOT)).encode() + b"\0")
            with contextlib.suppress(OSError):
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def engine_commit() -> str:
    commit = cmd_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    # Dirty means the engine's own files differ from HEAD (bench/ itself is not counted).
    # --no-optional-locks: never write the index while others work in the tree.
    status = cmd_output(["git", "--no-optional-locks", "-C", str(ROOT), "status", "--porcelain",
                         "--", "transfer", "native", "setup.py", "pyproject.toml"])
    return commit + ("-dirty" if status else "")


def provenance(workdir: str, image: dict[str, Any] | None = None, workload: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """The engine's commit and fingerprint, the peers' versions, kernel, CPU, memory, Python and
    the work directory's filesystem; with the image the scenario copies, or a workload described
    instead (kernels, overhead); extra keys on top."""
    cpu, mem = "unknown", None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), cpu)
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    prov = {
        "engine_commit": engine_commit(),
        "engine_fingerprint": engine_fingerprint(),
        "nbdcopy": "; ".join(cmd_output(["nbdcopy", "--version"]).splitlines()),
        "qemu_img": cmd_output(["qemu-img", "--version"]).splitlines()[0],
        "nbdkit": cmd_output(["nbdkit", "--version"]),
        "kernel": platform.release(),
        "cpu_model": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "mem_total_bytes": mem,
        "python": platform.python_version(),
        "workdir_fs": cmd_output(["stat", "-f", "-c", "%T", workdir]),
        "cache": "hot",
    }
    if workload is None:
        prov["image"] = image
    else:
        prov["workload"] = workload
    return prov | extra


def fingerprints(start: str, runs: list[dict[str, Any]]) -> list[str]:
    """Every engine fingerprint of the run (start, each run's, the end's): more than one means
    the engine's files changed while it ran (the tree is shared)."""
    seen = {r["engine_fingerprint"] for r in runs if "engine_fingerprint" in r}
    return sorted(seen | {start, engine_fingerprint()})
