"""What the prediction needs from the sources: each disk's allocated bytes, each host's rate.

Before a run (and for `plan run --dry-run`), each disk with a `source:` is opened to read its
extents (its allocated bytes: what a copy reads as data), and the largest unfinished disk of
each host gives a short sample timed as the host's rate: read from its start (again from the
start at its end) for SAMPLE_SECONDS or SAMPLE_MAX bytes, the hosts at once, and the rate
taken over the sample's second half (the first half pays the connection's start and a rate
limiter's burst allowance). A `qmp:` disk's size is not known before its migration exports
it: it counts 0 bytes. Finished disks are neither opened nor read: a resumed plan does not
touch them.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..disks import open_disk
from .schedule import Job, Vm, simulate
from .spec import Plan

SAMPLE_SECONDS = 0.6  # how long one disk per host is read to time its rate
SAMPLE_MAX = 64 << 20  # and at most this many bytes
SAMPLE_REQUEST = 256 << 10
UNKNOWN_RATE = 100 << 20  # bytes/s assumed for a host with nothing to sample (a qmp disk)


@dataclass
class Measured:
    bytes: dict[tuple[str, str], int] = field(default_factory=dict)  # (vm, disk) -> data bytes
    sizes: dict[tuple[str, str], int] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)  # host -> bytes/s
    sampled: dict[str, str] = field(default_factory=dict)  # host -> the disk its sample read


def allocated(url: str, timeout: float | None = None) -> tuple[int, int]:
    """(size, allocated bytes) of a source disk, from its extents."""
    disk = open_disk(url, "source", timeout=timeout)
    try:
        return disk.size, disk.data_bytes()
    finally:
        disk.close()


def sample_rate(url: str, size: int, seconds: float = SAMPLE_SECONDS,
                most: int = SAMPLE_MAX) -> float:
    """Bytes per second reading url from its start, over the second half of the sample."""
    disk = open_disk(url, "source")
    try:
        conn = disk.connect()
        if conn is None or size <= 0:
            return 0.0
        bufs = [memoryview(bytearray(SAMPLE_REQUEST)) for _ in range(4)]
        started = time.monotonic()
        done, pos, free = [], 0, list(range(4))  # (time, bytes so far) per completed read
        total = 0
        while time.monotonic() - started < seconds and total < most or len(free) < 4:
            while free and time.monotonic() - started < seconds and total < most:
                n = min(SAMPLE_REQUEST, size - pos)
                i = free.pop()
                conn.start_read(bufs[i][:n], pos, (i, n))
                pos = (pos + n) % size
            for (i, n), err in conn.reap():
                if err is not None:
                    raise err
                free.append(i)
                total += n
                done.append((time.monotonic(), total))
        conn.close()
        return _second_half(done, started)
    finally:
        disk.close()


def _second_half(done: list[tuple[float, int]], started: float) -> float:
    if not done:
        return 0.0
    t_end, b_end = done[-1]
    half = [(t, b) for t, b in done if t - started >= (t_end - started) / 2]
    t0, b0 = half[0] if len(half) > 1 else (started, 0)
    return (b_end - b0) / max(t_end - t0, 1e-6)


def measure(plan: Plan, finished: set[tuple[str, str]], *, sample: bool = True) -> Measured:
    """Allocated bytes of every unfinished disk, and a rate per host that has one."""
    m = Measured()
    biggest: dict[str, tuple[int, str, int]] = {}
    for vm in plan.vms:
        for d in vm.disks:
            key = (vm.name, d.name)
            if key in finished or d.source is None:
                m.bytes[key] = m.sizes[key] = 0
                continue
            m.sizes[key], m.bytes[key] = allocated(d.source)
            if m.sizes[key] > biggest.get(vm.host, (-1, "", 0))[0]:
                biggest[vm.host] = (m.sizes[key], d.source, m.sizes[key])
    for vm in plan.vms:
        m.rates.setdefault(vm.host, float(UNKNOWN_RATE))
    if sample and biggest:
        with ThreadPoolExecutor(len(biggest)) as pool:  # the hosts at once: one sample's time
            rates = pool.map(lambda b: sample_rate(b[1], b[2]), biggest.values())
            for (host, (_, url, _)), rate in zip(biggest.items(), rates):
                m.rates[host] = rate or float(UNKNOWN_RATE)
                m.sampled[host] = url
    return m


def jobs(plan: Plan, m: Measured, finished: set[tuple[str, str]], now: float) -> list[Vm]:
    """The plan's unfinished disks as the scheduler's VMs (a VM with none left is absent)."""
    out = []
    for vm in plan.vms:
        cut = None if vm.cutover is None else max(0.0, vm.cutover - now)
        left = [Job(vm.name, d.name, vm.host, m.bytes[(vm.name, d.name)], cut)
                for d in vm.disks if (vm.name, d.name) not in finished]
        if left:
            out.append(Vm(vm.name, vm.host, left))
    return out


def predict(plan: Plan, m: Measured, finished: set[tuple[str, str]], now: float) -> dict:
    """The dry run's answer: predicted seconds, the hosts' rates, the simulated schedule."""
    vms = jobs(plan, m, finished, now)
    seconds, entries = simulate(vms, m.rates, plan.per_host, plan.overall)
    hosts: dict[str, dict] = {}
    for vm in plan.vms:
        h = hosts.setdefault(vm.host, {"rate": round(m.rates[vm.host], 1), "disks": 0,
                                       "bytes": 0, "sampled": m.sampled.get(vm.host)})
        for d in vm.disks:
            if (vm.name, d.name) not in finished:
                h["disks"] += 1
                h["bytes"] += m.bytes[(vm.name, d.name)]
    return {"predicted_seconds": round(seconds, 3), "hosts": hosts,
            "limits": {"maxInflightDisksPerHost": plan.per_host, "maxInflight": plan.overall},
            "rule": "per host, largest allocated bytes first (LPT)",
            "schedule": [e.to_dict() for e in entries],
            "finished": sorted(f"{v}/{d}" for v, d in finished)}
