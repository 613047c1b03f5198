"""The in-memory records the rest of the system consumes: volumes, slice sets, sites."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class VolumeInfo:
    """Everything needed to map slice predictions back onto the source file's voxel grid.

    Slices are canonical (RAS+) axial planes ``canonical[:, :, z]`` for z in ``z_range``,
    resized from (X, Y) to (R, R); see ``preprocess.slices_to_volume``. Compared by identity
    (the affine is an array).
    """

    site: str
    case: str
    image_path: str
    label_path: str
    affine: np.ndarray  # (4, 4) affine of the source file
    shape: tuple[int, int, int]  # source file shape
    canonical_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # canonical voxel size, mm
    z_range: tuple[int, int]  # [start, stop) of canonical axial slices kept


@dataclass
class SliceSet:
    """2D axial slices of some volumes of one site.

    images: float32 [N, R, R, 1] in [0, 1]; labels: uint8 [N, R, R] class ids;
    volume_index: int32 [N], row i comes from ``volumes[volume_index[i]]``.
    """

    images: np.ndarray
    labels: np.ndarray
    volume_index: np.ndarray
    volumes: list[VolumeInfo]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    def volume_slices(self, i: int) -> np.ndarray:
        """Row indices [n_i] of volume ``i``'s slices, in ascending z."""
        return np.flatnonzero(self.volume_index == i)

    @classmethod
    def empty(cls, resolution: int) -> SliceSet:
        return cls(
            images=np.zeros((0, resolution, resolution, 1), np.float32),
            labels=np.zeros((0, resolution, resolution), np.uint8),
            volume_index=np.zeros((0,), np.int32),
            volumes=[],
        )

    @classmethod
    def from_volumes(
        cls, parts: Sequence[tuple[np.ndarray, np.ndarray, VolumeInfo]], resolution: int
    ) -> SliceSet:
        """Stack per-volume (images [n, R, R, 1], labels [n, R, R], info) in the given order."""
        if not parts:
            return cls.empty(resolution)
        return cls(
            images=np.concatenate([p[0] for p in parts]).astype(np.float32, copy=False),
            labels=np.concatenate([p[1] for p in parts]).astype(np.uint8, copy=False),
            volume_index=np.concatenate(
                [np.full(len(p[0]), i, np.int32) for i, p in enumerate(parts)]
            ),
            volumes=[p[2] for p in parts],
        )


@dataclass
class SiteData:
    name: str
    train: SliceSet
    val: SliceSet
    test: SliceSet
