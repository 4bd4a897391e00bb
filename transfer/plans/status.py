"""`transfer plan status`: the plan's disks as the running (or last) `plan run` left them.

status.json is what the run wrote last; when no run holds the state, a disk it showed in
flight is "stopped", and one whose journal says complete is "done" (the journal is the truth:
a run killed between a disk's completion and its next status write left it behind).
"""

from __future__ import annotations

import os
from typing import Any

from .spec import from_dict
from .state import done_digest, read_json, read_plan, running


def status(state: str) -> dict[str, Any]:
    plan = from_dict(read_plan(state))
    data = read_json(os.path.join(state, "status.json")) or {"disks": []}
    data["running"] = running(state)
    rows = {(r["vm"], r["disk"]): r for r in data["disks"]}
    for vm in plan.vms:
        for d in vm.disks:
            row = rows.get((vm.name, d.name))
            if row is None:
                row = rows[(vm.name, d.name)] = {"vm": vm.name, "disk": d.name, "host": vm.host,
                                                 "type": vm.type, "state": "waiting", "pass": None,
                                                 "bytes": 0, "total": 0, "rate": None,
                                                 "predicted_downtime": None}
            if not data["running"] and row["state"] != "done":
                digest = done_digest(state, vm, d)
                if digest is not None:
                    row["state"], row["digest"] = "done", digest
                elif row["state"] not in ("waiting", "failed"):
                    row["state"] = "stopped"
    data["disks"] = list(rows.values())
    return data
