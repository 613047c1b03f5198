"""`tff-privseg compare`: a run next to a PyTorch-baseline result."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from cli.common import emit, handle_errors, json_option


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("baseline", type=click.Path(path_type=Path))
@click.option(
    "--row",
    type=int,
    help="Row of a completed_trainings.csv, 0-based; negative counts from the end [default: "
    "the last].",
)
@json_option
@handle_errors
def compare(run_dir: Path, baseline: Path, row: int | None, as_json: bool) -> None:
    """Compare RUN_DIR with a baseline result: settings and metrics side by side.

    BASELINE is a completed_trainings.csv (the PyTorch baseline's, or ours) or a baseline log
    (the stdout of its train.py / test.py). Settings that both sides state and that differ are
    flagged DIFFERS; metrics (test Dice, IoU, ε, δ, rounds, wall time) are shown with their
    difference. RUN_DIR's evaluation.json (from `evaluate`) supplies the test metrics.
    """
    from tff_privseg.parity.compare import compare as run_compare
    from tff_privseg.parity.compare import format_comparison

    result = run_compare(run_dir, baseline, row)
    if as_json:
        emit(_finite(result), True, lambda r: None)
    else:
        click.echo(format_comparison(result))


def _finite(value: Any) -> Any:
    """JSON has no infinity: ε = ∞ (no DP) becomes the string "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
