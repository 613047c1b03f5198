"""Privacy-utility table on the default synthetic data: one command, one JSON, one markdown table.

Runs, with everything else as in configs/default.toml: centralized (pooled, plain Keras, the upper
bound), FedAvg without DP, and sample-level DP-SGD calibrated to each target ε (δ = 1e-5), for the
slice unit and (with --patient) the patient unit.

    .venv/bin/python benchmarks/privacy_utility.py [--rounds N] [--eps 1 3 8] [--patient]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from tff_privseg import config as config_lib
from tff_privseg.federated.train import load_training_data, records, train
from tff_privseg.privacy.planning import privacy_plan

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def variants(cfg: config_lib.Config, eps: list[float], patient: bool) -> list[tuple[str, dict]]:
    out = [
        ("centralized", {"train.mode": "centralized", "privacy.level": "none"}),
        ("fedavg", {"privacy.level": "none"}),
    ]
    units = ["slice", "patient"] if patient else ["slice"]
    for unit in units:
        for e in eps:
            out.append((f"dp_{unit}_eps{e:g}", {"privacy.unit": unit, "_target": e}))
    return out


def calibrated(cfg: config_lib.Config, target: float) -> config_lib.Config:
    sites = load_training_data(cfg, None, progress=False)
    plan = privacy_plan(cfg, {s.name: records(cfg, s) for s in sites}, target)
    return cfg.replace(**{"privacy.noise_multiplier": plan["noise_multiplier"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.toml"))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--patient", action="store_true", help="also patient-level DP")
    ap.add_argument("--out", default=str(ROOT / "runs" / "privacy_utility"))
    args = ap.parse_args()

    base = config_lib.load(args.config)
    if args.rounds:
        base = base.replace(**{"train.rounds": args.rounds})
    rows = []
    for name, overrides in variants(base, args.eps, args.patient):
        target = overrides.pop("_target", None)
        cfg = base.replace(**overrides)
        if target is not None:
            cfg = calibrated(cfg, target)
        run = Path(args.out) / name
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        summary = train(cfg, run, progress=False)
        rows.append(
            {
                "variant": name,
                "unit": cfg.privacy.unit if cfg.privacy.level == "sample" else None,
                "noise_multiplier": cfg.privacy.noise_multiplier if target else None,
                "epsilon": summary["epsilon"],
                "delta": summary["delta"],
                "val_dice": summary["val_dice"],
                "best_val_dice": summary["best_val_dice"],
                "rounds": summary["rounds"],
                "wall_s": time.perf_counter() - t0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "privacy_utility",
        "config": args.config,
        "rounds": base.train.rounds,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "privacy_utility.json").write_text(json.dumps(result, indent=2))
    lines = ["| variant | σ | ε (δ=1e-5) | val Dice (final) | wall s |", "|---|---|---|---|---|"]
    for r in rows:
        sigma = "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append(
            f"| {r['variant']} | {sigma} | {eps} | {r['val_dice']:.3f} | {r['wall_s']:.0f} |"
        )
    (RESULTS / "privacy_utility.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
