"""Prediction: a run directory or an exported SavedModel on new scans -> masks on their own grid.

``predict(model, inputs, out)`` segments one scan (``out`` = mask file) or every scan of a
folder (``out`` = folder with ``predictions.json``); no label is needed, every axial slice is
predicted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from tff_privseg.data.geometry import classes_in_plane, mask_image
from tff_privseg.data.layout import NIFTI_SUFFIXES, case_id
from tff_privseg.data.preprocess import from_canonical, resize_plane, scale_intensity
from tff_privseg.errors import UserError
from tff_privseg.evaluate.output import check_output, save_nifti, staged_output
from tff_privseg.evaluate.scans import Scan, list_scans, open_scan, read_scan
from tff_privseg.rundir import Run, layout, open_run

PREDICTIONS_FILE = "predictions.json"
SAVED_MODEL_FILE = "saved_model.pb"

# images float32 [N, R, R, 1] in [0, 1] -> probabilities float32 [N, R, R, C]
PredictFn = Callable[[np.ndarray], np.ndarray]


def keras_predict_fn(model: Any, batch_size: int = 32) -> PredictFn:
    """images [N, R, R, 1] -> probabilities [N, R, R, C] with ``model.predict``."""

    def predict(images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            channels = int(model.output_shape[-1])
            return np.zeros((*images.shape[:3], channels), np.float32)
        return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), np.float32)

    return predict


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
        from tff_privseg.export import load_export  # TensorFlow loads only for a SavedModel

        served = load_export(path)
        self.loaded, self.fn, self.range_fn = served.loaded, served.fn, served.range_fn
        self.meta = served.meta
        self.num_classes = int(self.meta.get("num_classes", 2))
        self.batch_size = batch_size

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
    if path.is_dir() and (path / layout.CONFIG).is_file():
        return RunPredictor(open_run(path), batch_size)
    raise UserError(
        "not a run directory (config.toml + model.keras) nor a SavedModel (saved_model.pb)", path
    )


def _mask_name(scan: Path) -> str:
    cid = case_id(scan) or scan.name
    return f"{cid}.nii.gz"


def describe(scan: Scan, mask: np.ndarray, out: Path) -> dict[str, Any]:
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
    to ``dicom_prediction`` (DICOM-SEG by default, or ``fmt="nifti"``).
    """
    inputs, out = Path(inputs), Path(out)
    from tff_privseg.evaluate import dicom_prediction as dicom  # it imports this module

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
        save_nifti(mask_image(mask, scan.source, predictor.num_classes), out)
        results.append(describe(scan, mask, out))
    else:
        with staged_output(out, PREDICTIONS_FILE) as tmp:
            for path, name in zip(scans, names, strict=True):
                scan = read_scan(path)
                mask = predictor(scan)
                nib.save(mask_image(mask, scan.source, predictor.num_classes), tmp / name)
                results.append(describe(scan, mask, out / name))
            manifest = {"model": str(model_path), "predictions": results}
            (tmp / PREDICTIONS_FILE).write_text(json.dumps(manifest, indent=2))
    return {"model": str(model_path), "model_kind": predictor.kind, "predictions": results}
