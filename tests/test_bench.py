"""`tff-privseg bench`: smoke runs (tiny sizes), JSON contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.bench import bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_dp_overhead_json(tmp_path):
    result = CliRunner().invoke(
        bench, ["--only", "dp_overhead", "--quick", "--json", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert isinstance(out["dp_overhead"], float) and out["dp_overhead"] > 0
    assert "tff_overhead" in out and out["tff_overhead"] is None  # not run
    saved = json.loads((tmp_path / "dp_overhead.json").read_text())
    assert saved["machine"]["cores"] >= 1 and saved["machine"]["tensorflow"]
    assert saved["figures"]["32"]["seconds_per_step"]["dp_fast"] > 0


def test_bench_rejects_unknown_benchmark():
    result = CliRunner().invoke(bench, ["--only", "nope"])
    assert result.exit_code != 0


@pytest.mark.slow
def test_bench_quick_all_json(tmp_path):
    """Every default benchmark in a separate process (its own TFF worker), as CI would."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "bench", "--quick", "--json", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(out["dp_overhead"], float)
    assert isinstance(out["tff_overhead"], float)
    assert (tmp_path / "tff_overhead.json").exists()
    torch = out["benchmarks"]["torch_reference"]
    assert torch.get("skipped") or torch["ratio"] > 0
