"""New scans to predict on: NIfTI files without a label, read whole in canonical order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from tff_privseg.data import VolumeInfo
from tff_privseg.data.layout import NIFTI_SUFFIXES, case_id
from tff_privseg.data.nifti import check_finite, open_nifti, read_canonical
from tff_privseg.errors import UserError


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
