"""Rule for GroupNormalization (Keras' layer and ``models.GroupNorm``): per-example γ/β."""

from __future__ import annotations

import tensorflow as tf

from tff_privseg.models.group_norm import affine, fast_path, group_norm_parts
from tff_privseg.privacy.fast_clip.base import Contribution, NoRule, Record, Rule


class _GroupNormRecord(Record):
    def __init__(self, layer, centred, inv, z):
        self.layer, self.centred, self.inv, self.z = layer, centred, inv, z

    def contribute(self, dz, tape):
        layer = self.layer
        spatial = list(range(1, self.centred.shape.rank - 1))
        dz = tf.cast(dz, self.centred.dtype)
        batch = tf.shape(dz)[0]
        out = Contribution()
        if layer.scale:  # dγ = Σ_spatial dz·x̂ = inv · Σ_spatial dz·(x - mean), per channel
            dgamma = tf.reduce_sum(dz * self.centred, axis=spatial, keepdims=True) * self.inv
            out.per_example.append((layer.gamma, tf.reshape(dgamma, [batch, -1])))
        if layer.center:
            out.per_example.append((layer.beta, tf.reduce_sum(dz, axis=spatial)))
        return out


class GroupNormRule(Rule):
    """GroupNormalization over the last axis, without a mask (Keras' layer or ``GroupNorm``).

    The output is ``models.group_norm``'s (Keras' numbers without its all-ones mask);
    per-example γ/β gradients are spatial sums of dz·x̂ and dz.
    """

    def forward(self, layer, args, kwargs, tape, strategy, explicit_only):
        if len(args) != 1 or any(v is not None for v in kwargs.values()):
            raise NoRule
        z, centred, inv = group_norm(layer, args[0])
        tape.watch(z)
        return z, _GroupNormRecord(layer, centred, inv, z)


def group_norm(layer: tf.keras.layers.GroupNormalization, x: tf.Tensor):
    """The layer's output [B, ..., C], the centred input [B, ..., C] and inv [B, 1.., C]."""
    x = tf.cast(x, layer.compute_dtype)
    if not fast_path(layer, x):
        raise NoRule
    centred, inv = group_norm_parts(x, layer.groups, layer.epsilon)
    return affine(layer, centred, inv), centred, inv
