"""The network hop: frames (transfer.stream), stream:FILE, `transfer serve` and https:// sources.

Every server is a real `transfer serve` process on loopback, found by the hand-over line it
prints; the relay that corrupts a byte in transit is a real TCP proxy in a thread.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import xxhash

from .conftest import expected_digest_of_file, run_cli
from .tls_test import pki  # noqa: F401  (the module's openssl-made CA and certificates)
from transfer.stream import codec
from transfer.stream import frames as f

MiB = 1 << 20


@pytest.fixture
def image(tmp_path) -> Path:
    """A 24 MiB sparse disk: random data, text, explicit zeroes, holes, an unaligned tail."""
    p = tmp_path / "src.img"
    rnd = xxhash.xxh3_128(b"seed").digest() * (MiB // 16)
    with open(p, "wb") as fh:
        fh.truncate(24 * MiB + 12345)
        fh.seek(1 * MiB)
        fh.write(os.urandom(2 * MiB))
        fh.seek(6 * MiB)
        fh.write(b"a disk of text compresses " * 80000)
        fh.seek(12 * MiB)
        fh.write(bytes(2 * MiB))
        fh.seek(20 * MiB + 777)
        fh.write(rnd[:100000])
        fh.seek(24 * MiB)
        fh.write(b"tail" * 3000)
    return p


class Serve:
    """`transfer serve ARGS` as a user runs it; url: its first hand-over line's URL."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "transfer.cli", "serve", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # the event: serve is listening
        if not line:
            raise AssertionError(f"serve did not start: {self.proc.stderr.read()}")
        self.url, self.shown = line.split()

    def stop(self) -> str:
        """SIGTERM, then its stderr (it must exit 0: a clean end)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return err


@pytest.fixture
def serve() -> Iterator:
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        s = Serve(*args)
        started.append(s)
        return s
    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()  # our own child, left by a failed test
            s.proc.wait()


# -- the frame format, field by field


def _stream(data: bytes, level: int | None = 1) -> bytes:
    enc = codec.Encoder(level)
    flags = lambda v: [bytes(v[i:i + f.BLOCK]).count(0) == len(v[i:i + f.BLOCK])  # noqa: E731
                       for i in range(0, len(v), f.BLOCK)]
    return (f.pack_header(len(data)) + b"".join(enc.chunk(memoryview(data), 0, flags))
            + f.pack_frame(f.END, len(data), 0))


def _receive(raw: bytes, size: int) -> bytes:
    out = bytearray(size)
    codec.receive(io.BytesIO(raw).readinto, 0, memoryview(out), "test")
    return bytes(out)


def test_frames_round_trip_and_every_corruption_is_refused():
    data = os.urandom(3 * f.BLOCK) + bytes(2 * f.BLOCK) + b"text " * 40000 + b"end"
    raw = _stream(data)
    assert _receive(raw, len(data)) == data
    assert len(raw) < len(data)  # zero blocks carry no bytes, text compresses
    for pos in range(0, len(raw), 997):  # a flipped bit anywhere: an error, never other data
        bad = bytearray(raw)
        bad[pos] ^= 0x10
        with pytest.raises(f.FrameError):
            _receive(bytes(bad), len(data))
    for cut in (10, f.HEADER.size + 5, len(raw) - 1):
        with pytest.raises(f.FrameError, match="cut short|ends|header"):
            _receive(raw[:cut], len(data))


def test_frames_fields_validated():
    size = 4 * f.BLOCK
    head = f.pack_header(size)
    cases = {
        "not a block boundary": f.pack_frame(f.ZERO, 100, f.BLOCK),
        "bad length": f.pack_frame(f.ZERO, 0, size + f.BLOCK),
        "unknown frame kind": f.pack_frame(9, 0, f.BLOCK),
        "carries a payload": f.pack_frame(f.ZERO, 0, f.BLOCK, f.RAW, 5),
        "codec": f.pack_frame(f.DATA, 0, f.BLOCK, f.ZSTD, 10 * f.BLOCK),
        "an end frame carries nothing": f.pack_frame(f.END, size, 5),
    }
    for message, frame in cases.items():
        with pytest.raises(f.FrameError, match=message):
            _receive(head + frame, size)
    with pytest.raises(f.FrameError, match="was due"):  # out of order
        _receive(head + f.pack_frame(f.ZERO, f.BLOCK, f.BLOCK), size)
    with pytest.raises(f.FrameError, match="having covered"):  # ends early
        _receive(head + f.pack_frame(f.ZERO, 0, f.BLOCK) + f.pack_frame(f.END, f.BLOCK, 0),
                 size)
    with pytest.raises(f.FrameError, match="version"):
        bad = bytearray(head)
        bad[8] = 2
        bad[28:32] = (xxhash.xxh3_64_intdigest(bytes(bad[:28])) & 0xFFFFFFFF).to_bytes(4, "little")
        _receive(bytes(bad), size)


# -- stream:FILE through the CLI


def test_stream_file_round_trip_through_the_cli(tmp_path, image):
    frames, out = tmp_path / "disk.frames", tmp_path / "out.img"
    r = run_cli("copy", str(image), f"stream:{frames}", "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert frames.stat().st_mode & 0o777 == 0o600
    r = run_cli("copy", f"stream:{frames}", str(out), "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == image.read_bytes()
    r = run_cli("checksum", f"stream:{frames}")
    assert r.stdout.split()[0] == expected_digest_of_file(str(image))
    again = run_cli("copy", str(image), f"stream:{frames}")  # written once, never over
    assert again.returncode == 2 and "exists" in again.stderr


def test_stream_file_cut_or_corrupted_is_refused(tmp_path, image):
    frames = tmp_path / "disk.frames"
    assert run_cli("copy", str(image), f"stream:{frames}", "--compress", "none").returncode == 0
    raw = frames.read_bytes()
    (tmp_path / "cut.frames").write_bytes(raw[:-20])
    r = run_cli("copy", f"stream:{tmp_path / 'cut.frames'}", str(tmp_path / "o1.img"))
    assert r.returncode == 3 and "end frame" in r.stderr
    assert not (tmp_path / "o1.img").exists()
    bad = bytearray(raw)
    at = raw.index(b"a disk of text")  # a raw payload's byte
    bad[at + 5] ^= 1
    (tmp_path / "bad.frames").write_bytes(bytes(bad))
    r = run_cli("copy", f"stream:{tmp_path / 'bad.frames'}", str(tmp_path / "o2.img"),
                "--retries", "1")
    assert r.returncode == 3 and "digest" in r.stderr and "offset" in r.stderr
    assert not (tmp_path / "o2.img").exists()


# -- transfer serve and https:// sources


def test_copy_checksum_verify_over_the_hop(tmp_path, image, serve):
    s = serve(str(image), "--listen", "127.0.0.1:0", "--ticket-file", str(tmp_path / "t"))
    ticket = s.url.rsplit("/", 1)[1]
    assert (tmp_path / "t").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "t").read_text().split() == [s.url, str(image)]
    out = tmp_path / "out.img"
    r = run_cli("copy", s.url, str(out), "--progress", "json", "--report",
                str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == image.read_bytes()
    want = expected_digest_of_file(str(image))
    assert json.loads((tmp_path / "r.json").read_text())["digest"] == want
    r = run_cli("checksum", s.url)
    assert r.returncode == 0 and r.stdout.split()[0] == want
    r = run_cli("verify", s.url, str(out))
    assert r.returncode == 0, r.stderr
    logs = s.stop()
    for text in (r.stdout + r.stderr, logs, (tmp_path / "r.json").read_text()):
        assert ticket not in text


def test_the_images_api_as_an_imageio_client_uses_it(image, serve):
    s = serve(str(image), "--listen", "127.0.0.1:0")
    req = urllib.request.Request(s.url, method="OPTIONS")
    opts = json.load(urllib.request.urlopen(req))
    assert "extents" in opts["features"] and opts["max_writers"] == 0
    extents = json.load(urllib.request.urlopen(s.url + "/extents?context=zero"))
    assert extents[0]["start"] == 0
    assert sum(e["length"] for e in extents) == image.stat().st_size
    assert any(not e["zero"] for e in extents) and any(e["zero"] for e in extents)
    assert not any(e["hole"] for e in extents)  # to imageio a hole shows a backing file
    req = urllib.request.Request(s.url, headers={"Range": f"bytes={6 * MiB}-{6 * MiB + 99}"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206 and r.read() == image.read_bytes()[6 * MiB:6 * MiB + 100]
    for headers, code in (({"Range": "bytes=5-1"}, 416), ({"Range": "items=0-1"}, 400),
                          ({"Range": f"bytes=0-{10 ** 12}"}, 416)):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(s.url, headers=headers))
        assert e.value.code == code
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(s.url[:-4] + "AAAA")
    assert e.value.code == 403
    assert "Traceback" not in s.stop()


def test_unknown_or_expired_ticket_is_a_clear_refusal(tmp_path, image, serve):
    s = serve(str(image), "--listen", "127.0.0.1:0", "--ticket-ttl", "0.5")
    wrong = s.url[:-6] + "AAAAAA"
    r = run_cli("copy", wrong, str(tmp_path / "o.img"))
    assert r.returncode == 2 and "ticket" in r.stderr and "AAAAAA" not in r.stderr
    deadline = time.monotonic() + 60  # a guard, not a measurement: the TTL is 0.5 s
    while True:  # the event: the server says the ticket expired
        r = run_cli("checksum", s.url)
        if r.returncode != 0:
            break
        assert time.monotonic() < deadline, "the ticket never expired"
    assert r.returncode == 2 and "unknown or expired" in r.stderr


def test_plain_http_refused_off_loopback(tmp_path, image):
    r = run_cli("serve", str(image), "--listen", "192.0.2.1:0")
    assert r.returncode == 2 and "--insecure" in r.stderr
    r = run_cli("copy", "http://192.0.2.1:1/images/abcdef", str(tmp_path / "o.img"))
    assert r.returncode == 2 and "loopback" in r.stderr and "abcdef" not in r.stderr


def test_https_checks_the_certificate(tmp_path, image, serve, pki):  # noqa: F811
    srv = pki["server"]
    s = serve(str(image), "--listen", "localhost:0", "--tls-cert", str(srv / "server-cert.pem"),
              "--tls-key", str(srv / "server-key.pem"))
    assert s.url.startswith("https://localhost:")
    out = tmp_path / "out.img"
    r = run_cli("copy", s.url, str(out), "--tls-ca", str(pki["ca"]))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == image.read_bytes()
    r = run_cli("checksum", s.url, "--tls-ca", str(pki["other"]))
    assert r.returncode == 2 and "TLS" in r.stderr and "CERTIFICATE_VERIFY_FAILED" in r.stderr
    r = run_cli("checksum", s.url, env={**os.environ, "TRANSFER_TLS_CA": ""})
    assert r.returncode == 2 and "needs the server's CA" in r.stderr


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path, image, serve,
                                                           pki):  # noqa: F811
    srv = pki["server"]
    s = serve(str(image), "--listen", "localhost:0", "--tls-cert", str(srv / "server-cert.pem"),
              "--tls-key", str(srv / "server-key.pem"), "--client-ca", str(pki["ca"]))
    r = run_cli("checksum", s.url, "--tls-ca", str(pki["client_cert"]))
    assert r.returncode == 0, r.stderr
    r = run_cli("checksum", s.url, "--tls-ca", str(pki["client"]))
    assert r.returncode in (2, 3) and "Traceback" not in r.stderr


class Relay:
    """A TCP proxy to 127.0.0.1:port, in threads. On each answer stream (server to client):
    flip: flip the byte at that offset of every connection; cut: close the first connection
    after that many bytes; stall: hold the first connection silent after that many bytes (until
    release is set); rate: bytes per second at most. passed: bytes forwarded so far."""

    def __init__(self, port: int, *, flip: int | None = None, cut: int | None = None,
                 rate: float | None = None, stall: int | None = None) -> None:
        self.port, self.flip, self.cut, self.rate, self.stall = port, flip, cut, rate, stall
        self.stalls = 0
        self.release = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.flipped = self.cuts = self.passed = 0
        self.moved = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        return url.replace(f":{self.port}/", f":{self.sock.getsockname()[1]}/")

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(("127.0.0.1", self.port))
            except OSError:  # the server is down: so is this connection
                c.close()
                continue
            threading.Thread(target=self._pipe, args=(c, s, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, True), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, answers: bool) -> None:
        seen, began = 0, time.monotonic()
        try:
            while data := a.recv(16384):
                if answers:
                    data = self._meddle(bytearray(data), seen)
                    if data is None:
                        return
                    if self.rate:  # the event loop of a slow link: wait until it is due
                        time.sleep(max(0.0, began + (seen + len(data)) / self.rate
                                       - time.monotonic()))
                seen += len(data)
                b.sendall(data)
                if answers:
                    with self.moved:
                        self.passed += len(data)
                        self.moved.notify_all()
        except OSError:
            pass
        finally:  # shutdown first: a close alone leaves the other pipe's recv() holding the
            for x in (a, b):  # socket open, and the client would wait for its timeout
                with contextlib.suppress(OSError):
                    x.shutdown(socket.SHUT_RDWR)
                x.close()

    def _meddle(self, data: bytearray, seen: int) -> bytearray | None:
        if self.flip is not None and seen <= self.flip < seen + len(data):
            data[self.flip - seen] ^= 0x01
            self.flipped += 1
        if self.cut is not None and not self.cuts and seen + len(data) > self.cut:
            self.cuts += 1
            return None
        if self.stall is not None and not self.stalls and seen + len(data) > self.stall:
            self.stalls += 1
            self.release.wait()
            return None
        return data

    def wait_passed(self, n: int) -> None:
        with self.moved:
            assert self.moved.wait_for(lambda: self.passed >= n, timeout=60)


def test_a_byte_flipped_in_transit_is_caught(tmp_path, image, serve):
    s = serve(str(image), "--listen", "127.0.0.1:0")
    port = int(s.url.split(":")[2].split("/")[0])
    relay = Relay(port, flip=300_000)  # inside the first big answer's frames
    url = relay.url(s.url)
    out = tmp_path / "out.img"
    r = run_cli("copy", url, str(out), "--request-size", "4M", "--connections", "1",
                "--retries", "2")  # read again twice, then fail: every answer is flipped
    assert relay.flipped >= 1
    assert r.returncode == 3, r.stderr  # never exit 0 with different data
    assert "offset" in r.stderr and not out.exists()
    relay.sock.close()



def _port(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


def test_a_connection_dropped_mid_answer_is_read_again(tmp_path, image, serve):
    s = serve(str(image), "--listen", "127.0.0.1:0")
    relay = Relay(_port(s.url), cut=200_000)
    out = tmp_path / "out.img"
    r = run_cli("copy", relay.url(s.url), str(out), "--report", str(tmp_path / "r.json"),
                "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert relay.cuts == 1 and out.read_bytes() == image.read_bytes()
    assert json.loads((tmp_path / "r.json").read_text())["retries"] >= 1


def test_a_restarted_server_is_reconnected(tmp_path, image, serve):
    tickets = tmp_path / "tickets"
    s = serve(str(image), "--listen", "127.0.0.1:0", "--ticket-file", str(tickets))
    relay = Relay(_port(s.url), rate=400_000)  # slow enough to restart serve mid-copy
    out = tmp_path / "out.img"
    copy = subprocess.Popen([sys.executable, "-m", "transfer.cli", "copy", relay.url(s.url),
                             str(out), "--progress", "none", "--connections", "1"],
                            stderr=subprocess.PIPE, text=True)
    try:
        relay.wait_passed(300_000)
        s.proc.kill()  # our own child: a crash, not a clean stop
        s.proc.wait()
        again = serve(str(image), "--listen", f"127.0.0.1:{_port(s.url)}", "--ticket-file",
                      str(tickets))
        assert again.url == s.url  # the same ticket: the client's URL still works
        _, err = copy.communicate(timeout=120)
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait()
    assert copy.returncode == 0, err
    assert out.read_bytes() == image.read_bytes()


def test_a_server_stalled_mid_answer_hits_the_timeout_then_is_read_again(tmp_path, image,
                                                                        serve):
    s = serve(str(image), "--listen", "127.0.0.1:0")
    relay = Relay(_port(s.url), stall=150_000)
    out = tmp_path / "out.img"
    try:
        r = run_cli("copy", relay.url(s.url), str(out), "--timeout", "1", "--progress", "none")
    finally:
        relay.release.set()
    assert r.returncode == 0, r.stderr
    assert relay.stalls == 1 and out.read_bytes() == image.read_bytes()


def test_a_stalled_server_hits_the_timeout(tmp_path, image):
    quiet = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    try:
        url = f"http://127.0.0.1:{quiet.getsockname()[1]}/images/{'A' * 43}"
        t = time.monotonic()
        r = run_cli("copy", url, str(tmp_path / "o.img"), "--timeout", "1")
        assert r.returncode == 3 and "timed out" in r.stderr
        assert time.monotonic() - t < 30
    finally:
        quiet.close()


def _ask(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(raw)
        return c.recv(4096)


def test_hostile_requests_get_4xx_and_a_cap_on_clients(image, serve):
    s = serve(str(image), "--listen", "127.0.0.1:0", "--max-clients", "2")
    port = int(s.url.split(":")[2].split("/")[0])
    path = s.url.split(str(port), 1)[1]
    assert _ask(port, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _ask(port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 414")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    assert _ask(port, b"GET " + path.encode() + b" HTTP/1.1\r\n" + many + b"\r\n")[:12] in (
        b"HTTP/1.1 431", b"HTTP/1.1 400")
    assert _ask(port, b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 404")
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:  # both slots held by idle clients: the next one is told so, not left waiting
        assert _ask(port, b"GET " + path.encode() + b" HTTP/1.1\r\n\r\n").startswith(
            b"HTTP/1.1 503")
    finally:
        for c in idle:
            c.close()
    logs = s.stop()
    assert "Traceback" not in logs and "refused, 2 clients already" in logs
    assert path.rsplit("/", 1)[1] not in logs


def test_sigterm_closes_idle_connections_and_finishes_an_answer_in_flight(image, serve):
    """A stop does not wait out CLIENT_TIMEOUT (60 s) on a keep-alive client between
    requests: its connection is closed at once; an answer being sent is finished first."""
    s = serve(str(image), "--listen", "127.0.0.1:0")
    port, path = _port(s.url), s.url.split("/", 3)[3]
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    idle.request("OPTIONS", "/" + path)
    assert idle.getresponse().read()  # answered; the connection stays open (HTTP/1.1)
    busy = socket.create_connection(("127.0.0.1", port), timeout=30)
    busy.sendall(b"GET /" + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    got = busy.recv(65536)  # the answer is under way: 24 MiB, more than the socket buffers
    assert got.startswith(b"HTTP/1.1 200")
    s.proc.terminate()
    assert idle.sock.recv(1) == b""  # closed by the server, not after 60 s
    while chunk := busy.recv(1 << 20):
        got += chunk
    head, body = got.split(b"\r\n\r\n", 1)
    assert body == image.read_bytes()  # the answer in flight was finished, then the end
    idle.close()
    busy.close()
    _, err = s.proc.communicate(timeout=30)
    assert s.proc.returncode == 0 and "finishing the responses in flight" in err, err


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def test_a_thousand_idle_connections_leave_memory_bounded(tmp_path, image, serve):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    s = serve(str(image), "--listen", "127.0.0.1:0")
    before = _rss_kib(s.proc.pid)
    idle = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", _port(s.url))))
        idle[-1].settimeout(30)
        assert idle[-1].recv(100).startswith(b"HTTP/1.1 503")  # past the cap: told at once
        grown = _rss_kib(s.proc.pid) - before
        assert grown < 64 * 1024, f"serve grew {grown} KiB with 1,000 idle connections"
    finally:
        for c in idle:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    r = run_cli("checksum", s.url)  # the slots come back: the server is not stalled
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in s.stop()


def test_a_bitmap_sync_pass_over_the_hop(tmp_path, serve):
    """Pass 0 reads the whole disk through serve; then the guest writes, and pass 1 (the final
    one) reads only what qemu's bitmap b1 names, through serve --dirty-bitmap b1."""
    from .sync_test import (check_equal, make_disk, qcow2_with_bitmap, qemu_io_writes, raw_of,
                            sync)
    from transfer.demo.servers import QemuNbd
    size = 32 * MiB
    raw, image = str(tmp_path / "base.raw"), str(tmp_path / "d.qcow2")
    dst, state, tickets = str(tmp_path / "dst.img"), tmp_path / "state", tmp_path / "tickets"
    make_disk(raw, size, 3)
    qcow2_with_bitmap(image, size, raw)
    sock = str(tmp_path / "qemu-nbd.sock")
    q = QemuNbd(sock, image).start()
    try:
        s = serve(q.uri, "--listen", "127.0.0.1:0", "--ticket-file", str(tickets))
        r = sync(s.url, dst, state, "--checkpoint", "b0")
        s.stop()
    finally:
        q.stop()
    assert r["pass"] == 0
    touched = qemu_io_writes(image, 7, size)
    subprocess.run(["qemu-img", "bitmap", "--disable", image, "b1"], check=True)
    q = QemuNbd(sock, image, options=["-B", "b1"]).start()
    try:  # the same port and ticket file: the same URL, so the state's binding holds
        s2 = serve(q.uri, "--listen", f"127.0.0.1:{_port(s.url)}", "--ticket-file", str(tickets),
                   "--dirty-bitmap", "b1")
        assert s2.url == s.url
        r = sync(s2.url, dst, state, "--dirty-bitmap", "b1", "--checkpoint", "b1", "--final")
        s2.stop()
    finally:
        q.stop()
    assert r["change_source"] == "dirty bitmap b1" and r["fallback"] is None, r
    assert r["delta_bytes"] == len(touched) * 64 * 1024
    assert r["complete"]
    check_equal(raw_of(image, str(tmp_path / "now.raw")), dst, size, r)


def test_serve_refuses_a_bitmap_the_source_lacks(tmp_path, image):
    r = run_cli("serve", str(image), "--listen", "127.0.0.1:0", "--dirty-bitmap", "b1")
    assert r.returncode == 2 and "does not offer the dirty bitmap 'b1'" in r.stderr


def test_auto_compresses_only_where_the_link_is_the_bottleneck():
    fast, slow = codec.Auto(1), codec.Auto(1)
    assert fast.choose() == 1  # nothing measured yet: compress, and learn what it costs
    encoded = f"{4 * MiB} {MiB} 0.0125 0.02"  # 4 MiB compressed 4x at 320 MiB/s
    fast.observe(MiB, 0.02 + MiB / (2000 * MiB), encoded)  # a 2 GB/s link: raw is quicker
    slow.observe(MiB, 0.02 + MiB / (12 * MiB), encoded)  # 100 Mbit/s: compressing pays
    fast_choices = [fast.choose() for _ in range(32)]
    assert fast_choices.count(None) == 30 and fast_choices.count(1) == 2  # raw, probing
    assert [slow.choose() for _ in range(32)] == [1] * 32
    shrinks_not = codec.Auto(3)  # a link at 0.6x the compression speed, data that does not
    for _ in range(5):  # shrink (the ratio is an average: one answer does not decide)
        shrinks_not.observe(MiB, MiB / (200 * MiB), f"{4 * MiB} {4 * MiB} 0.0125 0")
    assert shrinks_not.choose() is None
    slowest = codec.Auto(1)  # far below the compression speed: zstd whatever the last ratio
    slowest.observe(MiB, MiB / (12 * MiB), f"{4 * MiB} {4 * MiB} 0.0125 0")
    assert slowest.choose() == 1
