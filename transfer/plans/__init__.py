"""Migration plans: many VMs over many source hosts, within per-host and overall limits.

    spec       the plan file (YAML or JSON) read and refused with its line numbers
    schedule   slots, the order (LPT per host) and the event-driven simulation (pure)
    measure    allocated bytes and a rate sample per host; the prediction
    state      the state directory: lock, each disk's own state, status, cutover requests
    work       what one disk runs, by its VM's type (sync, verify, migrate_async)
    runner     `plan run`: the scheduler driving the disks' work, the status and the report
    status     `plan status`: the rows, reconciled with the journals when no run holds DIR

This part sits at the layer of `api` (docs/architecture.md): it imports from migration and
below, and only the CLI imports it.
"""

from __future__ import annotations

from .runner import dry_run, run_plan
from .spec import Plan, load, parse
from .state import request_cutover
from .status import status

__all__ = ["Plan", "dry_run", "load", "parse", "request_cutover", "run_plan", "status"]
