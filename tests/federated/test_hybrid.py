"""Hybrid execution (client update in Python TF, aggregation + server step in TFF) == pure TFF."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_cfg, tiny_loss, tiny_model, tiny_site_inputs

from tff_privseg.federated.hybrid import HybridProcess
from tff_privseg.federated.process import build_process
from tff_privseg.privacy.dp_sgd import DpSgdSpec

SITES = 3
BATCHES = [np.array([0, 1, 2]), np.array([3, 4]), np.array([], np.int64)]  # one empty batch


@pytest.mark.parametrize("level", ["none", "sample"])
def test_hybrid_rounds_equal_pure_tff_rounds(tff_runtime, level):
    cfg = tiny_cfg(
        **{"privacy.level": level, "train.client_optimizer": "sgd", "train.client_lr": 0.5}
    )
    dp = DpSgdSpec(1.0, 1.0, 3.0) if level == "sample" else None
    process = build_process(cfg, tiny_model, tiny_loss, SITES, dp)
    hybrid = HybridProcess(cfg, tiny_model, tiny_loss, SITES, dp, process=process)
    state = process.initialize()
    weights = process.get_model_weights(state)
    rng = np.random.default_rng(0)
    fixed = [(0.3 * rng.standard_normal(np.shape(w))).astype(np.float32) for w in weights.trainable]
    start = process.set_model_weights(state, weights._replace(trainable=fixed))

    def run(proc):
        state, metrics = start, None
        for r in range(2):
            out = proc.next(state, tiny_site_inputs(r, BATCHES, SITES))
            state, metrics = out.state, out.metrics
        return state, metrics

    tff_state, tff_metrics = run(process)
    hyb_state, hyb_metrics = run(hybrid)
    a = process.get_model_weights(tff_state).trainable
    b = process.get_model_weights(hyb_state).trainable
    assert any(np.abs(x - w).max() > 1e-3 for x, w in zip(a, fixed, strict=True))  # it trained
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y, x, atol=1e-5)
    # under DP the exact sample size and loss never leave a site
    released = 15 if level == "none" else 0
    assert hyb_metrics["client_work"]["examples"] == tff_metrics["client_work"]["examples"]
    assert tff_metrics["client_work"]["examples"] == released
    if level != "none":
        assert tff_metrics["client_work"]["loss_sum"] == 0.0
    np.testing.assert_allclose(
        hyb_metrics["client_work"]["loss_sum"], tff_metrics["client_work"]["loss_sum"], rtol=1e-5
    )
