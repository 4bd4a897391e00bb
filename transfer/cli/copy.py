"""transfer copy: a whole disk, once (cold migration)."""

from __future__ import annotations

import argparse
from typing import Any

from .. import api
from ..observe import make_renderer
from . import options
from .output import copy_summary, sayer, write_report
from .run import run

PROGRESS_HELP = ("a bar on a terminal (auto, bar), JSON lines on stdout once a second (json), or "
                 "nothing (none); default: auto")


def add_parser(sub: Any) -> None:
    c = options.add_verb(
        sub, "copy", help="copy a whole disk (cold migration)",
        parents=[options.report(), options.progress(PROGRESS_HELP), options.pipeline(),
                 options.retries(), options.timeout(), options.tls()],
        description="Copy the whole disk SOURCE onto TARGET: only allocated data is read, zero "
                    "runs are not written as data, every block is hashed, and the target is "
                    "flushed before success is reported.")
    c.add_argument("source", metavar="SOURCE",
                   help="nbd://host[:port]/export, nbd+unix:///export?socket=PATH, a file or "
                        "block device, or stream:FILE (written by a copy to stream:FILE)")
    c.add_argument("target", metavar="TARGET",
                   help="a file (created at the source's size when missing), a block device, a "
                        "writable NBD URI, stream:FILE (a new frame stream file), or null: "
                        "(discard)")
    c.add_argument("--target-is-zero", action="store_true",
                   help="the target already reads as zeroes: do not write zero runs")
    c.add_argument("--force", action="store_true",
                   help="overwrite a target that carries a filesystem or partition-table signature")
    c.add_argument("--verify", action="store_true",
                   help="read the target back (bypassing the page cache) and compare every block "
                        "with the digests taken while copying; a difference exits 6")
    c.add_argument("--compress", default="auto", metavar="auto|none|zstd[:LEVEL]",
                   help="frames (stream:FILE targets, https:// sources from transfer serve): "
                        "compress data with zstd; auto: level 1, over https only while the link "
                        "is the bottleneck; a frame that does not shrink is kept raw; default "
                        "auto")
    c.add_argument("--manifest", metavar="FILE",
                   help="write the per-block digests (16 bytes per 64 KiB) to FILE")
    c.set_defaults(handler=cmd_copy)


def cmd_copy(args: argparse.Namespace) -> int:
    report = run(api.copy_async(
        args.source, args.target, connections=args.connections, in_flight=args.in_flight,
        request_size=args.request_size, target_is_zero=args.target_is_zero, force=args.force,
        verify=args.verify, manifest=args.manifest, timeout=args.timeout, retries=args.retries,
        on_progress=make_renderer(args.progress), tls=options.tls_of(args),
        compress=args.compress))
    if args.report:
        write_report(args.report, report.to_dict())
    sayer(args.progress == "none")(copy_summary(report))
    return 0
