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
from tff_privseg.privacy.dp_sgd import dp_gradient


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
    variable and the sum of the record losses. `dp_gradient` with records of ``group`` rows.
    """
    return dp_gradient(
        model, loss_fn, x, y, query, expected_records, method, group=group, weights=weights
    )
