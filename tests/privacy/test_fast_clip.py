"""Fast (book-keeping) per-example clipping == the naive per-example gradients, layer by layer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tensorflow as tf

from tff_privseg.models import monet, unet
from tff_privseg.privacy import fast_clip
from tff_privseg.privacy.dp_sgd import (
    SeededGaussianSumQuery,
    clip_and_sum,
    dp_gradient,
    per_example_gradients,
    plain_gradient,
)

STRATEGIES = ("grouped", "einsum", "loop", "ghost", "auto")
B = 3


def sq_loss(y, p):
    """Per-example [B]; y is a target of p's shape."""
    return tf.reduce_sum(tf.reshape(tf.square(p - y), [tf.shape(p)[0], -1]), axis=1)


def dice(y, p):
    y = tf.cast(y, tf.float32)[..., None]
    return 1.0 - (2 * tf.reduce_sum(y * p, [1, 2, 3]) + 1) / (tf.reduce_sum(y + p, [1, 2, 3]) + 1)


def naive(model, loss_fn, x, y):
    jac, _ = per_example_gradients(model, loss_fn, x, y)
    norms = np.sqrt(sum(np.sum(g.numpy().reshape(g.shape[0], -1) ** 2, axis=1) for g in jac))
    return norms, jac


def assert_matches_naive(model, loss_fn, x, y, strategies=STRATEGIES, clip_frac=0.5):
    ref, jac = naive(model, loss_fn, x, y)
    clip = float(np.median(ref)) * clip_frac  # some examples clipped, some not
    want = clip_and_sum(jac, tf.constant(clip))
    for strategy in strategies:
        res = fast_clip.fast_clipped_sum(model, loss_fn, x, y, clip, strategy)
        np.testing.assert_allclose(res.norms.numpy(), ref, rtol=1e-5, err_msg=strategy)
        for got, exp in zip(res.clipped_sum, want, strict=True):
            scale = max(float(np.abs(exp.numpy()).max()), 1e-12)
            np.testing.assert_allclose(
                got.numpy() / scale, exp.numpy() / scale, atol=2e-5, err_msg=strategy
            )


def one_layer_model(layer, in_shape):
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input(in_shape)
    return tf.keras.Model(inp, layer(inp))


def data(model, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, *model.input_shape[1:])).astype(np.float32)
    y = rng.standard_normal((B, *model.output_shape[1:])).astype(np.float32)
    return tf.constant(x), tf.constant(y)


LAYERS = {
    "dense": (lambda: tf.keras.layers.Dense(5, activation="tanh"), (7,)),
    "dense_tokens": (lambda: tf.keras.layers.Dense(4), (6, 5)),
    "conv_same": (
        lambda: tf.keras.layers.Conv2D(4, 3, padding="same", activation="elu"),
        (9, 9, 3),
    ),
    "conv_valid_nobias": (
        lambda: tf.keras.layers.Conv2D(3, 3, padding="valid", use_bias=False),
        (8, 8, 2),
    ),
    "conv_stride2_k4": (
        lambda: tf.keras.layers.Conv2D(4, 4, strides=2, padding="same"),
        (10, 10, 2),
    ),
    "conv_stride2_valid": (
        lambda: tf.keras.layers.Conv2D(2, 3, strides=2, padding="valid"),
        (9, 9, 2),
    ),
    "conv_dilated": (
        lambda: tf.keras.layers.Conv2D(3, 3, dilation_rate=2, padding="same", use_bias=False),
        (10, 10, 2),
    ),
    "conv_dilated_valid": (
        lambda: tf.keras.layers.Conv2D(2, 2, dilation_rate=3, padding="valid"),
        (9, 9, 2),
    ),
    "convT_k2_s2": (lambda: tf.keras.layers.Conv2DTranspose(3, 2, strides=2), (4, 4, 2)),
    "convT_k4_s2_same": (
        lambda: tf.keras.layers.Conv2DTranspose(2, 4, strides=2, padding="same", use_bias=False),
        (5, 5, 3),
    ),
    "convT_k3_valid": (
        lambda: tf.keras.layers.Conv2DTranspose(2, 3, padding="valid", activation="relu"),
        (5, 5, 2),
    ),
    "convT_dilated": (
        lambda: tf.keras.layers.Conv2DTranspose(2, 3, dilation_rate=2, padding="same"),
        (6, 6, 2),
    ),
    "groupnorm": (lambda: tf.keras.layers.GroupNormalization(2, epsilon=1e-5), (5, 5, 4)),
    "groupnorm_noscale": (
        lambda: tf.keras.layers.GroupNormalization(4, scale=False),
        (4, 4, 4),
    ),
    "layernorm_tfp": (lambda: tf.keras.layers.LayerNormalization(), (4, 6)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_fast_norms_and_clipped_sum_match_naive_per_layer(name):
    make, shape = LAYERS[name]
    model = one_layer_model(make(), shape)
    for v in model.trainable_variables:  # random affine params, not the 1/0 defaults
        v.assign(tf.random.stateless_normal(v.shape, [1, len(v.name)]))
    x, y = data(model)
    assert_matches_naive(model, sq_loss, x, y)


def small_unet():
    return unet(resolution=16, depth=2, base_filters=4, groups=2, seed=1)


def small_monet():
    """Depth 1 still has every MoNet layer type (dilated and stride-2 convs, the transposed
    conv, GroupNorm, ELU, residual adds, concat)."""
    return monet(resolution=16, depth=1, base_filters=4, groups=2, dropout=0.0, seed=1)


def seg_batch(n, r=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, r, r, 1)).astype(np.float32)
    return tf.constant(x), tf.constant((x[..., 0] > 0.5).astype(np.int32))


@pytest.mark.parametrize("build", [small_unet, small_monet], ids=["unet", "monet"])
def test_full_models_match_naive(build):
    model = build()
    x, y = seg_batch(B)
    assert_matches_naive(model, dice, x, y, strategies=("auto", "ghost"))


def test_shared_layer_sums_its_uses():
    tf.keras.utils.set_random_seed(0)
    conv = tf.keras.layers.Conv2D(2, 3, padding="same")
    inp = tf.keras.Input((6, 6, 2))
    out = conv(tf.keras.layers.ReLU()(conv(inp)))
    model = tf.keras.Model(inp, out)
    x, y = data(model)
    assert_matches_naive(model, sq_loss, x, y, strategies=("auto", "ghost"))


class Scale(tf.keras.layers.Layer):
    """A layer without a rule: the jacobian fallback."""

    def build(self, shape):
        self.w = self.add_weight("w", shape[-1:], initializer="ones")

    def call(self, x):
        return x * self.w


def test_unknown_layer_falls_back_with_one_warning():
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((5, 5, 2))
    h = Scale()(tf.keras.layers.Conv2D(2, 3, padding="same")(inp))
    model = tf.keras.Model(inp, Scale()(h))
    x, y = data(model)
    fast_clip._WARNED.discard("Scale")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast_clip.fast_clipped_sum(model, sq_loss, x, y, 1.0)
        fast_clip.fast_clipped_sum(model, sq_loss, x, y, 1.0)
    assert sum("no rule for Scale" in str(w.message) for w in caught) == 1
    assert_matches_naive(model, sq_loss, x, y, strategies=("auto",))


def test_dp_gradient_fast_equals_jacobian_and_clips_a_huge_example():
    model = small_unet()
    x, y = seg_batch(4)
    x = tf.concat([x, tf.fill([1, 16, 16, 1], 1e3)], 0)
    y = tf.concat([y, tf.zeros([1, 16, 16], tf.int32)], 0)
    query = SeededGaussianSumQuery(0.01, 0.0, tf.constant([1, 2], tf.int64))
    fast, loss_f = dp_gradient(model, dice, x, y, query, 5.0)
    slow, loss_s = dp_gradient(model, dice, x, y, query, 5.0, method="jacobian")
    assert float(loss_f) == pytest.approx(float(loss_s), rel=1e-6)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-7, rtol=1e-4)
    assert float(tf.linalg.global_norm(fast)) <= 5 * 0.01 / 5.0 + 1e-6


def test_unknown_batch_dimension_in_graph_mode_and_empty_batches():
    model = small_unet()
    spec = (
        tf.TensorSpec([None, 16, 16, 1], tf.float32),
        tf.TensorSpec([None, 16, 16], tf.int32),
    )
    seed = tf.constant([3, 4], tf.int64)

    @tf.function(input_signature=spec)
    def step(x, y):
        query = SeededGaussianSumQuery(1.0, 0.0, seed)
        return dp_gradient(model, dice, x, y, query, 2.0)

    x, y = seg_batch(2)
    grads, loss = step(x, y)
    ref, _ = dp_gradient(model, dice, x, y, SeededGaussianSumQuery(1.0, 0.0, seed), 2.0)
    for a, b in zip(grads, ref, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    empty, loss0 = step(*seg_batch(0))
    assert float(loss0) == 0.0 and all(not np.any(g.numpy()) for g in empty)
    noisy = SeededGaussianSumQuery(1.0, 1.0, seed)
    grads0, _ = dp_gradient(model, dice, *seg_batch(0), noisy, 2.0)
    assert all(np.any(g.numpy() != 0) for g in grads0)  # the noise is still added


def test_plain_gradient_walk_equals_keras_call():
    model = small_monet()
    x, y = seg_batch(3)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(dice(y, model(x, training=True)))
    want = tape.gradient(loss, model.trainable_variables)
    got, _ = plain_gradient(model, dice, x, y)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, rtol=1e-4)


def test_forward_runs_dropout_in_training_mode():
    model = monet(resolution=8, depth=1, base_filters=4, groups=2, dropout=0.5, seed=1)
    x, _ = seg_batch(2, r=8)
    a = fast_clip.forward(model, x).numpy()
    b = model(x, training=False).numpy()
    assert not np.allclose(a, b)


def test_auto_strategy_is_mixed():
    assert fast_clip.choose("auto", 1, 128, 64) == "ghost"  # Dense: ‖a‖²‖g‖²
    assert fast_clip.choose("auto", 64 * 64, 144, 16) in ("grouped", "einsum")  # big feature map
    assert fast_clip.choose("ghost", 4096, 9, 9) == "ghost"


def test_subclassed_model_falls_back_to_jacobian():
    class Sub(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = tf.keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")

        def call(self, x, training=None):
            return self.conv(x)

    model = Sub()
    x, y = seg_batch(2, r=8)
    model(x)
    query = SeededGaussianSumQuery(1.0, 0.0, tf.constant([1, 1], tf.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast, _ = dp_gradient(model, dice, x, y, query, 2.0)
    slow, _ = dp_gradient(model, dice, x, y, query, 2.0, method="jacobian")
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-7)
