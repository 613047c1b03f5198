"""Fallback rule: per-example gradients of one layer by `tape.jacobian`."""

from __future__ import annotations

import tensorflow as tf

from tff_privseg.privacy.fast_clip.base import Contribution, Record, Rule, with_training


class _JacobianRecord(Record):
    def __init__(self, layer, z):
        self.layer, self.z = layer, z

    def contribute(self, dz, tape):
        flat_z, flat_dz = tf.nest.flatten(self.z), tf.nest.flatten(dz)
        with tape:  # (persistent) s_i = Σ dz_i·z_i, whose gradient is example i's gradient
            s = tf.add_n(
                [
                    tf.reduce_sum(
                        tf.reshape(
                            tf.cast(z, tf.float32) * tf.stop_gradient(tf.cast(d, tf.float32)),
                            [tf.shape(z)[0], -1],
                        ),
                        axis=1,
                    )
                    for z, d in zip(flat_z, flat_dz, strict=True)
                ]
            )
        variables = self.layer.trainable_variables
        jac = tape.jacobian(s, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return Contribution(per_example=list(zip(variables, jac, strict=True)))


class JacobianRule(Rule):
    """Fallback for layers without a rule: per-example gradients of this layer alone."""

    def forward(self, layer, args, kwargs, tape, strategy, explicit_only):
        outputs = layer(*args, **with_training(layer, kwargs))
        for t in tf.nest.flatten(outputs):
            tape.watch(t)
        return outputs, _JacobianRecord(layer, outputs)
