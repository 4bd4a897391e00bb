"""kernels: the native kernels (zero scan, block hash) beside their pure-Python twins and a baseline.

In this process, on two buffers of --size bytes (default 64 MiB, larger than the CPU caches):
`random` (random bytes: no block is zero) and `half-zero` (the same with a random half of its
64 KiB blocks zeroed). Each is scanned and hashed in 64 KiB blocks, as the engine's copy does
(transfer/pipeline/copy.py: zero_blocks, then hash_blocks with the zero flags):

  zero-scan    cython       transfer._native.kernels("cython").zero_blocks(buf, BLOCK, flags)
               python       kernels("python").zero_blocks (transfer/_native/_reference.py)
               numpy        (arr.reshape(-1, BLOCK) == 0).all(1)
               numpy-u64    ~arr.view(np.uint64).reshape(-1, BLOCK // 8).any(1)
  block-hash   cython       kernels("cython").hash_blocks(buf, BLOCK, digests, flags, zero_digest)
               python       kernels("python").hash_blocks, the same arguments
               xxhash-loop  a Python loop: xxhash.xxh3_128(block).digest() per block (the zero
                            digest for a flagged block), into the same digests buffer

Method: per kernel and buffer, a wait for an idle machine (cold_copy.wait_quiet), then each
implementation once as a warm-up, its output checked against the others' (the
flags, the zero count, the digests); then --reps samples, interleaved across the kernel's
implementations (A B C A B C ...), time.perf_counter around `number` calls (chosen on the warm-up
so a sample lasts at least --min-sample seconds; the per-call time is the sample ÷ number), the
garbage collector off. Medians with min and max; ratios pair by pair (sample i against sample
i). GiB/s is the buffer's bytes ÷ the median per-call seconds.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from transfer import _native
from transfer.cli import parse_size
from transfer.integrity.manifest import BLOCK, zero_digest

from .cold_copy import ROOT, GiB, MiB, _fmt, _say, _size_text, wait_quiet
from .common import (
    JsonLines,
    conclude,
    fingerprints,
    finish,
    out_path,
    paired,
    parser,
    provenance_of,
    sigterm_interrupts,
    stats,
)

SCENARIO = "kernels"
DEFAULT_SIZE = 64 * MiB
QUICK_SIZE = 4 * MiB
BUFFERS = ("random", "half-zero")
# Per kernel: its implementations in the interleaving order; the first is the engine's, the
# second its pure-Python twin; the rest are baselines.
KERNELS: dict[str, tuple[str, ...]] = {
    "zero-scan": ("cython", "python", "numpy", "numpy-u64"),
    "block-hash": ("cython", "python", "xxhash-loop"),
}
TWIN = "python"
ENGINE_IMPL = "cython"
BAR_OVER_PEER = 1.0  # the compiled kernel at least as fast as its best peer


def make_buffers(size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    random = np.frombuffer(bytearray(rng.bytes(size)), dtype=np.uint8)
    half = random.copy()
    nblocks = size // BLOCK
    zeroed = rng.permutation(nblocks)[: nblocks // 2]
    half.reshape(-1, BLOCK)[zeroed] = 0
    return {"random": random, "half-zero": half}


def implementations(kernel: str, buf: np.ndarray
                    ) -> tuple[dict[str, Callable[[], Any]], Callable[[str], bytes]]:
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


def sample(f: Callable[[], Any], number: int) -> float:
    """Seconds per call of f, over number calls, the garbage collector off."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(number):
            f()
        return (time.perf_counter() - t0) / number
    finally:
        if gc_was:
            gc.enable()


def measure(kernel: str, buffer: str, buf: np.ndarray, a: argparse.Namespace
            ) -> list[dict[str, Any]]:
    """One record per implementation: the warm-up's cross-check and the interleaved samples."""
    wait_quiet()  # other people's work on a shared machine is the main source of noise
    timed, result = implementations(kernel, buf)
    names = list(KERNELS[kernel])
    results = {name: result(name) for name in names}  # the warm-up, and what each computed
    reference = results[ENGINE_IMPL]
    numbers: dict[str, int] = {}
    for name in names:
        one = sample(timed[name], 1)  # calibration: a sample lasts at least --min-sample
        numbers[name] = max(1, min(100_000, math.ceil(a.min_sample / max(one, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(a.reps):
        for name in names:
            samples[name].append(sample(timed[name], numbers[name]))
    records = []
    for name in names:
        problems = []
        if results[name] != reference:
            problems.append(f"{name}'s output differs from {ENGINE_IMPL}'s")
        if kernel == "zero-scan":
            expected = len(buf) // BLOCK // 2 if buffer == "half-zero" else 0
            if results[name].count(1) != expected:
                problems.append(f"{name} found {results[name].count(1)} zero blocks, "
                                f"expected {expected}")
        s = stats(samples[name])
        records.append({
            "type": "run", "scenario": SCENARIO, "kernel": kernel, "buffer": buffer,
            "impl": name, "bytes": len(buf), "block": BLOCK, "number": numbers[name],
            "seconds": [round(x, 9) for x in samples[name]], "seconds_stats": s,
            "gib_per_s": round(len(buf) / GiB / s["median"], 3) if s["median"] else None,
            "valid": not problems, "problems": problems,
        })
    return records


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per kernel, buffer and implementation, with its ratios pair by pair: the twin's
    time ÷ its time (how many times faster than the pure-Python twin) and its time ÷ cython's
    (how many times slower than the compiled kernel)."""
    rows = []
    for kernel, names in KERNELS.items():
        for buffer in BUFFERS:
            group = {r["impl"]: r for r in records
                     if r["kernel"] == kernel and r["buffer"] == buffer}
            if not group:
                continue
            for name in names:
                r = group[name]
                s = r["seconds_stats"]
                rows.append({
                    "kernel": kernel, "buffer": buffer, "impl": name, "bytes": r["bytes"],
                    "number": r["number"], "seconds_median": s["median"],
                    "seconds_min": s["min"], "seconds_max": s["max"],
                    "gib_per_s": r["gib_per_s"],
                    "gib_per_s_min": round(r["bytes"] / GiB / s["max"], 3) if s["max"] else None,
                    "gib_per_s_max": round(r["bytes"] / GiB / s["min"], 3) if s["min"] else None,
                    "over_twin": paired(group[TWIN]["seconds"], r["seconds"]),
                    "cython_over_this": paired(r["seconds"], group[ENGINE_IMPL]["seconds"]),
                    "valid": r["valid"],
                })
    return rows


def _time_text(x: float | None) -> str:
    if x is None:
        return "–"
    if x < 1e-3:
        return f"{x * 1e6:.1f} µs"
    if x < 1:
        return f"{x * 1e3:.2f} ms"
    return f"{x:.2f} s"


def table(summary: dict[str, Any]) -> str:
    head = ("| kernel | buffer | implementation | median per call (min–max) | GiB/s | × python "
            "twin | cython ÷ this | check |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in summary["rows"]:
        t = (f"{_time_text(r['seconds_median'])} ({_time_text(r['seconds_min'])}–"
             f"{_time_text(r['seconds_max'])})")
        lines.append(f"| {r['kernel']} | {r['buffer']} | {r['impl']} | {t} | "
                     f"{_fmt(r['gib_per_s'], '.2f')} | {_fmt(r['over_twin']['median'], '.2f')} | "
                     f"{_fmt(r['cython_over_this']['median'], '.2f')} | "
                     f"{'ok' if r['valid'] else 'FAIL'} |")
    return "\n".join(lines)


def bars(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kernel and buffer: the compiled kernel against its best peer (twin or baseline),
    the median of per-sample ratios peer time ÷ cython time."""
    out = []
    for kernel in KERNELS:
        for buffer in BUFFERS:
            peers = [r for r in rows if r["kernel"] == kernel and r["buffer"] == buffer
                     and r["impl"] != ENGINE_IMPL and r["cython_over_this"]["median"] is not None]
            if not peers:
                continue
            best = min(peers, key=lambda r: r["cython_over_this"]["median"])
            v = best["cython_over_this"]["median"]
            out.append({"bar": f"{kernel}, {buffer}: cython ÷ best peer ({best['impl']}) ≥ "
                               f"{BAR_OVER_PEER:g}", "value": v, "peer": best["impl"],
                        "met": v >= BAR_OVER_PEER})
    return out


# ---------------------------------------------------------------- the scenario

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = parser(SCENARIO, "Time the native zero scan and block hash against their pure-Python "
                         "twins and a numpy / xxhash-loop baseline, on a random and a half-zero "
                         "buffer.", "4 MiB buffers, 3 samples")
    p.add_argument("--size", type=parse_size,
                   help="bytes per buffer (default 64M; 4M with --quick), a multiple of 64K")
    p.add_argument("--seed", type=int, default=1, help="buffer seed (default 1)")
    p.add_argument("--reps", type=int, help="timed samples per implementation, interleaved "
                                            "(default 15; 3 with --quick)")
    p.add_argument("--min-sample", type=float,
                   help="seconds a sample lasts at least: fast calls are repeated within it "
                        "(default 0.005; 0.001 with --quick)")
    a = p.parse_args(argv)
    a.size = a.size if a.size is not None else (QUICK_SIZE if a.quick else DEFAULT_SIZE)
    a.reps = a.reps if a.reps is not None else (3 if a.quick else 15)
    if a.min_sample is None:
        a.min_sample = 0.001 if a.quick else 0.005
    if a.reps < 1 or a.size < 2 * BLOCK or a.size % BLOCK or a.min_sample < 0:
        p.error("--reps must be at least 1, --size a multiple of 64K (at least 128K), "
                "--min-sample not negative")
    return a


def reproduce_command(a: argparse.Namespace) -> str:
    return " ".join(["cd", shlex.quote(str(ROOT)), "&&", ".venv/bin/python", "-m", "bench",
                     SCENARIO, "--size", _size_text(a.size), "--seed", str(a.seed), "--reps",
                     str(a.reps), "--min-sample", f"{a.min_sample:g}"])


def _cache_sizes() -> str:
    base = "/sys/devices/system/cpu/cpu0/cache"
    out = []
    try:
        for index in sorted(os.listdir(base)):
            with open(f"{base}/{index}/level") as f:
                level = f.read().strip()
            with open(f"{base}/{index}/type") as f:
                kind = f.read().strip()
            with open(f"{base}/{index}/size") as f:
                size = f.read().strip()
            if kind != "Instruction":
                out.append(f"L{level} {size}")
    except OSError:
        pass
    return ", ".join(out) or "unknown"


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    try:
        _native.kernels("cython")
    except Exception as e:  # noqa: BLE001  (NativeMissing: say how to build, exit 2)
        print(f"{SCENARIO}: {e}", file=sys.stderr)
        return 2
    started = time.time()
    path = out_path(SCENARIO, a.out)
    caches = _cache_sizes()
    workload = (f"two {_size_text(a.size)} buffers in memory (random; half its 64 KiB blocks "
                f"zeroed), seed {a.seed}")
    prov = provenance_of(str(ROOT), workload, cache=f"buffers in memory ({caches})",
                         numpy=np.__version__, xxhash=xxhash.VERSION, machine=platform.machine())
    try:
        with sigterm_interrupts(), open(path, "w") as f:
            out = JsonLines(f)
            _say(f"{SCENARIO}: {workload}; {a.reps} interleaved samples of >= {a.min_sample:g} s "
                 f"per implementation; engine {prov['engine_commit']}")
            buffers = make_buffers(a.size, a.seed)
            records: list[dict[str, Any]] = []
            for kernel in KERNELS:
                for buffer in BUFFERS:
                    for rec in measure(kernel, buffer, buffers[buffer], a):
                        rec["provenance"] = prov
                        out.emit(rec)
                        records.append(rec)
                        s = rec["seconds_stats"]
                        _say(f"  {kernel:10} {buffer:9} {rec['impl']:11} "
                             f"{_time_text(s['median']):>10} per call (× {rec['number']}) "
                             f"{_fmt(rec['gib_per_s'], '9.2f')} GiB/s"
                             + ("" if rec["valid"] else "  INVALID: " + "; ".join(rec["problems"])))
            rows = summarize(records)
            summary = {"type": "summary", "scenario": SCENARIO, "size": a.size, "block": BLOCK,
                       "reps": a.reps, "rows": rows, "provenance": prov}
            out.emit(summary)
            verdict_bars = bars(rows)
            valid = all(r["valid"] for r in records)
            fps = fingerprints(prov["engine_fingerprint"], [])
            duration = finish(out, SCENARIO, started, valid, verdict_bars, fps,
                              reproduce_command(a), prov)
        _say()
        _say(table(summary))
        _say()
        _say("GiB/s: buffer bytes ÷ median seconds per call; × python twin: median of per-sample "
             "twin time ÷ this time; cython ÷ this: median of this time ÷ cython's (> 1: cython "
             "faster).")
        return conclude(a, valid, verdict_bars, fps, duration, path, reproduce_command(a),
                        "an implementation's output differs")
    except KeyboardInterrupt:
        print(f"{SCENARIO}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
