"""What a fast-clipping rule hands back per layer call, and the row helpers rules share."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import tensorflow as tf

Strategy = Literal["auto", "grouped", "einsum", "loop", "ghost"]
STRATEGIES = ("auto", "grouped", "einsum", "loop", "ghost")

_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A RuntimeWarning, once per ``key`` in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class FastClipUnsupported(Exception):
    """The model cannot be walked layer by layer (not a Keras functional model)."""


class NoRule(Exception):
    """A rule declines this particular call (unusual arguments): use the fallback."""


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


def scale_rows(t: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
    """t * c broadcast along the batch axis (axis 0)."""
    c = tf.cast(c, t.dtype)
    return t * tf.reshape(c, tf.concat([[-1], tf.ones([tf.rank(t) - 1], tf.int32)], 0))


def sum_sq_rows(t: tf.Tensor) -> tf.Tensor:
    """[B, ...] -> [B]: per-example squared L2 norm."""
    t = tf.cast(t, tf.float32)
    return tf.reduce_sum(tf.square(tf.reshape(t, [tf.shape(t)[0], -1])), axis=1)


def as_rows(t: tf.Tensor, width: int) -> tf.Tensor:
    """[B, ..., width] -> [B, T, width]."""
    return tf.reshape(t, [tf.shape(t)[0], -1, width])


def layer_grad_clipped(
    tape: tf.GradientTape, z: Any, dz: Any, variables: Sequence[tf.Variable]
) -> Callable[[tf.Tensor], list[tuple[tf.Variable, tf.Tensor]]]:
    """Book-keeping clipped sum: the layer's own weight gradient with output grad c_i·dz[i].

    z, dz: the watched output and its gradient (a tensor or a nest of them), batch axis first.
    """

    def clipped(c: tf.Tensor) -> list[tuple[tf.Variable, tf.Tensor]]:
        grads = tape.gradient(
            z,
            list(variables),
            output_gradients=tf.nest.map_structure(lambda t: scale_rows(t, c), dz),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return list(zip(variables, grads, strict=True))

    return clipped


def with_training(layer, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's kwargs with training=True where the layer takes it and it is not given."""
    if getattr(layer, "_expects_training_arg", False) and kwargs.get("training") is None:
        return {**kwargs, "training": True}
    return kwargs
