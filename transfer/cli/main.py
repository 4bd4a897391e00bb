"""The command line: argparse -> api; TransferError -> one line and its exit code."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..errors import Interrupted, TransferError
from . import check, copy, demo, migrate, options, plan, serve, sync


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="transfer", description="Block-level disk transfer engine for moving VM disks.",
        epilog=options.epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    copy.add_parser(sub)
    check.add_checksum_parser(sub)
    check.add_verify_parser(sub)
    sync.add_parser(sub)
    migrate.add_migrate_parser(sub)
    migrate.add_cutover_parser(sub)
    plan.add_parser(sub)
    serve.add_parser(sub)
    demo.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
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


def entry() -> None:
    """The console script (and `python -m transfer.cli`): main(), then leave at once.

    The interpreter's own teardown (finalizing ~250 modules and their objects) costs 16-20 ms
    here (tools: a process importing the migrate path, exit with and without os._exit), and
    at a cutover that is downtime: the orchestrator waits for this process to end before it
    starts the VM on the target. Nothing is lost by skipping it: every state record, manifest
    and report is written and fsynced before main() returns (the engine survives SIGKILL at
    any point, RELIABILITY.md's R1-R11, which is stricter than this), so only the buffered
    output streams are left, flushed here. A flush that fails (a closed pipe) exits 120, as
    the interpreter itself does.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        code = code or 120
    os._exit(code)
