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
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError("INI file not found", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read ({e})", path) from None
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

    def _bad(self, section: str, key: str, what: str) -> UserError:
        value = self.ini.get(section, {}).get(key, "")
        return UserError(f"[{section}] {key} = {value!r}: expected {what}", self.source)

    def boolean(self, section: str, key: str, default: str | None = None) -> bool:
        value = self.raw(section, key, default)
        states = configparser.ConfigParser.BOOLEAN_STATES
        if value is None or value.lower() not in states:
            raise self._bad(section, key, "yes/no (or true/false, on/off, 1/0)")
        return states[value.lower()]

    def number(self, section: str, key: str, default: str | None = None) -> float:
        value = self.raw(section, key, default)
        try:
            out = float(value) if value is not None else math.nan
        except ValueError:
            raise self._bad(section, key, "a number") from None
        if not math.isfinite(out):
            raise self._bad(section, key, "a finite number")
        return out

    def integer(self, section: str, key: str, default: str | None = None) -> int:
        value = self.number(section, key, default)
        if value != int(value):
            raise self._bad(section, key, "an integer")
        return int(value)


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
    v = _Values(ini, source)
    reports: dict[tuple[str, str], KeyReport] = {}
    notes: list[str] = []
    out: dict[str, Any] = copy.deepcopy(base if base is not None else BASELINE_PRESET)

    def put(dotted: str, value: Any) -> None:
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def report(section: str, key: str, status: Status, reason: str, target: str = "") -> None:
        if not v.present(section, key):
            return  # absent keys are listed under `defaults`, not as INI keys
        value = ini[section][key]
        reports[(section, key)] = KeyReport(section, key, value, status, target, reason)

    def switch_off(section: str, key: str, what: str, why_unsupported: str) -> None:
        """An on/off feature we do not have: off -> matched, on -> unsupported."""
        if not v.present(section, key):
            return
        if v.boolean(section, key):
            report(section, key, "unsupported", f"{what}: {why_unsupported}")
        else:
            report(section, key, "matched", f"{what} is off; not available here either")

    # --- context that several keys depend on ---------------------------------------------
    old_layout = v.present("config", "differentially_private")
    dp_section = "config" if old_layout and not v.present("DP", "differentially_private") else "DP"
    dp = v.boolean(dp_section, "differentially_private")
    optimizer = (v.raw("config", "optimizer") or "Adam").strip()
    adam = optimizer.lower() == "adam"
    binary = v.boolean("config", "binary_segmentation")
    federated_section = "federated" in ini

    # --- [config] --------------------------------------------------------------------------
    sec = "config"
    if binary:
        put("data.labels", "binary")
        put("data.foreground_labels", [1, 2])
        put("data.num_classes", 2)
        report(
            sec, "binary_segmentation", "mapped",
            "liver and tumour merged into one foreground class",
            "data.labels, data.foreground_labels",
        )  # fmt: skip
    else:
        put("data.labels", "binary")
        report(
            sec, "binary_segmentation", "unsupported",
            "'no' selects the baseline's chest X-ray classification pipeline; this system "
            "segments, so labels stay binary liver + tumour",
            "data.labels",
        )  # fmt: skip

    batch = v.integer(sec, "batch_size")
    if batch < 1:
        raise v._bad(sec, "batch_size", "an integer >= 1")
    put("train.batch_size", batch)
    report(
        sec, "batch_size", "mapped",
        "expected (Poisson) batch size, sampling rate batch_size / site slices, as the "
        "baseline's Poisson loader under DP" if dp else "local batch size",
        "train.batch_size",
    )  # fmt: skip

    resolution = v.integer(sec, "train_resolution")
    put("data.resolution", resolution)
    report(sec, "train_resolution", "mapped", "slices resized to this size", "data.resolution")
    if v.present(sec, "inference_resolution"):
        inf_res = v.integer(sec, "inference_resolution")
        if inf_res == resolution:
            report(
                sec, "inference_resolution", "matched",
                "equal to train_resolution: slices are only resized, as here",
            )  # fmt: skip
        else:
            report(
                sec, "inference_resolution", "unsupported",
                f"the baseline resizes to {inf_res} and then crops {resolution}x{resolution} "
                "(randomly in training, centred in validation); here slices are resized "
                "straight to train_resolution",
            )  # fmt: skip

    report(sec, "test_batch_size", "ignored", "evaluation batch size: does not change results")
    report(
        sec, "test_interval", "ignored",
        "validation runs after every round here; the baseline validates every test_interval "
        "epochs and tests the best epoch's checkpoint",
    )  # fmt: skip

    val_split = v.number(sec, "validation_split")
    if not 0 <= val_split < 100:
        raise v._bad(sec, "validation_split", "a percentage in [0, 100)")
    put("data.val_fraction", val_split / 100.0)
    report(
        sec, "validation_split", "mapped",
        "percent of each site's training patients held out for validation",
        "data.val_fraction",
    )  # fmt: skip

    lr = v.number(sec, "lr")
    end_lr = v.number(sec, "end_lr") if v.present(sec, "end_lr") else lr
    if lr <= 0 or end_lr <= 0:
        raise UserError("[config] lr and end_lr must be > 0", source)
    put("train.client_lr", lr)
    report(sec, "lr", "mapped", "client (site) learning rate", "train.client_lr")
    keep_optim = v.present("federated", "keep_optim_dict") and v.boolean(
        "federated", "keep_optim_dict"
    )
    if math.isclose(end_lr, lr):
        put("train.lr_schedule", "constant")
        put("train.end_lr", end_lr)
        report(sec, "end_lr", "mapped", "equal to lr: constant rate", "train.lr_schedule")
    else:
        put("train.lr_schedule", "loglinear")
        put("train.end_lr", end_lr)
        report(
            sec, "end_lr", "approximate",
            "log-linear decay from lr to end_lr, stepped per round here, per epoch in the "
            "baseline",
            "train.end_lr, train.lr_schedule",
        )  # fmt: skip
        if federated_section and not keep_optim:
            notes.append(
                "Learning-rate schedule: in the baseline's federated training with "
                "keep_optim_dict = no, every synchronisation re-creates the sites' optimizers "
                "with lr (torchlib/utils.py, secure_aggregation_epoch), so its log-linear "
                "schedule never reaches the optimizer and training runs at the constant lr. The "
                "converted config applies the schedule the INI asks for; set "
                'train.lr_schedule = "constant" to reproduce the baseline\'s effective rate.'
            )
    restarts = v.integer(sec, "restarts")
    if restarts > 0:
        report(
            sec, "restarts", "unsupported",
            f"warm restarts: the baseline runs the lr -> end_lr decay {restarts + 1} times, "
            f"each over epochs / {restarts + 1}; the schedule here decays once over all rounds",
        )  # fmt: skip
    else:
        report(sec, "restarts", "matched", "no warm restarts, as here")

    if adam:
        for key in ("beta1", "beta2"):
            put(f"train.{key}", v.number(sec, key))
            report(sec, key, "mapped", "Adam moment decay", f"train.{key}")
    else:
        for key in ("beta1", "beta2"):
            report(sec, key, "ignored", f"only used by Adam (optimizer = {optimizer})")

    wd = v.number(sec, "weight_decay")
    if wd < 0:
        raise v._bad(sec, "weight_decay", "a number >= 0")
    put("train.weight_decay", wd)
    if wd == 0:
        report(sec, "weight_decay", "mapped", "no weight decay", "train.weight_decay")
    else:
        report(
            sec, "weight_decay", "approximate",
            "torch's optimizers add weight_decay * w to the gradient (L2, coupled, after the DP "
            "noise); here weight decay is decoupled (AdamW style)",
            "train.weight_decay",
        )  # fmt: skip
    report(
        sec, "momentum", "ignored",
        "the baseline never passes momentum to torch.optim.SGD (only lr and weight_decay)",
    )  # fmt: skip
    report(
        sec, "deterministic", "ignored",
        "public choices are seeded by train.seed (DP runs draw their batches, augmentation "
        "and noise from a secret per-run key); bitwise-identical GPU kernels are not "
        "promised either way",
    )  # fmt: skip
    put("train.seed", v.integer(sec, "seed"))
    report(
        sec, "seed", "mapped",
        "seeds initialisation, and batches and augmentation of runs without DP (under DP "
        "those and the noise come from a secret per-run key)",
        "train.seed",
    )  # fmt: skip
    report(sec, "log_interval", "ignored", "visdom logging cadence; metrics are logged per round")

    if optimizer.lower() in ("adam", "sgd"):
        put("train.client_optimizer", optimizer.lower())
        report(sec, "optimizer", "mapped", "client optimizer", "train.client_optimizer")
    else:
        put("train.client_optimizer", "adam")
        report(
            sec, "optimizer", "unsupported",
            "the baseline knows only Adam and SGD; written as adam",
            "train.client_optimizer",
        )  # fmt: skip

    model = (v.raw(sec, "model") or "MoNet").strip()
    if model.lower() == "monet":
        if out.get("model", {}).get("name") != "monet":
            out["model"] = dict(BASELINE_PRESET["model"])
        report(
            sec, "model", "approximate",
            "the study's MoNet (depth 2, 16-32-64 filters, GroupNorm 32, dropout 0.2); its skip "
            "connections work here but never fire in the baseline (a key-name bug, see "
            "tff_privseg/models/monet.py)",
            "model",
        )  # fmt: skip
    elif model.lower() == "unet":
        if out.get("model", {}).get("name") != "unet":
            out["model"] = dict(UNET_PRESET)
        report(
            sec, "model", "approximate",
            "a plain GroupNorm U-Net (depth 3, 16 filters) instead of segmentation_models_pytorch"
            "'s Unet with a ResNet-18 encoder",
            "model",
        )  # fmt: skip
    else:
        report(
            sec, "model", "unsupported",
            f"{model} is one of the baseline's classification networks; the model stays "
            f"{out.get('model', {}).get('name', 'monet')}",
        )  # fmt: skip
    if v.present(sec, "pretrained"):
        if v.boolean(sec, "pretrained"):
            report(
                sec, "pretrained", "unsupported",
                "the baseline's pretrained PyTorch weights are not available here; training "
                "starts from a seeded random initialisation",
            )  # fmt: skip
        else:
            report(sec, "pretrained", "matched", "training from scratch, as here")
    if v.present(sec, "weight_classes"):
        if binary:
            report(
                sec, "weight_classes", "ignored",
                "the baseline's segmentation loss (Dice) takes no class weights",
            )  # fmt: skip
        else:
            switch_off(sec, "weight_classes", "class-weighted loss", "not available here")
    report(sec, "pooling_type", "ignored", "a classification-network option")

    # --- privacy ---------------------------------------------------------------------------
    put("privacy.level", "sample" if dp else "none")
    dp_reason = "sample-level DP-SGD at every site" if dp else "no differential privacy"
    report(dp_section, "differentially_private", "mapped", dp_reason, "privacy.level")
    if dp_section == "DP" and v.present("config", "differentially_private"):
        report(
            "config", "differentially_private", "ignored",
            "superseded by [DP] differentially_private (the baseline reads only [DP])",
        )  # fmt: skip
    elif dp_section == "config":
        notes.append(
            "differentially_private was read from [config] (an older INI layout); the "
            "current baseline reads it from [DP] only and would train without DP here."
        )
    inactive = "" if dp else " (inactive: DP is off)"
    sec = "DP"
    for key, target, what in (
        ("noise_multiplier", "privacy.noise_multiplier", "noise std / clip norm"),
        ("max_grad_norm", "privacy.l2_norm_clip", "per-example clip norm"),
        ("target_delta", "privacy.delta", "δ of the reported (ε, δ)"),
    ):
        value = v.number(sec, key)
        if value <= 0 or (key == "target_delta" and value >= 1):
            raise v._bad(sec, key, "a number > 0" + (" and < 1" if key == "target_delta" else ""))
        put(target, value)
        report(sec, key, "mapped", what + inactive, target)
    if v.present(sec, "dp_stats_exchange"):
        exchange = v.boolean(sec, "dp_stats_exchange")
        report(
            sec, "dp_stats_exchange", "ignored" if exchange else "matched",
            "the baseline normalises with the training set's mean/std, shared between sites "
            "(Laplace-noised when on); here intensities are scaled per volume (min-max), so no "
            "statistic is exchanged at all",
        )  # fmt: skip
    report(sec, "dp_sse_epsilon", "ignored", "only used by dp_stats_exchange")
    microbatch = v.integer(sec, "microbatch_size")
    if microbatch == 1:
        report(sec, "microbatch_size", "mapped", "per-example clipping, as here")
    else:
        report(
            sec, "microbatch_size", "unsupported",
            f"the baseline clips the gradients of {microbatch}-example microbatches (the whole "
            "batch when equal to batch_size) and scales the noise accordingly; here clipping "
            "is always per example (microbatch 1), a stronger guarantee at the same σ",
        )  # fmt: skip

    # --- [federated] -----------------------------------------------------------------------
    sec = "federated"
    sync = v.integer(sec, "sync_every_n_batch")
    if sync < 1:
        raise v._bad(sec, "sync_every_n_batch", "an integer >= 1")
    report(
        sec, "sync_every_n_batch", "mapped",
        "one round = this many local batches at every site",
        "train.local_steps",
    )  # fmt: skip
    report(
        sec, "wait_interval", "ignored",
        "polling interval of the baseline's synchroniser: no effect on results",
    )  # fmt: skip
    if v.present(sec, "keep_optim_dict"):
        if keep_optim:
            report(
                sec, "keep_optim_dict", "unsupported",
                "optimizer state kept across synchronisations: client optimizers start fresh "
                "every round here",
            )  # fmt: skip
        else:
            report(
                sec, "keep_optim_dict", "matched",
                "optimizers restart at every synchronisation in the baseline and every round "
                "here",
            )  # fmt: skip
    weighted = v.boolean(sec, "weighted_averaging")
    if weighted and dp:
        put("train.weighting", "uniform")
        report(
            sec, "weighted_averaging", "unsupported",
            "with privacy on, weighting must be 'uniform': a site's example count changes "
            "with one record and is not covered by the DP guarantee (config.validate); "
            "written as uniform",
            "train.weighting",
        )  # fmt: skip
    else:
        put("train.weighting", "examples" if weighted else "uniform")
        report(
            sec, "weighted_averaging", "mapped",
            "sites weighted by their size (the baseline: by batches per epoch)"
            if weighted
            else "every site weighs the same",
            "train.weighting",
        )  # fmt: skip
    repetitions = v.integer(sec, "repetitions_dataset", "1")
    if repetitions < 1:
        raise v._bad(sec, "repetitions_dataset", "an integer >= 1")
    if repetitions == 1:
        report(sec, "repetitions_dataset", "matched", "data used once per epoch")
    else:
        report(
            sec, "repetitions_dataset", "approximate",
            f"the baseline stores each site's data {repetitions}x (augmented once each) and "
            f"divides epochs by {repetitions}; the total number of batches is the same and "
            "train.rounds accounts for it; batches here are drawn afresh anyway",
            "train.rounds",
        )  # fmt: skip
    report(
        sec, "precision_fractional", "unsupported",
        "fixed-point precision of PySyft's secret-shared (SMPC) aggregation; aggregation here "
        "is float32. (privacy.secure_aggregation is not set from the INI: the baseline turns "
        "SMPC on by command-line flag, and TFF's secure sum here has its semantics, not the "
        "cryptography)",
    )  # fmt: skip
    if not federated_section:
        notes.append(
            "No [federated] section: the baseline trains such an INI centrally unless run with "
            "--train_federated; converted as federated training with sync_every_n_batch = 1."
        )

    # --- augmentation ----------------------------------------------------------------------
    aug: dict[str, float] = {}
    for key, lo, hi, what, effect in (
        ("rotation", 0.0, 180.0, "degrees", "is not a rotation range"),
        ("translate", 0.0, 0.5, "fraction of the image size", "shifts slices out of view"),
        ("scale", 0.0, 1.0, "zoom in [1 - scale, 1 + scale]", "zooms slices to nothing"),
    ):
        value = v.number("augmentation", key)
        target = f"data.augment.{key}"
        if not lo <= value < hi and not (key == "rotation" and value == hi):
            aug[key] = 0.0
            report(
                "augmentation", key, "unsupported",
                f"{value:g} is outside [{lo:g}, {hi:g}) ({what}): {effect} (the baseline's "
                "federated segmentation never applies it); written as 0",
                target,
            )  # fmt: skip
        else:
            aug[key] = value
            report(
                "augmentation", key, "approximate" if value else "mapped",
                f"{what}; the baseline's albumentations ShiftScaleRotate applies it to half the "
                "slices (p = 0.5) with reflected borders, here to every slice with zero fill"
                if value
                else "off",
                target,
            )  # fmt: skip
    if v.present("augmentation", "shear"):
        if v.number("augmentation", "shear") > 0:
            report(
                "augmentation", "shear", "unsupported",
                "shearing (the baseline ignores it too: 'Shearing not supported any more')",
            )  # fmt: skip
        else:
            report("augmentation", "shear", "matched", "no shearing, as here")
    mixup = v.present("augmentation", "mixup") and v.boolean("augmentation", "mixup")
    switch_off("augmentation", "mixup", "MixUp", "not available here (and rejected under DP)")
    for key in ("mixup_prob", "mixup_lambda"):
        if mixup:
            report("augmentation", key, "unsupported", "MixUp is not available here")
        else:
            report("augmentation", key, "ignored", "only used with mixup = yes")
    if v.present("augmentation", "vertical_flip_prob"):
        if v.number("augmentation", "vertical_flip_prob") > 0:
            report("augmentation", "vertical_flip_prob", "unsupported", "no flips here")
        else:
            report("augmentation", "vertical_flip_prob", "matched", "no flips, as here")

    noise_section = (
        "albumentations"
        if v.present("albumentations", "noise_std") or not v.present("augmentation", "noise_std")
        else "augmentation"
    )
    noise_std = v.number(noise_section, "noise_std")
    noise_prob = v.number(noise_section, "noise_prob")
    if noise_std < 0 or not 0 <= noise_prob <= 1:
        aug["noise_std"], aug["noise_prob"] = 0.0, 0.0
        for key in ("noise_std", "noise_prob"):
            report(
                noise_section, key, "unsupported",
                "needs noise_std >= 0 and noise_prob in [0, 1]; noise written as off",
                f"data.augment.{key}",
            )  # fmt: skip
    else:
        aug["noise_std"], aug["noise_prob"] = noise_std, noise_prob
        active = noise_std > 0 and noise_prob > 0
        reason = (
            "Gaussian noise; the baseline's albumentations GaussNoise(var_limit = noise_std²) "
            "acts on 0-255 images (σ up to noise_std grey levels, about noise_std / 255 on our "
            "[0, 1] slices); here σ = noise_std on [0, 1] slices"
            if active
            else "no noise"
        )
        for key in ("noise_std", "noise_prob"):
            report(
                noise_section, key, "approximate" if active else "mapped", reason,
                f"data.augment.{key}",
            )  # fmt: skip
    if noise_section == "albumentations":
        for key in ("noise_std", "noise_prob"):
            report(
                "augmentation", key, "ignored",
                "superseded by [albumentations] (where the baseline reads it)",
            )  # fmt: skip

    sec = "albumentations"
    for key, what in ALBUMENTATIONS.items():
        switch_off(
            sec, key, f"albumentations {what}",
            "no tf.data counterpart here (augmentation is rotation, shift, zoom, Gaussian noise)",
        )  # fmt: skip
    report(
        sec, "overall_prob", "ignored",
        "read by the baseline but applied by none of its transforms",
    )  # fmt: skip
    if v.present(sec, "individual_probs"):
        if v.number(sec, "individual_probs") > 0:
            report(
                sec, "individual_probs", "unsupported",
                "probability of each enabled albumentation and of the VerticalFlip the baseline "
                "always adds; no flips here",
            )  # fmt: skip
        else:
            report(sec, "individual_probs", "matched", "no flips or albumentations, as here")

    if not augment:
        aug = dict.fromkeys(("rotation", "translate", "scale", "noise_std", "noise_prob"), 0.0)
        notes.append(
            "--no-augment: no augmentation written, whatever the INI says (what the baseline's "
            "federated segmentation path actually does)."
        )
    for key, value in aug.items():
        put(f"data.augment.{key}", value)
    if augment and any(aug.values()):
        notes.append(
            "Augmentation: the baseline's federated segmentation path (setup_pysyft) applies "
            "no augmentation at all (Resize + RandomCrop + Normalize only; its segmentation.ini "
            "marks [augmentation] and [albumentations] ';not used'); the converted config "
            "applies what the INI asks for. Convert with --no-augment for the baseline's actual "
            "behaviour."
        )

    # --- [system] ---------------------------------------------------------------------------
    report(
        "system", "num_threads", "ignored",
        "PyTorch's thread count; TensorFlow sizes its own thread pools "
        "(TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS)",
    )  # fmt: skip

    # --- epochs -> rounds -------------------------------------------------------------------
    epochs = v.integer("config", "epochs")
    if epochs < 1:
        raise v._bad("config", "epochs", "an integer >= 1")
    schedule = _rounds(epochs, sync, repetitions, batch, slices_per_site)
    put("train.rounds", schedule["rounds"])
    put("train.local_steps", schedule["local_steps"])
    put("train.local_epochs", 0)
    report(
        "config", "epochs",
        "mapped" if slices_per_site else "approximate",
        schedule["explanation"]
        if slices_per_site
        else schedule["explanation"] + " (pass --slices-per-site or --data for the exact count)",
        "train.rounds, train.local_steps",
    )  # fmt: skip

    # --- whatever is left is unknown ----------------------------------------------------------
    for section, keys in ini.items():
        for key, value in keys.items():
            if (section, key) in reports:
                continue
            if value == "" and key in KNOWN_KEYS.get(section, ()):
                reports[(section, key)] = KeyReport(
                    section, key, value, "ignored", "",
                    "empty: the baseline falls back to its default, and so does the conversion",
                )  # fmt: skip
                continue
            if section in SECTIONS:
                why = f"not a key the baseline reads in [{section}]; nothing done"
            else:
                why = f"[{section}] is not a section the baseline reads; nothing done"
            reports[(section, key)] = KeyReport(section, key, value, "unknown", "", why)

    notes += [
        "Sites: the baseline splits the training SLICES randomly across its 3 workers, so one "
        "patient spans sites; here every site is a folder of whole patients (split by patient, "
        "see configs/baseline_liver.toml).",
        "Loss: per-example soft Dice (DP-SGD clips per example); the baseline's "
        "segmentation_models_pytorch DiceLoss pools the batch.",
    ]

    config = config_lib.from_dict(out, source=f"{source} (converted)")
    defaults = [f"[{s}] {k} = {BASELINE_DEFAULTS[s][k]}" for s, k in v.used_defaults]
    return Conversion(
        source=source,
        source_sha256=hashlib.sha256(raw_bytes).hexdigest(),
        config=config,
        keys=_ordered(ini, reports),
        defaults=defaults,
        notes=notes,
        schedule=schedule,
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
