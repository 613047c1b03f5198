"""`predict` on a DICOM CT series: the mask as a DICOM-SEG referencing the series (or NIfTI).

INPUTS is a folder holding one CT series (loose slice files or in sub-folders; other DICOM
objects such as an old SEG or RTSTRUCT are ignored). The series is read and checked exactly as
for training (``data.dicom.read_series``: sorted along the slice normal, HU), predicted slice by
slice on its canonical grid like a NIfTI scan, and the mask is brought back to the series' grid:
written as a DICOM-SEG (``--format dicom-seg``, the default for DICOM input; ``data.dicom_seg``)
or as a NIfTI mask with the series' RAS affine (``--format nifti``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from tff_privseg.data.dicom import IMAGE_MODALITIES, dicom_files, modality, read_series
from tff_privseg.data.geometry import mask_image
from tff_privseg.data.layout import NIFTI_SUFFIXES
from tff_privseg.data.nifti import read_canonical
from tff_privseg.data.slices import VolumeInfo
from tff_privseg.errors import UserError
from tff_privseg.evaluate.output import save_nifti
from tff_privseg.evaluate.prediction import describe, load_predictor
from tff_privseg.evaluate.scans import Scan
from tff_privseg.evaluate.scores import class_names

FORMATS = ("auto", "nifti", "dicom-seg")


def is_dicom_series(path: Path) -> bool:
    """A folder with CT DICOM files and no NIfTI scans of its own."""
    if not path.is_dir():
        return False
    if any(p.name.endswith(NIFTI_SUFFIXES) for p in path.iterdir()):
        return False
    return any(modality(ds) in IMAGE_MODALITIES for _, ds in dicom_files(path))


def _class_names(predictor: Any) -> dict[int, str]:
    cfg = getattr(predictor, "cfg", None)
    if cfg is not None:
        return {int(k): v for k, v in class_names(cfg).items() if int(k) > 0}
    meta = getattr(predictor, "meta", {}) or {}
    names = meta.get("class_names") or {}
    return {int(k): str(v) for k, v in dict(names).items() if str(k).isdigit() and int(k) > 0}


def predict_dicom(
    model_path: str | Path, inputs: Path, out: Path, batch_size: int = 32, fmt: str = "auto"
) -> dict[str, Any]:
    """Segment the CT series in ``inputs``; write ``out`` (.dcm SEG or .nii.gz)."""
    from tff_privseg.data.dicom_seg import write_seg  # highdicom loads only to write a SEG

    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    seg = fmt != "nifti"
    if seg and not out.name.lower().endswith(".dcm"):
        raise UserError("--out must be a .dcm file for DICOM-SEG output", out)
    if not seg and not out.name.endswith(NIFTI_SUFFIXES):
        raise UserError("--out must be a .nii.gz (or .nii) file with --format nifti", out)
    if out.exists() and (out.is_dir() or inputs.resolve() in out.resolve().parents):
        raise UserError("would overwrite a folder or write into the input series", out)
    series = read_series(inputs)  # every slice checked before any heavy work
    img = nib.Nifti1Image(series.volume, series.affine)
    data, canonical_affine = read_canonical(img, inputs)
    info = VolumeInfo(
        site="",
        case=inputs.name,
        image_path=str(inputs),
        label_path="",
        affine=np.asarray(series.affine, np.float64),
        shape=tuple(int(s) for s in series.volume.shape),  # type: ignore[arg-type]
        canonical_shape=tuple(int(s) for s in data.shape),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in nib.affines.voxel_sizes(canonical_affine)),  # type: ignore[arg-type]
        z_range=(0, int(data.shape[2])),
    )
    predictor = load_predictor(model_path, batch_size)
    scan = Scan(inputs, np.asarray(data), img, info)
    mask = predictor(scan)  # [I, J, K] on the series' grid
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder ({e.strerror})", out.parent) from None
    if seg:
        write_seg(mask, series, out, _class_names(predictor))
    else:
        save_nifti(mask_image(mask, img, predictor.num_classes), out)
    record = describe(scan, mask, out)
    record["format"] = "dicom-seg" if seg else "nifti"
    record["slices"] = len(series.files)
    return {"model": str(model_path), "model_kind": predictor.kind, "predictions": [record]}
