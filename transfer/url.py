"""Disk addresses: parse what the user gave, and redact it for messages.

A disk is named by an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://),
by an images URL (https://HOST:PORT/images/TICKET, from `transfer serve` or an
ovirt-imageio daemon; shown with the ticket hidden), by `null:` (a sink that
discards writes), by `stream:FILE` (a frame stream in a file) or by a local path. Messages, logs,
progress and reports only ever carry redact(url): the password in the
userinfo and every query value except the socket path are replaced. A URI
never carries TLS settings (tls-certificates=, tls-psk-file=, ...): they would
name local files on behalf of whoever wrote the URI (see transfer.tls).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass

from .errors import BadInput

NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
_PUBLIC_QUERY_KEYS = {"socket"}


@dataclass(frozen=True)
class Address:
    kind: str  # "nbd", "http", "local", "null" or "stream"
    url: str  # as given (may hold secrets: never print it)
    display: str  # redacted, for every message


def redact(url: str) -> str:
    """The URL with its secrets replaced by '***' (see the module docstring)."""
    if "://" not in url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        scheme = url.split(":", 1)[0]
        return f"{scheme}://***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = "&".join(
        f"{k}={v if k in _PUBLIC_QUERY_KEYS else '***'}"
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    )
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def scrub(text: str, url: str) -> str:
    """text (a library's message about url) with url's secrets replaced as redact() does."""
    if "://" not in url:
        return text
    text = text.replace(url, redact(url))
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return text
    secrets = [v for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
               if k not in _PUBLIC_QUERY_KEYS]
    if parts.query:
        secrets.append(parts.query)
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        if ":" in userinfo:
            secrets += [userinfo, userinfo.split(":", 1)[1]]
    for s in sorted(set(secrets), key=len, reverse=True):
        if len(s) >= 3:  # a one- or two-character value would blot out unrelated text
            text = text.replace(s, "***")
    return text


def is_loopback(host: str) -> bool:
    """Every address host resolves to is a loopback one."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def _http(url: str) -> Address:
    """An images URL: http(s)://HOST[:PORT]/images/TICKET; shown with its ticket hidden."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port
    except ValueError as e:
        raise BadInput(f"bad URL: {e}", disk=redact(url)) from None
    m = re.fullmatch(r"(/.*)?/images/([A-Za-z0-9_-]+)", parts.path)
    shown = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}" + (
        f"{m.group(1) or ''}/images/***" if m else "/***")
    if not parts.hostname or m is None or parts.query or parts.fragment or "@" in parts.netloc:
        raise BadInput("an images URL is http(s)://HOST[:PORT]/images/TICKET", disk=shown)
    return Address("http", url, shown)


def parse(url: str) -> Address:
    """Classify url; raise BadInput naming what is wrong (without its secrets)."""
    if not isinstance(url, str) or not url:
        raise BadInput("empty disk address")
    if url == "null:":
        return Address("null", url, url)
    if url.startswith("stream:") and "://" not in url:
        return Address("stream", url, url)
    if "://" in url:
        scheme = url.split("://", 1)[0].lower()
        if scheme in ("http", "https"):
            return _http(url)
        shown = redact(url)
        if scheme not in NBD_SCHEMES:
            raise BadInput(
                f"unsupported scheme {scheme!r}: expected one of "
                f"{', '.join(s + '://' for s in NBD_SCHEMES)}, null: or a local path", disk=shown)
        pairs = urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True)
        tls_keys = sorted({k for k, _ in pairs if k.lower().startswith("tls")})
        if tls_keys:  # libnbd would read local files named by an untrusted URI (RELIABILITY X4)
            raise BadInput(f"the URI sets {', '.join(k + '=' for k in tls_keys)}: TLS settings "
                           "come only from --tls-ca or --tls-psk-file (or $TRANSFER_TLS_CA, "
                           "$TRANSFER_TLS_PSK_FILE), never from a disk address", disk=shown)
        if scheme.endswith("+unix"):
            query = dict(pairs)
            sock = query.get("socket")
            if not sock:
                raise BadInput("a unix-socket NBD URI needs ?socket=PATH", disk=shown)
            if not os.path.exists(sock):
                raise BadInput(f"socket {sock} does not exist", disk=shown)
        return Address("nbd", url, shown)
    if ":" in url.split("/", 1)[0] and not os.path.exists(url):
        scheme = url.split(":", 1)[0]
        raise BadInput(f"unsupported disk address {scheme}:...: expected an NBD URI, null: or a "
                       "local path")
    return Address("local", url, url)
