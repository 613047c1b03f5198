"""The PyTorch baseline's INI file -> our TOML config, with every key accounted for.

The baseline (PrivateSegmentation, ``configs/torch/segmentation.ini``) reads sections
``[config]``, ``[augmentation]``, ``[albumentations]``, ``[federated]``, ``[DP]`` and
``[system]`` with ``configparser``. ``convert_ini`` maps each key onto our config and reports
every key with one status:

==============  ===================================================================
mapped          written to our config with the same meaning
approximate     written, but the meaning differs in a way the reason spells out
matched         a feature switched off in the INI that we do not have either: same
ignored         no effect on what is trained here (logging, threads, eval batch...)
unsupported     changes training in the baseline and cannot be reproduced here
unknown         not a key (or section) the baseline reads
==============  ===================================================================

"Not honoured" = ignored + unsupported + unknown: each is listed with its reason, none dropped.

Epochs -> rounds. The baseline averages the sites' models every ``sync_every_n_batch`` = n
local batches (first after batch n + 1, then every n, and once more at the end of each epoch).
One of our rounds is n local batches at every site (``train.local_steps = n``), so::

    batches_per_epoch = ceil(repetitions_dataset * slices_per_site / batch_size)
    rounds = epochs' * ceil(batches_per_epoch / n)   (epochs' = epochs // repetitions_dataset)
    local_steps = min(n, batches_per_epoch)

``slices_per_site`` is the number of training slices of the largest site (the baseline runs
the largest site's number of batches per epoch; smaller sites sit out the rest). It comes from
``--slices-per-site`` or by loading the dataset (``--data``); without it the converter writes one
round per epoch and reports ``epochs`` as approximate.
"""

from __future__ import annotations

import configparser
import copy
import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tff_privseg import config as config_lib
from tff_privseg.config import Config
from tff_privseg.errors import UserError
from tff_privseg.parity.baseline_format import read_text

Status = Literal["mapped", "approximate", "matched", "ignored", "unsupported", "unknown"]
HONOURED: tuple[Status, ...] = ("mapped", "approximate", "matched")
NOT_HONOURED: tuple[Status, ...] = ("ignored", "unsupported", "unknown")

SECTIONS = ("config", "augmentation", "albumentations", "federated", "DP", "system")

# The baseline's default segmentation settings (its segmentation.ini and the fallbacks of its
# `Arguments`), used for keys an INI leaves out. Sections as in the INI.
BASELINE_DEFAULTS: dict[str, dict[str, str]] = {
    "config": {
        "binary_segmentation": "yes",
        "batch_size": "32",
        "train_resolution": "256",
        "validation_split": "10",
        "epochs": "50",
        "lr": "1e-3",
        "restarts": "0",
        "beta1": "0.9",
        "beta2": "0.999",
        "weight_decay": "0",
        "seed": "1",
        "optimizer": "Adam",
        "model": "MoNet",
    },
    "augmentation": {"rotation": "0", "translate": "0", "scale": "0"},
    "albumentations": {"noise_std": "0", "noise_prob": "0"},
    "federated": {"sync_every_n_batch": "1", "weighted_averaging": "no"},
    "DP": {
        "differentially_private": "no",
        "noise_multiplier": "0.38",
        "max_grad_norm": "1.2",
        "target_delta": "1e-5",
        "microbatch_size": "1",
    },
}

# What the INI does not say: the study's data and model, on the MSD Task03_Liver layout.
BASELINE_PRESET: dict[str, Any] = {
    "data": {
        "root": "data/msd_liver",
        "source": "files",
        "layout": "msd",
        "hu_window": [-150.0, 200.0],
        "scaling": "minmax",
        "labels": "binary",
        "foreground_labels": [1, 2],
        "num_classes": 2,
        "crop_slices": 32,
        "test_fraction": 0.3,
        "split_seed": 42,
    },
    "model": {"name": "monet", "depth": 2, "base_filters": 16, "groups": 32, "dropout": 0.2},
    "train": {
        "mode": "federated",
        "loss": "dice",
        "server_optimizer": "sgd",
        "server_lr": 1.0,
        "sites_per_round": 0,
    },
    "privacy": {"accountant": "rdp", "unit": "slice"},
}

UNET_PRESET = {"name": "unet", "depth": 3, "base_filters": 16, "groups": 8, "dropout": 0.0}

# Every key the baseline reads, per section (the rest are reported as unknown).
KNOWN_KEYS: dict[str, frozenset[str]] = {
    "config": frozenset(
        "binary_segmentation batch_size train_resolution inference_resolution test_batch_size "
        "test_interval validation_split epochs lr end_lr restarts beta1 beta2 weight_decay "
        "momentum deterministic seed log_interval optimizer model pretrained weight_classes "
        "pooling_type differentially_private".split()
    ),
    "augmentation": frozenset(
        "rotation translate scale shear mixup mixup_prob mixup_lambda vertical_flip_prob "
        "noise_std noise_prob".split()
    ),
    "albumentations": frozenset(
        "noise_std noise_prob overall_prob individual_probs clahe randomgamma randombrightness "
        "blur elastic optical_distortion grid_distortion grid_shuffle hsv invert cutout shadow "
        "fog sun_flare solarize equalize grid_dropout".split()
    ),
    "federated": frozenset(
        "sync_every_n_batch wait_interval keep_optim_dict weighted_averaging "
        "repetitions_dataset precision_fractional".split()
    ),
    "DP": frozenset(
        "differentially_private noise_multiplier max_grad_norm target_delta dp_stats_exchange "
        "dp_sse_epsilon microbatch_size".split()
    ),
    "system": frozenset({"num_threads"}),
}

ALBUMENTATIONS = {
    "clahe": "contrast-limited adaptive histogram equalisation (CLAHE)",
    "randomgamma": "random gamma",
    "randombrightness": "random brightness",
    "blur": "blur",
    "elastic": "elastic deformation",
    "optical_distortion": "optical distortion",
    "grid_distortion": "grid distortion",
    "grid_shuffle": "grid shuffle",
    "hsv": "hue/saturation/value shifts",
    "invert": "image inversion",
    "cutout": "cutout",
    "shadow": "random shadows",
    "fog": "random fog",
    "sun_flare": "random sun flare",
    "solarize": "solarisation",
    "equalize": "histogram equalisation",
    "grid_dropout": "grid dropout",
}


@dataclass(frozen=True)
class KeyReport:
    """What became of one INI key."""

    section: str
    key: str
    value: str
    status: Status
    target: str  # our dotted key(s), "" when nothing is written
    reason: str

    def line(self) -> str:
        arrow = f" -> {self.target}" if self.target else ""
        return f"[{self.section}] {self.key} = {self.value}{arrow}: {self.status}: {self.reason}"


@dataclass
class Conversion:
    """The converted config and the full account of the INI's keys."""

    source: str
    source_sha256: str
    config: Config
    keys: list[KeyReport]
    defaults: list[str] = field(default_factory=list)  # keys absent from the INI
    notes: list[str] = field(default_factory=list)
    schedule: dict[str, Any] = field(default_factory=dict)

    def by_status(self, *statuses: Status) -> list[KeyReport]:
        return [k for k in self.keys if k.status in statuses]

    @property
    def not_honoured(self) -> list[KeyReport]:
        return self.by_status(*NOT_HONOURED)

    @property
    def blocking(self) -> list[KeyReport]:
        """What ``--strict`` refuses: settings the baseline uses that we cannot reproduce."""
        return self.by_status("unsupported", "unknown")

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (*HONOURED, *NOT_HONOURED)}
        for k in self.keys:
            out[k.status] += 1
        return out

    def toml(self) -> str:
        """The config as TOML, with a comment header that carries the report."""
        lines = [
            f"# Converted by `tff-privseg config from-ini` from {Path(self.source).name} "
            f"(sha256 {self.source_sha256[:12]}).",
        ]
        s = self.schedule
        lines.append(f"# {s.get('explanation', '')}")
        for title, statuses in (
            ("Not honoured", NOT_HONOURED),
            ("Approximations", ("approximate",)),
        ):
            found = self.by_status(*statuses)
            if found:
                lines.append(f"# {title} ({len(found)}):")
                lines += [f"#   {k.line()}" for k in found]
        if self.defaults:
            lines.append("# Absent from the INI (the baseline's defaults were used):")
            lines += [f"#   {d}" for d in self.defaults]
        if self.notes:
            lines.append("# Notes:")
            lines += [f"#   - {n}" for n in self.notes]
        return "\n".join(lines) + "\n\n" + config_lib.dumps(self.config)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_sha256": self.source_sha256,
            "digest": self.config.digest(),
            "config": config_lib.to_dict(self.config),
            "keys": [asdict(k) for k in self.keys],
            "not_honoured": [asdict(k) for k in self.not_honoured],
            "counts": self.counts(),
            "defaults": self.defaults,
            "notes": self.notes,
            "schedule": self.schedule,
        }


# --------------------------------------------------------------------------------------------


def read_ini(path: str | Path) -> dict[str, dict[str, str]]:
    """Sections -> keys -> raw values, as the baseline's configparser sees them.

    Section names are matched to the baseline's case-insensitively (``[dp]`` is ``[DP]``);
    inline comments after ``;`` or ``#`` are dropped (the baseline's documentation writes them).
    A ``[DEFAULT]`` section is kept as an ordinary (unknown) section rather than copied into all.
    """
    path = Path(path)
    parser = configparser.ConfigParser(
        inline_comment_prefixes=(";", "#"),
        default_section="\x00no-default\x00",
        interpolation=None,
        strict=False,
    )
    text = read_text(path, "INI file not found")
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"not a valid INI file ({first})", path) from None
    canonical = {s.lower(): s for s in SECTIONS}
    out: dict[str, dict[str, str]] = {}
    for section in parser.sections():
        name = canonical.get(section.strip().lower(), section.strip())
        out.setdefault(name, {}).update(
            {k.strip(): v.strip() for k, v in parser.items(section, raw=True)}
        )
    return out


class _Values:
    """Typed access to the INI's values (or the baseline's defaults), with one-line errors."""

    def __init__(self, ini: dict[str, dict[str, str]], source: str) -> None:
        self.ini, self.source = ini, source
        self.used_defaults: list[tuple[str, str]] = []

    def present(self, section: str, key: str) -> bool:
        return self.ini.get(section, {}).get(key, "") != ""

    def raw(self, section: str, key: str, default: str | None = None) -> str | None:
        value = self.ini.get(section, {}).get(key, "")
        if value != "":
            return value
        if key in BASELINE_DEFAULTS.get(section, {}):
            if (section, key) not in self.used_defaults:
                self.used_defaults.append((section, key))
            return BASELINE_DEFAULTS[section][key]
        return default

    def bad(self, section: str, key: str, what: str) -> UserError:
        value = self.ini.get(section, {}).get(key, "")
        return UserError(f"[{section}] {key} = {value!r}: expected {what}", self.source)

    def boolean(self, section: str, key: str, default: str | None = None) -> bool:
        value = self.raw(section, key, default)
        states = configparser.ConfigParser.BOOLEAN_STATES
        if value is None or value.lower() not in states:
            raise self.bad(section, key, "yes/no (or true/false, on/off, 1/0)")
        return states[value.lower()]

    def number(self, section: str, key: str, default: str | None = None) -> float:
        value = self.raw(section, key, default)
        try:
            out = float(value) if value is not None else math.nan
        except ValueError:
            raise self.bad(section, key, "a number") from None
        if not math.isfinite(out):
            raise self.bad(section, key, "a finite number")
        return out

    def integer(self, section: str, key: str, default: str | None = None) -> int:
        value = self.number(section, key, default)
        if value != int(value):
            raise self.bad(section, key, "an integer")
        return int(value)


@dataclass
class _Run:
    """One conversion in progress: the INI, the config dict written, the reports and notes, and
    the values that other keys depend on (set by the rules and handlers as they go)."""

    ini: dict[str, dict[str, str]]
    v: _Values
    out: dict[str, Any]
    slices_per_site: int | None
    augment: bool
    reports: dict[tuple[str, str], KeyReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    aug: dict[str, float] = field(default_factory=dict)  # data.augment, written at the end
    schedule: dict[str, Any] = field(default_factory=dict)
    dp_section: str = "DP"
    dp: bool = False
    optimizer: str = "Adam"
    binary: bool = True
    keep_optim: bool = False
    resolution: int = 0
    batch: int = 0
    sync: int = 1
    repetitions: int = 1
    mixup: bool = False

    @property
    def inactive(self) -> str:
        return "" if self.dp else " (inactive: DP is off)"

    def put(self, dotted: str, value: Any) -> None:
        node = self.out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def report(self, section: str, key: str, status: Status, reason: str, target: str = "") -> None:
        if not self.v.present(section, key):
            return  # absent keys are listed under `defaults`, not as INI keys
        value = self.ini[section][key]
        self.reports[(section, key)] = KeyReport(section, key, value, status, target, reason)


Outcome = tuple[Status, str] | tuple[Status, str, str]  # status, reason[, target named]
Verdict = Callable[[Any, _Run], Outcome]


@dataclass(frozen=True)
class Rule:
    """How one INI key is read, checked, written to our config and reported.

    ``read`` parses the value (the baseline's default, else ``fallback``, when absent; nothing
    at all when ``only_present``); a value failing ``valid`` is the error "expected
    ``expected``"; ``target`` receives ``convert(value)``; ``keep`` names the ``_Run`` field
    that keeps the value for coupled keys; ``verdict(value, run)`` gives the status, the
    reason and, when it differs from ``target``, the target the report names.
    """

    section: str
    key: str
    verdict: Verdict
    read: Literal["boolean", "number", "integer"] | None = None
    fallback: str | None = None
    only_present: bool = False
    valid: Callable[[Any], bool] | None = None
    expected: str = ""
    target: str = ""
    convert: Callable[[Any], Any] | None = None
    keep: str = ""

    def __call__(self, run: _Run) -> None:
        sec, key = self.section, self.key
        if self.only_present and not run.v.present(sec, key):
            return
        value = getattr(run.v, self.read)(sec, key, self.fallback) if self.read else None
        if self.valid is not None and not self.valid(value):
            raise run.v.bad(sec, key, self.expected)
        if self.keep:
            setattr(run, self.keep, value)
        if self.target:
            run.put(self.target, self.convert(value) if self.convert else value)
        status, reason, *named = self.verdict(value, run)
        run.report(sec, key, status, reason, named[0] if named else self.target)


def fixed(status: Status, reason: str, *target: str) -> Verdict:
    """The same report whatever the value (naming ``target`` instead of the rule's, if given)."""
    return lambda _value, _run: (status, reason, *target)


def when(test: Callable[[Any, _Run], bool], yes: Outcome, no: Outcome) -> Verdict:
    """One report or the other, by ``test(value, run)``."""
    return lambda value, run: yes if test(value, run) else no


def unless(usual: Any, outcome: Outcome, otherwise: Callable[[Any], Outcome]) -> Verdict:
    """``outcome`` for the ``usual`` value, ``otherwise(value)`` for any other."""
    return lambda value, _run: outcome if value == usual else otherwise(value)


def on_off(on: Outcome, off: Outcome) -> Verdict:
    return when(lambda value, _run: value, on, off)


def feature(what: str, why_unsupported: str) -> Verdict:
    """An on/off feature we do not have: off -> matched, on -> unsupported."""
    return on_off(
        ("unsupported", f"{what}: {why_unsupported}"),
        ("matched", f"{what} is off; not available here either"),
    )


def ignored(section: str, key: str, reason: str) -> Rule:
    """A key that changes nothing here; its value is not even parsed."""
    return Rule(section, key, fixed("ignored", reason))


def switch(section: str, key: str, verdict: Verdict) -> Rule:
    """A yes/no key, reported only when the INI sets it."""
    return Rule(section, key, verdict, read="boolean", only_present=True)


def positive(section: str, key: str, above: Outcome, otherwise: Outcome) -> Rule:
    """A number whose report depends on whether it is > 0, only when the INI sets it."""
    verdict = when(lambda x, _run: x > 0, above, otherwise)
    return Rule(section, key, verdict, read="number", only_present=True)


# --------------------------------------------------------------------------------------------
# Handlers for the keys whose meaning depends on other keys


def _context(run: _Run) -> None:
    """Privacy on/off and the optimizer: several [config] keys depend on them."""
    v = run.v
    old_layout = v.present("config", "differentially_private")
    run.dp_section = (
        "config" if old_layout and not v.present("DP", "differentially_private") else "DP"
    )
    run.dp = v.boolean(run.dp_section, "differentially_private")
    run.optimizer = (v.raw("config", "optimizer") or "Adam").strip()


def _binary_segmentation(run: _Run) -> None:
    sec = "config"
    run.binary = run.v.boolean(sec, "binary_segmentation")
    run.put("data.labels", "binary")
    if run.binary:
        run.put("data.foreground_labels", [1, 2])
        run.put("data.num_classes", 2)
        run.report(
            sec, "binary_segmentation", "mapped",
            "liver and tumour merged into one foreground class",
            "data.labels, data.foreground_labels",
        )  # fmt: skip
    else:
        run.report(
            sec, "binary_segmentation", "unsupported",
            "'no' selects the baseline's chest X-ray classification pipeline; this system "
            "segments, so labels stay binary liver + tumour",
            "data.labels",
        )  # fmt: skip


def _inference_resolution(size: int, run: _Run) -> Outcome:
    if size == run.resolution:
        return "matched", "equal to train_resolution: slices are only resized, as here"
    return (
        "unsupported",
        f"the baseline resizes to {size} and then crops {run.resolution}x{run.resolution} "
        "(randomly in training, centred in validation); here slices are resized "
        "straight to train_resolution",
    )


def _learning_rate(run: _Run) -> None:
    """lr and end_lr -> the schedule; keep_optim_dict decides whether the baseline applies it."""
    v, sec = run.v, "config"
    lr = v.number(sec, "lr")
    end_lr = v.number(sec, "end_lr") if v.present(sec, "end_lr") else lr
    if lr <= 0 or end_lr <= 0:
        raise UserError("[config] lr and end_lr must be > 0", v.source)
    run.put("train.client_lr", lr)
    run.report(sec, "lr", "mapped", "client (site) learning rate", "train.client_lr")
    run.keep_optim = v.present("federated", "keep_optim_dict") and v.boolean(
        "federated", "keep_optim_dict"
    )
    run.put("train.end_lr", end_lr)
    if math.isclose(end_lr, lr):
        run.put("train.lr_schedule", "constant")
        run.report(sec, "end_lr", "mapped", "equal to lr: constant rate", "train.lr_schedule")
        return
    run.put("train.lr_schedule", "loglinear")
    run.report(
        sec, "end_lr", "approximate",
        "log-linear decay from lr to end_lr, stepped per round here, per epoch in the baseline",
        "train.end_lr, train.lr_schedule",
    )  # fmt: skip
    if "federated" in run.ini and not run.keep_optim:
        run.notes.append(
            "Learning-rate schedule: in the baseline's federated training with "
            "keep_optim_dict = no, every synchronisation re-creates the sites' optimizers "
            "with lr (torchlib/utils.py, secure_aggregation_epoch), so its log-linear "
            "schedule never reaches the optimizer and training runs at the constant lr. The "
            "converted config applies the schedule the INI asks for; set "
            'train.lr_schedule = "constant" to reproduce the baseline\'s effective rate.'
        )


def _restarts(restarts: int, _run: _Run) -> Outcome:
    if restarts <= 0:
        return "matched", "no warm restarts, as here"
    return (
        "unsupported",
        f"warm restarts: the baseline runs the lr -> end_lr decay {restarts + 1} times, "
        f"each over epochs / {restarts + 1}; the schedule here decays once over all rounds",
    )


def _adam_moments(run: _Run) -> None:
    adam = run.optimizer.lower() == "adam"
    for key in ("beta1", "beta2"):
        if adam:
            run.put(f"train.{key}", run.v.number("config", key))
            run.report("config", key, "mapped", "Adam moment decay", f"train.{key}")
        else:
            run.report("config", key, "ignored", f"only used by Adam (optimizer = {run.optimizer})")


def _optimizer(run: _Run) -> None:
    name = run.optimizer.lower()
    if name in ("adam", "sgd"):
        run.put("train.client_optimizer", name)
        run.report("config", "optimizer", "mapped", "client optimizer", "train.client_optimizer")
        return
    run.put("train.client_optimizer", "adam")
    run.report(
        "config", "optimizer", "unsupported",
        "the baseline knows only Adam and SGD; written as adam",
        "train.client_optimizer",
    )  # fmt: skip


MODELS: dict[str, tuple[dict[str, Any], str]] = {
    "monet": (
        BASELINE_PRESET["model"],
        "the study's MoNet (depth 2, 16-32-64 filters, GroupNorm 32, dropout 0.2); its skip "
        "connections work here but never fire in the baseline (a key-name bug, see "
        "tff_privseg/models/monet.py)",
    ),
    "unet": (
        UNET_PRESET,
        "a plain GroupNorm U-Net (depth 3, 16 filters) instead of segmentation_models_pytorch"
        "'s Unet with a ResNet-18 encoder",
    ),
}


def _model(run: _Run) -> None:
    """MoNet or U-Net -> that preset unless the base config already builds that model."""
    model = (run.v.raw("config", "model") or "MoNet").strip()
    if model.lower() not in MODELS:
        run.report(
            "config", "model", "unsupported",
            f"{model} is one of the baseline's classification networks; the model stays "
            f"{run.out.get('model', {}).get('name', 'monet')}",
        )  # fmt: skip
        return
    preset, reason = MODELS[model.lower()]
    if run.out.get("model", {}).get("name") != preset["name"]:
        run.out["model"] = dict(preset)
    run.report("config", "model", "approximate", reason, "model")


_CLASS_WEIGHTS = switch(
    "config", "weight_classes", feature("class-weighted loss", "not available here")
)


def _weight_classes(run: _Run) -> None:
    if not run.v.present("config", "weight_classes"):
        return
    if run.binary:
        run.report(
            "config", "weight_classes", "ignored",
            "the baseline's segmentation loss (Dice) takes no class weights",
        )  # fmt: skip
    else:
        _CLASS_WEIGHTS(run)


def _privacy(run: _Run) -> None:
    """differentially_private, from [DP] or (older INIs) [config]."""
    run.put("privacy.level", "sample" if run.dp else "none")
    reason = "sample-level DP-SGD at every site" if run.dp else "no differential privacy"
    run.report(run.dp_section, "differentially_private", "mapped", reason, "privacy.level")
    if run.dp_section == "DP" and run.v.present("config", "differentially_private"):
        run.report(
            "config", "differentially_private", "ignored",
            "superseded by [DP] differentially_private (the baseline reads only [DP])",
        )  # fmt: skip
    elif run.dp_section == "config":
        run.notes.append(
            "differentially_private was read from [config] (an older INI layout); the "
            "current baseline reads it from [DP] only and would train without DP here."
        )


def _microbatches(size: int) -> Outcome:
    return (
        "unsupported",
        f"the baseline clips the gradients of {size}-example microbatches (the whole "
        "batch when equal to batch_size) and scales the noise accordingly; here clipping "
        "is always per example (microbatch 1), a stronger guarantee at the same σ",
    )


def _weighted_averaging(run: _Run) -> None:
    sec, key = "federated", "weighted_averaging"
    weighted = run.v.boolean(sec, key)
    if weighted and run.dp:
        run.put("train.weighting", "uniform")
        run.report(
            sec, key, "unsupported",
            "with privacy on, weighting must be 'uniform': a site's example count changes "
            "with one record and is not covered by the DP guarantee (config.validate); "
            "written as uniform",
            "train.weighting",
        )  # fmt: skip
        return
    run.put("train.weighting", "examples" if weighted else "uniform")
    reason = (
        "sites weighted by their size (the baseline: by batches per epoch)"
        if weighted
        else "every site weighs the same"
    )
    run.report(sec, key, "mapped", reason, "train.weighting")


def _repetitions(repetitions: int) -> Outcome:
    return (
        "approximate",
        f"the baseline stores each site's data {repetitions}x (augmented once each) and "
        f"divides epochs by {repetitions}; the total number of batches is the same and "
        "train.rounds accounts for it; batches here are drawn afresh anyway",
        "train.rounds",
    )


def _no_federated_section(run: _Run) -> None:
    if "federated" not in run.ini:
        run.notes.append(
            "No [federated] section: the baseline trains such an INI centrally unless run with "
            "--train_federated; converted as federated training with sync_every_n_batch = 1."
        )


# key, [low, high) (rotation: [low, high]), what the value is, what an out-of-range one does
AUGMENT_RANGES = (
    ("rotation", 0.0, 180.0, "degrees", "is not a rotation range"),
    ("translate", 0.0, 0.5, "fraction of the image size", "shifts slices out of view"),
    ("scale", 0.0, 1.0, "zoom in [1 - scale, 1 + scale]", "zooms slices to nothing"),
)


def _augment_ranges(run: _Run) -> None:
    for key, lo, hi, what, effect in AUGMENT_RANGES:
        value = run.v.number("augmentation", key)
        target = f"data.augment.{key}"
        if not lo <= value < hi and not (key == "rotation" and value == hi):
            run.aug[key] = 0.0
            run.report(
                "augmentation", key, "unsupported",
                f"{value:g} is outside [{lo:g}, {hi:g}) ({what}): {effect} (the baseline's "
                "federated segmentation never applies it); written as 0",
                target,
            )  # fmt: skip
        else:
            run.aug[key] = value
            run.report(
                "augmentation", key, "approximate" if value else "mapped",
                f"{what}; the baseline's albumentations ShiftScaleRotate applies it to half the "
                "slices (p = 0.5) with reflected borders, here to every slice with zero fill"
                if value
                else "off",
                target,
            )  # fmt: skip


def _noise(run: _Run) -> None:
    """Gaussian noise, from [albumentations] (where the baseline reads it) or [augmentation]."""
    v = run.v
    section = (
        "albumentations"
        if v.present("albumentations", "noise_std") or not v.present("augmentation", "noise_std")
        else "augmentation"
    )
    noise_std = v.number(section, "noise_std")
    noise_prob = v.number(section, "noise_prob")
    if noise_std < 0 or not 0 <= noise_prob <= 1:
        run.aug["noise_std"], run.aug["noise_prob"] = 0.0, 0.0
        status: Status = "unsupported"
        reason = "needs noise_std >= 0 and noise_prob in [0, 1]; noise written as off"
    else:
        run.aug["noise_std"], run.aug["noise_prob"] = noise_std, noise_prob
        active = noise_std > 0 and noise_prob > 0
        status = "approximate" if active else "mapped"
        reason = (
            "Gaussian noise; the baseline's albumentations GaussNoise(var_limit = noise_std²) "
            "acts on 0-255 images (σ up to noise_std grey levels, about noise_std / 255 on our "
            "[0, 1] slices); here σ = noise_std on [0, 1] slices"
            if active
            else "no noise"
        )
    for key in ("noise_std", "noise_prob"):
        run.report(section, key, status, reason, f"data.augment.{key}")
        if section == "albumentations":
            run.report(
                "augmentation", key, "ignored",
                "superseded by [albumentations] (where the baseline reads it)",
            )  # fmt: skip


def _write_augmentation(run: _Run) -> None:
    """data.augment, or nothing with ``augment=False`` (the baseline's federated path)."""
    if not run.augment:
        run.aug = dict.fromkeys(("rotation", "translate", "scale", "noise_std", "noise_prob"), 0.0)
        run.notes.append(
            "--no-augment: no augmentation written, whatever the INI says (what the baseline's "
            "federated segmentation path actually does)."
        )
    for key, value in run.aug.items():
        run.put(f"data.augment.{key}", value)
    if run.augment and any(run.aug.values()):
        run.notes.append(
            "Augmentation: the baseline's federated segmentation path (setup_pysyft) applies "
            "no augmentation at all (Resize + RandomCrop + Normalize only; its segmentation.ini "
            "marks [augmentation] and [albumentations] ';not used'); the converted config "
            "applies what the INI asks for. Convert with --no-augment for the baseline's actual "
            "behaviour."
        )


def _epochs(run: _Run) -> None:
    """epochs -> train.rounds and train.local_steps (see the module docstring)."""
    epochs = run.v.integer("config", "epochs")
    if epochs < 1:
        raise run.v.bad("config", "epochs", "an integer >= 1")
    slices = run.slices_per_site
    run.schedule = _rounds(epochs, run.sync, run.repetitions, run.batch, slices)
    run.put("train.rounds", run.schedule["rounds"])
    run.put("train.local_steps", run.schedule["local_steps"])
    run.put("train.local_epochs", 0)
    explanation = run.schedule["explanation"]
    run.report(
        "config", "epochs",
        "mapped" if slices else "approximate",
        explanation if slices
        else explanation + " (pass --slices-per-site or --data for the exact count)",
        "train.rounds, train.local_steps",
    )  # fmt: skip


def _unread(run: _Run) -> None:
    """What no rule reported: empty known keys (defaults apply) and unknown keys."""
    for section, keys in run.ini.items():
        for key, value in keys.items():
            if (section, key) in run.reports:
                continue
            if value == "" and key in KNOWN_KEYS.get(section, ()):
                run.reports[(section, key)] = KeyReport(
                    section, key, value, "ignored", "",
                    "empty: the baseline falls back to its default, and so does the conversion",
                )  # fmt: skip
                continue
            if section in SECTIONS:
                why = f"not a key the baseline reads in [{section}]; nothing done"
            else:
                why = f"[{section}] is not a section the baseline reads; nothing done"
            run.reports[(section, key)] = KeyReport(section, key, value, "unknown", "", why)


# --------------------------------------------------------------------------------------------
# The table: every key the baseline reads, in the order they are read (a conversion stops at
# the first bad value, and the defaults it used are listed in this order).

Step = Callable[[_Run], None]  # a Rule or a handler

# fmt: off
STEPS: tuple[Step, ...] = (
    _context,
    # [config]
    _binary_segmentation,
    Rule(
        "config", "batch_size", read="integer", valid=lambda n: n >= 1,
        expected="an integer >= 1", target="train.batch_size", keep="batch",
        verdict=lambda _n, run: (
            "mapped",
            "expected (Poisson) batch size, sampling rate batch_size / site slices, as the "
            "baseline's Poisson loader under DP" if run.dp else "local batch size",
        ),
    ),
    Rule(
        "config", "train_resolution", fixed("mapped", "slices resized to this size"),
        read="integer", target="data.resolution", keep="resolution",
    ),
    Rule(
        "config", "inference_resolution", _inference_resolution,
        read="integer", only_present=True,
    ),
    ignored("config", "test_batch_size", "evaluation batch size: does not change results"),
    ignored(
        "config", "test_interval",
        "validation runs after every round here; the baseline validates every test_interval "
        "epochs and tests the best epoch's checkpoint",
    ),
    Rule(
        "config", "validation_split",
        fixed("mapped", "percent of each site's training patients held out for validation"),
        read="number", valid=lambda p: 0 <= p < 100, expected="a percentage in [0, 100)",
        target="data.val_fraction", convert=lambda p: p / 100.0,
    ),
    _learning_rate,
    Rule("config", "restarts", _restarts, read="integer"),
    _adam_moments,
    Rule(
        "config", "weight_decay",
        when(
            lambda wd, _run: wd == 0,
            ("mapped", "no weight decay"),
            (
                "approximate",
                "torch's optimizers add weight_decay * w to the gradient (L2, coupled, after "
                "the DP noise); here weight decay is decoupled (AdamW style)",
            ),
        ),
        read="number", valid=lambda wd: wd >= 0, expected="a number >= 0",
        target="train.weight_decay",
    ),
    ignored(
        "config", "momentum",
        "the baseline never passes momentum to torch.optim.SGD (only lr and weight_decay)",
    ),
    ignored(
        "config", "deterministic",
        "public choices are seeded by train.seed (DP runs draw their batches, augmentation "
        "and noise from a secret per-run key); bitwise-identical GPU kernels are not "
        "promised either way",
    ),
    Rule(
        "config", "seed",
        fixed(
            "mapped",
            "seeds initialisation, and batches and augmentation of runs without DP (under DP "
            "those and the noise come from a secret per-run key)",
        ),
        read="integer", target="train.seed",
    ),
    ignored("config", "log_interval", "visdom logging cadence; metrics are logged per round"),
    _optimizer,
    _model,
    switch(
        "config", "pretrained",
        on_off(
            (
                "unsupported",
                "the baseline's pretrained PyTorch weights are not available here; training "
                "starts from a seeded random initialisation",
            ),
            ("matched", "training from scratch, as here"),
        ),
    ),
    _weight_classes,
    ignored("config", "pooling_type", "a classification-network option"),
    # privacy
    _privacy,
    Rule(
        "DP", "noise_multiplier",
        lambda _x, run: ("mapped", "noise std / clip norm" + run.inactive),
        read="number", valid=lambda x: x > 0, expected="a number > 0",
        target="privacy.noise_multiplier",
    ),
    Rule(
        "DP", "max_grad_norm",
        lambda _x, run: ("mapped", "per-example clip norm" + run.inactive),
        read="number", valid=lambda x: x > 0, expected="a number > 0",
        target="privacy.l2_norm_clip",
    ),
    Rule(
        "DP", "target_delta",
        lambda _x, run: ("mapped", "δ of the reported (ε, δ)" + run.inactive),
        read="number", valid=lambda x: 0 < x < 1, expected="a number > 0 and < 1",
        target="privacy.delta",
    ),
    switch(
        "DP", "dp_stats_exchange",
        lambda on, _run: (
            "ignored" if on else "matched",
            "the baseline normalises with the training set's mean/std, shared between sites "
            "(Laplace-noised when on); here intensities are scaled per volume (min-max), so no "
            "statistic is exchanged at all",
        ),
    ),
    ignored("DP", "dp_sse_epsilon", "only used by dp_stats_exchange"),
    Rule(
        "DP", "microbatch_size",
        unless(1, ("mapped", "per-example clipping, as here"), _microbatches),
        read="integer",
    ),
    # [federated]
    Rule(
        "federated", "sync_every_n_batch",
        fixed("mapped", "one round = this many local batches at every site", "train.local_steps"),
        read="integer", valid=lambda n: n >= 1, expected="an integer >= 1", keep="sync",
    ),
    ignored(
        "federated", "wait_interval",
        "polling interval of the baseline's synchroniser: no effect on results",
    ),
    Rule(
        "federated", "keep_optim_dict",
        when(
            lambda _x, run: run.keep_optim,
            (
                "unsupported",
                "optimizer state kept across synchronisations: client optimizers start fresh "
                "every round here",
            ),
            (
                "matched",
                "optimizers restart at every synchronisation in the baseline and every round "
                "here",
            ),
        ),
    ),
    _weighted_averaging,
    Rule(
        "federated", "repetitions_dataset",
        unless(1, ("matched", "data used once per epoch"), _repetitions),
        read="integer", fallback="1", valid=lambda n: n >= 1, expected="an integer >= 1",
        keep="repetitions",
    ),
    Rule(
        "federated", "precision_fractional",
        fixed(
            "unsupported",
            "fixed-point precision of PySyft's secret-shared (SMPC) aggregation; aggregation "
            "here is float32. (privacy.secure_aggregation is not set from the INI: the baseline "
            "turns SMPC on by command-line flag, and TFF's secure sum here has its semantics, "
            "not the cryptography)",
        ),
    ),
    _no_federated_section,
    # [augmentation], [albumentations]
    _augment_ranges,
    positive(
        "augmentation", "shear",
        (
            "unsupported",
            "shearing (the baseline ignores it too: 'Shearing not supported any more')",
        ),
        ("matched", "no shearing, as here"),
    ),
    Rule(
        "augmentation", "mixup", feature("MixUp", "not available here (and rejected under DP)"),
        read="boolean", only_present=True, keep="mixup",
    ),
    *(
        Rule(
            "augmentation", key,
            when(
                lambda _x, run: run.mixup,
                ("unsupported", "MixUp is not available here"),
                ("ignored", "only used with mixup = yes"),
            ),
        )
        for key in ("mixup_prob", "mixup_lambda")
    ),
    positive(
        "augmentation", "vertical_flip_prob",
        ("unsupported", "no flips here"), ("matched", "no flips, as here"),
    ),
    _noise,
    *(
        switch(
            "albumentations", key,
            feature(
                f"albumentations {what}",
                "no tf.data counterpart here (augmentation is rotation, shift, zoom, Gaussian "
                "noise)",
            ),
        )
        for key, what in ALBUMENTATIONS.items()
    ),
    ignored(
        "albumentations", "overall_prob",
        "read by the baseline but applied by none of its transforms",
    ),
    positive(
        "albumentations", "individual_probs",
        (
            "unsupported",
            "probability of each enabled albumentation and of the VerticalFlip the baseline "
            "always adds; no flips here",
        ),
        ("matched", "no flips or albumentations, as here"),
    ),
    _write_augmentation,
    # [system]
    ignored(
        "system", "num_threads",
        "PyTorch's thread count; TensorFlow sizes its own thread pools "
        "(TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS)",
    ),
    _epochs,
    _unread,
)
# fmt: on

NOTES = (
    "Sites: the baseline splits the training SLICES randomly across its 3 workers, so one "
    "patient spans sites; here every site is a folder of whole patients (split by patient, "
    "see configs/baseline_liver.toml).",
    "Loss: per-example soft Dice (DP-SGD clips per example); the baseline's "
    "segmentation_models_pytorch DiceLoss pools the batch.",
)


def convert_ini(
    path: str | Path,
    *,
    slices_per_site: int | None = None,
    base: dict[str, Any] | None = None,
    augment: bool = True,
) -> Conversion:
    """Convert the baseline INI at ``path`` into a validated ``Config`` and a key-by-key report.

    ``slices_per_site``: training slices of the largest site (turns epochs into rounds; see the
    module docstring). ``base``: a raw config dict (as read from TOML) for everything the INI does
    not set; default ``BASELINE_PRESET`` (the study's MoNet on MSD Task03_Liver in
    ``data/msd_liver``). ``augment=False`` writes no augmentation at all, which is what the
    baseline's federated segmentation path actually does (see the notes).
    """
    path = Path(path)
    source = str(path)
    raw_bytes = path.read_bytes() if path.is_file() else b""
    ini = read_ini(path)
    run = _Run(
        ini=ini,
        v=_Values(ini, source),
        out=copy.deepcopy(base if base is not None else BASELINE_PRESET),
        slices_per_site=slices_per_site,
        augment=augment,
    )
    for step in STEPS:
        step(run)
    config = config_lib.from_dict(run.out, source=f"{source} (converted)")
    return Conversion(
        source=source,
        source_sha256=hashlib.sha256(raw_bytes).hexdigest(),
        config=config,
        keys=_ordered(ini, run.reports),
        defaults=[f"[{s}] {k} = {BASELINE_DEFAULTS[s][k]}" for s, k in run.v.used_defaults],
        notes=[*run.notes, *NOTES],
        schedule=run.schedule,
    )


def _rounds(
    epochs: int, sync: int, repetitions: int, batch: int, slices: int | None
) -> dict[str, Any]:
    effective_epochs = max(1, epochs // repetitions) if repetitions > 1 else epochs
    out: dict[str, Any] = {
        "epochs": epochs,
        "effective_epochs": effective_epochs,
        "sync_every_n_batch": sync,
        "repetitions_dataset": repetitions,
        "batch_size": batch,
        "slices_per_site": slices,
    }
    if slices:
        per_epoch = math.ceil(repetitions * slices / batch)
        rounds_per_epoch = math.ceil(per_epoch / sync)
        out.update(
            batches_per_epoch=per_epoch,
            rounds_per_epoch=rounds_per_epoch,
            rounds=effective_epochs * rounds_per_epoch,
            local_steps=min(sync, per_epoch),
        )
        rep = f"{repetitions} x " if repetitions > 1 else ""
        out["explanation"] = (
            f"epochs {epochs} -> train.rounds {out['rounds']}: ceil({rep}{slices} slices per "
            f"site / batch {batch}) = {per_epoch} batches per epoch, averaged every {sync} "
            f"-> {rounds_per_epoch} rounds per epoch x {effective_epochs} epochs; "
            f"train.local_steps {out['local_steps']}"
        )
    else:
        out.update(
            batches_per_epoch=None,
            rounds_per_epoch=None,
            rounds=effective_epochs,
            local_steps=sync,
        )
        out["explanation"] = (
            f"epochs {epochs} -> train.rounds {effective_epochs} (one round of {sync} local "
            "batches per epoch: too few, unless an epoch is that short; exact: rounds = epochs x "
            "ceil(ceil(slices per site / batch_size) / sync_every_n_batch))"
        )
    return out


def _ordered(
    ini: dict[str, dict[str, str]], reports: dict[tuple[str, str], KeyReport]
) -> list[KeyReport]:
    """Reports in the INI's order."""
    return [reports[(s, k)] for s, keys in ini.items() for k in keys if (s, k) in reports]


def count_training_slices(cfg: Config, data_root: str | Path | None = None) -> dict[str, int]:
    """Training slices per site of the dataset at ``data_root`` (default ``cfg.data.root``),
    with ``cfg``'s preprocessing and patient split. Loads (and caches) the data."""
    from tff_privseg.data import load_sites

    sites = load_sites(cfg.data, data_root, progress=False)
    if not sites:
        raise UserError("no sites found", data_root or cfg.data.root)
    return {s.name: len(s.train) for s in sites}


def convert_ini_file(
    path: str | Path,
    *,
    slices_per_site: int | None = None,
    data_root: str | Path | None = None,
    base_toml: str | Path | None = None,
    augment: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Conversion:
    """``convert_ini`` plus the CLI's conveniences: a base TOML file, and a dataset to count the
    slices per site in (``data_root`` also becomes ``data.root``)."""
    base: dict[str, Any] | None = None
    if base_toml is not None:
        import tomllib

        try:
            base = tomllib.loads(Path(base_toml).read_text())
        except FileNotFoundError:
            raise UserError("base config not found", base_toml) from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"not valid TOML ({e})", base_toml) from None
        config_lib.from_dict(base, source=str(base_toml))  # fail early, naming the base file
    if data_root is not None:
        base = copy.deepcopy(base if base is not None else BASELINE_PRESET)
        base.setdefault("data", {})["root"] = str(data_root)
    if slices_per_site is not None and slices_per_site < 1:
        raise UserError("--slices-per-site must be >= 1")
    conversion = convert_ini(path, slices_per_site=slices_per_site, base=base, augment=augment)
    if data_root is not None and slices_per_site is None:
        if progress:
            progress(f"counting training slices per site in {data_root} ...")
        counts = count_training_slices(conversion.config, data_root)
        conversion = convert_ini(
            path, slices_per_site=max(counts.values()), base=base, augment=augment
        )
        conversion.schedule["slices_by_site"] = counts
    return conversion


__all__ = [
    "BASELINE_DEFAULTS",
    "BASELINE_PRESET",
    "Conversion",
    "KeyReport",
    "convert_ini",
    "convert_ini_file",
    "count_training_slices",
    "read_ini",
]
