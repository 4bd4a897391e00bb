"""What the threads of one pass share (the stop and the first error), and what each counts.

Every thread counts into its own Stats (a reader's and its writer's are
separate objects), so no counter is written by two threads; the engine sums
them for progress and at the end.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Stats:
    bytes_read: int = 0
    bytes_copied: int = 0
    bytes_zeroed: int = 0
    bytes_skipped: int = 0  # zeroes not written: the target reads as zero there
    bytes_unchanged: int = 0  # compare mode: digest equal to the manifest's, not written
    requests: int = 0  # reads issued
    zero_requests: int = 0
    retries: int = 0  # reads issued again after an error
    reconnects: int = 0

    @property
    def done(self) -> int:
        return self.bytes_copied + self.bytes_zeroed + self.bytes_skipped + self.bytes_unchanged

    def add(self, other: "Stats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def total(parts: list[Stats]) -> Stats:
    """The sum of parts, each read once (the threads counting them may still run)."""
    out = Stats()
    for s in parts:
        out.add(s)
    return out


@dataclass
class Shared:
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, e: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = e
        self.stop.set()
