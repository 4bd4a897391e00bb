"""TLS for NBD disks: the operator's credentials, checked, applied to a libnbd handle.

Facts of libnbd 1.14 this module works around (RELIABILITY.md X1-X4, all
seen on this machine):

- With no certificate directory, or one without ca-cert.pem, libnbd falls
  back to the system CA store without ever asking GnuTLS to verify the peer:
  an nbds:// connection to a server whose CA is in no store succeeds (X3).
  So an nbds:// disk needs an explicit credential, and a CA directory must
  hold a readable ca-cert.pem.
- The certificate's host name is checked against the URI's host, and only
  for TCP: over a unix socket libnbd has no host name and verifies nothing.
  So nbds+unix:// is accepted with a PSK only.
- Credentials in a URI (tls-certificates=, tls-psk-file=) are refused by the
  Python bindings, and must stay refused: a URI may come from an untrusted
  party (an API call, a custom resource) and must not name local files (X4).
  They come only from the caller (--tls-ca, --tls-psk-file) or the operator's
  environment (TRANSFER_TLS_CA, TRANSFER_TLS_PSK_FILE).
- A plaintext URI never asks for TLS (X1). With a credential configured, a
  plaintext TCP URI (nbd://host) is refused rather than silently sent in the
  clear; a plaintext unix socket (nbd+unix://) stays allowed, since nothing
  crosses a network (a migration's own qemu-storage-daemon socket is one).

The PSK file's keys never appear in a message: they are checked for shape
only, and lines are named by number.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from .errors import BadInput
from .url import Address

ENV_CA = "TRANSFER_TLS_CA"
ENV_PSK_FILE = "TRANSFER_TLS_PSK_FILE"
CA_FILE = "ca-cert.pem"  # the name libnbd looks for in a certificate directory
MAX_FILE = 1 << 20  # a CA bundle or PSK file larger than this is not one
_PSK_LINE = re.compile(r"^[^:\s][^:]*:[0-9a-fA-F]+$")


def _read(path: str, what: str) -> bytes:
    """A small regular file's bytes, or BadInput naming path and what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise BadInput(f"cannot read the {what} {path}: {os.strerror(e.errno)}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadInput(f"the {what} {path} is not a regular file")
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise BadInput(f"the {what} {path} is larger than {MAX_FILE >> 20} MiB")
    return data


def _check_ca(path: str) -> None:
    if b"-----BEGIN CERTIFICATE-----" not in _read(path, "TLS CA certificate file"):
        raise BadInput(f"the TLS CA certificate file {path} holds no PEM certificate")


def _check_psk(path: str) -> None:
    data = _read(path, "TLS PSK file")
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise BadInput(f"the TLS PSK file {path} is not text of USERNAME:HEXKEY lines") from None
    if not any(line.strip() for line in lines):
        raise BadInput(f"the TLS PSK file {path} is empty")
    for n, line in enumerate(lines, 1):
        if line.strip() and not _PSK_LINE.match(line.rstrip("\r")):
            raise BadInput(f"the TLS PSK file {path}: line {n} is not USERNAME:HEXKEY")


@dataclass(frozen=True)
class Tls:
    """TLS credentials for NBD disks (at most one kind).

    ca: a CA certificate file (PEM), or a directory holding ca-cert.pem (and,
    for client certificates, client-cert.pem and client-key.pem), as libnbd
    and nbdkit lay it out. psk_file: a file of USERNAME:HEXKEY lines (nbdkit
    --tls-psk, psktool); the identity is the URI's user (nbds://NAME@host/),
    else $LOGNAME.
    """

    ca: str | None = None
    psk_file: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Tls":
        """The operator's configuration: TRANSFER_TLS_CA, TRANSFER_TLS_PSK_FILE."""
        env = os.environ if environ is None else environ
        return cls(ca=env.get(ENV_CA) or None, psk_file=env.get(ENV_PSK_FILE) or None)

    @property
    def configured(self) -> bool:
        return self.ca is not None or self.psk_file is not None

    def check(self) -> None:
        """Raise BadInput unless the credentials are usable as given."""
        if self.ca is not None and self.psk_file is not None:
            raise BadInput("give a TLS CA (--tls-ca) or a PSK file (--tls-psk-file), not both")
        if self.ca is not None:
            if not self.ca:
                raise BadInput("the TLS CA path is empty")
            if os.path.isdir(self.ca):
                # Without ca-cert.pem libnbd would quietly fall back to an unverified session.
                _check_ca(os.path.join(self.ca, CA_FILE))
            else:
                _check_ca(self.ca)
        if self.psk_file is not None:
            if not self.psk_file:
                raise BadInput("the TLS PSK file path is empty")
            _check_psk(self.psk_file)

    def check_address(self, addr: Address, kind: str | None = None) -> None:
        """Raise BadInput when addr cannot be connected to safely with these credentials;
        kind: the disk's role, for the message."""
        parts = urllib.parse.urlsplit(addr.url)
        scheme = parts.scheme.lower()
        if scheme.startswith("nbds"):
            if not self.configured:
                raise BadInput(f"{scheme}:// needs --tls-ca DIR|FILE or --tls-psk-file FILE (or "
                               "$TRANSFER_TLS_CA, $TRANSFER_TLS_PSK_FILE): without one the "
                               "server's certificate would not be verified", disk=addr.display,
                               kind=kind)
            if self.ca is not None and scheme.endswith("+unix"):
                raise BadInput("a certificate cannot be verified over a unix socket (libnbd has "
                               "no host name to check it against): use nbds://HOST:PORT or "
                               "--tls-psk-file", disk=addr.display, kind=kind)
            try:
                self.check()
            except BadInput as e:
                e.kind, e.disk = kind or e.kind, addr.display
                raise
            if self.psk_file is not None and "@" not in parts.netloc and not os.environ.get(
                    "LOGNAME"):
                raise BadInput("a PSK needs an identity: give it as the URI's user "
                               f"({scheme}://USER@...) or $LOGNAME", disk=addr.display,
                               kind=kind)
        elif self.configured and not scheme.endswith("+unix"):
            raise BadInput(f"{scheme}:// is plaintext but a TLS credential is configured: use "
                           "nbds:// for TLS (a disk is not sent in the clear by mistake)",
                           disk=addr.display, kind=kind)

    @staticmethod
    def wanted(addr: Address) -> bool:
        """Does addr ask for TLS (nbds://, nbds+unix://)?"""
        return urllib.parse.urlsplit(addr.url).scheme.lower().startswith("nbds")

    @contextlib.contextmanager
    def configure(self, h: Any, addr: Address, nbd: Any) -> Iterator[None]:
        """Set h up for addr; the CA directory handed to libnbd lives until the block ends
        (libnbd reads it during the handshake)."""
        h.set_uri_allow_local_file(False)  # the default; X4 depends on it staying so
        if not self.wanted(addr):
            h.set_tls(nbd.TLS_DISABLE)
            yield
            return
        h.set_tls(nbd.TLS_REQUIRE)  # X1: never ALLOW, which falls back to plaintext
        h.set_tls_verify_peer(True)
        if self.psk_file is not None:
            h.set_tls_psk_file(self.psk_file)
            yield
            return
        assert self.ca is not None  # check_address refused nbds:// without a credential
        if os.path.isdir(self.ca):
            h.set_tls_certificates(self.ca)
            yield
            return
        with _ca_directory(self.ca) as d:
            h.set_tls_certificates(d)
            yield


@contextlib.contextmanager
def _ca_directory(ca_file: str) -> Iterator[str]:
    """A private directory (mode 0700) holding a copy of ca_file as ca-cert.pem, removed after."""
    d = tempfile.mkdtemp(prefix="transfer-tls-")
    try:
        data = _read(ca_file, "TLS CA certificate file")
        fd = os.open(os.path.join(d, CA_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def resolve(tls: Tls | None) -> Tls:
    """tls as given, else the operator's environment."""
    return tls if tls is not None else Tls.from_env()


__all__ = ["Tls", "resolve", "ENV_CA", "ENV_PSK_FILE"]
