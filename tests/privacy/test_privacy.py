"""DP-SGD and accounting, verified rather than assumed."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_privacy.privacy.dp_query.gaussian_query import GaussianSumQuery

from tff_privseg.privacy import accounting
from tff_privseg.privacy.dp_sgd import (
    SeededGaussianSumQuery,
    clip_and_sum,
    dp_gradient,
    per_example_gradients,
)

R = 8


def tiny_model() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((R, R, 1))
    h = tf.keras.layers.Conv2D(4, 3, padding="same")(inp)
    h = tf.keras.layers.GroupNormalization(2)(h)
    h = tf.keras.layers.ReLU()(h)
    return tf.keras.Model(inp, tf.keras.layers.Conv2D(1, 1, activation="sigmoid")(h))


def linear_model() -> tf.keras.Model:
    """No normalisation, no saturation: the gradient grows with the input."""
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((R, R, 1))
    return tf.keras.Model(inp, tf.keras.layers.Conv2D(1, 3, padding="same")(inp))


def mse_loss(y, p):  # per example [B]; unbounded, so a huge input gives a huge gradient
    return tf.reduce_mean(tf.square(tf.cast(y, tf.float32)[..., None] - p), axis=[1, 2, 3])


def batch(n: int, scale: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.random((n, R, R, 1)) * scale).astype(np.float32)
    y = (rng.random((n, R, R)) > 0.5).astype(np.int32)
    return tf.constant(x), tf.constant(y)


def noiseless(clip: float) -> SeededGaussianSumQuery:
    return SeededGaussianSumQuery(clip, 0.0, tf.constant([1, 2], tf.int64))


def test_per_example_gradients_match_one_at_a_time():
    model = tiny_model()
    x, y = batch(3)
    jac, _ = per_example_gradients(model, mse_loss, x, y)
    for i in range(3):
        with tf.GradientTape() as tape:
            loss = mse_loss(y[i : i + 1], model(x[i : i + 1], training=True))[0]
        single = tape.gradient(loss, model.trainable_variables)
        for g_batch, g_one in zip(jac, single, strict=True):
            np.testing.assert_allclose(g_batch[i].numpy(), g_one.numpy(), atol=1e-5)


def test_batched_clipping_equals_the_query_preprocess_record():
    model = tiny_model()
    x, y = batch(5, scale=30.0)
    jac, _ = per_example_gradients(model, mse_loss, x, y)
    clip = 0.05
    query = GaussianSumQuery(clip, 0.0)
    params = query.derive_sample_params(query.initial_global_state())
    expected = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]
    for i in range(5):
        record = query.preprocess_record(params, [g[i] for g in jac])
        expected = [e + r.numpy() for e, r in zip(expected, record, strict=True)]
    got = clip_and_sum(jac, tf.constant(clip))
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g.numpy(), e, atol=1e-6)


def test_one_huge_example_moves_the_sum_by_at_most_the_clip():
    model = linear_model()
    clip = 1.0
    x, y = batch(4)
    huge_x = tf.concat([x, tf.fill([1, R, R, 1], 1e4)], 0)
    huge_y = tf.concat([y, tf.zeros([1, R, R], tf.int32)], 0)
    # expected batch size 1: the noiseless "mean" equals the clipped sum
    without, _ = dp_gradient(model, mse_loss, x, y, noiseless(clip), 1.0)
    with_huge, _ = dp_gradient(model, mse_loss, huge_x, huge_y, noiseless(clip), 1.0)
    jac, _ = per_example_gradients(model, mse_loss, huge_x[-1:], huge_y[-1:])
    raw_norm = tf.linalg.global_norm([g[0] for g in jac]).numpy()
    moved = tf.linalg.global_norm([a - b for a, b in zip(with_huge, without, strict=True)])
    assert raw_norm > 100 * clip  # the crafted example really is extreme
    assert moved.numpy() <= clip + 1e-4
    assert moved.numpy() >= clip * 0.99  # and it is clipped to C, not dropped


def test_noise_std_matches_sigma_times_clip():
    sigma, clip = 1.3, 0.7
    query = SeededGaussianSumQuery(clip, sigma * clip, tf.constant([7, 9], tf.int64))
    zeros = [tf.zeros([200, 50]), tf.zeros([300])]
    noised, _, event = query.get_noised_result(zeros, query.initial_global_state())
    values = np.concatenate([v.numpy().ravel() for v in noised])
    assert abs(values.std() / (sigma * clip) - 1) < 0.03
    assert abs(values.mean()) < 0.03 * sigma * clip
    assert event.noise_multiplier.numpy() == pytest.approx(sigma)


def test_noise_is_a_pure_function_of_the_seed():
    def draw(seed):
        q = SeededGaussianSumQuery(1.0, 1.0, tf.constant(seed, tf.int64))
        return q.get_noised_result([tf.zeros([10])], q.initial_global_state())[0][0].numpy()

    np.testing.assert_array_equal(draw([1, 2]), draw([1, 2]))
    assert not np.allclose(draw([1, 2]), draw([1, 3]))


def test_empty_poisson_batch_still_gets_noise():
    model = tiny_model()
    x, y = batch(0)
    query = SeededGaussianSumQuery(1.0, 1.0, tf.constant([3, 4], tf.int64))
    grads, loss_sum = dp_gradient(model, mse_loss, x, y, query, 4.0)
    assert float(loss_sum) == 0.0
    assert all(np.any(g.numpy() != 0) for g in grads)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_ledger_epsilon_equals_an_independent_dp_accounting_computation(kind):
    ledger = accounting.PrivacyLedger("sample", kind, 1.1, 1.0, 1e-5)
    ledger.units = {
        "a": accounting.UnitLedger(0.05, 0, 160),
        "b": accounting.UnitLedger(0.1, 0, 80),
    }
    for _ in range(3):
        ledger = ledger.with_round({"a": 10, "b": 10})
    raw = ledger.to_json()
    # independent: build the events by hand from the recorded numbers
    accountant = (
        dp_accounting.rdp.RdpAccountant() if kind == "rdp" else dp_accounting.pld.PLDAccountant()
    )
    q, steps = raw["sampling_rate"]["b"], raw["steps"]["b"]
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1))
    accountant.compose(event, steps)
    expected = accountant.get_epsilon(1e-5)
    assert raw["steps"] == {"a": 30, "b": 30}
    assert raw["epsilon"] == pytest.approx(expected, rel=1e-3 if kind == "rdp" else 2e-2)
    assert accounting.epsilon_of_ledger(raw) == pytest.approx(raw["epsilon"], rel=1e-9)


def test_calibrated_noise_reaches_the_target():
    sigma = accounting.calibrate_noise(0.05, 300, 3.0, 1e-5)
    eps = accounting.epsilon(accounting.dp_sgd_event(0.05, sigma, 300), 1e-5)
    assert eps <= 3.0
    assert eps > 2.9  # and not wastefully noisy


def _slice_plan(sigma: float):
    from tff_privseg import config
    from tff_privseg.privacy.planning import patient_view, privacy_plan

    cfg = config.load(
        "configs/default.toml", {"privacy.unit": "slice", "privacy.noise_multiplier": sigma}
    )
    plan = privacy_plan(cfg, {"a": 752})  # 94 patients x 8 slices, as the default data
    plan["per_patient"] = patient_view(cfg, plan, {"a": 94}, {"a": 8})
    return cfg, plan


def test_group_privacy_view_says_plainly_when_there_is_no_bound(capsys):
    """Slice unit at ε ≈ 8: the textbook group bound for 8 slices has δ ≥ 1. The view must not
    print it as if it meant something: it says 'none' and points to the patient unit."""
    from cli.privacy import _print_plan

    _, plan = _slice_plan(0.65)
    v = plan["per_patient"]["a"]
    assert v["naive_group_delta"] == 1.0 and v["group_epsilon"] is None
    assert 1 <= v["largest_bounded_group"] < 8
    _print_plan(plan)
    out = capsys.readouterr().out
    assert "none (≤ " in out and 'privacy.unit = "patient"' in out
    assert "no meaningful bound" in out


def test_group_privacy_view_gives_a_valid_bound_at_the_runs_delta(capsys):
    from cli.privacy import _print_plan
    from tff_privseg.privacy.planning import group_epsilons

    cfg, plan = _slice_plan(5.0)
    v, unit = plan["per_patient"]["a"], plan["units"]["a"]
    g = v["group_epsilon"]
    assert g is not None and v["group_delta"] == cfg.privacy.delta
    # check the bound independently: some δ' gives (g, ≤ δ) by (kε', k·e^{(k-1)ε'}·δ')
    acc = accounting.make_accountant("rdp")
    acc.compose(accounting.dp_sgd_event(unit["sampling_rate"], 5.0, unit["steps"]))
    ok = []
    for log_d in np.linspace(np.log(cfg.privacy.delta), np.log(1e-300), 400):
        e1 = acc.get_epsilon(np.exp(log_d))
        if np.log(8) + 7 * e1 + log_d <= np.log(cfg.privacy.delta):
            ok.append(8 * e1)
    assert g == pytest.approx(min(ok))
    assert g > 8 * unit["epsilon"]  # the price of a meaningful δ: more than k·ε at δ' = δ
    # one slice: the slice-level ε itself
    event = accounting.dp_sgd_event(unit["sampling_rate"], 5.0, unit["steps"])
    assert group_epsilons(event, [1], cfg.privacy.delta)[1] == pytest.approx(unit["epsilon"])
    _print_plan(plan)
    assert f"{g:.1f}" in capsys.readouterr().out
