"""Predicted masks as DICOM-SEG on the source series: written with highdicom, read back by the
part-1 reader voxel for voxel; `predict` on a DICOM series folder (a stub model, no TF)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from test_dicom import NI, NJ, NK, arrays, write_rtstruct, write_series  # noqa: E402

from cli.main import cli  # noqa: E402
from tff_privseg.data.dicom import read_seg, read_series  # noqa: E402
from tff_privseg.data.dicom_seg import write_seg  # noqa: E402
from tff_privseg.data.preprocess import from_canonical  # noqa: E402
from tff_privseg.evaluate import dicom_prediction  # noqa: E402
from tff_privseg.evaluate.scans import Scan  # noqa: E402


def test_seg_round_trip_through_the_reader(tmp_path: Path) -> None:
    stored, _, label = arrays()
    slices = write_series(tmp_path / "CT", stored)  # files and numbers shuffled
    series = read_series(tmp_path / "CT")
    mask = label.copy()
    mask[20:25, 15:20, 6] = 2  # a second class on another slice
    out = write_seg(mask, series, tmp_path / "pred" / "seg.dcm", {1: "tumour", 2: "other"})

    ds = hd.seg.segread(out)
    assert ds.SegmentationType == "BINARY"
    assert [str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence] == [
        str(slices[0].SeriesInstanceUID)
    ]
    assert str(ds.FrameOfReferenceUID) == str(slices[0].FrameOfReferenceUID)
    assert [ds.get_segment_description(n).SegmentLabel for n in (1, 2)] == ["tumour", "other"]
    assert ds.get_segment_description(1).SegmentAlgorithmType == "AUTOMATIC"
    back = read_seg(out, series, {})  # segment numbers are the label values
    np.testing.assert_array_equal(back, mask)
    # each frame lies on its source slice
    for frame in ds.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = series.sop_uids.index(str(uid))
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], (series.lps @ [0, 0, k, 1])[:3])


def test_empty_prediction_is_a_valid_seg(tmp_path: Path) -> None:
    stored, _, _ = arrays()
    write_series(tmp_path / "CT", stored)
    series = read_series(tmp_path / "CT")
    out = write_seg(np.zeros((NI, NJ, NK), np.uint8), series, tmp_path / "seg.dcm")
    assert not read_seg(out, series, {}).any()


class StubPredictor:
    """Thresholds HU on the canonical grid, as a model would predict on canonical slices."""

    kind = "stub"
    num_classes = 2

    def __call__(self, scan: Scan) -> np.ndarray:
        canonical = (scan.image > 0).astype(np.uint8)
        return from_canonical(canonical, scan.info.affine)


def test_predict_on_a_dicom_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored, hu, label = arrays()
    case = tmp_path / "case"
    slices = write_series(case / "CT", stored)
    write_rtstruct(case / "old_contours.dcm", slices, label)  # other objects are ignored
    monkeypatch.setattr(dicom_prediction, "load_predictor", lambda *a, **k: StubPredictor())
    runner = CliRunner()
    out = tmp_path / "pred.dcm"
    result = runner.invoke(cli, ["predict", "--model", "x", str(case), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)["predictions"][0]
    assert record["format"] == "dicom-seg" and record["slices"] == NK
    series = read_series(case)
    np.testing.assert_array_equal(read_seg(out, series, {}), (hu > 0).astype(np.int32))

    nifti = tmp_path / "pred.nii.gz"
    args = ["predict", "--model", "x", str(case), "--out", str(nifti), "--format", "nifti"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    import nibabel as nib

    img = nib.load(nifti)
    np.testing.assert_allclose(img.affine, series.affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), hu > 0)

    bad = runner.invoke(cli, ["predict", "--model", "x", str(case), "--out", str(nifti)])
    assert bad.exit_code != 0 and ".dcm file for DICOM-SEG" in bad.output


def test_dicom_seg_needs_a_series(tmp_path: Path) -> None:
    scan = tmp_path / "scans"
    scan.mkdir()
    args = ["predict", "--model", "x", str(scan), "--out", str(tmp_path / "o"), "--format"]
    result = CliRunner().invoke(cli, [*args, "dicom-seg"])
    assert result.exit_code != 0 and "needs a DICOM CT series" in result.output


def _strip_and_shift(path: Path, shift_frame: int | None = None) -> None:
    ds = pydicom.dcmread(path)
    for n, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        if "SpatialLocationsPreserved" in source:
            del source.SpatialLocationsPreserved
        if n == shift_frame:
            pos = frame.PlanePositionSequence[0].ImagePositionPatient
            frame.PlanePositionSequence[0].ImagePositionPatient = [pos[0], pos[1], pos[2] + 1.0]
    ds.save_as(path)


def test_seg_without_spatial_locations_preserved(tmp_path: Path) -> None:
    """dcmqi SEGs (the RIDER one among them) omit SpatialLocationsPreserved: each frame's
    position is checked against its source slice instead."""
    from tff_privseg.errors import UserError

    stored, _, label = arrays()
    write_series(tmp_path / "CT", stored)
    series = read_series(tmp_path / "CT")
    out = write_seg(label, series, tmp_path / "seg.dcm")
    _strip_and_shift(out)
    np.testing.assert_array_equal(read_seg(out, series, {}), label)
    _strip_and_shift(out, shift_frame=1)
    with pytest.raises(UserError, match="SEG frame 2 lies at .* not on its source slice"):
        read_seg(out, series, {})
