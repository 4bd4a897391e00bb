"""The manifest: one xxh3-128 digest per 64 KiB block of a disk.

Block i covers bytes [i*BLOCK, min((i+1)*BLOCK, size)); its digest is
xxhash.xxh3_128(block).digest() (16 bytes, canonical big-endian). A hole or
zero extent gets the digest of a zero block of its length without reading.

The disk digest is xxh3_128(d_0 || ... || d_{n-1} || u64le(size) || u32le(BLOCK)),
written "xxh3-128:64k:<32 hex digits>". It depends only on the bytes, so a
raw file, a qcow2 behind qemu-nbd and a block device holding the same bytes
have the same digest.

Digests live in an anonymous memory map (16 bytes per 64 KiB: 256 MiB for
1 TiB); pipeline workers write disjoint slices of it without locking.
"""

from __future__ import annotations

import mmap
import struct
from functools import lru_cache

import xxhash

BLOCK = 64 * 1024
DIGEST_SIZE = 16
PREFIX = "xxh3-128:64k:"
_FILL_BLOCKS = 65536  # zero digests written per slice assignment: 1 MiB of manifest


@lru_cache(maxsize=8)
def zero_digest(length: int = BLOCK) -> bytes:
    """The digest of `length` zero bytes (cached: a full block and the disk's tail)."""
    return xxhash.xxh3_128(bytes(length)).digest()


def digest_string(raw: bytes) -> str:
    return PREFIX + raw.hex()


class Manifest:
    def __init__(self, size: int, block: int = BLOCK) -> None:
        if size < 0:
            raise ValueError(f"negative disk size {size}")
        self.size = size
        self.block = block
        self.blocks = (size + block - 1) // block
        self._map = mmap.mmap(-1, max(1, self.blocks * DIGEST_SIZE))
        self.view = memoryview(self._map)[: self.blocks * DIGEST_SIZE]

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

    def digest(self) -> bytes:
        h = xxhash.xxh3_128()
        h.update(self.view)
        h.update(struct.pack("<QI", self.size, self.block))
        return h.digest()

    def digest_string(self) -> str:
        return digest_string(self.digest())

    def close(self) -> None:
        self.view.release()
        self._map.close()
