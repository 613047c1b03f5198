"""What each round of a run does, from its config: local steps, learning rate, privacy records,
sampling rate and sites per round.

One owner for these numbers: the training driver, the privacy ledger and planning (ε before
training), the run directory's resume checks and the benchmarks all read them here.
"""

from __future__ import annotations

import math

import numpy as np

from tff_privseg.config import Config
from tff_privseg.data import SiteData


def local_steps(cfg: Config, site_size: int) -> int:
    t = cfg.train
    if t.local_epochs > 0:
        return t.local_epochs * math.ceil(site_size / t.batch_size)
    return t.local_steps


def sampling_rate(cfg: Config, records: int) -> float:
    """Poisson rate q = batch_size / records (records: slices, or patients for unit=patient)."""
    return min(1.0, cfg.train.batch_size / records)


def patient_unit(cfg: Config) -> bool:
    return cfg.privacy.level == "sample" and cfg.privacy.unit == "patient"


def patient_slices(site: SiteData) -> np.ndarray:
    """Training slices of each training patient at a site, int [patients]."""
    counts = np.bincount(site.train.volume_index)
    return counts[counts > 0]


def records(cfg: Config, site: SiteData) -> int:
    """Privacy records at a site: training slices, or training patients."""
    if patient_unit(cfg):
        return len(patient_slices(site))
    return len(site.train)


def client_lr(cfg: Config, round_num: int) -> float:
    """Client learning rate of a round (0-based): constant, or log-linear client_lr -> end_lr."""
    t = cfg.train
    if t.lr_schedule == "constant" or t.rounds == 1:
        return t.client_lr
    frac = round_num / (t.rounds - 1)
    return float(t.client_lr * (t.end_lr / t.client_lr) ** frac)


def sites_per_round(cfg: Config, num_sites: int) -> int:
    k = cfg.train.sites_per_round
    return num_sites if k <= 0 or k >= num_sites else k
