"""Evaluation: a run directory -> metrics, NIfTI masks on the source grid, overlays.

``evaluate(run_dir, data_root, split)`` predicts every slice of a split per site, maps the
predictions back onto each source volume's voxel grid and writes (into ``out``, atomically)::

    evaluation.json                 everything below, machine-readable
    predictions/SITE/CASE.nii.gz    uint8 class map, same shape + affine as the source CT
    overlays/SITE.png               a few slices: CT window | ground truth | prediction

Masks: the model's probabilities [n, R, R, C] of a volume's kept slices are resized linearly to
the canonical in-plane size (as ``tf.image.resize`` does in the exported SavedModel), thresholded
(binary, ``>= 0.5``) or arg-maxed (multiclass), placed at the kept z range (other slices are 0)
and reoriented to the file's voxel order (``data.geometry.mask_on_grid``).

Metrics (``evaluate.scores``), per foreground class: per volume, 3D, on the source voxel grid
against the source label file, inside the evaluated z slab (``data.crop_slices`` slices around
the label's centre, as the model was trained and as the reference study evaluated; the whole
volume when ``crop_slices = 0``); per site and overall; pooled over slices, the baseline's
"Dice Score" (pooled Dice weights big structures more: not comparable with the per-volume mean).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from tff_privseg.config import Config, DataConfig
from tff_privseg.data import SiteData, SliceSet, ensure_synthetic, load_sites
from tff_privseg.data.geometry import (
    THRESHOLD,
    canonical_label,
    hard_classes,
    mask_image,
    mask_on_grid,
    source_image,
)
from tff_privseg.data.preprocess import to_canonical
from tff_privseg.errors import UserError
from tff_privseg.evaluate.output import check_output, staged_output
from tff_privseg.evaluate.overlay import pick_overlay_slices, write_overlay
from tff_privseg.evaluate.prediction import PredictFn, keras_predict_fn
from tff_privseg.evaluate.scores import (
    class_ids,
    class_names,
    num,
    pooled_scores,
    slice_counts,
    summarise,
    volume_metrics,
)
from tff_privseg.rundir import layout, open_run

SPLITS = ("train", "val", "test")
EVALUATION_FILE = layout.EVALUATION


def resolve_data_root(cfg: Config, data_root: str | Path | None) -> Path:
    """``--data`` or the run's ``data.root`` (the synthetic default is rebuilt if missing)."""
    root = Path(data_root if data_root is not None else cfg.data.root)
    if data_root is None and cfg.data.source == "synthetic":
        ensure_synthetic(cfg.data, root)
    if not root.is_dir():
        raise UserError("dataset folder not found (pass --data)", root)
    return root


def evaluate_site(
    site: SiteData,
    split: str,
    predict_fn: PredictFn,
    cfg: DataConfig,
    out: Path,
    overlays: int = 3,
) -> tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]:
    """One site's split -> (site summary, per-volume records, pooled counts [K, 3]).

    Writes ``out/predictions/SITE/CASE.nii.gz`` and ``out/overlays/SITE.png``.
    """
    slices: SliceSet = getattr(site, split)
    classes = class_ids(cfg)
    probs = predict_fn(slices.images)
    counts = slice_counts(probs, slices.labels, classes)
    volumes = []
    for i, info in enumerate(slices.volumes):
        mask = mask_on_grid(probs[slices.volume_slices(i)], info)
        rel = Path("predictions", site.name, f"{info.case}.nii.gz")
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(mask_image(mask, source_image(info), cfg.num_classes), out / rel)
        start, stop = info.z_range
        pred = to_canonical(mask, info.affine)[:, :, start:stop]
        true = canonical_label(info, cfg)[:, :, start:stop]
        record = volume_metrics(pred, true, info.spacing, classes)
        volumes.append(
            {
                "site": site.name,
                "case": info.case,
                "image": info.image_path,
                "label": info.label_path,
                "mask": str(rel),
                "shape": list(info.shape),
                "spacing_mm": list(info.spacing),
                "slab": [start, stop],
                "classes": {
                    c: {k: num(v) if k == "hd95_mm" else v for k, v in m.items()}
                    for c, m in record.items()
                },
            }
        )
    summary = {"site": site.name, "slices": len(slices), **summarise(volumes, classes)}
    summary["pooled_slice_dice"], summary["pooled_slice_iou"] = pooled_scores(counts)
    rows = pick_overlay_slices(slices, overlays)
    if rows:
        (out / "overlays").mkdir(exist_ok=True)
        write_overlay(
            out / "overlays" / f"{site.name}.png", site.name, slices, hard_classes(probs), rows
        )
        summary["overlay"] = f"overlays/{site.name}.png"
    return summary, volumes, counts


def evaluate_sites(
    sites: list[SiteData],
    split: str,
    predict_fn: PredictFn,
    cfg: DataConfig,
    out: Path,
    overlays: int = 3,
) -> dict[str, Any]:
    """Every site's ``split`` -> the evaluation record (see module docstring); files in ``out``."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    classes = class_ids(cfg)
    site_rows, volumes = [], []
    counts = np.zeros((len(classes), 3))
    for site in sites:
        if len(getattr(site, split)) == 0:
            continue
        row, vols, c = evaluate_site(site, split, predict_fn, cfg, out, overlays)
        site_rows.append(row)
        volumes.extend(vols)
        counts += c
    if not volumes:
        raise UserError(f"no volumes in the '{split}' split of any site")
    overall = summarise(volumes, classes)
    overall["pooled_slice_dice"], overall["pooled_slice_iou"] = pooled_scores(counts)
    overall["site_mean_dice"] = float(np.mean([s["dice"] for s in site_rows]))
    return {
        "split": split,
        "threshold": THRESHOLD,
        "resolution": cfg.resolution,
        "classes": class_names(cfg),
        "dice": overall["dice"],
        "iou": overall["iou"],
        "hd95_median_mm": overall["hd95_median_mm"],
        "pooled_slice_dice": overall["pooled_slice_dice"],
        # the PyTorch baseline's test numbers (pooled over the split's slices, threshold 0.5);
        # its soft-Dice loss is not computed here
        "test": {
            "dice": overall["pooled_slice_dice"],
            "iou": overall["pooled_slice_iou"],
            "dice_loss": None,
        },
        "overall": overall,
        "sites": site_rows,
        "volumes": volumes,
        "notes": {
            "dice/iou/hd95": "3D per volume on the source voxel grid vs the source label, inside "
            "the evaluated z slab ('slab', canonical axial slices); site/overall values are means "
            "over volumes (HD95: median; infinite = one mask empty, stored as null)",
            "pooled_slice_dice": "baseline-style (PyTorch PrivateSegmentation 'Dice Score'): all "
            "slices of the split pooled at the training resolution, threshold 0.5, eps 1e-7",
            "masks": "predictions/SITE/CASE.nii.gz: uint8 class ids, same shape and affine as the "
            "source CT; slices outside the slab are 0",
        },
    }


def evaluate(
    run_dir: str | Path,
    data_root: str | Path | None = None,
    split: str = "test",
    out: str | Path | None = None,
    overlays: int = 3,
    batch_size: int = 32,
    progress: bool = False,
    predict_fn: PredictFn | None = None,
) -> dict[str, Any]:
    """Evaluate a run on ``split`` of a dataset; writes ``out`` (default ``RUN/eval_SPLIT``).

    ``predict_fn`` replaces the run's Keras model (tests use an oracle).
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    run = open_run(run_dir)
    root = resolve_data_root(run.cfg, data_root)
    default = run.path / layout.eval_dir(split)
    out = check_output(out if out is not None else default, EVALUATION_FILE)
    sites = load_sites(run.cfg.data, root, progress=progress)
    predict_fn = predict_fn or keras_predict_fn(run.model, batch_size)
    with staged_output(out, EVALUATION_FILE) as tmp:
        result = evaluate_sites(sites, split, predict_fn, run.cfg.data, tmp, overlays)
        result = {
            "run": str(run.path),
            "data": str(root),
            "out": str(out),
            "config_hash": run.cfg.digest(),
            "rounds": run.rounds,
            "epsilon": (run.privacy or {}).get("epsilon"),
            "privacy": run.cfg.privacy.level,
            **result,
        }
        (tmp / EVALUATION_FILE).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result
