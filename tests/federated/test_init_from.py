"""train.init_from: start from public weights (a run directory or a .weights.h5 file).

Each step is one CLI command in a fresh process, on files on disk, as a user runs it: a public
run, then a DP run (TFF process) and a centralized run that start from its weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke, one_line_error, start_cli, synth_smoke

from tff_privseg import config as config_lib
from tff_privseg.models import training_model_fn
from tff_privseg.rundir import open_run

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.toml"
TAG = f"tff-privseg-test-init-{os.getpid()}"
# A step so small that the trained model stays at its initial weights (to ~1e-6): which
# weights the run started from is then visible in the model it saves.
FROZEN = {"train.client_optimizer": "sgd", "train.client_lr": 1e-9, "train.rounds": 1}


def run_ok(*args: str) -> dict:
    proc = start_cli(TAG, *args, "--json", "--quiet")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def write_config(path: Path, **overrides: object) -> Path:
    config_lib.save(config_lib.load(SMOKE, overrides), path)
    return path


def weights(run: Path) -> list[np.ndarray]:
    return [v.numpy() for v in open_run(run).model.trainable_variables]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def public_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run): a non-private run trained on the smoke data (the 'public' model)."""
    tmp = tmp_path_factory.mktemp("init")
    data = synth_smoke(tmp / "data")
    run = tmp / "public"
    run_ok("train", "--config", str(SMOKE), "--data", str(data), "--out", str(run),
           "--privacy", "none")  # fmt: skip
    return data, run


@pytest.mark.parametrize(
    ("mode", "source"),
    [
        ({"privacy.level": "sample"}, ""),  # DP-SGD in the TFF process, from a run directory
        ({"train.mode": "centralized", "privacy.level": "none"}, "model.weights.h5"),
    ],
)
def test_training_starts_from_the_public_weights(public_run, tmp_path, mode, source):
    data, public = public_run
    init = {"train.init_from": str(public / source)}
    cfg = write_config(tmp_path / "init.toml", **FROZEN, **mode, **init)
    run_ok("train", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "run"))
    assert max_diff(weights(tmp_path / "run"), weights(public)) < 1e-5
    # Without init_from the same frozen run would keep the seeded weights, far from these.
    seeded = training_model_fn(config_lib.load(cfg).replace(**{"train.init_from": ""}))()
    assert max_diff([v.numpy() for v in seeded.trainable_variables], weights(public)) > 1e-2


def test_missing_or_foreign_weights_are_one_line_and_leave_no_run(public_run, tmp_path):
    data, public = public_run
    missing = tmp_path / "nowhere"
    cfg = write_config(tmp_path / "missing.toml", **{"train.init_from": str(missing)})
    out = tmp_path / "run_missing"
    result = invoke("train", "--config", cfg, "--data", data, "--out", out, "--quiet")
    one_line_error(result, "train.init_from", "no model weights", str(missing))
    assert not out.exists()
    wider = {"model.base_filters": 8, "train.init_from": str(public)}
    cfg = write_config(tmp_path / "wider.toml", **wider)
    out = tmp_path / "run_wider"
    result = invoke("train", "--config", cfg, "--data", data, "--out", out, "--quiet")
    one_line_error(result, "train.init_from", "not weights of this model", "model.weights.h5")
    assert not out.exists()


def test_resume_without_checkpoints_refuses_to_rerun_rounds_from_an_unpinned_init(
    public_run, tmp_path
):
    """Re-running released rounds with the same key from a file that may have changed would
    release twice with the same noise: refused in one line, the run left as it was."""
    data, public = public_run
    cfg = write_config(tmp_path / "init.toml", **FROZEN, **{"train.init_from": str(public)})
    run = tmp_path / "run"
    run_ok("train", "--config", str(cfg), "--data", str(data), "--out", str(run))
    for p in (run / "checkpoints").iterdir():
        p.unlink()
    result = invoke("train", "--config", cfg, "--data", data, "--out", run, "--resume", "--quiet")
    one_line_error(result, "--resume", "train.init_from", "new run")
    assert (run / "metrics.jsonl").read_text().strip()  # nothing truncated
