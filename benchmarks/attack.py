"""Gradient inversion against plain and DP-SGD updates, and the membership audit: measured.

Writes benchmarks/results/attack.json (every case: SSIM/PSNR/MSE per slice, timings, settings)
and benchmarks/results/attack.png (original | reconstruction without DP | with DP-SGD); every
case's own JSON/PNG/NPZ go to --out (runs/attack_bench); paths are relative to the current
directory (the repository root). Data: the default synthetic set
(`tff-privseg data synth --out DATA`), preprocessed with configs/default.toml (64x64, U-Net
depth 3 / 16 filters, 318k parameters).

    .venv/bin/python -m benchmarks.attack --data DATA [--run RUN] [--only gradient,batch,...]
        [--iterations N] [--restarts K] [--slices I J ...]

Cases (``--only``): gradient (batch 1, several slices, untrained model), round (same with the
checkpoint of --run at --round), batch (batch sizes 1, 4, 8), delta (model delta after local
steps: SGD lr 0.01, and the config's Adam), labels (masks reconstructed jointly), l2 (DLG
distance), audit (--audit-runs). A run adds its cases to attack.json; the cases already there
are kept only if they came from the same config settings and data content, else dropped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, log, machine

CASES = ("gradient", "round", "batch", "delta", "labels", "l2", "audit")


def _summ(result: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for mode, r in result["results"].items():
        out[mode] = {
            k: r[k]
            for k in ("mean_ssim", "mean_psnr", "mean_mse", "mean_mask_dice", "seconds")
            if k in r
        }
    return out


def run_case(target, sites, name: str, out: Path, reuse: bool = False, **kw) -> dict[str, Any]:
    """One attack; with ``reuse``, a finished case of the same name and inversion settings in
    ``out`` is read back instead of recomputed (an interrupted benchmark resumes)."""
    from tff_privseg.attack.run import run_attack

    saved = out / name / "attack.json"
    if reuse and saved.exists():
        res = json.loads(saved.read_text())
        if res.get("inversion") == kw["inversion"].to_dict():
            log(f"[{name}] reused {saved}")
            return res
    t0 = time.perf_counter()
    res = run_attack(target, sites, out_dir=out / name, progress=False, **kw)
    log(f"[{name}] {json.dumps(_summ(res))} ({time.perf_counter() - t0:.0f} s)")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="synthetic dataset root (data synth)")
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--run", help="run directory for the early-round case")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--only", default=",".join(CASES[:-1]))
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--batch-iterations", type=int, default=600)
    ap.add_argument(
        "--secondary-iterations",
        type=int,
        default=1200,
        help="iterations of the delta, labels and l2 cases",
    )
    ap.add_argument("--slices", type=int, nargs="+", default=None, help="site A slice indices")
    ap.add_argument("--audit-runs", nargs="*", default=[], help="run dirs for the audit case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="read back finished cases from --out")
    ap.add_argument("--dp-everywhere", action="store_true", help="DP reconstructions in every case")
    ap.add_argument("--out", default="runs/attack_bench", help="per-case files")
    ap.add_argument("--results", default=str(RESULTS / "attack.json"))
    args = ap.parse_args()
    only = [c for c in args.only.split(",") if c]
    for c in only:
        if c not in CASES:
            ap.error(f"unknown case {c!r} (known: {', '.join(CASES)})")

    import numpy as np

    from tff_privseg.attack.inversion import InversionConfig
    from tff_privseg.attack.run import load_target, run_audit, save_figure
    from tff_privseg.data import load_sites

    out = Path(args.out)
    results_path = Path(args.results)
    target = load_target(None, args.config, 0)
    source = {
        "config": args.config,
        "config_digest": target.cfg.digest(),
        "data": args.data,
        "data_fingerprint": fingerprint(args.data),
    }
    cases: dict[str, Any] = previous_cases(results_path, source)
    sites = load_sites(target.cfg.data, args.data)
    site = sites[0]
    slices = args.slices
    if slices is None:  # the middle slice of the first four training volumes
        slices = []
        for v in range(min(4, len(site.train.volumes))):
            idx = site.train.volume_slices(v)
            slices.append(int(idx[len(idx) // 2]))
    base = InversionConfig(iterations=args.iterations, restarts=args.restarts, seed=args.seed)
    quick = InversionConfig(iterations=args.batch_iterations, restarts=1, seed=args.seed)
    secondary_cfg = InversionConfig(
        iterations=args.secondary_iterations,
        restarts=args.restarts,
        seed=args.seed,
    )
    # DP-SGD is measured on the headline cases (gradient, round); the other cases ask how much
    # a NON-private update leaks (batch size, multi-step delta, labels, distance): "both" adds
    # the DP reconstruction to each of them too (twice the time).
    secondary = "both" if args.dp_everywhere else "none"

    def per_slice(tgt, name: str, icfg: InversionConfig, subset=None, **kw) -> dict[str, Any]:
        rows = []
        recs = {}
        for i in slices[:subset]:
            res = run_case(
                tgt, sites, f"{name}_{i}", out, args.reuse, index=i, inversion=icfg, **kw
            )
            rows.append(res)
            recs[i] = res
        summary = {
            mode: {
                "ssim": [r["results"][mode]["ssim"][0] for r in rows],
                "psnr": [r["results"][mode]["psnr"][0] for r in rows],
                "mse": [r["results"][mode]["mse"][0] for r in rows],
                "seconds": [r["results"][mode]["seconds"] for r in rows],
            }
            for mode in rows[0]["results"]
        }
        for m in summary.values():
            m["mean_ssim"] = float(np.mean(m["ssim"]))
            m["min_ssim"] = float(np.min(m["ssim"]))
            m["mean_psnr"] = float(np.mean(m["psnr"]))
        return {
            "slices": slices[:subset],
            "source": rows[0]["source"],
            "summary": summary,
            "runs": rows,
        }

    if "gradient" in only:
        cases["gradient_b1_untrained"] = per_slice(target, "gradient_b1", base)
        figure = results_path.with_suffix(".png")
        _figure(cases["gradient_b1_untrained"], out, figure, save_figure, target.cfg)
    if "round" in only:
        if not args.run:
            log("[round] skipped: no --run")
        else:
            tgt = load_target(args.run, None, args.round)
            cases[f"gradient_b1_round{args.round}"] = per_slice(
                tgt, f"round{args.round}", base, subset=2
            )
    if "batch" in only:
        for b in (1, 4, 8):
            cases[f"batch{b}"] = run_case(
                target,
                sites,
                f"batch{b}",
                out,
                args.reuse,
                index=slices[0],
                batch_size=b,
                privacy=secondary,
                inversion=quick,
            )
    if "delta" in only:
        import dataclasses

        # FedAvg with plain SGD local steps: the delta is lr x the sum of the step gradients.
        sgd = dataclasses.replace(
            target,
            cfg=target.cfg.replace(**{"train.client_optimizer": "sgd", "train.client_lr": 0.01}),
        )
        k = target.cfg.train.local_steps
        deltas = [(f"delta_sgd_{k}steps", sgd, f"delta_sgd{k}", k)]
        deltas += [(f"delta_adam_{n}steps", target, f"delta{n}", n) for n in (1, k)]
        for key, tgt, name, steps in deltas:
            cases[key] = run_case(
                tgt,
                sites,
                name,
                out,
                args.reuse,
                index=slices[0],
                privacy=secondary,
                update="delta",
                local_steps=steps,
                inversion=secondary_cfg,
            )
    if "labels" in only:
        icfg = InversionConfig(**{**secondary_cfg.to_dict(), "labels": "reconstruct"})
        cases["labels_reconstructed"] = run_case(
            target,
            sites,
            "labels",
            out,
            args.reuse,
            index=slices[0],
            privacy=secondary,
            inversion=icfg,
        )
    if "l2" in only:
        icfg = InversionConfig(**{**secondary_cfg.to_dict(), "distance": "l2"})
        cases["l2_dlg"] = run_case(
            target, sites, "l2", out, args.reuse, index=slices[0], privacy=secondary, inversion=icfg
        )
    if "audit" in only:
        from tff_privseg.attack.run import read_epsilon

        audits = {}
        for run in args.audit_runs:
            t = load_target(run, None, None)
            res = run_audit(t, load_sites(t.cfg.data, args.data))
            res["epsilon"] = read_epsilon(run)
            res["config"] = (Path(run) / "config.toml").read_text()
            audits[run] = res
            log(f"[audit] {run}: max AUC {res['max_auc']:.3f} ε {res['epsilon']}")
        cases["audit"] = audits

    payload = {
        "benchmark": "attack",
        "command": " ".join(
            shlex.quote(a) for a in [".venv/bin/python", "-m", "benchmarks.attack"] + sys.argv[1:]
        ),
        "machine": machine(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **source,
        "cases": cases,
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    log(f"wrote {results_path}")
    print(json.dumps({k: _brief(v) for k, v in cases.items()}))


def fingerprint(data: str | Path) -> str:
    """SHA-256 over the relative paths and bytes of the files under ``data`` (370 MB: ~1 s).

    Hidden entries (the preprocessing cache ``.cache``, which grows as runs use it) are left out.
    """
    import hashlib

    root = Path(data)

    def visible(p: Path) -> bool:
        return p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)

    h = hashlib.sha256()
    for f in sorted(filter(visible, root.rglob("*"))):
        h.update(f"{f.relative_to(root)}\0".encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def previous_cases(results_path: Path, source: dict[str, str]) -> dict[str, Any]:
    """The cases of an earlier results file, kept only if made from the same config and data.

    ``--only`` adds cases to the results file; cases measured on other data (for example a
    regenerated synthetic set under the same path) would otherwise sit next to new ones.
    Compared by content (the resolved config's ``Config.digest()``, ``data_fingerprint``), not
    by path.
    """
    if not results_path.exists():
        return {}
    previous = json.loads(results_path.read_text())
    cases = previous.get("cases", {})
    keys = ("config_digest", "data_fingerprint")
    if cases and any(previous.get(k) != source[k] for k in keys):
        log(f"{results_path}: earlier cases {sorted(cases)} came from other config/data: dropped")
        return {}
    return cases


def _figure(case: dict[str, Any], out: Path, dest: Path, save_figure, cfg) -> None:
    """attack.png: one row per slice, original | no DP | DP-SGD (from the saved npz files)."""
    import numpy as np

    from tff_privseg.attack.inversion import Reconstruction

    imgs, labs, recs = [], [], {"none": [], "sample": []}
    metrics = {"none": {"ssim": [], "psnr": []}, "sample": {"ssim": [], "psnr": []}}
    for run in case["runs"]:
        z = np.load(Path(run["json"]).with_suffix(".npz"))
        imgs.append(z["original"])
        labs.append(z["labels"])
        for mode in recs:
            recs[mode].append(z[f"recon_{mode}"])
            metrics[mode]["ssim"] += run["results"][mode]["ssim"]
            metrics[mode]["psnr"] += run["results"][mode]["psnr"]
    images = np.concatenate(imgs)
    n = len(images)
    packed = {
        mode: (
            Reconstruction(np.concatenate(recs[mode]), None, [], 0, 0.0),
            {**metrics[mode], "order": list(range(n))},
        )
        for mode in recs
    }
    save_figure(
        dest,
        images,
        np.concatenate(labs),
        packed,
        title=(
            f"gradient of one slice, untrained U-Net ({cfg.data.resolution}x"
            f"{cfg.data.resolution}): original | no DP | DP-SGD σ={cfg.privacy.noise_multiplier:g}"
        ),
    )


def _brief(case: dict[str, Any]) -> Any:
    if "summary" in case:
        return {m: round(v["mean_ssim"], 3) for m, v in case["summary"].items()}
    if "results" in case:
        return {m: round(v["mean_ssim"], 3) for m, v in case["results"].items()}
    return {k: v.get("max_auc") for k, v in case.items()}


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


if __name__ == "__main__":
    main()
