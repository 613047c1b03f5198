"""Segmentation scores: per volume (3D, source grid), pooled over slices, summarised per site.

Per foreground class: Dice, IoU and HD95 in mm per volume (``metrics.py``); per site and
overall the mean Dice / IoU over volumes and the median HD95 (an empty prediction or label gives
an infinite HD95: counted, and ``null`` in JSON); pooled slice Dice / IoU over all slices of a
split at R x R, threshold 0.5, eps 1e-7 (the PyTorch baseline's "Dice Score").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tff_privseg.config import DataConfig
from tff_privseg.data.geometry import hard_classes
from tff_privseg.metrics import POOLED_EPS, dice, hd95, iou


def class_ids(cfg: DataConfig) -> list[int]:
    """Foreground class ids the model predicts: [1] (binary) or 1..num_classes-1."""
    return [1] if cfg.labels == "binary" else list(range(1, cfg.num_classes))


def class_names(cfg: DataConfig) -> dict[str, str]:
    """Class id -> name; binary merges ``foreground_labels`` into class 1."""
    if cfg.labels == "binary":
        merged = ", ".join(map(str, cfg.foreground_labels))
        return {"0": "background", "1": f"foreground (label values {merged})"}
    return {str(c): "background" if c == 0 else f"class {c}" for c in range(cfg.num_classes)}


def num(x: float) -> float | None:
    """JSON-safe number: inf / nan -> None."""
    return float(x) if x is not None and math.isfinite(x) else None


def volume_metrics(
    pred: np.ndarray, true: np.ndarray, spacing: tuple[float, ...], classes: list[int]
) -> dict[str, dict[str, float]]:
    """3D Dice, IoU, HD95 (mm) per class of two label maps [X, Y, Z] with voxel ``spacing``."""
    return {
        str(c): {
            "dice": dice(pred == c, true == c),
            "iou": iou(pred == c, true == c),
            "hd95_mm": hd95(pred == c, true == c, spacing=spacing),
        }
        for c in classes
    }


def slice_counts(probs: np.ndarray, labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Pooled counts [K, 3] (TP, |pred|, |true|) per class over slices [N, R, R]."""
    pred = hard_classes(probs)
    out = np.zeros((len(classes), 3), np.float64)
    for k, c in enumerate(classes):
        p, t = pred == c, labels == c
        out[k] = (np.logical_and(p, t).sum(), p.sum(), t.sum())
    return out


def pooled_scores(counts: np.ndarray) -> tuple[float, float]:
    """(pooled Dice, pooled IoU) from counts [K, 3], averaged over classes (baseline's eps)."""
    tp, npred, ntrue = counts[:, 0], counts[:, 1], counts[:, 2]
    d = (2 * tp + POOLED_EPS) / (npred + ntrue + POOLED_EPS)
    j = (tp + POOLED_EPS) / (npred + ntrue - tp + POOLED_EPS)
    return float(d.mean()), float(j.mean())


def summarise(volumes: list[dict[str, Any]], classes: list[int]) -> dict[str, Any]:
    """Mean Dice / IoU and median HD95 over volumes, per class and over classes."""
    per_class = {}
    for c in map(str, classes):
        d = [v["classes"][c]["dice"] for v in volumes]
        j = [v["classes"][c]["iou"] for v in volumes]
        h = np.array([v["classes"][c]["hd95_mm"] for v in volumes], np.float64)
        per_class[c] = {
            "dice": float(np.mean(d)) if d else None,
            "dice_std": float(np.std(d)) if d else None,
            "iou": float(np.mean(j)) if j else None,
            "hd95_median_mm": num(float(np.median(h))) if h.size else None,
            "hd95_infinite": int(np.isinf(h).sum()),
        }

    def mean(key: str) -> float | None:
        vals = [per_class[c][key] for c in per_class if per_class[c][key] is not None]
        return float(np.mean(vals)) if vals else None

    h_all = [
        v["classes"][c]["hd95_mm"] if v["classes"][c]["hd95_mm"] is not None else math.inf
        for v in volumes
        for c in map(str, classes)
    ]
    return {
        "volumes": len(volumes),
        "dice": mean("dice"),
        "iou": mean("iou"),
        "hd95_median_mm": num(float(np.median(h_all))) if h_all else None,
        "hd95_infinite": int(np.isinf(np.array(h_all, np.float64)).sum()),
        "classes": per_class,
    }
