"""nbds:// against real nbdkit over TCP with TLS (RELIABILITY.md X1-X4).

A CA, a server certificate for CN=localhost (SAN DNS:localhost) and a second,
unrelated CA are made with openssl for the module; the PSK file is written
here as USERNAME:HEXKEY. Every server is nbdkit on 127.0.0.1 at a free port,
our child, stopped by its pid at teardown.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest

import transfer
from transfer import BadInput, SourceError, TargetError, Tls
from transfer.demo.servers import Server

from .conftest import compare, expected_digest_of_file, require, run_cli, sha256_of

SIZE = 4 << 20
PSK_USER = "mig"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """server/: nbdkit's directory (ca-cert.pem, server-cert.pem, server-key.pem);
    client/: the client's CA directory; ca.pem: the same CA as a file; other/: another CA;
    client-cert/: the CA with a client certificate and key the CA signed."""
    require("openssl")
    d = tmp_path_factory.mktemp("pki")
    server, client, other = d / "server", d / "client", d / "other"
    client_cert = d / "client-cert"
    for p in (server, client, other, client_cert):
        p.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ca_ext = ["-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    _openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=transfer test CA", *ca_ext, cwd=d)
    _openssl("req", *ec, "-keyout", "server/server-key.pem", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n"
                               "basicConstraints=CA:FALSE\n"
                               "keyUsage=digitalSignature,keyEncipherment\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-out", "server/server-cert.pem", "-days", "2",
             "-extfile", "ext.cnf", cwd=d)
    _openssl("req", "-x509", *ec, "-keyout", "other/ca-key.pem", "-out", "other/ca-cert.pem",
             "-days", "2", "-subj", "/CN=localhost", *ca_ext, cwd=d)
    os.unlink(other / "ca-key.pem")
    _openssl("req", *ec, "-keyout", "client-cert/client-key.pem", "-out", "client.csr",
             "-subj", "/CN=transfer client", cwd=d)
    (d / "client.cnf").write_text("extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"
                                  "keyUsage=digitalSignature\n")
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-out", "client-cert/client-cert.pem", "-days", "2",
             "-extfile", "client.cnf", cwd=d)
    for p in (server, client, client_cert):
        shutil.copy(d / "ca.pem", p / "ca-cert.pem")
    return {"server": server, "client": client, "ca": d / "ca.pem", "other": other,
            "client_cert": client_cert}


def _psk_file(path: Path, key: str) -> Path:
    path.write_text(f"{PSK_USER}:{key}\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def psk(tmp_path_factory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("psk")
    key, wrong = secrets.token_hex(32), secrets.token_hex(32)
    return {"key": key, "file": _psk_file(d / "server.psk", key),
            "wrong": _psk_file(d / "wrong.psk", wrong), "wrong_key": wrong}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpNbdkit(Server):
    """nbdkit on 127.0.0.1:port; ready when its pid file exists and the port accepts."""

    program = "nbdkit"

    def __init__(self, pidfile: str, port: int, *args: str) -> None:
        argv = ["nbdkit", "-f", "--exit-with-parent", "-P", pidfile, "-p", str(port),
                "-i", "127.0.0.1", *args]
        super().__init__(argv, pidfile)
        self.port = port

    def _ready(self) -> bool:
        if not os.path.exists(self.sock):
            return False
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0


@pytest.fixture
def tcp_nbdkit(tmp_path) -> Iterator[Callable[..., TcpNbdkit]]:
    """tcp_nbdkit(*nbdkit_args) -> a started server on 127.0.0.1 (.port)."""
    require("nbdkit")
    servers: list[TcpNbdkit] = []

    def start(*args: str) -> TcpNbdkit:
        for attempt in range(5):  # another process may take the free port first
            s = TcpNbdkit(str(tmp_path / f"nbdkit{len(servers)}.pid"), _free_port(), *args)
            servers.append(s)
            try:
                return s.start()  # type: ignore[return-value]
            except Exception:
                s.stop()
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def image(tmp_path) -> Path:
    """A 4 MiB source: data, a hole, data."""
    p = tmp_path / "src.img"
    with open(p, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.seek(3 << 20)
        f.write(os.urandom(1 << 20))
    return p


def cert_server(tcp_nbdkit, pki, image) -> TcpNbdkit:
    return tcp_nbdkit("--tls=require", f"--tls-certificates={pki['server']}", "-r",
                      "file", str(image))


def psk_server(tcp_nbdkit, psk, image) -> TcpNbdkit:
    return tcp_nbdkit("--tls=require", f"--tls-psk={psk['file']}", "-r", "file", str(image))


def _target(tmp_path) -> tuple[Path, str]:
    """An existing target file with known contents; returns it and its sha256."""
    p = tmp_path / "dst.img"
    p.write_bytes(b"\x5a" * SIZE)
    return p, sha256_of(str(p))


def _one_line_error(p: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("transfer: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFER_TLS_")}
    env.update(extra)
    return env


# --- certificates ------------------------------------------------------------------------------


def test_cli_right_ca_directory_and_name_copies(tcp_nbdkit, pki, image, tmp_path):
    srv = cert_server(tcp_nbdkit, pki, image)
    dst = tmp_path / "out.img"
    p = run_cli("copy", f"nbds://localhost:{srv.port}/", str(dst), "--tls-ca", str(pki["client"]),
                "--progress=none", "--report", str(tmp_path / "r.json"), env=_env())
    assert p.returncode == 0, p.stderr
    compare(str(image), str(dst), size=SIZE)
    assert json.loads((tmp_path / "r.json").read_text())["digest"] == \
        expected_digest_of_file(str(image))


def test_cli_ca_file_copies_and_its_directory_is_removed(tcp_nbdkit, pki, image, tmp_path):
    """--tls-ca FILE goes to libnbd through a private directory, gone after the run."""
    srv = cert_server(tcp_nbdkit, pki, image)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dst = tmp_path / "out.img"
    p = run_cli("copy", f"nbds://localhost:{srv.port}/", str(dst), "--tls-ca", str(pki["ca"]),
                "--progress=none", env=_env(TMPDIR=str(tmp)))
    assert p.returncode == 0, p.stderr
    compare(str(image), str(dst), size=SIZE)
    assert list(tmp.iterdir()) == []


def test_cli_wrong_ca_refused_target_untouched(tcp_nbdkit, pki, image, tmp_path):
    srv = cert_server(tcp_nbdkit, pki, image)
    dst, before = _target(tmp_path)
    p = run_cli("copy", f"nbds://localhost:{srv.port}/", str(dst), "--tls-ca",
                str(pki["other"]), "--progress=none", env=_env())
    _one_line_error(p, 3, "certificate verification", f"nbds://localhost:{srv.port}/")
    assert sha256_of(str(dst)) == before


def test_cli_wrong_host_name_refused(tcp_nbdkit, pki, image, tmp_path):
    """127.0.0.1 is not the certificate's name (CN=localhost, DNS:localhost): RELIABILITY X3."""
    srv = cert_server(tcp_nbdkit, pki, image)
    dst, before = _target(tmp_path)
    p = run_cli("copy", f"nbds://127.0.0.1:{srv.port}/", str(dst), "--tls-ca",
                str(pki["client"]), "--progress=none", env=_env())
    _one_line_error(p, 3, "certificate verification")
    assert sha256_of(str(dst)) == before


def test_cli_nbds_without_credential_refused(tcp_nbdkit, pki, image, tmp_path):
    """The exact X3 case: libnbd alone connects to a server whose CA is in no store."""
    srv = cert_server(tcp_nbdkit, pki, image)
    dst, before = _target(tmp_path)
    p = run_cli("copy", f"nbds://localhost:{srv.port}/", str(dst), "--progress=none", env=_env())
    _one_line_error(p, 2, "source nbds://localhost", "needs --tls-ca", "would not be verified")
    assert sha256_of(str(dst)) == before


def test_env_ca_is_used_and_verified(tcp_nbdkit, pki, image, tmp_path):
    """$TRANSFER_TLS_CA is the operator's configuration: the right CA copies, a wrong one fails."""
    srv = cert_server(tcp_nbdkit, pki, image)
    uri = f"nbds://localhost:{srv.port}/"
    p = run_cli("checksum", uri, "--progress=none", env=_env(TRANSFER_TLS_CA=str(pki["ca"])))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == expected_digest_of_file(str(image))
    p = run_cli("checksum", uri, "--progress=none",
                env=_env(TRANSFER_TLS_CA=str(pki["other"])))
    _one_line_error(p, 3, "certificate verification")


def test_ca_directory_without_ca_cert_refused(tcp_nbdkit, pki, image, tmp_path):
    """libnbd would fall back to an unverified session: refused before connecting."""
    srv = cert_server(tcp_nbdkit, pki, image)
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run_cli("checksum", f"nbds://localhost:{srv.port}/", "--tls-ca", str(empty),
                "--progress=none", env=_env())
    _one_line_error(p, 2, "ca-cert.pem")
    with pytest.raises(BadInput, match="ca-cert.pem"):
        transfer.checksum(f"nbds://localhost:{srv.port}/", tls=Tls(ca=str(empty)))


def test_api_ca(tcp_nbdkit, pki, image, tmp_path):
    srv = cert_server(tcp_nbdkit, pki, image)
    dst = tmp_path / "out.img"
    r = transfer.copy(f"nbds://localhost:{srv.port}/", str(dst), tls=Tls(ca=str(pki["ca"])))
    assert r.digest == expected_digest_of_file(str(image))
    compare(str(image), str(dst), size=SIZE)
    wrong, before = _target(tmp_path)
    with pytest.raises(SourceError, match="certificate verification"):
        transfer.copy(f"nbds://localhost:{srv.port}/", str(wrong),
                      tls=Tls(ca=str(pki["other"])))
    assert sha256_of(str(wrong)) == before
    with pytest.raises(BadInput, match="needs --tls-ca"):
        transfer.copy(f"nbds://localhost:{srv.port}/", str(wrong), tls=Tls())
    assert sha256_of(str(wrong)) == before


def test_client_certificate_from_the_ca_directory(tcp_nbdkit, pki, image, tmp_path):
    """A server that verifies its clients (nbdkit --tls-verify-peer) accepts the client
    certificate of a --tls-ca directory, and refuses a directory without one."""
    srv = tcp_nbdkit("--tls=require", f"--tls-certificates={pki['server']}", "--tls-verify-peer",
                     "-r", "file", str(image))
    uri = f"nbds://localhost:{srv.port}/"
    p = run_cli("checksum", uri, "--tls-ca", str(pki["client_cert"]), "--progress=none",
                env=_env())
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == expected_digest_of_file(str(image))
    p = run_cli("checksum", uri, "--tls-ca", str(pki["client"]), "--progress=none", env=_env())
    _one_line_error(p, 3, "cannot connect")


def test_api_tls_target_verified(tcp_nbdkit, pki, image, tmp_path):
    """The target role too: a writable TLS export is verified before anything is written."""
    srv = tcp_nbdkit("--tls=require", f"--tls-certificates={pki['server']}", "memory", str(SIZE))
    uri = f"nbds://localhost:{srv.port}/"
    with pytest.raises(TargetError, match="certificate verification"):
        transfer.copy(str(image), uri, tls=Tls(ca=str(pki["other"])))
    r = transfer.copy(str(image), uri, tls=Tls(ca=str(pki["client"])), verify=True)
    assert r.verified and r.digest == expected_digest_of_file(str(image))


# --- pre-shared keys ---------------------------------------------------------------------------


def test_cli_right_psk_copies_key_never_shown(tcp_nbdkit, psk, image, tmp_path):
    srv = psk_server(tcp_nbdkit, psk, image)
    dst = tmp_path / "out.img"
    report = tmp_path / "r.json"
    p = run_cli("copy", f"nbds://{PSK_USER}@127.0.0.1:{srv.port}/", str(dst), "--tls-psk-file",
                str(psk["file"]), "--progress=json", "--report", str(report), env=_env())
    assert p.returncode == 0, p.stderr
    compare(str(image), str(dst), size=SIZE)
    for text in (p.stdout, p.stderr, report.read_text()):
        assert psk["key"] not in text


def test_cli_wrong_psk_refused_key_never_shown(tcp_nbdkit, psk, image, tmp_path):
    srv = psk_server(tcp_nbdkit, psk, image)
    dst, before = _target(tmp_path)
    p = run_cli("copy", f"nbds://{PSK_USER}@127.0.0.1:{srv.port}/", str(dst), "--tls-psk-file",
                str(psk["wrong"]), "--progress=none", env=_env())
    line = _one_line_error(p, 3, "cannot connect")
    assert psk["wrong_key"] not in p.stdout + p.stderr and psk["key"] not in line
    assert sha256_of(str(dst)) == before


def test_psk_for_checksum_verify_sync(tcp_nbdkit, psk, image, tmp_path):
    """The options reach every command that opens NBD disks; the key shows up nowhere."""
    srv = psk_server(tcp_nbdkit, psk, image)
    uri = f"nbds://{PSK_USER}@127.0.0.1:{srv.port}/"
    opt = ["--tls-psk-file", str(psk["file"]), "--progress=none"]
    want = expected_digest_of_file(str(image))
    outputs = []
    p = run_cli("checksum", uri, *opt, env=_env())
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == want
    outputs.append(p)
    p = run_cli("verify", uri, str(image), *opt, env=_env())
    assert p.returncode == 0, p.stderr
    outputs.append(p)
    dst, state = tmp_path / "sync.img", tmp_path / "state"
    p = run_cli("sync", uri, str(dst), "--state", str(state), "--final", "--report",
                str(tmp_path / "s.json"), *opt, env=_env())
    assert p.returncode == 0, p.stderr
    compare(str(image), str(dst), size=SIZE)
    outputs.append(p)
    p = run_cli("sync", uri, str(tmp_path / "x.img"), "--state", str(tmp_path / "s2"),
                "--tls-psk-file", str(psk["wrong"]), "--progress=none", env=_env())
    _one_line_error(p, 3, "cannot connect")
    outputs.append(p)
    for q in outputs:
        assert psk["key"] not in q.stdout + q.stderr
    for f in [tmp_path / "s.json", *state.rglob("*")]:
        if f.is_file():
            assert psk["key"].encode() not in f.read_bytes(), f


def test_env_psk_and_api_psk(tcp_nbdkit, psk, image, tmp_path):
    srv = psk_server(tcp_nbdkit, psk, image)
    uri = f"nbds://{PSK_USER}@127.0.0.1:{srv.port}/"
    p = run_cli("checksum", uri, "--progress=none",
                env=_env(TRANSFER_TLS_PSK_FILE=str(psk["file"])))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == expected_digest_of_file(str(image))
    assert transfer.checksum(uri, tls=Tls(psk_file=str(psk["file"]))).digest == \
        expected_digest_of_file(str(image))
    with pytest.raises(SourceError) as e:
        transfer.checksum(uri, tls=Tls(psk_file=str(psk["wrong"])))
    assert psk["wrong_key"] not in str(e.value)


# --- no downgrade, no plaintext by mistake ------------------------------------------------------


def test_cli_plaintext_client_against_tls_server_fails(tcp_nbdkit, psk, image, tmp_path):
    srv = psk_server(tcp_nbdkit, psk, image)
    dst, before = _target(tmp_path)
    p = run_cli("copy", f"nbd://127.0.0.1:{srv.port}/", str(dst), "--progress=none", env=_env())
    _one_line_error(p, 3, "cannot connect")
    assert sha256_of(str(dst)) == before


def test_cli_credential_against_plaintext_server_fails(tcp_nbdkit, psk, pki, image, tmp_path):
    """X1: nbds:// with a credential never falls back to plaintext."""
    srv = tcp_nbdkit("-r", "file", str(image))
    dst, before = _target(tmp_path)
    for opt in (["--tls-psk-file", str(psk["file"])], ["--tls-ca", str(pki["ca"])]):
        p = run_cli("copy", f"nbds://{PSK_USER}@localhost:{srv.port}/", str(dst), *opt,
                    "--progress=none", env=_env())
        _one_line_error(p, 3, "cannot connect")
        assert sha256_of(str(dst)) == before
    with pytest.raises(SourceError):
        transfer.copy(f"nbds://localhost:{srv.port}/", str(dst), tls=Tls(ca=str(pki["ca"])))
    assert sha256_of(str(dst)) == before


def test_cli_credential_with_plaintext_tcp_uri_refused(tcp_nbdkit, psk, image, tmp_path):
    """A configured credential with nbd://host is a mistake, not a plaintext copy."""
    srv = tcp_nbdkit("-r", "file", str(image))
    dst, before = _target(tmp_path)
    p = run_cli("copy", f"nbd://127.0.0.1:{srv.port}/", str(dst), "--tls-psk-file",
                str(psk["file"]), "--progress=none", env=_env())
    _one_line_error(p, 2, "is plaintext but a TLS credential is configured")
    p = run_cli("copy", f"nbd://127.0.0.1:{srv.port}/", str(dst), "--progress=none",
                env=_env(TRANSFER_TLS_PSK_FILE=str(psk["file"])))
    _one_line_error(p, 2, "is plaintext but a TLS credential is configured")
    with pytest.raises(BadInput, match="is plaintext but a TLS credential is configured"):
        transfer.copy(f"nbd://127.0.0.1:{srv.port}/", str(dst), tls=Tls(psk_file=str(psk["file"])))
    assert sha256_of(str(dst)) == before


def test_plaintext_unix_socket_stays_allowed_with_credential(nbdkit, psk, image, tmp_path):
    """A local socket crosses no network: a TLS-configured run still copies from it."""
    srv = nbdkit("file", str(image), readonly=True)
    dst = tmp_path / "out.img"
    p = run_cli("copy", srv.uri, str(dst), "--progress=none",
                env=_env(TRANSFER_TLS_PSK_FILE=str(psk["file"])))
    assert p.returncode == 0, p.stderr
    compare(str(image), str(dst), size=SIZE)


def test_nbds_unix_with_certificate_refused(nbdkit, pki, image, tmp_path):
    """libnbd checks no certificate over a unix socket (no host name): refused, PSK only."""
    srv = nbdkit("file", str(image), readonly=True,
                 options=["--tls=require", f"--tls-certificates={pki['server']}"])
    uri = srv.uri.replace("nbd+unix://", "nbds+unix://")
    p = run_cli("checksum", uri, "--tls-ca", str(pki["other"]), "--progress=none", env=_env())
    _one_line_error(p, 2, "cannot be verified over a unix socket")
    with pytest.raises(BadInput, match="cannot be verified over a unix socket"):
        transfer.checksum(uri, tls=Tls(ca=str(pki["client"])))


def test_nbds_unix_with_psk(nbdkit, psk, image, tmp_path):
    srv = nbdkit("file", str(image), readonly=True,
                 options=["--tls=require", f"--tls-psk={psk['file']}"])
    uri = srv.uri.replace("nbd+unix:///", f"nbds+unix://{PSK_USER}@/")
    p = run_cli("checksum", uri, "--tls-psk-file", str(psk["file"]), "--progress=none",
                env=_env())
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == expected_digest_of_file(str(image))


# --- URIs and options ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["tls-psk-file", "tls-certificates", "tls-verify-peer"])
def test_tls_settings_in_uri_refused(tcp_nbdkit, psk, image, tmp_path, key):
    """X4: a URI may come from an untrusted party; it never names local files or TLS policy."""
    srv = psk_server(tcp_nbdkit, psk, image)
    secret_path = str(psk["file"])
    p = run_cli("checksum", f"nbds://{PSK_USER}@127.0.0.1:{srv.port}/?{key}={secret_path}",
                "--progress=none", env=_env())
    _one_line_error(p, 2, f"{key}=", "never from a disk address")
    assert secret_path not in p.stderr
    with pytest.raises(BadInput, match="never from a disk address"):
        transfer.checksum(f"nbds://127.0.0.1:{srv.port}/?{key}={secret_path}",
                          tls=Tls(psk_file=str(psk["file"])))


def test_both_credentials_refused(psk, pki, image):
    p = run_cli("checksum", "nbds://localhost:1/", "--tls-ca", str(pki["ca"]), "--tls-psk-file",
                str(psk["file"]), "--progress=none", env=_env())
    _one_line_error(p, 2, "not both")


def test_bad_psk_file_named_without_its_contents(tmp_path, image):
    bad = tmp_path / "bad.psk"
    key = secrets.token_hex(16)
    bad.write_text(f"{PSK_USER}:{key}\n{PSK_USER}={key}\n")
    p = run_cli("checksum", "nbds://localhost:1/", "--tls-psk-file", str(bad), "--progress=none",
                env=_env())
    _one_line_error(p, 2, "line 2 is not USERNAME:HEXKEY")
    assert key not in p.stderr
    p = run_cli("checksum", "nbds://localhost:1/", "--tls-ca", str(tmp_path / "missing.pem"),
                "--progress=none", env=_env())
    _one_line_error(p, 2, "missing.pem", "No such file")


def test_uri_password_not_echoed_in_tls_errors(tcp_nbdkit, psk, image, tmp_path):
    """A userinfo password in the URI: libnbd takes the whole userinfo as the PSK identity and
    names it in its error; the message shows it redacted."""
    srv = psk_server(tcp_nbdkit, psk, image)
    canary = "CANARY" + secrets.token_hex(8)
    p = run_cli("checksum", f"nbds://{PSK_USER}:{canary}@127.0.0.1:{srv.port}/",
                "--tls-psk-file", str(psk["file"]), "--progress=none", env=_env())
    assert p.returncode != 0
    assert canary not in p.stdout + p.stderr
    assert p.stderr.count("\n") == 1


def test_psk_without_identity_refused(tmp_path, psk):
    """libnbd would fail on getlogin_r without a terminal; say what is missing instead."""
    env = _env()
    env.pop("LOGNAME", None)
    p = run_cli("checksum", "nbds://127.0.0.1:1/", "--tls-psk-file", str(psk["file"]),
                "--progress=none", env=env)
    _one_line_error(p, 2, "source nbds://127.0.0.1:1/", "a PSK needs an identity")


def test_scrub_hides_url_secrets():
    from transfer.url import scrub

    url = "nbds://mig:s3cret-pw@host:10809/exp?token=t0ken-value&socket=/run/x.sock"
    text = (f"nbd_poll: {url}: username mig:s3cret-pw was not found; "
            "token t0ken-value; socket /run/x.sock")
    out = scrub(text, url)
    assert "s3cret-pw" not in out and "t0ken-value" not in out
    assert "/run/x.sock" in out and "host:10809" in out
