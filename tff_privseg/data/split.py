"""Patient-level train/validation/test split, per site.

Volumes (patients), never slices, are assigned to splits, so no patient is seen in training and
evaluated in test. Each site is split on its own: first ``test_fraction`` of its volumes go to
test, then ``val_fraction`` of the rest to validation. Counts are rounded half up, and a split
with a fraction > 0 gets at least one volume. The permutation comes from
``numpy.random.default_rng([split_seed, sha256(site name)])``: reproducible, independent of the
other sites and of the order in which sites are listed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tff_privseg.errors import UserError


@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def site_seed(site: str) -> int:
    """A stable 64-bit integer for a site name (Python's ``hash`` changes between runs)."""
    return int.from_bytes(hashlib.sha256(site.encode()).digest()[:8], "little")


def _at_least_one(n: int, fraction: float) -> int:
    return 0 if fraction <= 0 else max(1, math.floor(n * fraction + 0.5))


def split_sizes(n: int, test_fraction: float, val_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) volume counts for ``n`` volumes; train may come out < 1."""
    n_test = _at_least_one(n, test_fraction)
    n_val = _at_least_one(n - n_test, val_fraction)
    return n - n_test - n_val, n_val, n_test


def min_volumes(test_fraction: float, val_fraction: float) -> int:
    """Smallest site size for which every split gets what the fractions ask for."""
    n = 1
    while split_sizes(n, test_fraction, val_fraction)[0] < 1 and n < 1_000_000:
        n += 1
    return n


def split_site(
    cases: Sequence[str],
    site: str,
    test_fraction: float,
    val_fraction: float,
    seed: int,
    site_path: str | Path | None = None,
) -> Split:
    """Assign each case id of one site to train, val or test (each tuple sorted)."""
    ordered = sorted(cases)
    n = len(ordered)
    n_train, n_val, n_test = split_sizes(n, test_fraction, val_fraction)
    if n_train < 1:
        need = min_volumes(test_fraction, val_fraction)
        raise UserError(
            f"site '{site}' has {n} volume(s) but test_fraction={test_fraction:g} and "
            f"val_fraction={val_fraction:g} need at least {need} "
            "(>= 1 training volume and >= 1 per non-zero fraction)",
            site_path if site_path is not None else site,
        )
    order = np.random.default_rng([seed, site_seed(site)]).permutation(n)
    picked = [ordered[i] for i in order]
    return Split(
        train=tuple(sorted(picked[n_test + n_val :])),
        val=tuple(sorted(picked[n_test : n_test + n_val])),
        test=tuple(sorted(picked[:n_test])),
    )
