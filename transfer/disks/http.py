"""https://HOST:PORT/images/TICKET (and http:// on loopback): a source across a network hop.

The server is `transfer serve` or an ovirt-imageio daemon; both speak the images API. At open:
OPTIONS (its features), then GET .../extents?context=zero (the disk's size is where its last
extent ends, as imageio's own client learns it). Each worker's Conn holds one HTTP/1.1
connection. When the server lists "frames" (transfer serve), a read asks for the range as
frames: zero blocks do not cross the wire, data comes compressed where it pays, and every
block's digest is checked after decompression, in this thread, before the bytes are used (a
mismatch raises SourceError: the pipeline reads again within its retry budget, then fails the
copy naming the offset). Otherwise a read is one plain Range GET, its status, Content-Range and
length checked.

TLS: the server's certificate is verified against --tls-ca (a CA file; default
$TRANSFER_TLS_CA) and its host name, never "trust anything"; with a directory holding
client-cert.pem and client-key.pem, those are presented (mutual TLS). The ticket is a
secret: messages show the URL as https://HOST:PORT/images/***.
"""

from __future__ import annotations

import bisect
import http.client
import json
import os
import ssl
import time
import urllib.parse
from typing import Any

from .. import _native
from ..errors import BadInput, ConnectionLost, SourceError, TransferError
from ..ranges import STATE_HOLE, STATE_ZERO, Extent
from ..stream import codec
from ..stream import frames as f
from ..tls import Tls, resolve
from ..url import Address, is_loopback
from .base import Conn, Disk, Options

MAX_CONNECTIONS = 4
MAX_EXTENTS_BYTES = 64 << 20  # an extents answer larger than this is refused
REQUEST_SIZE = 4 << 20  # bytes per GET (shape, below)


def opener(addr: Address, role: str, options: Options) -> Disk:
    if role != "source":
        raise BadInput("an https:// disk is a source only (transfer serve exports read-only)",
                       disk=addr.display, kind=role)
    return HttpDisk(addr, options)


class HttpDisk(Disk):
    kind = "http"
    can_extents = True

    def __init__(self, addr: Address, options: Options) -> None:
        self.display = addr.display
        parts = urllib.parse.urlsplit(addr.url)
        self.scheme, self.host, self.port = parts.scheme, parts.hostname or "", parts.port
        self.path = parts.path
        if self.scheme == "http" and not is_loopback(self.host):
            raise BadInput("plain http:// only to a loopback address: the ticket and the data "
                           "would cross the network in the clear (use https://)",
                           disk=self.display, kind="source")
        self.timeout = options.timeout or 60.0
        self.kernels = options.kernels or _native.kernels()
        self.level, self.auto = options.compress, options.compress_auto
        self.ssl = _context(resolve(options.tls)) if self.scheme == "https" else None
        c = self.connection()
        try:
            body = self._get(c, "OPTIONS", self.path, 200, 1 << 20)
            if body is None:
                raise SourceError("OPTIONS answered 404: not an images URL", disk=self.display)
            opts = json.loads(body)
            self.features = set(opts.get("features", [])) if isinstance(opts, dict) else set()
            self.max_connections = max(1, min(MAX_CONNECTIONS, int(opts.get("max_readers", 1))))
            self.extents_list = self._load_extents(c)
            self.negotiated, self.dirty = self._load_dirty(c, options.contexts)
        except TransferError:
            raise
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            raise SourceError(f"the server's answer is not what the images API gives: {e}",
                              disk=self.display) from None
        finally:
            c.close()
        self.size = self.extents_list[-1][0] + self.extents_list[-1][1]
        # One request per round trip on each connection (http.client does not pipeline):
        # big requests on several connections keep a long, fast link full (1 Gbit/s x 10 ms
        # holds 1.25 MB; 4 x 4 MiB in flight is enough for 100 ms there)
        self.shape = (min(4, self.max_connections), 2, REQUEST_SIZE)
        self.starts = [e[0] for e in self.extents_list]
        self.dirty_starts = [e[0] for e in self.dirty]

    def connection(self) -> http.client.HTTPConnection:
        if self.ssl is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.ssl)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _get(self, c: http.client.HTTPConnection, method: str, path: str, status: int,
             limit: int, headers: dict[str, str] | None = None) -> bytes | None:
        """The answer's body; None for a 404 (a resource this server does not have)."""
        try:
            c.request(method, path, headers=headers or {})
            r = c.getresponse()
            body = r.read(limit + 1)
        except ssl.SSLError as e:
            raise BadInput(f"TLS: {e.reason or e}", disk=self.display, kind="source") from None
        except (OSError, http.client.HTTPException) as e:
            raise SourceError(f"{method} failed: {e}", disk=self.display) from None
        if r.status == 403:
            raise BadInput("the server refused the ticket (unknown or expired)",
                           disk=self.display, kind="source")
        if r.status == 404:
            return None
        if r.status != status or len(body) > limit:
            raise SourceError(f"{method} answered {r.status} {r.reason}", disk=self.display)
        return body

    def _extents_of(self, c: http.client.HTTPConnection, context: str) -> list[dict] | None:
        """GET extents?context=...: its list, None when the server has none of that context."""
        body = self._get(c, "GET", f"{self.path}/extents?context={context}", 200,
                         MAX_EXTENTS_BYTES)
        return None if body is None else json.loads(body)

    def _load_extents(self, c: http.client.HTTPConnection) -> list[Extent]:
        raw = self._extents_of(c, "zero")
        if raw is None:
            raise ValueError("no extents (GET .../extents answered 404)")
        return _contiguous(raw, lambda e: (STATE_ZERO if e.get("zero") else 0)
                           | (STATE_HOLE if e.get("hole") else 0))

    def _load_dirty(self, c: http.client.HTTPConnection, contexts: tuple[str, ...]
                    ) -> tuple[set[str], list[Extent]]:
        """A dirty bitmap's context asked for (sync --dirty-bitmap): the server's
        extents?context=dirty, flag 1 where dirty; not negotiated when the server has none
        (404: serve without --dirty-bitmap), so the tracker falls back and says why."""
        wanted = [x for x in contexts if x.startswith("qemu:dirty-bitmap:")]
        raw = self._extents_of(c, "dirty") if wanted else None
        if raw is None:
            return set(), []
        out = _contiguous(raw, lambda e: 1 if e["dirty"] else 0)
        last, disk = out[-1], self.extents_list[-1]
        if last[0] + last[1] != disk[0] + disk[1]:
            raise ValueError("the dirty extents do not cover the disk")
        return set(wanted), out

    def context_extents(self, context: str, offset: int, length: int) -> list[Extent] | None:
        """The dirty extents at [offset, offset + length) (the one context served)."""
        if context not in self.negotiated:
            return None
        return _clip(self.dirty, self.dirty_starts, offset, offset + length)

    def connect(self) -> Conn | None:
        return HttpConn(self)

    def identities(self) -> set[tuple]:
        return {("http", self.host, self.port, self.path)}

    def data_bytes(self) -> int:
        return sum(n for _, n, fl in self.extents_list if not fl & STATE_ZERO)


def _context(tls: Tls) -> ssl.SSLContext:
    """Verify the server's certificate and host name against the given CA only; present a
    client certificate where the CA directory holds one."""
    if not tls.ca:
        raise BadInput("an https:// source needs the server's CA: --tls-ca FILE (or "
                       "$TRANSFER_TLS_CA)", kind="source")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, host names checked
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    directory = os.path.isdir(tls.ca)
    try:
        ctx.load_verify_locations(os.path.join(tls.ca, "ca-cert.pem") if directory else tls.ca)
        cert = os.path.join(tls.ca, "client-cert.pem")
        if directory and os.path.exists(cert):
            ctx.load_cert_chain(cert, os.path.join(tls.ca, "client-key.pem"))
    except (OSError, ssl.SSLError) as e:
        raise BadInput(f"cannot load the TLS CA or client certificate: {e}",
                       kind="source") from None
    return ctx


def _contiguous(raw: list[dict], flags: Any) -> list[Extent]:
    """An extents answer ([{start, length, ...}] from 0, each where the last ended, none
    empty) as extents, flags(entry) their flags; ValueError otherwise."""
    out: list[Extent] = []
    pos = 0
    for e in raw:
        start, length = int(e["start"]), int(e["length"])
        if start != pos or length <= 0:
            raise ValueError(f"extents not contiguous at {pos}")
        out.append((start, length, flags(e)))
        pos += length
    if not out:
        raise ValueError("no extents: an empty disk")
    return out


def _clip(extents: list[Extent], starts: list[int], offset: int, end: int) -> list[Extent]:
    """The contiguous extents (starts: their offsets) that meet [offset, end), clipped to it."""
    i = max(bisect.bisect_right(starts, offset) - 1, 0)
    out: list[Extent] = []
    while i < len(extents) and extents[i][0] < end:
        s, n, fl = extents[i]
        a, b = max(s, offset), min(s + n, end)
        if b > a:
            out.append((a, b - a, fl))
        i += 1
    return out


class HttpConn(Conn):
    def __init__(self, disk: HttpDisk) -> None:
        self.disk = disk
        self.c = disk.connection()
        self.hasher = codec.kernel_hasher(disk.kernels)
        self.auto = codec.Auto(disk.level) if disk.auto and disk.level is not None else None
        self._done: list[tuple[Any, BaseException | None]] = []

    def extents(self, offset: int, length: int) -> list[Extent]:
        return _clip(self.disk.extents_list, self.disk.starts, offset, offset + length)

    def start_read(self, view: memoryview, offset: int, tag: Any) -> None:
        try:
            self._read(view, offset)
            self._done.append((tag, None))
        except SourceError as e:
            self._done.append((tag, e))

    def _read(self, view: memoryview, offset: int) -> None:
        d = self.disk
        frames = "frames" in d.features and offset % f.BLOCK == 0 and (
            (offset + len(view)) % f.BLOCK == 0 or offset + len(view) == d.size)
        headers = {"Range": f"bytes={offset}-{offset + len(view) - 1}"}
        if frames:
            level = self.auto.choose() if self.auto is not None else d.level
            headers["Accept"] = f.MEDIA_TYPE
            headers["X-Transfer-Compress"] = "none" if level is None else f"zstd:{level}"
        try:
            asked = time.perf_counter()
            self.c.request("GET", d.path, headers=headers)
            r = self.c.getresponse()
            if frames:
                self._check(r, 200, offset, None)
                self._frames(r, view, offset, asked)
            else:
                self._check(r, 206, offset, len(view))
                if r.readinto(view) != len(view) or r.read(1):
                    raise ConnectionLost("the answer ended early", disk=d.display,
                                         offset=offset)
        except (OSError, http.client.HTTPException) as e:
            self.c.close()
            raise ConnectionLost(f"reading failed: {e}", disk=d.display, offset=offset) from None
        except SourceError:
            self.c.close()  # the rest of that answer is unread: a new connection next time
            raise

    def _frames(self, r: http.client.HTTPResponse, view: memoryview, offset: int,
                asked: float) -> None:
        """A frames answer into view; for --compress auto, the time since it was asked for
        less the time decoding (what is not spent in reads)."""
        d, spent = self.disk, 0.0

        def readinto(buf: memoryview) -> int:
            nonlocal spent
            t = time.perf_counter()
            n = r.readinto(buf)
            spent += time.perf_counter() - t
            return n
        began = time.perf_counter()
        size = codec.receive(readinto, offset, view, f"server {d.display}", self.hasher)
        decoding = time.perf_counter() - began - spent
        spent = time.perf_counter() - asked - decoding
        if size != d.size or r.read(1):
            raise SourceError("the frames answer does not fit the disk", disk=d.display,
                              offset=offset)
        if self.auto is not None:
            self.auto.observe(int(r.getheader("Content-Length", "0")), spent,
                              r.getheader("X-Transfer-Encoded"))

    def _check(self, r: http.client.HTTPResponse, status: int, offset: int,
               length: int | None) -> None:
        d = self.disk
        if r.status == 403:  # expired or revoked meanwhile: reading again will not help
            raise BadInput("the server refused the ticket (unknown or expired)",
                           disk=d.display, kind="source")
        if r.status != status:
            raise SourceError(f"GET answered {r.status} {r.reason}", disk=d.display,
                              offset=offset)
        if length is not None:
            want = f"bytes {offset}-{offset + length - 1}/"
            if not r.getheader("Content-Range", "").startswith(want) or int(
                    r.getheader("Content-Length", "-1")) != length:
                raise SourceError("the answer's Content-Range or length is not the range "
                                  "asked for", disk=d.display, offset=offset)

    def reap(self) -> list[tuple[Any, BaseException | None]]:
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        self.c.close()

