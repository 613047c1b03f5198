"""`tff-privseg train`."""

from __future__ import annotations

from typing import Any

import click

from cli import common
from cli.common import emit, handle_errors, json_option


@click.command()
@common.config_option("TOML config (see configs/).", required=True)
@common.data_option("Dataset root (one folder per site); overrides data.root.", file_okay=False)
@common.out_option("Run directory [default: runs/<config name>-<config hash>].", file_okay=False)
@click.option("--rounds", type=int, help="Override train.rounds.")
@common.seed_option(help="Override train.seed.")
@click.option(
    "--privacy",
    "privacy_level",
    type=click.Choice(["sample", "site", "none"]),
    help="Override privacy.level.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out from its newest loadable checkpoint, with its secret key "
    "(same config and data; --rounds may change where no round already run changes).",
)
@common.quiet_option()
@click.option(
    "--workers",
    metavar="HOST:PORT,...",
    help="Run the federated computation on remote `tff-privseg worker`s (mutual TLS).",
)
@common.tls_dir_option(
    "Coordinator credentials for --workers or --sites: client.pem, client.key, ca.pem."
)
@click.option(
    "--sites",
    metavar="NAME=HOST:PORT,...",
    help="Cross-silo: train with `tff-privseg site serve` processes that keep their data "
    "(no --data here).",
)
@click.option(
    "--site-timeout",
    type=click.FloatRange(min=1, max_open=False),
    default=3600,
    show_default=True,
    help="With --sites: seconds a site may take to answer one call (a round's local training "
    "or its validation) before the round ends with an error naming it.",
)
@json_option
@handle_errors
def train(
    config_path: str,
    data_root: str | None,
    out: str | None,
    rounds: int | None,
    seed: int | None,
    privacy_level: str | None,
    resume: bool,
    quiet: bool,
    workers: str | None,
    tls_dir: str | None,
    sites: str | None,
    site_timeout: float,
    as_json: bool,
) -> None:
    """Train a segmentation model across sites with TFF (and DP), into a run directory.

    Writes RUN/config.toml, metrics.jsonl (one line per round), privacy.json (the ledger:
    recompute ε from it), checkpoints/ and secret/run_key (private; resume with --resume),
    model.keras and TensorBoard logs, and appends a row to completed_trainings.csv beside RUN
    (the PyTorch baseline's format). One train at a time per RUN (a lock); a start that fails
    before round 1 leaves nothing behind. A progress bar shows validation Dice and ε per round
    (and the loss, without DP).
    """
    from pathlib import Path

    from tff_privseg import config as config_lib

    overrides: dict[str, Any] = {}
    if rounds is not None:
        overrides["train.rounds"] = rounds
    if seed is not None:
        overrides["train.seed"] = seed
    if privacy_level is not None:
        overrides["privacy.level"] = privacy_level
    cfg = config_lib.load(config_path, overrides)
    if sites is not None:
        from tff_privseg.silo.coordinator import check_site_args

        if workers:
            from tff_privseg.errors import UserError

            raise UserError("give --sites or --workers, not both")
        check_site_args(sites, tls_dir, data_root)
    elif workers or tls_dir:
        from tff_privseg.runtime import check_remote_args

        check_remote_args(workers, tls_dir)
    out = out or f"runs/{Path(config_path).stem}-{cfg.digest()}"
    if sites is not None:  # TensorFlow is imported after the checks
        from tff_privseg.silo.coordinator import train_cross_silo

        summary = train_cross_silo(
            cfg, out, sites, tls_dir, resume, progress=not quiet, timeout=site_timeout
        )
    else:
        from tff_privseg.federated.train import train as run_training

        summary = run_training(
            cfg,
            out,
            data_root=data_root,
            resume=resume,
            progress=not quiet,
            workers=workers,
            tls_dir=tls_dir,
        )
    # Like the PyTorch baseline: one row per finished training in completed_trainings.csv.
    from tff_privseg.parity.baseline_format import append_completed_training

    csv = append_completed_training(Path(out).parent / "completed_trainings.csv", cfg, summary)
    summary["completed_trainings_csv"] = str(csv)
    emit(summary, as_json, _print_summary)


def _print_summary(s: dict[str, Any]) -> None:
    eps = "∞ (no DP)" if s["epsilon"] is None else f"{s['epsilon']:.3f} (δ = {s['delta']:g})"
    dice = "n/a" if s["val_dice"] is None else f"{s['val_dice']:.4f}"
    if s.get("stopped"):
        click.echo(s["stopped"])
    click.echo(f"run:        {s['run_dir']}")
    click.echo(f"rounds:     {s['rounds']}  ({s['seconds']:.1f} s)")
    click.echo(f"val Dice:   {dice}")
    click.echo(f"privacy:    {s['privacy']}, ε = {eps}")
    click.echo(f"logged to:  {s['completed_trainings_csv']}")
