"""A synthetic guest: writes to a running disk through NBD at a steady rate, logging each write.

Tests and the demo use it as "the VM" of a warm or live migration: a
qemu-storage-daemon exports the disk writable, this writes through the
export, and the log (wall time before and after each write, offset, length,
kind) lets a test check that every write after checkpoint k is covered by
bitmap k+1 or a later one (RELIABILITY.md C4).

Patterns: scattered (anywhere), hotspot (most writes in 5 % of the disk) and
sequential (a cursor moving through the disk). One write in twenty zeroes
its range instead (the guest trimmed it).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

PATTERNS = ("scattered", "hotspot", "sequential")


@dataclass(frozen=True, slots=True)
class Write:
    began: float  # time.time() before the request was sent
    ended: float  # time.time() after its reply
    offset: int
    length: int
    zero: bool


class GuestWriter:
    def __init__(self, uri: str, *, rate: float, pattern: str = "scattered", seed: int = 1,
                 max_write: int = 256 << 10) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, not {pattern!r}")
        import nbd

        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.size = self.h.get_size()
        self.rate = rate  # bytes per second
        self.pattern = pattern
        self.rng = random.Random(seed)
        self.max_write = max_write
        self.log: list[Write] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="guest-writer", daemon=True)
        self._cursor = 0

    def start(self) -> "GuestWriter":
        self._thread.start()
        return self

    def alive(self) -> bool:
        """Whether the writer thread still runs (it ends on stop() or on a failed write)."""
        return self._thread.is_alive()

    def stop(self) -> list[Write]:
        """Stop writing (the VM is shut down); every logged write has completed."""
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.log

    def close(self) -> None:
        if self._thread.is_alive():
            self.stop()
        self.h.shutdown()

    def _next(self) -> tuple[int, int]:
        r, size = self.rng, self.size
        length = r.choice([4096, 16384, 65536, self.max_write])
        if self.pattern == "sequential":
            offset = self._cursor
            self._cursor = (self._cursor + length) % (size - length)
        elif self.pattern == "hotspot" and r.random() < 0.9:
            hot = max(size // 20, length)
            offset = size // 3 + r.randrange(0, hot - length + 1)
        else:
            offset = r.randrange(0, size - length)
        offset -= offset % 512
        return offset, length

    def _run(self) -> None:
        try:
            start = time.monotonic()
            written = 0
            while not self._stop.is_set():
                offset, length = self._next()
                zero = self.rng.random() < 0.05
                began = time.time()
                if zero:
                    self.h.zero(length, offset)
                else:
                    self.h.pwrite(self.rng.randbytes(length), offset)
                self.log.append(Write(began, time.time(), offset, length, zero))
                written += length
                ahead = written / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    self._stop.wait(ahead)
        except BaseException as e:  # reported by stop()
            self.error = e


def main(argv: list[str] | None = None) -> int:
    """python -m transfer.demo.workload URI --rate BYTES/S [--pattern P] [--seed N] --stop FILE
    --stopped FILE: write until FILE appears (the VM is being shut down), then create the
    stopped file and exit (the demo's guest, in its own process)."""
    import argparse
    import os

    p = argparse.ArgumentParser(prog="python -m transfer.demo.workload")
    p.add_argument("uri")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--pattern", choices=PATTERNS, default="hotspot")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stop", required=True)
    p.add_argument("--stopped", required=True)
    a = p.parse_args(argv)
    w = GuestWriter(a.uri, rate=a.rate, pattern=a.pattern, seed=a.seed).start()
    try:
        while not os.path.exists(a.stop):
            time.sleep(0.01)
        log = w.stop()
    finally:
        w.close()
    with open(a.stopped, "w") as f:
        f.write(f"{len(log)} writes, {sum(x.length for x in log)} bytes\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
