"""A plan file: YAML (JSON is YAML too) read into a Plan, every refusal naming its line.

The file is composed (yaml.compose), not loaded, so that each key and value keeps the line it
was written on: an unknown key, a duplicate VM or disk, two disks onto one target, a limit
below 1 or a cutover in the past is refused with "line N: reason" before anything starts.

    maxInflightDisksPerHost: 2      # optional, default 20 (Forklift's MAX_VM_INFLIGHT)
    maxInflight: 40                 # optional, default no limit beyond the hosts'
    vms:
      - name: web1
        host: esx1
        type: cold                  # cold | warm | live | conversion
        cutover: 2026-12-06T02:00:00Z
        disks:
          - source: nbd+unix:///?socket=/run/web1-a.sock   # or qmp: SOCKET + node: NAME
            target: /dev/sdb
            changes: [pass1.json, pass2.json]   # warm from a VMware-like source: per pass
"""

from __future__ import annotations

import datetime
import re
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import BadInput

TYPES = ("cold", "warm", "live", "conversion")
PER_HOST_DEFAULT = 20  # Forklift's MAX_VM_INFLIGHT: disks in flight per ESXi host
TOP_KEYS = {"maxInflightDisksPerHost", "maxInflight", "vms"}
VM_KEYS = {"name", "host", "type", "cutover", "disks"}
DISK_KEYS = {"name", "source", "qmp", "node", "target", "changes"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a VM or disk name is a directory


@dataclass
class DiskSpec:
    name: str
    target: str
    line: int
    source: str | None = None
    qmp: str | None = None
    node: str | None = None
    changes: list[str] = field(default_factory=list)


@dataclass
class VmSpec:
    name: str
    host: str
    type: str
    line: int
    cutover: float | None = None  # seconds since the epoch
    disks: list[DiskSpec] = field(default_factory=list)


@dataclass
class Plan:
    per_host: int = PER_HOST_DEFAULT
    overall: int | None = None
    vms: list[VmSpec] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"maxInflightDisksPerHost": self.per_host, "maxInflight": self.overall,
                "vms": [{"name": v.name, "host": v.host, "type": v.type, "cutover": v.cutover,
                         "disks": [{"name": d.name, "source": d.source, "qmp": d.qmp,
                                    "node": d.node, "target": d.target, "changes": d.changes}
                                   for d in v.disks]} for v in self.vms]}


def _bad(node: yaml.Node, why: str, path: str) -> BadInput:
    return BadInput(f"line {node.start_mark.line + 1}: {why}", disk=path, kind="plan")


class _Reader:
    """The composed document's nodes, each check refusing with the node's line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def bad(self, node: yaml.Node, why: str) -> BadInput:
        return _bad(node, why, self.path)

    def mapping(self, node: yaml.Node, keys: set[str], what: str) -> dict[str, tuple]:
        if not isinstance(node, yaml.MappingNode):
            raise self.bad(node, f"{what} must be a mapping of keys to values")
        out: dict[str, tuple] = {}
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else None
            if name not in keys:
                raise self.bad(k, f"unknown key {name!r} in {what} (known: "
                                  f"{', '.join(sorted(keys))})")
            if name in out:
                raise self.bad(k, f"key {name!r} given twice in {what}")
            out[name] = (k, v)
        return out

    def text(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.value == "":
            raise self.bad(node, f"{what} must be a non-empty string")
        return node.value

    def limit(self, node: yaml.Node, what: str) -> int:
        if not isinstance(node, yaml.ScalarNode) or not re.fullmatch(r"-?[0-9]+", node.value):
            raise self.bad(node, f"{what} must be a whole number")
        n = int(node.value)
        if n < 1:
            raise self.bad(node, f"{what} must be 1 or more, not {n}")
        return n

    def when(self, node: yaml.Node, now: float) -> float:
        text = self.text(node, "cutover")
        try:
            t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise self.bad(node, f"cutover {text!r} is not an ISO 8601 time") from None
        if t.tzinfo is None:
            raise self.bad(node, f"cutover {text!r} has no time zone (write Z for UTC)")
        if t.timestamp() < now:
            raise self.bad(node, f"cutover {text!r} is in the past")
        return t.timestamp()


def parse(text: str, path: str = "plan", *, now: float | None = None) -> Plan:
    """The plan in text (YAML or JSON); BadInput with the line of the first thing wrong."""
    r = _Reader(path)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise BadInput(f"{where}not YAML: {getattr(e, 'problem', e)}", disk=path,
                       kind="plan") from None
    if root is None:
        raise BadInput("line 1: the plan is empty", disk=path, kind="plan")
    top = r.mapping(root, TOP_KEYS, "the plan")
    plan = Plan()
    if "maxInflightDisksPerHost" in top:
        plan.per_host = r.limit(top["maxInflightDisksPerHost"][1], "maxInflightDisksPerHost")
    if "maxInflight" in top:
        plan.overall = r.limit(top["maxInflight"][1], "maxInflight")
    if "vms" not in top:
        raise r.bad(root, "the plan has no vms")
    vms = top["vms"][1]
    if not isinstance(vms, yaml.SequenceNode) or not vms.value:
        raise r.bad(vms, "vms must be a list of at least one VM")
    now = time.time() if now is None else now
    plan.vms = [_vm(r, node, now) for node in vms.value]
    _check_unique(r, plan, vms)
    return plan


def _vm(r: _Reader, node: yaml.Node, now: float) -> VmSpec:
    m = r.mapping(node, VM_KEYS, "a VM")
    for key in ("name", "host", "type", "disks"):
        if key not in m:
            raise r.bad(node, f"a VM needs {key}")
    name = r.text(m["name"][1], "name")
    if not _NAME.match(name):
        raise r.bad(m["name"][1], f"VM name {name!r}: letters, digits, '.', '_', '-' only")
    kind = r.text(m["type"][1], "type")
    if kind not in TYPES:
        raise r.bad(m["type"][1], f"type {kind!r} is not one of {', '.join(TYPES)}")
    vm = VmSpec(name, r.text(m["host"][1], "host"), kind, node.start_mark.line + 1)
    if "cutover" in m:
        if kind not in ("warm", "live"):
            raise r.bad(m["cutover"][0], f"a {kind} VM has no cutover")
        vm.cutover = r.when(m["cutover"][1], now)
    disks = m["disks"][1]
    if not isinstance(disks, yaml.SequenceNode) or not disks.value:
        raise r.bad(disks, f"VM {name}: disks must be a list of at least one disk")
    vm.disks = [_disk(r, d, i, kind) for i, d in enumerate(disks.value)]
    return vm


def _disk(r: _Reader, node: yaml.Node, index: int, kind: str) -> DiskSpec:
    m = r.mapping(node, DISK_KEYS, "a disk")
    if "target" not in m:
        raise r.bad(node, "a disk needs a target")
    name = r.text(m["name"][1], "disk name") if "name" in m else f"disk{index}"
    if not _NAME.match(name):
        raise r.bad(m["name"][1], f"disk name {name!r}: letters, digits, '.', '_', '-' only")
    d = DiskSpec(name, r.text(m["target"][1], "target"), node.start_mark.line + 1)
    if "source" in m and ("qmp" in m or "node" in m):
        raise r.bad(node, "a disk has a source, or a qmp socket and a node, not both")
    if "source" in m:
        if kind == "live":
            raise r.bad(m["source"][0], "a live VM's disk is a qmp socket and a node")
        d.source = r.text(m["source"][1], "source")
    elif "qmp" in m and "node" in m:
        if kind not in ("warm", "live"):
            raise r.bad(m["qmp"][0], f"a {kind} VM's disk needs a source, not a qmp socket")
        d.qmp, d.node = r.text(m["qmp"][1], "qmp"), r.text(m["node"][1], "node")
    else:
        raise r.bad(node, "a disk needs a source, or a qmp socket and a node")
    if "changes" in m:
        if kind != "warm" or d.source is None:
            raise r.bad(m["changes"][0], "changes belong to a warm VM's disk with a source")
        seq = m["changes"][1]
        if not isinstance(seq, yaml.SequenceNode):
            raise r.bad(seq, "changes must be a list of changed-areas files, one per pass")
        d.changes = [r.text(c, "a changes file") for c in seq.value]
    return d


def _check_unique(r: _Reader, plan: Plan, vms: yaml.SequenceNode) -> None:
    """No VM twice, no disk twice (by name in its VM, or by source), no target twice."""
    names: set[str] = set()
    sources: dict[str, str] = {}
    targets: dict[str, str] = {}
    for vm, node in zip(plan.vms, vms.value):
        if vm.name in names:
            raise r.bad(node, f"VM {vm.name!r} is listed twice")
        names.add(vm.name)
        disk_names: set[str] = set()
        for d, dnode in zip(vm.disks, r.mapping(node, VM_KEYS, "a VM")["disks"][1].value):
            here = f"{vm.name}/{d.name}"
            if d.name in disk_names:
                raise r.bad(dnode, f"disk {here} is listed twice")
            disk_names.add(d.name)
            source = d.source if d.source is not None else f"qmp:{d.qmp}#{d.node}"
            if source in sources:
                raise r.bad(dnode, f"disk {here} has the same source as {sources[source]}")
            sources[source] = here
            if d.target in targets:
                raise r.bad(dnode, f"disk {here} has the same target as {targets[d.target]} "
                                   f"({d.target})")
            targets[d.target] = here


def load(path: str, *, now: float | None = None) -> Plan:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise BadInput(f"cannot read the plan: {e.strerror}", disk=path, kind="plan") from None
    return parse(text, path, now=now)


def from_dict(data: dict[str, Any]) -> Plan:
    """The plan as plan.json keeps it (Plan.to_dict), for status and cutover."""
    return Plan(data["maxInflightDisksPerHost"], data.get("maxInflight"),
                [VmSpec(v["name"], v["host"], v["type"], 0, v.get("cutover"),
                        [DiskSpec(d["name"], d["target"], 0, d.get("source"), d.get("qmp"),
                                  d.get("node"), d.get("changes") or []) for d in v["disks"]])
                 for v in data["vms"]])
