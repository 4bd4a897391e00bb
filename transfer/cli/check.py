"""transfer checksum and transfer verify: a disk's digest, and two disks proven equal."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import api
from ..errors import BadInput, VerifyFailed
from ..observe import make_renderer
from . import options
from .output import verify_line
from .run import run


def add_checksum_parser(sub: Any) -> None:
    k = options.add_verb(
        sub, "checksum", help="print the disk digest of a disk",
        parents=[options.progress(), options.retries(options.AS_FOR_COPY), options.tls()],
        description="Print the disk digest (xxh3-128:64k:<hex>) of DISK, like sha256sum: the same "
                    "bytes give the same digest whether raw, qcow2 behind qemu-nbd or a block "
                    "device. Holes are hashed without reading; local disks are read with "
                    "O_DIRECT.")
    k.add_argument("disk", metavar="DISK", help="an NBD URI, or a file or block device")
    k.add_argument("--json", action="store_true",
                   help="print a JSON object: digest, size, seconds, bytes_read")
    k.add_argument("--manifest", metavar="FILE", help="also write the per-block digests to FILE")
    k.set_defaults(handler=cmd_checksum)


def add_verify_parser(sub: Any) -> None:
    v = options.add_verb(
        sub, "verify", help="prove a target equal to a source, or to a digest (conversion)",
        parents=[options.progress(), options.retries(options.AS_FOR_COPY), options.tls()],
        description="Compare TARGET with SOURCE block by block, reading both at once, or TARGET "
                    "with --expect DIGEST. Exit 0 when equal, 6 when they differ (with how many "
                    "64 KiB blocks differ and the first offsets). A target larger than the source "
                    "is compared over the source's size.")
    v.add_argument("disks", nargs="+", metavar="DISK", help="SOURCE TARGET, or TARGET with --expect")
    v.add_argument("--expect", metavar="DIGEST", help="the digest TARGET must have")
    v.add_argument("--json", action="store_true", help="print the whole result as JSON")
    v.set_defaults(handler=cmd_verify)


def _renderer(args: argparse.Namespace) -> Any:
    # With --json the object is stdout's only content, so JSON progress would go to stderr.
    return make_renderer(args.progress, json_stream=sys.stderr if args.json else None)


def cmd_checksum(args: argparse.Namespace) -> int:
    r = run(api.checksum_async(args.disk, manifest=args.manifest, retries=args.retries,
                               on_progress=_renderer(args), tls=options.tls_of(args)))
    print(r.to_json() if args.json else f"{r.digest}  {r.disk}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    disks = args.disks
    if args.expect is None and len(disks) != 2 or args.expect is not None and len(disks) != 1:
        raise BadInput("verify takes SOURCE TARGET, or TARGET --expect DIGEST")
    source, target = (None, disks[0]) if args.expect else (disks[0], disks[1])
    r = run(api.verify_async(source, target, expect=args.expect, retries=args.retries,
                             on_progress=_renderer(args), tls=options.tls_of(args)))
    print(r.to_json() if args.json else verify_line(r))
    return 0 if r.equal else VerifyFailed.exit_code
