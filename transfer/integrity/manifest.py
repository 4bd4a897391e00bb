"""The manifest: one xxh3-128 digest per 64 KiB block of a disk.

Block i covers bytes [i*BLOCK, min((i+1)*BLOCK, size)); its digest is
xxhash.xxh3_128(block).digest() (16 bytes, canonical big-endian). A hole or
zero extent gets the digest of a zero block of its length without reading.

The disk digest is xxh3_128(d_0 || ... || d_{n-1} || u64le(size) || u32le(BLOCK)),
written "xxh3-128:64k:<32 hex digits>". It depends only on the bytes, so a
raw file, a qcow2 behind qemu-nbd and a block device holding the same bytes
have the same digest.

Digests live in a memory map, anonymous or of a manifest file (16 bytes per
64 KiB: 256 MiB for 1 TiB); pipeline workers write disjoint slices of it
without locking.

A mapped file is preallocated (posix_fallocate, or zeroes written where the
file system cannot) before it is mapped writable: a store into a page of a
sparse file on a full file system kills the process with SIGBUS, with no
message and nothing flushed. A full or failing file system is a StateIOError
(exit 4) when the file is created, opened, synced or saved; msync and fsync
failures are final, never retried (RELIABILITY.md R6).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from functools import lru_cache

import xxhash

from ..durable import fsync_file, replace, why
from ..errors import BadInput, StateIOError

BLOCK = 64 * 1024
DIGEST_SIZE = 16
PREFIX = "xxh3-128:64k:"
_FILL_BLOCKS = 65536  # zero digests written per slice assignment: 1 MiB of manifest
_WRITE_BACK = 1 << 20  # bytes written back per step where the file system cannot fallocate


@lru_cache(maxsize=8)
def zero_digest(length: int = BLOCK) -> bytes:
    """The digest of `length` zero bytes (cached: a full block and the disk's tail)."""
    return xxhash.xxh3_128(bytes(length)).digest()


def digest_string(raw: bytes) -> str:
    return PREFIX + raw.hex()


class ManifestError(BadInput):
    """A manifest file that is not one, or not for this disk."""


# A manifest file: this 64-byte header, then one 16-byte digest per block.
#   magic "TRMANIF\0", u32 version, u32 block, u64 size, 32 reserved zero bytes,
#   u64 xxh3-64 of the 56 bytes before it.
_HEADER = struct.Struct("<8sIIQ32sQ")
MAGIC = b"TRMANIF\0"
VERSION = 1
HEADER_SIZE = _HEADER.size
POISON = b"\xff" * 16  # a digest no block has (2^-128): "write this block again"
_RUN_SLOTS = 256  # digests compared at once (4 KiB) when extending a run or comparing manifests


class Manifest:
    """Digests of a disk's blocks, in memory (anonymous map) or in a memory-mapped file.

    A file-backed manifest costs disk, not RAM (256 MiB for a 1 TiB disk), and
    a later pass can rewrite only the blocks it copies. Files are validated on
    open (magic, version, block size, size, header checksum, length); a
    manifest written by create() appears under its name only once save()
    has made it durable.
    """

    def __init__(self, size: int, block: int = BLOCK, *, _map: mmap.mmap | None = None,
                 _offset: int = 0, _path: str | None = None, _tmp: str | None = None) -> None:
        if size < 0:
            raise ValueError(f"negative disk size {size}")
        self.size = size
        self.block = block
        self.blocks = (size + block - 1) // block
        self.path = _path
        self._tmp = _tmp
        self._map = _map if _map is not None else mmap.mmap(-1, max(1, self.blocks * DIGEST_SIZE))
        self._offset = _offset  # where the digests start in the map
        self._full = memoryview(self._map)
        self.view = self._full[_offset : _offset + self.blocks * DIGEST_SIZE]

    @classmethod
    def create(cls, path: str, size: int) -> "Manifest":
        """A new file-backed manifest; it takes the name path when save() succeeds."""
        blocks = (size + BLOCK - 1) // BLOCK
        length = HEADER_SIZE + blocks * DIGEST_SIZE
        tmp = f"{path}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StateIOError(f"cannot create the manifest: {why(e)}", disk=path,
                               kind="manifest") from None
        try:
            try:
                os.ftruncate(fd, length)
                _preallocate(fd, length, path)
                os.pwrite(fd, _header(size, BLOCK), 0)
                m = mmap.mmap(fd, length)
            finally:
                os.close(fd)
        except BaseException as e:
            try:
                os.unlink(tmp)  # a full file system gets its space back
            except OSError:
                pass
            if isinstance(e, OSError):
                raise StateIOError(f"cannot create the manifest ({length} bytes): {why(e)}",
                                   disk=path, kind="manifest") from None
            raise
        return cls(size, _map=m, _offset=HEADER_SIZE, _path=path, _tmp=tmp)

    @classmethod
    def open(cls, path: str, *, writable: bool = False) -> "Manifest":
        """Open and validate a manifest file; ManifestError names what is wrong. A writable
        one is preallocated first (a file written sparse, by a copy or an older engine)."""
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as e:
            raise ManifestError(f"cannot open the manifest: {os.strerror(e.errno)}",
                                disk=path, kind="manifest") from None
        try:
            try:
                length = os.fstat(fd).st_size
                head = os.pread(fd, HEADER_SIZE, 0)
            except OSError as e:
                raise StateIOError(f"cannot read the manifest: {why(e)}", disk=path,
                                   kind="manifest") from None
            size = _check_header(head, length, path)
            if writable:
                _preallocate(fd, length, path)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            m = mmap.mmap(fd, length, prot=prot) if length else mmap.mmap(-1, 1)
        finally:
            os.close(fd)
        return cls(size, _map=m, _offset=HEADER_SIZE, _path=path)

    def save(self) -> None:
        """Make a file-backed manifest durable, then give it its name (tmp, fsync, rename).
        A failure is a StateIOError and final (R6): the name is not given."""
        if self.path is None:
            raise ValueError("an in-memory manifest has no file to save")
        try:
            self._map.flush()
            fsync_file(self._tmp or self.path)
            if self._tmp is not None:
                replace(self._tmp, self.path)
                self._tmp = None
        except OSError as e:
            raise StateIOError(f"cannot save the manifest: {why(e)}", disk=self.path,
                               kind="manifest") from None

    def sync(self) -> None:
        """Write a file-backed manifest's changed digests to its file, durably (msync). A
        failure is a StateIOError and final (R6): the pages it lost are not written again."""
        try:
            self._map.flush()
        except OSError as e:
            raise StateIOError(f"msync failed: {why(e)}", disk=self.path, kind="manifest") \
                from None

    def block_length(self, index: int) -> int:
        return min(self.block, self.size - index * self.block)

    def slice(self, offset: int, length: int) -> memoryview:
        """The digest slots of the blocks covering [offset, offset+length); offset block-aligned."""
        first = offset // self.block
        last = (offset + length + self.block - 1) // self.block
        return self.view[first * DIGEST_SIZE : last * DIGEST_SIZE]

    def set_zero(self, offset: int, length: int) -> None:
        """Record [offset, offset+length) (block-aligned, or ending at size) as zero."""
        first = offset // self.block
        last = (offset + length + self.block - 1) // self.block
        full_end = min(last, self.size // self.block)
        chunk = zero_digest(self.block) * min(max(full_end - first, 0), _FILL_BLOCKS)
        for start in range(first, full_end, _FILL_BLOCKS):
            n = min(_FILL_BLOCKS, full_end - start)
            self.view[start * DIGEST_SIZE : (start + n) * DIGEST_SIZE] = chunk[: n * DIGEST_SIZE]
        for i in range(max(first, full_end), last):
            self.view[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = zero_digest(self.block_length(i))

    def zero_runs(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(offset, length) runs of blocks in [offset, offset+length) whose digest is a zero block's.

        offset is block-aligned; runs are clipped to the disk's size.
        """
        first = offset // self.block
        last = min(self.blocks, (offset + length + self.block - 1) // self.block)
        if last <= first:
            return []
        full = min(last, self.size // self.block)  # the blocks of a whole block's length
        runs = self._runs(zero_digest(self.block), first, full) if full > first else []
        if last > full and bytes(self.slice(full * self.block, 1)) == zero_digest(
                self.block_length(full)):  # the short last block has its own digest
            if runs and runs[-1][1] == full * self.block:
                runs[-1] = (runs[-1][0], self.size)
            else:
                runs.append((full * self.block, self.size))
        return [(a, b - a) for a, b in runs]

    def _runs(self, digest: bytes, first: int, last: int) -> list[tuple[int, int]]:
        """(start, end) byte runs of the blocks in [first, last) whose digest is digest. The
        map is searched in C (mmap.find), a run extended a _RUN_SLOTS chunk at a time: no numpy,
        whose import (55-80 ms here) a CLI pass would pay, and little Python per run."""
        runs: list[tuple[int, int]] = []
        base, stop = self._offset, self._offset + last * DIGEST_SIZE
        chunk = digest * _RUN_SLOTS
        pos = self._map.find(digest, base + first * DIGEST_SIZE, stop)
        while pos != -1:
            if (pos - base) % DIGEST_SIZE:  # straddles two slots: not a block's digest
                pos = self._map.find(digest, pos + 1, stop)
                continue
            end = pos + DIGEST_SIZE
            while end + len(chunk) <= stop and self._full[end : end + len(chunk)] == chunk:
                end += len(chunk)
            while end < stop and self._full[end : end + DIGEST_SIZE] == digest:
                end += DIGEST_SIZE
            i, j = (pos - base) // DIGEST_SIZE, (end - base) // DIGEST_SIZE
            runs.append((i * self.block, min(j * self.block, self.size)))
            pos = self._map.find(digest, end, stop)
        return runs

    def runs_of(self, digest: bytes) -> list[tuple[int, int]]:
        """(start, end) runs of the blocks whose digest is digest, in disk order (ends clipped
        to the size)."""
        return self._runs(digest, 0, self.blocks)

    def digest(self) -> bytes:
        h = xxhash.xxh3_128()
        h.update(self.view)
        h.update(struct.pack("<QI", self.size, self.block))
        return h.digest()

    def digest_string(self) -> str:
        return digest_string(self.digest())

    def differences(self, other: "Manifest", limit: int) -> tuple[int, list[int]]:
        """How many blocks differ from other's, and the offsets of the first `limit` of them.

        Both must describe disks of one size. Compared a RUN_SLOTS chunk at a time in C, then
        slot by slot inside a chunk that differs: memory stays bounded for any disk size, and
        no numpy (see _runs).
        """
        if (self.size, self.block) != (other.size, other.block):
            raise ValueError(f"manifests of different disks: {self.size} and {other.size} bytes")
        count, offsets = 0, []
        step = _RUN_SLOTS * DIGEST_SIZE
        a, b = self.view, other.view
        for start in range(0, len(a), step):
            if a[start : start + step] == b[start : start + step]:
                continue
            for pos in range(start, min(start + step, len(a)), DIGEST_SIZE):
                if a[pos : pos + DIGEST_SIZE] != b[pos : pos + DIGEST_SIZE]:
                    count += 1
                    if len(offsets) < limit:
                        offsets.append(pos // DIGEST_SIZE * self.block)
        return count, offsets

    def close(self) -> None:
        self.view.release()
        self._full.release()
        self._map.close()
        if self._tmp is not None:  # never saved: leave no half-written manifest behind
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass


def _preallocate(fd: int, length: int, path: str) -> None:
    """Give every byte of the file's first `length` its blocks now, so that stores into a
    shared mapping of it never need a block (ENOSPC there is SIGBUS). Where the file system
    has no fallocate (EOPNOTSUPP; glibc emulates it on most), what the file holds is written
    back over itself instead; ENOSPC (or EDQUOT, EFBIG) is a StateIOError naming the size."""
    try:
        os.posix_fallocate(fd, 0, length)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise StateIOError(f"cannot preallocate the manifest ({length} bytes): {why(e)}",
                               disk=path, kind="manifest") from None
    try:
        for off in range(0, length, _WRITE_BACK):
            # what the file holds there, written back: every block it covers is then allocated
            view = memoryview(os.pread(fd, min(_WRITE_BACK, length - off), off))
            pos = off
            while view:  # a short write on a full file system: go on until its ENOSPC
                w = os.pwrite(fd, view, pos)
                if w <= 0:
                    raise OSError(0, f"write returned {w}")
                view, pos = view[w:], pos + w
    except OSError as e:
        raise StateIOError(f"cannot preallocate the manifest ({length} bytes) by writing it "
                           f"(the file system cannot fallocate): {why(e)}",
                           disk=path, kind="manifest") from None


def _header(size: int, block: int) -> bytes:
    body = _HEADER.pack(MAGIC, VERSION, block, size, bytes(32), 0)[:-8]
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def _check_header(head: bytes, length: int, path: str) -> int:
    def bad(why: str) -> ManifestError:
        return ManifestError(f"not a valid manifest: {why}", disk=path, kind="manifest")

    if len(head) < HEADER_SIZE:
        raise bad(f"{len(head)} bytes, shorter than its header")
    magic, version, block, size, reserved, check = _HEADER.unpack(head)
    if magic != MAGIC:
        raise bad("wrong magic")
    if xxhash.xxh3_64_intdigest(head[:-8]) != check:
        raise bad("header checksum mismatch")
    if version != VERSION:
        raise bad(f"version {version}, this engine reads version {VERSION}")
    if block != BLOCK:
        raise bad(f"block size {block}, expected {BLOCK}")
    if reserved != bytes(32):
        raise bad("reserved header bytes are not zero")
    expected = HEADER_SIZE + (size + block - 1) // block * DIGEST_SIZE
    if length != expected:
        raise bad(f"{length} bytes, expected {expected} for a {size}-byte disk")
    return size
