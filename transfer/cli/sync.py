"""transfer sync: one pass of a warm migration, with its state kept in --state DIR."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import BadInput
from ..observe import make_renderer
from ..pipeline.retry import RETRIES
from ..migration.defaults import AUDIT_BLOCKS, COMMIT_BYTES, COMMIT_SECONDS
from . import options
from .output import sayer, sync_line, write_report
from .run import run

AUDIT_HELP = (f"a delta pass first reads N blocks its change source calls unchanged and checks "
              f"them against the manifest; a mismatch makes it a --compare pass (with "
              f"--source-id, most differing refuses it); 0 disables (default {AUDIT_BLOCKS})")


def add_parser(sub: Any) -> None:
    w = options.add_verb(
        sub, "sync", help="one warm-migration pass: the whole disk first, then only what changed",
        extra_epilog="\n\nAn interrupted pass (exit 5, or a killed process) is completed by "
                     "running the same command again.",
        parents=[options.state("the migration's state directory (created when missing; one per "
                               "disk)"),
                 options.verify_source("with --final: also hash the whole source again and "
                                       "compare (catches a change tracker that missed writes)"),
                 options.source_id(
                     "the orchestrator's name for the source disk (a VMware disk UUID, a qemu "
                     "node name): the state is bound to it, wherever the disk is served, and "
                     "another ID is refused (without it: the NBD export name and size, or a "
                     "local file's inode)"),
                 options.audit_blocks(AUDIT_HELP), options.report(), options.progress(),
                 options.pipeline(documented=False),
                 options.retries(f"{options.AS_FOR_COPY} (default {RETRIES})"),
                 options.timeout(options.AS_FOR_COPY), options.tls()],
        description="Copy SOURCE onto TARGET as one pass of a warm migration, keeping a crash-safe "
                    "journal and the per-block manifest in --state DIR. The first pass copies "
                    "everything; later passes copy only the ranges the change source names. A "
                    "missing or unusable change tracker makes the pass a --compare pass (or a full "
                    "one when the source's size changed), and the report says so.")
    w.add_argument("source", metavar="SOURCE", help="an NBD URI, or a file or block device")
    w.add_argument("target", metavar="TARGET",
                   help="a file (created on the first pass when missing), a block device or a "
                        "writable NBD URI")
    _add_pass_options(w)
    w.set_defaults(handler=cmd_sync)


def _add_pass_options(w: argparse.ArgumentParser) -> None:
    """What this pass copies, and how it commits and reads back."""
    how = w.add_mutually_exclusive_group()
    how.add_argument("--dirty-bitmap", metavar="NAME",
                     help="the source export's qemu dirty bitmap NAME (qemu-nbd -B NAME) names the "
                          "changed blocks")
    how.add_argument("--changed-areas", metavar="FILE",
                     help="a VMware DiskChangeInfo JSON file names the changed areas")
    how.add_argument("--compare", action="store_true",
                     help="no tracker: read everything, write only blocks whose digest changed "
                          "(the default for a later pass without a change source)")
    w.add_argument("--checkpoint", metavar="ID",
                   help="the orchestrator's checkpoint (changeId, bitmap name) this pass is for; "
                        "run again, a committed checkpoint copies only what its change source "
                        "names beyond what was committed (--compare always runs)")
    w.add_argument("--final", action="store_true",
                   help="the cutover pass: copy the last delta, read the target back against the "
                        "manifest (exit 6 on a difference), and complete the state")
    w.add_argument("--force", action="store_true",
                   help="first pass: overwrite a target that carries a signature")
    w.add_argument("--source-moved", action="store_true",
                   help="accept a source whose export name or inode differs from the bound one, "
                        "on your word (a new address alone needs no flag now)")
    w.add_argument("--read-back", choices=("pass", "final"), default="pass",
                   help="pass (default): each pass ends by reading back what was written since "
                        "the last read-back and checking it against the manifest (a block that "
                        "differs is written again by the next pass), so --final reads back only "
                        "its own delta; final: leave every read-back to --final")
    w.add_argument("--commit-every", type=options.parse_size, default=COMMIT_BYTES, metavar="SIZE",
                   help=f"flush the target and journal progress at least every SIZE bytes (and "
                        f"every {COMMIT_SECONDS:g} s); a killed pass copies at most this again "
                        f"(default {options.size_text(COMMIT_BYTES)})")


def cmd_sync(args: argparse.Namespace) -> int:
    from ..migration.warm import sync_async  # the engine loads when a verb runs

    if args.commit_every <= 0:
        raise BadInput("--commit-every must be positive")
    r = run(sync_async(
        args.source, args.target, state=args.state, dirty_bitmap=args.dirty_bitmap,
        changed_areas=args.changed_areas, compare=args.compare, checkpoint=args.checkpoint,
        final=args.final, verify_source=args.verify == "source", force=args.force,
        source_moved=args.source_moved, source_id=args.source_id,
        audit_blocks=args.audit_blocks,
        connections=args.connections, in_flight=args.in_flight, request_size=args.request_size,
        timeout=args.timeout, retries=args.retries, on_progress=make_renderer(args.progress),
        commit_bytes=args.commit_every, tls=options.tls_of(args), read_back=args.read_back))
    if args.report:
        write_report(args.report, r.to_dict())
    if r.read_back and r.read_back["mismatched"]:  # never silent, whatever --progress says
        print(f"transfer: warning: {r.read_back['mismatched']} blocks read back from the "
              "target differ from what was written; the next pass writes them again",
              file=sys.stderr)
    sayer(args.progress == "none")(sync_line(r))
    return 0
