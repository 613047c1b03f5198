"""Overlay PNGs: a few slices per site, CT window | ground truth | prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tff_privseg.data import SliceSet


def display(plane: np.ndarray) -> np.ndarray:
    """Canonical slice [X(R), Y(A)] -> radiological view: patient's right on the left, A up."""
    return np.fliplr(np.rot90(plane))


def pick_overlay_slices(slices: SliceSet, n: int) -> list[int]:
    """Up to ``n`` slice rows with the largest label area (ascending row order)."""
    if n <= 0 or len(slices) == 0:
        return []
    area = (slices.labels != 0).reshape(len(slices), -1).sum(axis=1)
    order = np.argsort(-area, kind="stable")[:n]
    return sorted(int(i) for i in order)


def write_overlay(
    path: Path, site: str, slices: SliceSet, pred: np.ndarray, rows: list[int]
) -> None:
    """PNG, one row per slice: CT (window, [0, 1]) | ground truth | prediction (matplotlib Agg).

    pred: uint8 class ids [N, R, R] at the model's resolution.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    titles = ("CT (window)", "ground truth", "prediction")
    for r, i in enumerate(rows):
        info = slices.volumes[int(slices.volume_index[i])]
        z = info.z_range[0] + int(i - slices.volume_slices(int(slices.volume_index[i]))[0])
        nx, ny, _ = info.canonical_shape
        aspect = (ny * info.spacing[1]) / (nx * info.spacing[0])  # pixel height / width
        ct = display(slices.images[i, :, :, 0])
        for c, (ax, title) in enumerate(zip(axes[r], titles, strict=True)):
            ax.imshow(ct, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
            mask = None if c == 0 else display(slices.labels[i] if c == 1 else pred[i])
            if mask is not None and mask.any():
                ax.imshow(
                    np.ma.masked_equal(mask, 0),
                    cmap="autumn" if c == 2 else "summer",
                    alpha=0.5,
                    aspect=aspect,
                    interpolation="nearest",
                )
            ax.set_title(f"{title}\n{info.case} z={z}" if c == 0 else title, fontsize=8)
            ax.set_axis_off()
    height = fig.get_figheight()
    fig.suptitle(
        f"{site}: radiological view (patient's right on the left)",
        fontsize=9,
        y=1 - 0.08 / height,
    )
    fig.subplots_adjust(
        left=0.02, right=0.98, bottom=0.02, top=1 - 0.7 / height, wspace=0.05, hspace=0.25
    )
    fig.savefig(path, format="png")
