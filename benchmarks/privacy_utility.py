"""Privacy-utility table on the default synthetic data: one command, one JSON, one markdown table.

Runs, with everything else as in configs/default.toml: centralized (pooled, plain Keras, the upper
bound), FedAvg without DP, and sample-level DP-SGD calibrated to each target ε (δ = 1e-5), for the
slice unit and (with --patient) the patient unit.

    .venv/bin/python -m benchmarks.privacy_utility [--rounds N] [--eps 1 3 8] [--patient]
    tff-privseg bench --only privacy_utility [--quick]

Both write benchmarks/results/privacy_utility.json (same content: `measure()`'s dict plus the
machine, command and time, through `benchmarks.common.save`) and privacy_utility.md (the table);
the folder is --results here, --out for `bench`. Paths are relative to the current directory.
`run(quick=True)` (`--quick`): configs/smoke.toml, 2 rounds, ε = 8 only, runs in a temporary
directory; `run()`: what main() does by default.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, log, save
from tff_privseg import config as config_lib
from tff_privseg.federated.train import load_training_data, train
from tff_privseg.privacy.planning import privacy_plan
from tff_privseg.privacy.schedule import records

# Relative to the current directory (the repository root), as in the commands above.
CONFIGS = Path("configs")


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


def measure(
    config: str | Path,
    rounds: int | None = None,
    eps: list[float] | tuple[float, ...] = (1.0, 3.0, 8.0),
    patient: bool = False,
    out: str | Path = Path("runs", "privacy_utility"),
    echo: Callable[[str], Any] = print,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train every variant into `out`/VARIANT; the result (one row per variant, the table).

    overrides: dotted config keys applied on load (run(quick) puts the data in a temp dir).
    """
    base = config_lib.load(config, overrides)
    if rounds:
        base = base.replace(**{"train.rounds": rounds})
    load_training_data(base, None, progress=False)  # build and cache the data outside the timing
    rows = []
    for name, overrides in variants(base, list(eps), patient):
        target = overrides.pop("_target", None)
        cfg = base.replace(**overrides)
        if target is not None:
            cfg = calibrated(cfg, target)
        run_dir = Path(out) / name
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        summary = train(cfg, run_dir, progress=False)
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
        echo(json.dumps(rows[-1]))
    return {
        "config": str(config),
        "rounds": base.train.rounds,
        "eps": list(eps),
        "patient": patient,
        **_headline(rows),
        "rows": rows,
        "markdown": table(rows),
    }


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


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | σ | ε (δ=1e-5) | val Dice (final) | wall s |", "|---|---|---|---|---|"]
    for r in rows:
        sigma = "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append(
            f"| {r['variant']} | {sigma} | {eps} | {r['val_dice']:.3f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def run(quick: bool = False) -> dict[str, Any]:
    """`tff-privseg bench --only privacy_utility`: returns the result; the CLI writes the files.

    quick: configs/smoke.toml, 2 rounds, ε = 8, slice unit only; its runs and synthetic data go
    to a temporary directory.
    Otherwise main()'s defaults (configs/default.toml, its rounds, ε 1/3/8, runs/privacy_utility).
    """
    if not quick:
        return measure(CONFIGS / "default.toml", echo=log)
    with tempfile.TemporaryDirectory(prefix="privacy-utility-") as tmp:
        data = {"data.root": str(Path(tmp) / "data")}
        result = measure(CONFIGS / "smoke.toml", 2, [8.0], False, tmp, log, data)
    return result | {"quick": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(CONFIGS / "default.toml"))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--patient", action="store_true", help="also patient-level DP")
    ap.add_argument("--out", default=str(Path("runs", "privacy_utility")))
    ap.add_argument("--results", default=str(RESULTS), help="folder for the JSON and the table")
    args = ap.parse_args()

    result = measure(args.config, args.rounds, args.eps, args.patient, args.out)
    markdown = result.pop("markdown")
    command = " ".join(["python", "-m", "benchmarks.privacy_utility", *sys.argv[1:]])
    path = save("privacy_utility", result, Path(args.results), command=command)
    path.with_suffix(".md").write_text(markdown)
    print(markdown, end="")


if __name__ == "__main__":
    main()
