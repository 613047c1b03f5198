"""A small REAL multi-site CT dataset from the TotalSegmentator 2.18.0 source distribution.

The sdist (``pip download --no-deps --no-binary :all: totalsegmentator==2.18.0``, 38 MB, cached
and checked against a pinned SHA-256) ships, under ``tests/reference_files/``, three distinct CT
scans with TotalSegmentator's own segmentations. Each becomes one site holding one scan:

* ``ts_abdomen``: ``example_ct.nii.gz`` (abdomen, 3 mm) with
  ``example_seg_fast_force_split.nii.gz`` (task "total", fast model, multi-label);
* ``ts_dicom``: ``example_ct_dicom/`` (a Siemens DICOM series, read with pydicom; the NIfTI
  affine is built from ImagePositionPatient / ImageOrientationPatient / PixelSpacing and checked
  to line up with) ``example_seg_dicom.nii.gz`` (task "total", multi-label);
* ``ts_aorta``: ``aorta_report/example_ct.nii.gz`` (thorax-abdomen, 1.5 mm) with the per-structure
  masks of its aorta report (``aorta_report/test_result/models/<class>.nii.gz``), which cover a
  cropped grid: the CT is cropped to it. These masks include the aorta but no liver.

(``example_ct_sm.nii.gz``, ``spine_report`` and ``pulmonary_report`` are crops of the same scans
and are not used: one patient must not appear at two sites.) Labels are model outputs, not
manual annotations; the target class (default liver) becomes label 1.
"""

from __future__ import annotations

import ast
import difflib
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from tff_privseg.data._fs import staged_dir
from tff_privseg.data.fetch import PinnedDist, fetch
from tff_privseg.data.fetch import read_members as read_members_of
from tff_privseg.data.nifti import AFFINE_ATOL
from tff_privseg.errors import UserError

TS_VERSION = "2.18.0"
TS_SDIST = f"totalsegmentator-{TS_VERSION}.tar.gz"
TS_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
TS_DIST = PinnedDist("totalsegmentator", TS_VERSION, TS_SDIST, TS_SHA256, sdist=True)
CONFIG_NAME = "data.toml"  # written next to the sites: the split settings this data needs
_TOP = f"totalsegmentator-{TS_VERSION}/"
_REF = _TOP + "tests/reference_files/"
_CLASS_MAP = _TOP + "totalsegmentator/map_to_binary.py"
_LABELS_NOTE = (
    "The label is TotalSegmentator's own model prediction, not a manual annotation. "
    "This site holds a single scan of a single patient."
)


@dataclass(frozen=True)
class Source:
    site: str
    ct: str  # member path under tests/reference_files/ (a folder for DICOM)
    seg: str  # multi-label NIfTI, or a folder of per-class masks "<dir>/"
    about: str

    @property
    def per_class(self) -> bool:
        return self.seg.endswith("/")


SOURCES = (
    Source(
        "ts_abdomen",
        "example_ct.nii.gz",
        "example_seg_fast_force_split.nii.gz",
        "abdominal CT, 3 mm isotropic; labels from TotalSegmentator task 'total' (fast 3 mm "
        "model, --force_split), file example_seg_fast_force_split.nii.gz",
    ),
    Source(
        "ts_dicom",
        "example_ct_dicom/",
        "example_seg_dicom.nii.gz",
        "Siemens CT DICOM series (20 slices, 512x512, 0.98 x 0.98 mm, 2 mm slice spacing), "
        "converted here with pydicom; labels from TotalSegmentator task 'total', file "
        "example_seg_dicom.nii.gz",
    ),
    Source(
        "ts_aorta",
        "aorta_report/example_ct.nii.gz",
        "aorta_report/test_result/models/",
        "CT, 1.5 mm isotropic, cropped to the field of view of its aorta-report masks "
        "(aorta_report/test_result/models/<class>.nii.gz, TotalSegmentator model outputs)",
    ),
)


def fetch_sdist(cache_dir: str | Path | None = None) -> Path:
    """The TotalSegmentator sdist, downloaded once with pip into ``cache_dir``."""
    return fetch(TS_DIST, cache_dir)


def read_members(sdist: Path) -> dict[str, bytes]:
    """The files this module needs, keyed by path under the sdist's top folder."""
    wanted = {_CLASS_MAP}
    for s in SOURCES:
        wanted |= {_REF + s.ct, _REF + s.seg}
    wanted = {w[len(_TOP) :] for w in wanted}
    return read_members_of(
        sdist,
        TS_DIST,
        lambda name: name in wanted or any(w.endswith("/") and name.startswith(w) for w in wanted),
    )


def total_class_map(source: bytes) -> dict[int, str]:
    """``class_map["total"]`` of ``totalsegmentator/map_to_binary.py``, read without importing."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets
        ):
            return {int(k): str(v) for k, v in ast.literal_eval(node.value)["total"].items()}
    raise UserError("no class_map in map_to_binary.py", _CLASS_MAP)


def _nifti(data: bytes, name: str) -> nib.Nifti1Image:
    try:
        img = nib.Nifti1Image.from_bytes(gzip.decompress(data) if name.endswith(".gz") else data)
        img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)  # load now, drop header
    except Exception as e:  # noqa: BLE001 - any decoding problem is a corrupt member
        raise UserError(f"cannot read {name} from the archive ({e})", name) from None
    return img


def dicom_series(files: dict[str, bytes]) -> nib.Nifti1Image:
    """A single-frame axial CT series -> NIfTI (int16 HU [cols, rows, slices], RAS+ affine).

    Voxel (i, j, k) = (column, row, slice sorted along the slice normal). The DICOM patient
    frame is LPS; NIfTI world is RAS, hence the sign flip of x and y.
    """
    import pydicom

    slices = [pydicom.dcmread(io.BytesIO(b)) for _, b in sorted(files.items())]
    iop = np.array(slices[0].ImageOrientationPatient, dtype=np.float64)
    spacing = np.array(slices[0].PixelSpacing, dtype=np.float64)  # [between rows, between cols]
    for ds in slices:
        if not np.allclose(ds.ImageOrientationPatient, iop, atol=1e-4) or not np.allclose(
            ds.PixelSpacing, spacing, atol=1e-4
        ):
            raise UserError("DICOM series mixes orientations or pixel spacings", "example_ct_dicom")
    row_dir, col_dir = iop[:3], iop[3:]  # directions of increasing column / row index
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda ds: float(np.dot(ds.ImagePositionPatient, normal)))
    pos = np.array([np.dot(ds.ImagePositionPatient, normal) for ds in slices])
    steps = np.diff(pos)
    if len(slices) < 2 or steps.min() <= 0 or np.ptp(steps) > 1e-2:
        raise UserError(
            f"DICOM slices are not evenly spaced ({steps.round(3)})", "example_ct_dicom"
        )
    hu = np.stack(
        [ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices],
        axis=-1,
    )
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = normal * float(np.mean(steps))
    lps[:3, 3] = np.array(slices[0].ImagePositionPatient, dtype=np.float64)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return nib.Nifti1Image(np.round(hu).astype(np.int16), affine)


def align_label(label: nib.Nifti1Image, ct: nib.Nifti1Image, name: str) -> np.ndarray:
    """Label voxels on the CT's voxel grid [*ct.shape]: the grids may differ only by axis
    order/flips (the same voxels), else UserError."""
    to_ct = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(label.affine), nib.orientations.io_orientation(ct.affine)
    )
    moved = label.as_reoriented(to_ct)
    diff = float(np.max(np.abs(moved.affine - ct.affine)))
    if moved.shape != ct.shape or diff > AFFINE_ATOL:
        raise UserError(
            f"does not line up with the CT (shape {moved.shape} vs {ct.shape}, affine "
            f"difference {diff:.4g})",
            name,
        )
    return np.asanyarray(moved.dataobj)


def crop_to(ct: nib.Nifti1Image, grid: nib.Nifti1Image, name: str) -> nib.Nifti1Image:
    """The part of ``ct`` on ``grid``'s voxels, when grid is an integer-offset crop of ct."""
    t = np.linalg.inv(ct.affine) @ grid.affine
    offset = np.round(t[:3, 3]).astype(int)
    if (
        not np.allclose(t[:3, :3], np.eye(3), atol=1e-4)
        or not np.allclose(t[:3, 3], offset, atol=1e-2)
        or (offset < 0).any()
        or (offset + grid.shape > np.array(ct.shape)).any()
    ):
        raise UserError("mask grid is not a crop of the CT grid", name)
    cropped = ct.slicer[tuple(slice(o, o + n) for o, n in zip(offset, grid.shape, strict=True))]
    return nib.Nifti1Image(np.asanyarray(cropped.dataobj), grid.affine)


def _site_volume(
    src: Source, members: dict[str, bytes], class_id: int, target: str
) -> tuple[nib.Nifti1Image, np.ndarray] | str:
    """(CT, binary target mask on the CT grid) of one source, or why it has none."""
    if src.ct.endswith("/"):
        prefix = "tests/reference_files/" + src.ct
        ct = dicom_series({k: v for k, v in members.items() if k.startswith(prefix)})
    else:
        ct = _nifti(members["tests/reference_files/" + src.ct], src.ct)
    if src.per_class:
        name = f"tests/reference_files/{src.seg}{target}.nii.gz"
        if name not in members:
            return f"no '{target}' mask among its per-structure masks"
        seg = _nifti(members[name], name)
        ct = crop_to(ct, seg, name)
        mask = np.asanyarray(seg.dataobj) > 0
    else:
        seg = _nifti(members["tests/reference_files/" + src.seg], src.seg)
        mask = align_label(seg, ct, src.seg) == class_id
    if not mask.any():
        return f"its segmentation has no '{target}' voxels"
    return ct, mask


def _write_site(
    folder: Path, src: Source, ct: nib.Nifti1Image, mask: np.ndarray, target: str, class_id: int
) -> dict:
    case = f"{src.site}_001"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    hu = np.asanyarray(ct.dataobj)
    if hu.min() < -32768 or hu.max() > 32767:
        raise UserError("CT values do not fit int16", src.ct)
    for sub, data, dtype in (("imagesTr", hu, np.int16), ("labelsTr", mask, np.uint8)):
        img = nib.Nifti1Image(data.astype(dtype), ct.affine)
        img.set_qform(ct.affine, code=1)
        img.set_sform(ct.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, folder / sub / f"{case}.nii.gz")
    spacing = nib.affines.voxel_sizes(ct.affine)
    meta = {
        "name": f"TotalSegmentator {TS_VERSION} example: {src.site}",
        "description": (
            f"Real CT from the TotalSegmentator {TS_VERSION} source distribution "
            f"(tests/reference_files/{src.ct}): {src.about}. Label 1 = '{target}' (class "
            f"{class_id} of task 'total'), everything else 0. {_LABELS_NOTE}"
        ),
        "reference": "TotalSegmentator, Wasserthal et al., Radiology: Artificial Intelligence 2023",
        "licence": "shipped in the Apache-2.0 TotalSegmentator source distribution; check its "
        "terms before redistributing",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": target},
        "numTraining": 1,
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}],
        "test": [],
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    voxels = int(mask.sum())
    return {
        "name": src.site,
        "case": case,
        "source": f"tests/reference_files/{src.ct}",
        "shape": list(hu.shape),
        "spacing_mm": [round(float(s), 4) for s in spacing],
        "orientation": "".join(nib.aff2axcodes(ct.affine)),
        "target_voxels": voxels,
        "target_ml": round(voxels * float(np.prod(spacing)) / 1000, 1),
        "target_median_hu": float(np.median(hu[mask])),
    }


def build_example_dataset(
    out: str | Path, target: str = "liver", cache_dir: str | Path | None = None
) -> dict:
    """Write the example sites (MSD layout, one scan each) to ``out``; return a summary.

    ``target``: a TotalSegmentator 'total' class name; sources without it are skipped (listed
    in the summary's ``skipped``). ``out`` is written atomically (temp folder, then rename).
    """
    members = read_members(fetch_sdist(cache_dir))
    classes = total_class_map(members[_CLASS_MAP[len(_TOP) :]])
    by_name = {v: k for k, v in classes.items()}
    if target not in by_name:
        near = difflib.get_close_matches(target, list(by_name), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise UserError(f"'{target}' is not a TotalSegmentator 'total' class{hint}")
    class_id = by_name[target]
    sites, skipped = [], []
    with staged_dir(out) as tmp:
        for src in SOURCES:
            got = _site_volume(src, members, class_id, target)
            if isinstance(got, str):
                skipped.append({"name": src.site, "reason": got})
                continue
            sites.append(_write_site(tmp / src.site, src, *got, target, class_id))
        if not sites:
            raise UserError(f"no source scan has a '{target}' mask", out)
        # One scan per site: a patient-level test/validation split is impossible.
        (tmp / CONFIG_NAME).write_text("[data]\ntest_fraction = 0.0\nval_fraction = 0.0\n")
    return {
        "out": str(out),
        "target": target,
        "class_id": class_id,
        "sdist": TS_SDIST,
        "sites": sites,
        "skipped": skipped,
        "config": str(Path(out) / CONFIG_NAME),
        "note": "labels are TotalSegmentator model outputs; one scan per site, so "
        f"{CONFIG_NAME} sets data.test_fraction = data.val_fraction = 0 (evaluate on a "
        "held-out site instead)",
    }
