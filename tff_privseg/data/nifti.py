"""Read a CT and its label map with nibabel, validate them, and bring them to canonical axes.

Every problem is reported as ``UserError(message, path)``: one line naming the file and what is
wrong with it. Arrays come back in nibabel's closest canonical orientation (RAS+: voxel axis 0
runs to the patient's Right, axis 1 to Anterior, axis 2 to Superior), so axis 2 is axial.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from tff_privseg.errors import UserError

AFFINE_ATOL = 1e-3  # mm / direction-cosine units: image and label must share the grid
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)


@dataclass(frozen=True, eq=False)
class CaseVolume:
    """A validated CT + label pair in canonical (RAS+) orientation.

    image: [X, Y, Z] intensities (HU) in the file's dtype (scaling applied by nibabel).
    label: [X, Y, Z] integer class values as stored.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray  # (4, 4) source-file affine
    shape: tuple[int, int, int]  # source-file shape
    canonical_affine: np.ndarray  # (4, 4)
    label_counts: dict[int, int]  # voxels per label value present

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical axes."""
        return tuple(float(v) for v in nib.affines.voxel_sizes(self.canonical_affine))  # type: ignore[return-value]


def _reason(err: BaseException, path: Path) -> str:
    """First line of an exception's text, without the file's own path (already shown)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    for form in (f'"{path}"', f"'{path}'", str(path)):
        text = text.replace(form, "it")
    return text.replace("File it is", "it is")[:160]


def open_nifti(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI header lazily (no voxel data read). Shape is checked to be 3D.

    A trailing singleton 4th axis ([X, Y, Z, 1]) is dropped.
    """
    path = Path(path)
    if not path.exists():
        raise UserError("file not found", path)
    if not path.is_file():
        raise UserError("not a file", path)
    try:
        img = nib.load(path)
    except _READ_ERRORS as e:
        raise UserError(f"not a readable NIfTI file ({_reason(e, path)})", path) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise UserError(f"not a NIfTI file (read as {type(img).__name__})", path)
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise UserError(f"expected a 3D volume, got shape {tuple(img.shape)}", path)
    if min(img.shape) < 1:
        raise UserError(f"empty volume, shape {tuple(img.shape)}", path)
    check_size(img, path)
    return img


MAX_VOXELS = 2**31  # a 512 x 512 x 8192 CT; larger is a broken (or hostile) header


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - not Linux
        return 1 << 62


def check_size(img: nib.Nifti1Image, path: str | Path) -> None:
    """Refuse a header whose volume could not be loaded, before loading it.

    Reading allocates the whole array (in its stored type, float64 when the header scales
    values): a header claiming 30000^3 voxels would otherwise end in a MemoryError or the OOM
    killer. The limit is MAX_VOXELS and this machine's physical memory.
    """
    shape = tuple(int(s) for s in img.shape)
    voxels = math.prod(shape)
    slope, inter = img.header.get_slope_inter()
    scaled = (slope is not None and slope != 1) or (inter is not None and inter != 0)
    itemsize = 8 if scaled else np.dtype(img.get_data_dtype()).itemsize
    needed, memory = voxels * itemsize, _memory_bytes()
    if voxels > MAX_VOXELS or needed > memory:
        raise UserError(
            f"header claims {'x'.join(map(str, shape))} voxels ({_gib(needed)} in memory, "
            f"this machine has {_gib(memory)}; at most {MAX_VOXELS} voxels): not loading it",
            path,
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def read_canonical(img: nib.Nifti1Image, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxel data [X, Y, Z] and affine (4, 4) after ``nibabel.as_closest_canonical``."""
    try:
        canonical = nib.as_closest_canonical(img)
        data = np.asanyarray(canonical.dataobj)
    except _READ_ERRORS as e:
        raise UserError(
            f"corrupt or truncated NIfTI file ({_reason(e, Path(path))})", path
        ) from None
    if data.dtype.kind not in "biuf":
        raise UserError(f"unsupported voxel type {data.dtype}", path)
    return data, np.asarray(canonical.affine, dtype=np.float64)


def check_same_grid(image: nib.Nifti1Image, label: nib.Nifti1Image, label_path: Path) -> None:
    """Image and label must have the same shape and (within AFFINE_ATOL) the same affine."""
    if tuple(image.shape) != tuple(label.shape):
        raise UserError(
            f"label shape {tuple(label.shape)} differs from image shape {tuple(image.shape)}",
            label_path,
        )
    diff = float(np.max(np.abs(image.affine - label.affine)))
    if diff > AFFINE_ATOL:
        raise UserError(
            f"label affine differs from the image affine by up to {diff:.4g} "
            f"(tolerance {AFFINE_ATOL}); image and label must share one voxel grid",
            label_path,
        )


def check_finite(image: np.ndarray, path: str | Path) -> None:
    """Reject NaN / inf voxels (only possible in float images)."""
    if image.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(image)))
        if bad:
            raise UserError(f"image has {bad} NaN/inf voxels", path)


def as_label_array(label: np.ndarray, path: str | Path) -> np.ndarray:
    """Integer view of a label map [X, Y, Z]; float labels must hold whole numbers only."""
    if label.dtype.kind == "b":
        return label.astype(np.uint8)
    if label.dtype.kind == "f":
        finite = np.isfinite(label)
        if not finite.all():
            raise UserError(f"label has {int((~finite).sum())} NaN/inf voxels", path)
        frac = label != np.round(label)
        if frac.any():
            example = float(label[frac].flat[0])
            raise UserError(
                f"label has {int(frac.sum())} non-integer voxels (e.g. {example:g}); "
                "labels must be class ids",
                path,
            )
        if label.size and (label.min() < np.iinfo(np.int32).min or label.max() > 2**31 - 1):
            raise UserError("label values out of the integer range", path)
        return label.astype(np.int32)
    return label


def label_counts(label: np.ndarray, allowed: Collection[int], path: str | Path) -> dict[int, int]:
    """Voxels per label value; values outside ``allowed`` (or negative) raise UserError."""
    lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
    allowed_set = {int(a) for a in allowed}
    if lo < 0 or hi > max(allowed_set):
        values = np.unique(label)  # rare error path: exact list for the message
        bad = sorted(int(v) for v in values if int(v) not in allowed_set)
    else:
        counts = np.zeros(hi + 1, np.int64)
        step = max(1, (1 << 24) // max(1, label.shape[0] * label.shape[1]))  # ~16M voxels
        for k in range(0, label.shape[2], step):  # in slabs: no full-size intp copy
            counts += np.bincount(label[:, :, k : k + step].ravel(), minlength=hi + 1)
        present = {int(v): int(c) for v, c in enumerate(counts) if c}
        bad = sorted(v for v in present if v not in allowed_set)
        if not bad:
            return present
    shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    raise UserError(
        f"label values {{{shown}}} are outside the declared classes "
        f"{{{', '.join(map(str, sorted(allowed_set)))}}}",
        path,
    )


def read_case(
    image_path: str | Path, label_path: str | Path, allowed_labels: Collection[int]
) -> CaseVolume:
    """Load, validate and canonicalise one CT [X, Y, Z] and its label map [X, Y, Z].

    Checks: both files exist and are readable 3D NIfTI; same shape and affine; no NaN/inf
    voxels; labels are whole numbers within ``allowed_labels``.
    """
    image_path, label_path = Path(image_path), Path(label_path)
    return case_from_images(
        open_nifti(image_path), open_nifti(label_path), image_path, label_path, allowed_labels
    )


def case_from_images(
    image_img: nib.Nifti1Image,
    label_img: nib.Nifti1Image,
    image_path: Path,
    label_path: Path,
    allowed_labels: Collection[int],
) -> CaseVolume:
    """``read_case`` on opened images (NIfTI files, or NRRD/DICOM data wrapped as NIfTI)."""
    check_same_grid(image_img, label_img, label_path)
    image, canonical_affine = read_canonical(image_img, image_path)
    check_finite(image, image_path)
    label, _ = read_canonical(label_img, label_path)
    label = as_label_array(label, label_path)
    counts = label_counts(label, allowed_labels, label_path)
    affine = np.array(image_img.affine, dtype=np.float64)
    affine.flags.writeable = False
    canonical_affine.flags.writeable = False
    return CaseVolume(
        image=image,
        label=label,
        affine=affine,
        shape=tuple(int(s) for s in image_img.shape),  # type: ignore[arg-type]
        canonical_affine=canonical_affine,
        label_counts=counts,
    )
