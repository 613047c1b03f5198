"""Which examples each site uses in a round, and which sites take part.

All randomness here is a pure function of (seed, round, site), so a resumed run re-draws exactly
what an uninterrupted run draws. Poisson sampling is done here, in numpy, because it is what the
accountant models exactly (each example joins each step independently with probability q).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tff_privseg.config import AugmentConfig
from tff_privseg.data.augment import augment_batch, enabled

_PURPOSE = {"batches": 1, "sites": 2, "noise": 3, "augment": 4}


def rng(seed: int, round_num: int, site: int, purpose: str) -> np.random.Generator:
    """Generator for (seed, round, site, purpose); site -1 means "the federation"."""
    return np.random.default_rng([seed, round_num, site + 1, _PURPOSE[purpose]])


def poisson_batches(n: int, q: float, steps: int, gen: np.random.Generator) -> list[np.ndarray]:
    """`steps` index arrays; each index joins each batch independently with probability q."""
    return [np.flatnonzero(gen.random(n) < q) for _ in range(steps)]


def shuffled_batches(n: int, batch: int, steps: int, gen: np.random.Generator) -> list[np.ndarray]:
    """`steps` batches of min(batch, n) indices, walking through reshuffled epochs."""
    order = np.concatenate([gen.permutation(n) for _ in range(steps * batch // n + 1)])
    size = min(batch, n)
    return [order[i * size : (i + 1) * size] for i in range(steps)]


def sample_sites(
    num_sites: int, per_round: int, poisson: bool, gen: np.random.Generator
) -> np.ndarray:
    """Indices of the sites in a round: all, a uniform subset, or Poisson (site-level DP)."""
    if per_round <= 0 or per_round >= num_sites:
        return np.arange(num_sites)
    if poisson:
        return np.flatnonzero(gen.random(num_sites) < per_round / num_sites)
    return np.sort(gen.choice(num_sites, per_round, replace=False))


def poisson_patient_batches(
    patient_of_slice: np.ndarray, q: float, slots: int, steps: int, gen: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Patient-level Poisson batches: each patient joins each step with probability q.

    A sampled patient contributes `slots` slice slots: `slots` of its slices drawn without
    replacement, or all of them padded with weight-0 slots. Returns (index arrays [P·slots],
    slot weights [P·slots]) per step.
    """
    patients = np.unique(patient_of_slice)
    members = {p: np.flatnonzero(patient_of_slice == p) for p in patients.tolist()}
    batches, weights = [], []
    for _ in range(steps):
        chosen = patients[gen.random(len(patients)) < q]
        idx, wts = [], []
        for p in chosen.tolist():
            own = members[p]
            take = gen.choice(own, min(slots, len(own)), replace=False)
            pad = slots - len(take)
            idx.append(np.concatenate([take, np.full(pad, own[0])]))
            wts.append(np.concatenate([np.ones(len(take)), np.zeros(pad)]))
        batches.append(np.concatenate(idx).astype(np.int64) if idx else np.zeros(0, np.int64))
        weights.append(np.concatenate(wts).astype(np.float32) if wts else np.zeros(0, np.float32))
    return batches, weights


def batches_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batches: list[np.ndarray],
    weights: list[np.ndarray] | None = None,
    augment: AugmentConfig | None = None,
    seed: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Variable-size batches (x float32 [b,H,W,1], y int32 [b,H,W], w float32 [b]) per step.

    weights: slot weights per batch (default 1). augment: per-site augmentation, seeded by
    `seed` (int64 [2]) and the step number.
    """
    index = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    lengths = np.array([len(b) for b in batches], np.int64)
    if weights is None:
        weights = [np.ones(len(b), np.float32) for b in batches]
    w_flat = np.concatenate(weights).astype(np.float32) if weights else np.zeros(0, np.float32)
    x = tf.RaggedTensor.from_row_lengths(images[index].astype(np.float32), lengths)
    y = tf.RaggedTensor.from_row_lengths(labels[index].astype(np.int32), lengths)
    w = tf.RaggedTensor.from_row_lengths(w_flat, lengths)
    # Slices of a ragged-rank-1 tensor are dense; the identity map makes the spec say so.
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).map(lambda a, b, c: (a, b, c))
    if augment is not None and enabled(augment):
        base = tf.constant(np.zeros(2, np.int64) if seed is None else seed, tf.int64)
        steps = tf.data.Dataset.range(len(batches))
        ds = tf.data.Dataset.zip((ds, steps)).map(
            lambda batch, i: augment_batch(
                *batch, tf.random.experimental.stateless_fold_in(base, i), augment
            )
        )
    return ds


def noise_seed(run_key: int, round_num: int, site: int) -> np.ndarray:
    """int64 [2]: the secret seed of a site's DP noise in a round (derived from the run key)."""
    return rng(run_key, round_num, site, "noise").integers(0, 2**62, size=2, dtype=np.int64)
