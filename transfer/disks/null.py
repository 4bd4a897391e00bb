"""null: a target that discards everything: the benchmark sink (nbdcopy's null:)."""

from __future__ import annotations

from ..errors import BadInput
from ..url import Address
from .base import Conn, Disk, Options

MAX_CONNECTIONS = 64


def opener(addr: Address, role: str, options: Options) -> Disk:
    """open_disk for null: (no options concern it)."""
    if role == "source":
        raise BadInput("null: is a target only (it discards what is written)")
    return NullDisk(addr)


class NullDisk(Disk):
    kind = "null"
    reads_zero = True  # zero runs cost nothing: they count as skipped
    max_connections = MAX_CONNECTIONS

    def __init__(self, addr: Address) -> None:
        self.display = addr.display
        self.size = None  # takes any size

    def create(self, size: int) -> None:
        self.size = size

    def connect(self) -> Conn | None:
        return NullConn()


class NullConn(Conn):
    def write(self, view: memoryview, offset: int) -> None:
        pass

    def zero(self, offset: int, length: int) -> None:
        pass

    def flush(self) -> None:
        pass
