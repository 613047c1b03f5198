"""Per-record norms and the clipped sum from one forward and one backward pass."""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

from tff_privseg.losses import LossFn
from tff_privseg.privacy.fast_clip.base import (
    STRATEGIES,
    FastClipUnsupported,
    LoopJob,
    Record,
    Strategy,
    sum_sq_rows,
)
from tff_privseg.privacy.fast_clip.registry import DEFAULT_REGISTRY, LayerRegistry
from tff_privseg.privacy.fast_clip.walk import is_functional, use_counts, walk


@dataclasses.dataclass
class FastClipResult:
    """What `fast_clipped_sum` returns."""

    clipped_sum: list[tf.Tensor]  # Σ_r c_r g_r, one per model.trainable_variables
    losses: tf.Tensor  # [R] per-record losses (R = B for group 1)
    norms: tf.Tensor  # [R], ‖g_r‖ before clipping


def _run_loop(jobs: list[LoopJob]) -> list[tf.Tensor]:
    """All per-example gradients of all loop jobs in one while_loop over the batch.

    A while_loop that slices example i out of the captured batch tensors (not `tf.map_fn`,
    which first copies every input into a TensorList: a full copy of the activations).
    """
    if not jobs:
        return []
    n = tf.shape(jobs[0].elems[0])[0]
    arrays = [
        tf.TensorArray(job.variable.dtype, size=n, element_shape=job.variable.shape) for job in jobs
    ]

    def body(i, *arrays):
        return (i + 1,) + tuple(
            ta.write(i, tf.cast(job.fn(*[e[i] for e in job.elems]), job.variable.dtype))
            for ta, job in zip(arrays, jobs, strict=True)
        )

    _, *arrays = tf.while_loop(
        lambda i, *_: i < n, body, (tf.constant(0), *arrays), parallel_iterations=16
    )
    return [ta.stack() for ta in arrays]


def fast_clipped_sum(
    model: tf.keras.Model,
    loss_fn: LossFn,
    x: tf.Tensor,
    y: tf.Tensor,
    l2_norm_clip: tf.Tensor | float | None,
    strategy: Strategy = "auto",
    registry: LayerRegistry | None = None,
    group: int = 1,
    weights: tf.Tensor | None = None,
) -> FastClipResult:
    """Per-record norms and Σ_r min(1, C/‖g_r‖)·g_r, with one forward and one backward.

    group = 1: a record is one example (row of x). group = k > 1: a record is k consecutive
    rows (a patient's slice slots, x [P·k, H, W, 1]) whose loss is the ``weights``-weighted
    mean of its rows' losses (weights [P·k]: 1 = slice, 0 = padding); its gradient is the sum
    of its rows' per-example gradients, so every layer goes explicit (no ghost norms).
    ``l2_norm_clip=None`` skips clipping (c_r = 1: the plain gradient of Σ_r loss_r).
    Raises FastClipUnsupported for models that are not Keras functional graphs.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not is_functional(model):
        raise FastClipUnsupported(f"{type(model).__name__} is not a Keras functional model")
    registry = registry or DEFAULT_REGISTRY
    counts = use_counts(model)
    records: list[Record] = []
    tape = tf.GradientTape(persistent=True)
    with tape:
        probs = walk(model, x, tape, records, registry, strategy, counts, group > 1)
        losses = loss_fn(y, probs)
        if group > 1:
            losses = record_losses(losses, weights, group)
        total = tf.reduce_sum(losses)
    dzs = tape.gradient(
        total, [r.z for r in records], unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    contributions = [r.contribute(dz, tape) for r, dz in zip(records, dzs, strict=True)]

    jobs = [job for c in contributions for job in c.loop]
    per_example: dict[Any, tuple[tf.Variable, tf.Tensor]] = {}
    explicit = [pe for c in contributions for pe in c.per_example]
    explicit += [(job.variable, g) for job, g in zip(jobs, _run_loop(jobs), strict=True)]
    for var, g in explicit:  # a shared layer: sum its uses' per-example gradients
        if group > 1:  # rows -> records: [P·k, ...] -> [P, ...]
            g = tf.reduce_sum(tf.reshape(g, tf.concat([[-1, group], var.shape], 0)), axis=1)
        key = var.ref()
        per_example[key] = (var, per_example[key][1] + g) if key in per_example else (var, g)

    sq_terms = [sum_sq_rows(g) for _, g in per_example.values()]
    sq_terms += [c.sq_norm for c in contributions if c.sq_norm is not None]
    batch = tf.shape(losses)[0]
    sq = tf.add_n(sq_terms) if sq_terms else tf.zeros([batch])
    norms = tf.sqrt(sq)
    if l2_norm_clip is None:
        scale = tf.ones_like(norms)
    else:
        clip = tf.cast(l2_norm_clip, norms.dtype)
        scale = clip / tf.maximum(norms, clip)

    grads: dict[Any, tf.Tensor] = {}

    def add(var, g):
        key = var.ref()
        grads[key] = grads[key] + g if key in grads else g

    for var, g in per_example.values():
        add(var, tf.tensordot(tf.cast(scale, g.dtype), g, axes=1))
    for c in contributions:
        if c.clipped is not None:
            for var, g in c.clipped(scale):
                add(var, g)
    del tape
    out = [
        grads[v.ref()] if v.ref() in grads else tf.zeros_like(v) for v in model.trainable_variables
    ]
    return FastClipResult(out, losses, norms)


def record_losses(losses: tf.Tensor, weights: tf.Tensor | None, group: int) -> tf.Tensor:
    """[P·k] example losses and slot weights -> [P] weighted mean loss per record.

    weights None: every slot a real slice (all 1).
    """
    if weights is None:
        weights = tf.ones_like(losses)
    per = tf.reshape(losses * weights, [-1, group])
    count = tf.reshape(weights, [-1, group])
    return tf.reduce_sum(per, axis=1) / tf.maximum(tf.reduce_sum(count, axis=1), 1.0)


def per_example_norms(
    model: tf.keras.Model,
    loss_fn: LossFn,
    x: tf.Tensor,
    y: tf.Tensor,
    strategy: Strategy = "auto",
    registry: LayerRegistry | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """(‖g_i‖ [B], loss_i [B]) without materialising per-example gradients where avoidable."""
    res = fast_clipped_sum(model, loss_fn, x, y, None, strategy, registry)
    return res.norms, res.losses
