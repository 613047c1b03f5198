"""The data layer: NIfTI sites on disk -> validated, preprocessed, patient-split 2D slices.

Public API::

    load_sites(cfg, root=None, progress=False) -> list[SiteData]   # train/val/test SliceSets
    site_dataset(slices, batch_size, *, shuffle_seed=None, repeat=False) -> tf.data.Dataset
    ensure_synthetic(cfg, root) -> Path        # synthetic multi-site set if root is empty
    slices_to_volume(pred, info, order=0)      # slice predictions -> source voxel grid
    check_dataset(cfg, root) -> dict           # per-site report (volumes, slices, labels, ...)
"""

from __future__ import annotations

from pathlib import Path

from tff_privseg.config import DataConfig
from tff_privseg.data._fs import has_visible_entries, staged_dir
from tff_privseg.data.check import check_dataset
from tff_privseg.data.loader import load_sites
from tff_privseg.data.preprocess import slices_to_volume
from tff_privseg.data.slices import SiteData, SliceSet, VolumeInfo
from tff_privseg.data.synth import write_synthetic_dataset
from tff_privseg.data.tfdata import site_dataset
from tff_privseg.errors import UserError


def ensure_synthetic(cfg: DataConfig, root: str | Path | None = None) -> Path:
    """Build the synthetic dataset (``cfg.synth``) at ``root`` (default ``cfg.root``) when it
    is missing or empty; an existing dataset is left untouched. Returns ``root``."""
    root = Path(root if root is not None else cfg.root)
    if has_visible_entries(root):
        return root
    s = cfg.synth
    if s.sites < 1 or s.volumes_per_site < 1 or min(s.shape) < 8:
        raise UserError(
            f"data.synth: need sites >= 1, volumes_per_site >= 1 and every shape axis >= 8 "
            f"(got {s.sites}, {s.volumes_per_site}, {tuple(s.shape)})"
        )
    try:
        with staged_dir(root) as tmp:
            write_synthetic_dataset(tmp, s.sites, s.volumes_per_site, s.seed, tuple(s.shape))
    except UserError:
        if not has_visible_entries(root):  # else: another process built it meanwhile
            raise
    return root


__all__ = [
    "SiteData",
    "SliceSet",
    "VolumeInfo",
    "check_dataset",
    "ensure_synthetic",
    "load_sites",
    "site_dataset",
    "slices_to_volume",
    "write_synthetic_dataset",
]
