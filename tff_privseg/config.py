"""One typed configuration object: TOML in, validated, TOML out.

Every section is a frozen dataclass. Unknown keys and wrong types are rejected with one line
naming the file, the key and the problem (``UserError``), so a typo never silently falls back to
a default.
"""

from __future__ import annotations

import hashlib
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w

from tff_privseg.errors import UserError


@dataclass(frozen=True)
class SynthConfig:
    """How `data synth` (and the demo) builds the embedded synthetic dataset when it is missing."""

    sites: int = 3
    volumes_per_site: int = 10
    seed: int = 0
    shape: tuple[int, int, int] = (96, 96, 48)


@dataclass(frozen=True)
class AugmentConfig:
    """Per-site training augmentation in tf.data (off by default). Ranges are symmetric."""

    rotation: float = 0.0  # degrees
    translate: float = 0.0  # fraction of the image size
    scale: float = 0.0  # fraction, zoom in [1 - scale, 1 + scale]
    noise_std: float = 0.0  # Gaussian noise std on the [0, 1] image
    noise_prob: float = 0.0  # probability a slice gets noise
    # Augmentation multiplicity (De et al. 2022): each sampled slot is seen as this many
    # independently augmented views, and a record's gradient is the mean over its views before
    # it is clipped. Keeps the DP guarantee: the views are a function of the record alone and
    # the clip still bounds the record's whole influence on a step; costs this many times the
    # compute per step. Needs an augmentation above; 1 = off.
    multiplicity: int = 1


@dataclass(frozen=True)
class DataConfig:
    """Where the sites' NIfTI files are and how they become 2D slices."""

    root: str = "data/synth"
    # "synthetic": build the phantom dataset of [data.synth] at `root` when it is missing;
    # "files": `root` must already hold the sites' NIfTI files.
    source: Literal["synthetic", "files"] = "files"
    layout: Literal["auto", "msd", "images_labels", "dicom"] = "auto"
    resolution: int = 64
    hu_window: tuple[float, float] = (-150.0, 200.0)
    # "window": (clip(x) - lo) / (hi - lo), identical for every scan; "minmax": per-volume min-max
    # after clipping, as in the reference study.
    scaling: Literal["window", "minmax"] = "window"
    # "binary": every label value in `foreground_labels` becomes 1; "multiclass": labels kept.
    labels: Literal["binary", "multiclass"] = "binary"
    foreground_labels: tuple[int, ...] = (1, 2)
    num_classes: int = 2
    crop_slices: int = 32  # slices kept along z around the label's centre; 0 keeps all
    test_fraction: float = 0.3
    val_fraction: float = 0.1
    split_seed: int = 42
    cache_dir: str = ""  # preprocessed-slice cache; "" = <root>/.cache
    # Structure name -> label value, for DICOM RTSTRUCT ROIs, DICOM-SEG segments and .seg.nrrd
    # segments ({"GTV-1" = 1, "Liver" = 1}); names compare case-insensitively, unnamed
    # structures are left out. Required for RTSTRUCT; empty keeps a SEG's segment numbers.
    roi_labels: dict[str, int] = field(default_factory=dict)
    synth: SynthConfig = field(default_factory=SynthConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class ModelConfig:
    name: Literal["unet", "monet"] = "unet"
    depth: int = 3
    base_filters: int = 16
    groups: int = 8  # GroupNormalization groups (capped by channel count)
    dropout: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    mode: Literal["federated", "centralized"] = "federated"
    # "tff": client updates run inside TFF's runtime (CPU-only worker binary); "hybrid": each
    # site's update runs in the Python TF runtime (its GPU if present), aggregation stays in TFF.
    execution: Literal["tff", "hybrid"] = "tff"
    rounds: int = 10
    local_steps: int = 10  # local batches per site and round (ignored when local_epochs > 0)
    local_epochs: int = 0
    batch_size: int = 8  # expected batch size; Poisson rate q = batch_size / site size under DP
    loss: Literal["dice", "dice_ce"] = "dice"
    client_optimizer: Literal["sgd", "adam"] = "adam"
    client_lr: float = 1e-3
    # Client learning rate schedule over rounds: "constant", or "loglinear" from client_lr at
    # round 1 to end_lr at the last round (the reference study's schedule).
    lr_schedule: Literal["constant", "loglinear"] = "constant"
    end_lr: float = 1e-4
    beta1: float = 0.9  # Adam
    beta2: float = 0.999  # Adam
    weight_decay: float = 0.0  # decoupled (AdamW-style) weight decay of the client optimizer
    server_optimizer: Literal["sgd", "adam"] = "sgd"
    server_lr: float = 1.0
    sites_per_round: int = 0  # 0 = all sites every round
    weighting: Literal["uniform", "examples"] = "uniform"
    seed: int = 0
    # EMA (Polyak) averaging of the released global models over rounds: the evaluated and saved
    # model is ema_r = decay * ema_{r-1} + (1 - decay) * w_r (ema_1 = w_1). Keeps the DP
    # guarantee: post-processing of models already released; training itself is unchanged.
    # 0 = off (the last global model).
    ema_decay: float = 0.0
    # Initial weights instead of the seeded initialisation: a run directory (its
    # model.weights.h5) or a .weights.h5 file of the same architecture, trained on public data
    # only. The DP guarantee treats this model as public: it does not cover what the model
    # learned from its own training data. "" = seeded initialisation (train.seed).
    init_from: str = ""


@dataclass(frozen=True)
class PrivacyConfig:
    level: Literal["sample", "site", "none"] = "sample"
    noise_multiplier: float = 1.0
    l2_norm_clip: float = 1.0
    delta: float = 1e-5
    accountant: Literal["rdp", "pld"] = "rdp"
    target_epsilon: float = 0.0  # 0 = no budget; else stop before a round that would exceed it
    clipping: Literal["fixed", "adaptive"] = "fixed"  # site level only
    target_quantile: float = 0.5  # adaptive clipping
    clip_learning_rate: float = 0.2  # adaptive clipping
    clipped_count_stddev: float = 0.0  # adaptive clipping; 0 = max(sites_per_round / 20, σ)
    secure_aggregation: bool = False
    # The privacy unit of sample-level DP: one slice, or one patient (all of its slices).
    unit: Literal["slice", "patient"] = "slice"
    slices_per_patient: int = 8  # patient unit: cap on slices drawn per patient and step


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def replace(self, **sections: Any) -> Config:
        """A copy with sections or dotted keys replaced: ``replace(**{"train.rounds": 3})``."""
        return from_dict(_merge(to_dict(self), _undot(sections)), source="<override>")

    def digest(self) -> str:
        """Short stable hash of the resolved config (names runs, exports, caches)."""
        return hashlib.sha256(dumps(self).encode()).hexdigest()[:12]


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a dict; missing or malformed: one line naming the file."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} not found", path) from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"not valid TOML ({e})", path) from None


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a TOML config. ``overrides`` uses dotted keys (``train.rounds``)."""
    path = Path(path)
    raw = read_toml(path)
    if overrides:
        raw = _merge(raw, _undot(overrides))
    return from_dict(raw, source=str(path))


def from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    cfg = _build(Config, raw, source, prefix="")
    validate(cfg, source)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def dumps(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg))


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dumps(cfg))


MAX_INT = 2**53  # any integer or float setting beyond this is a typo (and float-exact below it)
_SEED = (0, 2**31 - 1)  # TF and NumPy seeds alike
# Plain bounds, checked first: an absurd value fails here with one line, not deep inside
# NumPy (OverflowError), the accountant (hours of work) or memory. Tuples: every element.
_RANGES: dict[str, tuple[float, float]] = {
    "data.resolution": (8, 4096),
    "data.foreground_labels": (0, 2**31 - 1),
    "data.num_classes": (1, 256),
    "data.crop_slices": (0, 100_000),
    "data.split_seed": _SEED,
    "data.synth.sites": (1, 500),
    "data.synth.volumes_per_site": (1, 100_000),
    "data.synth.seed": _SEED,
    "data.synth.shape": (8, 2048),
    "data.augment.rotation": (0, 180),
    "data.augment.translate": (0, 1),
    "data.augment.scale": (0, 0.99),
    "data.augment.noise_std": (0, 10),
    "data.augment.noise_prob": (0, 1),
    "data.augment.multiplicity": (1, 64),
    "model.depth": (1, 8),
    "model.base_filters": (1, 4096),
    "model.groups": (1, 4096),
    "model.dropout": (0, 0.99),
    "train.rounds": (1, 1_000_000),
    "train.local_steps": (0, 1_000_000),
    "train.local_epochs": (0, 10_000),
    "train.batch_size": (1, 1_000_000),
    "train.beta1": (0, 0.999999),
    "train.beta2": (0, 0.999999),
    "train.weight_decay": (0, 1),
    "train.sites_per_round": (0, 100_000),
    "train.seed": _SEED,
    "train.ema_decay": (0, 0.999999),
    "privacy.noise_multiplier": (0, 1e6),
    "privacy.l2_norm_clip": (0, 1e6),
    "privacy.target_epsilon": (0, 1e6),
    "privacy.clip_learning_rate": (0, 1e3),
    "privacy.clipped_count_stddev": (0, 1e6),
    "privacy.slices_per_patient": (1, 100_000),
}


def validate(cfg: Config, source: str) -> None:
    """Cross-field checks that types alone cannot express."""

    def bad(key: str, why: str) -> None:
        raise UserError(f"{key}: {why}", source)

    d, t, p = cfg.data, cfg.train, cfg.privacy
    for key, (lo, hi) in _RANGES.items():
        section, *rest = key.split(".")
        value = getattr(cfg, section)
        for part in rest:
            value = getattr(value, part)
        for v in value if isinstance(value, tuple) else (value,):
            if not lo <= v <= hi:
                bad(key, f"must be in [{_num(lo)}, {_num(hi)}], got {_short(v)}")
    if d.resolution < 8 or d.resolution % 2**cfg.model.depth:
        bad(
            "data.resolution",
            f"must be >= 8 and divisible by 2**model.depth = {2**cfg.model.depth}",
        )
    if d.hu_window[0] >= d.hu_window[1]:
        bad("data.hu_window", "lower bound must be below the upper bound")
    if not (0 <= d.test_fraction < 1 and 0 <= d.val_fraction < 1):
        bad("data.test_fraction/val_fraction", "must be in [0, 1)")
    if d.labels == "multiclass" and d.num_classes < 2:
        bad("data.num_classes", "multiclass needs at least 2 classes")
    if d.crop_slices < 0:
        bad("data.crop_slices", "must be >= 0")
    seen_names: set[str] = set()
    for name, value in d.roi_labels.items():
        key = f"data.roi_labels.{name!r}"
        if not name.strip():
            bad("data.roi_labels", "structure names must not be empty")
        if name.strip().lower() in seen_names:
            bad(key, "listed twice (names compare case-insensitively)")
        seen_names.add(name.strip().lower())
        if d.labels == "binary" and value not in d.foreground_labels:
            bad(key, f"label {value} is not in data.foreground_labels, so it would be background")
        if d.labels == "multiclass" and not 1 <= value < d.num_classes:
            bad(key, f"label {value} must be in [1, data.num_classes - 1 = {d.num_classes - 1}]")
    for key in ("rounds", "batch_size"):
        if getattr(t, key) < 1:
            bad(f"train.{key}", "must be >= 1")
    if d.augment.multiplicity > 1 and not _augments(d.augment):
        bad("data.augment.multiplicity", "needs an augmentation (identical views add nothing)")
    if t.local_steps < 1 and t.local_epochs < 1:
        bad("train.local_steps", "must be >= 1 (or set train.local_epochs)")
    if t.client_lr <= 0 or t.server_lr <= 0:
        bad("train.client_lr/server_lr", "must be > 0")
    if cfg.model.depth < 1 or cfg.model.base_filters < 1:
        bad("model.depth/base_filters", "must be >= 1")
    if p.level != "none":
        if p.noise_multiplier <= 0:
            bad("privacy.noise_multiplier", "must be > 0 with privacy on")
        if p.l2_norm_clip <= 0:
            bad("privacy.l2_norm_clip", "must be > 0")
        if not 0 < p.delta < 1:
            bad("privacy.delta", "must be in (0, 1)")
        if t.weighting == "examples":
            # A site's example count changes by one when one record is added or removed, so
            # publishing it as an aggregation weight is not covered by the DP guarantee.
            bad("train.weighting", "'examples' leaks site sizes; use 'uniform' with privacy on")
        if t.mode == "centralized":
            bad(
                "train.mode",
                "centralized training is the non-private upper bound: privacy.level must be 'none'",
            )
    if p.level == "sample" and t.local_epochs > 0:
        bad(
            "train.local_epochs",
            "sample-level DP draws Poisson batches: set train.local_steps instead",
        )
    if t.weight_decay > 0 and t.client_optimizer != "adam":
        bad("train.weight_decay", "is applied by AdamW: set train.client_optimizer = 'adam'")
    if t.lr_schedule == "loglinear" and t.end_lr <= 0:
        bad("train.end_lr", "must be > 0 for the log-linear schedule")
    if p.unit == "patient" and p.level == "site":
        bad(
            "privacy.unit", "'patient' applies to sample-level DP (site level protects whole sites)"
        )
    if p.slices_per_patient < 1:
        bad("privacy.slices_per_patient", "must be >= 1")
    if p.target_epsilon < 0:
        bad("privacy.target_epsilon", "must be >= 0")
    if p.clipping == "adaptive" and not 0 < p.target_quantile < 1:
        bad("privacy.target_quantile", "must be in (0, 1)")


def _augments(a: AugmentConfig) -> bool:
    return any((a.rotation, a.translate, a.scale, a.noise_std and a.noise_prob))


# --------------------------------------------------------------------------------------------
# Strict dataclass construction from TOML dicts.


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a table", source)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise UserError(
                f"unknown key '{prefix}{key}' (known: {', '.join(sorted(known))})", source
            )
    kwargs = {}
    for f in fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(hints[f.name], raw[f.name], source, prefix + f.name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    if is_dataclass(hint):
        return _build(hint, value, source, key + ".")
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(a) for a in typing.get_args(hint))
            raise UserError(f"{key}: {value!r} is not one of {choices}", source)
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a table of name = value", source)
        if len(value) > 10_000:
            raise UserError(f"{key}: at most 10000 entries", source)
        return {
            _coerce(key_type, k, source, key): _coerce(value_type, v, source, f"{key}.{k}")
            for k, v in value.items()
        }
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise UserError(f"{key}: expected a list, got {type(value).__name__}", source)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, source, key) for v in value)
        if len(value) != len(args):
            raise UserError(f"{key}: expected {len(args)} values, got {len(value)}", source)
        return tuple(_coerce(a, v, source, key) for a, v in zip(args, value, strict=True))
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true/false, got {value!r}", source)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {_short(value)}", source)
        if not -MAX_INT <= value <= MAX_INT:  # TOML integers are 64-bit; ours are far smaller
            raise UserError(f"{key}: {_short(value)} is out of range", source)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{key}: expected a number, got {_short(value)}", source)
        # No setting has a meaning for NaN or infinity (an unbounded budget is 0, not inf):
        # NaN passes every `<`/`>` check below and spun the privacy accountant forever.
        if not -MAX_INT <= value <= MAX_INT:  # (false for NaN too)
            raise UserError(f"{key}: must be a finite number, got {_short(value)}", source)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}", source)
        return value
    if isinstance(hint, types.UnionType):  # pragma: no cover - not used yet
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _undot(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = to_dict(value) if is_dataclass(value) else value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def default() -> Config:
    return Config()


__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "PrivacyConfig",
    "SynthConfig",
    "TrainConfig",
    "default",
    "dumps",
    "from_dict",
    "load",
    "save",
    "to_dict",
]
