"""Disks: one module per kind, opened from an address, both roles (nbdcopy's rw_ops)."""

from __future__ import annotations

from ..errors import BadInput
from ..url import Address, parse
from .base import Conn, Disk


def open_disk(url: str, role: str, *, direct: bool = False) -> Disk:
    """Open url as a source or target disk; BadInput names what is wrong.

    direct: a local source is read with O_DIRECT, bypassing the page cache, so
    that what is read is what the device holds (verification).
    """
    if role not in ("source", "target"):
        raise ValueError(f"role must be 'source' or 'target', not {role!r}")
    try:
        addr: Address = parse(url)
    except BadInput as e:
        e.kind = role
        raise
    if addr.kind == "null":
        if role == "source":
            raise BadInput("null: is a target only (it discards what is written)")
        from .null import NullDisk

        return NullDisk(addr, role)
    if addr.kind == "nbd":
        from .nbd import NbdDisk

        return NbdDisk(addr, role)
    from .local import LocalDisk

    return LocalDisk(addr, role, direct=direct)


__all__ = ["Conn", "Disk", "open_disk"]
