"""Privacy accounting with dp_accounting: DP events per level, ε(δ), noise calibration, ledger.

Everything needed to recompute ε is recorded in the ledger (`privacy.json`); `epsilon_of_ledger`
recomputes it from those numbers alone, which is what the tests do independently.

- sample level (DP-SGD inside each site): every local step of a site is a Poisson-subsampled
  Gaussian mechanism with rate q = batch_size / site_size; the federation's ε is the maximum over
  sites (disjoint data: parallel composition).
- site level (DP-FedAvg): every round is a Gaussian mechanism on the clipped site updates,
  Poisson-subsampled with q = sites_per_round / sites when sites are sampled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import dp_accounting

Accountant = Literal["rdp", "pld"]

# RDP orders as in tensorflow-privacy's compute_dp_sgd_privacy: dense where the optimum lies.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512]


def dp_sgd_event(
    sampling_rate: float, noise_multiplier: float, steps: int
) -> dp_accounting.DpEvent:
    """`steps` Poisson-subsampled Gaussian mechanisms (DP-SGD at one site, or DP-FedAvg)."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        gaussian = dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(gaussian, steps)


def make_accountant(kind: Accountant) -> dp_accounting.PrivacyAccountant:
    if kind == "rdp":
        return dp_accounting.rdp.RdpAccountant(RDP_ORDERS)
    if kind == "pld":
        return dp_accounting.pld.PLDAccountant()
    raise ValueError(f"unknown accountant {kind!r}")


def epsilon(event: dp_accounting.DpEvent, delta: float, kind: Accountant = "rdp") -> float:
    """ε at `delta` after `event`."""
    accountant = make_accountant(kind)
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def calibrate_noise(
    sampling_rate: float, steps: int, target_epsilon: float, delta: float, kind: Accountant = "rdp"
) -> float:
    """Smallest noise multiplier whose ε after `steps` is at most `target_epsilon`."""
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(kind),
            lambda sigma: dp_sgd_event(sampling_rate, sigma, steps),
            target_epsilon,
            delta,
            dp_accounting.LowerEndpointAndGuess(0.05, 1.0),
            tol=1e-3,
        )
    )


@dataclass
class UnitLedger:
    """One accounting unit: a site (sample level) or the federation (site level)."""

    sampling_rate: float
    steps: int = 0
    records: int = 0  # examples at the site (sample level) or sites (site level)


@dataclass
class PrivacyLedger:
    """What has been spent so far, with every number needed to recompute ε."""

    level: str
    accountant: str
    noise_multiplier: float
    l2_norm_clip: float
    delta: float
    unit: str = "slice"
    mechanism: str = "poisson_subsampled_gaussian"
    units: dict[str, UnitLedger] = field(default_factory=dict)
    rounds: int = 0
    epsilon: float = 0.0
    epsilon_per_unit: dict[str, float] = field(default_factory=dict)

    def with_round(self, steps_per_unit: dict[str, int]) -> PrivacyLedger:
        """The ledger after one more round in which each unit took the given number of steps."""
        return self._with_steps(steps_per_unit, rounds=1)

    def with_repeats(self, steps_per_unit: dict[str, int]) -> PrivacyLedger:
        """The ledger with mechanism steps that were released again (a round run twice with
        fresh noise): they count in ε, not as training rounds."""
        return self._with_steps(steps_per_unit, rounds=0)

    def _with_steps(self, steps_per_unit: dict[str, int], rounds: int) -> PrivacyLedger:
        units = {
            name: UnitLedger(u.sampling_rate, u.steps + steps_per_unit.get(name, 0), u.records)
            for name, u in self.units.items()
        }
        out = PrivacyLedger(**{**asdict(self), "units": units, "rounds": self.rounds + rounds})
        out.refresh()
        return out

    def refresh(self) -> None:
        """Recompute ε per unit and the reported ε (max over units) from the recorded numbers."""
        if self.level == "none":
            self.epsilon, self.epsilon_per_unit = math.inf, {}
            return
        self.epsilon_per_unit = {
            name: epsilon(
                dp_sgd_event(u.sampling_rate, self.noise_multiplier, u.steps),
                self.delta,
                self.accountant,  # type: ignore[arg-type]
            )
            if u.steps
            else 0.0
            for name, u in self.units.items()
        }
        self.epsilon = max(self.epsilon_per_unit.values(), default=0.0)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["epsilon"] = epsilon_to_json(self.epsilon)
        out["sampling_rate"] = {n: u.sampling_rate for n, u in self.units.items()}
        out["steps"] = {n: u.steps for n, u in self.units.items()}
        out["recompute"] = (
            "epsilon = max over units of dp_accounting ε(delta) of "
            "SelfComposedDpEvent(PoissonSampledDpEvent(sampling_rate, "
            "GaussianDpEvent(noise_multiplier)), steps) (no subsampling when sampling_rate = 1)"
        )
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PrivacyLedger:
        keep = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        keep["units"] = {n: UnitLedger(**u) for n, u in raw["units"].items()}
        out = cls(**keep)
        out.epsilon = epsilon_from_json(raw.get("epsilon"))
        return out


def epsilon_to_json(epsilon: float) -> float | None:
    """ε as the run directory's JSON files hold it (JSON has no infinity): None for ∞."""
    return None if math.isinf(epsilon) else epsilon


def epsilon_from_json(raw: Any) -> float | None:
    """ε as read back: `null` -> ∞, a number -> float; anything else -> None (not an ε)."""
    if raw is None:
        return math.inf
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    return None


def epsilon_of_ledger(raw: dict[str, Any]) -> float:
    """ε recomputed from a `privacy.json` dict alone."""
    ledger = PrivacyLedger.from_json(raw)
    ledger.refresh()
    return ledger.epsilon
