"""The command line: argparse -> api; TransferError -> one line and its exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import traceback
from typing import Any, Coroutine

from . import api
from .errors import EXIT_CODES, BadInput, Interrupted, TransferError, VerifyFailed
from .observe import human_bytes, make_renderer
from .pipeline.shape import DEFAULT_CONNECTIONS
from .tls import Tls

_SIZE = re.compile(r"^(\d+)\s*([kmgt]?)(i?b)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1048576', '256K', '1M', '1MiB' -> bytes (powers of 1024)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 65536, 256K, 1M)")
    return int(m.group(1)) << (10 * "_kmgt".index(m.group(2).lower() or "_"))


def _epilog() -> str:
    codes = "\n".join(f"  {code}  {what}" for code, what in sorted(EXIT_CODES.items()))
    return f"exit codes:\n{codes}"


def _add_tls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", metavar="DIR|FILE",
                   help="nbds://: verify the server's certificate, and that it names the URI's "
                        "host, with this CA (a PEM file, or a directory holding ca-cert.pem and "
                        "optionally client-cert.pem, client-key.pem); default $TRANSFER_TLS_CA")
    p.add_argument("--tls-psk-file", metavar="FILE",
                   help="nbds://: authenticate with a pre-shared key from FILE (USERNAME:HEXKEY "
                        "lines; the user is the URI's, nbds://USER@host/); default "
                        "$TRANSFER_TLS_PSK_FILE")


def _tls(args: argparse.Namespace) -> Tls | None:
    """The options' credentials; None leaves the operator's environment in charge."""
    if args.tls_ca is None and args.tls_psk_file is None:
        return None
    return Tls(ca=args.tls_ca, psk_file=args.tls_psk_file)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="transfer", description="Block-level disk transfer engine for moving VM disks.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "copy", help="copy a whole disk (cold migration)", epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Copy the whole disk SOURCE onto TARGET: only allocated data is read, zero "
                    "runs are not written as data, every block is hashed, and the target is "
                    "flushed before success is reported.")
    c.add_argument("source", metavar="SOURCE",
                   help="nbd://host[:port]/export, nbd+unix:///export?socket=PATH, or a file or "
                        "block device")
    c.add_argument("target", metavar="TARGET",
                   help="a file (created at the source's size when missing), a block device, a "
                        "writable NBD URI, or null: (discard)")
    c.add_argument("--report", metavar="FILE", help="write a JSON report to FILE")
    c.add_argument("--progress", choices=("auto", "bar", "json", "none"), default="auto",
                   help="a bar on a terminal (auto, bar), JSON lines on stdout once a second "
                        "(json), or nothing (none); default: auto")
    c.add_argument("--connections", type=int, metavar="N",
                   help=f"NBD connections, one thread each, when the server allows multi-conn "
                        f"(default {DEFAULT_CONNECTIONS})")
    c.add_argument("--requests", type=int, metavar="N", dest="in_flight",
                   help="reads in flight per connection (default 16, or 64 on a single-connection "
                        "server)")
    c.add_argument("--request-size", type=parse_size, metavar="SIZE",
                   help="bytes per read, a multiple of 64K (default 1M, or 256K on a "
                        "single-connection server such as qemu-nbd)")
    c.add_argument("--target-is-zero", action="store_true",
                   help="the target already reads as zeroes: do not write zero runs")
    c.add_argument("--force", action="store_true",
                   help="overwrite a target that carries a filesystem or partition-table signature")
    c.add_argument("--verify", action="store_true",
                   help="read the target back (bypassing the page cache) and compare every block "
                        "with the digests taken while copying; a difference exits 6")
    c.add_argument("--manifest", metavar="FILE",
                   help="write the per-block digests (16 bytes per 64 KiB) to FILE")
    c.add_argument("--retries", type=int, default=8, metavar="N",
                   help="read a failed request again, or reconnect a dropped source, up to N times "
                        "with backoff from 0.1 s doubling to 5 s (default 8, about 16 s)")
    c.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="give up on an NBD server silent this long over a handshake or with reads "
                        "in flight (default 30 s to connect, 120 s for replies)")
    _add_tls(c)

    k = sub.add_parser(
        "checksum", help="print the disk digest of a disk", epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the disk digest (xxh3-128:64k:<hex>) of DISK, like sha256sum: the same "
                    "bytes give the same digest whether raw, qcow2 behind qemu-nbd or a block "
                    "device. Holes are hashed without reading; local disks are read with "
                    "O_DIRECT.")
    k.add_argument("disk", metavar="DISK", help="an NBD URI, or a file or block device")
    k.add_argument("--json", action="store_true",
                   help="print a JSON object: digest, size, seconds, bytes_read")
    k.add_argument("--manifest", metavar="FILE", help="also write the per-block digests to FILE")
    k.add_argument("--progress", choices=("auto", "bar", "json", "none"), default="auto")
    k.add_argument("--retries", type=int, default=8, metavar="N", help="as for copy")
    _add_tls(k)

    v = sub.add_parser(
        "verify", help="prove a target equal to a source, or to a digest (conversion)",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare TARGET with SOURCE block by block, reading both at once, or TARGET "
                    "with --expect DIGEST. Exit 0 when equal, 6 when they differ (with how many "
                    "64 KiB blocks differ and the first offsets). A target larger than the source "
                    "is compared over the source's size.")
    v.add_argument("disks", nargs="+", metavar="DISK", help="SOURCE TARGET, or TARGET with --expect")
    v.add_argument("--expect", metavar="DIGEST", help="the digest TARGET must have")
    v.add_argument("--json", action="store_true", help="print the whole result as JSON")
    v.add_argument("--progress", choices=("auto", "bar", "json", "none"), default="auto")
    v.add_argument("--retries", type=int, default=8, metavar="N", help="as for copy")
    _add_tls(v)

    w = sub.add_parser(
        "sync", help="one warm-migration pass: the whole disk first, then only what changed",
        epilog=_epilog() + "\n\nAn interrupted pass (exit 5, or a killed process) is completed "
        "by running the same command again.", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Copy SOURCE onto TARGET as one pass of a warm migration, keeping a crash-safe "
                    "journal and the per-block manifest in --state DIR. The first pass copies "
                    "everything; later passes copy only the ranges the change source names. A "
                    "missing or unusable change tracker makes the pass a --compare pass (or a full "
                    "one when the source's size changed), and the report says so.")
    w.add_argument("source", metavar="SOURCE", help="an NBD URI, or a file or block device")
    w.add_argument("target", metavar="TARGET",
                   help="a file (created on the first pass when missing), a block device or a "
                        "writable NBD URI")
    w.add_argument("--state", required=True, metavar="DIR",
                   help="the migration's state directory (created when missing; one per disk)")
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
    w.add_argument("--verify", choices=("source",), metavar="source",
                   help="with --final: also hash the whole source again and compare (catches a "
                        "change tracker that missed writes)")
    w.add_argument("--force", action="store_true",
                   help="first pass: overwrite a target that carries a signature")
    w.add_argument("--source-id", metavar="ID",
                   help="the orchestrator's name for the source disk (a VMware disk UUID, a qemu "
                        "node name): the state is bound to it, wherever the disk is served, and "
                        "another ID is refused (without it: the NBD export name and size, or a "
                        "local file's inode)")
    w.add_argument("--source-moved", action="store_true",
                   help="accept a source whose export name or inode differs from the bound one, "
                        "on your word (a new address alone needs no flag now)")
    w.add_argument("--audit-blocks", type=int, default=64, metavar="N",
                   help="a delta pass first reads N blocks its change source calls unchanged and "
                        "checks them against the manifest; a mismatch makes it a --compare pass "
                        "(with --source-id, most differing refuses it); 0 disables (default 64)")
    w.add_argument("--read-back", choices=("pass", "final"), default="pass",
                   help="pass (default): each pass ends by reading back what was written since "
                        "the last read-back and checking it against the manifest (a block that "
                        "differs is written again by the next pass), so --final reads back only "
                        "its own delta; final: leave every read-back to --final")
    w.add_argument("--report", metavar="FILE", help="write a JSON report to FILE")
    w.add_argument("--progress", choices=("auto", "bar", "json", "none"), default="auto")
    w.add_argument("--connections", type=int, metavar="N")
    w.add_argument("--requests", type=int, metavar="N", dest="in_flight")
    w.add_argument("--request-size", type=parse_size, metavar="SIZE")
    w.add_argument("--retries", type=int, default=8, metavar="N",
                   help="as for copy (default 8)")
    w.add_argument("--timeout", type=float, metavar="SECONDS", help="as for copy")
    w.add_argument("--commit-every", type=parse_size, default=1 << 30, metavar="SIZE",
                   help="flush the target and journal progress at least every SIZE bytes (and "
                        "every 10 s); a killed pass copies at most this again (default 1G)")
    _add_tls(w)

    m = sub.add_parser(
        "migrate", help="a whole cold, warm or live migration of a qemu-storage-daemon disk",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Migrate the block node NODE of a running qemu-storage-daemon onto TARGET: "
                    "dirty bitmaps handed over atomically over QMP before each pass, passes "
                    "every --precopy-interval (warm) or back to back (live), a change-rate model "
                    "predicting the cutover downtime, then --on-cutover, the final pass and a "
                    "read-back verification. Run it again after a crash to resume.")
    m.add_argument("target", metavar="TARGET", help="a file, block device or writable NBD URI")
    m.add_argument("--type", choices=("cold", "warm", "live"), default="warm", dest="kind")
    m.add_argument("--qmp", required=True, metavar="SOCKET", help="the daemon's QMP socket")
    m.add_argument("--node", required=True, metavar="NODE", help="the block node to migrate")
    m.add_argument("--state", required=True, metavar="DIR", help="the migration's state directory")
    m.add_argument("--nbd-socket", metavar="PATH",
                   help="the daemon's NBD server socket, when it already runs one (else one is "
                        "started in DIR)")
    m.add_argument("--precopy-interval", default="60m", metavar="DURATION",
                   help="pause between warm passes (default 60m; 30s, 1h...)")
    m.add_argument("--cutover", metavar="WHEN",
                   help="ISO 8601 time, or now (default: wait for `transfer cutover`)")
    m.add_argument("--max-downtime", default="5s", metavar="DURATION",
                   help="live: cut over once the predicted downtime fits (default 5s)")
    m.add_argument("--on-cutover", metavar="CMD",
                   help="command that stops the VM; it must succeed before the final pass")
    m.add_argument("--cutover-timeout", default="5m", metavar="DURATION")
    m.add_argument("--max-passes", type=int, default=100, metavar="N")
    m.add_argument("--source-id", metavar="ID", help="as for sync (e.g. the qemu node's name)")
    m.add_argument("--audit-blocks", type=int, default=64, metavar="N",
                   help="as for sync: precopy passes are audited live (a block the guest "
                        "changed must be named by the next bitmap), the final pass at once")
    m.add_argument("--verify", choices=("source",), metavar="source",
                   help="the final pass also reads and hashes the whole source again, with the "
                        "VM stopped: downtime that grows with the disk's data (the prediction "
                        "counts it); every precopy pass's tracker audit checks a sample of it "
                        "without downtime")
    m.add_argument("--report", metavar="FILE", help="write a JSON report to FILE")
    m.add_argument("--progress", choices=("auto", "bar", "json", "none"), default="auto")

    co = sub.add_parser("cutover", help="ask a running migration to cut over after its pass")
    co.add_argument("--state", required=True, metavar="DIR")

    d = sub.add_parser("demo", help="a warm migration of a running synthetic disk, proven equal")
    d.add_argument("--size", type=parse_size, default=1 << 30, metavar="SIZE",
                   help="size of the synthetic disk (default 1G)")
    d.add_argument("--seed", type=int, default=1, help="seed of the synthetic disk (default 1)")
    d.add_argument("--rate", type=parse_size, default=8 << 20, metavar="SIZE",
                   help="bytes per second the guest writes (default 8M)")
    d.add_argument("--passes", type=int, default=3, help="precopy passes before cutover")
    d.add_argument("--progress", choices=("auto", "bar", "json", "none"), default="auto")
    return p


def _write_report(path: str, data: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a report."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".report-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _summary(r: api.Report) -> str:
    rate = human_bytes(r.size / r.seconds) + "/s" if r.seconds > 0 else "-"
    return (f"copied {human_bytes(r.bytes_copied)}, zeroed {human_bytes(r.bytes_zeroed)}, "
            f"skipped {human_bytes(r.bytes_skipped)} of {human_bytes(r.size)} in "
            f"{r.seconds:.2f} s ({rate}); digest {r.digest}")


async def _run_cancellable(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run coro; SIGINT and SIGTERM cancel it (the engine drains, then raises Interrupted)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        raise Interrupted("interrupted by a signal before the end") from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def cmd_copy(args: argparse.Namespace) -> int:
    renderer = make_renderer(args.progress)
    report = asyncio.run(_run_cancellable(api.copy_async(
        args.source, args.target, connections=args.connections, in_flight=args.in_flight,
        request_size=args.request_size, target_is_zero=args.target_is_zero, force=args.force,
        verify=args.verify, manifest=args.manifest, timeout=args.timeout, retries=args.retries,
        on_progress=renderer, tls=_tls(args))))
    if args.report:
        _write_report(args.report, report.to_dict())
    if args.progress != "none":
        print(f"transfer: {_summary(report)}", file=sys.stderr)
    return 0


def cmd_checksum(args: argparse.Namespace) -> int:
    # With --json the object is stdout's only content, so JSON progress would go to stderr.
    renderer = make_renderer(args.progress, json_stream=sys.stderr if args.json else None)
    r = asyncio.run(_run_cancellable(api.checksum_async(args.disk, manifest=args.manifest,
                                                        retries=args.retries,
                                                        on_progress=renderer, tls=_tls(args))))
    if args.json:
        print(r.to_json())
    else:
        print(f"{r.digest}  {r.disk}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    disks = args.disks
    if args.expect is None and len(disks) != 2 or args.expect is not None and len(disks) != 1:
        raise BadInput("verify takes SOURCE TARGET, or TARGET --expect DIGEST")
    source, target = (None, disks[0]) if args.expect else (disks[0], disks[1])
    renderer = make_renderer(args.progress, json_stream=sys.stderr if args.json else None)
    r = asyncio.run(_run_cancellable(api.verify_async(source, target, expect=args.expect,
                                                      retries=args.retries,
                                                      on_progress=renderer, tls=_tls(args))))
    if args.json:
        print(r.to_json())
    elif r.equal and r.source is None:
        print(f"equal: {r.target} has the expected digest {r.target_digest}")
    elif r.equal:
        print(f"equal: {r.target} holds what {r.source} holds ({human_bytes(r.size)}, "
              f"{r.target_digest})")
    elif r.differing_blocks is None:
        print(f"DIFFER: {r.target} has digest {r.target_digest}, expected {r.source_digest}")
    else:
        first = ", ".join(str(o) for o in r.first_differences[:10])
        print(f"DIFFER: {r.differing_blocks} of {r.blocks} blocks of 64 KiB differ between "
              f"{r.source} and {r.target}; first at offsets {first}")
    return 0 if r.equal else VerifyFailed.exit_code


def cmd_sync(args: argparse.Namespace) -> int:
    from .migration.warm import sync_async

    if args.commit_every <= 0:
        raise BadInput("--commit-every must be positive")
    renderer = make_renderer(args.progress)
    r = asyncio.run(_run_cancellable(sync_async(
        args.source, args.target, state=args.state, dirty_bitmap=args.dirty_bitmap,
        changed_areas=args.changed_areas, compare=args.compare, checkpoint=args.checkpoint,
        final=args.final, verify_source=args.verify == "source", force=args.force,
        source_moved=args.source_moved, source_id=args.source_id,
        audit_blocks=args.audit_blocks,
        connections=args.connections, in_flight=args.in_flight, request_size=args.request_size,
        timeout=args.timeout, retries=args.retries, on_progress=renderer,
        commit_bytes=args.commit_every, tls=_tls(args), read_back=args.read_back)))
    if args.report:
        _write_report(args.report, r.to_dict())
    if r.read_back and r.read_back["mismatched"]:  # never silent, whatever --progress says
        print(f"transfer: warning: {r.read_back['mismatched']} blocks read back from the "
              "target differ from what was written; the next pass writes them again",
              file=sys.stderr)
    if args.progress != "none":
        how = r.change_source + (f" ({r.fallback})" if r.fallback else "")
        done = " verified and complete" if r.complete else ""
        if r.read_back:
            done += f"; read back {human_bytes(r.read_back['bytes'])}"
        print(f"transfer: pass {r.pass_} [{how}]: {human_bytes(r.delta_bytes)} planned, copied "
              f"{human_bytes(r.bytes_copied)}, zeroed {human_bytes(r.bytes_zeroed)}, unchanged "
              f"{human_bytes(r.bytes_unchanged)} in {r.seconds:.2f} s; digest {r.digest}{done}",
              file=sys.stderr)
    return 0


def _pass_line(p: Any) -> str:
    def rate(x: float | None) -> str:
        return "-" if x is None else human_bytes(x) + "/s"

    pred = "-" if p.predicted_downtime is None else f"{p.predicted_downtime:.2f} s"
    return (f"pass {p.pass_:>3}{' final' if p.final else ''}: {human_bytes(p.delta_bytes):>10} "
            f"in {p.seconds:6.2f} s, copy {rate(p.copy_rate)}, guest dirties {rate(p.dirty_rate)}, "
            f"predicted downtime {pred}" + (f" [{p.fallback}]" if p.fallback else "")
            + (f" [{p.note}]" if p.note else ""))


def cmd_migrate(args: argparse.Namespace) -> int:
    from .migration.migrate import migrate_async
    from .units import parse_duration

    quiet = args.progress == "none"
    say = (lambda s: None) if quiet else (lambda s: print(f"transfer: {s}", file=sys.stderr))
    try:
        r = asyncio.run(_run_cancellable(migrate_async(
            args.target, kind=args.kind, qmp=args.qmp, node=args.node, state=args.state,
            nbd_socket=args.nbd_socket, precopy_interval=parse_duration(args.precopy_interval),
            cutover=args.cutover, max_downtime=parse_duration(args.max_downtime),
            on_cutover=args.on_cutover, cutover_timeout=parse_duration(args.cutover_timeout),
            max_passes=args.max_passes, on_pass=lambda p: say(_pass_line(p)),
            on_progress=make_renderer(args.progress) if args.progress in ("bar", "json")
            else None, source_id=args.source_id, audit_blocks=args.audit_blocks,
            verify_source=args.verify == "source")))
    except TransferError as e:  # the passes so far and the VM's state, when it got that far
        if args.report and getattr(e, "report", None) is not None:
            _write_report(args.report, {**e.report.to_dict(), "error": str(e),
                                        "exit_code": e.exit_code})
        raise
    if args.report:
        _write_report(args.report, r.to_dict())
    c = r.cutover
    if c.get("predicted_downtime") is not None:
        say(f"cutover: downtime {c['downtime']:.2f} s (predicted {c['predicted_downtime']:.2f} s), "
            f"digest {r.digest}")
    else:
        say(f"cutover: downtime {c.get('downtime', 0):.2f} s, digest {r.digest}")
    return 0


def cmd_cutover(args: argparse.Namespace) -> int:
    from .migration.migrate import request_cutover

    request_cutover(args.state)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    say = (lambda s: None) if args.progress == "none" else (lambda s: print(s, file=sys.stderr))
    report = run_demo(size=args.size, seed=args.seed, rate=args.rate, passes=args.passes, say=say,
                      on_progress=make_renderer(args.progress) if args.progress in ("bar", "json")
                      else None)
    print(report.to_json())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"copy": cmd_copy, "checksum": cmd_checksum, "verify": cmd_verify,
                    "sync": cmd_sync, "migrate": cmd_migrate, "cutover": cmd_cutover,
                    "demo": cmd_demo}
        return commands[args.command](args)
    except TransferError as e:
        print(f"transfer: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("transfer: interrupted", file=sys.stderr)
        return Interrupted.exit_code
    except Exception:
        traceback.print_exc()
        print("transfer: internal error (this is a bug)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
