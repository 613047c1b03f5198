"""Adapter for tensorflow-privacy's own registry functions (EinsumDense, LayerNormalization)."""

from __future__ import annotations

from tff_privseg.privacy.fast_clip.base import Contribution, Record, Rule, layer_grad_clipped


class _TfpRecord(Record):
    def __init__(self, layer, z, sqr_norm_fn):
        self.layer, self.z, self.sqr_norm_fn = layer, z, sqr_norm_fn

    def contribute(self, dz, tape):
        clipped = layer_grad_clipped(tape, self.z, dz, self.layer.trainable_variables)
        return Contribution(sq_norm=self.sqr_norm_fn(dz), clipped=clipped)


class TfpRegistryRule(Rule):
    """Adapter for a tensorflow-privacy registry function whose watched tensor ("base_vars")
    has a leading batch axis: norms from its `sqr_norm_fn`, clipped sum by book-keeping."""

    supports_explicit = False

    def __init__(self, registry_fn):
        self.registry_fn = registry_fn

    def supported(self, layer) -> bool:
        return True

    def forward(self, layer, args, kwargs, tape, strategy, explicit_only):
        base_vars, outputs, sqr_norm_fn = self.registry_fn(layer, args, kwargs, tape, None)
        return outputs, _TfpRecord(layer, base_vars, sqr_norm_fn)
