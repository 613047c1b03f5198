"""Building blocks shared by the U-Net and MoNet builders.

Everything here produces plain Keras functional graph pieces, so the models stay acceptable to
``tff.learning.models.from_keras_model`` and to SavedModel export; the one subclassed layer,
``GroupNorm``, is Keras' ``GroupNormalization`` with a faster call (``models/group_norm.py``).
Normalisation is always GroupNorm: BatchNorm's running statistics are not averaged by
federated averaging and batch statistics couple the examples of a batch, which breaks
per-example clipping in DP-SGD.
"""

from __future__ import annotations

import json
from typing import Literal

import tensorflow as tf

from tff_privseg.models.group_norm import GroupNorm

GN_EPSILON = 1e-5  # PyTorch's GroupNorm default (Keras' is 1e-3)
META_ATTR = "tff_privseg_meta"  # JSON string attribute carrying the build arguments


def group_count(max_groups: int, channels: int) -> int:
    """Largest group count <= ``max_groups`` (and <= ``channels``) that divides ``channels``."""
    g = max(1, min(int(max_groups), int(channels)))
    while channels % g:
        g -= 1
    return g


class Initializers:
    """Hands out kernel initialisers; with a seed, each call gets its own derived seed.

    Keras initialisers with a fixed seed are deterministic, so two builds with the same seed
    produce identical weights without touching any global random state.
    """

    def __init__(self, seed: int | None, kind: str = "he_normal"):
        self.seed = seed
        self.kind = kind
        self._count = 0

    def _next_seed(self) -> int | None:
        if self.seed is None:
            return None
        self._count += 1
        return (int(self.seed) * 1_000_003 + self._count * 7_919) % (2**31 - 1)

    def kernel(self) -> tf.keras.initializers.Initializer:
        cls = {
            "he_normal": tf.keras.initializers.HeNormal,
            "he_uniform": tf.keras.initializers.HeUniform,
            "glorot_uniform": tf.keras.initializers.GlorotUniform,
        }[self.kind]
        return cls(seed=self._next_seed())

    def dropout_seed(self) -> int | None:
        return self._next_seed()


def group_norm(x: tf.Tensor, max_groups: int, name: str) -> tf.Tensor:
    channels = int(x.shape[-1])
    return GroupNorm(groups=group_count(max_groups, channels), epsilon=GN_EPSILON, name=name)(x)


def conv_norm_act(
    x: tf.Tensor,
    filters: int,
    kernel_size: int,
    groups: int,
    init: Initializers,
    names: tuple[str, str, str],
    activation: Literal["relu", "elu"],
    strides: int = 1,
    dilation: int = 1,
    transpose: bool = False,
) -> tf.Tensor:
    """Bias-free Conv2D (or Conv2DTranspose) -> GroupNorm -> ReLU or ELU, "same" padding.

    [B, H, W, C] -> [B, H * s, W * s, filters] (transposed) or [B, H / s, W / s, filters].
    ``names``: the conv, norm and activation layers' names (checkpoints and exports use them).
    """
    conv_cls = tf.keras.layers.Conv2DTranspose if transpose else tf.keras.layers.Conv2D
    conv_name, norm_name, act_name = names
    x = conv_cls(
        filters,
        kernel_size,
        strides=strides,
        dilation_rate=dilation,
        padding="same",
        use_bias=False,
        kernel_initializer=init.kernel(),
        name=conv_name,
    )(x)
    x = group_norm(x, groups, name=norm_name)
    act_cls = tf.keras.layers.ReLU if activation == "relu" else tf.keras.layers.ELU
    return act_cls(name=act_name)(x)


def spatial_dropout(x: tf.Tensor, rate: float, init: Initializers, name: str) -> tf.Tensor:
    """SpatialDropout2D (whole channels, PyTorch's Dropout2d) with a derived seed; none at 0."""
    if rate <= 0:
        return x
    return tf.keras.layers.SpatialDropout2D(rate, seed=init.dropout_seed(), name=name)(x)


def image_input(resolution: int) -> tf.Tensor:
    """The models' input: [B, resolution, resolution, 1] images."""
    return tf.keras.Input(shape=(resolution, resolution, 1), name="image")


def head(x: tf.Tensor, num_classes: int, init: Initializers, name: str = "head") -> tf.Tensor:
    """1x1 conv + activation, output probabilities in float32.

    Binary (``num_classes == 2``): one sigmoid channel (foreground probability).
    Multiclass: ``num_classes`` softmax channels.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    channels = 1 if num_classes == 2 else num_classes
    logits = tf.keras.layers.Conv2D(
        channels,
        1,
        padding="same",
        kernel_initializer=tf.keras.initializers.GlorotUniform(seed=init._next_seed()),
        name=f"{name}_conv",
    )(x)
    activation = "sigmoid" if channels == 1 else "softmax"
    # float32 even under a mixed-precision policy: losses and metrics expect it.
    return tf.keras.layers.Activation(activation, dtype="float32", name="probs")(logits)


def finish(
    inputs: tf.Tensor, x: tf.Tensor, init: Initializers, name: str, meta: dict
) -> tf.keras.Model:
    """The head on ``x`` (``meta["num_classes"]``), the functional model ``inputs`` ->
    probabilities named ``name``, with the build arguments ``meta`` recorded on it."""
    model = tf.keras.Model(inputs, head(x, meta["num_classes"], init), name=name)
    return attach_meta(model, **meta)


def attach_meta(model: tf.keras.Model, **meta) -> tf.keras.Model:
    """Record the build arguments on the model as a JSON string (read back by ``model_meta``)."""
    setattr(model, META_ATTR, json.dumps(meta, sort_keys=True))
    return model


def build_args(
    what: str,
    resolution: int,
    depth: int,
    base_filters: int,
    groups: int,
    dropout: float,
    num_classes: int,
) -> dict:
    """Check the arguments both builders take (``what`` starts each error) and return them as
    the model's meta, ``{"name": what, ...}``, for the builder to add its own to."""
    if depth < 1:
        raise ValueError(f"{what}: depth must be >= 1, got {depth}")
    if resolution < 2**depth or resolution % (2**depth):
        raise ValueError(
            f"{what}: resolution {resolution} must be a positive multiple of 2**depth = {2**depth}"
        )
    if base_filters < 1:
        raise ValueError(f"{what}: base_filters must be >= 1, got {base_filters}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{what}: dropout must be in [0, 1), got {dropout}")
    return dict(
        name=what,
        resolution=resolution,
        depth=depth,
        base_filters=base_filters,
        groups=groups,
        dropout=dropout,
        num_classes=num_classes,
    )
