"""Segmentation metrics.

NumPy metrics on hard masks (any non-zero value is foreground), 2D or 3D:

* ``dice`` / ``iou``: overlap scores. Convention: both masks empty -> 1.0 (perfect agreement on
  "nothing there"); exactly one empty -> 0.0.
* ``hd95``: 95th-percentile symmetric Hausdorff distance in mm between the masks' surface voxels,
  ``max(P95(d(S_pred -> S_true)), P95(d(S_true -> S_pred)))`` (the MedPy / MONAI definition),
  with voxel ``spacing`` in mm per axis. Convention: both masks empty -> 0.0; exactly one empty
  -> ``inf`` (the distance to an empty set is unbounded). ``inf`` is chosen over ``nan`` so that a
  model that misses a structure entirely cannot be flattered by ``nanmean``: aggregate HD95 with
  the median, or report how many cases are infinite.
* ``per_class``: any of the above on label maps, one value per class.
* ``pooled_dice`` / ``pooled_iou``: one score over a whole set (all pixels pooled), the numbers
  the PyTorch baseline prints (``smp`` DiceLoss/IoU with eps 1e-7, threshold 0.5). Pooled and
  mean-per-image Dice differ: pooling weights large structures more.

TensorFlow side (inside ``tf.function``): ``batch_dice`` (per-example hard Dice, [B]) and
``dice_counts`` (sums for pooled Dice accumulated over batches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
from scipy import ndimage

POOLED_EPS = 1e-7  # segmentation_models_pytorch's default eps, used by the baseline


def _mask(x) -> np.ndarray:
    return np.asarray(x) != 0


def _check_shapes(pred: np.ndarray, true: np.ndarray) -> None:
    if pred.shape != true.shape:
        raise ValueError(f"pred and true shapes differ: {pred.shape} vs {true.shape}")


def dice(pred, true) -> float:
    """Dice = 2|P∩T| / (|P| + |T|); 1.0 when both masks are empty."""
    p, t = _mask(pred), _mask(true)
    _check_shapes(p, t)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def iou(pred, true) -> float:
    """IoU (Jaccard) = |P∩T| / |P∪T|; 1.0 when both masks are empty."""
    p, t = _mask(pred), _mask(true)
    _check_shapes(p, t)
    union = int(np.logical_or(p, t).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, t).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face-connected background neighbour (image border = background)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(pred, true, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``pred`` to the nearest surface voxel of ``true``.

    Both masks must be non-empty.
    """
    p, t = _mask(pred), _mask(true)
    _check_shapes(p, t)
    if not p.any() or not t.any():
        raise ValueError("surface_distances needs two non-empty masks")
    sampling = _spacing(spacing, p.ndim)
    distance_to_true = ndimage.distance_transform_edt(~_surface(t), sampling=sampling)
    return distance_to_true[_surface(p)]


def hd95(pred, true, spacing: Sequence[float] | None = None, percentile: float = 95.0) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (see module docstring for empties).

    ``spacing``: voxel size in mm per axis, in the arrays' axis order (default 1.0 each).
    """
    p, t = _mask(pred), _mask(true)
    _check_shapes(p, t)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("inf")
    forward = surface_distances(p, t, spacing)
    backward = surface_distances(t, p, spacing)
    return float(max(np.percentile(forward, percentile), np.percentile(backward, percentile)))


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing has {len(spacing)} values for a {ndim}-D mask")
    if any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {spacing}")
    return spacing


def per_class(
    metric: Callable[..., float],
    pred,
    true,
    classes: Iterable[int] | None = None,
    **kwargs,
) -> dict[int, float]:
    """``metric`` on each class of two label maps: ``{c: metric(pred == c, true == c)}``.

    ``classes`` defaults to the non-zero labels present in either map; extra keyword arguments
    (e.g. ``spacing``) are passed to ``metric``.
    """
    pred, true = np.asarray(pred), np.asarray(true)
    _check_shapes(pred, true)
    if classes is None:
        classes = sorted(int(c) for c in np.union1d(np.unique(pred), np.unique(true)) if c != 0)
    return {int(c): metric(pred == c, true == c, **kwargs) for c in classes}


def pooled_counts(probs, labels, threshold: float = 0.5) -> tuple[float, float, float]:
    """(TP, |P|, |T|) over all pixels of a set: what pooled Dice and IoU are made of."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim == labels.ndim + 1 and probs.shape[-1] == 1:
        probs = probs[..., 0]
    _check_shapes(probs, labels)
    pred = probs >= threshold
    true = labels > 0.5 if labels.dtype.kind == "f" else labels != 0
    return float(np.logical_and(pred, true).sum()), float(pred.sum()), float(true.sum())


def pooled_dice(probs, labels, threshold: float = 0.5, eps: float = POOLED_EPS) -> float:
    """Dice over all pixels of a set at once: (2·TP + eps) / (|P| + |T| + eps).

    ``probs``: foreground probabilities, [N, H, W] or [N, H, W, 1]; pixels >= ``threshold`` are
    foreground. ``labels``: binary masks of the same shape. This is the baseline's printed
    "Dice Score" (``1 - smp DiceLoss(eps=1e-7)`` on thresholded predictions).
    """
    return dice_of_counts(*pooled_counts(probs, labels, threshold), eps)


def dice_of_counts(tp: float, n_pred: float, n_true: float, eps: float = POOLED_EPS) -> float:
    """Pooled Dice from `pooled_counts` (summed over sets first, if pooled across them)."""
    return (2.0 * tp + eps) / (n_pred + n_true + eps)


def pooled_iou(probs, labels, threshold: float = 0.5, eps: float = POOLED_EPS) -> float:
    """IoU over all pixels of a set at once: (TP + eps) / (|P ∪ T| + eps), as the baseline's."""
    tp, n_pred, n_true = pooled_counts(probs, labels, threshold)
    return (tp + eps) / (n_pred + n_true - tp + eps)


def mean_dice(probs, labels, threshold: float = 0.5) -> float:
    """Mean over images of the per-image hard Dice (empty-vs-empty counts as 1.0)."""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim == labels.ndim + 1 and probs.shape[-1] == 1:
        probs = probs[..., 0]
    _check_shapes(probs, labels)
    return float(np.mean([dice(p >= threshold, t) for p, t in zip(probs, labels, strict=True)]))


# ------------------------------------------------------------------------------------------------
# TensorFlow side (usable inside tf.function; TensorFlow is imported lazily).


def _tf_hard(y_true, y_prob, threshold: float):
    """-> (pred one-hot/binary float [B, H, W, K], true float [B, H, W, K]), foreground only."""
    import tensorflow as tf

    y_prob = tf.cast(tf.convert_to_tensor(y_prob), tf.float32)
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank == 4:
        y_true = tf.squeeze(y_true, axis=-1)
    if y_prob.shape.rank == 3:
        y_prob = y_prob[..., tf.newaxis]
    if y_true.dtype.is_floating:
        y_true = tf.round(y_true)
    y_true = tf.cast(y_true, tf.int32)
    channels = y_prob.shape[-1]
    if channels == 1:
        pred = tf.cast(y_prob >= threshold, tf.float32)
        true = tf.cast(y_true > 0, tf.float32)[..., tf.newaxis]
    else:
        pred = tf.one_hot(tf.argmax(y_prob, axis=-1), channels, dtype=tf.float32)[..., 1:]
        true = tf.one_hot(y_true, channels, dtype=tf.float32)[..., 1:]
    return pred, true


def dice_counts(y_true, y_prob, threshold: float = 0.5):
    """Per-class sums over the batch (intersection, |pred|, |true|), each [K] foreground classes.

    Accumulate them over a validation set and form ``2·I / (P + T)`` for pooled Dice.
    """
    import tensorflow as tf

    pred, true = _tf_hard(y_true, y_prob, threshold)
    axes = [0, 1, 2]
    return (
        tf.reduce_sum(pred * true, axis=axes),
        tf.reduce_sum(pred, axis=axes),
        tf.reduce_sum(true, axis=axes),
    )


def batch_dice(y_true, y_prob, threshold: float = 0.5):
    """Per-example hard Dice, [B] float32 (mean over foreground classes; empty/empty = 1.0).

    Binary: ``y_prob`` [B, H, W, 1] thresholded at ``threshold``; multiclass: argmax.
    """
    import tensorflow as tf

    pred, true = _tf_hard(y_true, y_prob, threshold)
    intersection = tf.reduce_sum(pred * true, axis=[1, 2])
    total = tf.reduce_sum(pred, axis=[1, 2]) + tf.reduce_sum(true, axis=[1, 2])
    per_class_dice = tf.where(total > 0, 2.0 * intersection / tf.maximum(total, 1.0), 1.0)
    return tf.reduce_mean(per_class_dice, axis=-1)


__all__ = [
    "batch_dice",
    "dice",
    "dice_counts",
    "hd95",
    "iou",
    "mean_dice",
    "per_class",
    "pooled_dice",
    "pooled_iou",
    "surface_distances",
]
