"""NRRD volumes (``.nrrd``, 3D Slicer's ``.seg.nrrd``) as in-memory NIfTI images (pynrrd).

The geometry is the header's: ``space directions`` (one column per voxel axis), ``space
origin`` and ``space`` (``left-posterior-superior`` or ``right-anterior-superior``; LPS is
turned to RAS by flipping x and y), so the rest of the pipeline reads an NRRD case exactly as a
NIfTI one (``nifti.read_canonical``: canonical RAS+ arrays).

A ``.seg.nrrd`` may be cropped to its segments (Slicer's default): a label whose grid has the
image's directions and spacing and an origin a whole number of voxels inside the image is
pasted onto the image grid. It may also hold several overlapping layers (a 4D array whose first
axis is a list): then ``data.roi_labels`` must name the segments to keep (``SegmentN_Name``),
each written with its ``SegmentN_LabelValue`` from ``SegmentN_Layer``. With ``roi_labels`` set,
a one-layer segmentation keeps only the named segments, each given its configured value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

from tff_privseg.data.nifti import AFFINE_ATOL, MAX_VOXELS
from tff_privseg.errors import UserError

NRRD_SUFFIXES = (".seg.nrrd", ".nrrd")
_SPACES = {
    "left-posterior-superior": np.diag([-1.0, -1.0, 1.0]),
    "lps": np.diag([-1.0, -1.0, 1.0]),
    "right-anterior-superior": np.eye(3),
    "ras": np.eye(3),
}


def is_nrrd(path: Path) -> bool:
    return path.name.lower().endswith(".nrrd")


def _read(path: Path):
    import nrrd  # noqa: PLC0415 - only NRRD sites pay for the import

    if not path.is_file():
        raise UserError("file not found" if not path.exists() else "not a file", path)
    try:
        header = nrrd.read_header(str(path))
        sizes = [int(s) for s in header.get("sizes", [])]
        if math.prod(sizes) > MAX_VOXELS:
            raise UserError(f"header claims {sizes} voxels (more than {MAX_VOXELS})", path)
        return nrrd.read(str(path))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - pynrrd raises NRRDError, ValueError, OSError, ...
        lines = str(e).strip().splitlines()
        raise UserError(
            f"not a readable NRRD file ({(lines[0] if lines else type(e).__name__)[:160]})", path
        ) from None


def _geometry(header: dict, path: Path) -> tuple[np.ndarray, list[int]]:
    """RAS affine (4, 4) of the spatial axes, and the indices of those axes."""
    space = str(header.get("space", "")).lower()
    if space not in _SPACES:
        raise UserError(
            f"unsupported or missing NRRD space {header.get('space')!r} "
            "(need left-posterior-superior or right-anterior-superior)",
            path,
        )
    dirs = header.get("space directions")
    origin = header.get("space origin")
    if dirs is None or origin is None:
        raise UserError("NRRD header has no space directions / space origin (no geometry)", path)
    dirs = np.asarray(dirs, dtype=np.float64)
    spatial = [a for a in range(dirs.shape[0]) if np.isfinite(dirs[a]).all()]
    if len(spatial) != 3:
        raise UserError(f"expected 3 spatial axes, found {len(spatial)}", path)
    affine = np.eye(4)
    flip = _SPACES[space]
    affine[:3, :3] = flip @ dirs[spatial].T
    affine[:3, 3] = flip @ np.asarray(origin, dtype=np.float64)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UserError("NRRD space directions are degenerate", path)
    return affine, spatial


def open_image(path: Path) -> nib.Nifti1Image:
    """A 3D ``.nrrd`` CT as a NIfTI image (values as stored: HU)."""
    data, header = _read(path)
    affine, spatial = _geometry(header, path)
    if data.ndim != 3 or spatial != [0, 1, 2]:
        raise UserError(f"expected a 3D volume, got shape {tuple(data.shape)}", path)
    return nib.Nifti1Image(np.asarray(data), affine)


def _segments(header: dict) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for key, value in header.items():
        if key.startswith("Segment") and "_" in key:
            index, _, field = key[len("Segment") :].partition("_")
            if index.isdigit():
                out.setdefault(int(index), {})[field] = str(value)
    return out


def open_label(path: Path, image: nib.Nifti1Image, roi_labels: Mapping[str, int]) -> np.ndarray:
    """A label ``.nrrd``/``.seg.nrrd`` on ``image``'s voxel grid -> label values [*image.shape]."""
    data, header = _read(path)
    affine, spatial = _geometry(header, path)
    if data.ndim == 3:
        layers = data[None]
    elif data.ndim == 4 and spatial == [1, 2, 3]:
        layers = data
    else:
        raise UserError(f"expected a 3D label map (or layers x 3D), got {tuple(data.shape)}", path)
    segments = _segments(header)
    if roi_labels or layers.shape[0] > 1:
        layers = _select(layers, segments, roi_labels, path)
    label = layers[0]
    return _paste(label, affine, image, path)


def _select(
    layers: np.ndarray,
    segments: dict[int, dict[str, str]],
    roi_labels: Mapping[str, int],
    path: Path,
) -> np.ndarray:
    """Named segments of a (multi-layer) segmentation -> one layer [1, X, Y, Z]."""
    if not roi_labels:
        raise UserError(
            f"{layers.shape[0]} overlapping segment layers: set data.roi_labels to pick segments",
            path,
        )
    wanted = {k.strip().lower(): v for k, v in roi_labels.items()}
    out = np.zeros(layers.shape[1:], np.int32)
    found = []
    for seg in segments.values():
        value = wanted.get(seg.get("Name", "").strip().lower())
        if value is None:
            continue
        try:
            layer = int(seg.get("Layer", 0))
            stored = int(seg.get("LabelValue", 1))
        except ValueError:
            raise UserError(f"malformed segment metadata {seg}", path) from None
        if not 0 <= layer < layers.shape[0]:
            raise UserError(f"segment '{seg.get('Name')}' is in missing layer {layer}", path)
        out[layers[layer] == stored] = value
        found.append(seg.get("Name"))
    if not found:
        names = ", ".join(s.get("Name", "?") for s in segments.values()) or "none"
        raise UserError(
            f"no segment matches data.roi_labels ({', '.join(sorted(roi_labels))}); "
            f"segments: {names}",
            path,
        )
    return out[None]


def _paste(label: np.ndarray, affine: np.ndarray, image: nib.Nifti1Image, path: Path):
    """``label`` (with ``affine``) on the image's grid: same grid, or a whole-voxel sub-box."""
    if label.shape == tuple(image.shape) and np.allclose(affine, image.affine, atol=AFFINE_ATOL):
        return np.asarray(label)
    if not np.allclose(affine[:3, :3], image.affine[:3, :3], atol=AFFINE_ATOL):
        raise UserError(
            "label directions/spacing differ from the image's; image and label must share one "
            "voxel grid",
            path,
        )
    offset = np.linalg.solve(image.affine[:3, :3], affine[:3, 3] - image.affine[:3, 3])
    start = np.round(offset).astype(int)
    stop = start + np.array(label.shape)
    if (
        np.abs(offset - start).max() > 1e-3
        or (start < 0).any()
        or (stop > np.array(image.shape)).any()
    ):
        raise UserError(
            f"label grid (shape {tuple(label.shape)}, offset {np.round(offset, 3).tolist()} "
            f"voxels) is not a whole-voxel part of the image grid {tuple(image.shape)}",
            path,
        )
    out = np.zeros(image.shape, label.dtype)
    out[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]] = label
    return out
