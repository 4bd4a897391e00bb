"""The kernels scenario's timings as pytest-benchmark benchmarks (bench/scenarios/kernels.py runs
this file with pytest in a child process and turns pytest-benchmark's JSON into its JSON lines).

By hand (options default to the scenario's full run; `-p bench.scenarios.kernels` adds the
--kernels-* options and a commit-info hook that never writes the git index):

    cd /work/main && .venv/bin/python -m pytest bench/scenarios/kernels_bench.py \\
        -p bench.scenarios.kernels -p no:cacheprovider --benchmark-disable-gc \\
        [--kernels-reps 5] [--benchmark-json FILE]

The file's name matches no `python_files` pattern: plain `python -m pytest` never collects it.
One test, test_kernel, parametrized over steps: per kernel and input, `--kernels-reps` rounds of
every implementation interleaved, each step one benchmark in pedantic mode (rounds=1,
iterations=`number`), its extra_info what kernels.records_of reads. The method in full:
bench/README.md, "kernels".
"""

from __future__ import annotations

import functools
import gc
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import xxhash

from transfer import _native
from transfer.integrity.manifest import BLOCK, zero_digest
from transfer.tracking.areas import merge_runs

from ..harness.machine import MiB, wait_quiet
from .kernels import DEFAULTS, ENGINE, INPUTS, KERNELS, UNIT

CLUSTERS = 64              # clustered: the hot regions
CLUSTER_BYTES = 256 * MiB  # ... each this long


def options(config: pytest.Config) -> dict[str, Any]:
    """--kernels-NAME (registered by bench.scenarios.kernels.s pytest_addoption), else DEFAULTS."""
    out = {}
    for name, default in DEFAULTS.items():
        value = config.getoption(f"kernels_{name}", default=None)
        out[name] = default if value is None else value
    return out


# ---------------------------------------------------------------- zero scan and block hash

@functools.lru_cache(maxsize=1)  # made on first use, kept for the session
def make_buffers(size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    random = np.frombuffer(bytearray(rng.bytes(size)), dtype=np.uint8)
    half = random.copy()
    nblocks = size // BLOCK
    zeroed = rng.permutation(nblocks)[: nblocks // 2]
    half.reshape(-1, BLOCK)[zeroed] = 0
    return {"random": random, "half-zero": half}


def buffer_implementations(kernel: str, buf: np.ndarray
                           ) -> tuple[dict[str, Callable[[], Any]], Callable[[str], Any]]:
    """Each implementation as a call without arguments (its outputs allocated once, outside the
    timing), and a function that calls one once more and returns what it computed, as bytes, for
    the cross-check."""
    cy, py = _native.kernels("cython"), _native.kernels("python")
    nblocks = len(buf) // BLOCK
    if kernel == "zero-scan":
        flags = {name: bytearray(nblocks) for name in ("cython", "python")}
        u64 = buf.view(np.uint64)
        timed: dict[str, Callable[[], Any]] = {
            "cython": lambda: cy.zero_blocks(buf, BLOCK, flags["cython"]),
            "python": lambda: py.zero_blocks(buf, BLOCK, flags["python"]),
            "numpy": lambda: (buf.reshape(-1, BLOCK) == 0).all(1),
            "numpy-u64": lambda: ~u64.reshape(-1, BLOCK // 8).any(1),
        }

        def zero_result(name: str) -> bytes:
            r = timed[name]()
            return bytes(flags[name]) if name in flags else r.astype(np.uint8).tobytes()

        return timed, zero_result
    zero = bytearray(nblocks)
    cy.zero_blocks(buf, BLOCK, zero)
    zd = zero_digest()
    digests = {name: bytearray(16 * nblocks) for name in KERNELS["block-hash"]}
    view = memoryview(buf)

    def hash_loop() -> None:
        out = digests["xxhash-loop"]
        h = xxhash.xxh3_128
        for i in range(nblocks):
            out[16 * i:16 * i + 16] = zd if zero[i] else h(view[i * BLOCK:(i + 1) * BLOCK]).digest()

    timed = {
        "cython": lambda: cy.hash_blocks(buf, BLOCK, digests["cython"], zero, zd),
        "python": lambda: py.hash_blocks(buf, BLOCK, digests["python"], zero, zd),
        "xxhash-loop": hash_loop,
    }

    def hash_result(name: str) -> bytes:
        digests[name][:] = bytes(len(digests[name]))
        timed[name]()
        return bytes(digests[name])

    return timed, hash_result


# ---------------------------------------------------------------- interval algebra

Runs = list[tuple[int, int]]


def make_areas(kind: str, n: int, disk: int, rng: np.random.Generator,
               hot: np.ndarray | None = None) -> Runs:
    """n changed areas, (start, end) pairs at 64 KiB-aligned offsets, in random order (as a
    changed-areas file lists them), some overlapping. scattered: 1-4 blocks anywhere on the disk;
    clustered: 1-16 blocks inside the hot regions (first blocks `hot`, CLUSTER_BYTES each),
    overlapping a lot."""
    nblocks = disk // BLOCK
    if kind == "scattered":
        first = rng.integers(0, nblocks, n)
        length = rng.integers(1, 5, n)
    else:
        assert hot is not None
        span = min(CLUSTER_BYTES, disk) // BLOCK
        first = hot[rng.integers(0, len(hot), n)] + rng.integers(0, span, n)
        length = rng.integers(1, 17, n)
    start = first * BLOCK
    end = np.minimum(start + length * BLOCK, disk)
    return list(zip(start.tolist(), end.tolist()))


def interval_input(kind: str, n: int, disk: int, seed: int) -> dict[str, Any]:
    """A warm pass's inputs: the changed areas of this checkpoint (`areas`), the plan of the
    previous pass (`last`: the previous checkpoint's areas, merged; clustered: in the same hot
    regions), interrupted at `upto` (the start of its middle run), on a disk of `disk` bytes;
    and the same as numpy arrays."""
    rng = np.random.default_rng([seed, 0 if kind == "scattered" else 1])
    span = min(CLUSTER_BYTES, disk) // BLOCK
    hot = rng.integers(0, disk // BLOCK - span + 1, CLUSTERS)
    areas = make_areas(kind, n, disk, rng, hot)
    # A list, as before runs were Runs (transfer/runs.py): every implementation gets the same
    # inputs as then, lists of pairs, and the engine's kernels convert them at the edge, timed.
    last = list(merge_runs(make_areas(kind, n, disk, rng, hot), disk))
    upto = last[len(last) // 2][0] if last else 0
    a, l_ = _arrays(areas), _arrays(last)
    return {"kind": kind, "areas": areas, "last": last, "upto": upto, "disk": disk,
            "areas_s": a[0], "areas_e": a[1], "last_s": l_[0], "last_e": l_[1]}


def engine_warm_pass(k: _native.Kernels, areas: Runs, last: Runs, upto: int, size: int
                     ) -> tuple[Runs, Runs, Runs, int]:
    """What a warm pass does with ranges (transfer/state/sync.py: _choose, then _copy), with the
    engine's kernels k (compiled or the twins), called as transfer/tracking/areas.py calls them:
    the areas merged into runs (load_changed_areas ends so), the interrupted pass's rest
    (tainted), what the tracker names beyond the last plan, the new plan (new ∪ tainted: areas.py's
    union_runs), and the bytes to copy from the plan's start."""
    new = k.merge_runs(areas, size, BLOCK)
    tainted = k.clip_runs(last, upto, size)
    grew = k.subtract_runs(new, last)
    plan = k.merge_runs(new + tainted, size, BLOCK)  # Runs, concatenated
    delta = k.runs_bytes(k.clip_runs(plan, 0, size))
    return new, grew, plan, delta


def _arrays(runs: Runs) -> tuple[np.ndarray, np.ndarray]:
    flat = np.fromiter(itertools.chain.from_iterable(runs), dtype=np.int64, count=2 * len(runs))
    return flat[0::2], flat[1::2]


def _pairs(s: np.ndarray, e: np.ndarray) -> Runs:
    return list(zip(s.tolist(), e.tolist()))


def np_merge(s: np.ndarray, e: np.ndarray, size: int, block: int = BLOCK, presorted: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """merge_runs vectorised: rounded outward to block and clipped, sorted by start, a run
    continues while the next start is at most the running maximum of the ends."""
    s = s - s % block
    e = np.minimum(-(-e // block) * block, size)
    if not len(s):
        return s, e
    order = np.argsort(s, kind="stable" if presorted else None)
    s = s[order]
    e = np.maximum.accumulate(e[order])
    first = np.empty(len(s), dtype=bool)
    first[0] = True
    np.greater(s[1:], e[:-1], out=first[1:])
    idx = np.flatnonzero(first)
    ends = np.empty_like(idx)
    ends[:-1] = idx[1:] - 1
    ends[-1] = len(s) - 1
    return s[idx], e[ends]


def np_clip(s: np.ndarray, e: np.ndarray, start: int, end: int
            ) -> tuple[np.ndarray, np.ndarray]:
    cs, ce = np.maximum(s, start), np.minimum(e, end)
    keep = cs < ce
    return cs[keep], ce[keep]


def np_subtract(a_s: np.ndarray, a_e: np.ndarray, b_s: np.ndarray, b_e: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """subtract_runs vectorised (a and b sorted, disjoint, not touching): a sweep over every
    boundary, keeping the stretches inside a run of a and outside b."""
    n, m = len(a_s), len(b_s)
    if not n or not m:
        return a_s, a_e
    pos = np.concatenate([a_s, a_e, b_s, b_e])
    da = np.concatenate([np.ones(n, np.int8), -np.ones(n, np.int8), np.zeros(2 * m, np.int8)])
    db = np.concatenate([np.zeros(2 * n, np.int8), np.ones(m, np.int8), -np.ones(m, np.int8)])
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    ca = np.cumsum(da[order], dtype=np.int32)
    cb = np.cumsum(db[order], dtype=np.int32)
    lastof = np.flatnonzero(np.append(pos[1:] != pos[:-1], True))  # state after a position
    pos, ca, cb = pos[lastof], ca[lastof], cb[lastof]
    keep = (ca[:-1] > 0) & (cb[:-1] == 0)
    return pos[:-1][keep], pos[1:][keep]


def numpy_warm_pass(a_s: np.ndarray, a_e: np.ndarray, l_s: np.ndarray, l_e: np.ndarray,
                    upto: int, size: int) -> tuple[Any, Any, Any, int]:
    """engine_warm_pass with numpy arrays in and out."""
    new = np_merge(a_s, a_e, size)
    tainted = np_clip(l_s, l_e, upto, size)
    grew = np_subtract(*new, l_s, l_e)
    plan = np_merge(np.concatenate([new[0], tainted[0]]), np.concatenate([new[1], tainted[1]]),
                    size, presorted=True)
    cs, ce = np_clip(*plan, 0, size)
    return new, grew, plan, int((ce - cs).sum())


def numpy_warm_pass_lists(areas: Runs, last: Runs, upto: int, size: int
                          ) -> tuple[Runs, Runs, Runs, int]:
    """The numpy baseline as a drop-in for the engine's: lists of (start, end) pairs in and out,
    the conversions timed."""
    new, grew, plan, delta = numpy_warm_pass(*_arrays(areas), *_arrays(last), upto, size)
    return _pairs(*new), _pairs(*grew), _pairs(*plan), delta


def interval_implementations(data: dict[str, Any]
                             ) -> tuple[dict[str, Callable[[], Any]], Callable[[str], Any]]:
    areas, last, upto, disk = data["areas"], data["last"], data["upto"], data["disk"]
    a_s, a_e, l_s, l_e = data["areas_s"], data["areas_e"], data["last_s"], data["last_e"]
    cy, py = _native.kernels("cython"), _native.kernels("python")
    timed: dict[str, Callable[[], Any]] = {
        "cython": lambda: engine_warm_pass(cy, areas, last, upto, disk),
        "python": lambda: engine_warm_pass(py, areas, last, upto, disk),
        "numpy": lambda: numpy_warm_pass_lists(areas, last, upto, disk),
        "numpy-arrays": lambda: numpy_warm_pass(a_s, a_e, l_s, l_e, upto, disk),
    }

    def result(name: str) -> tuple[Runs, Runs, Runs, int]:
        new, grew, plan, delta = timed[name]()
        if name == "numpy-arrays":
            new, grew, plan = _pairs(*new), _pairs(*grew), _pairs(*plan)
        return new, grew, plan, delta

    return timed, result


def _blocks(s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """The distinct 64 KiB block numbers ranges [s, e) touch: an independent way to the answer."""
    first, stop = s // BLOCK, -(-e // BLOCK)
    counts = stop - first
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.unique(np.repeat(first, counts) + offsets)


def _as_runs(blocks: np.ndarray) -> Runs:
    """Sorted distinct block numbers as merged byte runs."""
    if not len(blocks):
        return []
    cut = np.flatnonzero(np.diff(blocks) > 1)
    starts = np.concatenate([blocks[:1], blocks[cut + 1]])
    ends = np.concatenate([blocks[cut], blocks[-1:]]) + 1
    return _pairs(starts * BLOCK, ends * BLOCK)


def interval_expected(data: dict[str, Any]) -> tuple[Runs, Runs, Runs, int]:
    """The warm pass's outputs by block sets (np.unique, setdiff1d, union1d), not by intervals."""
    new = _blocks(data["areas_s"], data["areas_e"])
    last = _blocks(data["last_s"], data["last_e"])
    tainted = last[last >= data["upto"] // BLOCK]
    plan = np.union1d(new, tainted)
    return (_as_runs(new), _as_runs(np.setdiff1d(new, last, assume_unique=True)),
            _as_runs(plan), len(plan) * BLOCK)


# ---------------------------------------------------------------- preparing and checking

def once(f: Callable[[], Any]) -> float:
    """Seconds of one call of f, the garbage collector off (calibration only: the samples are
    pytest-benchmark's)."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0
    finally:
        if gc_was:
            gc.enable()


@dataclass
class Prepared:
    timed: dict[str, Callable[[], Any]]
    numbers: dict[str, int]
    problems: dict[str, list[str]]
    amount: int  # bytes of the buffer, or areas of the interval input
    info: dict[str, Any]


@functools.lru_cache(maxsize=1)  # the previous kernel and input are done: their inputs freed
def prepare(kernel: str, inp: str, size: int, seed: int, reps: int, min_sample: float,
            areas: int, disk: int) -> Prepared:
    """A kernel and input prepared once, with the options: its input, the wait, the warm-up,
    the cross-check, the calibration."""
    names, engine = KERNELS[kernel], ENGINE[kernel]
    info: dict[str, Any] = {}
    if kernel == "interval-algebra":
        data = interval_input(inp, areas, disk, seed)
        timed, result = interval_implementations(data)
        amount = len(data["areas"])
        info = {"disk": data["disk"], "areas": amount, "last_runs": len(data["last"]),
                "upto": data["upto"]}
    else:
        buf = make_buffers(size, seed)[inp]
        timed, result = buffer_implementations(kernel, buf)
        amount = len(buf)
    wait_quiet()  # other people's work on a shared machine is the main source of noise
    results = {name: result(name) for name in names}  # the warm-up, and what each computed
    problems: dict[str, list[str]] = {name: [] for name in names}
    for name in names:
        if results[name] != results[engine]:
            problems[name].append(f"{name}'s output differs from {engine}'s")
    if kernel == "zero-scan":
        expected = amount // BLOCK // 2 if inp == "half-zero" else 0
        for name in names:
            if results[name].count(1) != expected:
                problems[name].append(f"{name} found {results[name].count(1)} zero blocks, "
                                      f"expected {expected}")
    elif kernel == "interval-algebra":
        want = interval_expected(data)
        what = ("merged areas", "areas beyond the last plan", "plan", "plan bytes")
        for name in names:
            for label, got, exp in zip(what, results[name], want):
                if got != exp:
                    problems[name].append(f"{name}'s {label}: not what the block sets give")
        new, grew, plan, delta = results[engine]
        info.update(new_runs=len(new), grew_runs=len(grew), plan_runs=len(plan),
                    plan_bytes=delta)
    # calibration: a sample lasts at least --min-sample
    numbers = {name: max(1, min(100_000, math.ceil(min_sample / max(once(timed[name]), 1e-9))))
               for name in names}
    return Prepared(timed, numbers, problems, amount, info)


# ---------------------------------------------------------------- the benchmarks

def steps(reps: int) -> list[tuple[str, str, int, str]]:
    """(kernel, input, round, impl) in the order they run: interleaved within each kernel and
    input (round 0: A B C, round 1: A B C, ...)."""
    return [(kernel, inp, r, impl) for kernel, impls in KERNELS.items()
            for inp in INPUTS[kernel] for r in range(reps) for impl in impls]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "step" in metafunc.fixturenames:
        todo = steps(options(metafunc.config)["reps"])
        metafunc.parametrize("step", todo, ids=[f"{k}-{i}-r{r}-{m}" for k, i, r, m in todo])


@pytest.fixture(scope="session")
def opts(request: pytest.FixtureRequest) -> dict[str, Any]:
    return options(request.config)


def test_kernel(benchmark: Any, opts: dict[str, Any], step: tuple[str, str, int, str]) -> None:
    kernel, inp, rnd, impl = step
    p = prepare(kernel, inp, **opts)
    benchmark.group = f"{kernel} {inp}"
    benchmark.extra_info.update(kernel=kernel, input=inp, impl=impl, round=rnd,
                                number=p.numbers[impl], engine=impl == ENGINE[kernel],
                                amount=p.amount, unit=UNIT[kernel])
    if rnd == 0:
        benchmark.extra_info.update(problems=p.problems[impl], input_info=p.info)
    benchmark.pedantic(p.timed[impl], rounds=1, iterations=p.numbers[impl], warmup_rounds=0)
    if rnd == 0:
        assert not p.problems[impl], "; ".join(p.problems[impl])
