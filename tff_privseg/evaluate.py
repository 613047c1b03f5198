"""Evaluation and prediction: a run directory -> metrics, NIfTI masks on the source grid, overlays.

``evaluate(run_dir, data_root, split)`` predicts every slice of a split per site, maps the
predictions back onto each source volume's voxel grid and writes (into ``out``, atomically)::

    evaluation.json                 everything below, machine-readable
    predictions/SITE/CASE.nii.gz    uint8 class map, same shape + affine as the source CT
    overlays/SITE.png               a few slices: CT window | ground truth | prediction

Masks: the model's probabilities [n, R, R, C] of a volume's kept slices are resized linearly to
the canonical in-plane size (as ``tf.image.resize`` does in the exported SavedModel), thresholded
(binary, ``>= 0.5``) or arg-maxed (multiclass), placed at the kept z range (other slices are 0)
and reoriented to the file's voxel order (``data.slices_to_volume``).

Metrics (``metrics.py``), per foreground class:

* per volume, 3D, on the source voxel grid against the source label file, inside the evaluated
  z slab (``data.crop_slices`` slices around the label's centre, as the model was trained and as
  the reference study evaluated; the whole volume when ``crop_slices = 0``): Dice, IoU and HD95
  in mm from the voxel spacing;
* per site and overall: mean Dice / IoU over volumes, median HD95 (an empty prediction or label
  gives an infinite HD95; those are counted, and stored as ``null`` in JSON);
* ``pooled_slice_dice`` / ``pooled_slice_iou``: all slices of the split pooled at R x R,
  threshold 0.5, eps 1e-7: the "Dice Score" that the PyTorch baseline prints. Pooled Dice weights
  big structures more and is not comparable with the per-volume mean.

``predict(model, inputs, out)`` runs a run directory or an exported SavedModel on new scans
(no label: every axial slice is predicted) and writes a mask on each scan's own grid.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from tff_privseg import config as config_lib
from tff_privseg.config import Config, DataConfig
from tff_privseg.data import SiteData, SliceSet, VolumeInfo, ensure_synthetic, load_sites
from tff_privseg.data.layout import NIFTI_SUFFIXES, CaseFiles, case_id
from tff_privseg.data.loader import allowed_labels, read_case_files
from tff_privseg.data.nifti import as_label_array, check_finite, open_nifti, read_canonical
from tff_privseg.data.preprocess import (
    map_labels,
    resize_plane,
    scale_intensity,
)
from tff_privseg.errors import UserError
from tff_privseg.metrics import POOLED_EPS, dice, hd95, iou

THRESHOLD = 0.5
SPLITS = ("train", "val", "test")
EVALUATION_FILE = "evaluation.json"
PREDICTIONS_FILE = "predictions.json"
SAVED_MODEL_FILE = "saved_model.pb"

# images float32 [N, R, R, 1] in [0, 1] -> probabilities float32 [N, R, R, C]
PredictFn = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------
# Run directories


@dataclass
class Run:
    """A finished training run: resolved config, Keras model and the privacy ledger (if any)."""

    path: Path
    cfg: Config
    model: Any  # tf.keras.Model: probabilities out, input (R, R, 1)
    privacy: dict[str, Any] | None
    metrics: list[dict[str, Any]] = field(default_factory=list)


def check_run_dir(path: str | Path, need: tuple[str, ...] = ("config.toml", "model.keras")) -> Path:
    """The run directory ``path`` exists and holds the files in ``need`` (else UserError)."""
    path = Path(path)
    if not path.exists():
        raise UserError("run directory not found", path)
    if not path.is_dir():
        raise UserError("not a run directory (expected the folder of `train --out`)", path)
    for name in need:
        if not (path / name).is_file():
            hint = " (training not finished?)" if name == "model.keras" else ""
            raise UserError(f"incomplete run directory: no {name}{hint}", path)
    return path


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"not readable JSON ({type(e).__name__}: {e})", path) from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` (one JSON object per line); [] when the file is missing."""
    if not path.exists():
        return []
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"not readable ({e})", path) from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"line {n} is not JSON ({e})", path) from None
        if not isinstance(row, dict) or "round" not in row:
            raise UserError(f"line {n} is not a round record", path)
        rows.append(row)
    return rows


def load_keras_model(path: Path, resolution: int | None = None) -> Any:
    """``model.keras`` -> tf.keras.Model (uncompiled); input must be (None, R, R, 1)."""
    from tff_privseg.models import load_model

    try:
        model = load_model(path)
    except Exception as e:  # noqa: BLE001 - any failure to deserialise is the file's problem
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"cannot load the Keras model ({first})", path) from None
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 1 or (resolution and shape[1:3] != (resolution,) * 2):
        raise UserError(
            f"model input shape {shape} does not match the config "
            f"(expected (None, {resolution}, {resolution}, 1))",
            path,
        )
    return model


def load_run(path: str | Path, need_privacy: bool = False) -> Run:
    """Load a run directory written by ``train`` (config.toml, model.keras[, privacy.json])."""
    need = ("config.toml", "model.keras") + (("privacy.json",) if need_privacy else ())
    path = check_run_dir(path, need)
    cfg = config_lib.load(path / "config.toml")
    privacy = read_json(path / "privacy.json") if (path / "privacy.json").exists() else None
    if privacy is not None and not isinstance(privacy, dict):
        raise UserError("not a privacy ledger (expected a JSON object)", path / "privacy.json")
    model = load_keras_model(path / "model.keras", cfg.data.resolution)
    return Run(path, cfg, model, privacy, read_metrics(path / "metrics.jsonl"))


def keras_predict_fn(model: Any, batch_size: int = 32) -> PredictFn:
    """images [N, R, R, 1] -> probabilities [N, R, R, C] with ``model.predict``."""

    def predict(images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            channels = int(model.output_shape[-1])
            return np.zeros((*images.shape[:3], channels), np.float32)
        return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), np.float32)

    return predict


# --------------------------------------------------------------------------------------------
# Output folders: written next to the target, then renamed into place


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output(target: str | Path, marker: str, replace: bool = True) -> Path:
    """``target`` is missing, empty, or (``replace``) an earlier output holding ``marker``."""
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise UserError("exists and is not a folder", target)
        earlier = (target / marker).is_file()
        if earlier and not replace:
            raise UserError("holds an earlier output; use --force to replace it", target)
        if not earlier and any(target.iterdir()):
            raise UserError("exists and is not empty; choose another --out", target)
    return target


@contextmanager
def staged_output(target: str | Path, marker: str, replace: bool = True) -> Iterator[Path]:
    """Yield a temp folder next to ``target``; on success it becomes ``target`` (one rename).

    ``target`` must be missing, empty, or (when ``replace``) an earlier output of the same kind,
    recognised by its ``marker`` file. On any error the temp folder is removed and ``target`` is
    left as it was: nothing half-written.
    """
    target = check_output(target, marker, replace)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise UserError(f"cannot write here ({e.strerror})", target.parent) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_save_nifti(img: nib.Nifti1Image, path: Path) -> None:
    """Write ``img`` to a temp file next to ``path``, then rename it into place."""
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Slices <-> volumes


def class_ids(cfg: DataConfig) -> list[int]:
    """Foreground class ids the model predicts: [1] (binary) or 1..num_classes-1."""
    return [1] if cfg.labels == "binary" else list(range(1, cfg.num_classes))


def class_names(cfg: DataConfig) -> dict[str, str]:
    """Class id -> name; binary merges ``foreground_labels`` into class 1."""
    if cfg.labels == "binary":
        merged = ", ".join(map(str, cfg.foreground_labels))
        return {"0": "background", "1": f"foreground (label values {merged})"}
    return {str(c): "background" if c == 0 else f"class {c}" for c in range(cfg.num_classes)}


def hard_classes(probs: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Probabilities [..., C] -> uint8 class ids [...] (C = 1: ``p >= threshold``; else argmax)."""
    if probs.shape[-1] == 1:
        return (probs[..., 0] >= threshold).astype(np.uint8)
    return np.argmax(probs, axis=-1).astype(np.uint8)


def classes_in_plane(
    probs: np.ndarray, size: tuple[int, int], threshold: float = THRESHOLD
) -> np.ndarray:
    """Probabilities [n, R, R, C] -> uint8 class ids [size0, size1, n]: each channel resized
    linearly (as ``tf.image.resize`` bilinear), then threshold (C = 1) or argmax."""
    planes = [
        resize_plane(np.moveaxis(probs[..., c], 0, 2).astype(np.float32), size, order=1)
        for c in range(probs.shape[-1])
    ]
    return hard_classes(np.stack(planes, axis=-1), threshold)


def mask_on_grid(probs: np.ndarray, info: VolumeInfo, threshold: float = THRESHOLD) -> np.ndarray:
    """Probabilities [n, R, R, C] of one volume's kept slices -> uint8 class map [*info.shape].

    Same mapping as ``data.slices_to_volume(order=1)`` per channel followed by threshold /
    argmax, but only the kept slab is ever held in float: linear in-plane resize to the
    canonical size, slices outside ``info.z_range`` are 0 (background), and the result is in the
    source file's voxel order.
    """
    start, stop = info.z_range
    if probs.ndim != 4 or probs.shape[0] != stop - start:
        raise ValueError(f"expected [{stop - start}, R, R, C] probabilities, got {probs.shape}")
    nx, ny, nz = info.canonical_shape
    canonical = np.zeros((nx, ny, nz), np.uint8)
    canonical[:, :, start:stop] = classes_in_plane(probs, (nx, ny), threshold)
    return from_canonical(canonical, info.affine)


def to_canonical(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Array [*shape] in a file's voxel order -> closest canonical (RAS+) order."""
    source = nib.orientations.io_orientation(affine)
    to_ras = nib.orientations.ornt_transform(source, nib.orientations.axcodes2ornt("RAS"))
    return nib.orientations.apply_orientation(volume, to_ras)


def from_canonical(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Array in closest canonical (RAS+) order -> the voxel order of a file with ``affine``."""
    source = nib.orientations.io_orientation(affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), source)
    return nib.orientations.apply_orientation(volume, back)


def canonical_label(info: VolumeInfo, cfg: DataConfig) -> np.ndarray:
    """The source label file as uint8 class ids [*info.canonical_shape] (canonical order)."""
    if not (info.label_path.endswith(NIFTI_SUFFIXES) and info.image_path.endswith(NIFTI_SUFFIXES)):
        kind = "dicom" if Path(info.image_path).is_dir() else "files"
        case = CaseFiles(info.site, info.case, Path(info.image_path), Path(info.label_path), kind)
        label = read_case_files(case, cfg, allowed_labels(cfg, {})).label
        return map_labels(label, cfg.labels, cfg.foreground_labels)
    img = open_nifti(info.label_path)
    data, _ = read_canonical(img, info.label_path)
    return map_labels(as_label_array(data, info.label_path), cfg.labels, cfg.foreground_labels)


def source_image(info: VolumeInfo) -> nib.Nifti1Image:
    """The NIfTI source image of a volume; for DICOM/NRRD input, an image on its voxel grid."""
    if info.image_path.endswith(NIFTI_SUFFIXES):
        return open_nifti(info.image_path)
    return nib.Nifti1Image(np.zeros(info.shape, np.uint8), info.affine)


def mask_image(mask: np.ndarray, source: nib.Nifti1Image, num_classes: int) -> nib.Nifti1Image:
    """uint8 mask [*source.shape] -> NIfTI with the source's affine, qform/sform codes, units."""
    header = source.header.copy()
    img = nib.Nifti1Image(mask.astype(np.uint8), source.affine, header=header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, max(1, num_classes - 1)
    img.header["descrip"] = b"tff_privseg predicted mask"
    img.header["intent_code"] = 1002  # NIFTI_INTENT_LABEL
    return img


# --------------------------------------------------------------------------------------------
# Metrics


def _num(x: float) -> float | None:
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
            "hd95_median_mm": _num(float(np.median(h))) if h.size else None,
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
        "hd95_median_mm": _num(float(np.median(h_all))) if h_all else None,
        "hd95_infinite": int(np.isinf(np.array(h_all, np.float64)).sum()),
        "classes": per_class,
    }


# --------------------------------------------------------------------------------------------
# Overlays


def display(plane: np.ndarray) -> np.ndarray:
    """Canonical slice [X(R), Y(A)] -> radiological view: patient's right on the left, A up."""
    return np.fliplr(np.rot90(plane))


def pick_overlay_slices(slices: SliceSet, n: int) -> list[int]:
    """Up to ``n`` slice rows with the largest label area (ascending row order)."""
    if n <= 0 or len(slices) == 0:
        return []
    area = (slices.labels != 0).reshape(len(slices), -1).sum(axis=1)
    order = np.argsort(-area, kind="stable")[:n]
    return sorted(int(i) for i in order)


def write_overlay(
    path: Path, site: str, slices: SliceSet, pred: np.ndarray, rows: list[int]
) -> None:
    """PNG, one row per slice: CT (window, [0, 1]) | ground truth | prediction (matplotlib Agg).

    pred: uint8 class ids [N, R, R] at the model's resolution.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    titles = ("CT (window)", "ground truth", "prediction")
    for r, i in enumerate(rows):
        info = slices.volumes[int(slices.volume_index[i])]
        z = info.z_range[0] + int(i - slices.volume_slices(int(slices.volume_index[i]))[0])
        nx, ny, _ = info.canonical_shape
        aspect = (ny * info.spacing[1]) / (nx * info.spacing[0])  # pixel height / width
        ct = display(slices.images[i, :, :, 0])
        for c, (ax, title) in enumerate(zip(axes[r], titles, strict=True)):
            ax.imshow(ct, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
            mask = None if c == 0 else display(slices.labels[i] if c == 1 else pred[i])
            if mask is not None and mask.any():
                ax.imshow(
                    np.ma.masked_equal(mask, 0),
                    cmap="autumn" if c == 2 else "summer",
                    alpha=0.5,
                    aspect=aspect,
                    interpolation="nearest",
                )
            ax.set_title(f"{title}\n{info.case} z={z}" if c == 0 else title, fontsize=8)
            ax.set_axis_off()
    height = fig.get_figheight()
    fig.suptitle(
        f"{site}: radiological view (patient's right on the left)",
        fontsize=9,
        y=1 - 0.08 / height,
    )
    fig.subplots_adjust(
        left=0.02, right=0.98, bottom=0.02, top=1 - 0.7 / height, wspace=0.05, hspace=0.25
    )
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------------------------
# Evaluate


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
                    c: {k: _num(v) if k == "hd95_mm" else v for k, v in m.items()}
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
    run = load_run(run_dir)
    root = resolve_data_root(run.cfg, data_root)
    out = check_output(out if out is not None else run.path / f"eval_{split}", EVALUATION_FILE)
    sites = load_sites(run.cfg.data, root, progress=progress)
    predict_fn = predict_fn or keras_predict_fn(run.model, batch_size)
    with staged_output(out, EVALUATION_FILE) as tmp:
        result = evaluate_sites(sites, split, predict_fn, run.cfg.data, tmp, overlays)
        result = {
            "run": str(run.path),
            "data": str(root),
            "out": str(out),
            "config_hash": run.cfg.digest(),
            "rounds": run.metrics[-1]["round"] if run.metrics else None,
            "epsilon": (run.privacy or {}).get("epsilon"),
            "privacy": run.cfg.privacy.level,
            **result,
        }
        (tmp / EVALUATION_FILE).write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


# --------------------------------------------------------------------------------------------
# Predict on new scans


@dataclass
class Scan:
    """A new scan: canonical HU [X, Y, Z] (file dtype), its source image and the mapping back."""

    path: Path
    image: np.ndarray
    source: nib.Nifti1Image
    info: VolumeInfo


def open_scan(path: str | Path, channels: int = 1) -> nib.Nifti1Image:
    """Open a CT's header (no voxel data): one 3D volume of ``channels`` channel(s)."""
    path = Path(path)
    if path.is_file():
        try:
            shape = tuple(nib.load(path).shape)
        except Exception:  # noqa: BLE001 - open_nifti below reports unreadable files
            shape = ()
        if len(shape) == 4 and shape[3] != channels:
            raise UserError(
                f"scan has {shape[3]} channels (shape {shape}); the model takes {channels}: "
                "one single-channel 3D CT",
                path,
            )
    return open_nifti(path)


def read_scan(path: str | Path, channels: int = 1) -> Scan:
    """Read a CT without a label; every canonical axial slice is kept (z_range = all)."""
    path = Path(path)
    img = open_scan(path, channels)
    data, canonical_affine = read_canonical(img, path)
    check_finite(data, path)
    image = np.asarray(data)  # file dtype; converted to float32 slab by slab
    info = VolumeInfo(
        site="",
        case=case_id(path) or path.name,
        image_path=str(path),
        label_path="",
        affine=np.asarray(img.affine, np.float64),
        shape=tuple(int(s) for s in img.shape),  # type: ignore[arg-type]
        canonical_shape=tuple(int(s) for s in image.shape),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in nib.affines.voxel_sizes(canonical_affine)),  # type: ignore[arg-type]
        z_range=(0, int(image.shape[2])),
    )
    return Scan(path, image, img, info)


class RunPredictor:
    """A run directory's Keras model with the training preprocessing (numpy/scipy)."""

    kind = "run"

    def __init__(self, run: Run, batch_size: int = 32) -> None:
        self.cfg = run.cfg.data
        self.num_classes = run.cfg.data.num_classes
        self.batch_size = batch_size
        self.predict_fn = keras_predict_fn(run.model, batch_size)

    def __call__(self, scan: Scan) -> np.ndarray:
        """-> uint8 class map [*scan.info.shape] on the scan's own grid (in slabs of slices)."""
        d, image = self.cfg, scan.image
        volume_range = (float(image.min()), float(image.max())) if d.scaling == "minmax" else None
        nx, ny, nz = image.shape
        canonical = np.zeros((nx, ny, nz), np.uint8)
        for k in range(0, nz, self.batch_size):
            part = scale_intensity(
                image[:, :, k : k + self.batch_size], d.hu_window, d.scaling, volume_range
            )
            planes = np.clip(resize_plane(part, (d.resolution, d.resolution), order=1), 0.0, 1.0)
            images = np.ascontiguousarray(np.moveaxis(planes, 2, 0)[..., None], np.float32)
            probs = self.predict_fn(images)
            canonical[:, :, k : k + len(images)] = classes_in_plane(probs, (nx, ny))
        return from_canonical(canonical, scan.info.affine)


class SavedModelPredictor:
    """An exported SavedModel: raw HU canonical slices in, mask at the input size out."""

    kind = "saved_model"

    def __init__(self, path: Path, batch_size: int = 32) -> None:
        import tensorflow as tf

        try:
            loaded = tf.saved_model.load(str(path))
            self.fn = loaded.signatures["serving_default"]
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise UserError(f"cannot load the SavedModel ({first})", path) from None
        self.loaded = loaded
        self.batch_size = batch_size
        meta_path = path / "metadata.json"
        self.meta = read_json(meta_path) if meta_path.exists() else {}
        self.num_classes = int(self.meta.get("num_classes", 2))
        self.range_fn = loaded.signatures.get("serving_volume_range")

    def __call__(self, scan: Scan) -> np.ndarray:
        import tensorflow as tf

        image = scan.image
        hu_range = np.array([[image.min(), image.max()]], np.float32)
        canonical = np.zeros(image.shape, np.uint8)
        for k in range(0, image.shape[2], self.batch_size):
            part = np.moveaxis(image[:, :, k : k + self.batch_size], 2, 0)[..., None]
            batch = tf.constant(part, tf.float32)
            if self.range_fn is not None:  # per-volume min-max, exactly as in training
                rng = tf.constant(np.repeat(hu_range, len(part), axis=0))
                outputs = self.range_fn(slices=batch, hu_range=rng)
            else:
                outputs = self.fn(slices=batch)
            canonical[:, :, k : k + len(part)] = np.moveaxis(outputs["mask"].numpy(), 0, 2)
        return from_canonical(canonical, scan.info.affine)


def load_predictor(
    model_path: str | Path, batch_size: int = 32
) -> RunPredictor | SavedModelPredictor:
    """A run directory (config.toml + model.keras) or an exported SavedModel folder."""
    path = Path(model_path)
    if not path.exists():
        raise UserError(
            "model not found (expected a run directory or an exported SavedModel)", path
        )
    if path.is_dir() and (path / SAVED_MODEL_FILE).is_file():
        return SavedModelPredictor(path, batch_size)
    if path.is_dir() and (path / "config.toml").is_file():
        return RunPredictor(load_run(path), batch_size)
    raise UserError(
        "not a run directory (config.toml + model.keras) nor a SavedModel (saved_model.pb)", path
    )


def list_scans(inputs: Path) -> list[Path]:
    """A NIfTI file, or the visible NIfTI files of a folder (sorted)."""
    if not inputs.exists():
        raise UserError("input not found", inputs)
    if inputs.is_file():
        return [inputs]
    scans = sorted(
        p
        for p in inputs.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.endswith(NIFTI_SUFFIXES)
    )
    if not scans:
        raise UserError("no .nii / .nii.gz files in this folder", inputs)
    return scans


def _mask_name(scan: Path) -> str:
    cid = case_id(scan) or scan.name
    return f"{cid}.nii.gz"


def _describe(scan: Scan, mask: np.ndarray, out: Path) -> dict[str, Any]:
    voxel_ml = float(np.prod(scan.info.spacing)) / 1000.0
    fg = int(np.count_nonzero(mask))
    return {
        "input": str(scan.path),
        "mask": str(out),
        "shape": list(scan.info.shape),
        "spacing_mm": list(scan.info.spacing),
        "foreground_voxels": fg,
        "foreground_ml": fg * voxel_ml,
    }


def predict(
    model_path: str | Path,
    inputs: str | Path,
    out: str | Path,
    batch_size: int = 32,
    fmt: str = "auto",
) -> dict[str, Any]:
    """Segment a scan (``out`` = mask file) or every scan of a folder (``out`` = folder).

    Masks are uint8 NIfTI with the scan's shape and affine. Everything is validated and written
    to temporary names first: a bad scan leaves nothing behind. A DICOM CT series folder goes
    to ``predict_dicom`` (DICOM-SEG by default, or ``fmt="nifti"``).
    """
    inputs, out = Path(inputs), Path(out)
    from tff_privseg import predict_dicom as dicom  # noqa: PLC0415 - DICOM input hook

    if dicom.is_dicom_series(inputs):
        return dicom.predict_dicom(model_path, inputs, out, batch_size, fmt)
    if fmt == "dicom-seg":
        raise UserError("DICOM-SEG output needs a DICOM CT series folder as input", inputs)
    scans = list_scans(inputs)
    if inputs.is_file():
        if not out.name.endswith(NIFTI_SUFFIXES):
            raise UserError("--out must be a .nii.gz (or .nii) file for a single scan", out)
        if out.exists() and (out.is_dir() or out.resolve() == inputs.resolve()):
            raise UserError("would overwrite a folder or the input scan; choose another --out", out)
    elif out.exists() and out.resolve() == inputs.resolve():
        raise UserError("--out must not be the input folder", out)
    else:
        check_output(out, PREDICTIONS_FILE)
    names = [_mask_name(p) for p in scans]
    for p, name in zip(scans, names, strict=True):
        if names.count(name) > 1:
            raise UserError(f"two scans would both write {name}; rename one", p)
        open_scan(p)  # headers of every input checked before any heavy work
    predictor = load_predictor(model_path, batch_size)
    results = []
    if inputs.is_file():
        scan = read_scan(scans[0])
        mask = predictor(scan)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the folder ({e.strerror})", out.parent) from None
        atomic_save_nifti(mask_image(mask, scan.source, predictor.num_classes), out)
        results.append(_describe(scan, mask, out))
    else:
        with staged_output(out, PREDICTIONS_FILE) as tmp:
            for path, name in zip(scans, names, strict=True):
                scan = read_scan(path)
                mask = predictor(scan)
                nib.save(mask_image(mask, scan.source, predictor.num_classes), tmp / name)
                results.append(_describe(scan, mask, out / name))
            manifest = {"model": str(model_path), "predictions": results}
            (tmp / PREDICTIONS_FILE).write_text(json.dumps(manifest, indent=2))
    return {"model": str(model_path), "model_kind": predictor.kind, "predictions": results}


__all__ = [
    "Run",
    "evaluate",
    "evaluate_sites",
    "keras_predict_fn",
    "load_predictor",
    "load_run",
    "mask_on_grid",
    "predict",
    "read_scan",
    "staged_output",
]
