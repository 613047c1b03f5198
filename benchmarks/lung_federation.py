"""Real lung CT (issue 20): FedAvg vs each site alone vs pooled vs slice-level DP-SGD, per site.

On the real lung-tumour DICOM federation (`tff-privseg data example --set lung`: rider_lung, 1
patient; radiomics_phantom, 4 patients) and configs/example_lung.toml, every training runs as a
user would run it: `tff-privseg train` in its own process, into its own run directory, then
`tff-privseg evaluate --split train` in its own process. Trainings:

- FedAvg over all sites (privacy.level = "none"), once per --seeds (train.seed: initialisation
  and the public shuffle; run-to-run spread);
- each site alone (a data root holding only that site: a folder with one symlink), evaluated
  in-sample and on every other site (leave-one-site-out: `evaluate --data OTHER_ROOT`);
- pooled (train.mode = "centralized": all sites' slices in one plain Keras loop);
- slice-level DP-SGD over all sites (privacy.level = "sample", privacy.unit = "slice"), σ
  calibrated by `tff-privseg privacy --target-epsilon E` for each --eps (default 8, 30, 100,
  1000: the last two bound nothing useful and show where the noise stops erasing the signal).

Every site has 1-4 patients and no held-out patient: in-sample scores (`--split train`) measure
fit, the unseen-site scores are the only out-of-sample ones. Dice is the mean over a site's
volumes (3D, source grid), HD95 the median over them (mm).

    python -m benchmarks.lung_federation [--data data/example_lung] [--config FILE]
        [--rounds 40] [--eps 8 30 100 1000] [--seeds 0 1 2] [--out runs/lung_federation]
        [--results benchmarks/results] [--reuse]
    tff-privseg bench --only lung_federation [--quick]

Writes RESULTS/lung_federation.json (`measure()`'s dict via `benchmarks.common.save`) and
lung_federation.md (the tables). --reuse keeps a training whose row file OUT/NAME.row.json
was written with the same config (an interrupted run continues where it stopped).
`--quick` (bench): 1 round at 32 px, one seed, ε 30, in a temporary directory (7.4 min
here: every training and evaluation still starts its own process).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, log, save
from tff_privseg import config as config_lib
from tff_privseg.errors import UserError

NAME = "lung_federation"
DATA = Path("data", "example_lung")
CONFIG = Path("configs", "example_lung.toml")
# The config's 20 rounds leave the FedAvg loss still falling at 128 px (1.27 -> 0.70 over
# rounds 1-20, measured); 40 rounds is ~4 min per federated training on 2 shared cores.
ROUNDS = 40  # configs/example_lung.toml's too
# Slice-level targets: 8 (a common choice) and 30; 100 and 1000 are no guarantee worth having
# and locate where the noise stops erasing what 48 and 183 slices per site can teach.
EPS = (8.0, 30.0, 100.0, 1000.0)
SEEDS = (0, 1, 2)
REPO = Path(__file__).resolve().parents[1]
MISSING_DATA = "lung data not found: run `tff-privseg data example --set lung --out {root}`"


@dataclass(frozen=True)
class Training:
    """One training: its run folder name, table label, sites (None: all) and config changes."""

    name: str
    label: str
    sites: tuple[str, ...] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    target_epsilon: float | None = None


def trainings(sites: Sequence[str], eps: Sequence[float], seeds: Sequence[int]) -> list[Training]:
    """The trainings of the study, in the order they run (the most informative first)."""
    plain = {"privacy.level": "none"}
    out = [Training("fedavg", "FedAvg (all sites)", None, plain | {"train.seed": seeds[0]})]
    out += [Training(f"alone_{s}", f"{s} alone", (s,), dict(plain)) for s in sites]
    pooled = plain | {"train.mode": "centralized"}
    out.append(Training("pooled", "pooled (centralized)", None, pooled))
    dp = {"privacy.level": "sample", "privacy.unit": "slice"}
    out += [Training(f"dp_slice_eps{e:g}", f"DP-SGD slice, ε {e:g}", None, dp, e) for e in eps]
    out += [
        Training(f"fedavg_seed{k}", f"FedAvg, seed {k}", None, plain | {"train.seed": k})
        for k in seeds[1:]
    ]
    return out


def data_sites(root: str | Path) -> list[str]:
    """The site folders of a dataset root (sorted); one line naming the folder when it is
    missing or holds fewer than two sites (leave-one-site-out needs two)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(MISSING_DATA.format(root=root), root)
    sites = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(sites) < 2:
        raise UserError(
            f"{len(sites)} site folder(s), leave-one-site-out needs 2 or more; "
            + MISSING_DATA.format(root=root),
            root,
        )
    return sites


def site_root(data: str | Path, site: str, dest: str | Path) -> Path:
    """A data root holding only `site`: DEST/SITE, a symlink to DATA/SITE (absolute). Its
    preprocessing cache is DEST/.cache (the source folder is not written)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for p in dest.iterdir():  # a root left by an earlier run with other sites: those go
        if p.is_symlink() and p.name != site:
            p.unlink()
    link = dest / site
    target = (Path(data) / site).resolve()
    if link.is_symlink() and link.resolve() == target:
        return dest
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return dest


def tff_privseg(args: Sequence[str], echo: Callable[[str], Any] = log) -> tuple[dict, float]:
    """Run `tff-privseg ARGS --json` in a fresh process; (its JSON line, wall seconds).

    A failure is one line naming the command and its last line of stderr.
    """
    command = [sys.executable, "-m", "cli.main", *args, "--json"]
    shown = "tff-privseg " + shlex.join(args)
    echo(f"$ {shown}")
    path = os.environ.get("PYTHONPATH")
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(REPO), *([path] if path else [])]),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
    }
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"`{shown}` failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def site_scores(evaluation: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    """Per site of an `evaluate --json` result: Dice (mean over volumes), HD95 (median, mm;
    null when infinite), per volume, and whether the site was in the training (`kind`)."""
    out = {}
    for s in evaluation["sites"]:
        vols = [v for v in evaluation["volumes"] if v["site"] == s["site"]]
        out[s["site"]] = {
            "kind": kind,
            "volumes": s["volumes"],
            "dice": s["dice"],
            "hd95_median_mm": s["hd95_median_mm"],
            "hd95_infinite": s["hd95_infinite"],
            "pooled_slice_dice": s["pooled_slice_dice"],
            "per_volume": [
                {
                    "case": v["case"],
                    **{k: c.get(k) for c in v["classes"].values() for k in ("dice", "hd95_mm")},
                }
                for v in vols
            ],
        }
    return out


def _records(run: Path) -> dict[str, int]:
    """Privacy records (slices) per site, from the run's ledger (empty without DP)."""
    ledger = json.loads((run / "privacy.json").read_text())
    return {s: u["records"] for s, u in (ledger.get("units") or {}).items() if "records" in u}


def _round_seconds(run: Path) -> tuple[float, float | None]:
    """Sum of the rounds' `seconds` and the last round's loss (None under DP)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sum(r["seconds"] for r in rows), rows[-1].get("loss") if rows else None


def run_training(
    t: Training,
    base: config_lib.Config,
    data: Path,
    sites: Sequence[str],
    out: Path,
    echo: Callable[[str], Any] = log,
    reuse: bool = False,
) -> dict[str, Any]:
    """Train `t` into OUT/NAME with the CLI, calibrate σ first for a target ε, evaluate it on
    its own sites (in-sample) and, when it saw only some sites, on each other one (unseen)."""
    own = data if t.sites is None else site_root(data, t.sites[0], out / "roots" / t.sites[0])
    cfg = base.replace(**t.overrides)
    cfg_path = out / "configs" / f"{t.name}.toml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, cfg_path)
    row_file = out / f"{t.name}.row.json"
    key = f"{cfg.digest()}-{t.target_epsilon}"  # the config before σ is calibrated, and the target
    if reuse and row_file.is_file():
        row = json.loads(row_file.read_text())
        if row.get("reuse_key") == key:
            echo(f"reusing {row_file}")
            return row | {"records": row.get("records") or _records(Path(row["run_dir"]))}
    commands, plan = [], None
    if t.target_epsilon is not None:
        args = ["privacy", "--config", str(cfg_path), "--data", str(own)]
        args += ["--target-epsilon", f"{t.target_epsilon:g}"]
        plan, _ = tff_privseg(args, echo)
        commands.append("tff-privseg " + shlex.join(args))
        cfg = cfg.replace(**{"privacy.noise_multiplier": plan["noise_multiplier"]})
        config_lib.save(cfg, cfg_path)
    run = out / t.name
    args = ["train", "--config", str(cfg_path), "--data", str(own), "--out", str(run), "--quiet"]
    if run.exists():  # a fresh run directory: a fresh secret key
        shutil.rmtree(run)
    summary, train_wall = tff_privseg(args, echo)
    commands.append("tff-privseg " + shlex.join(args))
    round_s, loss = _round_seconds(run)
    evals = [("in-sample", own, run / "eval_train")]
    if t.sites is not None:
        evals += [
            ("unseen", site_root(data, s, out / "roots" / s), run / f"eval_unseen_{s}")
            for s in sites
            if s not in t.sites
        ]
    scores: dict[str, Any] = {}
    eval_wall = 0.0
    for kind, root, dest in evals:
        args = ["evaluate", "--run", str(run), "--data", str(root), "--split", "train"]
        args += ["--out", str(dest), "--quiet"]
        evaluation, wall = tff_privseg(args, echo)
        commands.append("tff-privseg " + shlex.join(args))
        eval_wall += wall
        scores |= site_scores(evaluation, kind)
    row = {
        "name": t.name,
        "label": t.label,
        "trained_on": list(t.sites or sites),
        "mode": cfg.train.mode,
        "seed": cfg.train.seed,
        "rounds": summary["rounds"],
        "privacy": cfg.privacy.level,
        "unit": cfg.privacy.unit if cfg.privacy.level == "sample" else None,
        "target_epsilon": t.target_epsilon,
        "noise_multiplier": cfg.privacy.noise_multiplier if cfg.privacy.level != "none" else None,
        "epsilon": summary["epsilon"],
        "delta": summary["delta"],
        "privacy_plan": plan,
        "train_wall_s": train_wall,
        "round_s": round_s,
        "final_loss": loss,
        "records": _records(run),
        "eval_wall_s": eval_wall,
        "sites": scores,
        "run_dir": str(run),
        "config_digest": cfg.digest(),
        "reuse_key": key,
        "commands": commands,
    }
    row_file.write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")
    score_line = {s: round(v["dice"], 3) for s, v in scores.items()}
    echo(json.dumps({"training": t.name, "wall_s": round(train_wall), "dice": score_line}))
    return row


def measure(
    data: str | Path = DATA,
    config: str | Path = CONFIG,
    rounds: int | None = ROUNDS,
    eps: Sequence[float] = EPS,
    seeds: Sequence[int] = SEEDS,
    out: str | Path = Path("runs", NAME),
    echo: Callable[[str], Any] = log,
    overrides: dict[str, Any] | None = None,
    reuse: bool = False,
) -> dict[str, Any]:
    """Every training of `trainings()` into OUT, evaluated; the rows, a FedAvg spread summary
    and the markdown tables. `rounds` None keeps the config's; `overrides`: dotted keys."""
    data = Path(data)
    sites = data_sites(data)
    base = config_lib.load(config, overrides)
    if rounds:
        base = base.replace(**{"train.rounds": rounds})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = [
        run_training(t, base, data, sites, out, echo, reuse)
        for t in trainings(sites, list(eps), list(seeds))
    ]
    result = {
        "data": str(data),
        "config": str(config),
        "sites": sites,
        "rounds": base.train.rounds,
        "resolution": base.data.resolution,
        "eps": list(eps),
        "seeds": list(seeds),
        "total_wall_s": time.perf_counter() - t0,  # this invocation (--reuse: new rows only)
        "trainings_wall_s": sum(r["train_wall_s"] + r["eval_wall_s"] for r in rows),
        "fedavg_seeds": fedavg_spread(rows),
        **headline(rows),
        "rows": rows,
    }
    return result | {"markdown": table(result)}


def _site_mean(row: dict[str, Any], kind: str = "in-sample") -> float | None:
    vals = [s["dice"] for s in row["sites"].values() if s["kind"] == kind]
    return statistics.fmean(vals) if vals else None


def fedavg_spread(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """FedAvg over its seeds, per site: Dice mean, sd and the values (seed order)."""
    runs = [r for r in rows if r["name"] == "fedavg" or r["name"].startswith("fedavg_seed")]
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
    for site in runs[0]["sites"] if runs else []:
        vals = [r["sites"][site]["dice"] for r in runs]
        hd = [r["sites"][site]["hd95_median_mm"] for r in runs]
        out[site] = {
            "dice_mean": statistics.fmean(vals),
            "dice_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "dice": vals,
            "hd95_median_mm": hd,
        }
    return out


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Site-mean in-sample Dice of the smallest-ε DP run / FedAvg's (seed 0)."""
    fedavg = next((r for r in rows if r["name"] == "fedavg"), None)
    dp = [r for r in rows if r["target_epsilon"] is not None]
    if fedavg is None or not dp or not (_site_mean(fedavg) or 0) > 0:
        return {}
    strict = min(dp, key=lambda r: r["epsilon"])
    return {
        "ratio": _site_mean(strict) / _site_mean(fedavg),
        "ratio_definition": f"site-mean in-sample Dice of {strict['name']} (slice ε "
        f"{strict['epsilon']:.2f}) / FedAvg's",
    }


def _cell(score: dict[str, Any] | None) -> tuple[str, str]:
    """(Dice, HD95) cells; unseen-site values carry a dagger."""
    if score is None:
        return "–", "–"
    mark = " †" if score["kind"] == "unseen" else ""
    hd = score["hd95_median_mm"]
    hd95 = "inf" if hd is None else f"{hd:.1f}"
    if score["hd95_infinite"] and hd is not None:
        hd95 += f" ({score['hd95_infinite']} inf)"
    return f"{score['dice']:.3f}{mark}", f"{hd95}{mark}"


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per training (per site Dice and HD95, ε, σ, wall), the FedAvg seed
    spread, and per-volume Dice."""
    sites, rows = result["sites"], result["rows"]
    head = ["training", "ε (slice, δ=1e-5)", "σ"]
    for s in sites:
        head += [f"{s} Dice", f"{s} HD95 mm"]
    head += ["train wall s"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        sigma = "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
        cells = [r["label"], eps, sigma]
        for s in sites:
            cells += list(_cell(r["sites"].get(s)))
        cells.append(f"{r['train_wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    spread = result.get("fedavg_seeds") or {}
    if len(spread.get("seeds", [])) > 1:
        cells = [f"FedAvg, mean ± sd over seeds {', '.join(map(str, spread['seeds']))}", "∞", "–"]
        for s in sites:
            cells += [f"{spread[s]['dice_mean']:.3f} ± {spread[s]['dice_sd']:.3f}", ""]
        lines.append("| " + " | ".join(cells + [""]) + " |")
    text = "\n".join(lines) + "\n\n"
    text += (
        "Dice: mean over the site's volumes (3D, source grid); HD95: median over them. "
        "All scores are on the training patients (`evaluate --split train`: no patient is held "
        "out) except † = a site the model never saw (leave-one-site-out).\n\n"
    )
    cases = [(s, v["case"]) for s in sites for v in _first_scores(rows, s)]
    head = ["training"] + [f"{s}/{c}" for s, c in cases]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["label"]]
        for s, c in cases:
            score = r["sites"].get(s)
            vol = next((v for v in (score or {}).get("per_volume", []) if v["case"] == c), None)
            mark = " †" if score and score["kind"] == "unseen" else ""
            cells.append("–" if vol is None else f"{vol['dice']:.3f}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return text + "Per-volume Dice:\n\n" + "\n".join(lines) + "\n" + privacy_table(rows, sites)


def privacy_table(rows: list[dict[str, Any]], sites: Sequence[str]) -> str:
    """Markdown: what each DP row's ε means per site (from `tff-privseg privacy`'s plan)."""
    dp = [r for r in rows if r.get("privacy_plan")]
    if not dp:
        return ""
    head = ["training", "σ"]
    head += [f"{s}: slices, q, ε per slice" for s in sites]
    head += [f"{s}: largest slice group bounded" for s in sites]
    head += ["ε with the patient as unit, same σ"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in dp:
        plan = r["privacy_plan"]
        units, per_patient = plan["units"], plan.get("per_patient") or {}
        cells = [r["label"], f"{plan['noise_multiplier']:.3f}"]
        for s in sites:
            u, n = units[s], r.get("records", {}).get(s, "?")
            cells.append(f"{n}, {u['sampling_rate']:.3f}, {u['epsilon']:.2f}")
        for s in sites:
            cells.append(str(per_patient.get(s, {}).get("largest_bounded_group", "–")))
        pat = [v["patient_level_epsilon"] for v in per_patient.values()]
        cells.append(f"{max(pat):.1f}" if pat else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return (
        "\nPrivacy of the DP rows (`tff-privseg privacy --target-epsilon E`; δ = 1e-5; a "
        "patient has 48 slices, so group privacy bounds no whole patient):\n\n"
        + "\n".join(lines)
        + "\n"
    )


def _first_scores(rows: list[dict[str, Any]], site: str) -> list[dict[str, Any]]:
    for r in rows:
        if site in r["sites"]:
            return r["sites"][site]["per_volume"]
    return []


def run(quick: bool = False) -> dict[str, Any]:
    """`tff-privseg bench --only lung_federation`: data/example_lung, configs/example_lung.toml.

    quick: 1 round at 32 px, seed 0 only, ε 30 only, runs in a temporary directory.
    """
    if not quick:
        return measure(echo=log)
    data_sites(DATA)  # before the temporary folder: the missing-data error comes first
    with tempfile.TemporaryDirectory(prefix="lung-federation-") as tmp:
        small = {"data.resolution": 32}
        result = measure(DATA, CONFIG, 1, [30.0], [0], tmp, log, small)
    return result | {"quick": True}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA), help="the lung example's root")
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="0: the config's")
    ap.add_argument("--eps", type=float, nargs="*", default=list(EPS), help="slice-level ε targets")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="FedAvg seeds")
    ap.add_argument("--out", default=str(Path("runs", NAME)), help="run directories")
    ap.add_argument("--results", default=str(RESULTS), help="folder for the JSON and the table")
    ap.add_argument("--reuse", action="store_true", help="keep trainings already done in --out")
    args = ap.parse_args(argv)
    try:
        result = measure(
            args.data, args.config, args.rounds, args.eps, args.seeds, args.out, reuse=args.reuse
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    markdown = result.pop("markdown")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python", "-m", f"benchmarks.{NAME}", *argv])
    path = save(NAME, result, Path(args.results), command=command)
    path.with_suffix(".md").write_text(markdown)
    print(markdown, end="")


if __name__ == "__main__":
    main()
