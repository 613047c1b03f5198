"""DICOM (CT series + DICOM-SEG or RTSTRUCT) and NRRD sites read onto the same voxels as NIfTI.

The fixture writes one synthetic CT three ways from the same arrays: a DICOM series (pydicom;
non-isotropic spacing, rescale slope 0.5 / intercept -1024, files in shuffled order, InstanceNumber
shuffled too), its label as a DICOM-SEG (highdicom) and as an RTSTRUCT (pydicom; contours traced
on voxel edges), and the reference NIfTI pair (nibabel, the DICOM geometry's RAS affine). The
public loader must give identical arrays for all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import one_line_error

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
nrrd = pytest.importorskip("nrrd")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from cli.main import cli  # noqa: E402
from tff_privseg.config import DataConfig  # noqa: E402
from tff_privseg.data.layout import discover_sites  # noqa: E402
from tff_privseg.data.loader import prepare_sites, read_case_files  # noqa: E402

NI, NJ, NK = 32, 24, 8  # columns (i), rows (j), slices (k)
COL_SPACING, ROW_SPACING, STEP = 0.8, 0.7, 2.5  # mm: along a row, down a column, between slices
ORIGIN = np.array([-12.0, 30.0, 100.0])  # LPS mm of voxel (0, 0, 0)
SLOPE, INTERCEPT = 0.5, -1024.0
BOX = (slice(9, 20), slice(5, 14), slice(2, 6))  # the structure: i, j, k ranges (off-centre)
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
ROI = "GTV-1"


def lps_affine() -> np.ndarray:
    a = np.eye(4)
    a[:3, 0] = [COL_SPACING, 0, 0]
    a[:3, 1] = [0, ROW_SPACING, 0]
    a[:3, 2] = [0, 0, STEP]
    a[:3, 3] = ORIGIN
    return a


def ras_affine() -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine()


def arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stored int16 pixels [I, J, K], HU float [I, J, K], label uint8 [I, J, K])."""
    stored = np.random.default_rng(seed).integers(0, 2600, (NI, NJ, NK)).astype(np.int16)
    label = np.zeros((NI, NJ, NK), np.uint8)
    label[BOX] = 1
    label[9:12, 5:8, 2] = 0  # a notch: the outline is not a plain rectangle on slice 2
    return stored, stored * SLOPE + INTERCEPT, label


def _patient(ds: Dataset, study: str, frame: str) -> None:
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^P", "P1", "", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study, "20240101", "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
    ds.Manufacturer = "tff_privseg tests"


def _file(ds: Dataset, sop_class: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    return ds


def write_series(folder: Path, stored: np.ndarray, seed: int = 0) -> list[Dataset]:
    """One CT slice file per k, written (and numbered) in a shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(seed + 1).permutation(NK)
    slices = []
    for k in range(NK):
        ds = Dataset()
        _patient(ds, study, frame)
        ds.SOPClassUID, ds.SOPInstanceUID = CT_STORAGE, generate_uid()
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series, 1
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(v) for v in ORIGIN + [0, 0, k * STEP]]
        ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
        ds.SliceThickness = STEP
        ds.Rows, ds.Columns = NJ, NI
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = SLOPE, INTERCEPT, "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # [rows, columns]
        _file(ds, CT_STORAGE).save_as(folder / f"IM{order[k]:04d}.dcm", write_like_original=False)
        slices.append(ds)
    return slices


def write_seg(path: Path, slices: list[Dataset], label: np.ndarray, name: str = ROI) -> None:
    algorithm = hd.AlgorithmIdentificationSequence(
        name="test", version="1", family=hd.sr.CodedConcept("123109", "DCM", "Manual Processing")
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=name,
        segmented_property_category=hd.sr.CodedConcept(
            "49755003", "SCT", "Morphologically Altered Structure"
        ),  # fmt: skip
        segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=slices,
        pixel_array=np.transpose(label, (2, 1, 0)).astype(np.uint8),  # [K, rows, columns]
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="tff_privseg tests",
        manufacturer_model_name="tests",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(path)


def outlines(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed polygons [n, 2] (voxel coordinates) along the voxel edges of a 2D mask's
    4-connected boundary: each region traced once (no holes in these masks)."""
    edges = {}
    m = np.pad(mask2d.astype(bool), 1)
    for i, j in zip(*np.nonzero(m), strict=True):
        x, y = i - 1, j - 1  # voxel (x, y) spans [x-0.5, x+0.5] x [y-0.5, y+0.5]
        corners = [(x - 0.5, y - 0.5), (x + 0.5, y - 0.5), (x + 0.5, y + 0.5), (x - 0.5, y + 0.5)]
        sides = [(0, -1), (1, 0), (0, 1), (-1, 0)]
        for s, (di, dj) in enumerate(sides):
            if not m[i + di, j + dj]:
                edges[corners[s]] = corners[(s + 1) % 4]
    polygons = []
    while edges:
        start, point = next(iter(edges.items()))
        ring = [start]
        while point != start:
            ring.append(point)
            point = edges.pop(point)
        edges.pop(start, None)
        polygons.append(np.array(ring))
    return polygons


def write_rtstruct(
    path: Path, slices: list[Dataset], label: np.ndarray, name: str = ROI, shift_mm: float = 0.0
) -> None:
    first = slices[0]
    ds = Dataset()
    _patient(ds, first.StudyInstanceUID, first.FrameOfReferenceUID)
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, generate_uid()
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), 3
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "test", "", ""
    ref = Dataset()
    ref.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref])
    roi = Dataset()
    roi.ROINumber, roi.ROIName = 1, name
    roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = Sequence([roi])
    contours = []
    lps = lps_affine()
    for k in range(NK):
        for ring in outlines(label[:, :, k]):
            voxel = np.c_[ring, np.full(len(ring), k), np.ones(len(ring))]
            points = (lps @ voxel.T).T[:, :3] + [shift_mm, 0, 0]
            c = Dataset()
            c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", len(ring)
            c.ContourData = [f"{v:.4f}" for v in points.ravel()]
            image = Dataset()
            image.ReferencedSOPClassUID = CT_STORAGE
            image.ReferencedSOPInstanceUID = slices[k].SOPInstanceUID
            c.ContourImageSequence = Sequence([image])
            contours.append(c)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber, roi_contour.ROIDisplayColor = 1, [255, 0, 0]
    roi_contour.ContourSequence = Sequence(contours)
    ds.ROIContourSequence = Sequence([roi_contour])
    obs = Dataset()
    obs.ObservationNumber, obs.ReferencedROINumber, obs.RTROIInterpretedType = 1, 1, "GTV"
    obs.ROIInterpreter = ""
    ds.RTROIObservationsSequence = Sequence([obs])
    _file(ds, RTSTRUCT_STORAGE).save_as(path, write_like_original=False)


def write_nifti(site: Path, case: str, hu: np.ndarray, label: np.ndarray) -> None:
    for sub, data in (("images", hu.astype(np.float32)), ("labels", label)):
        (site / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, ras_affine()), site / sub / f"{case}.nii.gz")


def write_nrrd(site: Path, case: str, hu: np.ndarray, label: np.ndarray) -> None:
    """LPS header (the usual one), and the label cropped to its box, as 3D Slicer saves it."""
    lps = lps_affine()
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
    }
    (site / "images").mkdir(parents=True, exist_ok=True)
    (site / "labels").mkdir(parents=True, exist_ok=True)
    nrrd.write(str(site / "images" / f"{case}.nrrd"), hu.astype(np.float32), header)
    lo = [s.start for s in BOX]
    cropped = label[BOX]
    seg_header = {
        **header,
        "space origin": (lps @ [*lo, 1])[:3],
        "Segment0_Name": ROI,
        "Segment0_LabelValue": "1",
        "Segment0_Layer": "0",
    }
    nrrd.write(str(site / "labels" / f"{case}.seg.nrrd"), cropped, seg_header)


CONFIG = """[data]
test_fraction = 0.0
val_fraction = 0.0
roi_labels = {"gtv-1" = 1}
"""


def data_config() -> DataConfig:
    return DataConfig(test_fraction=0.0, val_fraction=0.0, roi_labels={"gtv-1": 1})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Sites: dicom_seg (series in a sub-folder), dicom_rt (loose files), nifti, nrrd."""
    root = tmp_path_factory.mktemp("dicom") / "data"
    stored, hu, label = arrays()
    slices = write_series(root / "dicom_seg" / "pat1" / "CT", stored)
    write_seg(root / "dicom_seg" / "pat1" / "seg.dcm", slices, label)
    slices_rt = write_series(root / "dicom_rt" / "pat2", stored)
    write_rtstruct(root / "dicom_rt" / "pat2" / "zz_contours.dcm", slices_rt, label)
    write_nifti(root / "nifti", "pat3", hu, label)
    write_nrrd(root / "nrrd", "pat4", hu, label)
    return {"root": root, "hu": hu, "label": label, "slices": slices}


def test_layouts_are_detected_by_modality(dataset: dict) -> None:
    sites = {s.name: s for s in discover_sites(dataset["root"])}
    assert {n: s.layout for n, s in sites.items()} == {
        "dicom_rt": "dicom",
        "dicom_seg": "dicom",
        "nifti": "images_labels",
        "nrrd": "images_labels",
    }
    (seg_case,) = sites["dicom_seg"].cases
    assert (seg_case.case, seg_case.kind, seg_case.image.name) == ("pat1", "dicom", "CT")
    assert seg_case.label.name == "seg.dcm" and len(seg_case.all_files) == NK + 1
    (rt_case,) = sites["dicom_rt"].cases
    assert rt_case.image.name == "pat2" and rt_case.label.name == "zz_contours.dcm"
    assert rt_case.label not in rt_case.all_files[:-1]  # the label is no slice of the series


def test_dicom_and_nrrd_land_on_the_nifti_voxels(dataset: dict) -> None:
    """HU and masks identical voxel for voxel, before and after preprocessing.

    The RTSTRUCT is exact too: its contours run along voxel edges, so every voxel centre is
    strictly inside or outside a polygon (a contour through voxel centres would leave the
    boundary voxels to the rasteriser's tie-breaking: up to one voxel ring of difference)."""
    cfg = data_config()
    sites = {s.files.name: s for s in prepare_sites(cfg, dataset["root"], cache=False)}
    reference = sites["nifti"].volumes["pat3"]
    fg = int(dataset["label"].sum())
    assert reference.label_counts == {0: NI * NJ * NK - fg, 1: fg}
    raw = {}
    for name, case in (("dicom_seg", "pat1"), ("dicom_rt", "pat2"), ("nrrd", "pat4")):
        vol = sites[name].volumes[case]
        np.testing.assert_array_equal(vol.images, reference.images, err_msg=name)
        np.testing.assert_array_equal(vol.labels, reference.labels, err_msg=name)
        assert vol.label_counts == reference.label_counts, name
        np.testing.assert_allclose(vol.info.affine, reference.info.affine, atol=1e-6)
        assert vol.info.spacing == pytest.approx(reference.info.spacing)
        (files,) = sites[name].files.cases
        raw[name] = read_case_files(files, cfg, {0, 1})
    (nifti_files,) = sites["nifti"].files.cases
    ref = read_case_files(nifti_files, cfg, {0, 1})
    assert ref.spacing == pytest.approx((COL_SPACING, ROW_SPACING, STEP))
    for name, vol in raw.items():  # HU before windowing: slope and intercept applied
        np.testing.assert_array_equal(vol.image, ref.image, err_msg=name)
        np.testing.assert_array_equal(vol.label, ref.label, err_msg=name)
        np.testing.assert_allclose(vol.canonical_affine, ref.canonical_affine, atol=1e-6)
    # And the canonical arrays are the expected flip of the written ones (LPS -> RAS).
    np.testing.assert_array_equal(ref.label, dataset["label"][::-1, ::-1, :])
    np.testing.assert_array_equal(ref.image, dataset["hu"][::-1, ::-1, :])


def test_data_check_reports_dicom_sites(dataset: dict, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(CONFIG + f'cache_dir = "{tmp_path / "cache"}"\n')
    result = check(dataset["root"], "--config", config, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    by_site = {s["name"]: s for s in report["sites"]}
    assert by_site["dicom_seg"]["layout"] == "dicom"
    assert by_site["dicom_rt"]["labels"] == by_site["nifti"]["labels"]
    assert by_site["dicom_seg"]["labels"] == by_site["nifti"]["labels"]


# --------------------------------------------------------------------------------------------
# Errors: one line naming the file (the pattern of test_data_errors.py).


def check(*args: object) -> Result:
    return CliRunner().invoke(cli, ["data", "check", *map(str, args)])


def one_case(tmp_path: Path, label_kind: str = "seg", **rt) -> tuple[Path, Path, list[Dataset]]:
    """root/site/pat holding a CT series in CT/ and a SEG or RTSTRUCT; returns (root, case, ds)."""
    root = tmp_path / "data"
    case = root / "site" / "pat"
    stored, _, label = arrays()
    slices = write_series(case / "CT", stored)
    if label_kind == "seg":
        write_seg(case / "label.dcm", slices, label)
    else:
        write_rtstruct(case / "label.dcm", slices, label, **rt)
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    return root, case, slices


def _config(root: Path) -> Path:
    return root.parent / "c.toml"


def _slice_file(case: Path, k: int) -> Path:
    for path in sorted((case / "CT").iterdir()):
        if np.isclose(float(pydicom.dcmread(path).ImagePositionPatient[2]), ORIGIN[2] + k * STEP):
            return path
    raise AssertionError(k)


def test_missing_slice(tmp_path: Path) -> None:
    root, case, _ = one_case(tmp_path)
    _slice_file(case, 3).unlink()
    line = one_line_error(check(root, "--config", _config(root)), "1 missing slice(s)")
    assert _slice_file(case, 4).name in line


def test_inconsistent_spacing(tmp_path: Path) -> None:
    root, case, _ = one_case(tmp_path)
    path = _slice_file(case, 5)
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0
    ds.save_as(path)
    one_line_error(check(root, "--config", _config(root)), path.name, "inconsistent slice spacing")


def test_inconsistent_pixel_spacing(tmp_path: Path) -> None:
    root, case, _ = one_case(tmp_path)
    path = _slice_file(case, 2)
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = [0.9, COL_SPACING]
    ds.save_as(path)
    one_line_error(check(root, "--config", _config(root)), path.name, "PixelSpacing differs")


def test_seg_of_another_series(tmp_path: Path) -> None:
    root, case, _ = one_case(tmp_path)
    stored, _, label = arrays(seed=5)
    other = write_series(tmp_path / "elsewhere", stored, seed=5)
    write_seg(case / "label.dcm", other, label)
    one_line_error(
        check(root, "--config", _config(root)), "label.dcm", "SEG references series", "not the CT"
    )


def test_contour_outside_the_volume(tmp_path: Path) -> None:
    root, _, _ = one_case(tmp_path, "rtstruct", shift_mm=-20.0)  # 25 columns to the right
    one_line_error(
        check(root, "--config", _config(root)), "label.dcm", "ROI 'GTV-1'", "outside the CT volume"
    )


def test_rtstruct_without_a_matching_roi(tmp_path: Path) -> None:
    root, _, _ = one_case(tmp_path, "rtstruct", name="Liver")
    one_line_error(
        check(root, "--config", _config(root)),
        "label.dcm",
        "no ROI matches data.roi_labels (gtv-1)",
        "ROIs here: Liver",
    )


def test_two_label_files(tmp_path: Path) -> None:
    root, case, slices = one_case(tmp_path)
    _, _, label = arrays()
    write_rtstruct(case / "more.dcm", slices, label)
    one_line_error(check(root, "--config", _config(root)), "site/pat", "2 label files")


def test_error_from_a_fresh_process(tmp_path: Path) -> None:
    """The installed command as a user runs it: exit 2, one line, no traceback."""
    root, case, _ = one_case(tmp_path, "rtstruct", name="Liver")
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "data", "check", str(root), "--config", str(_config(root))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(case / "label.dcm") in lines[0] and "no ROI matches" in lines[0]


def test_cache_key_covers_every_slice_and_the_roi_mapping(tmp_path: Path) -> None:
    from tff_privseg.data.loader import cache_key

    root, case, _ = one_case(tmp_path, "rtstruct")
    cfg = data_config()
    (files,) = discover_sites(root)[0].cases
    key = cache_key(files, cfg, {0, 1})
    path = _slice_file(case, 6)  # neither the first nor the last file
    ds = pydicom.dcmread(path)
    ds.RescaleIntercept = -1000
    ds.save_as(path)
    assert cache_key(files, cfg, {0, 1}) not in (key, None)
    renamed = DataConfig(test_fraction=0.0, val_fraction=0.0, roi_labels={"gtv-1": 2})
    assert cache_key(files, renamed, {0, 1, 2}) != cache_key(files, cfg, {0, 1, 2})


def test_evaluation_reads_the_dicom_label(dataset: dict) -> None:
    """evaluate.canonical_label (the native-resolution truth) re-reads a DICOM case."""
    from tff_privseg.data.geometry import canonical_label, source_image

    cfg = data_config()
    sites = {s.files.name: s for s in prepare_sites(cfg, dataset["root"], cache=False)}
    for name, case in (("dicom_seg", "pat1"), ("dicom_rt", "pat2"), ("nrrd", "pat4")):
        info = sites[name].volumes[case].info
        np.testing.assert_array_equal(
            canonical_label(info, cfg), dataset["label"][::-1, ::-1, :], err_msg=name
        )
        assert source_image(info).shape == (NI, NJ, NK)
