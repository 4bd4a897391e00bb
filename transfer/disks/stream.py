"""stream:FILE: a disk kept as a frame stream in a file (transfer/stream/frames.py).

`transfer copy SOURCE stream:FILE` writes one (a delta carried another way: a USB disk, an
object store); `transfer copy stream:FILE TARGET` reads it back, every frame checked.

As a target the file is new (never written over), frames go in as the workers write them, in
any order, each appended under a lock once encoded (compression and hashing run outside it,
in the writer's own thread), and every flush ends the file with an end frame, which the next
append writes over. A file without its end frame (a copy that died) is refused as a source;
the copy removes a stream file it created and did not finish, as it does a file.

As a source the frame headers are read once, at open, into an index (checked: no overlaps,
inside the disk, one end frame, last); areas no frame covers are holes. A read decodes each
frame it touches, checking its digests, and keeps the last one decoded: reads are sequential.
"""

from __future__ import annotations

import bisect
import os
import threading
from typing import Any

from .. import _native
from ..errors import BadInput, SourceError, TargetError
from ..ranges import STATE_HOLE, STATE_ZERO, Extent
from ..stream import codec
from ..stream import frames as f
from ..url import Address
from .base import Conn, Disk, Options


def opener(addr: Address, role: str, options: Options) -> Disk:
    path = addr.url[len("stream:"):]
    if not path:
        raise BadInput("stream: needs a file name (stream:FILE)", kind=role)
    if role == "source":
        return StreamSource(addr, path, options.kernels or _native.kernels())
    return StreamTarget(addr, path, options.kernels or _native.kernels(), options.compress)


class _StreamFile(Disk):
    kind = "stream"
    fd = -1

    def identities(self) -> set[tuple]:
        if self.fd < 0:
            return set()
        st = os.fstat(self.fd)
        return {("inode", st.st_dev, st.st_ino)}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StreamTarget(_StreamFile):
    reads_zero = True  # a new stream: what no frame covers reads as zeroes
    max_connections = 4  # encoding runs in parallel; appends take turns
    zero_method = "zero-frame"

    def __init__(self, addr: Address, path: str, kernels: _native.Kernels,
                 compress: int | None) -> None:
        self.display, self.path, self.kernels = addr.display, path, kernels
        self.level = compress
        self.size = None
        self.lock = threading.Lock()
        self.tail = 0  # where the next frame goes (over the last flush's end frame)
        if os.path.lexists(path):
            raise BadInput("a stream file is written once: it exists (remove it, or name "
                           "another)", disk=self.display, kind="target")

    def create(self, size: int) -> None:
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                              0o600)
        except OSError as e:
            raise TargetError(f"cannot create the stream file: {os.strerror(e.errno)}",
                              disk=self.display) from None
        self.size, self.created = size, True
        self.append([f.pack_header(size)])

    def append(self, parts: list[bytes]) -> None:
        with self.lock:
            try:
                for p in parts:
                    self.tail += os.pwrite(self.fd, p, self.tail)
            except OSError as e:
                raise TargetError(f"writing the stream file: {os.strerror(e.errno)}",
                                  disk=self.display) from None

    def connect(self) -> Conn | None:
        return StreamWriter(self)


class StreamWriter(Conn):
    def __init__(self, disk: StreamTarget) -> None:
        self.disk = disk
        self.encoder = codec.Encoder(disk.level, codec.kernel_hasher(disk.kernels))
        self.flags = codec.kernel_zero_flags(disk.kernels)

    def write(self, view: memoryview, offset: int) -> None:
        parts: list[bytes] = []
        for a in range(0, len(view), f.MAX_FRAME):
            parts += self.encoder.chunk(view[a:a + f.MAX_FRAME], offset + a, self.flags)
        self.disk.append(parts)

    def zero(self, offset: int, length: int) -> None:
        self.disk.append([f.pack_frame(f.ZERO, offset, length)])

    def flush(self) -> None:
        d = self.disk
        with d.lock:
            end = f.pack_frame(f.END, d.size or 0, 0)
            try:
                os.pwrite(d.fd, end, d.tail)  # the next append writes over it
                os.ftruncate(d.fd, d.tail + len(end))
                os.fsync(d.fd)
            except OSError as e:
                raise TargetError(f"flushing the stream file: {os.strerror(e.errno)}",
                                  disk=d.display) from None


class StreamSource(_StreamFile):
    can_extents = True
    max_connections = 4

    def __init__(self, addr: Address, path: str, kernels: _native.Kernels) -> None:
        self.display, self.path, self.kernels = addr.display, path, kernels
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise BadInput(f"cannot open the stream file: {os.strerror(e.errno)}",
                           disk=self.display, kind="source") from None
        try:
            self.size, self.frames, self.at = self._index()
        except BaseException:
            self.close()
            raise
        self.starts = [fr.offset for fr in self.frames]

    def _index(self) -> tuple[int, list[f.Frame], list[int]]:
        """The stream's size, its data and zero frames by offset, and where each body is."""
        where = f"stream file {self.display}"
        pos = f.HEADER.size
        size = f.unpack_header(os.pread(self.fd, f.HEADER.size, 0), where)
        if size == 0:
            raise BadInput("the stream holds an empty disk", disk=self.display, kind="source")
        end_at = os.fstat(self.fd).st_size
        found: list[tuple[int, f.Frame]] = []
        while True:
            fr = f.unpack_frame(os.pread(self.fd, f.FRAME.size, pos), size, where)
            pos += f.FRAME.size
            if fr.kind == f.END:
                break
            found.append((pos, fr))
            pos += fr.body
        if pos != end_at or fr.offset != size:
            raise f.FrameError(f"{where}: bytes after its end frame, or an end frame before "
                               "the disk's end")
        found.sort(key=lambda x: x[1].offset)
        for (_, a), (_, b) in zip(found, found[1:]):
            if b.offset < a.end:
                raise f.FrameError(f"{where}: frames overlap", offset=b.offset)
        return size, [fr for _, fr in found], [p for p, _ in found]

    def connect(self) -> Conn | None:
        return StreamReader(self)

    def data_bytes(self) -> int:
        return sum(fr.length for fr in self.frames if fr.kind == f.DATA)


class StreamReader(Conn):
    def __init__(self, disk: StreamSource) -> None:
        self.disk = disk
        self.hasher = codec.kernel_hasher(disk.kernels)
        self._done: list[tuple[Any, BaseException | None]] = []
        self._last: tuple[int, bytearray] | None = None  # (frame index, its plain bytes)

    def _overlapping(self, offset: int, end: int) -> range:
        d = self.disk
        i = max(bisect.bisect_right(d.starts, offset) - 1, 0)
        j = bisect.bisect_left(d.starts, end)
        return range(i, j)

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        pos, end = offset, offset + length
        for i in self._overlapping(offset, end):
            fr = self.disk.frames[i]
            a, b = max(fr.offset, pos), min(fr.end, end)
            if b <= a:
                continue
            if a > pos:
                out.append((pos, a - pos, STATE_HOLE | STATE_ZERO))
            out.append((a, b - a, 0 if fr.kind == f.DATA else STATE_ZERO))
            pos = b
        if pos < end:
            out.append((pos, end - pos, STATE_HOLE | STATE_ZERO))
        return out

    def _plain(self, i: int) -> bytearray:
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        d, fr = self.disk, self.disk.frames[i]
        body = os.pread(d.fd, fr.body, d.at[i])
        if len(body) != fr.body:
            raise f.FrameError(f"stream file {d.display}: cut short", offset=fr.offset)
        out = bytearray(fr.length)
        codec.decode_data(fr, memoryview(body), memoryview(out), f"stream file {d.display}",
                          self.hasher)
        self._last = (i, out)
        return out

    def start_read(self, view: memoryview, offset: int, tag: Any) -> None:
        try:
            view[:] = bytes(len(view))
            end = offset + len(view)
            for i in self._overlapping(offset, end):
                fr = self.disk.frames[i]
                a, b = max(fr.offset, offset), min(fr.end, end)
                if b > a and fr.kind == f.DATA:
                    view[a - offset:b - offset] = self._plain(i)[a - fr.offset:b - fr.offset]
            self._done.append((tag, None))
        except (OSError, SourceError) as e:
            err = e if isinstance(e, SourceError) else SourceError(
                f"reading the stream file: {e}", disk=self.disk.display, offset=offset)
            self._done.append((tag, err))

    def reap(self) -> list[tuple[Any, BaseException | None]]:
        done, self._done = self._done, []
        return done
