"""ε in the run directory's JSON files (privacy.json, metrics.jsonl, checkpoint headers).

JSON has no infinity: ε = ∞ (no DP) is written as `null`, a finite ε as its number. The
encoding is the privacy ledger's own (`privacy.accounting`), so the ledger and every other
file of the run write ε the same way.
"""

from __future__ import annotations

import math
from typing import Any

from tff_privseg.privacy.accounting import epsilon_from_json, epsilon_to_json

__all__ = ["epsilon_from_json", "epsilon_to_json", "finite_epsilon"]


def finite_epsilon(raw: Any) -> float | None:
    """A written ε that is finite, else None (∞ or not an ε)."""
    eps = epsilon_from_json(raw)
    return eps if eps is not None and math.isfinite(eps) else None
