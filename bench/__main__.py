"""python -m bench [SCENARIO [options]]: run one benchmark scenario, or all of them with no arguments.

Scenarios (each one's --help lists its options):
  cold-copy   a whole-disk copy from nbdkit to null:, a file and a loop device (bench/cold_copy.py)
  warm-delta  a transfer sync delta pass over 1 % dirty blocks against a full pass and nbdcopy,
              and planning a 100,000-area changed-areas file (bench/warm_delta.py)
  live-converge  transfer migrate --type live of a qemu-storage-daemon disk a guest writes to at
              1, 4, 16 and 64 MiB/s: passes, final delta, predicted and measured downtime
              (bench/live_converge.py)
"""

from __future__ import annotations

import importlib
import sys

SCENARIOS = {
    "cold-copy": "bench.cold_copy",
    "warm-delta": "bench.warm_delta",
    "live-converge": "bench.live_converge",
}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not argv:
        worst = 0
        for name, module in SCENARIOS.items():
            print(f"== {name}", flush=True)
            worst = max(worst, importlib.import_module(module).main([]))
        return worst
    name, rest = argv[0], argv[1:]
    if name not in SCENARIOS:
        print(f"bench: unknown scenario {name!r}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    return importlib.import_module(SCENARIOS[name]).main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
