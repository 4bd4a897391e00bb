"""A plan's state directory: its lock, its disks' own states, its status file, its cutovers.

    DIR/lock                      flock'd by the one `plan run` working on DIR
    DIR/plan.json                 the plan as last run (what status and cutover read)
    DIR/status.json               each disk's pass, bytes, rate and state, rewritten as it runs
    DIR/vms/VM/DISK/              the disk's own state: a `sync` state (journal, manifest,
                                  ranges), or a migration's (its sync state under sync/)
    DIR/vms/VM/DISK/done.json     a conversion disk's verification (it has no sync state)
    DIR/vms/VM/cutover            `plan cutover VM` asked a warm VM to cut over
    DIR/vms/VM/disks/NODE/        a VM's disks migrated as one (one_migration): the VM's
                                  directory is that migration's state, each node's sync
                                  state under it

A disk is done when its sync journal's last record is `complete` (its final pass read the
target back and completed the state): the journal is the truth, never status.json. A
conversion disk is done when done.json exists (written durably after an equal verify).
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any

from ..durable import write_atomic
from ..errors import BadInput
from ..state.journal import Journal, JournalError
from .spec import DiskSpec, VmSpec


def disk_dir(state: str, vm: str, disk: str) -> str:
    return os.path.join(state, "vms", vm, disk)


def one_migration(vm: VmSpec) -> bool:
    """A warm or live VM whose disks are all nodes of one daemon: one migration moves them all
    (one QMP transaction per pass, one cutover), its state the VM's own directory."""
    daemons = {d.qmp for d in vm.disks}
    return (vm.type in ("warm", "live") and len(vm.disks) > 1 and None not in daemons
            and len(daemons) == 1)


def sync_dir(state: str, vm: VmSpec, d: DiskSpec) -> str:
    """The directory whose journal says whether the disk is done: the sync state `sync` uses
    directly, the one a migration keeps under its own, or a VM's migration's per node."""
    if one_migration(vm):
        return os.path.join(state, "vms", vm.name, "disks", str(d.node))
    base = disk_dir(state, vm.name, d.name)
    return os.path.join(base, "sync") if d.qmp is not None else base


def cutover_path(state: str, vm: str) -> str:
    return os.path.join(state, "vms", vm, "cutover")


def done_digest(state: str, vm: VmSpec, d: DiskSpec) -> str | None:
    """The digest a finished disk ended with, or None while it is not finished."""
    if vm.type == "conversion":
        path = os.path.join(disk_dir(state, vm.name, d.name), "done.json")
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return str(json.load(f).get("digest", ""))
    path = os.path.join(sync_dir(state, vm, d), "journal")
    if not os.path.exists(path):
        return None
    try:
        with Journal.open(path, create=False) as j:
            last = j.records[-1] if j.records else {}
    except JournalError:  # in use: a pass is running on it (a dry run beside a run)
        return None
    return str(last.get("digest", "")) if last.get("t") == "complete" else None


def mark_verified(state: str, vm: str, disk: str, report: dict[str, Any]) -> None:
    path = os.path.join(disk_dir(state, vm, disk), "done.json")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    write_atomic(path, (json.dumps(report, sort_keys=True) + "\n").encode())


class PlanLock:
    """DIR/lock, flock'd: a second `plan run` on the same state is refused (exit 2)."""

    def __init__(self, state: str) -> None:
        try:
            os.makedirs(state, mode=0o700, exist_ok=True)
            self.fd = os.open(os.path.join(state, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                              0o600)
        except OSError as e:
            raise BadInput(f"cannot use the state directory: {e.strerror}", disk=state,
                           kind="state") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise BadInput("another `transfer plan run` is running on this state directory",
                           disk=state, kind="state") from None

    def close(self) -> None:
        os.close(self.fd)


def running(state: str) -> bool:
    """A `plan run` holds the state's lock now."""
    try:
        fd = os.open(os.path.join(state, "lock"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def write_json(path: str, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def read_plan(state: str) -> dict[str, Any]:
    plan = read_json(os.path.join(state, "plan.json"))
    if plan is None:
        raise BadInput("no plan has run on this state directory", disk=state, kind="state")
    return plan


def request_cutover(state: str, names: list[str]) -> list[str]:
    """Ask the named warm and live VMs (all of them when none named) to cut over; returns
    the VMs asked."""
    plan = read_plan(state)
    movable = {v["name"]: v for v in plan["vms"] if v["type"] in ("warm", "live")}
    unknown = [n for n in names if n not in {v["name"] for v in plan["vms"]}]
    if unknown:
        raise BadInput(f"not in the plan: {', '.join(unknown)}", disk=state, kind="state")
    cold = [n for n in names if n not in movable]
    if cold:
        raise BadInput(f"not warm or live, nothing to cut over: {', '.join(cold)}",
                       disk=state, kind="state")
    asked = names or sorted(movable)
    for name in asked:
        path = cutover_path(state, name)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_atomic(path, b"cutover\n")
        for d in movable[name]["disks"]:
            if d["qmp"] is not None:  # a migration waits for its own state's signal
                sig = os.path.join(disk_dir(state, name, d["name"]), "cutover")
                os.makedirs(os.path.dirname(sig), mode=0o700, exist_ok=True)  # not begun yet
                write_atomic(sig, b"cutover\n")  # (one migration of the VM: cutover_path)
    return asked
