"""ε before training, or the noise multiplier that reaches a target ε (dp_accounting)."""

from __future__ import annotations

import math
from typing import Any

from tff_privseg.config import Config
from tff_privseg.data import SiteData
from tff_privseg.privacy.accounting import (
    PrivacyLedger,
    UnitLedger,
    calibrate_noise,
    dp_sgd_event,
    epsilon,
)
from tff_privseg.privacy.schedule import (
    local_steps,
    patient_slices,
    records,
    sampling_rate,
    sites_per_round,
)


def new_ledger(cfg: Config, sites: list[SiteData]) -> PrivacyLedger:
    """The empty ledger of a run: its accounting units (sites, or the federation), q and n."""
    return ledger_of_sites(cfg, {s.name: records(cfg, s) for s in sites})


def ledger_of_sites(cfg: Config, site_records: dict[str, int]) -> PrivacyLedger:
    """The empty ledger of a run from each site's record count n (q follows from n and the
    config; a cross-silo coordinator has only the counts the sites state)."""
    p = cfg.privacy
    ledger = PrivacyLedger(
        level=p.level,
        accountant=p.accountant,
        noise_multiplier=p.noise_multiplier,
        l2_norm_clip=p.l2_norm_clip,
        delta=p.delta,
    )
    if p.level == "sample":
        ledger.unit = p.unit
        for name, n in site_records.items():
            ledger.units[name] = UnitLedger(sampling_rate(cfg, n), 0, n)
    elif p.level == "site":
        ledger.unit = "site"
        k = len(site_records)
        ledger.units["federation"] = UnitLedger(sites_per_round(cfg, k) / k, 0, k)
    ledger.refresh()
    return ledger


def unit_schedule(cfg: Config, site_sizes: dict[str, int]) -> dict[str, tuple[float, int]]:
    # site_sizes: privacy records per site (slices, or patients when privacy.unit = "patient")
    """(sampling rate, steps) per accounting unit if every round runs.

    Sample level: one unit per site, q = batch_size / n, steps = rounds × local steps (every
    site assumed in every round: an upper bound when sites are sampled). Site level: one unit,
    q = sites_per_round / sites, one step per round.
    """
    t = cfg.train
    if cfg.privacy.level == "site":
        k = sites_per_round(cfg, len(site_sizes))
        return {"federation": (k / len(site_sizes), t.rounds)}
    return {
        name: (sampling_rate(cfg, n), t.rounds * local_steps(cfg, n))
        for name, n in site_sizes.items()
    }


def group_privacy(eps: float, delta: float, k: int) -> tuple[float, float]:
    """(ε, δ) for a group of k records from (ε, δ)-DP for one: (kε, k·e^{(k-1)ε}·δ)."""
    log_delta = math.log(k) + (k - 1) * eps + math.log(delta)
    return k * eps, 1.0 if log_delta >= 0 else math.exp(log_delta)


def group_epsilons(event: Any, ks: list[int], delta: float, points: int = 400) -> dict:
    """{k: the smallest group-privacy ε for a group of k records at `delta`, or None}.

    Group privacy holds for every (ε', δ') the one-record mechanism satisfies: the group is
    (kε', k·e^{(k-1)ε'}·δ')-DP. Evaluated at the fixed δ' = δ this is vacuous for k > 1 at
    practical ε' (k·e^{(k-1)ε'}·δ ≥ 1). Here δ' runs over a log grid from δ down to 1e-300,
    ε'(δ') comes from the RDP accountant (a valid upper bound whichever accountant the run
    uses; the PLD accountant truncates tiny δ'), and the smallest kε' whose group δ stays
    ≤ `delta` is kept. None: no δ' on the grid gives a group δ ≤ `delta` (no meaningful bound).
    """
    import numpy as np

    from tff_privseg.privacy.accounting import make_accountant

    accountant = make_accountant("rdp")
    accountant.compose(event)
    grid = np.linspace(math.log(delta), math.log(1e-300), points)
    eps1 = np.array([float(accountant.get_epsilon(math.exp(d))) for d in grid])
    out = {}
    for k in ks:
        ok = np.isfinite(eps1) & (math.log(k) + (k - 1) * eps1 + grid <= math.log(delta))
        out[k] = float(k * eps1[ok].min()) if ok.any() else None
    return out


def patient_view(
    cfg: Config, slice_plan: dict[str, Any], patients: dict[str, int], max_slices: dict[str, int]
) -> dict[str, Any]:
    """What a slice-level guarantee means per patient, beside patient-level DP at the same noise.

    patients / max_slices: training patients per site and the most slices any one of them has.
    group_epsilon: group privacy for that many slices at the run's δ (`group_epsilons`), None
    when there is no meaningful bound; largest_bounded_group: the most slices for which there
    is one; naive_group_delta: the δ of the textbook conversion at the slice-level (ε, δ)
    itself, (kε, k·e^{(k-1)ε}·δ), usually 1 (vacuous).
    """
    out = {}
    for name, unit in slice_plan["units"].items():
        k = max_slices[name]
        event = dp_sgd_event(unit["sampling_rate"], slice_plan["noise_multiplier"], unit["steps"])
        groups = group_epsilons(event, list(range(1, k + 1)), cfg.privacy.delta)
        _, naive_delta = group_privacy(unit["epsilon"], cfg.privacy.delta, k)
        q = min(1.0, cfg.train.batch_size / patients[name])
        eps_p = epsilon(
            dp_sgd_event(q, slice_plan["noise_multiplier"], unit["steps"]),
            cfg.privacy.delta,
            cfg.privacy.accountant,
        )
        out[name] = {
            "slices_per_patient": k,
            "group_epsilon": groups[k],
            "group_delta": cfg.privacy.delta,
            "naive_group_delta": naive_delta,
            "largest_bounded_group": max(
                (j for j, e in groups.items() if e is not None), default=0
            ),
            "patient_level_epsilon": eps_p,
            "patient_sampling_rate": q,
        }
    return out


def site_patient_view(
    cfg: Config, slice_plan: dict[str, Any], sites: list[SiteData]
) -> dict[str, Any]:
    """`patient_view` for these sites' training patients."""
    counts = {s.name: patient_slices(s) for s in sites}
    return patient_view(
        cfg,
        slice_plan,
        {n: len(c) for n, c in counts.items()},
        {n: int(c.max()) for n, c in counts.items()},
    )


def privacy_plan(
    cfg: Config, site_sizes: dict[str, int], target_epsilon: float | None = None
) -> dict[str, Any]:
    """ε per unit for `cfg`, or (with a target) the noise multiplier that reaches it."""
    p = cfg.privacy
    if p.level == "none":
        return {"level": "none", "epsilon": None, "delta": None, "units": {}}
    schedule = unit_schedule(cfg, site_sizes)
    sigma = p.noise_multiplier
    if target_epsilon:
        # The unit with the highest rate and most steps binds: calibrate so that all fit.
        sigma = max(
            calibrate_noise(q, steps, target_epsilon, p.delta, p.accountant)
            for q, steps in schedule.values()
        )
    units = {
        name: {
            "sampling_rate": q,
            "steps": steps,
            "epsilon": epsilon(dp_sgd_event(q, sigma, steps), p.delta, p.accountant),
        }
        for name, (q, steps) in schedule.items()
    }
    return {
        "level": p.level,
        "unit": "site" if p.level == "site" else p.unit,
        "accountant": p.accountant,
        "noise_multiplier": sigma,
        "l2_norm_clip": p.l2_norm_clip,
        "delta": p.delta,
        "rounds": cfg.train.rounds,
        "target_epsilon": target_epsilon,
        "epsilon": max(u["epsilon"] for u in units.values()),
        "units": units,
    }
