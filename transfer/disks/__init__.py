"""Disks: one module per kind, opened from an address, both roles (nbdcopy's rw_ops)."""

from __future__ import annotations

import importlib

from .._native import Kernels
from ..errors import BadInput
from ..stream.codec import parse_compress
from ..tls import Tls
from ..url import Address, parse
from .base import Conn, Disk, Options

# An address's kind (url.parse tells them apart) -> the module whose opener() opens it. The
# module is imported on first use: a local copy never loads libnbd (~6 ms), nor NBD the rest.
OPENERS = {"local": ".local", "nbd": ".nbd", "null": ".null", "stream": ".stream",
           "http": ".http"}


def open_disk(url: str, role: str, *, direct: bool = False, timeout: float | None = None,
              kernels: Kernels | None = None, contexts: tuple[str, ...] = (),
              tls: Tls | None = None, compress: str = "auto") -> Disk:
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
    compress: how a stream:FILE target compresses its frames (auto, none, zstd[:LEVEL]).
    """
    if role not in ("source", "target"):
        raise ValueError(f"role must be 'source' or 'target', not {role!r}")
    try:
        addr: Address = parse(url)
    except BadInput as e:
        e.kind = role
        raise
    level = parse_compress(compress)
    module = importlib.import_module(OPENERS[addr.kind], __name__)
    options = Options(direct=direct, timeout=timeout, kernels=kernels, contexts=contexts, tls=tls,
                      compress=level, compress_auto=compress == "auto")
    return module.opener(addr, role, options)


__all__ = ["Conn", "Disk", "open_disk"]
