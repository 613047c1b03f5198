"""Privacy-utility table on the default synthetic data: one command, one JSON, one markdown table.

Runs, with everything else as in configs/default.toml: centralized (pooled, plain Keras, the upper
bound), FedAvg without DP, and sample-level DP-SGD calibrated to each target ε (δ = 1e-5), for the
slice unit and (with --patient) the patient unit; each DP variant also with named levers
(`LEVERS`, --levers: ablation rows). Every variant is repeated --keys times (default 1 here, 3
for `bench`): repetition k trains into a fresh run directory, so it draws its own secret run key
(`rundir.key.new_run_key`: Poisson samples, augmentation, noise), and uses train.seed = k (model
initialisation, and the public shuffle of the runs without DP). Each row reports mean ± sd over
the repetitions of the final validation Dice and of the test Dice (the same pooled Dice, mean
over sites, on the test split, of the saved model: `federated.train.split_dice`).

    .venv/bin/python -m benchmarks.privacy_utility [--rounds N] [--eps 1 3 8] [--patient]
        [--units slice patient] [--keys K] [--data-seed S] [--levers default ema ...]
        [--no-baselines]
    tff-privseg bench --only privacy_utility [--quick]

The `pretrain` lever first trains a public model (FedAvg without DP on synthetic seed 2, public by
construction) and fine-tunes from it (train.init_from); it adds two rows: `public_only` (that
model on the report set's val/test split, no site data at all) and `fedavg_pretrain`.

--data-seed S picks the synthetic set (data.synth.seed = S, data.root = ROOT_seedS unless S is
the config's seed): choose levers on one set (the selection set) and report on another (the
default, seed 0), so that the reported figures are not tuned on their own data.

Both write benchmarks/results/privacy_utility.json (same content: `measure()`'s dict plus the
machine, command and time, through `benchmarks.common.save`) and privacy_utility.md (the table);
the folder is --results here, --out for `bench`. Paths are relative to the current directory.
`run(quick=True)` (`--quick`): configs/smoke.toml, 2 rounds, ε = 8 only, one key, runs in a
temporary directory; `run()`: both units, ε 1/3/8, 3 keys (about 24 trainings: an hour or more).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, log, save
from tff_privseg import config as config_lib
from tff_privseg.federated.train import load_training_data, split_dice, train
from tff_privseg.privacy.planning import privacy_plan
from tff_privseg.privacy.schedule import records
from tff_privseg.rundir import open_run

# Relative to the current directory (the repository root), as in the commands above.
CONFIGS = Path("configs")

# Named levers for DP rows (ablation): dotted config overrides on top of the config. Every one
# keeps the guarantee: σ is calibrated by the accountant for the resulting q and steps.
LIGHT_AUGMENT = {
    "data.augment.rotation": 10.0,
    "data.augment.translate": 0.05,
    "data.augment.scale": 0.1,
}
EMA = {"train.ema_decay": 0.9}
BATCH64 = {"train.batch_size": 64, "train.local_steps": 2}
SERVER_ADAM = {"train.server_optimizer": "adam", "train.server_lr": 0.01}
AUG4 = LIGHT_AUGMENT | {"data.augment.multiplicity": 4}
# Public pre-training: FedAvg without DP on a synthetic set that is public by construction (its
# own seed: neither the report set, seed 0, nor the selection set, seed 1), then DP fine-tuning
# from its weights (train.init_from). PUBLIC_MODEL is replaced by that run's directory.
PUBLIC_SEED = 2
PUBLIC_MODEL = "<public model>"
PRETRAIN = {"train.init_from": PUBLIC_MODEL}
LEVERS: dict[str, dict[str, Any]] = {
    "default": {},
    # post-processing: the evaluated/saved model is the EMA of the released global models (the
    # *_ema rows also report the last model's Dice: the same training without EMA)
    "ema": EMA,
    # fewer, larger noisy steps: ~ the same slices per round (64 x 2 vs 24 x 5), σ recalibrated
    "batch64": BATCH64,
    "batch64_ema": BATCH64 | EMA,
    # more, smaller noisy steps: the same slices per round (12 x 10 vs 24 x 5), σ recalibrated
    "batch12x10": {"train.batch_size": 12, "train.local_steps": 10},
    "batch24x5": {"train.batch_size": 24, "train.local_steps": 5},  # 24 expected patients x 5 steps
    "batch6x20": {"train.batch_size": 6, "train.local_steps": 20},
    "batch3x40": {"train.batch_size": 3, "train.local_steps": 40},
    "batch2x60": {"train.batch_size": 2, "train.local_steps": 60},
    "server_adam": SERVER_ADAM,
    "server_adam_ema": SERVER_ADAM | EMA,
    # augmentation alone, and with multiplicity 4 (De et al. 2022)
    "aug": LIGHT_AUGMENT,
    "aug4": AUG4,
    "aug4_ema": AUG4 | EMA,
    "pretrain": PRETRAIN,
}


def variants(
    cfg: config_lib.Config,
    eps: list[float],
    patient: bool,
    levers: list[str] | tuple[str, ...] = ("default",),
    baselines: bool = True,
    units: list[str] | None = None,
) -> list[tuple[str, dict]]:
    out = []
    if baselines:
        out += [
            ("centralized", {"train.mode": "centralized", "privacy.level": "none"}),
            ("fedavg", {"privacy.level": "none"}),
        ]
    if "pretrain" in levers:  # the lever's own baseline: FedAvg from the same public model
        out.append(("fedavg_pretrain", {"privacy.level": "none", **PRETRAIN}))
    units = units or (["slice", "patient"] if patient else ["slice"])
    for unit in units:
        for e in eps:
            for lever in levers:
                name = f"dp_{unit}_eps{e:g}" + ("" if lever == "default" else f"_{lever}")
                out.append((name, {"privacy.unit": unit, "_target": e, **LEVERS[lever]}))
    return out


def calibrated(cfg: config_lib.Config, target: float) -> config_lib.Config:
    sites = load_training_data(cfg, None, progress=False)
    plan = privacy_plan(cfg, {s.name: records(cfg, s) for s in sites}, target)
    return cfg.replace(**{"privacy.noise_multiplier": plan["noise_multiplier"]})


def data_overrides(cfg: config_lib.Config, data_seed: int | None) -> dict[str, Any]:
    """data.synth.seed = `data_seed` in its own folder (ROOT_seedS), unless it is cfg's."""
    if data_seed is None or data_seed == cfg.data.synth.seed:
        return {}
    return {"data.synth.seed": data_seed, "data.root": f"{cfg.data.root}_seed{data_seed}"}


def pretrain_public(base: config_lib.Config, out: Path, echo: Callable[[str], Any]) -> Path:
    """Train the public model (FedAvg, no DP, synthetic seed PUBLIC_SEED) into out/public."""
    public_data = Path(base.data.root).parent / f"synth_public_seed{PUBLIC_SEED}"
    cfg = base.replace(
        **{"privacy.level": "none", "train.init_from": "", "data.root": str(public_data)},
        **{"data.synth.seed": PUBLIC_SEED},
    )
    run_dir = out / "public"
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = train(cfg, run_dir, progress=False)
    echo(json.dumps({"variant": "public", "val_dice_public_set": summary["val_dice"]}))
    return run_dir


def public_only_row(public: Path, sites: list) -> dict[str, Any]:
    """The public model itself on the report set's val/test split: what pre-training gives
    without any of the sites' data (the yardstick for the `pretrain` rows)."""
    model = open_run(public).model
    val, test = split_dice(model, sites, "val"), split_dice(model, sites, "test")
    return {
        "variant": "public_only",
        "unit": None,
        "noise_multiplier": None,
        "epsilon": None,
        "delta": None,
        "overrides": {},
        "keys": 1,
        "val_dice": val,
        "val": {"mean": val, "sd": None},
        "test": {"mean": test, "sd": None},
        "val_raw": mean_sd([]),
        "best_val_dice": None,
        "rounds": 0,
        "wall_s": 0.0,
        "repetitions": [],
    }


def mean_sd(values: list[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return {"mean": None, "sd": None}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None}


def measure(
    config: str | Path,
    rounds: int | None = None,
    eps: list[float] | tuple[float, ...] = (1.0, 3.0, 8.0),
    patient: bool = False,
    out: str | Path = Path("runs", "privacy_utility"),
    echo: Callable[[str], Any] = print,
    overrides: dict[str, Any] | None = None,
    keys: int = 1,
    levers: list[str] | tuple[str, ...] = ("default",),
    baselines: bool = True,
    units: list[str] | None = None,
    data_seed: int | None = None,
) -> dict[str, Any]:
    """Train every variant `keys` times into `out`/VARIANT/keyK; the result (one row per
    variant with its repetitions and mean ± sd, the table).

    overrides: dotted config keys applied on load (run(quick) puts the data in a temp dir).
    """
    base = config_lib.load(config, overrides)
    base = base.replace(**data_overrides(base, data_seed))
    if rounds:
        base = base.replace(**{"train.rounds": rounds})
    sites = load_training_data(base, None, progress=False)  # build and cache the data first
    public = pretrain_public(base, Path(out), echo) if "pretrain" in levers else None
    rows = [] if public is None else [public_only_row(public, sites)]
    for name, changes in variants(base, list(eps), patient, levers, baselines, units):
        changes = {k: str(public) if v == PUBLIC_MODEL else v for k, v in changes.items()}
        target = changes.pop("_target", None)
        reps = []
        for k in range(keys):
            cfg = base.replace(**changes, **{"train.seed": base.train.seed + k})
            if target is not None:
                cfg = calibrated(cfg, target)
            run_dir = Path(out) / name / f"key{k}"
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.perf_counter()
            summary = train(cfg, run_dir, progress=False)  # a fresh run dir: a fresh secret key
            wall = time.perf_counter() - t0
            last = _last_row(run_dir)
            reps.append(
                {
                    "key": k,
                    "train_seed": cfg.train.seed,
                    "epsilon": summary["epsilon"],
                    "val_dice": summary["val_dice"],
                    "best_val_dice": summary["best_val_dice"],
                    "val_dice_raw": last.get("val_dice_raw"),  # without EMA (EMA levers)
                    "test_dice": split_dice(open_run(run_dir).model, sites, "test"),
                    "rounds": summary["rounds"],
                    "wall_s": wall,
                }
            )
            echo(json.dumps({"variant": name, **reps[-1]}))
        rows.append(
            {
                "variant": name,
                "unit": cfg.privacy.unit if cfg.privacy.level == "sample" else None,
                "noise_multiplier": cfg.privacy.noise_multiplier if target else None,
                "epsilon": max((r["epsilon"] for r in reps), default=None) if target else None,
                "delta": summary["delta"],
                "overrides": {k: v for k, v in changes.items()},
                "keys": len(reps),
                "val_dice": mean_sd([r["val_dice"] for r in reps])["mean"],
                "val": mean_sd([r["val_dice"] for r in reps]),
                "test": mean_sd([r["test_dice"] for r in reps]),
                "val_raw": mean_sd([r["val_dice_raw"] for r in reps]),
                "best_val_dice": mean_sd([r["best_val_dice"] for r in reps])["mean"],
                "rounds": summary["rounds"],
                "wall_s": statistics.fmean(r["wall_s"] for r in reps),
                "repetitions": reps,
            }
        )
    return {
        "config": str(config),
        "rounds": base.train.rounds,
        "eps": list(eps),
        "patient": patient,
        "keys": keys,
        "levers": list(levers),
        "data_seed": base.data.synth.seed,
        "data_root": base.data.root,
        **_headline(rows),
        "rows": rows,
        "markdown": table(rows),
    }


def _last_row(run_dir: Path) -> dict[str, Any]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def _headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Dice kept under DP: the smallest-ε variant's final val Dice / FedAvg's (no DP)."""
    fedavg = next((r for r in rows if r["variant"] == "fedavg"), None)
    dp = [r for r in rows if r["noise_multiplier"] is not None and r["epsilon"] is not None]
    if fedavg is None or not dp or not fedavg["val_dice"] > 0:
        return {}
    strict = min(dp, key=lambda r: r["epsilon"])
    return {
        "ratio": strict["val_dice"] / fedavg["val_dice"],
        "ratio_definition": f"final val Dice of {strict['variant']} (ε {strict['epsilon']:.2f}) "
        "/ FedAvg without DP",
    }


def _pm(stat: dict[str, Any] | None, fallback: float | None = None) -> str:
    if stat is None or stat.get("mean") is None:
        return "–" if fallback is None else f"{fallback:.3f}"
    if stat.get("sd") is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per variant; Dice as mean ± sd over its `keys` repetitions."""
    raw = any((r.get("val_raw") or {}).get("mean") is not None for r in rows)
    head = "| variant | keys | σ | ε (δ=1e-5) | val Dice (final) | test Dice |"
    head += " val Dice, last model (no EMA) |" if raw else ""
    lines = [head + " wall s |", "|---" * (8 if raw else 7) + "|"]
    for r in rows:
        sigma = "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        cells = [
            r["variant"],
            str(r.get("keys", 1)),
            sigma,
            eps,
            _pm(r.get("val"), r.get("val_dice")),
            _pm(r.get("test")),
        ]
        if raw:
            cells.append(_pm(r.get("val_raw")))
        cells.append(f"{r['wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(quick: bool = False) -> dict[str, Any]:
    """`tff-privseg bench --only privacy_utility`: returns the result; the CLI writes the files.

    quick: configs/smoke.toml, 2 rounds, ε = 8, slice unit only, one key; its runs and synthetic
    data go to a temporary directory.
    Otherwise configs/default.toml, its rounds, ε 1/3/8, slice and patient unit, 3 keys,
    runs/privacy_utility.
    """
    if not quick:
        return measure(CONFIGS / "default.toml", patient=True, echo=log, keys=3)
    with tempfile.TemporaryDirectory(prefix="privacy-utility-") as tmp:
        data = {"data.root": str(Path(tmp) / "data")}
        result = measure(CONFIGS / "smoke.toml", 2, [8.0], False, tmp, log, data)
    return result | {"quick": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(CONFIGS / "default.toml"))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument(
        "--eps", type=float, nargs="*", default=[1.0, 3.0, 8.0], help="none: baselines only"
    )
    ap.add_argument("--patient", action="store_true", help="also patient-level DP")
    ap.add_argument("--units", nargs="+", choices=["slice", "patient"], default=None)
    ap.add_argument("--keys", type=int, default=1, help="repetitions, each with a fresh key")
    ap.add_argument("--data-seed", type=int, default=None, help="synthetic set (data.synth.seed)")
    ap.add_argument("--levers", nargs="+", choices=sorted(LEVERS), default=["default"])
    ap.add_argument("--no-baselines", action="store_true", help="skip centralized and FedAvg")
    ap.add_argument("--out", default=str(Path("runs", "privacy_utility")))
    ap.add_argument("--results", default=str(RESULTS), help="folder for the JSON and the table")
    ap.add_argument("--name", default="privacy_utility", help="results file name")
    args = ap.parse_args()

    result = measure(
        args.config,
        args.rounds,
        args.eps,
        args.patient,
        args.out,
        keys=args.keys,
        levers=args.levers,
        baselines=not args.no_baselines,
        units=args.units,
        data_seed=args.data_seed,
    )
    markdown = result.pop("markdown")
    command = " ".join(["python", "-m", "benchmarks.privacy_utility", *sys.argv[1:]])
    path = save(args.name, result, Path(args.results), command=command)
    path.with_suffix(".md").write_text(markdown)
    print(markdown, end="")


if __name__ == "__main__":
    main()
