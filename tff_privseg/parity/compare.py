"""A run directory side by side with a PyTorch-baseline result, flagging differing settings.

Baseline results come as

* a ``completed_trainings.csv`` row: the baseline's own (its argument names: ``batch_size``,
  ``lr``, ``differentially_private``, ``bin_seg``..., plus ``best_validation_score``) or ours
  (dotted config keys, from ``baseline_format.append_completed_training``);
* a baseline log (stdout of its ``train.py`` / ``test.py``): the argument table it prints at
  start-up, ``Train Epoch`` lines, ``(ε = ..., δ = ...)`` lines, the per-epoch validation
  ``Dice score on test set`` and the test printout (``Dice Loss`` / ``Dice Score`` / ``IoU``).

Settings are compared in our vocabulary (the baseline's are translated as ``config from-ini``
does). A setting counts as differing only where both sides state it and it matters (Adam betas
only when both use Adam, DP parameters only when either side is private...). Metrics are shown
side by side with their difference, never "flagged": they are what is being compared.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tff_privseg import config as config_lib
from tff_privseg.errors import UserError
from tff_privseg.parity.baseline_format import (
    flatten_config,
    parse_baseline_log,
    read_completed_trainings,
)
from tff_privseg.rundir import epsilon_from_json, layout, read_json_object, read_metrics

# (label, our dotted key, the baseline's names for it, conversion of the baseline's text)
_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(text)


def _int(text: str) -> int:
    value = float(text)
    if value != int(value):
        raise ValueError(text)
    return int(value)


def _lower(text: str) -> str:
    return text.strip().lower()


SETTINGS: list[tuple[str, str, tuple[str, ...], Callable[[str], Any]]] = [
    ("labels", "data.labels", ("bin_seg", "binary_segmentation"),
     lambda t: "binary" if _bool(t) else "classification"),
    ("resolution", "data.resolution", ("train_resolution",), _int),
    ("validation fraction", "data.val_fraction", ("validation_split", "val_split"),
     lambda t: float(t) / 100.0),
    ("model", "model.name", ("model",), _lower),
    ("rounds", "train.rounds", (), _int),
    ("local steps per round", "train.local_steps", ("sync_every_n_batch",), _int),
    ("batch size", "train.batch_size", ("batch_size",), _int),
    ("optimizer", "train.client_optimizer", ("optimizer",), _lower),
    ("learning rate", "train.client_lr", ("lr",), float),
    ("lr schedule", "train.lr_schedule", (), str),
    ("final learning rate", "train.end_lr", ("end_lr",), float),
    ("Adam beta1", "train.beta1", ("beta1",), float),
    ("Adam beta2", "train.beta2", ("beta2",), float),
    ("weight decay", "train.weight_decay", ("weight_decay",), float),
    ("site weighting", "train.weighting", ("weighted_averaging",),
     lambda t: "examples" if _bool(t) else "uniform"),
    ("seed", "train.seed", ("seed",), _int),
    ("privacy", "privacy.level", ("differentially_private",),
     lambda t: "sample" if _bool(t) else "none"),
    ("noise multiplier", "privacy.noise_multiplier", ("noise_multiplier",), float),
    ("clip norm", "privacy.l2_norm_clip", ("max_grad_norm",), float),
    ("delta", "privacy.delta", ("target_delta",), float),
    ("rotation", "data.augment.rotation", ("rotation",), float),
    ("translate", "data.augment.translate", ("translate",), float),
    ("scale", "data.augment.scale", ("scale",), float),
    ("noise std", "data.augment.noise_std", ("noise_std",), float),
    ("noise probability", "data.augment.noise_prob", ("noise_prob",), float),
    ("secure aggregation", "privacy.secure_aggregation", ("unencrypted_aggregation",),
     lambda t: not _bool(t)),
]  # fmt: skip

# Baseline settings with no counterpart here, and when they matter (given the baseline's text).
BASELINE_ONLY: list[tuple[str, Callable[[str], bool], str]] = [
    ("restarts", lambda t: _int(t) > 0, "warm restarts of the lr schedule"),
    ("keep_optim_dict", _bool, "optimizer state kept across synchronisations"),
    ("microbatch_size", lambda t: _int(t) != 1, "clipping per microbatch, not per example"),
    ("repetitions_dataset", lambda t: _int(t) > 1, "data repeated within an epoch"),
    ("mixup", _bool, "MixUp"),
    ("pretrained", _bool, "pretrained weights"),
    ("shear", lambda t: float(t) > 0, "shearing"),
    ("individual_albu_probs", lambda t: float(t) > 0, "vertical flips / albumentations"),
    *[
        (name, _bool, f"albumentations {name}")
        for name in (
            "clahe randomgamma randombrightness blur elastic optical_distortion "
            "grid_distortion grid_shuffle hsv invert cutout shadow fog sun_flare solarize "
            "equalize grid_dropout"
        ).split()
    ],
]

# When a setting matters (given both sides' settings); otherwise it is shown, never flagged.
_RELEVANT: dict[str, Callable[[dict, dict], bool]] = {
    "train.end_lr": lambda a, b: "loglinear" in (a.get("train.lr_schedule"),
                                                 b.get("train.lr_schedule")),
    "train.beta1": lambda a, b: a.get("train.client_optimizer") == "adam"
    and b.get("train.client_optimizer") == "adam",
    "privacy.noise_multiplier": lambda a, b: "none" not in (a.get("privacy.level"),
                                                            b.get("privacy.level")),
    "data.augment.noise_prob": lambda a, b: bool(a.get("data.augment.noise_std"))
    or bool(b.get("data.augment.noise_std")),
}  # fmt: skip
_RELEVANT["train.beta2"] = _RELEVANT["train.beta1"]
_RELEVANT["privacy.l2_norm_clip"] = _RELEVANT["privacy.noise_multiplier"]
_RELEVANT["privacy.delta"] = _RELEVANT["privacy.noise_multiplier"]


# --------------------------------------------------------------------------------------------
# Our run directory


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Settings and results of a run directory, read defensively (what is missing is None)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError("run directory not found", run)
    warnings: list[str] = []
    cfg_path = run / layout.CONFIG
    if not cfg_path.is_file():
        raise UserError(f"not a run directory (no {layout.CONFIG})", run)
    try:
        settings = flatten_config(config_lib.load(cfg_path))
    except UserError as e:  # another schema version: compare what it has
        warnings.append(f"{layout.CONFIG} does not load with this version ({e}); compared as is")
        try:
            settings = flatten_config(tomllib.loads(cfg_path.read_text()))
        except tomllib.TOMLDecodeError as e2:
            raise UserError(f"not valid TOML ({e2})", cfg_path) from None
    rows = _read_rows(run / layout.METRICS, warnings)
    privacy = read_json_object(run / layout.PRIVACY, warnings, required=True)
    evaluation = read_json_object(run / layout.EVALUATION, warnings, required=False)
    val = [r.get("val_dice") for r in rows]
    val = [x for x in val if _is_number(x)]
    seconds = [r.get("seconds") for r in rows if _is_number(r.get("seconds"))]
    metrics: dict[str, Any] = {
        "rounds": rows[-1].get("round") if rows else None,
        "best_val_dice": max(val) if val else None,
        "final_val_dice": val[-1] if val else None,
        "seconds": sum(seconds) if seconds else None,
        "epsilon": None,
        "delta": None,
    }
    if privacy is not None:
        private = privacy.get("level") != "none"
        eps = privacy.get("epsilon")
        metrics["epsilon"] = epsilon_from_json(eps) if private else eps
        metrics["delta"] = privacy.get("delta") if private else None
    elif rows and rows[-1].get("epsilon") is not None:
        metrics["epsilon"], metrics["delta"] = rows[-1].get("epsilon"), rows[-1].get("delta")
    if settings.get("privacy.level") == "none":
        metrics["epsilon"], metrics["delta"] = math.inf, None
    metrics.update(evaluation_metrics(evaluation, warnings) if evaluation is not None else {})
    return {"path": str(run), "settings": settings, "metrics": metrics, "warnings": warnings}


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _read_rows(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        warnings.append(f"{path.name} missing")
        return []
    return read_metrics(path, lenient=True, warnings=warnings)


_EVAL_NAMES = {
    "test_dice": ("dice_score", "pooled_dice", "test_dice", "dice"),
    "test_iou": ("iou", "pooled_iou", "test_iou", "jaccard"),
    "test_dice_loss": ("dice_loss", "pooled_dice_loss", "test_dice_loss"),
}
_PREFERRED = ("test", "pooled", "overall", "metrics", "summary", "all", "baseline")
_SKIP = {"sites", "per_site", "by_site", "volumes", "per_volume", "cases", "per_case", "val"}


def evaluation_metrics(evaluation: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """Test Dice / IoU / Dice loss from an ``evaluation.json`` of unknown exact shape.

    Looks for the pooled numbers first in sub-objects named test/pooled/overall/metrics/...,
    then at the top level, then anywhere except per-site / per-volume breakdowns; a printout
    string in the baseline's format is parsed as a last resort. Percentages (> 1) are turned
    into fractions.
    """
    out: dict[str, Any] = {}
    for metric, names in _EVAL_NAMES.items():
        value = _find(evaluation, names)
        if value is not None and 1.0 < value <= 100.0:
            warnings.append(f"evaluation.json {metric} = {value} read as a percentage")
            value /= 100.0
        if value is not None:
            out[metric] = value
    if len(out) < len(_EVAL_NAMES):
        for text in _strings(evaluation):
            if "Dice Score:" in text:
                parsed = parse_baseline_log(text)["test"]
                for metric, key in (
                    ("test_dice", "dice_score"),
                    ("test_iou", "iou"),
                    ("test_dice_loss", "dice_loss"),
                ):
                    if metric not in out and key in parsed:
                        out[metric] = parsed[key]
    if not out:
        warnings.append("evaluation.json has no Dice/IoU this version recognises")
    return out


def _find(obj: dict[str, Any], names: tuple[str, ...]) -> float | None:
    queue: list[dict[str, Any]] = [obj[k] for k in _PREFERRED if isinstance(obj.get(k), dict)]
    queue.append(obj)
    seen: set[int] = set()
    while queue:
        node = queue.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        for name in names:
            value = node.get(name)
            if _is_number(value):
                return float(value)
            if isinstance(value, dict):  # e.g. {"dice": {"mean": ..}} or {"dice": {"pooled": ..}}
                for sub in ("pooled", "value", "mean", "overall"):
                    if _is_number(value.get(sub)):
                        return float(value[sub])
        queue += [v for k, v in node.items() if isinstance(v, dict) and k not in _SKIP]
    return None


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


# --------------------------------------------------------------------------------------------
# The baseline's side


def load_baseline(path: str | Path, row: int | None = None) -> dict[str, Any]:
    """Settings and results of a baseline CSV row (default: the last) or a baseline log."""
    path = Path(path)
    if not path.is_file():
        raise UserError("baseline file not found", path)
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror or e})", path) from None
    first = text.splitlines()[0] if text.strip() else ""
    is_csv = path.suffix.lower() == ".csv" or (
        "," in first and ("best_validation_score" in first or "timestamp" in first)
    )
    if is_csv:
        return _baseline_csv(path, row)
    if row is not None:
        raise UserError("--row applies to a CSV file, not a log", path)
    return _baseline_log(path, text)


def _baseline_csv(path: Path, row: int | None) -> dict[str, Any]:
    rows = read_completed_trainings(path)
    index = len(rows) - 1 if row is None else row
    if not -len(rows) <= index < len(rows):
        raise UserError(f"--row {row} out of range: the file has {len(rows)} row(s)", path)
    index %= len(rows)
    raw = {k: (v or "").strip() for k, v in rows[index].items() if k is not None}
    warnings: list[str] = []
    ours = any("." in k for k in raw)  # our own completed_trainings.csv (dotted config keys)
    settings = _settings_ours(raw) if ours else _settings_baseline(raw, warnings)
    extra = [] if ours else _baseline_only(raw, warnings)
    metrics: dict[str, Any] = {
        "best_val_dice": _score(raw.get("best_validation_score"), warnings),
        "epochs": _maybe(_int, raw.get("epochs")),
    }
    if ours:
        metrics["rounds"] = _maybe(_int, raw.get("rounds"))
        metrics["epsilon"] = _maybe(float, raw.get("epsilon"))
        metrics["delta"] = _maybe(float, raw.get("delta"))
        metrics["seconds"] = _maybe(float, raw.get("seconds"))
        if settings.get("privacy.level") == "none":
            metrics["epsilon"], metrics["delta"] = math.inf, None
    elif settings.get("privacy.level") == "sample":
        metrics["delta"] = settings.get("privacy.delta")
    else:
        metrics["epsilon"] = math.inf if settings.get("privacy.level") == "none" else None
    return {
        "path": str(path),
        "kind": "csv (ours)" if ours else "csv",
        "row": index,
        "settings": settings,
        "baseline_only": extra,
        "metrics": metrics,
        "warnings": warnings,
        "timestamp": raw.get("timestamp"),
    }


def _baseline_log(path: Path, text: str) -> dict[str, Any]:
    parsed = parse_baseline_log(text)
    if not (parsed["test"] or parsed["val_dice"] or parsed["epochs"] or parsed["args"]):
        raise UserError(
            "no baseline results found (expected a completed_trainings.csv, or a log with its "
            "argument table, 'Train Epoch', 'Dice score on test set' or 'Dice Score:' lines)",
            path,
        )
    warnings: list[str] = []
    settings = _settings_baseline(parsed["args"], warnings)
    best = max(parsed["val_dice"]) if parsed["val_dice"] else None
    metrics: dict[str, Any] = {
        "best_val_dice": best,
        "final_val_dice": parsed["val_dice"][-1] if parsed["val_dice"] else None,
        "epochs": parsed["epochs"] or _maybe(_int, parsed["args"].get("epochs")),
        "epsilon": parsed["epsilon"],
        "delta": parsed["delta"],
    }
    if metrics["epsilon"] is None and settings.get("privacy.level") == "none":
        metrics["epsilon"] = math.inf
    for ours, theirs in (
        ("test_dice", "dice_score"),
        ("test_iou", "iou"),
        ("test_dice_loss", "dice_loss"),
    ):
        metrics[ours] = parsed["test"].get(theirs)
    return {
        "path": str(path),
        "kind": "log",
        "row": None,
        "settings": settings,
        "baseline_only": _baseline_only(parsed["args"], warnings),
        "metrics": metrics,
        "warnings": warnings,
    }


def _maybe(fn: Callable[[str], Any], text: str | None) -> Any:
    if text is None or text.strip() in ("", "nan", "None"):
        return None
    try:
        return fn(text)
    except (ValueError, TypeError):
        return None


def _score(text: str | None, warnings: list[str]) -> float | None:
    value = _maybe(float, text)
    if value is not None and 1.0 < value <= 100.0:
        warnings.append(f"best_validation_score {value} read as a percentage")
        value /= 100.0
    return value


def _settings_baseline(raw: dict[str, str], warnings: list[str]) -> dict[str, Any]:
    """The baseline's argument names and texts -> our dotted keys and values."""
    out: dict[str, Any] = {}
    for label, key, names, convert in SETTINGS:
        for name in names:
            text = raw.get(name)
            if text is None or text.strip() in ("", "nan", "None"):
                continue
            try:
                out[key] = convert(text)
            except (ValueError, TypeError):
                warnings.append(f"baseline {name} = {text!r} not understood ({label})")
            break
    lr, end_lr = out.get("train.client_lr"), out.get("train.end_lr")
    if lr is not None:
        loglinear = end_lr is not None and not math.isclose(end_lr, lr)
        out["train.lr_schedule"] = "loglinear" if loglinear else "constant"
    return out


def _baseline_only(raw: dict[str, str], warnings: list[str]) -> list[dict[str, str]]:
    """Baseline settings in effect that have no counterpart here."""
    out = []
    for name, active, what in BASELINE_ONLY:
        text = raw.get(name)
        if text is None or text.strip() in ("", "nan", "None"):
            continue
        try:
            if active(text):
                out.append({"name": name, "baseline": text, "what": what})
        except (ValueError, TypeError):
            warnings.append(f"baseline {name} = {text!r} not understood")
    return out


def _settings_ours(raw: dict[str, str]) -> dict[str, Any]:
    """Our CSV cells back to values (JSON lists, True/False, numbers, else text)."""
    out: dict[str, Any] = {}
    for key, text in raw.items():
        if "." not in key:
            continue
        if text in ("True", "False"):
            out[key] = text == "True"
            continue
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


# --------------------------------------------------------------------------------------------
# Side by side


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def compare(run_dir: str | Path, baseline: str | Path, row: int | None = None) -> dict[str, Any]:
    """Settings and metrics of a run and a baseline result, side by side (a JSON-able dict)."""
    ours = load_run(run_dir)
    theirs = load_baseline(baseline, row)
    a, b = ours["settings"], theirs["settings"]
    settings = []
    for label, key, _names, _convert in SETTINGS:
        x, y = a.get(key), b.get(key)
        relevant = _RELEVANT.get(key, lambda *_: True)(a, b)
        if x is None or y is None:
            status = "n/a"
        elif not relevant:
            status = "not used"
        else:
            status = "same" if _same(x, y) else "DIFFERS"
        settings.append({"name": label, "key": key, "ours": x, "baseline": y, "status": status})
    om, bm = ours["metrics"], theirs["metrics"]
    metrics = []
    for label, key in (
        ("test Dice (pooled, 0.5)", "test_dice"),
        ("test IoU", "test_iou"),
        ("test Dice loss", "test_dice_loss"),
        ("best validation Dice", "best_val_dice"),
        ("ε", "epsilon"),
        ("δ", "delta"),
        ("rounds", "rounds"),
        ("epochs", "epochs"),
        ("wall time (s)", "seconds"),
    ):
        x, y = om.get(key), bm.get(key)
        diff = x - y if _is_number(x) and _is_number(y) else None
        metrics.append({"name": label, "key": key, "ours": x, "baseline": y, "difference": diff})
    notes = [
        "Training length: the baseline counts epochs, we count rounds of train.local_steps "
        "local batches (`tff-privseg config from-ini --help` shows the conversion).",
        "Validation Dice: the baseline's best_validation_score is 1 - its mean soft Dice loss "
        "over validation batches; ours is the pooled Dice at threshold 0.5, averaged over sites.",
    ]
    if theirs["kind"] == "csv":
        notes.append(
            "The baseline's completed_trainings.csv holds no test Dice, ε or wall time: compare "
            "with its log for those."
        )
    return {
        "run_dir": ours["path"],
        "baseline": theirs["path"],
        "baseline_kind": theirs["kind"],
        "baseline_row": theirs["row"],
        "settings": settings,
        "differing_settings": [s["key"] for s in settings if s["status"] == "DIFFERS"],
        "baseline_only": theirs["baseline_only"],
        "metrics": metrics,
        "notes": notes,
        "warnings": [f"run: {w}" for w in ours["warnings"]]
        + [f"baseline: {w}" for w in theirs["warnings"]],
    }


def _show(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        if percent:
            return f"{value * 100:.2f}%"
        return f"{value:.6g}"
    return str(value)


_PERCENT = {"test_dice", "test_iou", "test_dice_loss", "best_val_dice"}


def format_comparison(result: dict[str, Any]) -> str:
    """The human table of ``compare``'s result."""
    base = result["baseline"]
    if result["baseline_row"] is not None:
        base += f" (row {result['baseline_row']})"
    lines = [f"ours:     {result['run_dir']}", f"baseline: {base} [{result['baseline_kind']}]", ""]
    rows = [["setting", "ours", "baseline", ""]]
    for s in result["settings"]:
        flag = {"DIFFERS": "DIFFERS", "n/a": "n/a", "not used": "(not used)"}.get(s["status"], "")
        rows.append([s["name"], _show(s["ours"]), _show(s["baseline"]), flag])
    lines += _table(rows)
    lines.append("")
    rows = [["metric", "ours", "baseline", "ours - baseline"]]
    for m in result["metrics"]:
        pct = m["key"] in _PERCENT
        diff = m["difference"]
        shown = "" if diff is None else (f"{diff * 100:+.2f} pts" if pct else f"{diff:+.6g}")
        rows.append([m["name"], _show(m["ours"], pct), _show(m["baseline"], pct), shown])
    lines += _table(rows)
    differing = result["differing_settings"]
    lines.append("")
    lines.append(
        f"{len(differing)} setting(s) differ: {', '.join(differing)}"
        if differing
        else "no stated setting differs"
    )
    extra = result["baseline_only"]
    if extra:
        lines.append(
            f"{len(extra)} baseline setting(s) in effect have no counterpart here: "
            + ", ".join(f"{e['name']} = {e['baseline']} ({e['what']})" for e in extra)
        )
    lines += [f"note: {n}" for n in result["notes"]]
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


__all__ = ["compare", "evaluation_metrics", "format_comparison", "load_baseline", "load_run"]
