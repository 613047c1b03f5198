"""The data layer: NIfTI sites on disk -> validated, preprocessed, patient-split 2D slices.

Public API::

    load_sites(cfg, root=None, progress=False) -> list[SiteData]   # train/val/test SliceSets
    site_dataset(slices, batch_size, *, shuffle_seed=None, repeat=False) -> tf.data.Dataset
    ensure_synthetic(cfg, root) -> Path        # synthetic multi-site set if root is empty
    slices_to_volume(pred, info, order=0)      # slice predictions -> source voxel grid
    check_dataset(cfg, root) -> dict           # per-site report (volumes, slices, labels, ...)
"""

from __future__ import annotations

import json
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
    s = cfg.synth
    if has_visible_entries(root):
        found = _synthetic_layout(root)
        if found is not None and found != (s.sites, s.volumes_per_site):
            raise UserError(
                f"holds a synthetic set of {found[0]} sites x {found[1]} volumes, but "
                f"[data.synth] asks for {s.sites} x {s.volumes_per_site}: remove the folder "
                "(it is rebuilt) or point data.root elsewhere",
                root,
            )
        return root
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


def _synthetic_layout(root: Path) -> tuple[int, int] | None:
    """(sites, volumes per site) of a set written by `write_synthetic_dataset`, else None."""
    counts = []
    for meta in sorted(root.glob("*/dataset.json")):
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        if not str(info.get("name", "")).startswith("tff_privseg synthetic"):
            return None
        counts.append(int(info.get("numTraining", 0)))
    if not counts or len(set(counts)) != 1:
        return None
    return len(counts), counts[0]


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
