"""The client update: what one site does in one round, as one TF function.

The same `tf.function` runs inside TFF's client work (on TFF's runtime) and eagerly in the
Python TF runtime, so a site can train on its own accelerator and give the same result.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
import tensorflow_federated as tff

from tff_privseg.losses import LossFn
from tff_privseg.privacy.dp_sgd import DpSgdSpec, dp_gradient, plain_gradient


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
        return dp_gradient(
            model,
            loss_fn,
            x,
            y,
            dp.query(step_seed),
            dp.expected_batch_size,
            group=dp.group,
            weights=w,
        )

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
        count, buffered = _buffer(batches)
        for step in tf.range(tf.cast(count, tf.int64)):
            x, y, w = _read(buffered, tf.cast(step, tf.int32), batches.element_spec)
            step_seed = tf.random.experimental.stateless_fold_in(seed, step)
            grads, batch_loss = gradient(x, y, w, step_seed)
            opt_state, new_weights = optimizer.next(
                opt_state, tuple(v.read_value() for v in variables), tuple(grads)
            )
            for var, value in zip(variables, new_weights, strict=True):
                var.assign(value)
            examples += tf.cast(tf.reduce_sum(w), tf.int64)
            loss_sum += batch_loss
        delta = [a - b.read_value() for a, b in zip(initial_weights, variables, strict=True)]
        return delta, examples, loss_sum

    return client_update


def _buffer(batches: tf.data.Dataset) -> tuple[tf.Tensor, tuple[tf.TensorArray, ...]]:
    """Read every batch of the round into TensorArrays before any training step.

    Measured (3 sites x 10 DP steps, 64 px U-Net, batch 8, 9 interleaved rounds): training
    inside the loop over the dataset iterator took 1.3x the wall time of the same steps called
    one by one from Python (3.11 s vs 2.43 s), reading the batches first and then training over
    `tf.range` 1.05x (2.55 s); prefetching inside the loop did not help (3.37 s against 3.31 s
    in another run). The buffered batches are the round's slices, which the site's dataset
    (`sampling.batches_dataset`) already holds in memory: at most twice that in host memory, for
    the length of the round (the arrays stay on the CPU also when the steps run on a GPU).

    `iter(batches)`, not `batches`: AutoGraph turns `for b in dataset` into
    `dataset.scan(...).reduce(...)`, which would instantiate the loop as a tf.data function
    again for every new dataset, i.e. on every call.
    """
    specs = tf.nest.flatten(batches.element_spec)
    with tf.device("/CPU:0"):  # host memory, like the dataset: one batch at a time to a GPU
        arrays = tuple(
            tf.TensorArray(
                s.dtype, size=0, dynamic_size=True, infer_shape=False, element_shape=s.shape
            )
            for s in specs
        )
        count = tf.constant(0, tf.int32)
        for element in iter(batches):
            arrays = tuple(
                a.write(count, t) for a, t in zip(arrays, tf.nest.flatten(element), strict=True)
            )
            count += 1
    return count, arrays


def _read(arrays: tuple[tf.TensorArray, ...], index: tf.Tensor, element_spec) -> tuple:
    """Batch `index` from `_buffer`'s arrays, with the dataset's element structure and shapes."""
    with tf.device("/CPU:0"):
        flat = [
            tf.ensure_shape(a.read(index), s.shape)
            for a, s in zip(arrays, tf.nest.flatten(element_spec), strict=True)
        ]
    return tf.nest.pack_sequence_as(element_spec, flat)
