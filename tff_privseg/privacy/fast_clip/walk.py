"""The forward walk through a Keras functional graph, layer call by layer call."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tff_privseg.privacy.fast_clip.base import NoRule, warn_once, with_training
from tff_privseg.privacy.fast_clip.jacobian import JacobianRule
from tff_privseg.privacy.fast_clip.norm import group_norm

_FALLBACK = JacobianRule()


def is_functional(model: Any) -> bool:
    """Whether ``model`` is a Keras functional graph (what the walk needs)."""
    return isinstance(model, tf.keras.Model) and all(
        hasattr(model, a)
        for a in ("_nodes_by_depth", "_tensor_usage_count", "_conform_to_reference_input")
    )


def use_counts(model, counts: dict[int, int] | None = None) -> dict[int, int]:
    """{id(layer): number of nodes calling it}, nested functional models included."""
    counts = {} if counts is None else counts
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            if node.is_input:
                continue
            layer = node.layer
            counts[id(layer)] = counts.get(id(layer), 0) + 1
            if is_functional(layer):
                use_counts(layer, counts)
    return counts


def forward(model: tf.keras.Model, inputs: Any) -> Any:
    """`model(inputs, training=True)` through the same layer-by-layer walk.

    Numerically the Keras call (to float rounding); Keras' own GroupNormalization layers are
    computed as `models.group_norm` does (Keras' call takes masked moments even without a
    mask, 2-3x slower on CPU).
    """
    return walk(model, inputs, None, None, None, "auto", {})


def walk(model, inputs, tape, records, registry, strategy, counts, explicit=False):
    """The model's training forward pass, node by node.

    records None: a plain forward (`forward`). Else every trainable layer's call goes through
    its rule from ``registry`` (or the jacobian fallback), whose `Record` is appended to
    ``records``; explicit: every rule must give explicit per-example gradients.
    """
    flat = model._flatten_to_reference_inputs(inputs)
    tensors: dict[str, list] = {}
    usage = model._tensor_usage_count
    for ref, value in zip(model.inputs, flat, strict=True):
        value = model._conform_to_reference_input(value, ref_input=ref)
        tensors[str(id(ref))] = [value] * usage[str(id(ref))]
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or any(t not in tensors for t in node.flat_input_ids):
                continue
            args, kwargs = node.map_arguments(tensors)
            layer = node.layer
            if is_functional(layer) and len(args) == 1 and not kwargs:
                outputs = walk(layer, args[0], tape, records, registry, strategy, counts, explicit)
            elif records is None:  # plain forward: only GroupNorm replaced
                outputs = _plain_call(layer, args, kwargs)
            elif not layer.trainable_weights:
                outputs = layer(*args, **with_training(layer, kwargs))
            else:
                outputs = _call_rule(
                    layer, args, kwargs, tape, records, registry, strategy, counts, explicit
                )
            for x_id, y in zip(node.flat_output_ids, tf.nest.flatten(outputs), strict=True):
                tensors[x_id] = [y] * usage[x_id]
    outputs = [tensors[str(id(x))].pop() for x in model.outputs]
    return tf.nest.pack_sequence_as(model._nested_outputs, outputs)


def _plain_call(layer, args, kwargs):
    if (
        type(layer) is tf.keras.layers.GroupNormalization  # GroupNorm's own call is fast
        and len(args) == 1
        and all(v is None for v in kwargs.values())
    ):
        try:
            return group_norm(layer, args[0])[0]
        except NoRule:
            pass
    return layer(*args, **with_training(layer, kwargs))


def _call_rule(layer, args, kwargs, tape, records, registry, strategy, counts, explicit):
    # Explicit per-example gradients are needed for shared layers (their uses are summed per
    # example) and for grouped records (summed over a record's rows); ghost norms are neither.
    shared = counts.get(id(layer), 1) > 1 or explicit
    rule = registry.lookup(layer)
    if rule is not None and shared and not rule.supports_explicit:
        rule = None
    if rule is not None:
        try:
            outputs, record = rule.forward(layer, args, kwargs, tape, strategy, shared)
            records.append(record)
            return outputs
        except NoRule:
            pass
    warn_once(
        type(layer).__name__,
        f"fast clipping has no rule for {type(layer).__name__} (layer {layer.name!r}); its "
        "per-example gradients come from tape.jacobian (slow). Register a rule in "
        "tff_privseg.privacy.fast_clip.DEFAULT_REGISTRY.",
    )
    outputs, record = _FALLBACK.forward(layer, args, kwargs, tape, strategy, shared)
    records.append(record)
    return outputs
