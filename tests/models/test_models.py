"""Model builders: shapes, value ranges, GroupNorm only, seeding, parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tff_privseg.config import ModelConfig
from tff_privseg.losses import soft_dice_loss
from tff_privseg.models import build_model, count_params, group_count, model_meta, monet, unet
from tff_privseg.models.group_norm import GroupNorm

R = 64

# Parameter counts are part of the contract (benchmarks and the comparison with the PyTorch
# baseline quote them); a change here must be deliberate.
UNET_3_16_PARAMS = 318_353  # near the benchmark's 286k GroupNorm U-Net
MONET_PARAMS = 401_665  # reference MoNet (depth 2, 16/32/64) with working skips
MONET_NO_SKIP_PARAMS = 390_145  # the baseline's effective graph (its head adds 1 BN parameter)


@pytest.fixture(scope="module")
def models():
    return {
        "unet": build_model(ModelConfig(name="unet", depth=3, base_filters=16), R, seed=0),
        "monet": build_model(
            ModelConfig(name="monet", depth=2, base_filters=16, groups=32, dropout=0.2), R, seed=0
        ),
    }


def _images(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).random((batch, R, R, 1), dtype=np.float32)


@pytest.mark.parametrize("name", ["unet", "monet"])
def test_binary_output_shape_and_range(models, name):
    model = models[name]
    assert model.input_shape == (None, R, R, 1)
    out = model(_images(), training=False)
    assert out.shape == (2, R, R, 1)
    assert out.dtype == tf.float32
    values = out.numpy()
    assert np.all(values >= 0.0) and np.all(values <= 1.0)
    assert np.all(np.isfinite(values))


@pytest.mark.parametrize("name", ["unet", "monet"])
def test_multiclass_softmax(name):
    cfg = ModelConfig(name=name, depth=2, base_filters=8)
    model = build_model(cfg, 32, num_classes=4, seed=1)
    out = model(np.zeros((2, 32, 32, 1), np.float32)).numpy()
    assert out.shape == (2, 32, 32, 4)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["unet", "monet"])
def test_no_batchnorm_only_groupnorm(models, name):
    layers = models[name].layers
    assert not any(isinstance(layer, tf.keras.layers.BatchNormalization) for layer in layers)
    assert not any("batch" in type(layer).__name__.lower() for layer in layers)
    gns = [layer for layer in layers if isinstance(layer, GroupNorm)]
    assert gns
    # Functional model, no non-trainable state to federate or leak through.
    assert not models[name].non_trainable_variables
    assert isinstance(models[name], tf.keras.Model) and models[name]._is_graph_network


def test_groupnorm_groups(models):
    for layer in models["monet"].layers:
        if isinstance(layer, tf.keras.layers.GroupNormalization):
            channels = layer.gamma.shape[0]
            assert layer.groups == min(32, channels)
    assert group_count(8, 16) == 8 and group_count(8, 4) == 4 and group_count(8, 12) == 6


def test_parameter_counts(models):
    assert count_params(models["unet"]) == UNET_3_16_PARAMS
    assert count_params(unet(resolution=R, depth=3, base_filters=16)) == UNET_3_16_PARAMS
    # Parameter counts do not depend on the resolution: the 256x256 reference model is the same.
    assert count_params(models["monet"]) == MONET_PARAMS
    assert count_params(monet(resolution=256)) == MONET_PARAMS
    assert count_params(monet(resolution=R, skip_connections=False)) == MONET_NO_SKIP_PARAMS


def test_monet_skip_connections_fire():
    model = monet(resolution=R)
    names = {layer.name for layer in model.layers}
    assert {"dec0_concat", "dec1_concat"} <= names
    # decoder conv after the concat sees upsampled + skip channels
    assert model.get_layer("dec0_pre_conv").kernel.shape == (3, 3, 32 + 16, 16)
    assert model.get_layer("dec1_pre_conv").kernel.shape == (3, 3, 64 + 32, 32)
    assert model.get_layer("enc0_down_conv").kernel.shape == (4, 4, 16, 16)
    assert model.get_layer("dec1_up_conv").kernel.shape == (4, 4, 64, 64)
    dilations = sorted(
        layer.dilation_rate[0]
        for layer in model.layers
        if layer.name.startswith("enc0_rddc_d") and layer.name.endswith("_conv")
    )
    assert dilations == [1, 2, 3, 4]


@pytest.mark.parametrize("name", ["unet", "monet"])
def test_seeded_builds_identical(name):
    cfg = ModelConfig(name=name, depth=2, base_filters=8)
    a = build_model(cfg, 32, seed=7).get_weights()
    b = build_model(cfg, 32, seed=7).get_weights()
    c = build_model(cfg, 32, seed=8).get_weights()
    assert len(a) == len(b)
    for wa, wb in zip(a, b, strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert any(not np.array_equal(wa, wc) for wa, wc in zip(a, c, strict=True))


def _norm(name: str) -> list[str]:
    return [f"{name}/gamma", f"{name}/beta"]


def _cne(name: str) -> list[str]:  # MoNet's ConvNormElu
    return [f"{name}_conv/kernel", *_norm(f"{name}_gn")]


def _rddc(name: str) -> list[str]:
    return [w for d in (4, 3, 2, 1) for w in _cne(f"{name}_d{d}")]


def _double(name: str) -> list[str]:  # the U-Net's double conv
    return [w for i in (1, 2) for w in (f"{name}_conv{i}/kernel", *_norm(f"{name}_gn{i}"))]


# The builders' documented layouts (module docstrings), depth 1: checkpoints and exports key on
# these names, in this order.
LAYOUTS = {
    "monet": _cne("enc0_pre") + _rddc("enc0_rddc") + _cne("enc0_down") + _cne("bottleneck_pre")
    + _rddc("bottleneck_rddc") + _cne("dec0_up") + _cne("dec0_pre") + _rddc("dec0_rddc"),
    "unet": _double("enc0") + _double("bottleneck") + ["dec0_up/kernel", "dec0_up/bias"]
    + _double("dec0"),
}  # fmt: skip


@pytest.mark.parametrize("name", ["unet", "monet"])
def test_seeded_weights_follow_the_layout_and_the_seed_derivation(name):
    """Weight names in the documented order, and every seeded initial value recomputed: the
    k-th kernel (in build order) is He-normal with seed (seed * 1_000_003 + k * 7_919) mod
    2**31 - 1, the head Glorot-uniform with the next one; GroupNorm γ = 1, β = 0, biases 0."""
    seed = 5
    cfg = ModelConfig(name=name, depth=1, base_filters=4, groups=2, dropout=0.0)
    model = build_model(cfg, 8, seed=seed)
    names = [w.name.removesuffix(":0") for w in model.weights]
    assert names == LAYOUTS[name] + ["head_conv/kernel", "head_conv/bias"]
    kernels = 0
    for weight in model.weights:
        value, shape = weight.numpy(), tuple(weight.shape)
        if weight.name.endswith("/kernel:0"):
            kernels += 1
            derived = (seed * 1_000_003 + kernels * 7_919) % (2**31 - 1)
            head = weight.name.startswith("head_conv/")
            init = tf.keras.initializers.GlorotUniform if head else tf.keras.initializers.HeNormal
            np.testing.assert_array_equal(value, init(seed=derived)(shape))
        else:
            np.testing.assert_array_equal(value, np.ones(shape) if "gamma" in weight.name else 0)


@pytest.mark.parametrize("name", ["unet", "monet"])
def test_gradients_reach_every_variable(models, name):
    model = models[name]
    labels = np.zeros((2, R, R), np.int32)
    labels[:, 20:40, 20:40] = 1
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(soft_dice_loss(labels, model(_images(), training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in grads)
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    assert sum(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads) == len(grads)


def test_meta_and_names(models):
    assert models["unet"].name == "unet" and models["monet"].name == "monet"
    meta = model_meta(models["monet"])
    assert meta["name"] == "monet" and meta["depth"] == 2 and meta["resolution"] == R
    assert model_meta(models["unet"])["base_filters"] == 16


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of"):
        unet(resolution=60, depth=3)
    with pytest.raises(ValueError, match="multiple of"):
        monet(resolution=66)
    with pytest.raises(ValueError, match="unknown model"):
        build_model(ModelConfig(name="resnet"), R)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        unet(resolution=32, depth=2, num_classes=1)


def test_unet_conv_downsampling_and_dropout():
    model = unet(resolution=32, depth=2, base_filters=8, downsample="conv", dropout=0.1, seed=0)
    assert model.get_layer("enc0_down").strides == (2, 2)
    assert any(isinstance(layer, tf.keras.layers.SpatialDropout2D) for layer in model.layers)
    assert model(np.zeros((1, 32, 32, 1), np.float32)).shape == (1, 32, 32, 1)


@pytest.mark.parametrize("shape,groups", [((3, 7, 5, 12), 4), ((2, 6, 8), 2), ((2, 4, 4, 3, 6), 3)])
def test_group_norm_equals_keras(shape, groups):
    """GroupNorm's per-channel statistics give Keras' numbers: outputs, gradients (input, γ,
    β) and the second-order input gradient of a gradient norm (what the attack differentiates)."""
    x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, shape).astype(np.float32))
    gamma = np.random.default_rng(2).normal(size=shape[-1]).astype(np.float32)
    results = []
    for layer in (
        tf.keras.layers.GroupNormalization(groups, epsilon=1e-5),
        GroupNorm(groups, epsilon=1e-5),
    ):
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(0.3 * gamma)
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(tf.sin(y))
            grads = inner.gradient(loss, [x, layer.gamma, layer.beta])
            second = tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads[1:]])
        results.append([y, *grads, outer.gradient(second, x)])
    for keras_value, ours in zip(*results, strict=True):
        np.testing.assert_allclose(ours, keras_value, rtol=1e-4, atol=1e-4)
    assert GroupNorm.from_config(GroupNorm(groups).get_config()).groups == groups
