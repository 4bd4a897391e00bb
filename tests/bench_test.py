"""The benchmark harness (bench/): it runs, and writes valid output. Never its timings."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import require

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("cold-copy", "warm-delta", "live-converge", "kernels", "overhead")


def bench(*args: str, timeout: float = 60, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True,
                          check=False,
                          text=True, timeout=timeout, env=env)


def json_lines(path: str) -> list[dict]:
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = [json.loads(line) for line in lines]  # every line must parse
    assert records and all(isinstance(r, dict) and "type" in r for r in records), path
    return records


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_bad_arguments_exit_2_before_anything_runs(tmp_path):
    for args in (["no-such-scenario"], ["cold-copy", "cold-copy"], ["--out"],
                 ["cold-copy", "--size", "3"], ["warm-delta", "--no-such-option"],
                 ["cold-copy", "--cases", "mixed/vmware"], ["cold-copy", "--cases", "random"],
                 ["cold-copy", "--cases", "mixed/nbdkit,mixed/nbdkit/hot"],
                 ["cold-copy", "--cases", "mixed/nbdkit/lukewarm"],
                 ["cold-copy", "--reps-rest", "0"],
                 ["live-converge", "--size", "1G", "--sizes", "2G"],
                 ["live-converge", "--sizes", "1G,1G"], ["live-converge", "--sizes", "1G,3"]):
        p = bench("--out", str(tmp_path), *args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr
    assert os.listdir(tmp_path) == []


def test_help_lists_the_scenarios_and_results():
    p = bench("--help")
    assert p.returncode == 0
    for name in SCENARIOS + ("results", "--out DIR", "--quick"):
        assert name in p.stdout


def test_results_without_runs_says_so(tmp_path):
    to = tmp_path / "RESULTS.md"
    p = bench("results", "--from", str(tmp_path / "empty"), "--to", str(to))
    assert p.returncode == 1, p.stderr
    text = to.read_text()
    for name in SCENARIOS:
        assert f"## {name}" in text
    assert text.count("no full (default options) run") == len(SCENARIOS)


def _live_run(size: int, rate: float, measured: float | None, predicted: float) -> dict:
    """A live-converge run record with what its summary reads: converged when measured is
    given, else exit 7 with the engine's last prediction."""
    rec = {"size": size, "rate_mib_s": rate, "valid": True, "precopy_passes": 2,
           "predicted_downtime_s": predicted, "wall_s": 1.0, "cpu_pct": {}, "guest": {}}
    if measured is None:
        return dict(rec, result="not converging", precopy_passes=16)
    return dict(rec, result="converged", measured_downtime_s=measured, final_delta_bytes=1 << 20,
                engine_downtime_s=measured, pred_over_measured=predicted / measured,
                within_bar=abs(predicted / measured - 1) <= 0.25, verify={"exit": 0})


def test_live_converge_size_axis_bars_take_exit_7_at_the_largest_size_as_a_result():
    from types import SimpleNamespace

    from bench.harness.runner import bar_line
    from bench.scenarios import live_converge as lc
    a = lc.parse_args(["--sizes", "4G,1G,16G"])
    assert a.size_list == [1 << 30, 4 << 30, 16 << 30] and a.rate_list == [4.0]
    assert lc.parse_args(["--sizes", "1G", "--rates", "1,16"]).rate_list == [1.0, 16.0]
    assert "--sizes 1G,4G,16G --seed" in lc.reproduce_command(a)
    assert "--size 2G --seed" in lc.reproduce_command(lc.parse_args([]))  # the default run

    def bars(largest: dict) -> dict:
        live = SimpleNamespace(args=a, prov={}, runs=[
            _live_run(1 << 30, 4.0, 0.5, 0.45), _live_run(4 << 30, 4.0, 0.6, 0.55), largest])
        s = lc.summarize(live, a.size_list, a.rate_list)
        table = lc.table(s)
        assert "downtime at the largest size ÷ at the smallest" in table
        assert all(bar_line(b, lc.bar_value(b)) for b in lc.bars(s))
        return {b["kind"]: b for b in lc.bars(s) if b["kind"] != "prediction"}

    seven = bars(_live_run(16 << 30, 4.0, None, 6.2))
    assert seven["size_ratio"]["met"] is False and "6.20 s" in seven["size_ratio"]["why"]
    assert seven["largest_converged"]["met"] is False
    fine = bars(_live_run(16 << 30, 4.0, 0.7, 0.65))
    assert fine["size_ratio"]["met"] is True and fine["size_ratio"]["value"] == 1.4
    assert fine["largest_converged"]["met"] is True
    slow = bars(_live_run(16 << 30, 4.0, 5.5, 4.9))  # converged, but over the 5 s budget
    assert slow["size_ratio"]["met"] is False and slow["largest_converged"]["met"] is False


@pytest.mark.slow
def test_quick_run_of_every_scenario_writes_json_lines_and_a_summary(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the cold-copy scenario's loop device needs root")
    for program in ("nbdkit", "nbdcopy", "qemu-img", "qemu-storage-daemon", "losetup",
                    "blkdiscard", "cmp", "nbdinfo"):
        require(program)
    if not os.access("/usr/bin/time", os.X_OK):
        pytest.skip("GNU time is not installed (Debian package time)")
    if not (ROOT / ".venv" / "bin" / "transfer").exists():
        pytest.skip("tools/setup has not been run (.venv/bin/transfer)")
    out = tmp_path / "out"
    # Timings are never looked at here: do not wait for an idle machine before each run.
    env = dict(os.environ, BENCH_IDLE_WAIT_MAX="0")
    p = bench("--quick", "--out", str(out), timeout=280, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name in SCENARIOS:
        files = glob.glob(str(out / f"{name}-*.jsonl"))
        assert len(files) == 1, (name, os.listdir(out))
        records = json_lines(files[0])
        kinds = [r["type"] for r in records]
        assert "run" in kinds and "summary" in kinds, (name, kinds)
        assert kinds[-1] == "verdict"
        verdict = records[-1]
        assert verdict["scenario"] == name and verdict["valid"] is True
        assert verdict["bars"] and all(isinstance(b["bar"], str) for b in verdict["bars"])
        assert all(r["valid"] for r in records if r["type"] == "run")
        prov = verdict["provenance"]
        for key in ("engine_commit", "kernel", "cpu_model", "nproc", "nbdcopy", "qemu_img"):
            assert prov.get(key), (name, key)
    summaries = glob.glob(str(out / "summary-*.md"))
    assert len(summaries) == 1
    text = Path(summaries[0]).read_text()
    for name in SCENARIOS:
        assert f"## {name}" in text
        assert f"python -m bench {name} --size" in text  # the reproduce command
    assert text.count("Provenance:") == len(SCENARIOS)
    assert "engine commit" in text
    assert "- met:" in text or "- **MISSED**:" in text
    pngs = glob.glob(str(out / "*.png"))
    if _has_matplotlib():
        assert len(pngs) == len(SCENARIOS)
        for png in pngs:
            with open(png, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    else:
        assert not pngs and "plots skipped: matplotlib not installed" in text
    assert glob.glob(str(out / "live-converge-*.svg"))  # the scenario's own plot, always

    # results: quick runs are not full runs, so they count only with --include-reduced.
    to = tmp_path / "RESULTS.md"
    assert bench("results", "--from", str(out), "--to", str(to)).returncode == 1
    p = bench("results", "--from", str(out), "--to", str(to), "--include-reduced")
    assert p.returncode == 0, p.stderr
    text = to.read_text()
    for name in SCENARIOS:
        assert f"## {name}" in text and "no full" not in text
