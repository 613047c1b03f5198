"""MoNet (Knolle et al., "Efficient, high-performance semantic segmentation using multi-scale
feature extraction", PLOS ONE 2021) as a Keras functional model, GroupNorm throughout.

Structure, following the PyTorch port used by the reference study (PrivateSegmentation,
``torchlib/models.py``), for ``depth = D`` and ``base_filters = F``::

    ConvNormElu(k, s, dil) = Conv2D(k, stride s, dilation dil, "same", no bias) -> GroupNorm -> ELU

    encoder level l = 0..D-1 (f = F * 2**l):
        ConvNormElu(3) to f -> RDDC(f) -> skip_l -> ConvNormElu(kernel 4, stride 2) keeping f
    bottleneck (f = F * 2**D):  ConvNormElu(3) to f -> RDDC(f)
    decoder level l = D-1..0 (f = F * 2**l):
        Conv2DTranspose(kernel 4, stride 2) keeping the channels -> GroupNorm -> ELU
        -> concat skip_l -> ConvNormElu(3) to f -> RDDC(f)
    head: Conv1x1 -> sigmoid (binary) or softmax (multiclass)

    RDDC(x) (the paper's residual block of dilated convolutions, dilations 4/3/2/1):
        a = Drop(CNE_dil4(x));  b = Drop(CNE_dil3(a + x));  c = Drop(CNE_dil2(b))
        return x + CNE_dil1(c + b)          # Drop = SpatialDropout2D (Dropout2d), rate 0.2

With the defaults (depth 2, 16 -> 32 -> 64 filters, 256x256x1 input) this is the study's model.

Deliberate differences from the PyTorch baseline:
  * Skip connections work here. In the baseline, ``forward`` tests ``key == "RDDC"`` and
    ``key == "deconv"`` against ModuleDict keys named ``"Enc_RDDC_{i}"`` and
    ``"Dec_deconv_Before_{i}"``, so the skips never fire and the baseline is effectively an
    encoder-decoder without skips (had they fired, ``torch.cat(..., dim=-1)`` would also have
    concatenated along width, not channels). ``skip_connections=False`` reproduces the
    baseline's effective graph (for comparisons).
  * GroupNorm(min(groups, C)) everywhere, in training and inference; the baseline swaps its
    BatchNorm for GroupNorm(min(32, C)) only in training. ``groups=32`` is the reference.
  * The head is Conv1x1 with a bias, without the baseline's norm layer on the single output
    channel (GroupNorm over one channel would standardise every image's logit map to the same
    mean and variance, which forbids slices without foreground).
"""

from __future__ import annotations

import tensorflow as tf

from tff_privseg.models._layers import (
    Initializers,
    build_args,
    conv_norm_act,
    finish,
    image_input,
    spatial_dropout,
)

RDDC_DILATIONS = (4, 3, 2, 1)


def _conv_norm_elu(
    x: tf.Tensor,
    filters: int,
    groups: int,
    init: Initializers,
    name: str,
    kernel_size: int = 3,
    strides: int = 1,
    dilation: int = 1,
    transpose: bool = False,
) -> tf.Tensor:
    """ConvNormElu: layers ``{name}_conv``, ``{name}_gn``, ``{name}_elu``."""
    names = (f"{name}_conv", f"{name}_gn", f"{name}_elu")
    return conv_norm_act(
        x, filters, kernel_size, groups, init, names, "elu", strides, dilation, transpose
    )


def rddc_block(
    x: tf.Tensor, filters: int, groups: int, dropout: float, init: Initializers, name: str
) -> tf.Tensor:
    """Residual dilated block (dilations 4/3/2/1); input must already have ``filters`` channels."""
    if int(x.shape[-1]) != filters:
        raise ValueError(f"{name}: RDDC input has {x.shape[-1]} channels, expected {filters}")
    d4, d3, d2, d1 = RDDC_DILATIONS
    a = _conv_norm_elu(x, filters, groups, init, f"{name}_d{d4}", dilation=d4)
    a = spatial_dropout(a, dropout, init, f"{name}_drop1")
    b = tf.keras.layers.Add(name=f"{name}_add1")([a, x])
    b = _conv_norm_elu(b, filters, groups, init, f"{name}_d{d3}", dilation=d3)
    b = spatial_dropout(b, dropout, init, f"{name}_drop2")
    c = _conv_norm_elu(b, filters, groups, init, f"{name}_d{d2}", dilation=d2)
    c = spatial_dropout(c, dropout, init, f"{name}_drop3")
    c = tf.keras.layers.Add(name=f"{name}_add2")([c, b])
    c = _conv_norm_elu(c, filters, groups, init, f"{name}_d{d1}", dilation=d1)
    return tf.keras.layers.Add(name=f"{name}_residual")([x, c])


def monet(
    resolution: int = 256,
    depth: int = 2,
    base_filters: int = 16,
    groups: int = 32,
    dropout: float = 0.2,
    num_classes: int = 2,
    skip_connections: bool = True,
    seed: int | None = None,
    name: str = "monet",
) -> tf.keras.Model:
    """Build MoNet (defaults = the reference study's model: 256x256x1, depth 2, 16/32/64).

    Args:
      resolution: input height = width; must be a multiple of ``2**depth`` (4 for depth 2).
      depth: number of stride-2 downsampling steps.
      base_filters: channels of the first level, doubled per level (bottleneck F * 2**depth).
      groups: maximum GroupNorm groups (reference: 32, i.e. GroupNorm(min(32, C))).
      dropout: SpatialDropout2D rate inside every RDDC block (reference: 0.2).
      num_classes: 2 = binary (one sigmoid channel); > 2 = softmax over ``num_classes`` channels.
      skip_connections: False reproduces the baseline's (accidentally) skip-less graph.
      seed: with a seed, every initialiser is seeded so two builds are identical.
      name: Keras model name.
    """
    meta = build_args("monet", resolution, depth, base_filters, groups, dropout, num_classes)
    init = Initializers(seed)

    inputs = image_input(resolution)
    x = inputs
    skips = []
    for level in range(depth):
        filters = base_filters * 2**level
        x = _conv_norm_elu(x, filters, groups, init, f"enc{level}_pre")
        x = rddc_block(x, filters, groups, dropout, init, f"enc{level}_rddc")
        skips.append(x)
        x = _conv_norm_elu(x, filters, groups, init, f"enc{level}_down", kernel_size=4, strides=2)

    filters = base_filters * 2**depth
    x = _conv_norm_elu(x, filters, groups, init, "bottleneck_pre")
    x = rddc_block(x, filters, groups, dropout, init, "bottleneck_rddc")

    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        up = f"dec{level}_up"
        x = _conv_norm_elu(x, int(x.shape[-1]), groups, init, up, 4, strides=2, transpose=True)
        if skip_connections:
            x = tf.keras.layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = _conv_norm_elu(x, filters, groups, init, f"dec{level}_pre")
        x = rddc_block(x, filters, groups, dropout, init, f"dec{level}_rddc")

    return finish(inputs, x, init, name, {**meta, "skip_connections": skip_connections})
