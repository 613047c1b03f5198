"""`tff-privseg report`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli import common
from cli.common import emit, handle_errors, json_option


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@common.out_option(
    "Report folder [default: RUN/report for one run, reports/compare-HASH for several]; "
    "an earlier report there is replaced.",
    path_type=Path,
)
@json_option
@handle_errors
def report(runs: tuple[Path, ...], out: Path | None, as_json: bool) -> None:
    """Plot training curves of RUNS: loss, validation Dice and ε per round (PNG).

    With several runs, also a privacy-utility plot (final ε against final validation Dice;
    runs without DP as a reference line). Always a markdown table (report.md) with privacy
    settings, ε, δ, validation Dice and, where `evaluate` was run, test Dice.
    """
    from tff_privseg.report import report as make_report

    emit(make_report(list(runs), out), as_json, _print_report)


def _print_report(r: dict[str, Any]) -> None:
    for run in r["runs"]:
        eps = "∞" if run["epsilon"] is None else f"{run['epsilon']:.3f}"
        dice = "n/a" if run["final_val_dice"] is None else f"{run['final_val_dice']:.4f}"
        click.echo(f"{run['label']}: {run['rounds']} rounds, ε = {eps}, val Dice {dice}")
    click.echo(f"report: {r['out']} ({', '.join(r['files'])})")
