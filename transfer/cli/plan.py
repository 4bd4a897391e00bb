"""transfer plan run | status | cutover: a migration plan of many VMs over many hosts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import BadInput
from ..observe import human_bytes
from . import options
from .output import sayer, write_report
from .run import run

PLAN_HELP = ("a YAML (or JSON) file listing the VMs: name, host, type (cold, warm, live, "
             "conversion), disks (source or qmp+node, target), cutover; and the limits "
             "maxInflightDisksPerHost (default 20) and maxInflight")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="migrate many VMs over many hosts within per-host limits",
                       description="Run a migration plan, show its status, cut its warm VMs "
                                   "over. The state directory keeps every disk's own state: a "
                                   "killed `plan run` run again finishes the plan.",
                       epilog=options.epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="plan_command", required=True, metavar="VERB")
    r = verbs.add_parser("run", help="run the plan (or --dry-run: print its schedule)",
                         parents=[options.report(), options.progress()])
    r.add_argument("plan", metavar="PLAN", help=PLAN_HELP)
    r.add_argument("--state", metavar="DIR", help="the plan's state directory (required but "
                   "for --dry-run; one `plan run` at a time)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the schedule and the predicted time without copying (reads each "
                        "disk's extents and a short sample from each host to time its rate)")
    r.add_argument("--json", action="store_true", help="with --dry-run: print JSON")
    r.set_defaults(handler=cmd_run)
    s = verbs.add_parser("status", help="the plan's disks: pass, bytes, rate, state, downtime",
                         parents=[options.state("the plan's state directory")])
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(handler=cmd_status)
    c = verbs.add_parser("cutover", help="ask warm and live VMs to cut over (all when none named)",
                         parents=[options.state("the plan's state directory")])
    c.add_argument("vms", nargs="*", metavar="VM")
    c.set_defaults(handler=cmd_cutover)


def cmd_run(args: argparse.Namespace) -> int:
    from ..plans import dry_run, load, run_plan  # the engine loads when a verb runs

    plan = load(args.plan)
    if args.dry_run:
        result = dry_run(plan, args.state)
        print(json.dumps(result, indent=2, sort_keys=True) if args.json else schedule_text(result))
        return 0
    if args.state is None:
        raise BadInput("plan run needs --state DIR (but with --dry-run)")
    if args.json:
        raise BadInput("--json goes with --dry-run (the run's report is --report FILE)")
    say = sayer(args.progress == "none")
    report = run(run_plan(plan, args.state, say=say))
    if args.report:
        write_report(args.report, report)
    say(f"plan: {report['done']} disks done, {report['failed']} failed in "
        f"{report['seconds']:.1f} s (predicted {report['predicted_seconds']:.1f} s)")
    return report["exit_code"] if report["failed"] else 0


def schedule_text(r: dict[str, Any]) -> str:
    lines = [f"predicted: {r['predicted_seconds']:.1f} s ({r['rule']}; limits "
             f"{r['limits']['maxInflightDisksPerHost']} disks per host, "
             f"{r['limits']['maxInflight'] or 'no'} overall)"]
    for host, h in sorted(r["hosts"].items()):
        lines.append(f"host {host}: {human_bytes(h['rate'])}/s, {h['disks']} disks, "
                     f"{human_bytes(h['bytes'])} allocated")
    if r["finished"]:
        lines.append(f"finished before: {', '.join(r['finished'])}")
    lines.append(f"{'START':>8} {'END':>8}  {'HOST':<10} {'VM/DISK':<24} {'BYTES':>10}")
    for e in sorted(r["schedule"], key=lambda e: (e["start"], e["host"])):
        lines.append(f"{e['start']:8.1f} {e['end']:8.1f}  {e['host']:<10} "
                     f"{e['vm'] + '/' + e['disk']:<24} {human_bytes(e['bytes']):>10}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from ..plans import status

    data = status(args.state)
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else status_text(data))
    return 0


def status_text(data: dict[str, Any]) -> str:
    def rate(x: float | None) -> str:
        return "-" if not x else human_bytes(x) + "/s"

    head = "running" if data["running"] else "not running"
    if data.get("predicted_seconds") is not None:
        head += f", predicted {data['predicted_seconds']:.1f} s"
    if data.get("predicted_remaining") is not None:
        head += f", {data['predicted_remaining']:.1f} s left (as of {data['elapsed']:.1f} s)"
    lines = [f"plan: {head}",
             f"{'VM':<16} {'DISK':<10} {'HOST':<10} {'PASS':>4} {'BYTES':>21} {'RATE':>12} "
             f"{'STATE':<10} {'DOWNTIME':>8}"]
    for r in data["disks"]:
        done = f"{human_bytes(r['bytes'])}/{human_bytes(r['total'])}"
        down = "-" if r.get("predicted_downtime") is None else f"{r['predicted_downtime']:.2f} s"
        lines.append(f"{r['vm']:<16} {r['disk']:<10} {r['host']:<10} "
                     f"{'-' if r['pass'] is None else r['pass']:>4} {done:>21} "
                     f"{rate(r.get('rate')):>12} {r['state']:<10} {down:>8}")
        if r.get("error"):
            lines.append(f"    {r['error']}")
    return "\n".join(lines)


def cmd_cutover(args: argparse.Namespace) -> int:
    from ..plans import request_cutover

    asked = request_cutover(args.state, args.vms)
    print(f"transfer: cutover asked of {', '.join(asked) if asked else 'no VM'}", file=sys.stderr)
    return 0
