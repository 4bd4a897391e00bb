"""transfer demo: the built-in warm migration of a running synthetic disk, proven equal."""

from __future__ import annotations

import argparse
from typing import Any

from ..observe import make_renderer
from . import options
from .output import sayer


def add_parser(sub: Any) -> None:
    # The defaults repeat transfer.demo's DEMO_SIZE, DEMO_RATE and DEMO_PASSES (and run_demo's
    # seed): importing that package loads numpy for its synthetic disk, which every other verb
    # would then pay for at startup.
    d = sub.add_parser("demo", help="a warm migration of a running synthetic disk, proven equal",
                       parents=[options.progress()])
    d.add_argument("--size", type=options.parse_size, default=1 << 30, metavar="SIZE",
                   help="size of the synthetic disk (default 1G)")
    d.add_argument("--seed", type=int, default=1, help="seed of the synthetic disk (default 1)")
    d.add_argument("--rate", type=options.parse_size, default=8 << 20, metavar="SIZE",
                   help="bytes per second the guest writes (default 8M)")
    d.add_argument("--passes", type=int, default=3, help="precopy passes before cutover")
    d.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    report = run_demo(size=args.size, seed=args.seed, rate=args.rate, passes=args.passes,
                      say=sayer(args.progress == "none", prefix=""),
                      on_progress=make_renderer(args.progress) if args.progress in ("bar", "json")
                      else None)
    print(report.to_json())
    return 0
