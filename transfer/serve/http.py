"""`transfer serve`'s HTTP(S) server: the ovirt-imageio images API, read-only, plus frames.

    OPTIONS /images/TICKET                 {"features": [...], "max_readers": N, ...}
    GET /images/TICKET/extents?context=dirty      with --dirty-bitmap NAME over an NBD source
    GET /images/TICKET        Range: bytes=A-B     the bytes (206), one range per request
    GET /images/TICKET/extents?context=zero       [{"start", "length", "zero", "hole"}, ...]
    GET /images/TICKET/checksum?algorithm=A&block_size=N    {"checksum", "algorithm", "block_size"}
    GET /images/TICKET/checksum/algorithms                  {"algorithms": [...]}
    GET /images/TICKET  Accept: application/x-transfer-frames, Range: bytes=A-B
                      X-Transfer-Compress: none|zstd:LEVEL     the range as frames (200)

The frames answer is the engine's own, asked for by its client when OPTIONS lists "frames":
zero blocks and holes as zero frames, data blocks hashed (xxh3-128 per 64 KiB) and compressed
where it pays (transfer.stream). Its range starts on a block and ends on one or at the disk's
end, at most MAX_FRAMES_RANGE long (the answer is built in memory: bounded per connection).

Bounds: at most max_clients connections (one more is answered 503 and closed), an idle or
stalled connection is dropped after CLIENT_TIMEOUT, request lines and headers are limited by
http.server (64 KiB, 100 headers), a byte range by the disk. A bad request gets a 4xx and a log
line on stderr; the ticket never appears in either (paths are logged as /images/***).
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import time
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .. import _native
from ..errors import TransferError
from ..ranges import STATE_ZERO
from ..stream import codec
from ..stream import frames as f
from .conns import CLIENT_TIMEOUT, CappedServer, TrackedHandler, log
from .exports import Export, Exports

MAX_FRAMES_RANGE = 32 << 20
CHUNK = 1 << 20  # bytes read from the source per step of a plain GET
EXTENTS_STEP = 1 << 30
MAX_READERS = 8
# data bytes, their payload bytes, seconds compressing, seconds building the whole answer
ENCODE_HEADER = "X-Transfer-Encoded"
_RANGE = re.compile(r"bytes=(\d{1,19})-(\d{1,19})")
_PATH = re.compile(r"/images/([A-Za-z0-9_-]{1,128})(/extents|/checksum|/checksum/algorithms)?")
# imageio's checksum: a hash of the per-block hashes, blake2b (32-byte digests) of 4 MiB blocks
# by default; block sizes and algorithms limited as imageio limits them (shake_* left out: they
# need a length to give a digest, and imageio answers them with a 500)
CHECKSUM_BLOCK = 4 << 20
CHECKSUM_BLOCKS = (CHECKSUM_BLOCK // 4, CHECKSUM_BLOCK * 4)
CHECKSUM_ALGORITHMS = sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith("shake"))


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class Server(CappedServer):
    def __init__(self, addr: tuple[str, int], exports: Exports, tls: ssl.SSLContext | None,
                 max_clients: int, kernels: _native.Kernels) -> None:
        self.exports, self.tls, self.kernels = exports, tls, kernels
        super().__init__(addr, Handler, max_clients)


class Handler(TrackedHandler):
    protocol_version = "HTTP/1.1"
    server_version = "transfer-serve"
    sys_version = ""
    # The headers and the body are two writes: with Nagle's algorithm the body of a small
    # answer waits for the client's delayed ACK of the headers, 40 ms here (measured: every
    # all-zero frames answer, 112 bytes, took 40 ms on loopback).
    disable_nagle_algorithm = True
    server: Server

    def setup(self) -> None:
        super().setup()
        if self.server.tls is not None:  # the handshake here, in this thread, under timeout
            self.request.settimeout(CLIENT_TIMEOUT)
            try:
                self.connection = self.request = self.server.tls.wrap_socket(
                    self.request, server_side=True)
            except BaseException:  # no finish() follows a failed setup()
                self.forget()
                raise
            self.rfile = self.connection.makefile("rb", self.rbufsize)
            self.wfile = self.connection.makefile("wb")

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # errors are logged; a line per request would be noise at this rate

    def log_message(self, format: str, *args: Any) -> None:
        log(f"{self.client_address[0]}: " + _hide(format % args))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None
                   ) -> None:
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # a request line too bad to parse: answer in 1.1
        self._send(HTTPStatus(code), (message or HTTPStatus(code).phrase).encode() + b"\n",
                   "text/plain")

    def _send(self, status: HTTPStatus, body: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _route(self) -> tuple[Export, str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        m = _PATH.fullmatch(parts.path)
        if m is None:
            raise HttpError(HTTPStatus.NOT_FOUND, "no such resource (expected /images/TICKET)")
        export = self.server.exports.find(m.group(1))
        if export is None:
            raise HttpError(HTTPStatus.FORBIDDEN, "unknown or expired ticket")
        return export, m.group(2) or "", parse_qs(parts.query)

    def _dispatch(self, method: str) -> None:
        self.body_started = False
        try:
            export, what, query = self._route()
            if method == "OPTIONS":
                return self._options(export)
            if what == "/extents":
                return self._extents(export, query)
            if what == "/checksum":
                return self._checksum(export, query)
            if what:
                return self._json({"algorithms": CHECKSUM_ALGORITHMS})
            if f.MEDIA_TYPE in self.headers.get("Accept", ""):
                return self._frames(export)
            return self._bytes(export)
        except HttpError as e:
            self.log_message("%s %s: %d %s", method, self.path, e.status, e)
            self.send_error(e.status, str(e))
        except (TransferError, OSError) as e:
            self.log_message("%s %s: %s", method, self.path, e)
            if self.body_started:  # an answer cut short, never an error page inside a body:
                self.close_connection = True  # the client sees fewer bytes than announced
                return
            self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, "reading the source failed")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def _options(self, export: Export) -> None:
        body = {"unix_socket": None, "features": ["checksum", "extents", "frames"],
                "max_readers": min(MAX_READERS, export.disk.max_connections), "max_writers": 0}
        self._send(HTTPStatus.OK, json.dumps(body).encode(), "application/json",
                   {"Allow": "OPTIONS,GET"})

    def _range(self, export: Export) -> tuple[int, int]:
        """The request's one byte range, [start, end); the whole disk without one."""
        size = export.disk.size
        text = self.headers.get("Range")
        if text is None:
            return 0, size
        m = _RANGE.fullmatch(text.strip())
        if m is None:
            raise HttpError(HTTPStatus.BAD_REQUEST, "Range must be one bytes=FIRST-LAST")
        a, b = int(m.group(1)), int(m.group(2)) + 1
        if not a < b <= size:
            raise HttpError(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                            f"range outside the {size}-byte disk")
        return a, b

    def _bytes(self, export: Export) -> None:
        a, b = self._range(export)
        self.send_response(HTTPStatus.PARTIAL_CONTENT if "Range" in self.headers
                           else HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(b - a))
        if "Range" in self.headers:
            self.send_header("Content-Range", f"bytes {a}-{b - 1}/{export.disk.size}")
        self.end_headers()
        self.body_started = True
        buf = memoryview(bytearray(min(CHUNK, b - a)))
        with export.conn() as conn:
            for pos in range(a, b, CHUNK):
                view = buf[:min(CHUNK, b - pos)]
                export.read(conn, view, pos)
                self.wfile.write(view)

    def _scratch(self, name: str, n: int) -> memoryview:
        """n bytes of a buffer this connection keeps across its requests: a fresh 32 MiB
        bytearray per request is a fresh mmap, its every page faulted in again (bounded: one
        read and one answer buffer of at most MAX_FRAMES_RANGE each per connection)."""
        buf = self.__dict__.get(name)
        if buf is None or len(buf) < n:
            buf = memoryview(bytearray(n))
            setattr(self, name, buf)
        return buf[:n]

    def _frames(self, export: Export) -> None:
        a, b = self._range(export)
        size = export.disk.size
        if a % f.BLOCK or (b % f.BLOCK and b != size) or b - a > MAX_FRAMES_RANGE:
            raise HttpError(HTTPStatus.BAD_REQUEST, "a frames range starts on a 64 KiB block, "
                            f"ends on one or at the disk's end, at most {MAX_FRAMES_RANGE} bytes")
        began = time.perf_counter()
        level = codec.parse_compress(self.headers.get("X-Transfer-Compress", "auto"))
        k = self.server.kernels
        enc = codec.Encoder(level, codec.kernel_hasher(k))
        parts = [f.pack_header(size)]
        buf = self._scratch("_read_buf", b - a)
        with export.conn() as conn:
            pos = a
            for start, end in _data_blocks(conn.extents(a, b - a), a, b):
                if start > pos:  # holes and zero extents: no bytes on the wire
                    parts.append(f.pack_frame(f.ZERO, pos, start - pos))
                view = buf[start - a:end - a]
                export.read(conn, view, start)
                for p in range(0, end - start, f.MAX_FRAME):
                    parts += enc.chunk(view[p:p + f.MAX_FRAME], start + p,
                                       codec.kernel_zero_flags(k))
                pos = end
            if pos < b:
                parts.append(f.pack_frame(f.ZERO, pos, b - pos))
        parts.append(f.pack_frame(f.END, b, 0))
        body = self._scratch("_body_buf", sum(len(p) for p in parts))
        at = 0
        for p in parts:
            body[at:at + len(p)] = p
            at += len(p)  # what compressing cost: the client's --compress auto weighs it
        self._send(HTTPStatus.OK, body, f.MEDIA_TYPE,
                   {ENCODE_HEADER: f"{enc.plain} {enc.sent} {enc.seconds:.6f} "
                                   f"{time.perf_counter() - began:.6f}"})

    def _json(self, body: Any) -> None:
        self._send(HTTPStatus.OK, json.dumps(body).encode(), "application/json")

    def _checksum(self, export: Export, query: dict[str, list[str]]) -> None:
        """imageio's checksum (its blkhash): each block_size block hashed, a zero block by the
        hash of as many zero bytes, and those digests hashed in order. The source's zero
        extents spare reading and hashing zero blocks; the result does not depend on them."""
        algorithm = query.get("algorithm", ["blake2b"])[0]
        if algorithm not in CHECKSUM_ALGORITHMS:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown algorithm {algorithm[:40]!r}; "
                            "GET …/checksum/algorithms lists them")
        text = query.get("block_size", [str(CHECKSUM_BLOCK)])[0]
        bs = int(text) if text.isdigit() and len(text) < 12 else 0
        if not CHECKSUM_BLOCKS[0] <= bs <= CHECKSUM_BLOCKS[1] or bs % 4096:
            raise HttpError(HTTPStatus.BAD_REQUEST, "block_size must be a multiple of 4096 "
                            f"from {CHECKSUM_BLOCKS[0]} to {CHECKSUM_BLOCKS[1]}")
        digest_size = {"digest_size": 32} if algorithm.startswith("blake2") else {}

        def make(data: Any = b"") -> Any:
            return hashlib.new(algorithm, data, **digest_size)
        total, zeros = make(), {}
        size = export.disk.size
        buf = memoryview(bytearray(bs))
        with export.conn() as conn:
            zero_runs = [(r["start"], r["start"] + r["length"])
                         for r in _zero_extents(conn, size) if r["zero"]]
            i = 0
            for pos in range(0, size, bs):
                n = min(bs, size - pos)
                while i < len(zero_runs) and zero_runs[i][1] <= pos:
                    i += 1
                if i < len(zero_runs) and zero_runs[i][0] <= pos and pos + n <= zero_runs[i][1]:
                    if n not in zeros:
                        zeros[n] = make(bytes(n)).digest()
                    total.update(zeros[n])
                    continue
                for p in range(0, n, CHUNK):
                    export.read(conn, buf[p:min(n, p + CHUNK)], pos + p)
                total.update(make(buf[:n]).digest())
        self._json({"algorithm": algorithm, "block_size": bs, "checksum": total.hexdigest()})

    def _extents(self, export: Export, query: dict[str, list[str]]) -> None:
        context = query.get("context", ["zero"])[0]
        if context == "dirty" and export.dirty is not None:
            return self._dirty(export)
        if context != "zero":
            raise HttpError(HTTPStatus.NOT_FOUND, f"no {context!r} extents here (zero, and "
                            "dirty with --dirty-bitmap)")
        with export.conn() as conn:
            out = _zero_extents(conn, export.disk.size)
        # "hole" is always false: to imageio a hole is an area of this layer that the backing
        # chain shows through (its nbd.py Extent.hole; raw images never have one), and its
        # download onto a backing file skips holes; a sparse area of our source reads as zeroes
        self._json([{**r, "hole": False} for r in out])

    def _dirty(self, export: Export) -> None:
        """The dirty bitmap's extents, as imageio gives them: {start, length, dirty, zero}.
        The NBD disk answers a context on its spare handle: one request at a time."""
        out: list[dict[str, Any]] = []
        size, pos = export.disk.size, 0
        with export.lock:
            while pos < size:
                extents = export.disk.context_extents(export.dirty, pos, size - pos)
                if not extents:
                    raise HttpError(HTTPStatus.INTERNAL_SERVER_ERROR,
                                    "the source sent no dirty bitmap extents")
                for start, length, flags in extents:  # qemu:dirty-bitmap: flag 1, dirty
                    _merge(out, start, length, dirty=bool(flags & 1), zero=False)
                pos = extents[-1][0] + extents[-1][1]
        self._json(out)


def _zero_extents(conn: Any, size: int) -> list[dict[str, Any]]:
    """The whole disk's extents as imageio lists them, {start, length, zero}, neighbours of
    the same kind merged (asked for EXTENTS_STEP at a time)."""
    out: list[dict[str, Any]] = []
    for pos in range(0, size, EXTENTS_STEP):
        for start, length, flags in conn.extents(pos, min(EXTENTS_STEP, size - pos)):
            _merge(out, start, length, zero=bool(flags & STATE_ZERO))
    return out


def _merge(out: list[dict[str, Any]], start: int, length: int, **flags: bool) -> None:
    """Append an extent to imageio's list, or lengthen the last one when its flags match."""
    if out and all(out[-1][k] == v for k, v in flags.items()):
        out[-1]["length"] += length
    else:
        out.append({"start": start, "length": length, **flags})


def _data_blocks(extents: list[tuple[int, int, int]], a: int, b: int) -> list[list[int]]:
    """The data extents widened to whole blocks (frames are block-aligned), merged, inside
    [a, b): a block that holds any data is read and sent whole."""
    out: list[list[int]] = []
    for start, length, flags in extents:
        if flags & STATE_ZERO:  # holes read as zeroes too
            continue
        s = max(a, start // f.BLOCK * f.BLOCK)
        e = min(b, -(-(start + length) // f.BLOCK) * f.BLOCK)
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        elif e > s:
            out.append([s, e])
    return out


def _hide(text: str) -> str:
    """text with any ticket in an /images/ path replaced."""
    return re.sub(r"/images/[A-Za-z0-9_-]+", "/images/***", text)


def tls_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx
