"""Training augmentation per site, in tf.data: rotation, shift, zoom and Gaussian noise.

Geometric transforms use TF's projective-transform kernel (what Keras' RandomRotation/Zoom use),
bilinear for images and nearest for labels so that labels stay valid class ids. Randomness is
stateless and seeded per slot: every slot of a batch carries its own seed (see
`federated.sampling.slot_seeds`: the run's secret key, the slice's identity, round and step),
so a slot's augmentation depends on nothing else in the batch, not even its position, and a
resumed run augments identically.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tff_privseg.config import AugmentConfig


def enabled(cfg: AugmentConfig) -> bool:
    return any((cfg.rotation, cfg.translate, cfg.scale, cfg.noise_std and cfg.noise_prob))


def _per_slot(seeds: tf.Tensor, draw, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """draw(seed [2]) for every slot's seed in seeds [B, 2], stacked: [B, ...]."""
    return tf.map_fn(draw, seeds, fn_output_signature=dtype)


def _uniforms(seeds: tf.Tensor) -> tf.Tensor:
    """[B, 4] uniforms in [0, 1): angle, zoom, shift x, shift y of each slot."""
    return _per_slot(
        seeds,
        lambda s: tf.random.stateless_uniform([4], tf.random.experimental.stateless_fold_in(s, 1)),
    )


def _transforms(size: int, cfg: AugmentConfig, seeds: tf.Tensor) -> tf.Tensor:
    """[B, 8] projective transforms (output -> input pixel map) about the image centre."""
    u = _uniforms(seeds)

    def uniform(i: int, bound: float) -> tf.Tensor:
        return (2.0 * u[:, i] - 1.0) * bound

    angle = uniform(0, cfg.rotation * math.pi / 180.0)
    zoom = 1.0 + uniform(1, cfg.scale)
    tx, ty = uniform(2, cfg.translate * size), uniform(3, cfg.translate * size)
    c = (size - 1) / 2.0
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    # input = R(-angle)/zoom · (output - centre - shift) + centre
    a0, a1 = cos, sin
    b0, b1 = -sin, cos
    a2 = c - a0 * (c + tx) - a1 * (c + ty)
    b2 = c - b0 * (c + tx) - b1 * (c + ty)
    zeros = tf.zeros_like(angle)
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def augment_batch(
    x: tf.Tensor, y: tf.Tensor, w: tf.Tensor, seeds: tf.Tensor, cfg: AugmentConfig
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """x float32 [B,H,W,1] in [0,1], y int32 [B,H,W], w [B], seeds int64 [B, 2] (one per slot)
    -> x, y, w augmented; slot i's result depends only on x[i], y[i] and seeds[i]."""
    seeds = tf.convert_to_tensor(seeds, tf.int64)
    seeds.shape.assert_has_rank(2)
    size = x.shape[1]
    if cfg.rotation or cfg.translate or cfg.scale:
        t = _transforms(size, cfg, seeds)
        shape = tf.constant([size, size], tf.int32)

        def warp(img: tf.Tensor, interpolation: str) -> tf.Tensor:
            return tf.raw_ops.ImageProjectiveTransformV3(
                images=img,
                transforms=t,
                output_shape=shape,
                fill_value=0.0,
                interpolation=interpolation,
                fill_mode="CONSTANT",
            )

        x = warp(x, "BILINEAR")
        y = tf.cast(warp(tf.cast(y[..., None], tf.float32), "NEAREST")[..., 0], tf.int32)
    if cfg.noise_std and cfg.noise_prob:
        shape = x.shape[1:] if x.shape[1:].is_fully_defined() else tf.shape(x)[1:]
        fold = tf.random.experimental.stateless_fold_in
        noise = _per_slot(
            seeds, lambda s: tf.random.stateless_normal(shape, fold(s, 5), stddev=cfg.noise_std)
        )
        on = _per_slot(seeds, lambda s: tf.random.stateless_uniform([], fold(s, 6)))
        on = tf.cast(on < cfg.noise_prob, x.dtype)[:, None, None, None]
        x = tf.clip_by_value(x + on * noise, 0.0, 1.0)
    return x, y, w
