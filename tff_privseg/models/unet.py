"""GroupNorm U-Net as a Keras functional model (uncompiled, TFF- and DP-friendly).

Layout for ``depth = D`` and ``base_filters = F`` (level ``l`` has ``F * 2**l`` channels)::

    input (R, R, 1)
    encoder level l = 0..D-1:  [Conv3x3 -> GroupNorm -> ReLU] x 2   -> skip_l, then downsample
    bottleneck (R / 2**D):     [Conv3x3 -> GroupNorm -> ReLU] x 2   (width ``bottleneck_filters``)
    decoder level l = D-1..0:  Conv2DTranspose(2x2, stride 2) to F * 2**l channels,
                               concat skip_l, [Conv3x3 -> GroupNorm -> ReLU] x 2
    head:                      Conv1x1 -> sigmoid (1 channel) or softmax (num_classes channels)

The bottleneck keeps the deepest level's width by default (``bottleneck_filters=None``), which
puts ``unet(depth=3, base_filters=16)`` at ~318k parameters, near the 286k GroupNorm U-Net of the
benchmark; ``bottleneck_filters=2 * F * 2**(D-1)`` gives the classic doubling bottleneck (~483k).
Convolutions before a GroupNorm carry no bias (GroupNorm's beta does that job).
"""

from __future__ import annotations

from typing import Literal

import tensorflow as tf

from tff_privseg.models._layers import (
    Initializers,
    build_args,
    conv_norm_act,
    finish,
    image_input,
    spatial_dropout,
)


def _double_conv(
    x: tf.Tensor,
    filters: int,
    groups: int,
    init: Initializers,
    name: str,
    dropout: float = 0.0,
) -> tf.Tensor:
    """[Conv3x3 -> GroupNorm -> ReLU] x 2 -> SpatialDropout2D: [B, H, W, C] -> [B, H, W, F]."""
    for i in (1, 2):
        names = (f"{name}_conv{i}", f"{name}_gn{i}", f"{name}_relu{i}")
        x = conv_norm_act(x, filters, 3, groups, init, names, "relu")
    return spatial_dropout(x, dropout, init, f"{name}_dropout")


def unet(
    resolution: int = 64,
    depth: int = 3,
    base_filters: int = 16,
    groups: int = 8,
    dropout: float = 0.0,
    num_classes: int = 2,
    downsample: Literal["maxpool", "conv"] = "maxpool",
    bottleneck_filters: int | None = None,
    seed: int | None = None,
    name: str = "unet",
) -> tf.keras.Model:
    """Build the GroupNorm U-Net.

    Args:
      resolution: input height = width; must be a multiple of ``2**depth``.
      depth: number of downsampling steps (encoder levels).
      base_filters: channels of the first level; doubled at every level.
      groups: maximum GroupNorm groups; each layer uses the largest divisor of its channel count
        that is <= ``groups``.
      dropout: SpatialDropout2D rate after every double conv (0 disables it).
      num_classes: 2 = binary (one sigmoid channel); > 2 = softmax over ``num_classes`` channels.
      downsample: "maxpool" (2x2 max pooling) or "conv" (3x3 stride-2 conv + GroupNorm + ReLU).
      bottleneck_filters: bottleneck width; default = the deepest encoder level's width.
      seed: with a seed, every initialiser is seeded so two builds are identical.
      name: Keras model name.

    Returns:
      An uncompiled functional ``tf.keras.Model`` mapping (B, R, R, 1) float images to
      (B, R, R, C) float32 probabilities.
    """
    meta = build_args("unet", resolution, depth, base_filters, groups, dropout, num_classes)
    if downsample not in ("maxpool", "conv"):
        raise ValueError(f"unet: downsample must be 'maxpool' or 'conv', got {downsample!r}")
    init = Initializers(seed)

    inputs = image_input(resolution)
    x = inputs
    skips = []
    for level in range(depth):
        filters = base_filters * 2**level
        x = _double_conv(x, filters, groups, init, f"enc{level}", dropout)
        skips.append(x)
        if downsample == "maxpool":
            x = tf.keras.layers.MaxPool2D(2, name=f"enc{level}_pool")(x)
        else:
            names = (f"enc{level}_down", f"enc{level}_down_gn", f"enc{level}_down_relu")
            x = conv_norm_act(x, filters, 3, groups, init, names, "relu", strides=2)

    width = bottleneck_filters or base_filters * 2 ** (depth - 1)
    x = _double_conv(x, width, groups, init, "bottleneck", dropout)

    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = tf.keras.layers.Conv2DTranspose(
            filters,
            2,
            strides=2,
            padding="same",
            kernel_initializer=init.kernel(),
            name=f"dec{level}_up",
        )(x)
        x = tf.keras.layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = _double_conv(x, filters, groups, init, f"dec{level}", dropout)

    meta.update(downsample=downsample, bottleneck_filters=width)
    return finish(inputs, x, init, name, meta)
