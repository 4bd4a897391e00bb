"""transfer serve: export disks read-only over HTTP(S) for the other side of a network hop."""

from __future__ import annotations

import argparse
from typing import Any

from . import options


def add_parser(sub: Any) -> None:
    from ..serve import DEFAULT_TTL, MAX_CLIENTS

    s = options.add_verb(
        sub, "serve", help="export disks read-only over HTTPS (the ovirt-imageio images API)",
        parents=[options.timeout(), options.tls()],
        description="Export each SOURCE read-only under its own ticket, and print one line "
                    "per export, `URL SOURCE`, on stdout: the URL (https://HOST:PORT/images/"
                    "TICKET) is what `transfer copy`, `checksum`, `verify` and `sync` read on "
                    "the other side, or an ovirt-imageio client. The ticket is the URL's "
                    "secret: it is printed there and written to --ticket-file, nowhere else. "
                    "Serves until SIGTERM or SIGINT, finishing the responses in flight.")
    s.add_argument("sources", metavar="SOURCE", nargs="+",
                   help="an NBD URI, a file or a block device")
    s.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="the address to listen on (port 0: any free port, printed)")
    s.add_argument("--tls-cert", metavar="FILE", help="the server's certificate (PEM)")
    s.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    s.add_argument("--client-ca", metavar="FILE",
                   help="require client certificates signed by this CA (mutual TLS)")
    s.add_argument("--ticket-file", metavar="FILE",
                   help="also write the hand-over lines to FILE (mode 0600); a serve "
                        "restarted with the same FILE and SOURCEs keeps their tickets until "
                        "they expire (--ticket-ttl after FILE was written)")
    s.add_argument("--ticket-ttl", type=float, default=DEFAULT_TTL, metavar="SECONDS",
                   help=f"seconds a ticket is valid; default {DEFAULT_TTL:g}")
    s.add_argument("--max-clients", type=int, default=MAX_CLIENTS, metavar="N",
                   help=f"connections served at once; more are answered 503; default "
                        f"{MAX_CLIENTS}")
    s.add_argument("--dirty-bitmap", metavar="NAME",
                   help="also answer extents?context=dirty from this qemu dirty bitmap (the "
                        "SOURCEs are NBD exports offering it): sync --dirty-bitmap on the "
                        "other side")
    s.add_argument("--insecure", action="store_true",
                   help="allow plain HTTP on an address that is not loopback")
    s.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve.run import serve

    return serve(args.sources, args.listen, cert=args.tls_cert, key=args.tls_key,
                 client_ca=args.client_ca, ticket_file=args.ticket_file,
                 ticket_ttl=args.ticket_ttl, insecure=args.insecure,
                 max_clients=args.max_clients, dirty_bitmap=args.dirty_bitmap,
                 timeout=args.timeout, tls=options.tls_of(args))
