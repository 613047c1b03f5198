"""Read a CT series and its DICOM-SEG or RTSTRUCT label into the same ``CaseVolume`` as NIfTI.

A case is a folder (see ``layout``): one CT series (loose files or a sub-folder) and one
label file, told apart by their DICOM Modality (``CT``, ``SEG``, ``RTSTRUCT``), never by name.

Geometry is the series' own: slices are sorted by ImagePositionPatient projected on the slice
normal (row direction x column direction of ImageOrientationPatient), whatever the file order
or InstanceNumber; every slice must share the series UID, orientation, pixel spacing and matrix;
positions must be evenly spaced along the normal (a gap is reported as missing slices) with no
in-plane shift (gantry tilt). Voxels are HU (``RescaleSlope``/``RescaleIntercept`` of each slice).
The voxel grid is ``volume[i, j, k] = slice_k.pixel_array[j, i]`` (i along a row, j down the
columns, k along the normal), and its affine maps (i, j, k) to RAS millimetres (DICOM patient
coordinates are LPS: x and y flip sign). The result is brought to canonical RAS+ exactly as a
NIfTI file is (``nifti.read_canonical``), so a DICOM case and its NIfTI conversion give the same
arrays.

Labels: a DICOM-SEG is read with highdicom, frame by referenced source image (it must reference
this series' SOP instances and frame of reference); an RTSTRUCT with pydicom, each closed
planar contour rasterised on its slice plane (voxel centres inside the polygon; several contours
of one ROI on a slice combine even-odd, so holes stay holes). Which segments or ROIs become
which label value is ``data.roi_labels`` ({name: value}; names compare case-insensitively);
without it a SEG's segment numbers are its label values, and an RTSTRUCT cannot be read.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from tff_privseg.data.nifti import MAX_VOXELS, CaseVolume, case_from_images
from tff_privseg.errors import UserError

LABEL_MODALITIES = ("SEG", "RTSTRUCT")
IMAGE_MODALITIES = ("CT",)
ORIENTATION_ATOL = 1e-4  # direction cosines
SPACING_RTOL = 0.01  # relative deviation of a slice gap or pixel spacing from the series'
CONTOUR_SLICE_TOL = 0.25  # a contour must lie within a quarter slice of a slice plane
CONTOUR_EDGE_TOL = 0.5  # voxels: points up to the outer edge of the border voxels are inside


def _pydicom():
    import pydicom  # noqa: PLC0415 - only DICOM sites pay for the import

    return pydicom


def read_header(path: Path):
    """A DICOM header without pixel data, or None for a file that is not DICOM."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError:
        return None
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"unreadable DICOM file ({_first_line(e)})", path) from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:160]


def modality(ds) -> str:
    return str(getattr(ds, "Modality", "") or "").upper()


def dicom_files(folder: Path) -> list[tuple[Path, object]]:
    """(path, header) of every visible DICOM file under ``folder`` (recursively, sorted)."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        if path.name.upper() == "DICOMDIR":
            continue
        ds = read_header(path)
        if ds is not None and "SOPClassUID" in ds:
            out.append((path, ds))
    return out


def find_case(folder: Path) -> tuple[Path, tuple[Path, ...], Path]:
    """A DICOM case folder -> (folder of its CT series, the series' files, the label file)."""
    files = dicom_files(folder)
    if not files:
        raise UserError(
            "no DICOM files in this case folder (expected a CT series and a SEG or RTSTRUCT)",
            folder,
        )
    labels = [(p, modality(ds)) for p, ds in files if modality(ds) in LABEL_MODALITIES]
    images = [(p, ds) for p, ds in files if modality(ds) in IMAGE_MODALITIES]
    if not labels:
        found = sorted({modality(ds) or "?" for _, ds in files})
        raise UserError(
            "no DICOM-SEG or RTSTRUCT file in this case folder"
            + (f" (found modalities: {', '.join(found)})" if found else ""),
            folder,
        )
    if len(labels) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p, _ in labels[:4])
        raise UserError(f"{len(labels)} label files ({names}); keep one SEG or RTSTRUCT", folder)
    if not images:
        raise UserError("no CT series in this case folder", folder)
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in images})
    if len(series) > 1:
        raise UserError(
            f"{len(series)} CT series (SeriesInstanceUID {', '.join(series[:3])}); "
            "keep one series per case folder",
            folder,
        )
    image_dir = Path(os.path.commonpath([p.parent for p, _ in images]))
    return image_dir, tuple(p for p, _ in images), labels[0][0]


# --------------------------------------------------------------------------------------------
# The CT series


@dataclass(frozen=True)
class Series:
    """A sorted CT series: HU volume [I, J, K], its RAS affine, and the identifiers labels
    must reference. ``sop_uids[k]`` is slice k; ``lps`` maps (i, j, k, 1) to LPS mm."""

    folder: Path
    volume: np.ndarray
    affine: np.ndarray
    lps: np.ndarray
    series_uid: str
    frame_of_reference: str
    sop_uids: tuple[str, ...]
    files: tuple[Path, ...]


def _floats(ds, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n,) or not np.isfinite(arr).all():
        raise UserError(f"missing or malformed {keyword}", path)
    return arr


def read_series(folder: Path) -> Series:
    """Read and validate the CT series under ``folder`` (SEG/RTSTRUCT files are skipped)."""
    files = [(p, ds) for p, ds in dicom_files(folder) if modality(ds) in IMAGE_MODALITIES]
    if not files:
        raise UserError("no CT slices found", folder)
    first_path, first = files[0]
    uid = str(first.get("SeriesInstanceUID", ""))
    orient = _floats(first, "ImageOrientationPatient", 6, first_path)
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1) > 1e-3 or abs(row_dir @ col_dir) > 1e-3:
        raise UserError("ImageOrientationPatient is not two orthonormal directions", first_path)
    spacing = _floats(first, "PixelSpacing", 2, first_path)  # [between rows, between columns]
    if (spacing <= 0).any():
        raise UserError(f"PixelSpacing must be > 0, got {spacing.tolist()}", first_path)
    shape = (int(first.get("Rows", 0)), int(first.get("Columns", 0)))
    positions = []
    for path, ds in files:
        if str(ds.get("SeriesInstanceUID", "")) != uid:
            raise UserError(f"slice of another series (not {uid})", path)
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != shape:
            raise UserError(
                f"matrix {ds.get('Rows')}x{ds.get('Columns')} differs from the series' "
                f"{shape[0]}x{shape[1]}",
                path,
            )
        if not np.allclose(
            _floats(ds, "ImageOrientationPatient", 6, path), orient, atol=ORIENTATION_ATOL
        ):
            raise UserError("ImageOrientationPatient differs from the series' first slice", path)
        if not np.allclose(_floats(ds, "PixelSpacing", 2, path), spacing, rtol=SPACING_RTOL):
            raise UserError(
                f"PixelSpacing differs from the series' {spacing.tolist()} (inconsistent spacing)",
                path,
            )
        positions.append(_floats(ds, "ImagePositionPatient", 3, path))
    if min(shape) < 1:
        raise UserError(f"empty slice matrix {shape[0]}x{shape[1]}", first_path)
    order = np.argsort([p @ normal for p in positions], kind="stable")
    files = [files[i] for i in order]
    positions = [positions[i] for i in order]
    step = _slice_step(files, positions, normal)
    voxels = shape[0] * shape[1] * len(files)
    if voxels > MAX_VOXELS:
        raise UserError(f"series of {voxels} voxels is larger than {MAX_VOXELS}", folder)
    volume = np.empty((shape[1], shape[0], len(files)), np.float32)
    for k, (path, _) in enumerate(files):
        volume[:, :, k] = _hu_slice(path).T
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # i: along a row = column index, column spacing
    lps[:3, 1] = col_dir * spacing[0]  # j: down a column = row index, row spacing
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return Series(
        folder=folder,
        volume=volume,
        affine=ras,
        lps=lps,
        series_uid=uid,
        frame_of_reference=str(first.get("FrameOfReferenceUID", "")),
        sop_uids=tuple(str(ds.SOPInstanceUID) for _, ds in files),
        files=tuple(p for p, _ in files),
    )


def _slice_step(files, positions: list[np.ndarray], normal: np.ndarray) -> float:
    """The even slice spacing along ``normal`` (mm; 1 for a single slice), or a UserError."""
    if len(positions) == 1:
        thickness = files[0][1].get("SliceThickness")
        return float(thickness) if thickness and float(thickness) > 0 else 1.0
    gaps = np.diff([p @ normal for p in positions])
    for k, gap in enumerate(gaps):
        if gap < 1e-3:
            raise UserError(
                f"two slices at the same position ({files[k][0].name} and this one)",
                files[k + 1][0],
            )
    step = float(np.median(gaps))  # the series' spacing: most gaps are right
    for k, gap in enumerate(gaps):
        ratio = gap / step
        if abs(ratio - 1) > SPACING_RTOL:
            if abs(ratio - round(ratio)) <= SPACING_RTOL:
                raise UserError(
                    f"{round(ratio) - 1} missing slice(s) before this one: a {gap:.3g} mm gap "
                    f"in a series spaced {step:.3g} mm",
                    files[k + 1][0],
                )
            raise UserError(
                f"inconsistent slice spacing: {gap:.3g} mm before this slice, {step:.3g} mm "
                "elsewhere in the series",
                files[k + 1][0],
            )
    for k in range(1, len(positions)):  # stacked along the normal: no in-plane shift (tilt)
        shift = positions[k] - positions[0]
        off = shift - (shift @ normal) * normal
        if np.linalg.norm(off) > 0.01 * step + 1e-3:
            raise UserError(
                f"slice is shifted {np.linalg.norm(off):.3g} mm in-plane from the first one "
                "(gantry tilt?); resample the series to an orthogonal grid",
                files[k][0],
            )
    return step


def _hu_slice(path: Path) -> np.ndarray:
    """One slice's pixels [rows, columns] in HU (its own RescaleSlope/Intercept applied)."""
    pydicom = _pydicom()
    ds = None
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - decoders raise anything; name the file, one line
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        extra = f"; transfer syntax {syntax.name}" if syntax is not None else ""
        raise UserError(f"cannot read the pixel data ({_first_line(e)}{extra})", path) from None
    if pixels.ndim != 2 or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UserError(f"expected one grey-level frame, got pixels {pixels.shape}", path)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return pixels.astype(np.float64) * slope + intercept


# --------------------------------------------------------------------------------------------
# Labels


def _roi_value(name: str, roi_labels: Mapping[str, int]) -> int | None:
    wanted = {k.strip().lower(): v for k, v in roi_labels.items()}
    return wanted.get(str(name).strip().lower())


def read_seg(path: Path, series: Series, roi_labels: Mapping[str, int]) -> np.ndarray:
    """A DICOM-SEG on ``series``' grid -> label values [I, J, K]."""
    import highdicom as hd  # noqa: PLC0415

    try:
        seg = hd.seg.segread(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"not a readable DICOM-SEG ({_first_line(e)})", path) from None
    refs = [str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])]
    if refs and series.series_uid not in refs:
        raise UserError(
            f"SEG references series {refs[0]}, not the CT series {series.series_uid} "
            f"in {series.folder}",
            path,
        )
    if str(seg.get("FrameOfReferenceUID", "")) != series.frame_of_reference:
        raise UserError(
            f"SEG frame of reference {seg.get('FrameOfReferenceUID')} differs from the CT "
            f"series' {series.frame_of_reference}",
            path,
        )
    referenced = {str(uid) for _, _, uid in seg.get_source_image_uids()}
    foreign = referenced - set(series.sop_uids)
    if foreign:
        raise UserError(
            f"SEG references {len(foreign)} image(s) that are not in the CT series "
            f"{series.series_uid} (e.g. {sorted(foreign)[0]})",
            path,
        )
    if (int(seg.Rows), int(seg.Columns)) != series.volume.shape[1::-1]:
        raise UserError(
            f"SEG matrix {seg.Rows}x{seg.Columns} differs from the CT series' "
            f"{series.volume.shape[1]}x{series.volume.shape[0]}",
            path,
        )
    names = {n: str(seg.get_segment_description(n).SegmentLabel) for n in seg.segment_numbers}
    if roi_labels:
        values = {n: _roi_value(name, roi_labels) for n, name in names.items()}
        values = {n: v for n, v in values.items() if v is not None}
        if not values:
            raise UserError(
                f"no segment matches data.roi_labels ({', '.join(sorted(roi_labels))}); "
                f"segments: {', '.join(names.values())}",
                path,
            )
    else:
        values = {n: n for n in names}
    _check_frame_positions(seg, series, path)
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(series.sop_uids),
            segment_numbers=sorted(values),
            combine_segments=False,
            assert_missing_frames_are_empty=True,
            ignore_spatial_locations=True,  # checked above, frame by frame
        )  # [K, rows, columns, segments]
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"cannot place the SEG frames on the CT series ({_first_line(e)})", path
        ) from None
    label = np.zeros(series.volume.shape, np.int32)
    for s, number in enumerate(sorted(values)):
        mask = np.transpose(pixels[..., s] > 0.5, (2, 1, 0))  # [K, rows, cols] -> [I, J, K]
        label[mask] = values[number]
    return label


def _check_frame_positions(seg, series: Series, path: Path) -> None:
    """Every SEG frame must lie on the slice it derives from (ImagePositionPatient within 1%
    of a voxel). Checked here rather than trusted from SpatialLocationsPreserved, which many
    real SEGs (dcmqi's among them) leave out and highdicom then refuses to index by."""
    index = {uid: k for k, uid in enumerate(series.sop_uids)}
    tol = 0.01 * float(np.min(np.linalg.norm(series.lps[:3, :3], axis=0))) + 1e-3
    for n, frame in enumerate(seg.get("PerFrameFunctionalGroupsSequence", []), start=1):
        try:
            source = frame.DerivationImageSequence[0].SourceImageSequence[0]
            k = index[str(source.ReferencedSOPInstanceUID)]
            position = np.array(
                [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
            )
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            raise UserError(
                f"SEG frame {n} names no source slice of the CT series or no position", path
            ) from None
        expected = (series.lps @ [0.0, 0.0, k, 1.0])[:3]
        if np.linalg.norm(position - expected) > tol:
            raise UserError(
                f"SEG frame {n} lies at {np.round(position, 2).tolist()} mm, not on its source "
                f"slice {series.files[k].name} at {np.round(expected, 2).tolist()} mm",
                path,
            )


def read_rtstruct(path: Path, series: Series, roi_labels: Mapping[str, int]) -> np.ndarray:
    """An RTSTRUCT's closed planar contours, rasterised on ``series``' grid -> [I, J, K]."""
    from matplotlib.path import Path as Polygon  # noqa: PLC0415

    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"not a readable RTSTRUCT ({_first_line(e)})", path) from None
    frames = {
        str(f.get("FrameOfReferenceUID", ""))
        for f in ds.get("ReferencedFrameOfReferenceSequence", [])
    }
    if frames and series.frame_of_reference not in frames:
        raise UserError(
            f"RTSTRUCT frame of reference {sorted(frames)[0]} differs from the CT series' "
            f"{series.frame_of_reference}",
            path,
        )
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    if not roi_labels:
        raise UserError(
            "set data.roi_labels to say which ROI is which label "
            f"(ROIs here: {', '.join(names.values()) or 'none'})",
            path,
        )
    chosen = {n: v for n, name in names.items() if (v := _roi_value(name, roi_labels)) is not None}
    if not chosen:
        raise UserError(
            f"no ROI matches data.roi_labels ({', '.join(sorted(roi_labels))}); "
            f"ROIs here: {', '.join(names.values()) or 'none'}",
            path,
        )
    shape = series.volume.shape
    label = np.zeros(shape, np.int32)
    to_voxel = np.linalg.inv(series.lps)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    centres = np.stack([ii.ravel(), jj.ravel()], axis=1).astype(np.float64)
    for roi in ds.get("ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        if number not in chosen:
            continue
        planes: dict[int, np.ndarray] = {}
        for contour in roi.get("ContourSequence", []):
            kind = str(contour.get("ContourGeometricType", ""))
            if kind != "CLOSED_PLANAR":
                continue  # POINT / OPEN_PLANAR mark no area
            points = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            voxel = (to_voxel @ np.c_[points, np.ones(len(points))].T).T[:, :3]
            k = float(np.median(voxel[:, 2]))
            where = f"ROI '{names[number]}'"
            if abs(k - round(k)) > CONTOUR_SLICE_TOL or np.ptp(voxel[:, 2]) > CONTOUR_SLICE_TOL:
                raise UserError(
                    f"{where}: a contour does not lie on a slice plane of the CT series "
                    f"(slice index {k:.2f})",
                    path,
                )
            lo, hi = -CONTOUR_EDGE_TOL, np.array(shape) - 1 + CONTOUR_EDGE_TOL
            outside = (voxel < lo) | (voxel > hi)
            if outside.any():
                x, y, z = points[np.flatnonzero(outside.any(axis=1))[0]]
                raise UserError(
                    f"{where}: contour point ({x:.1f}, {y:.1f}, {z:.1f}) mm lies outside the "
                    f"CT volume",
                    path,
                )
            inside = Polygon(voxel[:, :2], closed=False).contains_points(centres)
            k = int(round(k))
            planes[k] = planes.get(k, np.zeros(len(centres), bool)) ^ inside
        for k, inside in planes.items():
            label[:, :, k][inside.reshape(shape[:2])] = chosen[number]
    return label


def read_dicom_case(
    image_dir: str | Path,
    label_path: str | Path,
    allowed_labels: Collection[int],
    roi_labels: Mapping[str, int] | None = None,
) -> CaseVolume:
    """Load, validate and canonicalise a CT series and its SEG or RTSTRUCT label."""
    image_dir, label_path = Path(image_dir), Path(label_path)
    series = read_series(image_dir)
    header = read_header(label_path)
    kind = modality(header) if header is not None else ""
    if kind == "SEG":
        label = read_seg(label_path, series, roi_labels or {})
    elif kind == "RTSTRUCT":
        label = read_rtstruct(label_path, series, roi_labels or {})
    else:
        raise UserError(f"not a DICOM-SEG or RTSTRUCT (Modality {kind or 'none'})", label_path)
    return case_from_images(
        nib.Nifti1Image(series.volume, series.affine),
        nib.Nifti1Image(label, series.affine),
        image_dir,
        label_path,
        allowed_labels,
    )
