"""Which rule clips which layer class."""

from __future__ import annotations

import tensorflow as tf

from tff_privseg.models.group_norm import GroupNorm
from tff_privseg.privacy.fast_clip.base import Rule
from tff_privseg.privacy.fast_clip.conv import ConvRule
from tff_privseg.privacy.fast_clip.dense import DenseRule
from tff_privseg.privacy.fast_clip.norm import GroupNormRule
from tff_privseg.privacy.fast_clip.tfp import TfpRegistryRule


class LayerRegistry:
    """Layer class (exact type, like tensorflow-privacy's registry) -> Rule."""

    def __init__(self):
        self._rules: dict[type, Rule] = {}

    def insert(self, layer_class: type, rule: Rule) -> None:
        self._rules[layer_class] = rule

    def lookup(self, layer: tf.keras.layers.Layer) -> Rule | None:
        rule = self._rules.get(type(layer))
        if rule is not None and hasattr(rule, "supported") and not rule.supported(layer):
            return None
        return rule

    def __contains__(self, layer_class: type) -> bool:
        return layer_class in self._rules


def default_registry() -> LayerRegistry:
    registry = LayerRegistry()
    registry.insert(tf.keras.layers.Conv2D, ConvRule())
    registry.insert(tf.keras.layers.Conv2DTranspose, ConvRule(transpose=True))
    registry.insert(tf.keras.layers.Dense, DenseRule())
    registry.insert(tf.keras.layers.GroupNormalization, GroupNormRule())
    registry.insert(GroupNorm, GroupNormRule())
    try:  # tensorflow-privacy's own rules for the layers it covers (batch-axis base_vars)
        from tensorflow_privacy.privacy.fast_gradient_clipping.registry_functions import (
            einsum_dense,
            layer_normalization,
        )

        registry.insert(
            tf.keras.layers.EinsumDense, TfpRegistryRule(einsum_dense.einsum_layer_computation)
        )
        registry.insert(
            tf.keras.layers.LayerNormalization,
            TfpRegistryRule(layer_normalization.layer_normalization_computation),
        )
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return registry


DEFAULT_REGISTRY = default_registry()
