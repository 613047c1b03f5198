"""``check_dataset``: validate every volume of every site and report what training will see."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from tff_privseg.config import DataConfig
from tff_privseg.data.loader import SPLITS, PreparedSite, prepare_sites, preprocess_settings


def _label_rows(site: PreparedSite) -> list[dict]:
    """Per label value in the source files: name, voxels, volume in ml, volumes containing it."""
    rows: dict[int, dict] = {}
    for vol in site.volumes.values():
        voxel_ml = float(np.prod(vol.info.spacing)) / 1000.0
        for value, voxels in vol.label_counts.items():
            row = rows.setdefault(
                value,
                {
                    "value": value,
                    "name": site.files.labels.get(value, str(value)),
                    "voxels": 0,
                    "ml": 0.0,
                    "volumes": 0,
                },
            )
            row["voxels"] += int(voxels)
            row["ml"] += voxels * voxel_ml
            row["volumes"] += 1
    for row in rows.values():
        row["ml"] = round(row["ml"], 1)
    return [rows[v] for v in sorted(rows)]


def _site_report(site: PreparedSite, cfg: DataConfig) -> dict:
    infos = [v.info for v in site.volumes.values()]
    spacing = np.array([i.spacing for i in infos])
    shape = np.array([i.canonical_shape for i in infos])
    slice_sets = {s: site.slice_set(s, cfg.resolution) for s in SPLITS}
    pixels = sum(ss.labels.size for ss in slice_sets.values())
    fg = sum(int(np.count_nonzero(ss.labels)) for ss in slice_sets.values())
    return {
        "name": site.files.name,
        "path": str(site.files.path),
        "layout": site.files.layout,
        "volumes": len(infos),
        "split_volumes": {s: len(getattr(site.split, s)) for s in SPLITS},
        "split_cases": {s: list(getattr(site.split, s)) for s in SPLITS},
        "slices": {s: len(slice_sets[s]) for s in SPLITS},
        "labels": _label_rows(site),
        "foreground_pixel_fraction": round(fg / pixels, 4) if pixels else 0.0,
        "slices_with_foreground": int(
            sum(np.any(ss.labels > 0, axis=(1, 2)).sum() for ss in slice_sets.values())
        ),
        "spacing_mm": {
            "min": spacing.min(0).round(3).tolist(),
            "max": spacing.max(0).round(3).tolist(),
        },
        "shape": {"min": shape.min(0).tolist(), "max": shape.max(0).tolist()},
        "orientations": sorted({"".join(nib.aff2axcodes(i.affine)) for i in infos}),
    }


def check_dataset(cfg: DataConfig, root: str | Path | None = None, progress: bool = False) -> dict:
    """Validate all sites under ``root`` (default ``cfg.root``) and summarise them.

    Raises ``UserError`` (naming the file) at the first problem. Uses and fills the same
    preprocessed-slice cache as ``load_sites``.
    """
    root = Path(root if root is not None else cfg.root)
    sites = [_site_report(s, cfg) for s in prepare_sites(cfg, root, progress)]
    labels: dict[int, dict] = {}
    for site in sites:
        for row in site["labels"]:
            total = labels.setdefault(row["value"], {**row, "voxels": 0, "ml": 0.0, "volumes": 0})
            for key in ("voxels", "ml", "volumes"):
                total[key] += row[key]
    for row in labels.values():
        row["ml"] = round(row["ml"], 1)
    return {
        "ok": True,
        "root": str(root),
        "preprocessing": preprocess_settings(cfg)
        | {
            "test_fraction": cfg.test_fraction,
            "val_fraction": cfg.val_fraction,
            "split_seed": cfg.split_seed,
            "num_classes": cfg.num_classes,
        },
        "sites": sites,
        "totals": {
            "sites": len(sites),
            "volumes": sum(s["volumes"] for s in sites),
            "split_volumes": {k: sum(s["split_volumes"][k] for s in sites) for k in SPLITS},
            "slices": {k: sum(s["slices"][k] for s in sites) for k in SPLITS},
            "labels": [labels[v] for v in sorted(labels)],
        },
    }
