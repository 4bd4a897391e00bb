"""A bounded pool of page-aligned, reusable buffers, one pool per worker.

One anonymous mmap is cut into equal slots: page-aligned (so usable with
O_DIRECT), allocated once, reused for every request; a worker that has no
free slot waits for a completion before issuing more reads, which is the
backpressure by bytes. Per-worker pools need no lock (nbdcopy keeps buffers
per thread for the same reason).
"""

from __future__ import annotations

import mmap


class BufferPool:
    def __init__(self, count: int, size: int) -> None:
        if count <= 0 or size <= 0:
            raise ValueError(f"a pool needs slots: {count} x {size}")
        self.size = size
        self._map = mmap.mmap(-1, count * size)
        self._view = memoryview(self._map)
        self.slots = [self._view[i * size : (i + 1) * size] for i in range(count)]
        self.free = list(range(count))

    def close(self) -> None:
        try:
            for v in self.slots:
                v.release()
            self._view.release()
            self._map.close()
        except BufferError:
            # A slice of a slot is still referenced (say by a traceback after an error);
            # the map is unmapped when the last reference goes.
            pass
