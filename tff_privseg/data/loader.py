"""Files -> validated, preprocessed, split slices per site, with an on-disk cache per volume.

Cache entries live under ``cfg.cache_dir`` (default ``<root>/.cache``) as
``SITE/CASE.<key>.npz``; the key hashes the preprocessing settings, the declared label set, the
ROI-name mapping and the bytes of every file the case is read from (image and label, or every
slice of a DICOM series and its SEG/RTSTRUCT; BLAKE2b), so an edited or corrupted file, whatever its
mtime, or a changed setting is simply a miss (and the file is validated again). Entries are
written to a temp file and renamed, never half-written; an unreadable entry is recomputed.
A read-only dataset folder just runs uncached.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from tff_privseg.config import DataConfig
from tff_privseg.data._fs import atomic_write_bytes
from tff_privseg.data.layout import CaseFiles, SiteFiles, discover_sites
from tff_privseg.data.nifti import CaseVolume, case_from_images, open_nifti, read_case
from tff_privseg.data.preprocess import preprocess_case, volume_info
from tff_privseg.data.slices import SiteData, SliceSet, VolumeInfo
from tff_privseg.data.split import Split, split_site
from tff_privseg.errors import UserError

CACHE_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class PreparedVolume:
    """One volume after preprocessing: images [n, R, R, 1], labels [n, R, R], its record,
    and the voxel count of every label value in the source label map."""

    images: np.ndarray
    labels: np.ndarray
    info: VolumeInfo
    label_counts: dict[int, int]


@dataclass
class PreparedSite:
    files: SiteFiles
    split: Split
    volumes: dict[str, PreparedVolume]  # by case id

    def slice_set(self, split: str, resolution: int) -> SliceSet:
        cases = getattr(self.split, split)
        parts = [
            (self.volumes[c].images, self.volumes[c].labels, self.volumes[c].info) for c in cases
        ]
        return SliceSet.from_volumes(parts, resolution)


def allowed_labels(cfg: DataConfig, declared: dict[int, str]) -> set[int]:
    """Label values a file may contain: range(num_classes) for multiclass; for binary,
    0, the foreground labels and every class that dataset.json declares."""
    if cfg.labels == "multiclass":
        return set(range(cfg.num_classes))
    return {0, *cfg.foreground_labels, *declared}


def preprocess_settings(cfg: DataConfig) -> dict:
    """The settings that change preprocessed slices (and so the cache key)."""
    return {
        "version": CACHE_VERSION,
        "resolution": cfg.resolution,
        "hu_window": list(cfg.hu_window),
        "scaling": cfg.scaling,
        "labels": cfg.labels,
        "foreground_labels": sorted(cfg.foreground_labels),
        "crop_slices": cfg.crop_slices,
    }


def cache_root(cfg: DataConfig, root: Path) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else root / ".cache"


def file_digest(path: Path) -> str:
    """BLAKE2b of the file's bytes, streamed (the cache is keyed on content, not on size and
    mtime: a file rewritten in place with its old mtime was served from the cache as valid)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cache_key(case: CaseFiles, cfg: DataConfig, allowed: set[int]) -> str | None:
    """Hash of settings + file contents; None when a file cannot be read (no caching)."""
    try:
        files = [file_digest(path) for path in case.all_files]
    except OSError:
        return None
    blob = {"settings": preprocess_settings(cfg), "allowed": sorted(allowed), "files": files}
    if case.kind == "dicom" or any(p.name.lower().endswith(".nrrd") for p in case.all_files):
        blob["roi_labels"] = sorted(cfg.roi_labels.items())  # (NIfTI keys stay as they were)
    blob = json.dumps(blob, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_case_files(case: CaseFiles, cfg: DataConfig, allowed: set[int]) -> CaseVolume:
    """One case, whatever its format, as a validated canonical ``CaseVolume``."""
    if case.kind == "dicom":
        from tff_privseg.data.dicom import read_dicom_case  # noqa: PLC0415 - pydicom, highdicom

        return read_dicom_case(case.image, case.label, allowed, cfg.roi_labels)
    from tff_privseg.data import nrrd  # noqa: PLC0415

    if not (nrrd.is_nrrd(case.image) or nrrd.is_nrrd(case.label)):
        return read_case(case.image, case.label, allowed)
    image = nrrd.open_image(case.image) if nrrd.is_nrrd(case.image) else open_nifti(case.image)
    if nrrd.is_nrrd(case.label):
        label = nib.Nifti1Image(nrrd.open_label(case.label, image, cfg.roi_labels), image.affine)
    else:
        label = open_nifti(case.label)
    return case_from_images(image, label, case.image, case.label, allowed)


def _load_cached(path: Path, case: CaseFiles) -> PreparedVolume | None:
    try:
        with np.load(path) as z:
            info = VolumeInfo(
                site=case.site,
                case=case.case,
                image_path=str(case.image),
                label_path=str(case.label),
                affine=z["affine"],
                shape=tuple(int(v) for v in z["shape"]),
                canonical_shape=tuple(int(v) for v in z["canonical_shape"]),
                spacing=tuple(float(v) for v in z["spacing"]),
                z_range=(int(z["z_range"][0]), int(z["z_range"][1])),
            )
            counts = dict(zip(z["count_values"].tolist(), z["count_voxels"].tolist(), strict=True))
            info.affine.flags.writeable = False
            return PreparedVolume(z["images"], z["labels"], info, counts)
    except Exception:  # noqa: BLE001 - any unreadable entry is just recomputed
        return None


def _save_cached(path: Path, vol: PreparedVolume) -> None:
    info = vol.info
    arrays = {
        "images": vol.images,
        "labels": vol.labels,
        "affine": info.affine,
        "shape": np.asarray(info.shape),
        "canonical_shape": np.asarray(info.canonical_shape),
        "spacing": np.asarray(info.spacing),
        "z_range": np.asarray(info.z_range),
        "count_values": np.asarray(list(vol.label_counts), np.int64),
        "count_voxels": np.asarray(list(vol.label_counts.values()), np.int64),
    }
    try:
        atomic_write_bytes(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        warnings.warn(f"preprocessed-slice cache not written ({path}): {e}", stacklevel=3)


def prepare_volume(
    case: CaseFiles, cfg: DataConfig, allowed: set[int], cache_dir: Path | None
) -> PreparedVolume:
    """Validate + preprocess one volume, through the cache when ``cache_dir`` is given."""
    key = cache_key(case, cfg, allowed) if cache_dir is not None else None
    path = cache_dir / case.site / f"{case.case}.{key}.npz" if key and cache_dir else None
    if path is not None and path.is_file():
        cached = _load_cached(path, case)
        if cached is not None:
            return cached
    volume = read_case_files(case, cfg, allowed)
    images, labels, z_range = preprocess_case(volume, cfg)
    info = volume_info(volume, case.site, case.case, case.image, case.label, z_range)
    prepared = PreparedVolume(images, labels, info, volume.label_counts)
    if path is not None:
        _save_cached(path, prepared)
    return prepared


def _check_config(cfg: DataConfig) -> None:
    if cfg.labels == "multiclass" and cfg.num_classes > 256:
        raise UserError("data.num_classes: at most 256 classes (labels are stored as uint8)")
    if cfg.labels == "binary" and not cfg.foreground_labels:
        raise UserError("data.foreground_labels: empty, so every voxel would be background")


def prepare_sites(
    cfg: DataConfig, root: str | Path | None = None, progress: bool = False, cache: bool = True
) -> list[PreparedSite]:
    """Discover, split (fails fast, before any heavy work) and preprocess every site."""
    _check_config(cfg)
    root = Path(root if root is not None else cfg.root)
    sites = discover_sites(root, cfg.layout)
    splits = [
        split_site(
            [c.case for c in s.cases],
            s.name,
            cfg.test_fraction,
            cfg.val_fraction,
            cfg.split_seed,
            s.path,
        )
        for s in sites
    ]
    cache_dir = cache_root(cfg, root) if cache else None
    from tqdm import tqdm

    total = sum(len(s.cases) for s in sites)
    out: list[PreparedSite] = []
    with tqdm(
        total=total, desc="preprocess", unit="vol", file=sys.stderr, disable=not progress
    ) as bar:
        for site, split in zip(sites, splits, strict=True):
            allowed = allowed_labels(cfg, site.labels)
            volumes = {}
            for case in site.cases:
                bar.set_postfix_str(case.case, refresh=False)
                volumes[case.case] = prepare_volume(case, cfg, allowed, cache_dir)
                bar.update()
            out.append(PreparedSite(site, split, volumes))
    return out


def load_sites(
    cfg: DataConfig, root: str | Path | None = None, progress: bool = False
) -> list[SiteData]:
    """Every site's train/val/test slices (patient-level split), sorted by site name.

    ``root`` overrides ``cfg.root``. Raises ``UserError`` naming the file for any bad input.
    """
    return [
        SiteData(
            name=site.files.name,
            **{split: site.slice_set(split, cfg.resolution) for split in SPLITS},
        )
        for site in prepare_sites(cfg, root, progress)
    ]
