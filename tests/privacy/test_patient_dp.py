"""Patient-level DP, augmentation and the LR schedule."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf

from tff_privseg import config
from tff_privseg.config import AugmentConfig
from tff_privseg.data import load_sites, write_synthetic_dataset
from tff_privseg.data.augment import augment_batch
from tff_privseg.federated import sampling
from tff_privseg.privacy.dp_sgd import SeededGaussianSumQuery
from tff_privseg.privacy.planning import privacy_plan
from tff_privseg.privacy.records import record_dp_gradient
from tff_privseg.privacy.schedule import client_lr

R = 8


def linear_model() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((R, R, 1))
    return tf.keras.Model(inp, tf.keras.layers.Conv2D(1, 3, padding="same")(inp))


def mse(y, p):
    return tf.reduce_mean(tf.square(tf.cast(y, tf.float32)[..., None] - p), axis=[1, 2, 3])


def test_one_patient_with_many_extreme_slices_moves_a_step_by_at_most_the_clip():
    model, clip, k = linear_model(), 0.5, 6
    rng = np.random.default_rng(0)
    normal = rng.random((2 * k, R, R, 1)).astype(np.float32)  # two ordinary patients
    extreme = np.full((k, R, R, 1), 1e4, np.float32)  # one patient, every slice extreme
    y = np.zeros((3 * k, R, R), np.int32)
    query = SeededGaussianSumQuery(clip, 0.0, tf.constant([1, 2], tf.int64))

    def step(x, n_patients):
        w = tf.ones([n_patients * k])
        grads, _ = record_dp_gradient(model, mse, x, y[: n_patients * k], w, k, query, 1.0)
        return grads

    without = step(tf.constant(normal), 2)
    with_patient = step(tf.constant(np.concatenate([normal, extreme])), 3)
    moved = tf.linalg.global_norm([a - b for a, b in zip(with_patient, without, strict=True)])
    assert float(moved) <= clip + 1e-4
    assert float(moved) > 0.99 * clip  # the patient is clipped, not dropped


def test_padding_slots_do_not_count():
    model, k = linear_model(), 4
    x = tf.constant(np.random.default_rng(1).random((k, R, R, 1)), tf.float32)
    y = tf.zeros([k, R, R], tf.int32)
    query = SeededGaussianSumQuery(100.0, 0.0, tf.constant([1, 2], tf.int64))
    w_half = tf.constant([1.0, 1.0, 0.0, 0.0])
    padded, _ = record_dp_gradient(model, mse, x, y, w_half, k, query, 1.0)
    x2 = tf.concat([x[:2], x[:2]], 0)  # the same two slices, twice, all real
    same, _ = record_dp_gradient(model, mse, x2, y, tf.ones([k]), k, query, 1.0)
    for a, b in zip(padded, same, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def patient_ids(patient_of_slice: np.ndarray) -> sampling.RecordIds:
    volumes = [b"site\0case%d" % p for p in range(patient_of_slice.max() + 1)]
    position = [int((patient_of_slice[:i] == p).sum()) for i, p in enumerate(patient_of_slice)]
    slices = [volumes[p] + b"\0%d" % j for p, j in zip(patient_of_slice, position, strict=True)]
    return sampling.RecordIds(slices, volumes)


def test_patient_batches_sample_whole_patients_with_capped_slots():
    patient_of_slice = np.repeat(np.arange(10), [8, 8, 8, 3, 8, 8, 8, 8, 8, 8])
    ids = patient_ids(patient_of_slice)
    batches, weights = sampling.poisson_patient_batches(patient_of_slice, ids, 0.3, 4, 50, 7, 0)
    sizes = []
    for idx, w in zip(batches, weights, strict=True):
        assert len(idx) == len(w) and len(idx) % 4 == 0
        groups = patient_of_slice[idx].reshape(-1, 4)
        assert (groups == groups[:, :1]).all()  # each record holds one patient's slices
        real = idx.reshape(-1, 4)[w.reshape(-1, 4) > 0]
        assert len(set(real.tolist())) == len(real)  # no slice twice within a patient
        sizes.append(len(idx) // 4)
    assert 2.0 < np.mean(sizes) < 4.0  # q · patients = 3 expected


def test_patient_epsilon_equals_an_independent_dp_accounting_computation():
    cfg = config.from_dict(
        {
            "train": {"rounds": 5, "local_steps": 4, "batch_size": 3},
            "privacy": {"unit": "patient", "noise_multiplier": 1.2},
        }
    )
    plan = privacy_plan(cfg, {"a": 30, "b": 12})  # training patients per site
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(3 / 12, dp_accounting.GaussianDpEvent(1.2))
    accountant.compose(event, 20)
    assert plan["unit"] == "patient"
    assert plan["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-3)


def test_synthetic_generator_makes_tens_of_patients_per_site(tmp_path):
    write_synthetic_dataset(tmp_path / "d", sites=2, volumes_per_site=30, seed=0, shape=(32, 32, 8))
    cfg = config.from_dict({"data": {"resolution": 16, "crop_slices": 4}, "model": {"depth": 2}})
    sites = load_sites(cfg.data, tmp_path / "d")
    for site in sites:
        assert len(np.unique(site.train.volume_index)) >= 18


def test_augmentation_keeps_labels_valid_and_is_seeded():
    cfg = AugmentConfig(rotation=15.0, translate=0.1, scale=0.1, noise_std=0.05, noise_prob=1.0)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((4, 16, 16, 1)), tf.float32)
    y = tf.constant(rng.integers(0, 3, (4, 16, 16)), tf.int32)
    w = tf.ones([4])
    seed = tf.constant([[5, 6], [7, 8], [9, 10], [11, 12]], tf.int64)  # one seed per slot
    xa, ya, _ = augment_batch(x, y, w, seed, cfg)
    xb, yb, _ = augment_batch(x, y, w, seed, cfg)
    np.testing.assert_array_equal(xa.numpy(), xb.numpy())
    # a slot's augmentation follows its own seed, not its position in the batch
    perm = [2, 0, 3, 1]
    xp, yp, _ = augment_batch(tf.gather(x, perm), tf.gather(y, perm), w, tf.gather(seed, perm), cfg)
    np.testing.assert_allclose(xp.numpy(), tf.gather(xa, perm).numpy(), atol=1e-6)
    np.testing.assert_array_equal(yp.numpy(), tf.gather(ya, perm).numpy())
    assert set(np.unique(ya.numpy())) <= {0, 1, 2}
    assert float(tf.reduce_min(xa)) >= 0.0 and float(tf.reduce_max(xa)) <= 1.0
    assert not np.allclose(xa.numpy(), x.numpy())
    xi, yi, _ = augment_batch(x, y, w, seed, AugmentConfig())
    np.testing.assert_array_equal(xi.numpy(), x.numpy())
    np.testing.assert_array_equal(yi.numpy(), y.numpy())


def test_loglinear_schedule_runs_from_lr_to_end_lr():
    cfg = config.from_dict(
        {"train": {"rounds": 5, "client_lr": 1e-3, "end_lr": 1e-4, "lr_schedule": "loglinear"}}
    )
    lrs = [client_lr(cfg, r) for r in range(5)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert np.allclose(np.diff(np.log(lrs)), np.log(0.1) / 4)


@pytest.mark.parametrize("name", ["unet", "monet"])
def test_fast_patient_clipping_equals_the_jacobian_path(name):
    """Records of k slices (with padding) through fast_clip equal tape.jacobian of the
    record losses: same clipped, noised gradient and the same loss sum."""
    from tff_privseg.config import ModelConfig
    from tff_privseg.losses import get_loss
    from tff_privseg.models import build_model

    cfg = ModelConfig(name=name, depth=2, base_filters=4, groups=2, dropout=0.0)
    model = build_model(cfg, 16, seed=0)
    k, patients = 3, 4
    rng = np.random.default_rng(2)
    x = tf.constant(rng.random((patients * k, 16, 16, 1)), tf.float32)
    y = tf.constant(rng.integers(0, 2, (patients * k, 16, 16)), tf.int32)
    w = tf.constant([1, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1], tf.float32)
    query = SeededGaussianSumQuery(0.05, 0.05, tf.constant([3, 4], tf.int64))
    loss = get_loss("dice")
    fast, lf = record_dp_gradient(model, loss, x, y, w, k, query, 2.0, method="fast")
    slow, ls = record_dp_gradient(model, loss, x, y, w, k, query, 2.0, method="jacobian")
    assert float(lf) == pytest.approx(float(ls), rel=1e-5)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
