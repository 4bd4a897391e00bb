"""The options several verbs share, declared once as argparse parent parsers.

Defaults come from the engine's own constants, so a tuned default shows up in
`--help` and in the CLI without a second edit. Where verbs describe a shared
option differently (the `--progress` of migrate never draws a bar on "auto"),
the parent takes that verb's help text; the option itself is declared here only.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from ..disks.base import CONNECT_TIMEOUT, IO_TIMEOUT
from ..errors import EXIT_CODES
from ..pipeline.retry import RETRIES, backoff
from ..pipeline.shape import DEFAULT_CONNECTIONS, MULTI_CONN_REQUEST, SINGLE_CONN_REQUEST
from ..migration.defaults import AUDIT_BLOCKS
from ..tls import CA_FILE, ENV_CA, ENV_PSK_FILE, Tls

_SIZE = re.compile(r"^(\d+)\s*([kmgt]?)(i?b)?$", re.IGNORECASE)
_UNITS = "_kmgt"
PROGRESS = ("auto", "bar", "json", "none")
AS_FOR_COPY = "as for copy"
# The backoff's first wait, its cap (reached long before attempt 64) and the whole budget's.
RETRIES_HELP = (f"read a failed request again, or reconnect a dropped source, up to N times with "
                f"backoff from {backoff(1):g} s doubling to {backoff(64):g} s (default {RETRIES}, "
                f"about {sum(backoff(a) for a in range(1, RETRIES + 1)):.0f} s)")
TIMEOUT_HELP = (f"give up on an NBD server silent this long over a handshake or with reads in "
                f"flight (default {CONNECT_TIMEOUT:g} s to connect, {IO_TIMEOUT:g} s for replies)")


def parse_size(text: str) -> int:
    """'1048576', '256K', '1M', '1MiB' -> bytes (powers of 1024)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 65536, 256K, 1M)")
    return int(m.group(1)) << (10 * _UNITS.index(m.group(2).lower() or "_"))


def size_text(n: int) -> str:
    """Bytes -> the shortest text parse_size reads back: 1 << 30 -> '1G', 262144 -> '256K'."""
    unit = 0
    while unit < len(_UNITS) - 1 and n and n % 1024 == 0:
        n, unit = n >> 10, unit + 1
    return f"{n}{_UNITS[unit].upper() if unit else ''}"


def epilog() -> str:
    codes = "\n".join(f"  {code}  {what}" for code, what in sorted(EXIT_CODES.items()))
    return f"exit codes:\n{codes}"


def add_verb(sub: Any, name: str, *, extra_epilog: str = "",
             **kw: Any) -> argparse.ArgumentParser:
    """A verb with the exit codes below its help, its description printed as written."""
    return sub.add_parser(name, epilog=epilog() + extra_epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def tls() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--tls-ca", metavar="DIR|FILE",
                   help=f"nbds://: verify the server's certificate, and that it names the URI's "
                        f"host, with this CA (a PEM file, or a directory holding {CA_FILE} and "
                        f"optionally client-cert.pem, client-key.pem); default ${ENV_CA}")
    p.add_argument("--tls-psk-file", metavar="FILE",
                   help=f"nbds://: authenticate with a pre-shared key from FILE (USERNAME:HEXKEY "
                        f"lines; the user is the URI's, nbds://USER@host/); default "
                        f"${ENV_PSK_FILE}")
    return p


def tls_of(args: argparse.Namespace) -> Tls | None:
    """The options' credentials; None leaves the operator's environment in charge."""
    if args.tls_ca is None and args.tls_psk_file is None:
        return None
    return Tls(ca=args.tls_ca, psk_file=args.tls_psk_file)


def progress(help: str | None = None) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--progress", choices=PROGRESS, default="auto", help=help)
    return p


def report() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--report", metavar="FILE", help="write a JSON report to FILE")
    return p


def pipeline(documented: bool = True) -> argparse.ArgumentParser:
    """--connections, --requests, --request-size: None lets the engine pick per server."""
    multi_size, multi_flight = MULTI_CONN_REQUEST
    single_size, single_flight = SINGLE_CONN_REQUEST
    helps = (f"NBD connections, one thread each, when the server allows multi-conn (default "
             f"{DEFAULT_CONNECTIONS})",
             f"reads in flight per connection (default {multi_flight}, or {single_flight} on a "
             f"single-connection server)",
             f"bytes per read, a multiple of 64K (default {size_text(multi_size)}, or "
             f"{size_text(single_size)} on a single-connection server such as qemu-nbd)"
             ) if documented else (None, None, None)
    p = _parent()
    p.add_argument("--connections", type=int, metavar="N", help=helps[0])
    p.add_argument("--requests", type=int, metavar="N", dest="in_flight", help=helps[1])
    p.add_argument("--request-size", type=parse_size, metavar="SIZE", help=helps[2])
    return p


def retries(help: str = RETRIES_HELP) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--retries", type=int, default=RETRIES, metavar="N", help=help)
    return p


def timeout(help: str = TIMEOUT_HELP) -> argparse.ArgumentParser:
    """--timeout; None keeps the disks' own."""
    p = _parent()
    p.add_argument("--timeout", type=float, metavar="SECONDS", help=help)
    return p


def audit_blocks(help: str) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--audit-blocks", type=int, default=AUDIT_BLOCKS, metavar="N", help=help)
    return p


def source_id(help: str) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--source-id", metavar="ID", help=help)
    return p


def verify_source(help: str) -> argparse.ArgumentParser:
    """--verify source (sync --final, migrate): hash the whole source again at the end."""
    p = _parent()
    p.add_argument("--verify", choices=("source",), metavar="source", help=help)
    return p


def state(help: str | None = None) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--state", required=True, metavar="DIR", help=help)
    return p
