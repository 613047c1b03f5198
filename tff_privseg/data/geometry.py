"""Masks on a scan's own grid: class ids from probabilities, placed back in the file's voxel order.

Slices are canonical axial planes (``data.preprocess``); a mask goes back to the source file's
voxel order so that ``nib.Nifti1Image(mask, source.affine)`` overlays the scan voxel for voxel.
Probabilities [n, R, R, C] become class ids by threshold (C = 1, ``p >= THRESHOLD``) or argmax.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from tff_privseg.config import DataConfig
from tff_privseg.data.layout import NIFTI_SUFFIXES, CaseFiles
from tff_privseg.data.loader import read_case_files
from tff_privseg.data.nifti import as_label_array, open_nifti, read_canonical
from tff_privseg.data.preprocess import (
    map_labels,
    resize_plane,
    slices_to_volume,
)
from tff_privseg.data.slices import VolumeInfo

THRESHOLD = 0.5


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

    The same map as ``slices_to_volume(order=1)`` per channel followed by threshold / argmax,
    but only the kept slab is ever held in float: the probabilities are resized linearly to the
    canonical in-plane size and turned into class ids first, then ``slices_to_volume`` places
    them (slices outside ``info.z_range`` are 0, background) in the source file's voxel order.
    """
    start, stop = info.z_range
    if probs.ndim != 4 or probs.shape[0] != stop - start:
        raise ValueError(f"expected [{stop - start}, R, R, C] probabilities, got {probs.shape}")
    nx, ny, _ = info.canonical_shape
    classes = np.moveaxis(classes_in_plane(probs, (nx, ny), threshold), 2, 0)
    return slices_to_volume(classes, info, order=0, fill=0)


def canonical_label(info: VolumeInfo, cfg: DataConfig) -> np.ndarray:
    """The source label file as uint8 class ids [*info.canonical_shape] (canonical order)."""
    if not (info.label_path.endswith(NIFTI_SUFFIXES) and info.image_path.endswith(NIFTI_SUFFIXES)):
        kind = "dicom" if Path(info.image_path).is_dir() else "files"
        case = CaseFiles(info.site, info.case, Path(info.image_path), Path(info.label_path), kind)
        # every stored value: the case was validated against its site's classes when loaded
        label = read_case_files(case, cfg, set(range(256))).label
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
