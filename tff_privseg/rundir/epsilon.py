"""ε in the run directory's JSON files (privacy.json, metrics.jsonl, checkpoint headers).

JSON has no infinity: ε = ∞ (no DP) is written as `null`, a finite ε as its number.
"""

from __future__ import annotations

import math
from typing import Any


def epsilon_to_json(epsilon: float) -> float | None:
    """ε as written: None for ∞."""
    return None if math.isinf(epsilon) else epsilon


def epsilon_from_json(raw: Any) -> float | None:
    """ε as read back: `null` -> ∞, a number -> float; anything else -> None (not an ε)."""
    if raw is None:
        return math.inf
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    return None


def finite_epsilon(raw: Any) -> float | None:
    """A written ε that is finite, else None (∞ or not an ε)."""
    eps = epsilon_from_json(raw)
    return eps if eps is not None and math.isfinite(eps) else None
