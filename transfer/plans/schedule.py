"""Which disks copy when: the slots, the order, and the simulated schedule (pure, no I/O).

Slots, as Forklift counts them: a disk costs one slot of its host (maxInflightDisksPerHost)
and one of the plan (maxInflight) while it copies, and none while it waits for its next
precopy pass or its cutover. A VM starts with all its disks at once, when they fit; a VM with
more disks than its host's limit (or the plan's) starts alone, when the host (or the plan)
is idle, rather than never.

The order (`order`): per host, VMs by allocated bytes, largest first (LPT, longest processing
time first). A host's copies share its rate, so a host that stays busy ends at the same time
whatever its order; what decides the plan's end is the tail: the last VM to start on a host
runs with fewer neighbours, and the plan's limit moves slots between hosts as they empty. LPT
starts the long copies while there is most to overlap them with and leaves the short ones for
the tail (Graham's bound: within 4/3 of the best list schedule), and it is the rule a person
can predict. Each host's queue is strict: a VM waits for the one before it on its host, so a
VM too big for its host's limit is not starved by smaller ones passing it.

The model (`simulate`): a host is a shared capacity: its measured rate (bytes/s) is divided
equally among the disks copying on it at each moment (a saturated ESXi host), so the schedule
is simulated event by event: at each start or end, every running disk's rate is recomputed.
A warm or live disk costs its first (whole) pass, then holds no slot until its cutover, whose
final pass is assumed small (its delta is unknown before it runs); the VM ends at the later of
its first pass and its cutover.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable


@dataclass
class Job:
    """One disk's copy: what the scheduler and the model know of it."""

    vm: str
    disk: str
    host: str
    bytes: int
    cutover: float | None = None  # seconds from the simulation's start; None: ends with its copy


@dataclass
class Vm:
    name: str
    host: str
    jobs: list[Job] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(j.bytes for j in self.jobs)


class Slots:
    """Disks in flight, per host and overall, against the plan's limits."""

    def __init__(self, per_host: int, overall: int | None) -> None:
        self.per_host, self.overall = per_host, overall
        self.busy: dict[str, int] = {}
        self.total = 0

    def fits(self, host: str, n: int) -> bool:
        """n disks may start on host: under both limits, or alone where the host (or plan) is
        idle."""
        on_host = self.busy.get(host, 0)
        host_ok = on_host + n <= self.per_host or on_host == 0
        plan_ok = self.overall is None or self.total + n <= self.overall or self.total == 0
        return host_ok and plan_ok

    def take(self, host: str, n: int = 1) -> None:
        self.busy[host] = self.busy.get(host, 0) + n
        self.total += n

    def give(self, host: str, n: int = 1) -> None:
        self.busy[host] -= n
        self.total -= n


def order(vms: Iterable[Vm]) -> list[Vm]:
    """LPT: largest allocated bytes first (then by name, for a stable order)."""
    return sorted(vms, key=lambda v: (-v.bytes, v.name))


def queues(vms: Iterable[Vm]) -> dict[str, list[Vm]]:
    """Each host's VMs in the order they start."""
    out: dict[str, list[Vm]] = {}
    for vm in order(vms):
        out.setdefault(vm.host, []).append(vm)
    return out


def admit(pending: dict[str, list[Vm]], slots: Slots) -> list[Vm]:
    """Take from the head of each host's queue every VM that fits now (hosts in the order of
    their head's size, so that the plan's limit goes to the largest first)."""
    started = []
    progress = True
    while progress:
        progress = False
        heads = sorted((q[0] for q in pending.values() if q), key=lambda v: (-v.bytes, v.name))
        for vm in heads:
            if slots.fits(vm.host, len(vm.jobs)):
                pending[vm.host].pop(0)
                slots.take(vm.host, len(vm.jobs))
                started.append(vm)
                progress = True
                break
    return started


@dataclass
class Entry:
    vm: str
    disk: str
    host: str
    start: float
    end: float
    bytes: int

    def to_dict(self) -> dict:
        return {"vm": self.vm, "disk": self.disk, "host": self.host, "start": round(self.start, 3),
                "end": round(self.end, 3), "bytes": self.bytes}


def simulate(vms: Iterable[Vm], rates: dict[str, float], per_host: int,
             overall: int | None) -> tuple[float, list[Entry]]:
    """(makespan in seconds, each disk's simulated copy) for these VMs from time 0."""
    pending = queues(vms)
    slots = Slots(per_host, overall)
    running: dict[int, list] = {}  # id -> [job, remaining bytes, entry]
    entries: list[Entry] = []
    now, end = 0.0, 0.0
    while True:
        for vm in admit(pending, slots):
            for job in vm.jobs:
                e = Entry(job.vm, job.disk, job.host, now, now, job.bytes)
                entries.append(e)
                running[id(e)] = [job, float(job.bytes), e]
        if not running:
            if any(pending.values()):  # cannot happen: an idle plan admits any head
                raise AssertionError("the schedule is stuck")
            break
        share = _shares(running, rates)
        dt = min(r[1] / share[k] if share[k] > 0 else float("inf") for k, r in running.items())
        if dt == float("inf"):
            raise ValueError("a host with disks to copy has no rate")
        now += dt
        for k in list(running):
            job, left, e = running[k]
            left -= share[k] * dt
            if left <= 1e-6 * max(1, job.bytes):
                e.end = now
                end = max(end, now, job.cutover or 0.0)
                slots.give(job.host)
                del running[k]
            else:
                running[k][1] = left
    return end, entries


def _shares(running: dict[int, list], rates: dict[str, float]) -> dict[int, float]:
    """Each running disk's rate: its host's rate over the disks copying there now."""
    count: dict[str, int] = {}
    for job, _, _ in running.values():
        count[job.host] = count.get(job.host, 0) + 1
    return {k: rates.get(job.host, 0.0) / count[job.host] for k, (job, _, _) in running.items()}
