"""`tff-privseg privacy`."""

from __future__ import annotations

from typing import Any

import click

from cli import common
from cli.common import FiniteFloat, emit, handle_errors, json_option


@click.command()
@common.config_option("TOML config.", required=True)
@common.data_option(
    "Dataset root; overrides data.root (site sizes set the sampling rates).", file_okay=False
)
@click.option(
    "--target-epsilon",
    type=FiniteFloat(0, 1e6, lo_open=True),
    help="Find the noise multiplier that reaches this ε after the configured rounds.",
)
@json_option
@handle_errors
def privacy(
    config_path: str, data_root: str | None, target_epsilon: float | None, as_json: bool
) -> None:
    """ε(δ) that a config will spend, per site, before training (dp_accounting).

    With --target-epsilon: the smallest noise multiplier that keeps every site within it.
    """
    from tff_privseg import config as config_lib

    cfg = config_lib.load(config_path)  # before TensorFlow loads: a bad config fails at once
    from tff_privseg.federated.train import load_training_data
    from tff_privseg.privacy.planning import privacy_plan, site_patient_view
    from tff_privseg.privacy.schedule import records

    sites = load_training_data(cfg, data_root, progress=False)
    plan = privacy_plan(cfg, {s.name: records(cfg, s) for s in sites}, target_epsilon)
    if cfg.privacy.level == "sample" and cfg.privacy.unit == "slice":
        plan["per_patient"] = site_patient_view(cfg, plan, sites)
    emit(plan, as_json, _print_plan)


def _print_plan(p: dict[str, Any]) -> None:
    if p["level"] == "none":
        click.echo("privacy.level = none: no differential privacy (ε = ∞)")
        return
    click.echo(
        f"level {p['level']}, accountant {p['accountant']}, δ = {p['delta']:g}, "
        f"noise multiplier {p['noise_multiplier']:.4f}, clip {p['l2_norm_clip']:g}"
    )
    click.echo(f"{'unit':<16}{'q':>10}{'steps':>8}{'ε':>10}")
    for name, u in p["units"].items():
        click.echo(f"{name:<16}{u['sampling_rate']:>10.4f}{u['steps']:>8}{u['epsilon']:>10.3f}")
    click.echo(
        f"ε = {p['epsilon']:.3f} (max over units, unit = {p['unit']}) "
        f"after {p['rounds']} rounds"
    )
    if "per_patient" in p:
        click.echo("\nThe privacy unit is one slice. What that means for one patient:")
        click.echo(
            f"{'site':<16}{'slices/pt':>10}{'group ε at δ = ' + format(p['delta'], 'g'):>22}"
            f"{'patient-level ε, same σ':>26}"
        )
        vacuous = False
        for name, v in p["per_patient"].items():
            g = v["group_epsilon"]
            vacuous |= g is None
            shown = f"none (≤ {v['largest_bounded_group']} slices)" if g is None else f"{g:.1f}"
            click.echo(
                f"{name:<16}{v['slices_per_patient']:>10}{shown:>22}"
                f"{v['patient_level_epsilon']:>26.3f}"
            )
        click.echo(
            "group ε: group privacy (kε', k·e^{(k-1)ε'}·δ') for k slices, with δ' chosen so "
            "that the group's δ is the run's (RDP)."
        )
        if any(v["naive_group_delta"] >= 1.0 for v in p["per_patient"].values()):
            click.echo("At this run's ε itself, (kε, k·e^{(k-1)ε}·δ) has δ ≥ 1: no bound.")
        if vacuous:
            click.echo(
                "none: no meaningful bound for a whole patient (the group's δ stays above the "
                "run's at every ε); a bound exists only for groups up to the slices shown."
            )
        click.echo('Set privacy.unit = "patient" to protect whole patients.')
