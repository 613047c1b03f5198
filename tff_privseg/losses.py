"""Segmentation losses, PER EXAMPLE (shape [B], never reduced over the batch).

DP-SGD clips each example's gradient, so the loss it differentiates must keep one value per
example; reduce (mean) only where a scalar is wanted (``keras_loss(..., reduction="mean")``).

Inputs:
  ``y_true``: integer class ids, [B, H, W] (a trailing channel of 1, [B, H, W, 1], is accepted).
  ``y_prob``: probabilities, [B, H, W, C]: C = 1 sigmoid foreground probability (binary) or
  C = num_classes softmax probabilities (multiclass). A [B, H, W] ``y_prob`` is read as binary
  (Keras' loss wrapper squeezes a trailing channel of 1 when ``y_true`` has one rank less).

Binary: foreground = ``y_true > 0``. Multiclass: soft Dice is averaged over the foreground classes
1..C-1 (background excluded); cross-entropy covers all classes.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

SMOOTH = 1.0  # Dice smoothing: an empty prediction of an empty mask has loss 0
EPSILON = 1e-7  # probability clipping for the log in cross-entropy

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (y_true, y_prob [B, H, W, C]) -> [B]


def _prepare(y_true, y_prob) -> tuple[tf.Tensor, tf.Tensor]:
    """-> (labels int32 [B, H, W], probs float32 [B, H, W, C])."""
    y_prob = tf.convert_to_tensor(y_prob)
    y_prob = tf.cast(y_prob, tf.float32)
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank == 4:
        y_true = tf.squeeze(y_true, axis=-1)
    if y_prob.shape.rank == 3:
        y_prob = y_prob[..., tf.newaxis]
    if y_true.shape.rank != 3 or y_prob.shape.rank != 4:
        raise ValueError(
            f"expected y_true [B, H, W] and y_prob [B, H, W, C], got {y_true.shape} and "
            f"{y_prob.shape}"
        )
    if y_true.dtype.is_floating:
        y_true = tf.round(y_true)
    return tf.cast(y_true, tf.int32), y_prob


def _targets(labels: tf.Tensor, channels: int) -> tf.Tensor:
    """Float targets with the probabilities' channel layout, [B, H, W, C]."""
    if channels == 1:
        return tf.cast(labels > 0, tf.float32)[..., tf.newaxis]
    return tf.one_hot(labels, channels, dtype=tf.float32)


def soft_dice_loss(y_true, y_prob, smooth: float = SMOOTH) -> tf.Tensor:
    """1 - soft Dice per example, [B]; mean over foreground classes for multiclass."""
    labels, probs = _prepare(y_true, y_prob)
    return soft_dice_of(_targets(labels, probs.shape[-1]), probs, smooth)


def cross_entropy(y_true, y_prob, epsilon: float = EPSILON) -> tf.Tensor:
    """Pixel-mean cross-entropy per example, [B] (binary CE for one sigmoid channel)."""
    labels, probs = _prepare(y_true, y_prob)
    return cross_entropy_of(_targets(labels, probs.shape[-1]), probs, epsilon)


def soft_dice_of(target: tf.Tensor, probs: tf.Tensor, smooth: float = SMOOTH) -> tf.Tensor:
    """`soft_dice_loss` from float targets [B, H, W, C] (one-hot, or soft) and probs, [B]."""
    channels = probs.shape[-1]
    intersection = tf.reduce_sum(probs * target, axis=[1, 2])  # [B, C]
    denominator = tf.reduce_sum(probs, axis=[1, 2]) + tf.reduce_sum(target, axis=[1, 2])
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    if channels > 1:
        dice = dice[:, 1:]
    return 1.0 - tf.reduce_mean(dice, axis=-1)


def cross_entropy_of(target: tf.Tensor, probs: tf.Tensor, epsilon: float = EPSILON) -> tf.Tensor:
    """`cross_entropy` from float targets [B, H, W, C] (one-hot, or soft) and probs, [B]."""
    channels = probs.shape[-1]
    p = tf.clip_by_value(probs, epsilon, 1.0 - epsilon)
    if channels == 1:
        pixel = -(target * tf.math.log(p) + (1.0 - target) * tf.math.log(1.0 - p))
    else:
        pixel = -target * tf.math.log(p)
    return tf.reduce_mean(tf.reduce_sum(pixel, axis=-1), axis=[1, 2])


def dice_ce_loss(y_true, y_prob) -> tf.Tensor:
    """Soft Dice loss + cross-entropy, per example, [B]."""
    return soft_dice_loss(y_true, y_prob) + cross_entropy(y_true, y_prob)


LOSSES: dict[str, LossFn] = {"dice": soft_dice_loss, "dice_ce": dice_ce_loss}


def get_loss(name: str) -> LossFn:
    """Per-example loss function by config name: "dice" | "dice_ce"."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r} (known: {', '.join(sorted(LOSSES))})") from None


class PerExampleLoss(tf.keras.losses.Loss):
    """A named per-example loss as a ``tf.keras.losses.Loss`` (serialisable by name)."""

    def __init__(
        self,
        loss: str = "dice",
        reduction: str = tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE,
        name: str | None = None,
    ):
        super().__init__(reduction=reduction, name=name or f"{loss}_loss")
        self.loss = loss
        self.fn = get_loss(loss)

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)

    def get_config(self) -> dict:
        return {**super().get_config(), "loss": self.loss}


def keras_loss(name: str, reduction: str = "mean") -> tf.keras.losses.Loss:
    """The loss as a ``tf.keras.losses.Loss`` (what ``tff.learning`` and Keras optimizers take).

    ``reduction="mean"`` averages the per-example values over the batch; ``"none"`` keeps [B]
    (what tensorflow-privacy's DP Keras optimizers need).
    """
    reductions = {
        "mean": tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE,
        "none": tf.keras.losses.Reduction.NONE,
    }
    if reduction not in reductions:
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return PerExampleLoss(name, reduction=reductions[reduction])


__all__ = [
    "LOSSES",
    "PerExampleLoss",
    "cross_entropy",
    "cross_entropy_of",
    "dice_ce_loss",
    "get_loss",
    "keras_loss",
    "soft_dice_loss",
    "soft_dice_of",
]
