"""transfer migrate and transfer cutover: a whole migration of a qemu-storage-daemon disk."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import BadInput, TransferError
from ..observe import make_renderer
from . import options
from .output import cutover_line, pass_line, sayer, write_report
from .run import run


def add_migrate_parser(sub: Any) -> None:
    m = options.add_verb(
        sub, "migrate", help="a whole cold, warm or live migration of a qemu-storage-daemon disk",
        parents=[options.state("the migration's state directory"),
                 options.source_id("as for sync (e.g. the qemu node's name)"),
                 options.audit_blocks("as for sync: precopy passes are audited live (a block the "
                                      "guest changed must be named by the next bitmap), the "
                                      "final pass at once"),
                 options.verify_source("the final pass also reads and hashes the whole source "
                                       "again, with the VM stopped: downtime that grows with the "
                                       "disk's data (the prediction counts it); every precopy "
                                       "pass's tracker audit checks a sample of it without "
                                       "downtime"),
                 options.report(), options.progress()],
        description="Migrate the block node NODE of a running qemu-storage-daemon onto TARGET "
                    "(or a VM's disks: --disk NODE=TARGET, repeated; one stop for all): "
                    "dirty bitmaps handed over atomically over QMP before each pass, passes "
                    "every --precopy-interval (warm) or back to back (live), a change-rate model "
                    "predicting the cutover downtime, then --on-cutover, the final pass and a "
                    "read-back verification. Run it again after a crash to resume.")
    m.add_argument("target", metavar="TARGET", nargs="?",
                   help="a file, block device or writable NBD URI (with --node)")
    m.add_argument("--type", choices=("cold", "warm", "live"), default="warm", dest="kind")
    m.add_argument("--qmp", required=True, metavar="SOCKET", help="the daemon's QMP socket")
    m.add_argument("--node", metavar="NODE", help="the block node to migrate onto TARGET")
    m.add_argument("--disk", action="append", metavar="NODE=TARGET", dest="disks",
                   help="one disk of the VM, repeated for each (instead of TARGET --node): every "
                        "pass hands all the nodes' bitmaps over in one QMP transaction and "
                        "copies the disks side by side; every target is checked before the one "
                        "stop; each disk's state is DIR/disks/NODE")
    m.add_argument("--nbd-socket", metavar="PATH",
                   help="the daemon's NBD server socket, when it already runs one (else one is "
                        "started in DIR)")
    # The durations and --max-passes repeat migrate_async's defaults, which have no constants.
    m.add_argument("--precopy-interval", default="60m", metavar="DURATION",
                   help="pause between warm passes (default 60m; 30s, 1h...)")
    m.add_argument("--cutover", metavar="WHEN",
                   help="ISO 8601 time, or now (default: wait for `transfer cutover`)")
    m.add_argument("--max-downtime", default="5s", metavar="DURATION",
                   help="live: cut over once the predicted downtime fits (default 5s)")
    m.add_argument("--on-cutover", metavar="CMD",
                   help="command that stops the VM; it must succeed before the final pass")
    m.add_argument("--cutover-timeout", default="5m", metavar="DURATION")
    m.add_argument("--stop-estimate", default="0s", metavar="DURATION",
                   help="how long --on-cutover takes to stop the VM, counted in the predicted "
                        "downtime until a cutover has measured it (default 0s)")
    m.add_argument("--max-passes", type=int, default=100, metavar="N")
    m.set_defaults(handler=cmd_migrate)


def add_cutover_parser(sub: Any) -> None:
    co = sub.add_parser("cutover", help="ask a running migration to cut over after its pass",
                        parents=[options.state()])
    co.set_defaults(handler=cmd_cutover)


def cmd_migrate(args: argparse.Namespace) -> int:
    # Imported here, as in cmd_cutover: the QMP client and the model's statistics are only
    # loaded by the verbs that use them, not by every `transfer` start.
    from ..migration.migrate import migrate_async
    from ..units import parse_duration

    say = sayer(args.progress == "none")
    target, node, disks = _disks(args)
    several = disks is not None and len(disks) > 1  # a pass line then names its disk
    try:
        r = run(migrate_async(
            target, kind=args.kind, qmp=args.qmp, node=node, disks=disks, state=args.state,
            nbd_socket=args.nbd_socket, precopy_interval=parse_duration(args.precopy_interval),
            cutover=args.cutover, max_downtime=parse_duration(args.max_downtime),
            on_cutover=args.on_cutover, cutover_timeout=parse_duration(args.cutover_timeout),
            max_passes=args.max_passes, on_pass=lambda p: say(pass_line(p, several)),
            on_progress=make_renderer(args.progress) if args.progress in ("bar", "json")
            else None, source_id=args.source_id, audit_blocks=args.audit_blocks,
            verify_source=args.verify == "source",
            stop_estimate=parse_duration(args.stop_estimate)))
    except TransferError as e:  # the passes so far and the VM's state, when it got that far
        if args.report and getattr(e, "report", None) is not None:
            write_report(args.report, {**e.report.to_dict(), "error": str(e),
                                       "exit_code": e.exit_code})
        raise
    if args.report:
        write_report(args.report, r.to_dict())
    say(cutover_line(r))
    return 0


def _disks(args: argparse.Namespace) -> tuple[str | None, str | None,
                                              list[tuple[str, str]] | None]:
    """(TARGET, NODE, None) for the one-disk form, (None, None, pairs) for --disk."""
    if args.disks:
        if args.target is not None or args.node is not None:
            raise BadInput("give TARGET --node NODE or --disk NODE=TARGET (repeated), not both")
        pairs = []
        for d in args.disks:
            node, sep, target = d.partition("=")
            if not sep or not node or not target:
                raise BadInput(f"--disk takes NODE=TARGET, not {d!r}")
            pairs.append((node, target))
        return None, None, pairs
    if args.target is None or args.node is None:
        raise BadInput("give TARGET --node NODE, or --disk NODE=TARGET (repeated)")
    return args.target, args.node, None


def cmd_cutover(args: argparse.Namespace) -> int:
    from ..migration.migrate import request_cutover

    request_cutover(args.state)
    return 0
