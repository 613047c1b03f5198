"""The client update: what one site does in one round, as one TF function.

The same `tf.function` runs inside TFF's client work (on TFF's runtime) and eagerly in the
Python TF runtime, so a site can train on its own accelerator and give the same result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tensorflow as tf
import tensorflow_federated as tff

from tff_privseg.privacy.dp_sgd import LossFn, SeededGaussianSumQuery, dp_gradient, plain_gradient
from tff_privseg.privacy.records import record_dp_gradient


@dataclass(frozen=True)
class DpSgdSpec:
    """Sample-level DP-SGD parameters of one site's local training.

    group = 1: a record is one slice. group = k > 1: a record is one patient, given as k slice
    slots per sampled patient (see tff_privseg.privacy.records).
    """

    l2_norm_clip: float
    noise_multiplier: float
    expected_batch_size: float  # q * N: the expected number of records in a Poisson batch
    group: int = 1


def build_client_update(
    model_fn: Callable[[], tf.keras.Model],
    loss_fn: LossFn,
    optimizer: tff.learning.optimizers.Optimizer,
    dp: DpSgdSpec | None,
) -> Callable:
    """Returns `client_update(initial_weights, batches, seed, lr) -> (delta, examples, loss_sum)`.

    initial_weights: list of trainable tensors (the server model).
    batches: dataset of (x float32 [B,H,W,1], y int32 [B,H,W], w float32 [B]); B may vary
      (Poisson) or be 0; w is the slot weight (0 = padding of a patient with fewer slices).
    seed: int64 [2], the per-site, per-round secret noise seed.  lr: float32 learning rate of
      this round (None: the optimizer's own).
    Returns delta = initial - trained (TFF's convention: applied by the server optimizer as a
    gradient), the number of slices used and the sum of the (record) losses.
    """
    model = model_fn()

    def gradient(x, y, w, step_seed):
        if dp is None:
            return plain_gradient(model, loss_fn, x, y)
        query = SeededGaussianSumQuery(
            dp.l2_norm_clip, dp.l2_norm_clip * dp.noise_multiplier, step_seed
        )
        if dp.group == 1:
            return dp_gradient(model, loss_fn, x, y, query, dp.expected_batch_size)
        return record_dp_gradient(model, loss_fn, x, y, w, dp.group, query, dp.expected_batch_size)

    # A tf.function, not a bare graph: inside `tff.tensorflow.computation` variable assignments
    # that feed no output are otherwise silently dropped (the "silent trap").
    @tf.function
    def client_update(initial_weights, batches, seed, lr=None):
        variables = model.trainable_variables
        for var, value in zip(variables, initial_weights, strict=True):
            var.assign(value)
        specs = tuple(tf.TensorSpec(v.shape, v.dtype) for v in variables)
        opt_state = optimizer.initialize(specs)
        if lr is not None:  # else the optimizer's own learning rate
            opt_state = optimizer.set_hparams(opt_state, {"learning_rate": lr})
        examples = tf.constant(0, tf.int64)
        loss_sum = tf.constant(0.0)
        step = tf.constant(0, tf.int64)
        # `iter(batches)`, not `batches`: AutoGraph turns `for b in dataset` into
        # `dataset.scan(...).reduce(...)`, so the whole DP step would run as a tf.data function,
        # instantiated (and graph-optimised) again for every new dataset, i.e. on every call, and
        # run on tf.data's threads: ~3 s of CPU per site and round on top of ~1.6 s of steps
        # (10 DP steps, 64 px U-Net, batch 8). Over an iterator the loop is a while_loop in this
        # function's own graph, optimised once per trace (TFF's DATASET_ITERATOR loop does it).
        for x, y, w in iter(batches):
            step_seed = tf.random.experimental.stateless_fold_in(seed, step)
            grads, batch_loss = gradient(x, y, w, step_seed)
            opt_state, new_weights = optimizer.next(
                opt_state, tuple(v.read_value() for v in variables), tuple(grads)
            )
            for var, value in zip(variables, new_weights, strict=True):
                var.assign(value)
            examples += tf.cast(tf.reduce_sum(w), tf.int64)
            loss_sum += batch_loss
            step += 1
        delta = [a - b.read_value() for a, b in zip(initial_weights, variables, strict=True)]
        return delta, examples, loss_sum

    return client_update
