"""python -m bench [--out DIR] [--quick] [SCENARIO [its options]]...: run benchmark scenarios.

  python -m bench                  every scenario in turn (cold-copy, warm-delta, live-converge,
                                   kernels, overhead), each with its defaults
  python -m bench NAME --opt ...   some of them, in the order given, each with its own options
                                   (`python -m bench NAME --help` lists them)
  --out DIR   (before the first name) where the JSON lines and the summary go, default bench/out
  --quick     (anywhere) passes --quick to every scenario: tiny sizes, one rep, in seconds
  python -m bench results [--from DIR] [--to FILE] [--include-reduced]
              regenerate bench/RESULTS.md from the newest full run of each scenario in DIR

Exit: the worst of the scenarios' codes; 130 interrupted. More: bench/README.md.
"""

from __future__ import annotations

import datetime
import os
import sys

from .harness import runner
from .harness.machine import ROOT
from .harness.plots import NO_MATPLOTLIB, matplotlib_available
from .harness.report import load_run, write_results, write_run_summary
from .scenarios import NAMED, SCENARIOS, module

DEFAULT_OUT = ROOT / "bench" / "out"


class Usage(Exception):
    pass


def parse(argv: list[str]) -> tuple[str, bool, list[tuple[str, list[str]]]]:
    """(out dir, quick, [(scenario, its own options)]). Harness options come before the first
    scenario name (--quick anywhere); every scenario name starts a new group."""
    out = str(DEFAULT_OUT)
    quick = False
    groups: list[tuple[str, list[str]]] = []
    args = iter(argv)
    for a in args:
        if a in SCENARIOS or a in NAMED:
            if any(name == a for name, _ in groups):
                raise Usage(f"scenario {a!r} given twice")
            groups.append((a, []))
        elif a == "--quick":
            quick = True
        elif groups:
            groups[-1][1].append(a)
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
        elif a == "--out":
            out = next(args, None) or ""
            if not out:
                raise Usage("--out needs a value")
        else:
            raise Usage(f"unknown scenario or option {a!r}; scenarios: {', '.join(SCENARIOS)}")
    if not groups:
        groups = [(name, []) for name in SCENARIOS]
    return out, quick, groups


def _stamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def run(argv: list[str]) -> int:
    try:
        out_dir, quick, groups = parse(argv)
    except Usage as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    modules = {name: module(name) for name, _ in groups}
    plans = []
    for name, args in groups:
        args = args + (["--quick"] if quick else [])
        if "-h" in args or "--help" in args:
            return runner.main(modules[name], args)  # argparse prints the help and exits 0
        # bad options: argparse exits 2 before anything runs; --out: the scenario's own file
        plans.append((name, args, modules[name].parse_args(args).out))
    os.makedirs(out_dir, exist_ok=True)
    stamp = _stamp()
    done = {}
    missing: dict[str, str] = {}
    worst = 0
    for name, args, path in plans:
        if len(plans) > 1:
            print(f"== {name}", flush=True)
        if path is None:
            path = os.path.join(out_dir, f"{name}-{_stamp()}.jsonl")
            n = 1
            while os.path.exists(path):  # two runs within a second
                n += 1
                path = os.path.join(out_dir, f"{name}-{_stamp()}-{n}.jsonl")
            args = args + ["--out", path]
        code = runner.main(modules[name], args)
        worst = max(worst, code)
        if os.path.exists(path) and os.path.getsize(path):
            done[name] = load_run(path, name)
        else:
            missing[name] = f"no results: the scenario exited {code} before writing any"
        if code == 130:
            break
    summary = write_run_summary(out_dir, stamp, done, missing, argv)
    print(f"\nsummary: {summary}" + ("" if matplotlib_available() else f" ({NO_MATPLOTLIB})"),
          flush=True)
    return worst


def results(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench results",
                                description="Regenerate bench/RESULTS.md from the newest run of "
                                            "each scenario's JSON lines.")
    p.add_argument("--from", dest="src", default=str(DEFAULT_OUT),
                   help="directory of JSON lines (default bench/out)")
    p.add_argument("--to", default=str(ROOT / "bench" / "RESULTS.md"),
                   help="markdown file to write (default bench/RESULTS.md; plots go to "
                        "results/ beside it)")
    p.add_argument("--include-reduced", action="store_true",
                   help="take the newest finished run whatever its options (--quick too); "
                        "default: only full runs with the scenario's default options")
    a = p.parse_args(argv)
    to, runs = write_results(a.src, a.to, a.include_reduced)
    for name, r in runs.items():
        print(f"{name}: {r.path}")
    print(f"wrote {to}" + ("" if matplotlib_available() else f" ({NO_MATPLOTLIB})"))
    return 0 if runs else 1


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv and argv[0] == "results":
        return results(argv[1:])
    return run(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
