"""Fast per-example gradient clipping for Keras functional models ("book-keeping" clipping).

DP-SGD needs, per example i, the norm ‖g_i‖ of its gradient and then Σ_i c_i·g_i with
c_i = min(1, C/‖g_i‖). `tape.jacobian` gets there by differentiating every loss_i through the
whole *batched* graph (B backward passes over B examples: O(B²)), and pfor has no rule for
Conv2DBackpropFilter, so conv kernel gradients fall back to a loop. Here instead:

1. One forward pass, layer by layer through the functional graph (training=True). For every
   call of a trainable layer a *rule* records what it needs (the layer input, its normalised
   input, ...) and its pre-activation output ``z``, which the tape watches.
2. One backward pass through the activations only: dz_l = ∂(Σ_i loss_i)/∂z_l for all layers
   at once. Examples do not interact (GroupNorm, no BatchNorm), so row i of dz_l is
   ∂loss_i/∂z_l[i]: the per-example output gradients come for free.
3. Per layer, the per-example squared norms from (input, dz), by one of
   - ``grouped``: the explicit per-example kernel gradient from ONE grouped
     Conv2DBackpropFilter, the batch folded into channel groups ([B,H,W,C] -> [1,H,W,B·C]).
     Default on CPU with oneDNN (TF's Eigen kernels have no grouped/dilated backprop-filter);
   - ``einsum``: the explicit per-example gradient from the layer's input patches
     (``tf.image.extract_patches``) and dz with one batched matmul (Opacus' way; the default
     with a GPU or without oneDNN; on this CPU extract_patches made it 1.8-3× a step);
   - ``loop``: Conv2DBackpropFilter one example at a time in a ``tf.while_loop``. As fast as
     ``grouped`` in a standalone step, but TF re-instantiates a nested while_loop on every
     iteration of the client's dataset loop (+1.2 s per step measured): avoid in training;
   - ``ghost``: the ghost-norm identity ‖Σ_t a_t g_tᵀ‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s), which
     never materialises the gradient but costs O(T²) in the T output positions.
   ``auto`` ("mixed" ghost clipping, Bu et al. 2022) takes ghost where it is the cheaper of
   the two, T²(K+C) < T·K·C (Dense layers, tiny feature maps), else the explicit gradient.
   Explicit needs no second kernel-gradient pass, so on time it never loses; ghost saves
   memory (no [B, K, C] tensor). GroupNorm's γ/β and all biases: explicit, spatial reductions.
4. c_i = C / max(‖g_i‖, C), and the clipped sum WITHOUT a second backward pass (the gradient
   of Σ_i c_i·loss_i): explicit layers contract their per-example gradients with c, ghost
   layers take their own weight gradient with the output gradient c_i·dz_l[i].

So a DP step costs one forward, one data backward and one (per-example) weight gradient, the
same work as a non-private step, plus a few reductions.

Why not tensorflow-privacy's `fast_gradient_clipping` as is: its `compute_gradient_norms` /
`compute_clipped_gradients_and_outputs` take two full passes (a norm pass, then a re-weighted
forward and backward: ≥ 1.7× a step), and its registry functions return squared norms only,
with no rule for Conv2D, Conv2DTranspose or GroupNormalization. Our rules return norms *and*
the clipped sum from the same captured tensors. tensorflow-privacy's registry functions whose
watched tensor has a leading batch axis (EinsumDense, LayerNormalization) are reused through
an adapter (`TfpRegistryRule`): norms from their `sqr_norm_fn`, clipped sum from the layer's
own gradient with output gradient c_i·dz[i].

Trainable layers without a rule (and shared layers whose rule cannot go explicit) fall back to
per-example gradients by `tape.jacobian` of that layer alone (warned once per class).

Modules: `clipped_sum` (steps 2-4: `fast_clipped_sum`), `walk` (step 1), `registry` (layer
class -> rule), the rules `conv`, `dense`, `norm` (GroupNorm), `tfp` (tensorflow-privacy's
registry functions), `jacobian` (the fallback), with `linear` (what conv and dense share) and
`base` (what a rule returns).
"""

from tff_privseg.privacy.fast_clip.base import (
    _WARNED,  # noqa: F401 (tests reset the warn-once memory)
    STRATEGIES,
    Contribution,
    FastClipUnsupported,
    LoopJob,
    Record,
    Rule,
    Strategy,
    warn_once,
)
from tff_privseg.privacy.fast_clip.clipped_sum import (
    FastClipResult,
    fast_clipped_sum,
    per_example_norms,
    record_losses,
)
from tff_privseg.privacy.fast_clip.conv import ConvRule
from tff_privseg.privacy.fast_clip.dense import DenseRule
from tff_privseg.privacy.fast_clip.jacobian import JacobianRule
from tff_privseg.privacy.fast_clip.linear import choose
from tff_privseg.privacy.fast_clip.norm import GroupNormRule, group_norm
from tff_privseg.privacy.fast_clip.registry import DEFAULT_REGISTRY, LayerRegistry, default_registry
from tff_privseg.privacy.fast_clip.tfp import TfpRegistryRule
from tff_privseg.privacy.fast_clip.walk import forward, is_functional

__all__ = [
    "DEFAULT_REGISTRY",
    "STRATEGIES",
    "Contribution",
    "ConvRule",
    "DenseRule",
    "FastClipResult",
    "FastClipUnsupported",
    "GroupNormRule",
    "JacobianRule",
    "LayerRegistry",
    "LoopJob",
    "Record",
    "Rule",
    "Strategy",
    "TfpRegistryRule",
    "choose",
    "default_registry",
    "fast_clipped_sum",
    "forward",
    "group_norm",
    "is_functional",
    "per_example_norms",
    "record_losses",
    "warn_once",
]
