"""Rule for Dense: ‖a‖²‖g‖² / ghost norm, or the explicit per-example kernel gradient."""

from __future__ import annotations

import tensorflow as tf

from tff_privseg.privacy.fast_clip.base import (
    Contribution,
    Record,
    Rule,
    as_rows,
    layer_grad_clipped,
    sum_sq_rows,
)
from tff_privseg.privacy.fast_clip.linear import (
    activate,
    choose,
    ghost_sq_norm,
    static_positions,
    watched_pre_activation,
)


class _DenseRecord(Record):
    def __init__(self, layer, x, z, strategy):
        self.layer, self.x, self.z, self.strategy = layer, x, z, strategy

    def contribute(self, dz, tape):
        layer = self.layer
        k, c = int(self.x.shape[-1]), layer.units
        a, g = as_rows(self.x, k), as_rows(tf.cast(dz, self.x.dtype), c)
        out = Contribution()
        if self.strategy == "ghost":
            if self.x.shape.rank == 2:  # T = 1: ‖a‖²‖g‖²
                sq = sum_sq_rows(self.x) * sum_sq_rows(dz)
            else:
                sq = ghost_sq_norm(a, g)
            if layer.use_bias:
                sq += sum_sq_rows(tf.reduce_sum(g, axis=1))
            out.sq_norm = sq
            out.clipped = layer_grad_clipped(tape, self.z, dz, layer.trainable_variables)
            return out
        out.per_example.append((layer.kernel, tf.matmul(a, g, transpose_a=True)))
        if layer.use_bias:
            out.per_example.append((layer.bias, tf.reduce_sum(g, axis=1)))
        return out


class DenseRule(Rule):
    def supported(self, layer) -> bool:
        return True

    def forward(self, layer, args, kwargs, tape, strategy, explicit_only):
        x, z = watched_pre_activation(layer, args, kwargs, tape)
        positions = 1 if x.shape.rank == 2 else static_positions(x)
        s = choose(strategy, positions, int(x.shape[-1]), layer.units)
        s = "einsum" if (explicit_only or s != "ghost") else "ghost"
        return activate(layer, z), _DenseRecord(layer, x, z, s)
