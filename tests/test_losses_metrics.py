"""Per-example losses and segmentation metrics on hand-made masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from tff_privseg import metrics
from tff_privseg.losses import (
    cross_entropy,
    dice_ce_loss,
    get_loss,
    keras_loss,
    soft_dice_loss,
)

# ------------------------------------------------------------------------------------------------
# losses


def _labels(batch=3, size=16, classes=2):
    rng = np.random.default_rng(0)
    return rng.integers(0, classes, size=(batch, size, size)).astype(np.int32)


def _perfect(labels, classes):
    if classes == 2:
        return labels[..., None].astype(np.float32)
    return np.eye(classes, dtype=np.float32)[labels]


@pytest.mark.parametrize("loss_fn", [soft_dice_loss, dice_ce_loss])
@pytest.mark.parametrize("classes", [2, 4])
def test_loss_per_example_shape_and_perfect_prediction(loss_fn, classes):
    labels = _labels(classes=classes)
    probs = _perfect(labels, classes)
    loss = loss_fn(labels, probs)
    assert loss.shape == (3,)
    np.testing.assert_allclose(loss.numpy(), 0.0, atol=1e-5)
    worst = loss_fn(labels, 1.0 - probs if classes == 2 else np.roll(probs, 1, axis=-1))
    assert np.all(worst.numpy() > 0.5)


def test_soft_dice_known_value_and_empty():
    labels = np.zeros((2, 4, 4), np.int32)
    labels[0, :2] = 1  # 8 foreground pixels
    probs = np.zeros((2, 4, 4, 1), np.float32)
    probs[0, :, :2] = 1.0  # 8 predicted, 4 overlapping
    loss = soft_dice_loss(labels, probs).numpy()
    np.testing.assert_allclose(loss[0], 1.0 - (2 * 4 + 1) / (16 + 1), rtol=1e-6)
    assert loss[1] == pytest.approx(0.0)  # empty vs empty: smoothing gives a perfect score


def test_losses_are_not_reduced_over_the_batch():
    labels = _labels()
    probs = np.full((3, 16, 16, 1), 0.3, np.float32)
    base = dice_ce_loss(labels, probs).numpy()
    probs[1] = 0.9
    changed = dice_ce_loss(labels, probs).numpy()
    assert changed[0] == base[0] and changed[2] == base[2] and changed[1] != base[1]


@pytest.mark.parametrize("name", ["dice", "dice_ce"])
def test_gradient_flows_per_example(name):
    loss_fn = get_loss(name)
    labels = _labels(batch=2, classes=3)
    logits = tf.Variable(np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, tf.nn.softmax(logits))[0]
    grad = tape.gradient(loss, logits).numpy()
    assert np.abs(grad[0]).sum() > 0
    assert np.all(grad[1] == 0)  # example 0's loss does not depend on example 1


def test_cross_entropy_is_safe_at_saturated_probabilities():
    labels = np.ones((1, 4, 4), np.int32)
    ce = cross_entropy(labels, np.zeros((1, 4, 4, 1), np.float32)).numpy()
    assert np.all(np.isfinite(ce)) and ce[0] == pytest.approx(-math.log(1e-7), rel=1e-3)


def test_keras_loss_wrapper_and_label_layouts():
    labels = _labels(classes=2)
    probs = np.full((3, 16, 16, 1), 0.7, np.float32)
    per_example = soft_dice_loss(labels, probs).numpy()
    none = keras_loss("dice", reduction="none")(labels, probs).numpy()
    np.testing.assert_allclose(none, per_example, rtol=1e-6)
    mean = keras_loss("dice")(labels, probs).numpy()
    assert mean == pytest.approx(per_example.mean(), rel=1e-6)
    # [B, H, W, 1] labels and [B, H, W] probabilities are accepted too
    np.testing.assert_allclose(soft_dice_loss(labels[..., None], probs[..., 0]), per_example)
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("focal")


def test_loss_inside_tf_function():
    fn = tf.function(lambda y, p: dice_ce_loss(y, p))
    out = fn(tf.constant(_labels()), tf.fill((3, 16, 16, 1), 0.5))
    assert out.shape == (3,)


# ------------------------------------------------------------------------------------------------
# metrics


def _square(shape, top, left, size):
    mask = np.zeros(shape, bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_dice_iou_of_overlapping_squares():
    a = _square((40, 40), 10, 10, 10)
    b = _square((40, 40), 10, 15, 10)  # overlap 10 x 5 = 50 pixels
    assert metrics.dice(a, b) == pytest.approx(2 * 50 / 200)
    assert metrics.iou(a, b) == pytest.approx(50 / 150)
    assert metrics.dice(a, a) == 1.0 and metrics.iou(a, a) == 1.0


def test_empty_mask_conventions():
    empty = np.zeros((8, 8), bool)
    full = _square((8, 8), 2, 2, 3)
    assert metrics.dice(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0
    assert metrics.dice(full, empty) == 0.0 and metrics.iou(empty, full) == 0.0
    assert metrics.hd95(empty, empty) == 0.0
    assert metrics.hd95(full, empty) == math.inf and metrics.hd95(empty, full) == math.inf


@pytest.mark.parametrize(
    ("shift", "axis", "spacing", "expected"),
    [
        (3, 0, (2.0, 0.5), 6.0),
        (4, 1, (2.0, 0.5), 2.0),
        (2, 0, (1.0, 1.0), 2.0),
    ],
)
def test_hd95_of_shifted_square_2d(shift, axis, spacing, expected):
    a = _square((64, 64), 20, 20, 16)
    b = np.roll(a, shift, axis=axis)
    assert metrics.hd95(a, b, spacing=spacing) == pytest.approx(expected)
    assert metrics.hd95(b, a, spacing=spacing) == pytest.approx(expected)
    assert metrics.hd95(a, a, spacing=spacing) == 0.0


def test_hd95_of_shifted_cube_3d_anisotropic():
    a = np.zeros((24, 32, 32), bool)
    a[6:14, 8:20, 8:20] = True
    b = np.roll(a, 2, axis=0)  # two slices of 3 mm
    assert metrics.hd95(a, b, spacing=(3.0, 0.8, 0.8)) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(a, b, spacing=(1.0, 1.0))


def test_per_class():
    pred = np.zeros((10, 10), int)
    true = np.zeros((10, 10), int)
    pred[:5, :5] = 1
    true[:5, :5] = 1
    pred[6:, 6:] = 2
    true[6:, 8:] = 2
    scores = metrics.per_class(metrics.dice, pred, true)
    assert scores == {1: 1.0, 2: pytest.approx(2 * 8 / (16 + 8))}
    hd = metrics.per_class(metrics.hd95, pred, true, classes=[1, 3], spacing=(1.0, 1.0))
    assert hd == {1: 0.0, 3: 0.0}


def test_pooled_and_mean_dice_differ():
    probs = np.zeros((2, 20, 20, 1), np.float32)
    labels = np.zeros((2, 20, 20), np.int32)
    labels[0, :10, :10] = 1
    probs[0, :10, :10, 0] = 0.9  # 100 pixels, perfect
    labels[1, 5, 5] = 1  # 1 pixel, missed
    probs[1, 5, 5, 0] = 0.4
    assert metrics.mean_dice(probs, labels) == pytest.approx(0.5)
    assert metrics.pooled_dice(probs, labels) == pytest.approx(200 / 201, rel=1e-6)
    assert metrics.pooled_iou(probs, labels) == pytest.approx(100 / 101, rel=1e-6)
    # threshold matters: at 0.4 the small object counts as found
    assert metrics.pooled_dice(probs, labels, threshold=0.4) == pytest.approx(1.0)


def test_tf_batch_dice_matches_numpy():
    rng = np.random.default_rng(3)
    labels = (rng.random((4, 16, 16)) > 0.7).astype(np.int32)
    labels[3] = 0
    probs = rng.random((4, 16, 16, 1)).astype(np.float32)
    probs[3] = 0.0
    tf_dice = tf.function(metrics.batch_dice)(tf.constant(labels), tf.constant(probs)).numpy()
    expected = [metrics.dice(p[..., 0] >= 0.5, t) for p, t in zip(probs, labels, strict=True)]
    np.testing.assert_allclose(tf_dice, expected, rtol=1e-6)
    inter, n_pred, n_true = (x.numpy() for x in metrics.dice_counts(labels, probs))
    assert 2 * inter[0] / (n_pred[0] + n_true[0]) == pytest.approx(
        metrics.pooled_dice(probs, labels), rel=1e-6
    )


def test_tf_batch_dice_multiclass():
    labels = np.zeros((1, 8, 8), np.int32)
    labels[0, :4] = 1
    labels[0, 4:, :4] = 2
    probs = np.eye(3, dtype=np.float32)[labels]
    np.testing.assert_allclose(metrics.batch_dice(labels, probs).numpy(), [1.0])
    probs2 = np.eye(3, dtype=np.float32)[np.where(labels == 2, 0, labels)]  # class 2 missed
    np.testing.assert_allclose(metrics.batch_dice(labels, probs2).numpy(), [0.5])
