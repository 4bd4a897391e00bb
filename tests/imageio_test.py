"""Against the real ovirt-imageio 2.5.1 (PyPI, pyproject.toml's test extra), both directions.

a. The engine's https:// client reads from imageio's daemon: a real `ovirt-imageio` process,
   configured by a conf dir in the test's temporary directory (TLS with the openssl-made test
   PKI, the remote service on a free port it picks and logs, the control service on a unix
   socket, the log on stderr), serving a ticket added through its control API
   (PUT /tickets/ID) for a file:// image or an nbd:unix: export of qemu-nbd.
b. imageio's client (ovirt_imageio.client: download(), ImageioClient) reads from a real
   `transfer serve` process.

Every process is our child, stopped by its pid at teardown even when a test fails; readiness
is a line it prints, never a sleep.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import sysconfig
import threading
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from . import hop_test, tls_test
from .conftest import expected_digest_of_file, require, run_cli

imageio_client = pytest.importorskip(
    "ovirt_imageio.client", reason="ovirt-imageio is not installed (tools/setup installs it)")

pki = tls_test.pki  # the openssl-made CA, server certificate (CN/SAN localhost), another CA
image = hop_test.image  # 24 MiB sparse: data, text, written zeroes, holes, an unaligned tail
serve = hop_test.serve  # `transfer serve` processes, found by their hand-over line

START_TIMEOUT = 30.0
_PORT = re.compile(r"remote\.service listening on \('[^']*', (\d+)\)")


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the daemon's control socket (as ovirt_imageio.admin does)."""

    def __init__(self, socket_path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def write_conf(conf_dir: Path, pki: dict[str, Path], control: Path) -> Path:
    """imageio's conf dir: it reads conf.d/*.conf (ovirt_imageio/_internal/server.py,
    load_config), each section overriding the defaults in _internal/config.py."""
    srv = pki["server"]
    (conf_dir / "conf.d").mkdir(parents=True)
    (conf_dir / "conf.d" / "50-test.conf").write_text(f"""\
[daemon]
# not started by systemd: no READY=1 notification (which imports systemd.daemon)
systemd_enable = false
# keep the user running the tests (as root it would switch to the user ovirtimg)
drop_privileges = false
# the services' loops look for a stop this often
poll_interval = 0.1

[tls]
enable = true
key_file = {srv / "server-key.pem"}
cert_file = {srv / "server-cert.pem"}
ca_file = {pki["ca"]}

[remote]
host = localhost
# a free port, chosen by the kernel; the daemon logs it
port = 0

[local]
# its default socket is the abstract "\\0/org/ovirt/imageio": one per host
enable = false

[control]
transport = unix
socket = {control}

[handlers]
keys = stderr

[logger_root]
level = DEBUG
handlers = stderr
""")
    return conf_dir


class Daemon:
    """`ovirt-imageio --conf-dir DIR`, our child. Its stderr (the log) is read by a thread:
    ready once it logs "Ready for requests", its port from "remote.service listening on"."""

    def __init__(self, conf_dir: Path, control: Path) -> None:
        script = shutil.which("ovirt-imageio", path=sysconfig.get_path("scripts"))
        if script is None:
            pytest.skip("the ovirt-imageio script is not installed (tools/setup installs it)")
        self.control = str(control)
        self.lines: list[str] = []
        self.port = 0
        self.ended = False
        self.cond = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, script, "--conf-dir", str(conf_dir)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()
        if not self.wait_for(lambda line: "Ready for requests" in line) or not self.port:
            self.stop()
            raise AssertionError(f"imageio did not start:\n{self.log()}")

    def _drain(self) -> None:
        for line in self.proc.stderr:
            with self.cond:
                m = _PORT.search(line)
                if m:
                    self.port = int(m.group(1))
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.ended = True  # the daemon closed its stderr: nothing more comes
            self.cond.notify_all()

    def wait_for(self, match: Callable[[str], bool], timeout: float = START_TIMEOUT) -> bool:
        """Until a log line matches (True), or the log ends or timeout passes (False)."""
        with self.cond:
            self.cond.wait_for(lambda: self.ended or any(map(match, self.lines)), timeout)
            return any(map(match, self.lines))

    def log(self) -> str:
        with self.cond:
            return "".join(self.lines)

    def control_request(self, method: str, ticket_id: str, body: Any = None) -> int:
        """The control API: PUT /tickets/ID with the ticket JSON, DELETE /tickets/ID."""
        c = UnixHTTPConnection(self.control)
        try:
            data = None if body is None else json.dumps(body).encode()
            c.request(method, f"/tickets/{ticket_id}", body=data,
                      headers={"Content-Type": "application/json"} if data else {})
            r = c.getresponse()
            text = r.read().decode(errors="replace")
        finally:
            c.close()
        assert r.status in (200, 204), f"{method} /tickets/...: {r.status} {text}"
        return r.status

    def add_ticket(self, url: str, size: int) -> tuple[str, str]:
        """A read-only ticket for url (file:///PATH, nbd:unix:SOCKET, https://...) of size
        bytes; (the images URL a client reads, the ticket's transfer_id in the log)."""
        tid, transfer_id = str(uuid.uuid4()), f"transfer-test-{uuid.uuid4().hex[:8]}"
        self.control_request("PUT", tid, {"uuid": tid, "size": size, "url": url,
                                          "timeout": 600, "ops": ["read"],
                                          "transfer_id": transfer_id})
        return f"https://localhost:{self.port}/images/{tid}", transfer_id

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: imageio stops its services and exits
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, pki) -> Iterator[Daemon]:
    d = tmp_path_factory.mktemp("imageio")
    conf = write_conf(d / "conf", pki, d / "control.sock")
    started = Daemon(conf, d / "control.sock")
    try:
        yield started
    finally:
        code = started.stop()
        (d / "daemon.log").write_text(started.log())  # kept for a look after a failure
    assert code == 0, f"imageio exited with {code}:\n{started.log()[-4000:]}"
    assert "Traceback" not in started.log(), started.log()[-8000:]


def read_through(daemon: Daemon, transfer_id: str) -> bool:
    """Did the daemon serve bytes for this ticket? It logs each GET of bytes as
    "READ size=N offset=N ... transfer=ID" (_internal/handlers/images.py)."""
    return daemon.wait_for(lambda line: " READ size=" in line and f"transfer={transfer_id}" in line)


def _padded(src: Path, dst: Path, size: int) -> Path:
    """src's bytes and zeroes up to size (qemu rounds images up to 512 bytes)."""
    data = src.read_bytes()
    dst.write_bytes(data + bytes(size - len(data)))
    return dst


# -- a. our client, imageio's daemon


def test_copy_checksum_verify_from_imageio_file_backend(tmp_path, image, daemon, pki):
    size = image.stat().st_size
    url, transfer_id = daemon.add_ticket(f"file://{image}", size)
    ticket = url.rsplit("/", 1)[1]
    ca = str(pki["ca"])
    out, report = tmp_path / "out.img", tmp_path / "report.json"
    r = run_cli("copy", url, str(out), "--tls-ca", ca, "--report", str(report))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == image.read_bytes()  # byte-identical, the unaligned tail too
    local = run_cli("checksum", str(image))
    want = local.stdout.split()[0]
    assert local.returncode == 0 and want == expected_digest_of_file(str(image))
    assert json.loads(report.read_text())["digest"] == want
    r = run_cli("checksum", url, "--tls-ca", ca)
    assert r.returncode == 0 and r.stdout.split()[0] == want, r.stderr
    r = run_cli("verify", url, str(out), "--tls-ca", ca)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ticket not in r.stdout + r.stderr + report.read_text()
    assert read_through(daemon, transfer_id)

    daemon.control_request("DELETE", ticket)  # imageio waits until no connection uses it
    r = run_cli("checksum", url, "--tls-ca", ca)
    assert r.returncode == 2 and "refused the ticket" in r.stderr, r.stderr


def test_wrong_ca_refused_by_our_client(tmp_path, image, daemon, pki):
    url, _ = daemon.add_ticket(f"file://{image}", image.stat().st_size)
    out = tmp_path / "out.img"
    r = run_cli("copy", url, str(out), "--tls-ca", str(pki["other"]))
    assert r.returncode == 2, r.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = run_cli("checksum", url, "--tls-ca", str(pki["other"] / "ca-cert.pem"))
    assert r.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in r.stderr


@pytest.fixture
def qcow2_export(tmp_path, image, qemu_nbd) -> tuple[str, Path, int]:
    """image as qcow2 behind qemu-nbd, with data, an allocated zero cluster range and
    unallocated holes; (nbd_uri, the same bytes as a raw file, virtual size)."""
    require("qemu-img")
    require("qemu-io")
    qcow2 = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(qcow2)],
                   check=True, capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -z 4M 1M", str(qcow2)],
                   check=True, capture_output=True)
    info = subprocess.run(["qemu-img", "info", "--output=json", str(qcow2)], check=True,
                          capture_output=True, text=True)
    size = json.loads(info.stdout)["virtual-size"]  # rounded up to 512 bytes by qemu
    raw = bytearray(image.read_bytes())
    raw[4 << 20:5 << 20] = bytes(1 << 20)
    (tmp_path / "raw").write_bytes(bytes(raw))
    want = _padded(tmp_path / "raw", tmp_path / "want.img", size)
    # imageio opens an NBD connection per HTTP connection; -A: its "hole" (allocation depth 0)
    server = qemu_nbd(str(qcow2), fmt="qcow2", options=["--shared=16", "--allocation-depth"])
    return server.uri, want, size


def test_copy_from_imageio_nbd_backend_with_zero_and_hole_extents(tmp_path, daemon, pki,
                                                                   qcow2_export):
    nbd_uri, want, size = qcow2_export
    sock = nbd_uri.split("socket=", 1)[1]
    url, transfer_id = daemon.add_ticket(f"nbd:unix:{sock}", size)
    ca = str(pki["ca"])
    ctx = ssl.create_default_context(cafile=ca)
    host, port = "localhost", daemon.port
    c = http.client.HTTPSConnection(host, port, context=ctx, timeout=30)
    c.request("GET", url.split(str(port), 1)[1] + "/extents?context=zero")
    extents = json.loads(c.getresponse().read())
    c.close()
    kinds = {(e["zero"], e["hole"]) for e in extents}
    assert kinds == {(False, False), (True, False), (True, True)}, extents  # data, zero, hole
    out = tmp_path / "out.img"
    r = run_cli("copy", url, str(out), "--tls-ca", ca)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == want.read_bytes()
    digest = expected_digest_of_file(str(want))
    r = run_cli("checksum", nbd_uri)  # the same export, read by NBD, not through imageio
    assert r.returncode == 0 and r.stdout.split()[0] == digest, r.stderr
    r = run_cli("checksum", url, "--tls-ca", ca)
    assert r.returncode == 0 and r.stdout.split()[0] == digest, r.stderr
    r = run_cli("verify", url, str(out), "--tls-ca", ca)
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_through(daemon, transfer_id)


# -- b. imageio's client, our server


def _https_serve(serve: Callable[..., Any], image: Path, pki: dict[str, Path]) -> Any:
    srv = pki["server"]
    return serve(str(image), "--listen", "localhost:0", "--tls-cert",
                 str(srv / "server-cert.pem"), "--tls-key", str(srv / "server-key.pem"))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_imageio_client_downloads_from_transfer_serve(tmp_path, image, serve, pki, fmt):
    require("qemu-img")  # imageio's client writes through qemu-img create and qemu-nbd
    require("qemu-nbd")
    s = _https_serve(serve, image, pki)
    out = tmp_path / f"out.{fmt}"
    imageio_client.download(s.url, str(out), str(pki["ca"]), fmt=fmt)
    size = image.stat().st_size
    padded = -(-size // 512) * 512  # its qemu-img create rounds the new image up to 512
    if fmt == "qcow2":
        raw = tmp_path / "out.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(out), str(raw)],
                       check=True, capture_output=True)
        out = raw
    data = out.read_bytes()
    assert len(data) == padded
    assert data[:size] == image.read_bytes() and not any(data[size:])
    logs = s.stop()
    assert "Traceback" not in logs and s.url.rsplit("/", 1)[1] not in logs


def test_imageio_client_downloads_onto_a_backing_file(tmp_path, image, serve, pki):
    """download(backing_file=) zeroes zero extents, skips holes (client/_api.py download,
    _io.py _copy_data with zero=True, hole=False): a hole must hold what the backing holds."""
    require("qemu-img")
    require("qemu-nbd")
    s = _https_serve(serve, image, pki)
    size = image.stat().st_size
    base = tmp_path / "base.raw"  # not zeroes anywhere: whatever shows through is seen
    base.write_bytes(b"\xff" * (-(-size // 512) * 512))
    out, raw = tmp_path / "out.qcow2", tmp_path / "out.raw"
    imageio_client.download(s.url, str(out), str(pki["ca"]), fmt="qcow2",
                            backing_file=str(base), backing_format="raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(out), str(raw)], check=True,
                   capture_output=True)
    assert raw.read_bytes()[:size] == image.read_bytes()
    s.stop()


def test_imageio_client_api_reads_transfer_serve_exactly(image, serve, pki):
    s = _https_serve(serve, image, pki)
    src = image.read_bytes()
    size = len(src)
    with imageio_client.ImageioClient(s.url, cafile=str(pki["ca"])) as c:
        assert c.size() == size  # the last extent's end: the exact, unaligned size
        assert c.max_readers >= 1 and c.max_writers == 0
        extents = list(c.extents())
        assert extents[0].start == 0 and sum(e.length for e in extents) == size
        assert any(e.zero for e in extents) and any(not e.zero for e in extents)
        for e in extents:
            if not e.zero:
                buf = bytearray(min(e.length, 1 << 20))
                c.read(e.start, buf)
                assert bytes(buf) == src[e.start:e.start + len(buf)]
        for offset, length in ((size - 12345, 12345), (size - 1, 1), (6 << 20, 777),
                               (3 * 65536 - 5, 10)):
            buf = bytearray(length)
            assert c.read(offset, buf) == length
            assert bytes(buf) == src[offset:offset + length]
        with pytest.raises(RuntimeError, match="out of image bounds"):
            c.read(size - 10, bytearray(11))
    assert "Traceback" not in s.stop()


# -- both: imageio's daemon as a proxy in front of transfer serve


def test_imageio_daemon_proxies_transfer_serve(tmp_path, image, serve, daemon, pki):
    """A ticket whose url is transfer serve's https:// URL: imageio's http backend
    (_internal/backends/http.py, the same code as its client) reads our server, and our
    client reads imageio."""
    s = _https_serve(serve, image, pki)
    url, transfer_id = daemon.add_ticket(s.url, image.stat().st_size)
    out = tmp_path / "out.img"
    r = run_cli("copy", url, str(out), "--tls-ca", str(pki["ca"]))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == image.read_bytes()
    r = run_cli("checksum", url, "--tls-ca", str(pki["ca"]))
    assert r.returncode == 0 and r.stdout.split()[0] == expected_digest_of_file(str(image))
    assert read_through(daemon, transfer_id)
    daemon.control_request("DELETE", url.rsplit("/", 1)[1])
    assert "Traceback" not in s.stop()


# -- imageio's checksum, computed by transfer serve and by imageio itself


def _get_json(url: str, ca: Path, path_suffix: str) -> tuple[int, Any]:
    u = urllib.parse.urlsplit(url)
    c = http.client.HTTPSConnection(u.hostname, u.port, timeout=60,
                                    context=ssl.create_default_context(cafile=str(ca)))
    try:
        c.request("GET", u.path + path_suffix)
        r = c.getresponse()
        body = r.read()
        return r.status, (json.loads(body) if r.status == 200 else body.decode())
    finally:
        c.close()


def test_serve_checksum_equals_imageio_client_and_daemon(tmp_path, image, serve, daemon, pki):
    """GET …/checksum from transfer serve equals imageio's own checksum of the same bytes, by
    its client (client.checksum through qemu-nbd) and by its daemon (file:// ticket), for the
    default blake2b and 4 MiB blocks, a smaller block, and a non-blake2 algorithm."""
    require("qemu-nbd")
    size = -(-image.stat().st_size // 512) * 512  # imageio's client reads through qemu-nbd
    disk = tmp_path / "padded.img"  # sparse, so serve's zero extents spare whole blocks
    data = image.read_bytes()
    with open(disk, "wb") as fh:
        fh.truncate(size)
        for pos in range(0, len(data), 1 << 16):
            if any(data[pos:pos + (1 << 16)]):
                fh.seek(pos)
                fh.write(data[pos:pos + (1 << 16)])
    assert os.stat(disk).st_blocks * 512 < size // 2  # holes: the zero-block path is taken
    s = _https_serve(serve, disk, pki)
    url, _ = daemon.add_ticket(f"file://{disk}", size)
    ca = pki["ca"]
    status, algos = _get_json(s.url, ca, "/checksum/algorithms")
    assert status == 200 and {"blake2b", "sha256"} <= set(algos["algorithms"])
    for query, kw in (("", {}), ("?block_size=1048576", {"block_size": 1 << 20}),
                      ("?algorithm=sha256&block_size=2097152",
                       {"algorithm": "sha256", "block_size": 2 << 20})):
        status, ours = _get_json(s.url, ca, "/checksum" + query)
        assert status == 200, ours
        assert ours == imageio_client.checksum(str(disk), **kw)
        status, theirs = _get_json(url, ca, "/checksum" + query)
        assert status == 200 and ours == theirs
    # a changed byte changes it: the digests are of the bytes, not of the extents
    with open(disk, "r+b") as fh:
        fh.seek(6 << 20)
        fh.write(b"A")
    status, changed = _get_json(s.url, ca, "/checksum")
    assert status == 200 and changed == imageio_client.checksum(str(disk)) != ours
    for bad in ("?block_size=4097", "?block_size=1024", "?block_size=x",
                "?block_size=99999999999999", "?algorithm=shake_128", "?algorithm=../x"):
        status, body = _get_json(s.url, ca, "/checksum" + bad)
        assert status == 400, (bad, body)
    daemon.control_request("DELETE", url.rsplit("/", 1)[1])
    logs = s.stop()
    assert "Traceback" not in logs and s.url.rsplit("/", 1)[1] not in logs
