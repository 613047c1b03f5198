"""Write a predicted mask as a DICOM-SEG that references its source CT series (highdicom).

The mask is on the series' own voxel grid, ``mask[i, j, k]`` = column i, row j of slice k in
the series' sorted order (``dicom.Series``, the grid the reader builds). Each slice becomes one
SEG frame ``mask[:, :, k].T`` [rows, columns] derived from slice k's SOP instance, so the frames
carry the slice's own ImagePositionPatient and the SEG opens over the series in a PACS viewer
or 3D Slicer. Segmentation type BINARY, one segment per foreground class (segment number =
class id), algorithm type AUTOMATIC; slices without any foreground are left out (highdicom's
``omit_empty_frames``), which DICOM readers take as empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tff_privseg.data._fs import atomic_write_bytes
from tff_privseg.data.dicom import Series, _first_line
from tff_privseg.errors import UserError


def _version() -> str:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version("tff_privseg")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a checkout)
        from tff_privseg import __version__  # noqa: PLC0415

        return str(__version__)


def build_seg(mask: np.ndarray, series: Series, class_names: Mapping[int, str] | None = None):
    """uint8 class ids [I, J, K] on ``series``' grid -> ``highdicom.seg.Segmentation``."""
    import highdicom as hd  # noqa: PLC0415
    import pydicom  # noqa: PLC0415
    from pydicom.sr.codedict import codes  # noqa: PLC0415

    if mask.shape != series.volume.shape:
        raise UserError(
            f"mask shape {mask.shape} is not the series' grid {series.volume.shape}", series.folder
        )
    mask = np.asarray(mask)
    if mask.min() < 0 or mask.max() > 255 or np.any(mask != np.round(mask)):
        raise UserError("mask values must be class ids 0..255", series.folder)
    mask = mask.astype(np.uint8)
    names = dict(class_names or {})
    classes = sorted({c for c in names if c > 0} | {int(c) for c in np.unique(mask) if c > 0})
    if not classes:
        classes = [1]  # an empty prediction is still a SEG with its one segment
    version = _version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name="tff_privseg", version=version, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(names.get(number, f"class {number}"))[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number in classes
    ]
    sources = [pydicom.dcmread(path) for path in series.files]  # slice order k
    for k, ds in enumerate(sources):
        if str(ds.SOPInstanceUID) != series.sop_uids[k]:
            raise UserError("series changed on disk while predicting", series.files[k])
    frames = np.ascontiguousarray(np.transpose(mask, (2, 1, 0)))  # [K, rows, columns]
    try:
        return hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=9001,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="tff_privseg",
            manufacturer_model_name="tff_privseg predict",
            software_versions=version,
            device_serial_number="0",
            series_description="tff_privseg prediction",
            content_label="PREDICTION",
            content_description="automatic segmentation (tff_privseg)",
            omit_empty_frames=bool(frames.any()),  # all empty: keep the empty frames
        )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise UserError(
            f"cannot build a DICOM-SEG on this series ({_first_line(e)})", series.folder
        ) from None


def write_seg(
    mask: np.ndarray, series: Series, out: str | Path, class_names: Mapping[int, str] | None = None
) -> Path:
    """Build the SEG and write it to ``out`` atomically (temp file, then rename)."""
    out = Path(out)
    seg = build_seg(mask, series, class_names)
    atomic_write_bytes(out, lambda f: seg.save_as(f))
    return out
