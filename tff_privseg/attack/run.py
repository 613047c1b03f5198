"""The `attack` and `audit` commands as library calls: run dir / config -> model, data ->
updates -> reconstructions -> metrics, figure and JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from tff_privseg import config as config_lib
from tff_privseg.attack import inversion as inv
from tff_privseg.config import Config
from tff_privseg.data import SiteData
from tff_privseg.errors import UserError
from tff_privseg.models import count_params, training_model_fn
from tff_privseg.privacy.dp_sgd import DpSgdSpec, dp_sgd_spec
from tff_privseg.rundir import checkpoint, finite_epsilon, layout


@dataclass
class AttackTarget:
    """The model the attacked update is computed at."""

    cfg: Config
    model: tf.keras.Model
    round: int | None  # None: the run's final model
    source: str

    def model_fn(self) -> Callable[[], tf.keras.Model]:
        return training_model_fn(self.cfg)


def load_target(
    run_dir: str | Path | None, config_path: str | Path | None, round_num: int | None
) -> AttackTarget:
    """Model of a run at round ``round_num`` (0: the initial model; None: final), or the
    untrained model of a config."""
    if run_dir is None:
        if config_path is None:
            raise UserError("give --run RUN_DIR, or --config FILE for an untrained model")
        cfg = config_lib.load(config_path)
        return AttackTarget(cfg, training_model_fn(cfg)(), 0, f"untrained model of {config_path}")
    run = Path(run_dir)
    if not (run / layout.CONFIG).exists():
        raise UserError(f"not a run directory (no {layout.CONFIG})", run)
    cfg = config_lib.load(run / layout.CONFIG)
    model = training_model_fn(cfg)()
    target = AttackTarget(cfg, model, round_num, str(run))
    if round_num == 0:
        target.source = f"{run} (round 0: initial model)"
        return target
    if round_num is None:
        if (run / layout.WEIGHTS).exists():
            model.load_weights(run / layout.WEIGHTS)
            target.source = f"{run}/{layout.WEIGHTS} (final)"
            return target
        latest = checkpoint.latest(run / layout.CHECKPOINTS)
        if latest is None:
            raise UserError("run has no final model and no checkpoint", run)
        round_num = checkpoint.round_of(latest)
    path = checkpoint.path_for(run / layout.CHECKPOINTS, round_num)
    if not path.exists():
        kept = checkpoint.all_checkpoints(run / layout.CHECKPOINTS)
        have = [checkpoint.round_of(p) for p in kept]
        raise UserError(
            f"no checkpoint for round {round_num} (kept: {have or 'none'}; "
            "0 = initial model; omit --round for the final model)",
            run,
        )
    _assign_from_checkpoint(model, path)
    target.round = round_num
    target.source = str(path)
    return target


def _assign_from_checkpoint(model: tf.keras.Model, path: Path) -> None:
    """The model weights are the first tensors of the flattened TFF state (global model)."""
    variables = model.trainable_variables
    arrays = checkpoint.model_arrays(path, len(variables))
    if len(arrays) != len(variables) or any(
        a.shape != tuple(v.shape) for a, v in zip(arrays, variables, strict=False)
    ):
        raise UserError("checkpoint does not hold this model's weights", path)
    for v, a in zip(variables, arrays, strict=True):
        v.assign(a)


def pick_site(sites: list[SiteData], site: str | None) -> SiteData:
    if site is None:
        return sites[0]
    for s in sites:
        if s.name == site:
            return s
    if site.isdigit() and int(site) < len(sites):
        return sites[int(site)]
    raise UserError(f"no site '{site}' (sites: {', '.join(s.name for s in sites)})")


def pick_slices(s: SiteData, index: int | None, batch_size: int) -> list[int]:
    """``batch_size`` training slices: ``index`` (default: the middle slice of the first
    volume), then slices spread evenly over the site (different patients, mostly)."""
    n = len(s.train)
    if batch_size < 1 or batch_size > n:
        raise UserError(f"--batch-size must be in 1..{n} (site {s.name} has {n} slices)")
    if index is None:
        first = s.train.volume_slices(0)
        index = int(first[len(first) // 2]) if len(first) else 0
    if not 0 <= index < n:
        raise UserError(f"--index must be in 0..{n - 1} (site {s.name})")
    stride = n // batch_size
    return [(index + j * stride) % n for j in range(batch_size)]


def dp_params(cfg: Config) -> DpSgdSpec:
    """The run's sample-level DP-SGD parameters (the training's, `dp_sgd_spec`).

    A record is one slice here: exactly training's records for ``privacy.unit = "slice"`` and
    for patient records of one slice (``slices_per_patient = 1``, the default config). Patient
    records of several slices are clipped as one sum in training; that is not modelled, so it
    is refused rather than approximated.
    """
    spec = dp_sgd_spec(cfg)
    if spec.group > 1:
        raise UserError(
            "the attack's DP-SGD update clips one slice per record; this run clips patient "
            f"records of up to {spec.group} slices (privacy.slices_per_patient), "
            "which is not modelled: use --privacy none, or a config with slices_per_patient = 1"
        )
    return spec


def run_attack(
    target: AttackTarget,
    sites: list[SiteData],
    *,
    site: str | None = None,
    index: int | None = None,
    batch_size: int = 1,
    privacy: str = "both",
    update: str = "gradient",
    local_steps: int | None = None,
    inversion: inv.InversionConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute what the site sends for the chosen slices and reconstruct them from it."""
    cfg = target.cfg
    icfg = inversion or inv.InversionConfig()
    s = pick_site(sites, site)
    ids = pick_slices(s, index, batch_size)
    images = s.train.images[ids]
    labels = s.train.labels[ids].astype(np.int32)
    modes = ["none", "sample"] if privacy == "both" else [privacy]
    steps = local_steps or cfg.train.local_steps
    if steps < 1:
        raise UserError("--local-steps must be >= 1")
    channels = 1 if cfg.data.num_classes == 2 else cfg.data.num_classes
    bar = _bar(progress, icfg.iterations * len(modes))
    results: dict[str, Any] = {}
    recs: dict[str, tuple[inv.Reconstruction, dict[str, Any]]] = {}
    weights = target.model.get_weights()
    for mode in modes:
        dp = dp_params(cfg) if mode == "sample" else None
        noise_seed = icfg.seed + 1000  # stands for the site's secret noise seed
        if update == "gradient":
            upd = inv.site_gradient(target.model, cfg.train.loss, images, labels, dp, noise_seed)
        else:
            upd = inv.site_delta(
                target.model_fn(),
                weights,
                cfg.train.loss,
                images,
                labels,
                dp,
                cfg.train.client_optimizer,
                cfg.train.client_lr,
                steps,
                noise_seed,
            )
        done = [0]

        def tick(i: int, info: dict, done: list[int] = done, mode: str = mode) -> None:
            if bar is not None:
                bar.update(i - done[0])
                bar.set_postfix(privacy=mode, loss=f"{info['loss']:.4f}")
                done[0] = i

        rec = inv.reconstruct(
            target.model,
            cfg.train.loss,
            upd,
            icfg,
            labels=labels if icfg.labels == "known" else None,
            num_label_channels=channels,
            progress=tick,
        )
        metrics = inv.evaluate(rec, images, labels)
        entry: dict[str, Any] = {
            **{k: v for k, v in metrics.items()},
            "update_norm": upd.norm,
            "restart_losses": rec.restart_losses,
            "best_restart": rec.best_restart,
            "seconds": rec.seconds,
        }
        if dp is not None:
            entry.update(
                noise_multiplier=dp.noise_multiplier,
                l2_norm_clip=dp.l2_norm_clip,
                expected_batch_size=dp.expected_batch_size,
                noise_std_on_mean=dp.noise_multiplier * dp.l2_norm_clip / dp.expected_batch_size,
            )
        results[mode] = entry
        recs[mode] = (rec, metrics)
    if bar is not None:
        bar.close()
    summary: dict[str, Any] = {
        "source": target.source,
        "round": target.round,
        "site": s.name,
        "indices": ids,
        "batch_size": batch_size,
        "resolution": cfg.data.resolution,
        "model": {"name": cfg.model.name, "params": count_params(target.model)},
        "loss": cfg.train.loss,
        "update": update,
        "local_steps": steps if update == "delta" else 1,
        "client_optimizer": cfg.train.client_optimizer if update == "delta" else None,
        "client_lr": cfg.train.client_lr if update == "delta" else None,
        "inversion": icfg.to_dict(),
        "results": results,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fig = out / "attack.png"
        save_figure(fig, images, labels, recs, title=_title(summary))
        np.savez_compressed(
            out / "attack.npz",
            original=images,
            labels=labels,
            **{f"recon_{m}": r.images[met["order"]] for m, (r, met) in recs.items()},
        )
        summary["figure"] = str(fig)
        summary["json"] = str(out / "attack.json")
        (out / "attack.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
    return summary


def _title(summary: dict[str, Any]) -> str:
    r = summary["round"]
    where = "final model" if r is None else ("untrained model" if r == 0 else f"round {r}")
    return (
        f"{summary['update']} of site {summary['site']}, batch {summary['batch_size']}, "
        f"{summary['resolution']}x{summary['resolution']}, {where}"
    )


def save_figure(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    recs: dict[str, tuple[inv.Reconstruction, dict[str, Any]]],
    title: str = "",
    max_rows: int = 8,
) -> None:
    """PNG: one row per slice; columns original, reconstruction without DP, with DP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"none": "no DP", "sample": "DP-SGD"}
    rows = min(len(images), max_rows)
    cols = 1 + len(recs)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.7 * rows + 0.5), squeeze=False)
    for i in range(rows):
        ax = axes[i][0]
        ax.imshow(images[i, ..., 0], cmap="gray", vmin=0, vmax=1)
        if labels[i].any():
            ax.contour(labels[i] > 0, levels=[0.5], colors="r", linewidths=0.6)
        if i == 0:
            ax.set_title("original", fontsize=9)
        for j, (mode, (rec, met)) in enumerate(recs.items(), start=1):
            ax = axes[i][j]
            ax.imshow(rec.images[met["order"][i], ..., 0], cmap="gray", vmin=0, vmax=1)
            ax.set_xlabel(f"SSIM {met['ssim'][i]:.2f}, PSNR {met['psnr'][i]:.1f} dB", fontsize=8)
            if i == 0:
                ax.set_title(names.get(mode, mode), fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_audit(target: AttackTarget, sites: list[SiteData]) -> dict[str, Any]:
    from tff_privseg.attack.membership import membership_audit

    out = membership_audit(target.model, target.cfg.train.loss, sites)
    out["source"] = target.source
    out["privacy"] = target.cfg.privacy.level
    return out


def read_epsilon(run_dir: str | Path) -> float | None:
    """The run's final ε; None without privacy.json or without DP (ε = ∞)."""
    path = Path(run_dir) / layout.PRIVACY
    if not path.exists():
        return None
    return finite_epsilon(json.loads(path.read_text()).get("epsilon"))


def _bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="it", file=sys.stderr, dynamic_ncols=True, desc="inversion")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = [
    "AttackTarget",
    "dp_params",
    "load_target",
    "pick_site",
    "pick_slices",
    "read_epsilon",
    "run_attack",
    "run_audit",
    "save_figure",
]
