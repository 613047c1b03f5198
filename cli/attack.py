"""`tff-privseg attack` (gradient inversion) and `tff-privseg audit` (membership inference)."""

from __future__ import annotations

from typing import Any

import click

from cli import common
from cli.common import FiniteFloat, emit, handle_errors, json_option


def _load(run_dir: str | None, config_path: str | None, data_root: str | None, round_num):
    from tff_privseg.attack.run import load_target
    from tff_privseg.data import load_sites

    target = load_target(run_dir, config_path, round_num)
    if data_root is None:
        from tff_privseg.federated.train import load_training_data

        sites = load_training_data(target.cfg, None, progress=False)
    else:
        sites = load_sites(target.cfg.data, data_root)
    return target, sites


@click.command()
@common.run_option(file_okay=False)
@common.config_option("Without --run: attack this config's untrained model.")
@common.data_option(file_okay=False)
@click.option("--site", help="Site name (or index) [default: the first].")
@click.option(
    "--index", type=int, help="Training-slice index [default: middle of the first volume]."
)
@common.batch_size_option(type=int, default=1, help="Slices per update.")
@common.round_option("Checkpoint round to attack (0 = initial model) [default: final model].")
@common.choice_option(
    "--privacy",
    choices=["none", "sample", "both"],
    default="both",
    help="Attack the plain update, the DP-SGD update (the run's clip and noise), or both.",
)
@common.choice_option(
    "--update",
    choices=["gradient", "delta"],
    default="gradient",
    help="One step's gradient, or the model delta after --local-steps local steps.",
)
@click.option("--local-steps", type=int, help="Local steps of a delta [default: config's].")
@common.choice_option(
    "--labels",
    choices=["known", "reconstruct"],
    default="known",
    help="Assume the masks are known, or reconstruct them jointly.",
)
@common.choice_option(
    "--distance",
    choices=["cosine", "l2"],
    default="cosine",
    help="Gradient distance: 1 - cosine (Geiping) or squared L2 (DLG).",
)
@click.option(
    "--iterations",
    type=int,
    default=3000,
    show_default=True,
    help="Adam iterations per restart (about 4 min per reconstruction at 64x64 on 2 cores).",
)
@click.option("--restarts", type=int, default=2, show_default=True)
@click.option(
    "--tv", "tv_weight", type=FiniteFloat(0, 1e6), default=0.1, show_default=True, help="TV weight."
)
@click.option(
    "--lr",
    type=FiniteFloat(0, 1e3, lo_open=True),
    default=0.1,
    show_default=True,
    help="Adam step size.",
)
@click.option("--no-smooth", is_flag=True, help="Differentiate the real ReLU model only.")
@common.seed_option(default=0, show_default=True)
@common.out_option(
    "Output folder for attack.json/png/npz [default: RUN/attack, or ./attack].", file_okay=False
)
@common.quiet_option()
@json_option
@handle_errors
def attack(
    run_dir: str | None,
    config_path: str | None,
    data_root: str | None,
    site: str | None,
    index: int | None,
    batch_size: int,
    round_num: int | None,
    privacy: str,
    update: str,
    local_steps: int | None,
    labels: str,
    distance: str,
    iterations: int,
    restarts: int,
    tv_weight: float,
    lr: float,
    no_smooth: bool,
    seed: int,
    out: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Gradient inversion: rebuild a site's CT slices from the update it would send.

    The update (gradient, or model delta after local steps) is computed with the training
    code, without and with the run's DP-SGD clipping and noise; the slices are reconstructed by
    matching gradients (Geiping et al.), and compared with the originals (SSIM, PSNR, MSE; Dice
    of the masks with --labels reconstruct). Writes attack.json, attack.png and attack.npz.
    """
    from pathlib import Path

    from tff_privseg.attack.inversion import InversionConfig
    from tff_privseg.attack.run import run_attack
    from tff_privseg.errors import UserError

    if iterations < 1 or restarts < 1:
        raise UserError("--iterations and --restarts must be >= 1")
    target, sites = _load(run_dir, config_path, data_root, round_num)
    icfg = InversionConfig(
        iterations=iterations,
        restarts=restarts,
        lr=lr,
        tv_weight=tv_weight,
        distance=distance,
        labels=labels,
        smooth_start=0.0 if no_smooth else InversionConfig.smooth_start,
        seed=seed,
    )
    out = out or str(Path(run_dir) / "attack" if run_dir else Path("attack"))
    result = run_attack(
        target,
        sites,
        site=site,
        index=index,
        batch_size=batch_size,
        privacy=privacy,
        update=update,
        local_steps=local_steps,
        inversion=icfg,
        out_dir=out,
        progress=not quiet,
    )
    emit(result, as_json, _print_attack)


def _print_attack(r: dict[str, Any]) -> None:
    click.echo(f"model:   {r['source']} ({r['model']['name']}, {r['model']['params']} params)")
    click.echo(
        f"target:  site {r['site']}, slices {r['indices']}, {r['update']}"
        + (f" after {r['local_steps']} local steps" if r["update"] == "delta" else "")
    )
    names = {"none": "no DP", "sample": "DP-SGD"}
    for mode, m in r["results"].items():
        extra = ""
        if "noise_multiplier" in m:
            extra = f"  (σ {m['noise_multiplier']:g}, C {m['l2_norm_clip']:g})"
        if "mean_mask_dice" in m:
            extra += f"  mask Dice {m['mean_mask_dice']:.3f}"
        click.echo(
            f"{names.get(mode, mode):<8} SSIM {m['mean_ssim']:.3f}  PSNR {m['mean_psnr']:.2f} dB  "
            f"MSE {m['mean_mse']:.4f}  ({m['seconds']:.0f} s){extra}"
        )
    if "figure" in r:
        click.echo(f"figure:  {r['figure']}")


@click.command()
@common.run_option(required=True, file_okay=False)
@common.data_option(file_okay=False)
@common.round_option("Checkpoint round [default: final model].")
@json_option
@handle_errors
def audit(run_dir: str, data_root: str | None, round_num: int | None, as_json: bool) -> None:
    """Membership inference: can the loss tell a site's training slices from held-out ones?

    Loss-threshold attack (tensorflow-privacy's membership-inference threshold attack) per
    site: AUC (0.5 = chance) and attacker advantage max|TPR - FPR|.
    """
    from tff_privseg.attack.run import read_epsilon, run_audit

    target, sites = _load(run_dir, None, data_root, round_num)
    result = run_audit(target, sites)
    result["epsilon"] = read_epsilon(run_dir)
    emit(result, as_json, _print_audit)


def _print_audit(r: dict[str, Any]) -> None:
    eps = "∞" if r.get("epsilon") is None else f"{r['epsilon']:.3f}"
    click.echo(f"model:  {r['source']} (privacy {r['privacy']}, ε = {eps})")
    click.echo(f"{'site':<12}{'AUC':>8}{'advantage':>11}{'n_train':>9}{'n_held_out':>11}")
    for name, s in r["sites"].items():
        if s.get("auc") is None:
            click.echo(f"{name:<12}{'n/a':>8}  ({s.get('reason')})")
            continue
        click.echo(
            f"{name:<12}{s['auc']:>8.3f}{s['advantage']:>11.3f}{s['n_train']:>9}{s['n_held_out']:>11}"
        )
    if r.get("pooled"):
        p = r["pooled"]
        click.echo(f"{'pooled':<12}{p['auc']:>8.3f}{p['advantage']:>11.3f}")
    click.echo(f"attack: {r['attack']}; implementation: {r['implementation']}")
