"""Turning plain bytes into frames and back (the format: frames.py).

An Encoder belongs to one thread (a zstd context is not shared); zstd and xxhash release the
GIL on buffers, so encoding and decoding run in the reader and writer threads in parallel,
never on the event loop.

--compress: "none" sends every data frame raw; "zstd[:LEVEL]" compresses each (level 1 by
default: 3.07x on the Debian image at ~360 MiB/s per core here, level 3 3.30x at ~210); "auto"
is zstd:1 for a stream file, and for an https:// source zstd:1 only while the link is the
bottleneck (Auto, per connection). Whatever the choice, a frame that compression does not shrink by SHRINK travels raw
(random or encrypted data costs the receiver nothing to decompress then).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import zstandard

from .._native import Kernels
from ..errors import BadInput
from . import frames as f
from .frames import FrameError

SLOW_LINK = 0.5  # a link below half the compression speed: always ask for zstd (Auto)
SHRINK = 0.97  # a compressed payload must be this much smaller than the plain bytes, or raw
DEFAULT_LEVEL = 1


def parse_compress(text: str) -> int | None:
    """--compress's value: None (no compression) or a zstd level; BadInput otherwise."""
    if text == "none":
        return None
    if text == "auto":
        return DEFAULT_LEVEL
    name, _, level = text.partition(":")
    if name == "zstd":
        try:
            n = int(level) if level else DEFAULT_LEVEL
        except ValueError:
            n = 0
        if 1 <= n <= 19:
            return n
    raise BadInput(f"--compress must be auto, none or zstd[:LEVEL] with LEVEL 1-19, "
                   f"not {text!r}")


class Auto:
    """--compress auto on one connection: ask for zstd only while it pays.

    Sending L plain bytes raw takes L/B over a link of B bytes/s; compressed, L/C to compress
    (C: the sender's speed, from its answer's X-Transfer-Encoded) and L/(rB) to send (r: the
    ratio). Compression pays when B < C (1 - 1/r): on a slow link, with data that shrinks.
    B is an answer's bytes over its time from request to last byte, less the sender's time
    building it and ours decoding it (the read time alone would flatter the link: most of an
    answer already waits in the socket buffer when it is read). Every PROBE-th request asks
    for compression anyway, so C and r follow the data while it goes raw.
    """

    PROBE = 16
    MIN_SAMPLE = 256 << 10  # bytes: smaller answers say more about latency than bandwidth

    def __init__(self, level: int) -> None:
        self.level = level
        self.link: float | None = None
        self.speed: float | None = None
        self.ratio = 2.0  # until measured (an EWMA: one incompressible answer does not decide)
        self.n = 0

    def choose(self) -> int | None:
        self.n += 1
        if self.link is None or self.speed is None or self.n % self.PROBE == 0:
            return self.level
        if self.link < self.speed * SLOW_LINK:  # the sender's shrink check keeps what does
            return self.level  # not compress raw; the data's ratio changes request by request
        return self.level if self.link < self.speed * (1 - 1 / self.ratio) else None

    def observe(self, wire: int, seconds: float, encoded: str | None) -> None:
        """An answer: its body bytes, the seconds from request to its end less our decoding,
        the sender's header (data, payload, compressing and building seconds)."""
        try:
            plain, packed, spent, built = (float(x) for x in (encoded or "").split())
        except ValueError:
            return
        if wire >= self.MIN_SAMPLE and seconds - built > 0:
            b = wire / (seconds - built)
            self.link = b if self.link is None else 0.7 * self.link + 0.3 * b
        if plain >= self.MIN_SAMPLE and packed > 0 and spent > 0:
            self.speed = plain / spent
            self.ratio = 0.7 * self.ratio + 0.3 * max(plain / packed, 1.0)


class Encoder:
    """Frames for plain bytes: zero blocks as zero frames, the rest as data frames."""

    def __init__(self, level: int | None, hasher: f.Hasher = f.block_digests) -> None:
        self.level = level
        self._z = zstandard.ZstdCompressor(level=level) if level is not None else None
        self.hasher = hasher
        self.plain = 0  # data bytes encoded
        self.sent = 0  # their payload bytes
        self.seconds = 0.0  # spent compressing

    def data(self, view: memoryview, offset: int) -> list[bytes]:
        """One data frame (view holds at most MAX_FRAME bytes): header, digests, payload."""
        digests = self.hasher(view)
        codec, payload = f.RAW, view
        if self._z is not None:
            t = time.perf_counter()
            packed = self._z.compress(view)
            self.seconds += time.perf_counter() - t
            if len(packed) <= SHRINK * len(view):
                codec, payload = f.ZSTD, packed
        self.plain += len(view)
        self.sent += len(payload)
        return [f.pack_frame(f.DATA, offset, len(view), codec, len(payload)), digests, payload]

    def chunk(self, view: memoryview, offset: int, zero: Callable[[memoryview], Any]
              ) -> list[bytes]:
        """Frames for view at offset: runs of zero blocks (zero(view) flags each block) as
        zero frames, runs of data blocks as data frames of at most MAX_FRAME bytes."""
        flags = zero(view)
        out: list[bytes] = []
        i, n = 0, len(flags)
        while i < n:
            j = i + 1
            while j < n and flags[j] == flags[i] and (flags[i] or (j - i) * f.BLOCK < f.MAX_FRAME):
                j += 1
            a, b = i * f.BLOCK, min(j * f.BLOCK, len(view))
            if flags[i]:
                out.append(f.pack_frame(f.ZERO, offset + a, b - a))
            else:
                out += self.data(view[a:b], offset + a)
            i = j
        return out


def decode_data(frame: f.Frame, body: memoryview, out: memoryview, where: str,
                hasher: f.Hasher = f.block_digests) -> None:
    """A data frame's body (digests, payload) into out (frame.length bytes), checked."""
    nd = f.digests_size(frame.length)
    digests, payload = bytes(body[:nd]), body[nd:]
    if frame.codec == f.RAW:
        out[:] = payload
    else:
        try:
            plain = zstandard.ZstdDecompressor().decompress(payload,
                                                            max_output_size=frame.length)
        except zstandard.ZstdError as e:
            raise FrameError(f"{where}: the zstd payload does not decompress ({e})",
                             offset=frame.offset) from None
        if len(plain) != frame.length:
            raise FrameError(f"{where}: the payload holds {len(plain)} bytes, the frame "
                             f"says {frame.length}", offset=frame.offset)
        out[:] = plain
    f.check_digests(out, digests, frame.offset, where, hasher)


def kernel_hasher(kernels: Kernels) -> f.Hasher:
    """frames.block_digests through the native kernel (the GIL released while it hashes)."""
    def digests(view: memoryview) -> bytes:
        out = bytearray(f.digests_size(len(view)))
        kernels.hash_blocks(view, f.BLOCK, out)
        return bytes(out)
    return digests


def kernel_zero_flags(kernels: Kernels) -> Callable[[memoryview], bytearray]:
    """Per block of a view: 1 where it is all zeroes (the native zero scan)."""
    def flags(view: memoryview) -> bytearray:
        out = bytearray((len(view) + f.BLOCK - 1) // f.BLOCK)
        kernels.zero_blocks(view, f.BLOCK, out)
        return out
    return flags


def read_into(readinto: Callable[[memoryview], int], view: memoryview, where: str) -> None:
    """Fill view from readinto (a socket file's or a file's), or FrameError: the stream was
    cut."""
    got, n = 0, len(view)
    while got < n:
        k = readinto(view[got:])
        if not k:
            raise FrameError(f"{where}: the stream ends after {got} of {n} bytes of a frame "
                             "(cut short)")
        got += k


_ZEROS = memoryview(bytes(1 << 20))


def fill_zero(view: memoryview) -> None:
    """view's bytes set to zero, 1 MiB at a time (no allocation per frame)."""
    zeros = _ZEROS
    for p in range(0, len(view), len(zeros)):
        n = min(len(zeros), len(view) - p)
        view[p:p + n] = zeros[:n]


def receive(readinto: Callable[[memoryview], int], start: int, out: memoryview, where: str,
            hasher: f.Hasher = f.block_digests) -> int:
    """A stream answering for [start, start + len(out)): its frames in order, contiguous,
    ending in an end frame there, decoded into out. The disk size its header states.
    A raw payload is read straight into out, and checked there before the caller sees it."""
    head = memoryview(bytearray(f.HEADER.size))
    read_into(readinto, head, where)
    size = f.unpack_header(bytes(head), where)
    head = memoryview(bytearray(f.FRAME.size))
    scratch = memoryview(bytearray(0))
    pos, end = start, start + len(out)
    while True:
        read_into(readinto, head, where)
        fr = f.unpack_frame(bytes(head), size, where)
        if fr.kind == f.END:
            if fr.offset != end or pos != end:
                raise FrameError(f"{where}: the stream ends at {fr.offset}, having covered "
                                 f"{start}-{pos} of {start}-{end}", offset=pos)
            return size
        if fr.offset != pos or fr.end > end:
            raise FrameError(f"{where}: a {f.KINDS[fr.kind]} frame for {fr.offset}-{fr.end} "
                             f"where {pos}-{end} was due", offset=pos)
        dst = out[pos - start:fr.end - start]
        if fr.kind == f.ZERO:
            fill_zero(dst)
        elif fr.codec == f.RAW:  # the digests, then the bytes where they belong
            digests = memoryview(bytearray(f.digests_size(fr.length)))
            read_into(readinto, digests, where)
            read_into(readinto, dst, where)
            f.check_digests(dst, bytes(digests), fr.offset, where, hasher)
        else:
            if len(scratch) < fr.body:
                scratch = memoryview(bytearray(fr.body))
            read_into(readinto, scratch[:fr.body], where)
            decode_data(fr, scratch[:fr.body], dst, where, hasher)
        pos = fr.end

