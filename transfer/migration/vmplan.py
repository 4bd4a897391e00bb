"""What a migration was asked to do (Plan: its disks, checked), its own log (which pass is
next, the passes so far, the hand-over times: one durable write per pass for all disks), the
cutover request file, and the line a signal ends a migration with."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, AsyncContextManager, Callable

from ..durable import write_atomic
from ..errors import BadInput, Interrupted
from .vmdisks import check_disks

PassGate = Callable[[int], AsyncContextManager[Any]]


@dataclass
class Plan:
    """What migrate_async was asked to do (its keyword arguments, checked)."""

    kind: str
    disks: list[tuple[str, str]]  # (node, target)
    qmp: str
    nbd_socket: str | None
    precopy_interval: float
    cutover_at: float | None
    cutover_now: bool
    max_downtime: float
    on_cutover: str | None
    cutover_timeout: float
    max_passes: int
    verify_source: bool
    stop_estimate: float = 0.0
    pass_gate: PassGate | None = None


def disk_pairs(target: str | None, node: str | None,
               disks: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    """The (node, target) pairs: target with node (one disk), or disks, not both."""
    if disks is not None and (target is not None or node is not None):
        raise BadInput("give target and node (one disk) or disks, not both")
    if disks is None:
        if target is None or node is None:
            raise BadInput("give target and node (one disk) or disks")
        disks = [(node, target)]
    pairs = [(str(n), str(t)) for n, t in disks]
    check_disks(pairs)
    return pairs


class MigrationLog:
    """The migration's log, migrate.json: {next, passes, handover, node, type}. node is the
    one disk's node name (as it always was), or the list of a VM's nodes in order."""

    def __init__(self, path: str, node: Any, kind: str) -> None:
        self.path, self.node, self.kind = path, node, kind

    def load(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                log = json.load(f)
        except FileNotFoundError:
            return {"next": 0, "passes": [], "handover": {}}
        except (OSError, ValueError) as e:
            raise BadInput(f"unreadable migration log: {e}", disk=self.path,
                           kind="state") from None
        if (not isinstance(log, dict) or not isinstance(log.get("next"), int)
                or not isinstance(log.get("passes"), list)
                or not isinstance(log.get("handover"), dict) or log.get("node") != self.node
                or log.get("type") != self.kind):
            what = "nodes" if isinstance(self.node, list) else "node"
            raise BadInput(f"the migration log is not for this {what} and type",
                           disk=self.path, kind="state")
        return log

    def save(self, log: dict[str, Any]) -> None:
        log.update(node=self.node, type=self.kind)
        write_atomic(self.path, json.dumps(log).encode())


def request_cutover(state: str) -> None:
    """`transfer cutover`: ask the migration running on state to cut over after its pass."""
    if not os.path.isdir(state):
        raise BadInput("no migration state here", disk=state, kind="state")
    fd = os.open(os.path.join(state, "cutover"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)


def interrupted(phase: str, vm: str, on_cutover: str | None) -> Interrupted:
    """The one line a signal ends a migration with: where it was, and the VM's state."""
    if vm.startswith("stopped"):
        said = "the VM was stopped (--on-cutover completed)"
    elif vm != "not stopped":
        said = ("the --on-cutover command was terminated before it completed: the VM may "
                "still run")
    elif on_cutover:
        said = "the VM was not stopped (--on-cutover had not run)"
    else:
        said = "no --on-cutover command was given"
    return Interrupted(f"interrupted by a signal {phase}; {said}; no final pass finished; "
                       "the same command resumes the migration")
