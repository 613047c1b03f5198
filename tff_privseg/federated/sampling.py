"""Which records each site uses in a round, how they are augmented, and which sites take part.

Differential privacy by subsampling (and the per-record bound on the clipped sum) assumes that
every random choice about a record is secret and depends on that record alone. So every such
choice here comes from a keyed pseudo-random function (BLAKE2b in keyed mode) of the run's
secret key and the record's own identity (site name, case id, slice position within its volume),
never from the record's position in an array, the other records, or the public `train.seed`:

- Poisson inclusion: record r joins step s of round t iff U(key, "batches", t, s, id_r) < q;
- patient unit: patient p joins iff U(key, "patients", t, s, id_p) < q; its slot slices are
  the `slots` of its slices with the smallest U(key, "slots", t, s, id_slice);
- augmentation: each slot gets its own int64 [2] stateless seed PRF(key, "augment", t, s,
  id_slice), carried through tf.data next to the slot;
- site-level DP: site k takes part iff U(key, "sites", t, 0, name_k) < q;
- the DP noise seed of a site in a round: PRF(key, "noise", t, 0, site name).

Adding or removing one record therefore changes nothing about any other record. Everything is a
pure function of (key, round, identities), so a resumed run re-draws what an uninterrupted run
draws. Public choices stay on `train.seed`, reproducible from the config: the shuffled batches
of runs without DP and of site-level DP (`site_rng`, by site name: there the record is a whole
site, whose update is clipped as one, so its inner batches need no secrecy but must not shift
when another site is added), and the fixed-size site subset of sample-level or non-private runs
(`rng`). Why not the key there too: nothing in the analysis depends on them, and runs without
DP stay reproducible from their config (baselines, parity).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tff_privseg.config import AugmentConfig
from tff_privseg.data.augment import augment_batch, enabled
from tff_privseg.data.slices import SliceSet
from tff_privseg.rundir.key import Key, key_bytes

_PURPOSE = {"batches": 1, "sites": 2, "noise": 3, "augment": 4}


def rng(seed: int, round_num: int, site: int, purpose: str) -> np.random.Generator:
    """Generator of PUBLIC randomness for (seed, round, site, purpose); site -1: the federation.

    Only for choices that need no secrecy (non-private shuffling, fixed-size site subsets).
    """
    return np.random.default_rng([seed, round_num, site + 1, _PURPOSE[purpose]])


def site_rng(seed: int, round_num: int, site: str, purpose: str) -> np.random.Generator:
    """Public randomness of one site, by its name (not its index: adding a site at site-level
    DP must not change another site's draws)."""
    name = int.from_bytes(hashlib.sha256(site.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, round_num, name, _PURPOSE[purpose]])


# --- the keyed PRF -------------------------------------------------------------------------


def public_key(seed: int) -> bytes:
    """A key derived from the public `train.seed`, for runs without DP (reproducible)."""
    return b"public-train-seed:" + str(int(seed)).encode()


def prf_words(
    key: Key, purpose: str, round_num: int, step: int, ids: Sequence[bytes], words: int
) -> np.ndarray:
    """uint64 [len(ids), words]: PRF_key(purpose, round, step, id) for every id.

    One keyed BLAKE2b digest (64 bytes = 8 words) per id and block of 8 words; round and step
    go into the salt, purpose and block into the personalisation, the id is the message.
    """
    k = key_bytes(key)
    if len(purpose) > 8:
        raise ValueError(f"purpose too long: {purpose!r}")
    salt = struct.pack("<qq", round_num, step)
    out = np.empty((len(ids), 8 * -(-words // 8)), np.uint64)
    for block in range(-(-words // 8)):
        person = purpose.encode().ljust(8, b"\0") + struct.pack("<q", block)
        digests = b"".join(
            hashlib.blake2b(i, key=k, salt=salt, person=person).digest() for i in ids
        )
        out[:, 8 * block : 8 * block + 8] = np.frombuffer(digests, "<u8").reshape(len(ids), 8)
    return out[:, :words]


def uniforms(words: np.ndarray) -> np.ndarray:
    """float64 in [0, 1) from uint64 (the top 53 bits)."""
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


# --- record identities ---------------------------------------------------------------------


@dataclass(frozen=True)
class RecordIds:
    """Stable identities of a site's training records, independent of array positions.

    slices[i]: site, case id and position of row i within its volume (ascending z);
    volumes[v]: site and case id of volume v (a patient: one case id).
    """

    slices: list[bytes]
    volumes: list[bytes]


def record_ids(site: str, data: SliceSet) -> RecordIds:
    volumes = [f"{site}\0{v.case}".encode() for v in data.volumes]
    if len(set(volumes)) != len(volumes):  # two patients would share every draw
        raise ValueError(f"site {site!r}: a case id occurs twice among its training volumes")
    index = np.asarray(data.volume_index, np.int64)
    if len(index) == 0:
        return RecordIds([], volumes)
    order = np.argsort(index, kind="stable")
    starts = np.searchsorted(index[order], np.arange(len(volumes)))
    position = np.empty(len(index), np.int64)
    position[order] = np.arange(len(index)) - starts[index[order]]
    slices = [
        volumes[v] + b"\0%d" % j for v, j in zip(index.tolist(), position.tolist(), strict=True)
    ]
    return RecordIds(slices, volumes)


# --- batches ------------------------------------------------------------------------------


def poisson_batches(
    ids: Sequence[bytes], q: float, steps: int, key: Key, round_num: int
) -> list[np.ndarray]:
    """`steps` index arrays; record i joins each step independently with probability q,
    decided by the keyed PRF of its identity ids[i] (nothing else)."""
    if steps == 0:
        return []
    u = uniforms(prf_words(key, "batches", round_num, 0, ids, steps))
    return [np.flatnonzero(u[:, s] < q) for s in range(steps)]


def shuffled_batches(n: int, batch: int, steps: int, gen: np.random.Generator) -> list[np.ndarray]:
    """`steps` batches of min(batch, n) indices, walking through reshuffled epochs (non-private:
    `gen` is public randomness)."""
    order = np.concatenate([gen.permutation(n) for _ in range(steps * batch // n + 1)])
    size = min(batch, n)
    return [order[i * size : (i + 1) * size] for i in range(steps)]


def sample_sites(num_sites: int, per_round: int, gen: np.random.Generator) -> np.ndarray:
    """Indices of the sites in a round: all, or a uniform subset of `per_round` (public)."""
    if per_round <= 0 or per_round >= num_sites:
        return np.arange(num_sites)
    return np.sort(gen.choice(num_sites, per_round, replace=False))


def poisson_sites(names: Sequence[str], q: float, key: Key, round_num: int) -> np.ndarray:
    """Site-level DP: site k joins the round with probability q, by the PRF of its name."""
    if q >= 1.0:
        return np.arange(len(names))
    u = uniforms(prf_words(key, "sites", round_num, 0, [n.encode() for n in names], 1))[:, 0]
    return np.flatnonzero(u < q)


def poisson_patient_batches(
    patient_of_slice: np.ndarray,
    ids: RecordIds,
    q: float,
    slots: int,
    steps: int,
    key: Key,
    round_num: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Patient-level Poisson batches: each patient joins each step with probability q.

    A sampled patient contributes `slots` slice slots: the `slots` of its slices with the
    smallest PRF value (a uniform choice without replacement), or all of them padded with
    weight-0 slots (copies of its first slice). Patient p's inclusion depends on the key and
    ids.volumes[p]; its slots on the key and its own slices' ids. Returns (index arrays
    [P·slots], slot weights [P·slots]) per step; patients in ascending volume index.
    """
    patient_of_slice = np.asarray(patient_of_slice, np.int64)
    patients, first_row = np.unique(patient_of_slice, return_index=True)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
    if steps == 0:
        return [], []
    patient_ids = [ids.volumes[p] for p in patients.tolist()]
    joined = uniforms(prf_words(key, "patients", round_num, 0, patient_ids, steps)) < q  # [P, T]
    # slot keys only for slices of patients that join some step
    member = np.isin(patient_of_slice, patients[joined.any(axis=1)])
    rows = np.flatnonzero(member)
    slot_keys = prf_words(key, "slots", round_num, 0, [ids.slices[i] for i in rows.tolist()], steps)
    batches, weights = [], []
    for s in range(steps):
        chosen = patients[joined[:, s]]
        if len(chosen) == 0:
            batches.append(empty[0])
            weights.append(empty[1])
            continue
        sub = np.isin(patient_of_slice[rows], chosen)
        r, p, k = rows[sub], patient_of_slice[rows][sub], slot_keys[sub, s]
        order = np.lexsort((k, p))  # by patient, then by PRF value
        r, p = r[order], p[order]
        group_start = np.searchsorted(p, p, side="left")
        rank = np.arange(len(p)) - group_start
        keep = rank < slots
        slot_of = np.searchsorted(chosen, p[keep])
        pad = first_row[joined[:, s]]  # padding slots: the patient's first slice, weight 0
        idx = np.repeat(pad.astype(np.int64)[:, None], slots, axis=1)
        wts = np.zeros((len(chosen), slots), np.float32)
        idx[slot_of, rank[keep]] = r[keep]
        wts[slot_of, rank[keep]] = 1.0
        batches.append(idx.reshape(-1))
        weights.append(wts.reshape(-1))
    return batches, weights


def slot_seeds(
    ids: Sequence[bytes],
    batches: list[np.ndarray],
    key: Key,
    round_num: int,
    views: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """int64 [b, 2] per step: slot j of step s gets PRF(key, "augment", round, s, id of its
    slice), whatever else is in the batch and wherever the slot sits in it.

    views: the view number of every slot (`with_views`); view v > 0 of a slice is augmented
    from the id extended by v, so the views of one slice differ (view 0 keeps the plain id).
    """
    seeds = []
    for s, batch in enumerate(batches):
        names = [ids[i] for i in batch.tolist()]
        if views is not None:
            pairs = zip(names, views[s].tolist(), strict=True)
            names = [n if v == 0 else n + b"\0view%d" % v for n, v in pairs]
        words = prf_words(key, "augment", round_num, s, names, 2)
        seeds.append(words.view(np.int64).reshape(len(batch), 2))
    return seeds


def with_views(
    batches: list[np.ndarray], weights: list[np.ndarray] | None, rows: int, views: int
) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[np.ndarray]]:
    """Augmentation multiplicity: every record (`rows` consecutive slots) repeated as `views`
    consecutive copies, so a record becomes rows·views rows: [record][view][slot].

    Returns (index arrays, slot weights or None, the view number of every slot) per step.
    """

    def expand(a: np.ndarray) -> np.ndarray:
        return np.repeat(a.reshape(-1, 1, rows), views, axis=1).reshape(-1)

    out = [expand(b) for b in batches]
    view_of = [
        np.tile(np.repeat(np.arange(views), rows), len(b) // rows).astype(np.int64) for b in batches
    ]
    wts = None if weights is None else [expand(w) for w in weights]
    return out, wts, view_of


def batches_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batches: list[np.ndarray],
    weights: list[np.ndarray] | None = None,
    augment: AugmentConfig | None = None,
    seeds: list[np.ndarray] | None = None,
) -> tf.data.Dataset:
    """Variable-size batches (x float32 [b,H,W,1], y int32 [b,H,W], w float32 [b]) per step.

    weights: slot weights per batch (default 1). augment: per-slot augmentation; `seeds` holds
    each slot's stateless seed (int64 [b, 2] per batch, `slot_seeds`), so a slot's augmentation
    does not depend on its position in the batch or on the other slots.
    """
    index = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    lengths = np.array([len(b) for b in batches], np.int64)
    if weights is None:
        weights = [np.ones(len(b), np.float32) for b in batches]
    w_flat = np.concatenate(weights).astype(np.float32) if weights else np.zeros(0, np.float32)
    x = tf.RaggedTensor.from_row_lengths(images[index].astype(np.float32), lengths)
    y = tf.RaggedTensor.from_row_lengths(labels[index].astype(np.int32), lengths)
    w = tf.RaggedTensor.from_row_lengths(w_flat, lengths)
    if augment is None or not enabled(augment):
        # Slices of a ragged-rank-1 tensor are dense; the identity map makes the spec say so.
        return tf.data.Dataset.from_tensor_slices((x, y, w)).map(lambda a, b, c: (a, b, c))
    if seeds is None or [len(s) for s in seeds] != lengths.tolist():
        raise ValueError("augmentation needs one seed per slot (sampling.slot_seeds)")
    flat = np.concatenate(seeds).astype(np.int64) if seeds else np.zeros((0, 2), np.int64)
    s = tf.RaggedTensor.from_row_lengths(flat.reshape(-1, 2), lengths)
    ds = tf.data.Dataset.from_tensor_slices((x, y, w, s))
    return ds.map(lambda a, b, c, d: augment_batch(a, b, c, d, augment))


def noise_seed(run_key: Key, round_num: int, site: str) -> np.ndarray:
    """int64 [2]: the secret seed of a site's DP noise in a round (PRF of the run key)."""
    words = prf_words(run_key, "noise", round_num, 0, [site.encode()], 2)
    return words.view(np.int64).reshape(2)
