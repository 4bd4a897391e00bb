"""One measured run of a tool, the same way in every scenario: a child process timed from spawn
to reaping, its CPU from os.wait4, its peak RSS from GNU time, a server's (and any other
process's) CPU from /proc, and the rest of the machine's busy time meanwhile. One record schema:

  argv, exit, timed_out, wall_s, client_user_s, client_sys_s, client_cpu_s, client_maxrss_mib,
  server_cpu_s, server_maxrss_mib, NAME_cpu_s (each side process), machine_busy_cpu_s,
  other_cpu_s (busy minus all of those), idle_wait_s, loadavg_before, post_sync_s (the time of
  the `after` step inside the timed region), ended_at (epoch, at reaping), output_tail (on a
  failure)
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import time
from collections.abc import Callable
from typing import Any

from .machine import (
    TIME,
    loadavg,
    machine_busy_seconds,
    proc_cpu_seconds,
    proc_peak_rss_mib,
    wait_quiet,
)


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
    with contextlib.suppress(OSError, ValueError, IndexError), open(rss_file) as f:
        maxrss = int(f.read().split()[-1])  # KiB; a line before it tells a failure
    return proc.returncode, usage, timed_out, maxrss


def _cpu_or_none(pid: int, before: float) -> float | None:
    try:
        return proc_cpu_seconds(pid) - before
    except (OSError, IndexError, ValueError):
        return None


def measure(argv: list[str], files: str, timeout: float, *, server_pid: int | None = None,
            side: dict[str, int] | None = None, env: dict[str, str] | None = None,
            after: Callable[[], None] | None = None, wait: bool = True) -> dict[str, Any]:
    """Run argv once, measured (the module's docstring lists the record's fields). files: the
    prefix of the child's files (FILES.out its stdout, FILES.log its stderr, FILES.rss). A
    server still serves when this returns (its peak RSS is this run's: it is fresh per run);
    side: other processes whose CPU counts apart (the live guest: read even as a zombie).
    after: run inside the timed region once the child exited 0 (qemu-img's fsync). wait: first
    wait for an idle machine (else the caller did)."""
    rec: dict[str, Any] = {"argv": argv}
    if wait:
        rec["idle_wait_s"] = round(wait_quiet(), 2)
        rec["loadavg_before"] = loadavg()
    side = side or {}
    side0 = {name: proc_cpu_seconds(pid) for name, pid in side.items()}
    server0 = proc_cpu_seconds(server_pid) if server_pid else 0.0
    busy0 = machine_busy_seconds()
    t0 = time.perf_counter()
    code, usage, timed_out, maxrss_kib = spawn_and_reap(
        argv, files + ".out", files + ".log", files + ".rss", timeout, env=env)
    rec["ended_at"] = time.time()
    post = 0.0
    if after is not None and code == 0:
        s0 = time.perf_counter()
        after()
        post = time.perf_counter() - s0
    wall = time.perf_counter() - t0
    busy = machine_busy_seconds() - busy0
    sides = {name: _cpu_or_none(pid, side0[name]) for name, pid in side.items()}
    server = proc_cpu_seconds(server_pid) - server0 if server_pid else 0.0
    client = usage.ru_utime + usage.ru_stime
    rec.update({
        "exit": code, "timed_out": timed_out, "wall_s": round(wall, 6),
        "post_sync_s": round(post, 6),
        "client_user_s": round(usage.ru_utime, 6), "client_sys_s": round(usage.ru_stime, 6),
        "client_cpu_s": round(client, 6),
        "client_maxrss_mib": None if maxrss_kib is None else round(maxrss_kib / 1024, 1),
        "server_cpu_s": round(server, 3),
        "server_maxrss_mib": proc_peak_rss_mib(server_pid) if server_pid else None,
        # Everything else the machine did meanwhile: kernel threads working for the copy
        # (writeback, the loop device's workers) and other people's processes.
        "machine_busy_cpu_s": round(busy, 3),
        "other_cpu_s": round(busy - client - server - sum(x or 0.0 for x in sides.values()), 3),
        **{f"{name}_cpu_s": None if x is None else round(x, 3) for name, x in sides.items()},
    })
    return rec


def measured(rec: dict[str, Any], argv: Callable[[str], list[str]], files: str, timeout: float,
             server: Any = None, result: str | None = None, **kw: Any
             ) -> tuple[list[str], dict[str, Any]]:
    """A scenario's run of a tool: rec gains one measured run of argv(URI) against server, a
    fresh one started for it (None: no server, URI ""; keywords: measure()'s); its problems
    (failed()) and, when it exited 0, its JSON result (result: a report it writes, deleted
    first, or FILES.out; None: none)."""
    if result and os.path.exists(result):
        os.unlink(result)
    with server or contextlib.nullcontext() as srv:
        rec.update(measure(argv(srv.uri if srv else ""), files, timeout,
                           server_pid=srv.pid if srv else None, **kw))
    problems = failed(rec, files)
    data = json_result(result, problems, rec["tool"]) if result and rec["exit"] == 0 else {}
    return problems, data


def failed(rec: dict[str, Any], files: str, ok: tuple[int, ...] = (0,)) -> list[str]:
    """The run's problem when its exit is not one of ok (the end of its output kept)."""
    if rec["exit"] in ok:
        return []
    tail = b""
    for path in (files + ".out", files + ".log"):
        with open(path, "rb") as f:
            tail += f.read()[-2000:]
    rec["output_tail"] = tail.decode(errors="replace")
    return [f"exit {rec['exit']}" + (" (timed out)" if rec["timed_out"] else "")]


def json_result(path: str, problems: list[str], what: str) -> dict[str, Any]:
    """A tool's JSON result (a report, its stdout); {} and a problem when there is none."""
    data = load_json(path)
    if isinstance(data, dict):
        return data
    problems.append(f"{what}: no JSON result in {path}")
    return {}


def load_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cost_text(rec: dict[str, Any]) -> str:
    """A run's CPU and memory on its progress line."""
    rss = rec["client_maxrss_mib"]
    return (f"cpu {rec['client_cpu_s']:5.2f} + server {rec['server_cpu_s']:5.2f} + other "
            f"{rec['other_cpu_s']:5.2f} s  rss {'–' if rss is None else format(rss, '6.1f')} MiB")
