"""null: a target that discards everything: the benchmark sink (nbdcopy's null:)."""

from __future__ import annotations

from typing import Any

from ..url import Address
from .base import Conn, Disk

MAX_CONNECTIONS = 64


class NullDisk(Disk):
    kind = "null"
    reads_zero = True  # zero runs cost nothing: they count as skipped
    zero_method = "none"

    def __init__(self, addr: Address, role: str) -> None:
        self.display = addr.display
        self.size = None  # takes any size
        self.max_connections = MAX_CONNECTIONS

    def create(self, size: int) -> None:
        self.size = size

    def connect(self) -> Conn | None:
        return NullConn()

    def describe(self) -> dict[str, Any]:
        return {"url": self.display, "kind": self.kind, "size": self.size}


class NullConn(Conn):
    def write(self, view: memoryview, offset: int) -> None:
        pass

    def zero(self, offset: int, length: int) -> None:
        pass

    def flush(self) -> None:
        pass
