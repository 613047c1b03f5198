"""A user's journey: one CLI command per fresh process, one after another, on files on disk.

data synth -> data check -> train (SIGKILLed mid-run) -> train --resume -> evaluate -> predict
-> export -> the SavedModel served by a process that imports only TensorFlow -> report ->
compare -> attack -> audit. Nothing is shared between steps but the files the previous step
wrote, so a step that works only because an earlier one ran in the same process fails here.
Every command runs from a working directory outside the project, and no TFF worker may outlive
any of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import start_cli, tagged_worker_pids, wait_for

ROOT = Path(__file__).resolve().parents[1]
TAG = f"tff-privseg-journey-{os.getpid()}"
ROUNDS = 3


def leftover_workers() -> set[int]:
    return tagged_worker_pids(TAG)


def start(cwd: Path, *args: str) -> subprocess.Popen:
    return start_cli(TAG, *args, cwd=cwd)


def run(cwd: Path, *args: str, timeout: float = 300) -> dict:
    """Run one command with --json in a fresh process; its JSON result (the last line)."""
    proc = start(cwd, *args, "--json")
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert not leftover_workers(), f"a TFF worker outlived `{' '.join(args)}`"
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def journey(tmp_path_factory) -> dict[str, Path]:
    """The user's folder: data, a config pointing at it, and a run trained across a SIGKILL."""
    home = tmp_path_factory.mktemp("user")
    data = home / "ct"
    synth = run(
        home, "data", "synth", "--out", str(data), "--sites", "3", "--volumes-per-site", "4",
        "--seed", "1", "--shape", "48", "48", "16",
    )  # fmt: skip
    sites = sorted(s["name"] for s in synth["sites"])
    assert len(sites) == 3
    cfg_text = (ROOT / "configs" / "smoke.toml").read_text()
    cfg_text = cfg_text.replace('root = "data/smoke"', f'root = "{data}"')
    cfg_text = cfg_text.replace("rounds = 2", f"rounds = {ROUNDS}")
    assert f'root = "{data}"' in cfg_text and f"rounds = {ROUNDS}" in cfg_text
    config = home / "journey.toml"
    config.write_text(cfg_text)

    checked = run(home, "data", "check", str(data), "--config", str(config))
    assert [s["name"] for s in checked["sites"]] == sites

    run_dir = home / "runs" / "journey"
    proc = start(home, "train", "--config", str(config), "--out", str(run_dir), "--quiet")
    metrics = run_dir / "metrics.jsonl"
    wait_for(
        lambda: metrics.exists() and metrics.read_text().count("\n") >= 1 or proc.poll(),
        240,
        "the first round",
    )
    assert proc.poll() is None, "train ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    wait_for(lambda: not leftover_workers(), 30, "the killed run's worker to stop")
    resumed = run(
        home, "train", "--config", str(config), "--out", str(run_dir), "--resume", "--quiet"
    )
    assert resumed["rounds"] == ROUNDS
    return {"home": home, "data": data, "sites": sites, "config": config, "run": run_dir}


def test_resumed_run_is_complete(journey):
    run_dir = journey["run"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    ledger = json.loads((run_dir / "privacy.json").read_text())
    assert ledger["level"] == "sample" and ledger["epsilon"] > 0
    assert all(steps == ROUNDS * 2 for steps in ledger["steps"].values())  # 2 local steps
    assert (run_dir / "model.keras").is_file()


def test_evaluate(journey):
    result = run(journey["home"], "evaluate", "--run", str(journey["run"]), "--split", "test")
    assert 0.0 <= result["overall"]["dice"] <= 1.0 and result["overall"]["volumes"] > 0
    masks = sorted((journey["run"] / "eval_test" / "predictions").rglob("*.nii.gz"))
    assert masks, "evaluate wrote no masks"


def test_predict_lands_on_the_scan_grid(journey):
    site = journey["data"] / journey["sites"][0]
    scan = sorted((site / "imagesTr").glob("*.nii.gz"))[0]
    out = journey["home"] / "mask.nii.gz"
    result = run(journey["home"], "predict", "--model", str(journey["run"]), str(scan),
                 "--out", str(out))  # fmt: skip
    assert Path(result["predictions"][0]["mask"]).resolve() == out.resolve()
    ct, mask = nib.load(scan), nib.load(out)
    assert mask.shape == ct.shape
    np.testing.assert_allclose(mask.affine, ct.affine, atol=1e-5)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_export_serves_without_the_package(journey):
    saved = journey["home"] / "saved_models" / "journey"
    result = run(journey["home"], "export", "--run", str(journey["run"]), "--out", str(saved))
    assert (saved / "saved_model.pb").is_file(), result
    serve = (
        "import sys, numpy as np, tensorflow as tf\n"
        f"f = tf.saved_model.load({str(saved)!r}).signatures['serving_default']\n"
        "x = np.random.default_rng(0).uniform(-1000, 400, (2, 40, 40, 1))\n"
        "x = tf.constant(x, tf.float32)\n"
        "out = f(x)\n"
        "assert out['probabilities'].shape == (2, 40, 40, 1), out['probabilities'].shape\n"
        "assert out['mask'].shape == (2, 40, 40) and out['mask'].dtype == tf.uint8\n"
        "assert not any(m.split('.')[0] in ('tff_privseg', 'tensorflow_federated', 'cli')"
        " for m in sys.modules), 'more than TensorFlow was imported'\n"
        "print('served')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", serve], cwd=journey["home"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and "served" in proc.stdout, proc.stderr[-3000:]
    # predict also takes the SavedModel
    scan = sorted((journey["data"] / journey["sites"][1]).glob("imagesTr/*.nii.gz"))[0]
    out = journey["home"] / "mask_saved.nii.gz"
    run(journey["home"], "predict", "--model", str(saved), str(scan), "--out", str(out))
    assert nib.load(out).shape == nib.load(scan).shape


def test_report(journey):
    result = run(journey["home"], "report", str(journey["run"]))
    files = [Path(p) for p in result.get("files", [])] or list(
        (journey["run"] / "report").iterdir()
    )
    assert any(p.suffix == ".png" for p in files) and any(p.suffix == ".md" for p in files)


def test_compare_with_the_run_csv(journey):
    csv = journey["run"].parent / "completed_trainings.csv"
    assert csv.is_file(), "train did not append to completed_trainings.csv"
    result = run(journey["home"], "compare", str(journey["run"]), str(csv))
    assert Path(result["run_dir"]).resolve() == journey["run"].resolve()
    assert result["baseline_kind"] == "csv (ours)" and result["differing_settings"] == []


def test_attack_and_audit(journey):
    attack = run(
        journey["home"], "attack", "--run", str(journey["run"]), "--iterations", "5",
        "--restarts", "1", "--quiet",
    )  # fmt: skip
    assert set(attack["results"]) == {"none", "sample"}  # without and with DP-SGD
    assert Path(attack["figure"]).is_file() and attack["site"] in journey["sites"]
    audit = run(journey["home"], "audit", "--run", str(journey["run"]))
    assert set(audit["sites"]) == set(journey["sites"])
