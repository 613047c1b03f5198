"""Sample-level DP-SGD gradients from a tensorflow-privacy DPQuery.

Each example's gradient is clipped to L2 norm C (the query's `preprocess_record` rule), the
clipped gradients are summed, and the query adds N(0, (σC)²) to the sum. The sum is divided by
the *expected* batch size (q·n): the actual size of a Poisson batch is itself private and must
not be used.

Two ways to the clipped sum (same result):
- ``method="fast"`` (default): `fast_clip.fast_clipped_sum` — per-example norms from layer
  inputs and output gradients, then the clipped sum with no second backward pass (about the
  cost of one ordinary step). Models that are not Keras functional graphs fall back to the
  jacobian path (warned once).
- ``method="jacobian"``: per-example gradients from `tape.jacobian` of the per-example loss
  vector (pfor; O(B²) work and a while_loop for conv kernels: ~5-10× a step), then
  `clip_and_sum`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import dp_accounting
import tensorflow as tf
from tensorflow_privacy.privacy.dp_query.gaussian_query import GaussianSumQuery

from tff_privseg.config import Config
from tff_privseg.losses import LossFn
from tff_privseg.privacy import fast_clip


class SeededGaussianSumQuery(GaussianSumQuery):
    """GaussianSumQuery whose noise is a pure function of a seed.

    Hand-written because GaussianSumQuery draws its noise from an unseeded initializer. A
    resumed run must re-release *identical* noised updates for a round that was interrupted,
    otherwise the repeated round would leak more than the accountant counts. The seed comes
    from a per-run secret key (never from the config), so nobody can subtract the noise.
    """

    def __init__(self, l2_norm_clip: float, stddev: float, seed: tf.Tensor) -> None:
        super().__init__(l2_norm_clip, stddev)
        self._seed = seed  # int64 [2]

    def get_noised_result(self, sample_state, global_state):
        flat = tf.nest.flatten(sample_state)
        noised = [
            v
            + tf.random.stateless_normal(
                tf.shape(v),
                seed=tf.random.experimental.stateless_fold_in(self._seed, i),
                stddev=global_state.stddev,
                dtype=v.dtype,
            )
            for i, v in enumerate(flat)
        ]
        event = dp_accounting.GaussianDpEvent(global_state.stddev / global_state.l2_norm_clip)
        return (
            tf.nest.pack_sequence_as(sample_state, noised),
            global_state,
            event,
        )


@dataclass(frozen=True)
class DpSgdSpec:
    """Sample-level DP-SGD of one site's local training: clip C, noise multiplier σ, q·N.

    group = 1: a record is one slice. group = k > 1: a record is one patient, given as k slice
    slots per sampled patient (see tff_privseg.privacy.records).
    """

    l2_norm_clip: float
    noise_multiplier: float
    expected_batch_size: float  # q * N: the expected number of records in a Poisson batch
    group: int = 1

    def query(self, seed: tf.Tensor) -> SeededGaussianSumQuery:
        """The Gaussian sum query with noise N(0, (σC)²) drawn from ``seed`` (int64 [2])."""
        return SeededGaussianSumQuery(
            self.l2_norm_clip, self.l2_norm_clip * self.noise_multiplier, seed
        )


def dp_sgd_spec(cfg: Config) -> DpSgdSpec:
    """The run's DP-SGD parameters (whatever privacy.level is): q·N is the batch size; a
    patient record (privacy.unit = "patient") is privacy.slices_per_patient slots, and with
    augmentation multiplicity M every record is M views of its slots (`record_rows`)."""
    return DpSgdSpec(
        cfg.privacy.l2_norm_clip,
        cfg.privacy.noise_multiplier,
        float(cfg.train.batch_size),
        record_rows(cfg),
    )


def record_rows(cfg: Config) -> int:
    """Rows of one privacy record in a batch: its slots (privacy.slices_per_patient for a
    patient, 1 for a slice) times data.augment.multiplicity views of each."""
    p = cfg.privacy
    slots = p.slices_per_patient if p.unit == "patient" else 1
    return slots * cfg.data.augment.multiplicity


def per_example_gradients(
    model: tf.keras.Model,
    loss_fn: LossFn,
    x: tf.Tensor,
    y: tf.Tensor,
    group: int = 1,
    weights: tf.Tensor | None = None,
) -> tuple[list[tf.Tensor], tf.Tensor]:
    """Per-record gradients, each [R, *var.shape], and the per-record losses [R].

    group = 1: a record is one example (R = B). group = k > 1: a record is k consecutive rows
    and its loss the ``weights``-weighted mean of theirs (`fast_clip.record_losses`, R = B / k).
    """
    with tf.GradientTape() as tape:
        losses = loss_fn(y, model(x, training=True))
        if group > 1:
            losses = fast_clip.record_losses(losses, weights, group)
    jac = tape.jacobian(
        losses, model.trainable_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    return jac, losses


def clip_and_sum(per_example: list[tf.Tensor], l2_norm_clip: tf.Tensor) -> list[tf.Tensor]:
    """Σ_i clip(g_i, C) over the batch axis: GaussianSumQuery.preprocess_record, batched.

    Same arithmetic as the query's `tf.clip_by_global_norm` per example (scale g_i by
    C / max(‖g_i‖, C), ‖·‖ the norm over all variables), written over the batch axis because
    pfor has no rule for L2Loss and would fall back to a loop over examples.
    """
    sq = [tf.reduce_sum(tf.square(g), axis=tf.range(1, tf.rank(g))) for g in per_example]
    norms = tf.sqrt(tf.add_n(sq))  # [B]
    scale = l2_norm_clip / tf.maximum(norms, l2_norm_clip)  # [B]
    return [tf.tensordot(scale, g, axes=1) for g in per_example]


def dp_gradient(
    model: tf.keras.Model,
    loss_fn: LossFn,
    x: tf.Tensor,
    y: tf.Tensor,
    query: GaussianSumQuery,
    expected_batch_size: float,
    method: Literal["fast", "jacobian"] = "fast",
    strategy: fast_clip.Strategy = "auto",
    group: int = 1,
    weights: tf.Tensor | None = None,
) -> tuple[list[tf.Tensor], tf.Tensor]:
    """One DP-SGD gradient: clip per record, sum, noise via `query`, divide by q·n.

    Args:
      x: float32 [B, H, W, 1], y: int32 [B, H, W]; B may be 0 (an empty Poisson batch).
      method: "fast" (book-keeping clipping, `fast_clip`) or "jacobian" (reference path).
      strategy: per-layer norm strategy of the fast path ("auto", "loop", "einsum", "ghost").
      group, weights: a record is one example (group 1), or ``group`` consecutive rows with
        slot weights [B] (`tff_privseg.privacy.records`); expected_batch_size then counts records.
    Returns:
      (noised mean gradient per trainable variable, sum of per-record losses).
    """
    if method not in ("fast", "jacobian"):
        raise ValueError(f"method must be 'fast' or 'jacobian', got {method!r}")
    global_state = query.initial_global_state()
    params = query.derive_sample_params(global_state)
    variables = model.trainable_variables
    if method == "fast" and not fast_clip.is_functional(model):
        fast_clip.warn_once(
            f"model:{type(model).__name__}",
            f"fast clipping needs a Keras functional model, not {type(model).__name__}: "
            "using the jacobian path (slow)",
        )
        method = "jacobian"

    def clipped_sum() -> tuple[list[tf.Tensor], tf.Tensor]:
        if method == "fast":
            res = fast_clip.fast_clipped_sum(
                model, loss_fn, x, y, params, strategy, group=group, weights=weights
            )
            return res.clipped_sum, tf.reduce_sum(res.losses)
        jac, losses = per_example_gradients(model, loss_fn, x, y, group, weights)
        return clip_and_sum(jac, params), tf.reduce_sum(losses)

    def nothing() -> tuple[list[tf.Tensor], tf.Tensor]:
        return [tf.zeros_like(v) for v in variables], tf.constant(0.0)

    summed, loss_sum = tf.cond(tf.shape(x)[0] > 0, clipped_sum, nothing)
    noised, _, _ = query.get_noised_result(summed, global_state)
    return [g / expected_batch_size for g in noised], loss_sum


def plain_gradient(
    model: tf.keras.Model, loss_fn: LossFn, x: tf.Tensor, y: tf.Tensor
) -> tuple[Sequence[tf.Tensor], tf.Tensor]:
    """Ordinary minibatch gradient of the mean loss, and the sum of per-example losses.

    An empty batch gives zero gradients (GroupNorm cannot run on zero examples). Functional
    models run through `fast_clip.forward`: the Keras graph with Keras' own GroupNormalization
    layers computed like `models.GroupNorm` (same numbers to float rounding, faster on CPU).
    """
    run = fast_clip.forward if fast_clip.is_functional(model) else _keras_call

    def grads_and_loss() -> tuple[list[tf.Tensor], tf.Tensor]:
        with tf.GradientTape() as tape:
            losses = loss_fn(y, run(model, x))
            loss = tf.reduce_mean(losses)
        grads = tape.gradient(
            loss, model.trainable_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return list(grads), tf.reduce_sum(losses)

    def nothing() -> tuple[list[tf.Tensor], tf.Tensor]:
        return [tf.zeros_like(v) for v in model.trainable_variables], tf.constant(0.0)

    return tf.cond(tf.shape(x)[0] > 0, grads_and_loss, nothing)


def _keras_call(model: tf.keras.Model, x: tf.Tensor) -> tf.Tensor:
    return model(x, training=True)
