"""Training augmentation per site, in tf.data: rotation, shift, zoom and Gaussian noise.

Geometric transforms use TF's projective-transform kernel (what Keras' RandomRotation/Zoom use),
bilinear for images and nearest for labels so that labels stay valid class ids. Randomness is
stateless and seeded per (site, round, step), so a resumed run augments identically.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tff_privseg.config import AugmentConfig


def enabled(cfg: AugmentConfig) -> bool:
    return any((cfg.rotation, cfg.translate, cfg.scale, cfg.noise_std and cfg.noise_prob))


def _transforms(batch: tf.Tensor, size: int, cfg: AugmentConfig, seed: tf.Tensor) -> tf.Tensor:
    """[B, 8] projective transforms (output -> input pixel map) about the image centre."""

    def uniform(i: int, bound: float) -> tf.Tensor:
        s = tf.random.experimental.stateless_fold_in(seed, i)
        return tf.random.stateless_uniform([batch], s, -bound, bound)

    angle = uniform(1, cfg.rotation * math.pi / 180.0)
    zoom = 1.0 + uniform(2, cfg.scale)
    tx, ty = uniform(3, cfg.translate * size), uniform(4, cfg.translate * size)
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
    x: tf.Tensor, y: tf.Tensor, w: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """x float32 [B,H,W,1] in [0,1], y int32 [B,H,W], w [B] -> the same, augmented."""
    batch, size = tf.shape(x)[0], x.shape[1]
    if cfg.rotation or cfg.translate or cfg.scale:
        t = _transforms(batch, size, cfg, seed)
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
        s = tf.random.experimental.stateless_fold_in(seed, 5)
        noise = tf.random.stateless_normal(tf.shape(x), s, stddev=cfg.noise_std)
        s = tf.random.experimental.stateless_fold_in(seed, 6)
        on = tf.cast(tf.random.stateless_uniform([batch, 1, 1, 1], s) < cfg.noise_prob, x.dtype)
        x = tf.clip_by_value(x + on * noise, 0.0, 1.0)
    return x, y, w
