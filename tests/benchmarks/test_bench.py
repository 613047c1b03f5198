"""`tff-privseg bench`: smoke runs (tiny sizes), JSON contract."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.bench import bench
from tff_privseg import config as config_lib

ROOT = Path(__file__).resolve().parents[2]


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


def _benchmark(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def test_bench_lists_only_modules_with_run():
    from cli.bench import available, scripts

    names = available()
    assert {"dp_overhead", "tff_overhead", "memory", "scaling", "privacy_utility"} <= set(names)
    assert "attack" not in names and "common" not in names and "attack" in scripts()


def test_registry_names_every_module_and_only_benchmarks_have_run():
    import benchmarks

    files = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "common"}
    assert files == set(benchmarks.BENCHMARKS) | set(benchmarks.SCRIPTS)
    assert all(callable(getattr(benchmarks.load(n), "run", None)) for n in benchmarks.BENCHMARKS)
    assert not any(hasattr(benchmarks.load(n), "run") for n in benchmarks.SCRIPTS)


def test_results_go_under_the_current_directory_by_default(tmp_path, monkeypatch):
    common = _benchmark("common")
    monkeypatch.chdir(tmp_path)
    path = common.save("example", {"figures": {}})
    assert (tmp_path / path).resolve() == tmp_path / "benchmarks" / "results" / "example.json"
    assert json.loads(path.read_text())["benchmark"] == "example"


def test_bench_script_without_run_is_one_line_error():
    result = CliRunner().invoke(bench, ["--only", "attack"])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)  # handled: no traceback
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "benchmarks/attack.py" in lines[0] and "run(quick)" in lines[0]


def test_memory_reads_rss_of_a_process_tree():
    memory, common = _benchmark("memory"), _benchmark("common")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert child.pid in common.process_tree(os.getpid())
        own = memory.proc_status(os.getpid())
        assert own["VmRSS"] > 0 and own["VmHWM"] >= own["VmRSS"]
        tree = memory.tree_memory(child.pid)
        assert tree["processes"] == 1 and tree["rss_mib"] > 0
    finally:
        child.kill()
        child.wait()
    assert memory.proc_status(child.pid) is None and memory._alive([child.pid]) == []


def test_privacy_utility_table_and_headline():
    pu = _benchmark("privacy_utility")
    rows = [
        {"variant": "fedavg", "noise_multiplier": None, "epsilon": None, "val_dice": 0.8},
        {"variant": "dp_slice_eps1", "noise_multiplier": 2.0, "epsilon": 1.0, "val_dice": 0.4},
        {"variant": "dp_slice_eps8", "noise_multiplier": 0.7, "epsilon": 8.0, "val_dice": 0.6},
    ]
    assert pu._headline(rows)["ratio"] == pytest.approx(0.5)
    table = pu.table([r | {"wall_s": 1.0} for r in rows])
    assert table.count("\n") == 5 and "| dp_slice_eps1 | 1 | 2.00 | 1.00 | 0.400 | – | 1 |" in table
    # repeated over keys: mean ± sd of val and test Dice (and of the last model under EMA)
    reps = {"keys": 3, "val": pu.mean_sd([0.5, 0.6, 0.7]), "test": pu.mean_sd([0.4, 0.4, 0.4])}
    reps["val_raw"] = pu.mean_sd([0.3, 0.5, None])
    table = pu.table([rows[2] | reps | {"wall_s": 2.0}])
    cells = "| 3 | 0.70 | 8.00 | 0.600 ± 0.100 | 0.400 ± 0.000 | 0.400 ± 0.141 | 2 |"
    assert f"| dp_slice_eps8 {cells}" in table
    assert callable(pu.run) and callable(pu.main)
    # ablation rows: a lever's overrides on top of each DP variant, the baselines first
    names = [n for n, _ in pu.variants(None, [8.0], True, ["default", "ema"])]
    assert names == [
        "centralized",
        "fedavg",
        "dp_slice_eps8",
        "dp_slice_eps8_ema",
        "dp_patient_eps8",
        "dp_patient_eps8_ema",
    ]
    # public pre-training: FedAvg from the public model beside FedAvg, DP rows fine-tune from it
    named = dict(pu.variants(None, [3.0], False, ["pretrain"], units=["patient"]))
    assert list(named) == ["centralized", "fedavg", "fedavg_pretrain", "dp_patient_eps3_pretrain"]
    assert named["fedavg_pretrain"]["train.init_from"] == pu.PUBLIC_MODEL
    assert named["dp_patient_eps3_pretrain"]["train.init_from"] == pu.PUBLIC_MODEL
    cfg = config_lib.load(Path(__file__).resolve().parents[2] / "configs" / "default.toml")
    assert pu.data_overrides(cfg, 0) == {}  # the config's own set
    assert pu.data_overrides(cfg, 1) == {"data.synth.seed": 1, "data.root": "data/synth_seed1"}


def _quick(name: str, tmp_path: Path) -> dict:
    result = CliRunner().invoke(
        bench, ["--only", name, "--quick", "--json", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["benchmark"] == name and saved["machine"]["cores"] >= 1
    return out["benchmarks"][name], saved


# The quick TFF runs: 45-150 s each on this 2-core machine under load (about 40-50 s of CPU;
# tracing build_process alone is 15-40 s; memory and scaling share their 32 px one in one
# session), so slow. Run them with `pytest -m slow -k quick_`.
@pytest.mark.slow
def test_bench_quick_memory(tmp_path):
    r, saved = _quick("memory", tmp_path)
    assert saved["config"]["quick"] is True
    assert r["ratio"] > 0 and r["worker_left"] == []
    assert set(r["peak_rss_mib"]) == {"2", "3"} and all(v > 0 for v in r["peak_rss_mib"].values())
    assert -50 < r["growth_pct"] < 50
    for sites, fig in saved["figures"].items():
        assert len(fig["rounds"]) == saved["config"]["rounds"][sites]
        for row in fig["rounds"]:
            assert row["seconds"] > 0 and row["worker_processes"] >= 2
            assert row["coordinator_rss_mib"] > 0 and row["worker_rss_mib"] > 0
            assert row["total_rss_mib"] >= row["coordinator_rss_mib"]


@pytest.mark.slow
def test_bench_quick_scaling(tmp_path):
    r, saved = _quick("scaling", tmp_path)
    assert saved["config"]["quick"] is True
    assert r["ratio"] > 0 and r["ratio_resolution"] > 0
    figs = r["figures"]
    assert set(figs["round_seconds_by_sites"]) == {"1", "2"}
    assert set(figs["round_seconds_by_resolution"]) == {"16", "32"}
    assert all(v > 0 for v in figs["round_seconds_by_sites"].values())
    assert all(v > 0 for v in figs["round_seconds_by_resolution"].values())
    assert all(len(t["samples_s"]) == 1 for t in saved["figures"]["timings"].values())


@pytest.mark.slow
def test_bench_quick_privacy_utility(tmp_path):
    r, saved = _quick("privacy_utility", tmp_path)
    assert [row["variant"] for row in r["rows"]] == ["centralized", "fedavg", "dp_slice_eps8"]
    assert saved["quick"] is True and saved["rounds"] == 2 and "markdown" not in saved
    assert (tmp_path / "privacy_utility.md").read_text().startswith("| variant |")


@pytest.mark.slow
def test_bench_quick_cross_silo(tmp_path):
    r, saved = _quick("cross_silo", tmp_path)
    assert saved["config"]["quick"] is True and r["ratio"] > 0
    wire, model = r["bytes_per_round_per_site"], r["model_bytes"]
    assert model < wire["down"] < 3 * model  # the weights twice (Round, Evaluate) and headers
    assert model < wire["up"] < 2 * model  # the noised delta and a header only


def test_attack_results_keep_earlier_cases_only_for_the_same_config_and_data(tmp_path):
    attack = _benchmark("attack")
    data = tmp_path / "data"
    (data / "siteA").mkdir(parents=True)
    volume = data / "siteA" / "case_0.nii.gz"
    volume.write_bytes(b"v1")
    config = tmp_path / "default.toml"
    config.write_text("[train]\nrounds = 2\n")
    source = {
        "config": str(config),
        "config_digest": config_lib.load(config).digest(),
        "data": str(data),
        "data_fingerprint": attack.fingerprint(data),
    }
    results = tmp_path / "attack.json"
    assert attack.previous_cases(results, source) == {}
    results.write_text(json.dumps({**source, "cases": {"gradient": {"mean": 0.6}}}))
    assert attack.previous_cases(results, source) == {"gradient": {"mean": 0.6}}
    moved = {**source, "config": "elsewhere/default.toml", "data": "elsewhere/data"}
    assert attack.previous_cases(results, moved) == {"gradient": {"mean": 0.6}}  # same content
    config.write_text("# a comment\n[train]\nrounds   = 2\n")  # same settings
    assert config_lib.load(config).digest() == source["config_digest"]
    config.write_text("[train]\nrounds = 3\n")  # edited config, same path
    edited = {**source, "config_digest": config_lib.load(config).digest()}
    assert edited["config_digest"] != source["config_digest"]
    assert attack.previous_cases(results, edited) == {}
    (data / ".cache").mkdir()
    (data / ".cache" / "entry.npz").write_bytes(b"preprocessed")  # the cache grows: same data
    assert attack.fingerprint(data) == source["data_fingerprint"]
    volume.write_bytes(b"v2, regenerated")  # same path, other data
    regenerated = {**source, "data_fingerprint": attack.fingerprint(data)}
    assert regenerated["data_fingerprint"] != source["data_fingerprint"]
    assert attack.previous_cases(results, regenerated) == {}
