"""Disks: one module per kind, opened from an address, both roles (nbdcopy's rw_ops)."""

from __future__ import annotations

from .._native import Kernels
from ..errors import BadInput
from ..tls import Tls
from ..url import Address, parse
from .base import Conn, Disk


def open_disk(url: str, role: str, *, direct: bool = False, timeout: float | None = None,
              kernels: Kernels | None = None, contexts: tuple[str, ...] = (),
              tls: Tls | None = None) -> Disk:
    """Open url as a source or target disk; BadInput names what is wrong.

    direct: a local source is read with O_DIRECT, bypassing the page cache, so
    that what is read is what the device holds (verification). timeout: seconds
    an NBD server may take over a handshake, or with reads in flight, before it
    is given up on (libnbd has no timeout of its own). kernels: the native
    kernels a local disk's system calls and an NBD disk's block status go
    through (default: $TRANSFER_NATIVE's).
    contexts: extra NBD metadata contexts to negotiate (a dirty bitmap's);
    other disk kinds have none. tls: credentials for nbds:// disks (None: the
    operator's $TRANSFER_TLS_CA / $TRANSFER_TLS_PSK_FILE; see transfer.tls).
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

        if timeout is None:
            return NbdDisk(addr, role, contexts=contexts, kernels=kernels, tls=tls)
        return NbdDisk(addr, role, connect_timeout=timeout, io_timeout=timeout, contexts=contexts,
                       kernels=kernels, tls=tls)
    from .local import LocalDisk

    return LocalDisk(addr, role, direct=direct, kernels=kernels)


__all__ = ["Conn", "Disk", "open_disk"]
