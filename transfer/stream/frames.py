"""The frame stream: a disk range as checked, optionally compressed frames.

What crosses the network hop between two engines (`transfer serve` -> an https:// source), and
what `stream:FILE` holds. Every integer is little-endian; every field is validated on the way
in, and a bad one raises FrameError naming the field (a stream is untrusted input).

Stream header, 32 bytes, once at the start:

    magic    8 bytes   b"TRFRAMES"
    version  u32       1
    block    u32       65536: the digest block (the manifest's BLOCK)
    size     u64       the disk's size in bytes
    flags    u32       0 (reserved)
    check    u32       the low 32 bits of xxh3_64 of the 28 bytes before

Frame header, 40 bytes, then the frame's body:

    magic    u32       0x314D5246 (b"FRM1")
    kind     u8        1 data, 2 zero, 3 end
    codec    u8        data: 0 raw, 1 zstd; other kinds 0
    reserved u16       0
    offset   u64       block-aligned
    length   u64       the plain bytes the frame covers: a whole number of blocks, or up to
                       the disk's end; a data frame at most MAX_FRAME; an end frame 0
    payload  u64       data: the bytes after the digests (raw: == length); other kinds 0
    check    u64       xxh3_64 of the 32 bytes before (so a flipped offset is caught too)

A data frame's body is the xxh3-128 digest (16 bytes, as the manifest's) of each block of the
plain bytes, then the payload. The receiver decompresses, recomputes every block's digest and
compares before the bytes go anywhere. A zero frame has no body: its bytes are zero (zero
blocks and holes never travel as bytes). The end frame closes the stream; its offset is where
the covered range ends. A stream without one was cut short, and is refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

import xxhash

from ..errors import SourceError

BLOCK = 64 * 1024
MAX_FRAME = 8 << 20  # plain bytes per frame: bounds a receiver's memory per frame
MAGIC = b"TRFRAMES"
VERSION = 1
FRAME_MAGIC = 0x314D5246
DATA, ZERO, END = 1, 2, 3
RAW, ZSTD = 0, 1
KINDS = {DATA: "data", ZERO: "zero", END: "end"}
HEADER = struct.Struct("<8sIIQII")
FRAME = struct.Struct("<IBBHQQQQ")
MEDIA_TYPE = "application/x-transfer-frames"


class FrameError(SourceError):
    """A stream or frame that is malformed, or whose bytes do not match their digests."""


@dataclass(frozen=True)
class Frame:
    kind: int
    codec: int
    offset: int
    length: int
    payload: int  # bytes of payload after the digests

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def body(self) -> int:
        """Bytes after the frame header: digests and payload."""
        return digests_size(self.length) + self.payload if self.kind == DATA else 0


def digests_size(length: int) -> int:
    return 16 * ((length + BLOCK - 1) // BLOCK)


def pack_header(size: int) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, BLOCK, size, 0, 0)[:28]
    return head + struct.pack("<I", xxhash.xxh3_64_intdigest(head) & 0xFFFFFFFF)


def unpack_header(raw: bytes, where: str) -> int:
    """The disk size a stream header states; FrameError for anything else."""
    if len(raw) != HEADER.size:
        raise FrameError(f"{where}: the stream ends inside its header")
    magic, version, block, size, flags, check = HEADER.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"{where}: not a frame stream (bad magic)")
    if check != xxhash.xxh3_64_intdigest(raw[:28]) & 0xFFFFFFFF:
        raise FrameError(f"{where}: the stream header's check does not match")
    if version != VERSION:
        raise FrameError(f"{where}: frame stream version {version}, this engine reads {VERSION}")
    if block != BLOCK or flags != 0:
        raise FrameError(f"{where}: unsupported stream header (block {block}, flags {flags})")
    return size


def pack_frame(kind: int, offset: int, length: int, codec: int = RAW, payload: int = 0) -> bytes:
    head = FRAME.pack(FRAME_MAGIC, kind, codec, 0, offset, length, payload, 0)[:32]
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))


def unpack_frame(raw: bytes, size: int, where: str) -> Frame:
    """One frame header, every field checked against the stream's size."""
    if len(raw) != FRAME.size:
        raise FrameError(f"{where}: the stream ends inside a frame header (no end frame)")
    magic, kind, codec, reserved, offset, length, payload, check = FRAME.unpack(raw)
    if magic != FRAME_MAGIC:
        raise FrameError(f"{where}: bad frame magic")
    if check != xxhash.xxh3_64_intdigest(raw[:32]):
        raise FrameError(f"{where}: a frame header's check does not match")
    if kind not in KINDS or reserved:
        raise FrameError(f"{where}: unknown frame kind {kind}")
    name = KINDS[kind]
    if offset > size or offset % BLOCK and not (kind == END and offset == size):
        raise FrameError(f"{where}: {name} frame at offset {offset}: not a block boundary "
                         f"inside the {size}-byte disk")
    if kind == END:
        if length or payload or codec:
            raise FrameError(f"{where}: an end frame carries nothing")
        return Frame(kind, codec, offset, 0, 0)
    end = offset + length
    limit = MAX_FRAME if kind == DATA else size
    if not 0 < length <= limit or end > size or (length % BLOCK and end != size):
        raise FrameError(f"{where}: {name} frame at offset {offset}: bad length {length}")
    if kind == ZERO and (codec or payload):
        raise FrameError(f"{where}: zero frame at offset {offset} carries a payload")
    if kind == DATA and not (codec == RAW and payload == length
                             or codec == ZSTD and 0 < payload <= zstd_bound(length)):
        raise FrameError(f"{where}: data frame at offset {offset}: codec {codec} with a "
                         f"{payload}-byte payload for {length} bytes")
    return Frame(kind, codec, offset, length, payload)


def zstd_bound(length: int) -> int:
    """ZSTD_COMPRESSBOUND: the most a zstd frame of length bytes can take."""
    return length + (length >> 8) + ((128 << 10) - length >> 11 if length < 128 << 10 else 0)


Hasher = Callable[[memoryview], bytes]


def block_digests(view: memoryview) -> bytes:
    """The xxh3-128 digest of each block of view (the last may be short)."""
    return b"".join(xxhash.xxh3_128(view[i:i + BLOCK]).digest()
                    for i in range(0, len(view), BLOCK))


def check_digests(view: memoryview, digests: bytes, offset: int, where: str,
                  hasher: Hasher = block_digests) -> None:
    """FrameError naming the first block whose bytes do not match the sender's digest."""
    got = hasher(view)
    if got == digests:
        return
    for i in range(0, len(digests), 16):
        if got[i:i + 16] != digests[i:i + 16]:
            raise FrameError(f"{where}: a block's bytes do not match the sender's digest "
                             "(corrupted in transit)", offset=offset + i // 16 * BLOCK)
    raise FrameError(f"{where}: the frame's digests do not match", offset=offset)
