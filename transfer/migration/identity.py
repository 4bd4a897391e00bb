"""Which disk a warm migration's state belongs to, wherever it is served (issue 11, item 5).

The state is bound to the source disk, not to its address: orchestrators serve every stage
from a new socket or URL. The disk is the orchestrator's --source-id when given; else an NBD
export's name (and size), a local file's device and inode, a block device's number or a loop
device's backing file. The tracker audit (transfer.tracking.audit) then checks the disk's
content before every delta pass: a name proves little on its own.
"""

from __future__ import annotations

from typing import Any

from ..disks import Disk
from ..errors import TargetRefused


def differences(bound: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a bound identity and the disk's now, the size aside (a source's
    size change makes a full pass, R2; a target may grow with its source)."""
    return [f"{k} {bound.get(k)!r} is now {now.get(k)!r}"
            for k in sorted(set(bound) | set(now)) if k != "size" and bound.get(k) != now.get(k)]


def export_name(uri: str) -> str:
    """The export name an NBD URI asks for: its path without the leading slash."""
    import urllib.parse

    return urllib.parse.unquote(urllib.parse.urlsplit(uri).path[1:])


def source_identity(src: Disk, source_id: str | None) -> dict[str, Any]:
    """What the state binds the source to: the disk's identity fields, with its address
    (redacted) recorded beside them, and the orchestrator's --source-id when given."""
    ident = dict(src.identity())
    if ident.get("kind") == "nbd":
        ident["export"] = export_name(ident.get("uri", ""))
    if source_id is not None:
        ident["id"] = source_id
    return ident


def disk_key(ident: dict[str, Any]) -> dict[str, Any]:
    """Which disk an identity names, wherever it is served: an NBD export's name; a file's
    device and inode (it may be renamed); a block device's number, or a loop device's backing
    file. The address (uri, path) is not part of it: orchestrators serve every stage from a
    new socket or URL. Bind records before --source-id have no "export": the uri's."""
    kind = ident.get("kind")
    if kind == "nbd":
        return {"kind": kind, "export": ident.get("export", export_name(ident.get("uri", "")))}
    if kind == "file":
        return {"kind": kind, "dev": ident.get("dev"), "inode": ident.get("inode")}
    if kind == "block":
        if ident.get("loop_backing"):
            return {"kind": kind, "loop_backing": ident["loop_backing"]}
        return {"kind": kind, "rdev": ident.get("rdev")}
    return {k: v for k, v in ident.items() if k not in ("uri", "path", "size", "id")}


def check_source(bound: dict[str, Any], now: dict[str, Any], source_id: str | None,
                  source_moved: bool, display: str, notes: list[str]) -> None:
    """Refuse a source that is not the bound disk (TargetRefused, exit 2); note what changed.

    With a bound --source-id, the id decides: the same id is the same disk wherever it is
    served, another id (or none) is refused. Without one, the disk key decides (disk_key);
    --source-moved accepts a different key on the operator's word, as before. The tracker
    audit (transfer.tracking.audit) then checks the disk's content before any delta pass.
    """
    bound_id = bound.get("id")
    if bound_id is not None and source_id is None:
        raise TargetRefused(f"this state is bound to source id {bound_id!r}; pass --source-id "
                            f"{bound_id}", disk=display, kind="source")
    if bound_id is not None and bound_id != source_id:
        raise TargetRefused(f"this state belongs to source id {bound_id!r}, not {source_id!r}",
                            disk=display, kind="source")
    if bound_id is None:
        diff = differences(disk_key(bound), disk_key(now))
        if diff and not source_moved:
            raise TargetRefused("this state belongs to another source: " + "; ".join(diff)
                                + " (if it is the same disk, pass --source-id or --source-moved)",
                                disk=display, kind="source")
        if diff:
            notes.append("source accepted on --source-moved: " + "; ".join(diff))
        elif source_moved:
            notes.append("--source-moved is no longer needed: the state is bound to the disk, "
                         "not to its address")
    moved = differences({k: v for k, v in bound.items() if k != "id"},
                         {k: now.get(k) for k in bound if k != "id"})
    if moved:
        notes.append("source moved: " + "; ".join(moved))
    if bound_id is None and source_id is not None:
        notes.append(f"the state is now bound to source id {source_id!r}")
