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
                 ["cold-copy", "--reps-rest", "0"]):
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
