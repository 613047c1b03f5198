"""Secret, per-record sampling (issue 16): what the DP analysis assumes about the sample.

- the released stream: batches, slots, augmentation and site samples come from the secret run
  key, not from the public config (different keys draw different plans, the same key the same
  plan whatever `train.seed` says), and metrics rows under DP carry nothing that is an exact
  function of the sample;
- neighbouring datasets: adding one record, at any position, changes no other record's
  inclusion, slot choice or augmentation, and the clipped sum of a step (the real client's
  DP-SGD computation, augmentation on) moves by at most C.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tff_privseg import config
from tff_privseg.config import AugmentConfig, ModelConfig
from tff_privseg.data.slices import SiteData, SliceSet, VolumeInfo
from tff_privseg.federated import sampling
from tff_privseg.federated.train import plan_round, round_row
from tff_privseg.losses import get_loss
from tff_privseg.models import build_model
from tff_privseg.privacy.dp_sgd import SeededGaussianSumQuery, dp_gradient
from tff_privseg.privacy.records import record_dp_gradient

R = 16
AUG = AugmentConfig(rotation=20.0, translate=0.1, scale=0.1, noise_std=0.05, noise_prob=0.5)


def volume(site: str, case: str, k: int) -> VolumeInfo:
    eye = np.eye(4)
    return VolumeInfo(site, case, "", "", eye, (R, R, k), (R, R, k), (1.0, 1.0, 1.0), (0, k))


def slice_set(site: str, rows: list[tuple[str, np.ndarray, np.ndarray]]) -> SliceSet:
    """Rows (case, image [R,R,1], label [R,R]) in the given array order; volumes in order of
    first appearance; a volume's slices in row order."""
    cases = list(dict.fromkeys(c for c, _, _ in rows))
    counts = {c: sum(1 for r in rows if r[0] == c) for c in cases}
    return SliceSet(
        images=np.stack([r[1] for r in rows]).astype(np.float32),
        labels=np.stack([r[2] for r in rows]).astype(np.uint8),
        volume_index=np.array([cases.index(r[0]) for r in rows], np.int32),
        volumes=[volume(site, c, counts[c]) for c in cases],
    )


def synthetic_rows(
    cases: dict[str, int], seed: int = 0
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    rows = []
    for case, k in cases.items():
        for _ in range(k):
            img = rng.random((R, R, 1)).astype(np.float32)
            lbl = (img[..., 0] > 0.6).astype(np.uint8)
            rows.append((case, img, lbl))
    return rows


def site_data(name: str, rows) -> SiteData:
    empty = SliceSet.empty(R)
    return SiteData(name, slice_set(name, rows), empty, empty)


def dp_cfg(**over) -> config.Config:
    base = {
        "data": {"resolution": R},
        "train": {"rounds": 3, "local_steps": 4, "batch_size": 4, "seed": 0},
        "privacy": {"level": "sample", "noise_multiplier": 1.0, "l2_norm_clip": 1.0},
    }
    for key, value in over.items():
        section, field = key.split(".", 1)
        if "." in field:
            sub, field = field.split(".")
            base.setdefault(section, {}).setdefault(sub, {})[field] = value
        else:
            base.setdefault(section, {})[field] = value
    return config.from_dict(base)


SITES = [
    site_data(n, synthetic_rows({f"{n}{p}": 3 + p % 3 for p in range(12)}, seed=i))
    for i, n in enumerate(["siteA", "siteB", "siteC"])
]


def plan_key(plan, sites) -> tuple:
    """A plan by record identity: per site and step, the ids (and weights, aug seeds)."""
    out = []
    for i in plan.sites:
        ids = sampling.record_ids(sites[i].name, sites[i].train).slices
        for s, batch in enumerate(plan.batches[i]):
            w = plan.weights[i][s].tolist() if plan.weights[i] is not None else None
            a = plan.augment[i][s].tolist() if plan.augment.get(i) is not None else None
            out.append((sites[i].name, s, [ids[j] for j in batch.tolist()], w, a))
    return tuple(map(repr, out))


@pytest.mark.parametrize("unit", ["slice", "patient"])
def test_dp_batches_come_from_the_secret_key_not_the_config_seed(unit):
    cfg = dp_cfg(
        **{"privacy.unit": unit, "privacy.slices_per_patient": 2, "data.augment.rotation": 10.0}
    )
    a = plan_key(plan_round(cfg, SITES, 1, 11), SITES)
    assert a == plan_key(plan_round(cfg, SITES, 1, 11), SITES)  # same key: same plan
    assert a != plan_key(plan_round(cfg, SITES, 1, 12), SITES)  # two runs, two keys: different
    other_seed = cfg.replace(**{"train.seed": 99})
    assert a == plan_key(plan_round(other_seed, SITES, 1, 11), SITES)  # train.seed plays no part
    assert a != plan_key(plan_round(cfg, SITES, 2, 11), SITES)  # fresh draws every round
    # noise seeds too
    p, q = plan_round(cfg, SITES, 1, 11), plan_round(cfg, SITES, 1, 12)
    assert all(not np.array_equal(p.seeds[i], q.seeds[i]) for i in p.sites)


def test_run_key_may_be_int_bytes_or_str():
    cfg = dp_cfg()
    plans = [
        plan_key(plan_round(cfg, SITES, 0, key), SITES) for key in (5, b"\x01" * 32, "a" * 200)
    ]
    assert len(set(map(repr, plans))) == 3  # three keys, three different samples
    assert plan_key(plan_round(cfg, SITES, 0, b"k"), SITES) != plan_key(
        plan_round(cfg, SITES, 0, "k"), SITES
    )


def test_site_level_dp_site_sample_comes_from_the_key():
    names = [f"site{i}" for i in range(40)]
    a = sampling.poisson_sites(names, 0.25, 1, 0)
    assert np.array_equal(a, sampling.poisson_sites(names, 0.25, 1, 0))
    assert not np.array_equal(a, sampling.poisson_sites(names, 0.25, 2, 0))
    # by name: adding a site changes no other site's draw
    b = sampling.poisson_sites(names[:7] + ["new"] + names[7:], 0.25, 1, 0)
    assert len(a) > 0 and len(a) < len(names)
    assert set(np.array(names)[a]) == set(np.array(names[:7] + ["new"] + names[7:])[b]) - {"new"}


def test_metrics_rows_under_dp_carry_nothing_exact_about_the_sample():
    common = dict(val_dice=0.5, epsilon=1.0, seconds=1.0, loss=0.3, examples=17, sites=["a"])
    none = round_row(dp_cfg(**{"privacy.level": "none"}), 1, **common)
    assert none["loss"] == 0.3 and none["examples"] == 17 and none["sites"] == ["a"]
    sample = round_row(dp_cfg(), 1, **common)
    assert set(sample) == {"round", "val_dice", "epsilon", "delta", "seconds", "sites"}
    site = round_row(dp_cfg(**{"privacy.level": "site"}), 1, **common)
    assert set(site) == {"round", "val_dice", "epsilon", "delta", "seconds"}


# --- neighbouring datasets -------------------------------------------------------------------


def by_identity(site: SiteData, batches, weights, seeds):
    """Per step: {slice id: (weight, augmentation seed)} of the slots drawn."""
    ids = sampling.record_ids(site.name, site.train).slices
    out = []
    for s, batch in enumerate(batches):
        w = weights[s] if weights is not None else np.ones(len(batch))
        out.append(
            {
                # a padding slot is named by its slot within the record (2 slots per record)
                (ids[j], k % 2 if w[k] == 0 else -1): (float(w[k]), tuple(seeds[s][k]))
                for k, j in enumerate(batch.tolist())
            }
        )
    return out


def draws(site: SiteData, unit: str, q: float, steps: int = 6, key: int = 3, round_num: int = 2):
    ids = sampling.record_ids(site.name, site.train)
    if unit == "patient":
        batches, weights = sampling.poisson_patient_batches(
            site.train.volume_index, ids, q, 2, steps, key, round_num
        )
    else:
        batches, weights = sampling.poisson_batches(ids.slices, q, steps, key, round_num), None
    seeds = sampling.slot_seeds(ids.slices, batches, key, round_num)
    return batches, weights, seeds, by_identity(site, batches, weights, seeds)


def without(step: dict, case: str) -> dict:
    return {k: v for k, v in step.items() if not k[0].startswith(f"s\0{case}\0".encode())}


@pytest.mark.parametrize("unit", ["slice", "patient"])
def test_adding_a_record_anywhere_changes_no_other_records_draws(unit):
    base = synthetic_rows({"p0": 3, "p1": 1, "p2": 4, "p3": 2, "p4": 3})
    new = synthetic_rows({"new": 1 if unit == "slice" else 3}, seed=9)
    q = 0.5
    ref = draws(site_data("s", base), unit, q)[3]
    assert any(len(step) for step in ref)
    for pos in range(len(base) + 1):
        rows = base[:pos] + new + base[pos:]
        got = draws(site_data("s", rows), unit, q)[3]
        for before, after in zip(ref, got, strict=True):
            assert without(after, "new") == before, pos  # every other record: same draws


@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("unit", ["slice", "patient"])
def test_with_augmentation_adding_a_record_anywhere_moves_the_clipped_sum_by_at_most_c(unit, views):
    """The audit's case: with a fixed, position-folded augmentation seed, a record inserted at
    the front of a batch moved the clipped sum by 0.82 at C = 0.7. Now every slot carries its
    own seed, so the other records' contributions stay put (the old scheme, emulated on this
    test's data, moved it by up to 2.26 C). Patient unit: records of 2 slots, clipped as one.
    views = 3: augmentation multiplicity, every record as 3 augmented views averaged before
    the clip (`sampling.with_views`): the bound holds for the record as a whole."""
    clip = 0.05  # every record's gradient is clipped (norms are ~0.1-1 here)
    model = build_model(ModelConfig(name="unet", depth=2, base_filters=4, groups=2), R, seed=0)
    base = synthetic_rows({"p0": 2, "p1": 1, "p2": 3})
    new = synthetic_rows({"new": 1 if unit == "slice" else 3}, seed=9)
    query = SeededGaussianSumQuery(clip, 0.0, tf.constant([1, 2], tf.int64))  # no noise

    def step_sum(rows):
        site = site_data("s", rows)
        ids = sampling.record_ids("s", site.train)
        if unit == "slice":  # q = 1: everyone is in
            batches, weights = sampling.poisson_batches(ids.slices, 1.0, 1, 3, 0), None
        else:
            batches, weights = sampling.poisson_patient_batches(
                site.train.volume_index, ids, 1.0, 2, 1, 3, 0
            )
        slots = 1 if unit == "slice" else 2
        view_of = None
        if views > 1:
            if weights is None:
                weights = [np.ones(len(b), np.float32) for b in batches]
            batches, weights, view_of = sampling.with_views(batches, weights, slots, views)
        seeds = sampling.slot_seeds(ids.slices, batches, 3, 0, view_of)
        ds = sampling.batches_dataset(
            site.train.images, site.train.labels, batches, weights, augment=AUG, seeds=seeds
        )
        x, y, w = next(iter(ds))
        assert not np.allclose(x.numpy(), site.train.images[batches[0]])  # augmented
        if unit == "slice" and views == 1:  # the client's DP-SGD sum (expected batch 1: the sum)
            return dp_gradient(model, get_loss("dice"), x, y, query, 1.0)[0]
        return record_dp_gradient(model, get_loss("dice"), x, y, w, slots * views, query, 1.0)[0]

    ref = step_sum(base)
    for pos in range(len(base) + 1):
        moved = tf.linalg.global_norm(
            [a - b for a, b in zip(step_sum(base[:pos] + new + base[pos:]), ref, strict=True)]
        )
        assert float(moved) <= clip * (1 + 1e-4), pos
        assert float(moved) > 0.5 * clip  # the new record is in and counts


def test_augmentation_multiplicity_views_differ_and_average_before_the_clip():
    """Each record becomes M consecutive views of its slots, each view augmented from its own
    seed (view 0 as without multiplicity); the record's gradient is the mean over its views,
    and only then clipped: one record moves the step by at most C whatever M is."""
    site = site_data("s", synthetic_rows({"p0": 2, "p1": 3, "p2": 2}))
    ids = sampling.record_ids("s", site.train)
    batches, weights = sampling.poisson_patient_batches(
        site.train.volume_index, ids, 1.0, 2, 1, 3, 0
    )
    vb, vw, view_of = sampling.with_views(batches, weights, 2, 3)
    assert len(vb[0]) == 3 * len(batches[0])
    assert view_of[0].tolist() == [0, 0, 1, 1, 2, 2] * 3  # [record][view][slot]
    assert vb[0].reshape(3, 3, 2)[:, 1].tolist() == batches[0].reshape(3, 2).tolist()
    assert vw[0].reshape(3, 3, 2)[:, 2].tolist() == weights[0].reshape(3, 2).tolist()
    seeds = sampling.slot_seeds(ids.slices, vb, 3, 0, view_of)[0].reshape(3, 3, 2, 2)
    plain = sampling.slot_seeds(ids.slices, batches, 3, 0)[0].reshape(3, 2, 2)
    np.testing.assert_array_equal(seeds[:, 0], plain)  # view 0 = no multiplicity
    assert len({tuple(s) for s in seeds[0, :, 0].tolist()}) == 3  # three different views

    ds = sampling.batches_dataset(
        site.train.images, site.train.labels, vb, vw, augment=AUG, seeds=[seeds.reshape(-1, 2)]
    )
    x, y, w = next(iter(ds))
    model = build_model(ModelConfig(name="unet", depth=2, base_filters=4, groups=2), R, seed=0)
    loss = get_loss("dice")

    def summed(clip, xs, ys, ws, group):
        query = SeededGaussianSumQuery(clip, 0.0, tf.constant([1, 2], tf.int64))
        return record_dp_gradient(model, loss, xs, ys, ws, group, query, 1.0)[0]

    # no clipping (huge C): the sum over records of the mean over views = mean over views
    rows = np.arange(len(vb[0])).reshape(3, 3, 2)  # [record, view, slot]
    whole = summed(1e6, x, y, w, 6)
    per_view = [
        summed(1e6, *(tf.gather(t, rows[:, v].reshape(-1)) for t in (x, y, w)), 2) for v in range(3)
    ]
    for i, g in enumerate(whole):
        mean = sum(p[i] for p in per_view) / 3.0
        np.testing.assert_allclose(g.numpy(), mean.numpy(), rtol=2e-4, atol=1e-6)
    # clipped: every record (its 3 views together) to C, so one record's sum has norm <= C
    clip = 1e-3
    for r in range(3):
        one = summed(clip, *(tf.gather(t, rows[r].reshape(-1)) for t in (x, y, w)), 6)
        norm = float(tf.linalg.global_norm(one))
        assert 0.99 * clip < norm <= clip * (1 + 1e-4)


def test_plan_with_multiplicity_gives_records_of_slots_times_views():
    from tff_privseg.privacy.dp_sgd import dp_sgd_spec

    aug = {"data.augment.rotation": 10.0, "data.augment.multiplicity": 3}
    for unit, slots in (("slice", 1), ("patient", 2)):
        cfg = dp_cfg(**aug, **{"privacy.unit": unit, "privacy.slices_per_patient": 2})
        assert dp_sgd_spec(cfg).group == slots * 3
        plan = plan_round(cfg, SITES, 1, 11)
        plain = plan_round(cfg.replace(**{"data.augment.multiplicity": 1}), SITES, 1, 11)
        for i in plan.sites:
            for b, w, a, b1 in zip(
                plan.batches[i], plan.weights[i], plan.augment[i], plain.batches[i], strict=True
            ):
                assert len(b) == len(w) == len(a) == 3 * len(b1)  # same records, 3 views each
                assert b.reshape(-1, 3, slots)[:, 0].reshape(-1).tolist() == b1.tolist()
    with pytest.raises(config.UserError, match="multiplicity"):
        dp_cfg(**{"data.augment.multiplicity": 2})  # no augmentation: identical views


def test_site_level_inner_batches_follow_the_site_name_not_its_index():
    """At site level the record is a site: adding one must not move another site's batches."""
    cfg = dp_cfg(**{"privacy.level": "site"})
    extra = site_data("siteX", synthetic_rows({"x0": 4}, seed=5))
    a = plan_round(cfg, SITES, 1, 11)
    b = plan_round(cfg, [extra, *SITES], 1, 11)
    for i, site in enumerate(SITES):
        for s, (p, q) in enumerate(zip(a.batches[i], b.batches[i + 1], strict=True)):
            assert np.array_equal(p, q), (site.name, s)
        assert np.array_equal(a.seeds[i], b.seeds[i + 1])


def test_a_case_id_twice_at_a_site_is_refused():
    rows = synthetic_rows({"p0": 2, "p1": 1})
    data = slice_set("s", rows)
    data.volumes[1] = data.volumes[0]
    with pytest.raises(ValueError, match="case id occurs twice"):
        sampling.record_ids("s", data)
