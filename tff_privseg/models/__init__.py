"""Segmentation models: GroupNorm U-Net and MoNet, as uncompiled Keras functional models.

Both output probabilities in float32: one sigmoid channel for binary segmentation
(``num_classes == 2``), ``num_classes`` softmax channels otherwise. No BatchNorm anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

from tff_privseg.config import Config, ModelConfig
from tff_privseg.models._layers import META_ATTR, group_count
from tff_privseg.models.group_norm import GroupNorm
from tff_privseg.models.monet import monet
from tff_privseg.models.unet import unet

BUILDERS = {"unet": unet, "monet": monet}

# The project's own Keras layers, by their registered names. Passed explicitly when loading so
# that a `.keras` file loads in a process that never imported this package's layer modules.
CUSTOM_OBJECTS = {"tff_privseg>GroupNorm": GroupNorm}


def build_model(
    model_cfg: ModelConfig,
    resolution: int,
    num_classes: int = 2,
    seed: int | None = None,
) -> tf.keras.Model:
    """Build the model named by ``model_cfg.name`` (uncompiled, functional).

    ``depth``, ``base_filters``, ``groups`` and ``dropout`` come from the config for both models.
    The reference study's MoNet is ``name="monet", depth=2, base_filters=16, groups=32,
    dropout=0.2``; the ``ModelConfig`` defaults (depth 3, groups 8, dropout 0) are U-Net settings.

    With a ``seed``, two builds have identical weights (seeded initialisers, no global state).
    The model's ``name`` is the architecture name and ``model_meta(model)`` returns the build
    arguments.
    """
    try:
        builder = BUILDERS[model_cfg.name]
    except KeyError:
        raise ValueError(
            f"unknown model {model_cfg.name!r} (known: {', '.join(sorted(BUILDERS))})"
        ) from None
    return builder(
        resolution=resolution,
        depth=model_cfg.depth,
        base_filters=model_cfg.base_filters,
        groups=model_cfg.groups,
        dropout=model_cfg.dropout,
        num_classes=num_classes,
        seed=seed,
    )


def training_model_fn(cfg: Config) -> Callable[[], tf.keras.Model]:
    """The training's model_fn: the seeded build (round 0 = the process's initial weights)."""

    def model_fn() -> tf.keras.Model:
        return build_model(
            cfg.model, cfg.data.resolution, cfg.data.num_classes, seed=cfg.train.seed
        )

    return model_fn


def model_meta(model: tf.keras.Model) -> dict:
    """Build arguments recorded by the builders (``{"name": model.name}`` if none were)."""
    raw = getattr(model, META_ATTR, None)
    return json.loads(raw) if isinstance(raw, str) else {"name": model.name}


def load_model(path: str | Path) -> tf.keras.Model:
    """A `.keras` file saved from one of these models -> uncompiled Keras model."""
    return tf.keras.models.load_model(path, custom_objects=CUSTOM_OBJECTS, compile=False)


def count_params(model: tf.keras.Model) -> int:
    """Number of trainable parameters."""
    return int(sum(int(tf.size(v)) for v in model.trainable_variables))


__all__ = [
    "BUILDERS",
    "CUSTOM_OBJECTS",
    "build_model",
    "count_params",
    "group_count",
    "load_model",
    "model_meta",
    "monet",
    "unet",
]
