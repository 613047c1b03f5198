"""EMA (Polyak) averaging of the released global models (train.ema_decay): post-processing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import synth_smoke

from tff_privseg import config as config_lib
from tff_privseg.federated.train import ema_update, train
from tff_privseg.rundir import checkpoint, open_run

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.toml"


def test_ema_update_equals_the_hand_computed_average():
    w1 = [np.array([1.0, 2.0], np.float32), np.array([[4.0]], np.float32)]
    w2 = [np.array([3.0, 0.0], np.float32), np.array([[0.0]], np.float32)]
    w3 = [np.array([5.0, 4.0], np.float32), np.array([[8.0]], np.float32)]
    ema = ema_update(None, w1, 0.9)
    assert all(np.array_equal(a, b) for a, b in zip(ema, w1, strict=True))  # the first model
    assert ema[0] is not w1[0]  # a copy: later rounds cannot alias a released model
    ema = ema_update(ema, w2, 0.9)
    ema = ema_update(ema, w3, 0.9)
    # ema_3 = 0.9 * (0.9 w1 + 0.1 w2) + 0.1 w3
    for e, a, b, c in zip(ema, w1, w2, w3, strict=True):
        np.testing.assert_allclose(e, 0.81 * a + 0.09 * b + 0.1 * c, rtol=1e-6)
        assert e.dtype == np.float32


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Path:
    return synth_smoke(tmp_path_factory.mktemp("data") / "smoke")


def test_saved_model_is_the_ema_of_the_released_models_also_across_resume(smoke_data, tmp_path):
    """Round r's global model is in checkpoint r (the first tensors of the TFF state); the
    saved model is the EMA of those, and a resume continues the EMA from the checkpoint."""
    decay = 0.5
    cfg = config_lib.load(SMOKE, {"data.root": str(smoke_data), "train.ema_decay": decay})
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    ckpts = checkpoint.all_checkpoints(run / "checkpoints")
    model = open_run(run).model
    n = len(model.trainable_variables)
    w1, w2 = (checkpoint.model_arrays(p, n) for p in ckpts[-2:])
    saved = [v.numpy() for v in model.trainable_variables]
    for s, a, b in zip(saved, w1, w2, strict=True):
        np.testing.assert_allclose(s, decay * a + (1 - decay) * b, rtol=1e-5, atol=1e-7)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_dice_raw" in r for r in rows)  # the last model's Dice beside the EMA's
    train(cfg.replace(**{"train.rounds": 3}), run, resume=True, progress=False)
    w3 = checkpoint.model_arrays(checkpoint.latest(run / "checkpoints"), n)
    resumed = [v.numpy() for v in open_run(run).model.trainable_variables]
    for s, e, c in zip(resumed, saved, w3, strict=True):
        np.testing.assert_allclose(s, decay * e + (1 - decay) * c, rtol=1e-5, atol=1e-7)
