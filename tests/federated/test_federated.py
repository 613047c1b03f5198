"""The TFF learning process on TFF's runtime: FedAvg exactness, DP paths, runtime isolation."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY_RES as R
from conftest import tiny_cfg, tiny_loss, tiny_model

from tff_privseg.federated import sampling
from tff_privseg.federated.client import build_client_update
from tff_privseg.federated.process import build_process, tff_optimizer
from tff_privseg.privacy.dp_sgd import DpSgdSpec, SeededGaussianSumQuery, dp_gradient
from tff_privseg.privacy.records import record_dp_gradient


def site_data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.random((n, R, R, 1)).astype(np.float32)
    return x, (x[..., 0] > 0.6).astype(np.int32)


def inputs(sites, batches, seeds=None):
    return [
        {
            "batches": sampling.batches_dataset(x, y, b),  # slot weights 1
            "seed": tf.data.Dataset.from_tensors(np.array(seeds[i] if seeds else [0, i], np.int64)),
        }
        for i, ((x, y), b) in enumerate(zip(sites, batches, strict=True))
    ]


def hand_fedavg(w0, sites, batches, lr):
    """FedAvg by hand: local SGD per site, uniform mean of deltas, server SGD with lr 1."""
    model = tiny_model()
    deltas = []
    for (x, y), site_batches in zip(sites, batches, strict=True):
        for v, w in zip(model.trainable_variables, w0, strict=True):
            v.assign(w)
        for idx in site_batches:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tiny_loss(y[idx], model(x[idx], training=True)))
            grads = tape.gradient(loss, model.trainable_variables)
            for v, g in zip(model.trainable_variables, grads, strict=True):
                v.assign_sub(lr * g)
        deltas.append([w - v.numpy() for w, v in zip(w0, model.trainable_variables, strict=True)])
    mean_delta = [np.mean(d, axis=0) for d in zip(*deltas, strict=True)]
    return [w - d for w, d in zip(w0, mean_delta, strict=True)]


def test_one_round_equals_hand_computed_fedavg(tff_runtime):
    lr = 0.5
    cfg = tiny_cfg(
        **{"privacy.level": "none", "train.client_optimizer": "sgd", "train.client_lr": lr}
    )
    process = build_process(cfg, tiny_model, tiny_loss, 2, None)
    state = process.initialize()
    w0 = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    sites = [site_data(6, 0), site_data(4, 1)]
    batches = [[np.array([0, 1, 2]), np.array([3, 4, 5])], [np.array([0, 1]), np.array([2, 3])]]
    out = process.next(state, inputs(sites, batches))
    got = process.get_model_weights(out.state).trainable
    expected = hand_fedavg(w0, sites, batches, lr)
    assert any(np.abs(g - w).max() > 1e-3 for g, w in zip(got, w0, strict=True))  # it moved
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)
    assert out.metrics["client_work"]["examples"] == 10


def test_dp_sgd_round_is_deterministic_for_a_seed_and_noisy_across_seeds(tff_runtime):
    cfg = tiny_cfg(**{"privacy.level": "sample", "train.client_optimizer": "sgd"})
    dp = DpSgdSpec(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=3.0)
    process = build_process(cfg, tiny_model, tiny_loss, 2, dp)
    state = process.initialize()
    sites = [site_data(6, 0), site_data(4, 1)]
    batches = [[np.array([0, 1, 2]), np.array([], np.int64)], [np.array([0, 1]), np.array([3])]]

    def run(seeds):
        out = process.next(state, inputs(sites, batches, seeds))
        return process.get_model_weights(out.state).trainable

    a, b, c = run([[1, 1], [2, 2]]), run([[1, 1], [2, 2]]), run([[1, 1], [2, 3]])
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.allclose(x, z) for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize("group", [1, 2])
def test_dp_client_update_equals_its_steps_taken_one_by_one(group):
    """The client function (batches buffered, then one DP step each) against a Python loop.

    group 1: slice records; group 2: patient records of 2 slots, one with a padding slot.
    """
    lr, clip, sigma = 0.5, 0.5, 1.0
    dp = DpSgdSpec(clip, sigma, expected_batch_size=3.0, group=group)
    x, y = site_data(8, 0)
    if group == 1:
        plan = [np.array([0, 1, 2]), np.array([], np.int64), np.array([3, 4]), np.array([5])]
        weights = [np.ones(len(b), np.float32) for b in plan]
    else:
        plan = [np.array([0, 1, 2, 2]), np.array([], np.int64), np.array([4, 5, 6, 7])]
        weights = [
            np.array([1, 1, 1, 0], np.float32),
            np.zeros(0, np.float32),
            np.ones(4, np.float32),
        ]
    seed = np.array([5, 7], np.int64)
    model = tiny_model()
    w0 = [v.numpy() for v in model.trainable_variables]
    update = build_client_update(tiny_model, tiny_loss, tff_optimizer("sgd", lr), dp)
    data = sampling.batches_dataset(x, y, plan, weights)
    delta, examples, loss_sum = update(w0, data, seed, tf.constant(lr))

    @tf.function
    def step(x, y, w, step_seed):
        query = SeededGaussianSumQuery(clip, clip * sigma, step_seed)
        if group == 1:
            return dp_gradient(model, tiny_loss, x, y, query, dp.expected_batch_size)
        return record_dp_gradient(model, tiny_loss, x, y, w, group, query, dp.expected_batch_size)

    losses = []
    for k, (idx, w) in enumerate(zip(plan, weights, strict=True)):
        step_seed = tf.random.experimental.stateless_fold_in(seed, np.int64(k))
        grads, loss = step(x[idx], y[idx], w, step_seed)
        losses.append(float(loss))
        for v, g in zip(model.trainable_variables, grads, strict=True):
            v.assign_sub(lr * g)
    by_hand = [w - v.numpy() for w, v in zip(w0, model.trainable_variables, strict=True)]
    assert int(examples) == int(sum(w.sum() for w in weights))
    np.testing.assert_allclose(float(loss_sum), sum(losses), rtol=1e-5)
    assert max(float(np.abs(d).max()) for d in by_hand) > 1e-3  # the steps moved the weights
    for got, want in zip(delta, by_hand, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_site_level_dp_fedavg_runs_with_three_sites(tff_runtime, clipping):
    cfg = tiny_cfg(
        **{"privacy.level": "site", "privacy.clipping": clipping, "privacy.noise_multiplier": 0.5}
    )
    process = build_process(cfg, tiny_model, tiny_loss, 3, None)
    state = process.initialize()
    sites = [site_data(4, i) for i in range(3)]
    batches = [[np.arange(4)] for _ in range(3)]
    out = process.next(state, inputs(sites, batches))
    weights = process.get_model_weights(out.state).trainable
    assert all(np.all(np.isfinite(w)) for w in weights)


def test_secure_aggregation_sums_within_bounds(tff_runtime):
    lr = 0.5
    base = {"privacy.level": "none", "train.client_optimizer": "sgd", "train.client_lr": lr}
    plain = build_process(tiny_cfg(**base), tiny_model, tiny_loss, 2, None)
    secure = build_process(
        tiny_cfg(**base, **{"privacy.secure_aggregation": True}), tiny_model, tiny_loss, 2, None
    )
    sites = [site_data(6, 0), site_data(4, 1)]
    batches = [[np.array([0, 1, 2])], [np.array([0, 1])]]
    state = plain.initialize()
    a = plain.get_model_weights(plain.next(state, inputs(sites, batches)).state).trainable
    s_state = secure.set_model_weights(secure.initialize(), plain.get_model_weights(state))
    b = secure.get_model_weights(secure.next(s_state, inputs(sites, batches)).state).trainable
    for x, y in zip(a, b, strict=True):  # secure sum quantises: equal up to its precision
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_worker_port_is_unreachable_from_the_host_network(tff_runtime):
    assert tff_runtime.isolated
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", tff_runtime.port), timeout=2).close()


@pytest.mark.parametrize("execution", ["tff", "hybrid"])
def test_site_level_round_with_no_site_drawn_still_adds_noise(tff_runtime, execution):
    """An empty site-level Poisson sample must not leave the model unchanged (that would
    release that no site was drawn): the server step runs on no sites and adds its noise."""
    from tff_privseg.federated.hybrid import build_hybrid_process

    cfg = tiny_cfg(**{"privacy.level": "site", "privacy.noise_multiplier": 0.5})
    build = build_hybrid_process if execution == "hybrid" else build_process
    process = build(cfg, tiny_model, tiny_loss, 1, None)
    state = process.initialize()
    before = process.get_model_weights(state).trainable
    after = process.get_model_weights(process.next(state, []).state).trainable
    assert all(np.all(np.isfinite(w)) for w in after)
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
