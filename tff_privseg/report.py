"""Training reports: per-round curves of one or more runs, and privacy vs utility across runs.

``report(runs, out)`` reads each run's ``metrics.jsonl`` (required), ``privacy.json`` and
``config.toml`` (optional) and, when there, ``eval_test/evaluation.json``; it writes into
``out`` (temp folder, then one rename)::

    loss.png  val_dice.png  epsilon.png     one line per run, x = round (loss: runs without DP
                                            only, DP runs do not release it; no file if none)
    privacy_utility.png                     several runs: final ε vs final validation Dice
    report.md                               markdown table, one row per run
    report.json                             the same numbers

Runs without DP have ε = ∞: they are left out of ``epsilon.png`` and drawn as a horizontal
reference line (the non-private utility) in the privacy-utility plot.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from tff_privseg.errors import UserError
from tff_privseg.evaluate.output import check_output, staged_output
from tff_privseg.rundir import (
    check_run_dir,
    finite_epsilon,
    layout,
    read_json,
    read_metrics,
)

REPORT_FILE = "report.json"
CURVES = (
    ("loss", "training loss", "loss.png"),
    ("val_dice", "validation Dice (pooled)", "val_dice.png"),
    ("epsilon", "ε (cumulative)", "epsilon.png"),
)


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def load_history(path: str | Path) -> dict[str, Any]:
    """One run's per-round rows and its final numbers (UserError if nothing was logged)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError("run directory not found", path)
    metrics = check_run_dir(path, (layout.METRICS,)) / layout.METRICS
    rows = read_metrics(metrics)
    if not rows:
        raise UserError("no rounds logged yet", metrics)
    privacy = read_json(path / layout.PRIVACY) if (path / layout.PRIVACY).is_file() else {}
    privacy = privacy if isinstance(privacy, dict) else {}
    level = privacy.get("level") or ("none" if rows[-1].get("epsilon") is None else "unknown")
    evaluation = path / layout.eval_dir("test") / layout.EVALUATION
    ev = read_json(evaluation) if evaluation.is_file() else {}
    dices = [d for d in (_finite(r.get("val_dice")) for r in rows) if d is not None]
    eps = finite_epsilon(privacy.get("epsilon", rows[-1].get("epsilon")))
    return {
        "run": str(path),
        "name": path.resolve().name,
        "rows": rows,
        "rounds": int(rows[-1]["round"]),
        "privacy": level,
        "noise_multiplier": privacy.get("noise_multiplier"),
        "l2_norm_clip": privacy.get("l2_norm_clip"),
        "epsilon": None if level == "none" else eps,
        "delta": None if level == "none" else privacy.get("delta", rows[-1].get("delta")),
        "final_val_dice": _finite(rows[-1].get("val_dice")),
        "best_val_dice": max(dices) if dices else None,
        "test_dice": _finite(ev.get("dice")),
        "test_pooled_slice_dice": _finite(ev.get("pooled_slice_dice")),
        "seconds": float(sum(_finite(r.get("seconds")) or 0.0 for r in rows)),
    }


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    """Run folder names, with the parent folder added where names collide."""
    names = [r["name"] for r in runs]
    out = []
    for r, name in zip(runs, names, strict=True):
        if names.count(name) > 1:
            parts = Path(r["run"]).resolve().parts[-2:]
            name = "/".join(parts)
        out.append(name)
    return out


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_curve(runs: list[dict[str, Any]], key: str, ylabel: str, path: Path) -> bool:
    """``key`` per round, one line per run; False (nothing written) when no run has a value."""
    fig = _figure()
    ax = fig.add_subplot()
    drawn = False
    for run in runs:
        pts = [(r["round"], _finite(r.get(key))) for r in run["rows"]]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=run["label"])
            drawn = True
    if not drawn:
        return False
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def plot_privacy_utility(runs: list[dict[str, Any]], path: Path) -> None:
    """Final ε (log x) vs final validation Dice; runs without DP as dashed reference lines."""
    fig = _figure()
    ax = fig.add_subplot()
    private = [r for r in runs if r["epsilon"] is not None and r["final_val_dice"] is not None]
    for r in private:
        ax.scatter(r["epsilon"], r["final_val_dice"], zorder=3)
        ax.annotate(
            r["label"],
            (r["epsilon"], r["final_val_dice"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    for r in runs:
        if r["epsilon"] is None and r["final_val_dice"] is not None:
            ax.axhline(r["final_val_dice"], linestyle="--", color="gray", linewidth=1)
            ax.annotate(
                f"{r['label']} (no DP, ε = ∞)",
                (0.01, r["final_val_dice"]),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                color="gray",
                xytext=(0, 3),
                textcoords="offset points",
            )
    if private and all(r["epsilon"] > 0 for r in private):
        ax.set_xscale("log")
    ax.set_xlabel("ε (final, lower = more private)")
    ax.set_ylabel("validation Dice (final round)")
    ax.set_title("privacy vs utility", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _cell(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "–"
    return format(x, spec) if isinstance(x, float) else str(x)


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """One row per run: privacy, σ, C, rounds, ε, δ, validation and test Dice."""
    header = [
        "run",
        "privacy",
        "σ",
        "C",
        "rounds",
        "ε",
        "δ",
        "final val Dice",
        "best val Dice",
        "test Dice (3D)",
        "test pooled slice Dice",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        eps = "∞" if r["epsilon"] is None and r["privacy"] == "none" else _cell(r["epsilon"], ".3f")
        row = [
            r["label"],
            r["privacy"],
            _cell(r["noise_multiplier"] if r["privacy"] != "none" else None, "g"),
            _cell(r["l2_norm_clip"] if r["privacy"] != "none" else None, "g"),
            str(r["rounds"]),
            eps,
            _cell(r["delta"], "g"),
            _cell(r["final_val_dice"]),
            _cell(r["best_val_dice"]),
            _cell(r["test_dice"]),
            _cell(r["test_pooled_slice_dice"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    note = (
        "\nval Dice: pooled over each site's validation slices, mean over sites (as logged in "
        "training). Test Dice: `evaluate` (RUN/eval_test), 3D per volume; pooled slice Dice is the "
        "PyTorch baseline's printed number.\n"
    )
    return "\n".join(lines) + "\n" + note


def default_out(runs: list[str | Path]) -> Path:
    """RUN/report for one run; reports/compare-HASH for several."""
    if len(runs) == 1:
        return Path(runs[0]) / "report"
    key = "\n".join(str(Path(r).resolve()) for r in runs)
    return Path("reports") / f"compare-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def report(runs: list[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Plots + markdown table for one or more runs into ``out`` (see module docstring)."""
    if not runs:
        raise UserError("give at least one run directory")
    out = check_output(out if out is not None else default_out(runs), REPORT_FILE)
    histories = [load_history(r) for r in runs]
    for h, label in zip(histories, _labels(histories), strict=True):
        h["label"] = label
    files = []
    with staged_output(out, REPORT_FILE) as tmp:
        for key, ylabel, name in CURVES:
            if plot_curve(histories, key, ylabel, tmp / name):
                files.append(name)
        if len(histories) > 1:
            plot_privacy_utility(histories, tmp / "privacy_utility.png")
            files.append("privacy_utility.png")
        (tmp / "report.md").write_text("# Training report\n\n" + markdown_table(histories))
        files.append("report.md")
        summary = {
            "out": str(out),
            "files": files,
            "runs": [{k: v for k, v in h.items() if k != "rows"} for h in histories],
        }
        (tmp / REPORT_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


__all__ = ["load_history", "markdown_table", "report"]
