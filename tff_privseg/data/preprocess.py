"""Volume -> 2D axial training slices, as in the reference study, and the way back.

Per volume (canonical RAS+ arrays [X, Y, Z] from ``nifti.read_case``):

1. intensities: clip HU to ``hu_window``; ``scaling="window"`` maps lo..hi to 0..1 (the same
   mapping for every scan), ``"minmax"`` maps the clipped volume's own min..max to 0..1;
2. labels: ``"binary"`` -> 1 for values in ``foreground_labels``, else 0; ``"multiclass"`` keeps
   the class ids;
3. z crop: ``crop_slices`` canonical axial slices centred on the middle of the (mapped) label's
   z bounding box, clamped to the volume (volume centre if there is no foreground; all slices
   when the volume is shorter or ``crop_slices`` is 0). The crop counts slices, not mm, as the
   reference did, so it covers more anatomy on thick-slice scans;
4. in-plane resize (X, Y) -> (R, R) with ``scipy.ndimage.zoom(grid_mode=True)``: pixel areas
   are aligned (half-pixel centres, like ``tf.image.resize``), linear for images, nearest for
   labels (so only valid class ids appear). The aspect ratio is not kept, as in the reference.

A slice is ``canonical[:, :, z]``: its rows run Right-ward, its columns Anterior-ward.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from tff_privseg.config import DataConfig
from tff_privseg.data.nifti import CaseVolume
from tff_privseg.data.slices import VolumeInfo


def scale_intensity(
    image: np.ndarray,
    hu_window: tuple[float, float],
    scaling: str,
    volume_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """HU [...] -> float32 [...] in [0, 1].

    ``volume_range`` is the (min, max) of the whole volume for ``"minmax"`` when ``image`` is
    only a crop of it; defaults to the min/max of ``image`` itself.
    """
    lo, hi = float(hu_window[0]), float(hu_window[1])
    clipped = np.clip(image.astype(np.float32, copy=False), lo, hi)
    if scaling == "window":
        a, b = lo, hi
    elif scaling == "minmax":
        vmin, vmax = volume_range if volume_range is not None else (clipped.min(), clipped.max())
        a, b = max(lo, float(vmin)), min(hi, float(vmax))
    else:
        raise ValueError(f"unknown scaling {scaling!r}")
    if b <= a:  # constant volume
        return np.zeros(clipped.shape, np.float32)
    return np.clip((clipped - a) / (b - a), 0.0, 1.0).astype(np.float32, copy=False)


def map_labels(label: np.ndarray, mode: str, foreground_labels: tuple[int, ...]) -> np.ndarray:
    """Class values [...] -> uint8 class ids [...] (binary: foreground 1, else 0)."""
    if mode == "binary":
        return np.isin(label, np.asarray(foreground_labels)).astype(np.uint8)
    if mode == "multiclass":
        return label.astype(np.uint8)
    raise ValueError(f"unknown label mode {mode!r}")


def z_crop_range(foreground: np.ndarray, crop_slices: int) -> tuple[int, int]:
    """[start, stop) of ``crop_slices`` slices centred on the foreground's z extent.

    foreground: bool or int [X, Y, Z] (non-zero = foreground).
    """
    depth = int(foreground.shape[2])
    if crop_slices <= 0 or depth <= crop_slices:
        return 0, depth
    zs = np.flatnonzero(np.any(foreground, axis=(0, 1)))
    centre = (zs[0] + zs[-1] + 1) / 2 if zs.size else depth / 2
    start = int(np.floor(centre - crop_slices / 2 + 0.5))
    start = min(max(start, 0), depth - crop_slices)
    return start, start + crop_slices


def resize_plane(volume: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """[X, Y, Z] -> [size0, size1, Z]; order 1 = linear (images), 0 = nearest (labels)."""
    factors = (size[0] / volume.shape[0], size[1] / volume.shape[1], 1.0)
    if factors == (1.0, 1.0, 1.0):
        return np.array(volume)
    out = ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)
    assert out.shape[:2] == tuple(size), (out.shape, size)
    return out


def preprocess_case(
    case: CaseVolume, cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """One validated volume -> (images float32 [N, R, R, 1], labels uint8 [N, R, R], z_range)."""
    labels = map_labels(case.label, cfg.labels, cfg.foreground_labels)
    start, stop = z_crop_range(labels, cfg.crop_slices)
    volume_range = None
    if cfg.scaling == "minmax":
        volume_range = (float(case.image.min()), float(case.image.max()))
    image = scale_intensity(case.image[:, :, start:stop], cfg.hu_window, cfg.scaling, volume_range)
    size = (cfg.resolution, cfg.resolution)
    image = resize_plane(image, size, order=1)
    labels = resize_plane(labels[:, :, start:stop], size, order=0)
    images = np.ascontiguousarray(np.moveaxis(image, 2, 0)[..., None], dtype=np.float32)
    labels = np.ascontiguousarray(np.moveaxis(labels, 2, 0), dtype=np.uint8)
    return np.clip(images, 0.0, 1.0), labels, (start, stop)


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


def slices_to_volume(
    slices: np.ndarray, info: VolumeInfo, order: int = 0, fill: float = 0
) -> np.ndarray:
    """Per-slice maps [N, R, R] of one volume -> array on the source file's grid [*info.shape].

    ``N`` must equal the number of kept slices (``info.z_range``); slices outside it get
    ``fill``. Use ``order=0`` for class ids, ``order=1`` for probabilities. The result lines up
    voxel for voxel with the source image, so ``nib.Nifti1Image(out, info.affine)`` overlays it.
    """
    start, stop = info.z_range
    if slices.ndim != 3 or slices.shape[0] != stop - start:
        raise ValueError(f"expected [{stop - start}, R, R] slices, got {slices.shape}")
    nx, ny, nz = info.canonical_shape
    plane = resize_plane(np.moveaxis(slices, 0, 2), (nx, ny), order=order)
    canonical = np.full((nx, ny, nz), fill, dtype=plane.dtype)
    canonical[:, :, start:stop] = plane
    return from_canonical(canonical, info.affine)


def volume_info(
    case: CaseVolume,
    site: str,
    case_id: str,
    image_path: str | Path,
    label_path: str | Path,
    z_range: tuple[int, int],
) -> VolumeInfo:
    """The ``VolumeInfo`` record of a preprocessed case."""
    return VolumeInfo(
        site=site,
        case=case_id,
        image_path=str(image_path),
        label_path=str(label_path),
        affine=case.affine,
        shape=case.shape,
        canonical_shape=case.canonical_shape,
        spacing=case.spacing,
        z_range=(int(z_range[0]), int(z_range[1])),
    )
