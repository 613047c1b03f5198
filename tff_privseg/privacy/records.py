"""DP-SGD where one privacy record is a group of slices: a patient.

A batch holds P sampled patients × k slice slots each (x [P·k, H, W, 1]); slot weights w [P·k]
are 1 for a real slice and 0 for padding (a patient with fewer than k slices). The record loss of
patient p is the weighted mean of its slices' losses; its gradient is clipped to L2 norm C as ONE
record, so a patient's total influence on a step is at most C however many slices it has.
Two ways to the clipped sum, as for slices (tff_privseg.privacy.dp_sgd): ``method="fast"``
(default) sums each record's rows' per-example gradients from one forward and one backward
(`fast_clip.fast_clipped_sum(group=k)`: about the cost of a plain step on P·k slices);
``method="jacobian"`` takes `tape.jacobian` of the record-loss vector [P] (pfor-vectorised over
patients). Neither loops over patients or slices in Python.
"""

from __future__ import annotations

from typing import Literal

import tensorflow as tf
from tensorflow_privacy.privacy.dp_query.gaussian_query import GaussianSumQuery

from tff_privseg.losses import LossFn
from tff_privseg.privacy import fast_clip
from tff_privseg.privacy.dp_sgd import clip_and_sum
from tff_privseg.privacy.fast_clip import record_losses


def record_dp_gradient(
    model: tf.keras.Model,
    loss_fn: LossFn,
    x: tf.Tensor,
    y: tf.Tensor,
    weights: tf.Tensor,
    group: int,
    query: GaussianSumQuery,
    expected_records: float,
    method: Literal["fast", "jacobian"] = "fast",
) -> tuple[list[tf.Tensor], tf.Tensor]:
    """Noised mean gradient over records (clip each record to C, sum, noise, / q·N).

    x [P·k, H, W, 1], y [P·k, H, W], weights [P·k]. Returns the gradient per trainable
    variable and the sum of the record losses.
    """
    global_state = query.initial_global_state()
    clip = query.derive_sample_params(global_state)
    variables = model.trainable_variables

    if method not in ("fast", "jacobian"):
        raise ValueError(f"method must be 'fast' or 'jacobian', got {method!r}")
    if method == "fast" and not fast_clip.is_functional(model):
        method = "jacobian"

    def clipped_sum() -> tuple[list[tf.Tensor], tf.Tensor]:
        if method == "fast":
            res = fast_clip.fast_clipped_sum(
                model, loss_fn, x, y, clip, group=group, weights=weights
            )
            return res.clipped_sum, tf.reduce_sum(res.losses)
        with tf.GradientTape() as tape:
            losses = record_losses(loss_fn(y, model(x, training=True)), weights, group)
        jac = tape.jacobian(losses, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return clip_and_sum(jac, clip), tf.reduce_sum(losses)

    def nothing() -> tuple[list[tf.Tensor], tf.Tensor]:
        return [tf.zeros_like(v) for v in variables], tf.constant(0.0)

    summed, loss_sum = tf.cond(tf.shape(x)[0] > 0, clipped_sum, nothing)
    noised, _, _ = query.get_noised_result(summed, global_state)
    return [g / expected_records for g in noised], loss_sum
