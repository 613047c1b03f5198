"""``tf.data`` pipelines over a site's slices (TensorFlow is imported only when called)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tff_privseg.data.slices import SliceSet

if TYPE_CHECKING:
    import tensorflow as tf


def site_dataset(
    slices: SliceSet,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    repeat: bool = False,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batches ``(x float32 [B, R, R, 1], y int32 [B, R, R])``, cached and prefetched.

    ``shuffle_seed``: shuffle all slices (full buffer), reshuffled every epoch, reproducibly.
    ``repeat``: endless. ``drop_remainder``: every batch has exactly ``batch_size`` rows (a
    constant shape avoids retracing in TFF); otherwise the last batch may be smaller.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = tf.data.Dataset.from_tensor_slices((slices.images, slices.labels))
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), tf.cast(y, tf.int32))).cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(max(len(slices), 1), seed=shuffle_seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
