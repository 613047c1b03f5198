"""End to end through the CLI, in subprocesses with pipes, as CI and users run it.

Covers: the run directory contract, ε recomputed from privacy.json, kill-and-resume giving the
same ε and round count, and that no TFF worker survives normal exit, Ctrl-C, SIGTERM or SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import alive, start_cli, synth_smoke, tagged_worker_pids, wait_for

from tff_privseg.privacy.accounting import epsilon_of_ledger

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.toml"


TAG = f"tff-privseg-test-{os.getpid()}"  # in the environment of every process we start


def worker_pids() -> set[int]:
    """TFF workers started (directly or not) by this test module's CLI processes."""
    return tagged_worker_pids(TAG)


def cli(*args: str) -> subprocess.Popen:
    return start_cli(TAG, *args)


def run_ok(*args: str, timeout: float = 300) -> dict:
    proc = cli(*args, "--json", "--quiet")
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def rounds_logged(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Path:
    return synth_smoke(tmp_path_factory.mktemp("data") / "smoke")


def test_train_writes_the_run_directory_and_a_recomputable_epsilon(smoke_data, tmp_path):
    run = tmp_path / "run"
    summary = run_ok("train", "--config", str(SMOKE), "--data", str(smoke_data), "--out", str(run))
    assert summary["rounds"] == 2
    for name in ("config.toml", "metrics.jsonl", "privacy.json", "model.keras"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for key in ("val_dice", "epsilon", "delta", "seconds"):
        assert key in rows[0]
    # Under DP nothing un-noised and unaccounted about the training records is released: no
    # training loss, no exact Poisson batch sizes (sites: a public choice at sample level).
    for row in rows:
        assert set(row) == {"round", "val_dice", "epsilon", "delta", "seconds", "sites"}, row
    assert "loss" not in summary and "examples" not in summary
    ledger = json.loads((run / "privacy.json").read_text())
    assert ledger["level"] == "sample" and ledger["rounds"] == 2
    assert set(ledger["steps"].values()) == {4}  # 2 rounds x 2 local steps per site
    assert epsilon_of_ledger(ledger) == pytest.approx(summary["epsilon"], rel=1e-9)
    assert rows[-1]["epsilon"] == pytest.approx(summary["epsilon"], rel=1e-9)
    assert not worker_pids()  # no worker left behind


def test_site_level_dp_with_augmentation_releases_no_sample(smoke_data, tmp_path):
    """Site-level DP with Poisson site sampling and augmentation (per-slot secret seeds through
    tf.data and TFF's runtime): the rows name no sampled sites, no loss, no example counts."""
    cfg = tmp_path / "site.toml"
    cfg.write_text(
        SMOKE.read_text().replace('level = "sample"', 'level = "site"')
        + "\n[data.augment]\nrotation = 10.0\nnoise_std = 0.05\nnoise_prob = 0.5\n"
    )
    cfg.write_text(cfg.read_text().replace("[train]\n", "[train]\nsites_per_round = 2\n"))
    run = tmp_path / "run"
    summary = run_ok("train", "--config", str(cfg), "--data", str(smoke_data), "--out", str(run))
    assert summary["rounds"] == 2 and summary["privacy"] == "site"
    from tff_privseg import config as config_lib

    resolved = config_lib.load(run / "config.toml")
    assert resolved.train.sites_per_round == 2 and resolved.data.augment.rotation == 10.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert set(row) == {"round", "val_dice", "epsilon", "delta", "seconds"}, row


@pytest.mark.slow  # the journey and test_run_dir kill and resume in the default suite
def test_kill_mid_round_then_resume_gives_the_same_epsilon_and_rounds(smoke_data, tmp_path):
    args = ["--config", str(SMOKE), "--data", str(smoke_data), "--rounds", "4"]
    straight = run_ok("train", *args, "--out", str(tmp_path / "straight"))

    run = tmp_path / "killed"
    proc = cli("train", *args, "--out", str(run), "--quiet")
    wait_for(lambda: rounds_logged(run) >= 1, 240, "the first round")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert rounds_logged(run) < 4

    resumed = run_ok("train", *args, "--out", str(run), "--resume")
    assert resumed["rounds"] == straight["rounds"] == 4
    assert resumed["epsilon"] == straight["epsilon"]
    ledger = json.loads((run / "privacy.json").read_text())
    assert ledger["rounds"] == 4
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, 3, 4,
    ]  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_no_worker_survives_a_signal_and_the_pipe_closes(smoke_data, tmp_path, sig):
    run = tmp_path / "run"
    proc = cli("train", "--config", str(SMOKE), "--data", str(smoke_data), "--out", str(run),
               "--rounds", "50", "--quiet")  # fmt: skip
    wait_for(worker_pids, 120, "the TFF worker to start")
    ours = worker_pids()
    time.sleep(1.0)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)  # returns only once every holder of the pipe is gone
    assert proc.returncode != 0
    wait_for(lambda: not any(alive(p) for p in ours), 10, "the worker to exit")
    if sig != signal.SIGKILL:
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1] in {"interrupted", "terminated"}


def test_target_epsilon_stops_before_the_round_that_would_exceed_it(smoke_data, tmp_path):
    from tff_privseg import config as config_lib

    cfg = config_lib.load(SMOKE).replace(**{"privacy.target_epsilon": 4.5, "train.rounds": 5})
    path = tmp_path / "budget.toml"
    config_lib.save(cfg, path)
    summary = run_ok("train", "--config", str(path), "--data", str(smoke_data),
                     "--out", str(tmp_path / "run"))  # fmt: skip
    assert summary["rounds"] == 1  # round 1 spends ε ≈ 3.9; round 2 would reach ≈ 4.9
    assert summary["epsilon"] <= 4.5
    assert "target_epsilon" in summary["stopped"]


def test_json_output_is_strict_json(capsys):
    """--json is one strict JSON object: NaN (no validation split) and inf become null."""
    import numpy as np

    from cli.common import emit

    emit({"val_dice": float("nan"), "eps": np.float32("inf"), "rows": [1.0, np.nan]}, True, print)
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))
    assert out == {"val_dice": None, "eps": None, "rows": [1.0, None]}
