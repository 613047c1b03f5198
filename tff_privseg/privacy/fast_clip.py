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
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import tensorflow as tf

from tff_privseg.losses import LossFn
from tff_privseg.models.group_norm import GroupNorm, affine, fast_path, group_norm_parts

Strategy = Literal["auto", "grouped", "einsum", "loop", "ghost"]
STRATEGIES = ("auto", "grouped", "einsum", "loop", "ghost")

_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class FastClipUnsupported(Exception):
    """The model cannot be walked layer by layer (not a Keras functional model)."""


# --------------------------------------------------------------------------------------------
# What a rule hands back per layer call
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoopJob:
    """One per-example gradient computed inside the shared per-example loop.

    ``fn(*[t[i] for t in elems])`` returns the gradient of example i for ``variable``.
    """

    variable: tf.Variable
    elems: tuple[tf.Tensor, ...]
    fn: Callable[..., tf.Tensor]


@dataclasses.dataclass
class Contribution:
    """A layer call's share of the per-example norms and of the clipped sum.

    per_example: explicit per-example gradients [B, *var.shape];
    loop: per-example gradients still to compute in the shared loop;
    sq_norm: [B] squared norms of ghost-clipped variables (not in per_example/loop);
    clipped: c [B] -> [(variable, Σ_i c_i g_i)] for those ghost-clipped variables.
    """

    per_example: list[tuple[tf.Variable, tf.Tensor]] = dataclasses.field(default_factory=list)
    loop: list[LoopJob] = dataclasses.field(default_factory=list)
    sq_norm: tf.Tensor | None = None
    clipped: Callable[[tf.Tensor], list[tuple[tf.Variable, tf.Tensor]]] | None = None


class Record:
    """What a rule's forward recorded; `contribute` runs once dz (gradient of z) is known."""

    z: Any  # tensor (or nest) watched by the tape

    def contribute(self, dz: Any, tape: tf.GradientTape) -> Contribution:
        raise NotImplementedError


class Rule:
    """A per-layer-class rule. ``explicit_only`` is set for layers used at several nodes."""

    supports_explicit = True

    def forward(
        self,
        layer: tf.keras.layers.Layer,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        tape: tf.GradientTape,
        strategy: Strategy,
        explicit_only: bool,
    ) -> tuple[Any, Record]:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _scale_rows(t: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
    """t * c broadcast along the batch axis (axis 0)."""
    c = tf.cast(c, t.dtype)
    return t * tf.reshape(c, tf.concat([[-1], tf.ones([tf.rank(t) - 1], tf.int32)], 0))


def _sum_sq_rows(t: tf.Tensor) -> tf.Tensor:
    """[B, ...] -> [B]: per-example squared L2 norm."""
    t = tf.cast(t, tf.float32)
    return tf.reduce_sum(tf.square(tf.reshape(t, [tf.shape(t)[0], -1])), axis=1)


def _pre_activation(layer: tf.keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """The layer's output before its activation (conv/dense + bias)."""
    activation = layer.activation
    layer.activation = None
    try:
        return layer(inputs)
    finally:
        layer.activation = activation


def _activate(layer: tf.keras.layers.Layer, z: tf.Tensor) -> tf.Tensor:
    return layer.activation(z) if layer.activation is not None else z


def _gpu_visible() -> bool:
    try:
        return bool(tf.config.list_logical_devices("GPU"))
    except RuntimeError:
        return False


def _onednn() -> bool:
    """oneDNN's CPU Conv2DBackpropFilter supports dilations; TF's Eigen kernel does not."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # pragma: no cover - other builds
        return False


def choose(strategy: Strategy, positions: int | None, k: int, c: int) -> str:
    """Resolve ``auto`` for a linear map with T=positions, K inputs and C outputs per position.

    Ghost norm costs T²(K+C) per example, the explicit gradient T·K·C ("mixed" clipping).
    """
    if strategy != "auto":
        return strategy
    if positions is not None and positions * (k + c) < k * c:
        return "ghost"
    if _gpu_visible() or not _onednn():
        return "einsum"
    return "grouped"


def _ghost_sq_norm(a: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """‖Σ_t a_t g_tᵀ‖² per example, a [B, T, K], g [B, T, C] -> [B]."""
    aa = tf.matmul(a, a, transpose_b=True)  # [B, T, T]
    gg = tf.matmul(g, g, transpose_b=True)
    return tf.reduce_sum(aa * gg, axis=[1, 2])


def _rows(t: tf.Tensor, width: int) -> tf.Tensor:
    """[B, ..., width] -> [B, T, width]."""
    return tf.reshape(t, [tf.shape(t)[0], -1, width])


def _static_positions(t: tf.Tensor) -> int | None:
    dims = t.shape.as_list()[1:-1]
    if any(d is None for d in dims):
        return None
    n = 1
    for d in dims:
        n *= d
    return n


def _layer_grad_clipped(
    tape: tf.GradientTape, z: tf.Tensor, dz: tf.Tensor, variables: Sequence[tf.Variable]
) -> Callable[[tf.Tensor], list[tuple[tf.Variable, tf.Tensor]]]:
    """Book-keeping clipped sum: the layer's own weight gradient with output grad c_i·dz[i]."""

    def clipped(c: tf.Tensor) -> list[tuple[tf.Variable, tf.Tensor]]:
        grads = tape.gradient(
            z,
            list(variables),
            output_gradients=_scale_rows(dz, c),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return list(zip(variables, grads, strict=True))

    return clipped


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


class _ConvRecord(Record):
    def __init__(self, layer, x, z, strategy, transpose):
        self.layer, self.x, self.z, self.strategy, self.transpose = layer, x, z, strategy, transpose

    def _params(self):
        layer = self.layer
        pad = layer.padding.upper()
        strides = [1, *layer.strides, 1]
        dil = [1, *layer.dilation_rate, 1]
        return pad, strides, dil

    def _patches_and_rows(self, dz):
        """(A [B,T,K], G [B,T,C]) with K ordered like the kernel's leading axes."""
        layer = self.layer
        pad, strides, dil = self._params()
        kh, kw = layer.kernel_size
        if self.transpose:
            # y = conv_transpose(x, W) is the adjoint of conv(., W): dW = Σ patches(dy) ⊗ x.
            src, other = dz, self.x
        else:
            src, other = self.x, dz
        patches = tf.image.extract_patches(src, [1, kh, kw, 1], strides, dil, pad)
        k = kh * kw * int(src.shape[-1])
        return _rows(patches, k), _rows(tf.cast(other, patches.dtype), int(other.shape[-1]))

    def contribute(self, dz: tf.Tensor, tape: tf.GradientTape) -> Contribution:
        layer = self.layer
        kernel = layer.kernel
        out = Contribution()
        bias = layer.bias if layer.use_bias else None
        if self.strategy == "ghost":
            a, g = self._patches_and_rows(dz)
            sq = _ghost_sq_norm(a, g)
            if bias is not None:
                sq += _sum_sq_rows(tf.reduce_sum(_rows(dz, int(dz.shape[-1])), axis=1))
            out.sq_norm = sq
            out.clipped = _layer_grad_clipped(tape, self.z, dz, layer.trainable_variables)
            return out
        if bias is not None:
            out.per_example.append((bias, tf.reduce_sum(_rows(dz, int(dz.shape[-1])), axis=1)))
        if self.strategy == "einsum":
            a, g = self._patches_and_rows(dz)
            # [B, K, C]: (kh, kw, cin) x cout, or (kh, kw, filters) x cin for the transpose,
            # which is the kernel's layout in both cases.
            pe = tf.matmul(a, g, transpose_a=True)
            pe = tf.reshape(pe, tf.concat([[tf.shape(pe)[0]], kernel.shape], 0))
            out.per_example.append((kernel, pe))
            return out
        if self.strategy == "grouped":
            out.per_example.append((kernel, self._grouped(dz)))
            return out
        out.loop.append(LoopJob(kernel, (self.x, dz), self._one_example_fn()))
        return out

    def _grouped(self, dz: tf.Tensor) -> tf.Tensor:
        """Per-example kernel gradients [B, *kernel.shape] from ONE grouped
        Conv2DBackpropFilter: the batch folded into channel groups ([B,H,W,C] -> [1,H,W,B·C]),
        so group b only sees example b. No control flow, no patch copies."""
        layer = self.layer
        pad, strides, dil = self._params()
        kh, kw = layer.kernel_size
        src, other = (dz, self.x) if self.transpose else (self.x, dz)
        other = tf.cast(other, src.dtype)
        c_src, c_other = int(src.shape[-1]), int(other.shape[-1])
        batch = tf.shape(src)[0]

        def fold(t: tf.Tensor) -> tf.Tensor:
            s = tf.shape(t)
            return tf.reshape(tf.transpose(t, [1, 2, 0, 3]), [1, s[1], s[2], -1])

        g = tf.compat.v1.nn.conv2d_backprop_filter(
            fold(src),
            tf.stack([kh, kw, c_src, batch * c_other]),
            fold(other),
            strides,
            pad,
            dilations=dil,
        )
        g = tf.reshape(g, [kh, kw, c_src, batch, c_other])
        return tf.transpose(g, [3, 0, 1, 2, 4])

    def _one_example_fn(self) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
        layer = self.layer
        pad, strides, dil = self._params()
        shape = layer.kernel.shape
        dilated = any(d != 1 for d in layer.dilation_rate)
        transpose = self.transpose

        if not dilated or _onednn():

            def fn(x_i, dz_i):
                x_i, dz_i = x_i[None], tf.cast(dz_i[None], x_i.dtype)
                if transpose:
                    x_i, dz_i = dz_i, x_i
                return tf.compat.v1.nn.conv2d_backprop_filter(
                    x_i, shape, dz_i, strides, pad, dilations=dil
                )

            return fn

        # TF's Eigen CPU kernel has no dilated Conv2DBackpropFilter: differentiate the layer's
        # own (space-to-batch) convolution for one example instead.
        def fn_tape(x_i, dz_i):
            k = tf.convert_to_tensor(layer.kernel)
            with tf.GradientTape() as t:
                t.watch(k)
                if transpose:
                    out_shape = tf.concat([[1], tf.shape(dz_i)], 0)
                    z = tf.nn.conv2d_transpose(x_i[None], k, out_shape, strides, pad, dilations=dil)
                else:
                    z = layer.convolution_op(x_i[None], k)
            return t.gradient(z, k, output_gradients=tf.cast(dz_i[None], z.dtype))

        return fn_tape


class ConvRule(Rule):
    """Conv2D (strides, dilation, 'same'/'valid') and Conv2DTranspose, channels_last, groups 1."""

    def __init__(self, transpose: bool = False):
        self.transpose = transpose

    def supported(self, layer) -> bool:
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return False
        if getattr(layer, "groups", 1) != 1 or layer.padding not in ("same", "valid"):
            return False
        return not (self.transpose and layer.output_padding is not None)

    def forward(self, layer, args, kwargs, tape, strategy, explicit_only):
        if len(args) != 1 or kwargs:
            raise _NoRule
        x = args[0]
        z = _pre_activation(layer, x)
        tape.watch(z)
        kh, kw = layer.kernel_size
        if self.transpose:
            k, c, positions = kh * kw * layer.filters, int(x.shape[-1]), _static_positions(x)
        else:
            k, c, positions = kh * kw * int(x.shape[-1]), layer.filters, _static_positions(z)
        s = choose(strategy, positions, k, c)
        if explicit_only and s == "ghost":
            s = choose("auto", None, k, c)
        return _activate(layer, z), _ConvRecord(layer, x, z, s, self.transpose)


class _DenseRecord(Record):
    def __init__(self, layer, x, z, strategy):
        self.layer, self.x, self.z, self.strategy = layer, x, z, strategy

    def contribute(self, dz, tape):
        layer = self.layer
        k, c = int(self.x.shape[-1]), layer.units
        a, g = _rows(self.x, k), _rows(tf.cast(dz, self.x.dtype), c)
        out = Contribution()
        if self.strategy == "ghost":
            if self.x.shape.rank == 2:  # T = 1: ‖a‖²‖g‖²
                sq = _sum_sq_rows(self.x) * _sum_sq_rows(dz)
            else:
                sq = _ghost_sq_norm(a, g)
            if layer.use_bias:
                sq += _sum_sq_rows(tf.reduce_sum(g, axis=1))
            out.sq_norm = sq
            out.clipped = _layer_grad_clipped(tape, self.z, dz, layer.trainable_variables)
            return out
        out.per_example.append((layer.kernel, tf.matmul(a, g, transpose_a=True)))
        if layer.use_bias:
            out.per_example.append((layer.bias, tf.reduce_sum(g, axis=1)))
        return out


class DenseRule(Rule):
    def supported(self, layer) -> bool:
        return True

    def forward(self, layer, args, kwargs, tape, strategy, explicit_only):
        if len(args) != 1 or kwargs:
            raise _NoRule
        x = args[0]
        z = _pre_activation(layer, x)
        tape.watch(z)
        positions = 1 if x.shape.rank == 2 else _static_positions(x)
        s = choose(strategy, positions, int(x.shape[-1]), layer.units)
        s = "einsum" if (explicit_only or s != "ghost") else "ghost"
        return _activate(layer, z), _DenseRecord(layer, x, z, s)


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
            raise _NoRule
        z, centred, inv = group_norm(layer, args[0])
        tape.watch(z)
        return z, _GroupNormRecord(layer, centred, inv, z)


def group_norm(layer: tf.keras.layers.GroupNormalization, x: tf.Tensor):
    """The layer's output [B, ..., C], the centred input [B, ..., C] and inv [B, 1.., C]."""
    x = tf.cast(x, layer.compute_dtype)
    if not fast_path(layer, x):
        raise _NoRule
    centred, inv = group_norm_parts(x, layer.groups, layer.epsilon)
    return affine(layer, centred, inv), centred, inv


class _TfpRecord(Record):
    def __init__(self, layer, z, sqr_norm_fn):
        self.layer, self.z, self.sqr_norm_fn = layer, z, sqr_norm_fn

    def contribute(self, dz, tape):
        out = Contribution(sq_norm=self.sqr_norm_fn(dz))
        variables = self.layer.trainable_variables

        def clipped(c):
            scaled = tf.nest.map_structure(lambda t: _scale_rows(t, c), dz)
            grads = tape.gradient(
                self.z,
                list(variables),
                output_gradients=scaled,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            return list(zip(variables, grads, strict=True))

        out.clipped = clipped
        return out


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
        outputs = layer(*args, **_with_training(layer, kwargs))
        for t in tf.nest.flatten(outputs):
            tape.watch(t)
        return outputs, _JacobianRecord(layer, outputs)


class _NoRule(Exception):
    """A rule declines this particular call (unusual arguments): use the fallback."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


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
_FALLBACK = JacobianRule()


# --------------------------------------------------------------------------------------------
# The forward walk
# --------------------------------------------------------------------------------------------


def is_functional(model: Any) -> bool:
    return isinstance(model, tf.keras.Model) and all(
        hasattr(model, a)
        for a in ("_nodes_by_depth", "_tensor_usage_count", "_conform_to_reference_input")
    )


def _with_training(layer, kwargs: dict[str, Any]) -> dict[str, Any]:
    if getattr(layer, "_expects_training_arg", False) and kwargs.get("training") is None:
        return {**kwargs, "training": True}
    return kwargs


def _use_counts(model, counts: dict[int, int] | None = None) -> dict[int, int]:
    counts = {} if counts is None else counts
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            if node.is_input:
                continue
            layer = node.layer
            counts[id(layer)] = counts.get(id(layer), 0) + 1
            if is_functional(layer):
                _use_counts(layer, counts)
    return counts


def forward(model: tf.keras.Model, inputs: Any) -> Any:
    """`model(inputs, training=True)` through the same layer-by-layer walk.

    Numerically the Keras call (to float rounding); Keras' own GroupNormalization layers are
    computed as `models.group_norm` does (Keras' call takes masked moments even without a
    mask, 2-3x slower on CPU).
    """
    return _forward(model, inputs, None, None, None, "auto", {})


def _forward(model, inputs, tape, records, registry, strategy, counts, explicit=False):
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
                outputs = _forward(
                    layer, args[0], tape, records, registry, strategy, counts, explicit
                )
            elif records is None:  # plain forward: only GroupNorm replaced
                outputs = _plain_call(layer, args, kwargs)
            elif not layer.trainable_weights:
                outputs = layer(*args, **_with_training(layer, kwargs))
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
        except _NoRule:
            pass
    return layer(*args, **_with_training(layer, kwargs))


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
        except _NoRule:
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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FastClipResult:
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
    counts = _use_counts(model)
    records: list[Record] = []
    tape = tf.GradientTape(persistent=True)
    with tape:
        probs = _forward(model, x, tape, records, registry, strategy, counts, group > 1)
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

    sq_terms = [_sum_sq_rows(g) for _, g in per_example.values()]
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
    "TfpRegistryRule",
    "choose",
    "default_registry",
    "fast_clipped_sum",
    "forward",
    "group_norm",
    "is_functional",
    "per_example_norms",
    "record_losses",
]
