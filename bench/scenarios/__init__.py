"""The scenarios, one module each (their protocol: bench/harness/runner.py), in the order
`python -m bench` runs them."""

from __future__ import annotations

import importlib
from types import ModuleType

SCENARIOS = {
    "cold-copy": "bench.scenarios.cold_copy",
    "warm-delta": "bench.scenarios.warm_delta",
    "live-converge": "bench.scenarios.live_converge",
    "kernels": "bench.scenarios.kernels",
    "overhead": "bench.scenarios.overhead",
}
# Run only when named (`python -m bench network`): it needs root for network namespaces, the
# network for its Debian image once, and tens of minutes on its slowest link.
# plan-scale: minutes of rate-capped copies, and `transfer plan`.
NAMED = {"network": "bench.scenarios.network", "plan-scale": "bench.scenarios.plan_scale"}


def module(name: str) -> ModuleType:
    return importlib.import_module({**SCENARIOS, **NAMED}[name])
