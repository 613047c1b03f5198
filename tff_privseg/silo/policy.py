"""A site's own config: what it accepts from a coordinator, and how it prepares its data.

SITE.toml is an ordinary tff_privseg config (its `[data]` section says how this site's scans are
preprocessed; the rest may be left out) plus a `[site]` table:

    [site]
    name = "siteA"              # optional: default, the data folder's name
    [site.accept]
    unit = "patient"            # privacy unit: "slice", "patient", "site" (DP-FedAvg at the
                                # coordinator: trusted, not enforced here) or "none"
    min_noise_multiplier = 1.0  # DP-SGD σ at least this
    max_sampling_rate = 0.5     # Poisson rate q = batch_size / records at most this
    max_epsilon = 8.0           # the site's whole budget (every run together), at `delta`
    delta = 1e-5
    accountant = "rdp"          # "rdp" or "pld"

A round whose parameters differ from this, or that would take the site's ε over
`max_epsilon`, is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tff_privseg import config as config_lib
from tff_privseg.config import Config
from tff_privseg.errors import UserError

UNITS = ("slice", "patient", "site", "none")


@dataclass(frozen=True)
class SitePolicy:
    unit: str
    min_noise_multiplier: float
    max_sampling_rate: float
    max_epsilon: float
    delta: float
    accountant: str = "rdp"


@dataclass(frozen=True)
class SiteConfig:
    name: str | None
    policy: SitePolicy
    cfg: Config  # its [data] section prepares the site's scans


def load_site_config(path: str | Path) -> SiteConfig:
    path = Path(path)
    raw = config_lib.read_toml(path, "site config file")
    site = raw.pop("site", None)
    if not isinstance(site, dict) or not isinstance(site.get("accept"), dict):
        raise UserError("needs a [site.accept] table (what this site accepts)", path)
    unknown = sorted(set(site) - {"name", "accept"})
    if unknown:
        raise UserError(f"unknown key site.{unknown[0]}", path)
    name = site.get("name")
    if name is not None and (not isinstance(name, str) or not name or "/" in name):
        raise UserError("site.name: a non-empty string without '/'", path)
    accept = dict(site["accept"])
    allowed = {f.name for f in fields(SitePolicy)}
    for key in sorted(set(accept) - allowed):
        raise UserError(f"unknown key site.accept.{key}", path)
    for key in sorted(allowed - set(accept) - {"accountant"}):
        raise UserError(f"missing key site.accept.{key}", path)
    if accept["unit"] not in UNITS:
        raise UserError(f"site.accept.unit: one of {', '.join(UNITS)}", path)
    if accept.get("accountant", "rdp") not in ("rdp", "pld"):
        raise UserError("site.accept.accountant: rdp or pld", path)
    for key in ("min_noise_multiplier", "max_sampling_rate", "max_epsilon", "delta"):
        value = accept[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise UserError(f"site.accept.{key}: a finite number", path)
        accept[key] = float(value)
    if not 0 < accept["max_sampling_rate"] <= 1 or not 0 < accept["delta"] < 1:
        raise UserError("site.accept: max_sampling_rate in (0, 1] and delta in (0, 1)", path)
    if accept["min_noise_multiplier"] < 0 or accept["max_epsilon"] <= 0:
        raise UserError("site.accept: min_noise_multiplier >= 0 and max_epsilon > 0", path)
    return SiteConfig(name, SitePolicy(**accept), config_lib.from_dict(raw, source=str(path)))


def unit_of(cfg: Config) -> str:
    level = cfg.privacy.level
    return level if level in ("none", "site") else cfg.privacy.unit


def refusal(policy: SitePolicy, cfg: Config, sampling_rate: float | None) -> str | None:
    """Why the site refuses to train under `cfg` (one line), or None."""
    unit = unit_of(cfg)
    if unit != policy.unit:
        return f"privacy unit {unit!r} differs from the site's {policy.unit!r}"
    if unit == "none":
        return None
    p = cfg.privacy
    if p.noise_multiplier < policy.min_noise_multiplier:
        return (
            f"noise multiplier {p.noise_multiplier:g} is below the site's minimum "
            f"{policy.min_noise_multiplier:g}"
        )
    if p.delta != policy.delta:
        return f"delta {p.delta:g} differs from the site's {policy.delta:g}"
    if p.accountant != policy.accountant:
        return f"accountant {p.accountant!r} differs from the site's {policy.accountant!r}"
    if unit != "site" and sampling_rate is not None and sampling_rate > policy.max_sampling_rate:
        return (
            f"sampling rate {sampling_rate:.4g} exceeds the site's maximum "
            f"{policy.max_sampling_rate:g}"
        )
    return None


def data_differences(own: Config, theirs: Config) -> list[str]:
    """[data] keys that change the site's slices or split (they must agree for the model and
    for the same records), where the coordinator's config differs from the site's."""
    from tff_privseg.data.loader import preprocess_settings

    a = {**preprocess_settings(own.data), **_split(own)}
    b = {**preprocess_settings(theirs.data), **_split(theirs)}
    return sorted(f"data.{k}" for k in a if k != "version" and a[k] != b.get(k))


def _split(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    return {
        "test_fraction": d.test_fraction,
        "val_fraction": d.val_fraction,
        "split_seed": d.split_seed,
        "layout": d.layout,
        "num_classes": d.num_classes,
    }
