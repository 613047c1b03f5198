"""What the linear-map rules (conv, dense) share: pre-activation output, the per-layer choice
between ghost norm and explicit per-example gradient, the ghost-norm identity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tff_privseg.privacy.fast_clip.base import NoRule, Strategy


def _pre_activation(layer: tf.keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """The layer's output before its activation (conv/dense + bias)."""
    activation = layer.activation
    layer.activation = None
    try:
        return layer(inputs)
    finally:
        layer.activation = activation


def watched_pre_activation(
    layer: tf.keras.layers.Layer,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    tape: tf.GradientTape,
) -> tuple[tf.Tensor, tf.Tensor]:
    """(x, z) of a one-input call: its input and its pre-activation output, watched by tape."""
    if len(args) != 1 or kwargs:
        raise NoRule
    x = args[0]
    z = _pre_activation(layer, x)
    tape.watch(z)
    return x, z


def activate(layer: tf.keras.layers.Layer, z: tf.Tensor) -> tf.Tensor:
    return layer.activation(z) if layer.activation is not None else z


def _gpu_visible() -> bool:
    try:
        return bool(tf.config.list_logical_devices("GPU"))
    except RuntimeError:
        return False


def onednn() -> bool:
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
    if _gpu_visible() or not onednn():
        return "einsum"
    return "grouped"


def ghost_sq_norm(a: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """‖Σ_t a_t g_tᵀ‖² per example, a [B, T, K], g [B, T, C] -> [B]."""
    aa = tf.matmul(a, a, transpose_b=True)  # [B, T, T]
    gg = tf.matmul(g, g, transpose_b=True)
    return tf.reduce_sum(aa * gg, axis=[1, 2])


def static_positions(t: tf.Tensor) -> int | None:
    """T = the number of output positions of a [B, ..., C] tensor, None if not static."""
    dims = t.shape.as_list()[1:-1]
    if any(d is None for d in dims):
        return None
    n = 1
    for d in dims:
        n *= d
    return n
