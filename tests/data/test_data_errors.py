"""Every bad input gives exit code 2 and ONE line on stderr naming the file and the problem."""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import invoke, one_line_error

from tff_privseg.data.nifti import open_nifti, read_case
from tff_privseg.errors import UserError

SHAPE = (16, 16, 8)


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def write_case(
    site: Path, case: str, image=None, label=None, affine=None, dirs=("images", "labels")
) -> tuple[Path, Path]:
    """A CT/label pair under SITE/images + SITE/labels: random HU and a foreground block."""
    if image is None:
        image = np.random.default_rng(len(case)).integers(-1000, 400, SHAPE).astype(np.int16)
    if label is None:
        label = np.zeros(SHAPE, np.uint8)
        label[4:10, 4:10, 2:6] = 1
    return (
        save(site / dirs[0] / f"{case}.nii.gz", image, affine),
        save(site / dirs[1] / f"{case}.nii.gz", label, affine),
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A valid dataset: two sites x 4 volumes (enough for the default 0.3 / 0.1 split)."""
    root = tmp_path / "data"
    for site in ("hospA", "hospB"):
        for i in range(4):
            write_case(root / site, f"{site}_{i}")
    return root


check = functools.partial(invoke, "data", "check")


def one_voxel(dtype: type, value: float, at: int) -> np.ndarray:
    """A zero volume of SHAPE holding `value` at voxel (at, at, at)."""
    volume = np.zeros(SHAPE, dtype)
    volume[at, at, at] = value
    return volume


def test_valid_dataset_passes(root: Path) -> None:
    result = check(root, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["totals"]["volumes"] == 8


def test_image_without_label(root: Path) -> None:
    (root / "hospA" / "labels" / "hospA_2.nii.gz").unlink()
    one_line_error(check(root), "hospA_2.nii.gz", "image has no label")


def test_missing_nifti_reported_by_reader(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing\.nii\.gz: file not found"):
        open_nifti(tmp_path / "missing.nii.gz")


def test_truncated_gzip(root: Path) -> None:
    path = root / "hospB" / "images" / "hospB_1.nii.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    line = one_line_error(check(root), "hospB_1.nii.gz")
    assert "corrupt or truncated" in line or "not a readable NIfTI" in line


@pytest.mark.parametrize(
    "content", [b"this is a text file, not an image\n" * 20, gzip.compress(b"\0" * 4000)]
)
def test_not_nifti_at_all(root: Path, content: bytes) -> None:
    path = root / "hospA" / "images" / "hospA_0.nii.gz"
    path.write_bytes(content)
    one_line_error(check(root), "hospA_0.nii.gz", "not a readable NIfTI file")


def test_shape_mismatch(root: Path) -> None:
    save(root / "hospA" / "labels" / "hospA_1.nii.gz", np.zeros((16, 16, 7), np.uint8))
    one_line_error(check(root), "labels/hospA_1.nii.gz", "label shape (16, 16, 7) differs")


def test_affine_mismatch(root: Path) -> None:
    shifted = np.eye(4)
    shifted[0, 3] = 2.0  # 2 mm
    save(root / "hospA" / "labels" / "hospA_1.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
    one_line_error(check(root), "labels/hospA_1.nii.gz", "label affine differs")


def test_labels_outside_declared_classes(root: Path) -> None:
    save(root / "hospB" / "labels" / "hospB_3.nii.gz", one_voxel(np.uint8, 7, 1))
    one_line_error(
        check(root), "hospB_3.nii.gz", "label values {7} are outside the declared classes"
    )


def test_multiclass_labels_beyond_num_classes(root: Path, tmp_path: Path) -> None:
    save(root / "hospB" / "labels" / "hospB_3.nii.gz", one_voxel(np.uint8, 2, 1))
    config = tmp_path / "multi.toml"
    config.write_text('[data]\nlabels = "multiclass"\nnum_classes = 2\n')
    one_line_error(check(root, "--config", config), "hospB_3.nii.gz", "{2} are outside")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_voxels(root: Path, bad: float) -> None:
    save(root / "hospA" / "images" / "hospA_3.nii.gz", one_voxel(np.float32, bad, 3))
    one_line_error(check(root), "images/hospA_3.nii.gz", "image has 1 NaN/inf voxels")


def test_non_integer_labels(root: Path) -> None:
    save(root / "hospA" / "labels" / "hospA_0.nii.gz", one_voxel(np.float32, 0.5, 2))
    one_line_error(check(root), "labels/hospA_0.nii.gz", "non-integer")


def test_non_3d_image(root: Path) -> None:
    save(root / "hospA" / "images" / "hospA_0.nii.gz", np.zeros((*SHAPE, 2), np.int16))
    save(root / "hospA" / "labels" / "hospA_0.nii.gz", np.zeros((*SHAPE, 2), np.uint8))
    one_line_error(check(root), "hospA_0.nii.gz", "expected a 3D volume, got shape (16, 16, 8, 2)")


def test_empty_site(root: Path) -> None:
    (root / "hospC").mkdir()
    one_line_error(check(root), "hospC", "empty site")


def test_site_with_empty_image_folders(root: Path) -> None:
    (root / "hospC" / "images").mkdir(parents=True)
    (root / "hospC" / "labels").mkdir()
    one_line_error(check(root), "hospC", "empty site")


def test_no_sites(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    one_line_error(check(tmp_path / "empty"), "empty", "no site folders")


def test_missing_root(tmp_path: Path) -> None:
    one_line_error(check(tmp_path / "nowhere"), "nowhere", "dataset folder not found")


def _msd_site(site: Path, n: int, missing: str | None = None) -> None:
    entries = []
    for i in range(n):
        case = f"{site.name}_{i}"
        write_case(site, case, dirs=("imagesTr", "labelsTr"))
        entries.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    if missing:
        entries.append({"image": f"./imagesTr/{missing}", "label": f"./labelsTr/{missing}"})
    (site / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "liver"}, "training": entries})
    )


def test_dataset_json_entry_file_missing(tmp_path: Path) -> None:
    _msd_site(tmp_path / "data" / "msdA", 4, missing="ghost.nii.gz")
    _msd_site(tmp_path / "data" / "msdB", 4)
    one_line_error(check(tmp_path / "data"), "imagesTr/ghost.nii.gz", "dataset.json", "is missing")


def test_dataset_json_not_json(tmp_path: Path) -> None:
    _msd_site(tmp_path / "data" / "msdA", 4)
    (tmp_path / "data" / "msdA" / "dataset.json").write_text("{ not json")
    one_line_error(check(tmp_path / "data"), "msdA/dataset.json", "not valid JSON")


def test_site_with_too_few_volumes_for_the_split(root: Path) -> None:
    for i in (2, 3):
        for sub in ("images", "labels"):
            (root / "hospB" / sub / f"hospB_{i}.nii.gz").unlink()
    one_line_error(check(root), "hospB", "has 2 volume(s)", "need at least 3")


def test_same_case_at_two_sites(root: Path) -> None:
    write_case(root / "hospB", "hospA_0")
    one_line_error(check(root), "hospA_0.nii.gz", "also at site 'hospA'")


def test_unknown_config_key(root: Path, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[data]\nresolutoin = 64\n")
    one_line_error(check(root, "--config", config), "bad.toml", "unknown key 'data.resolutoin'")


def test_config_wrong_type(root: Path, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[data]\nresolution = "big"\n')
    one_line_error(check(root, "--config", config), "bad.toml", "data.resolution", "integer")


def test_synth_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = invoke("data", "synth", "--out", tmp_path / "out")
    one_line_error(result, "out", "not empty")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_debug_flag_shows_the_exception(root: Path) -> None:
    (root / "hospC").mkdir()
    result = invoke("--debug", "data", "check", root)
    assert isinstance(result.exception, UserError)


def test_reader_reports_truncated_label_directly(tmp_path: Path) -> None:
    noisy = np.random.default_rng(0).integers(0, 2, SHAPE).astype(np.uint8)
    image, label = write_case(tmp_path, "x", label=noisy)
    label.write_bytes(label.read_bytes()[: label.stat().st_size // 2])
    with pytest.raises(UserError, match=r"x\.nii\.gz: (corrupt|not a readable)"):
        read_case(image, label, {0, 1})


def test_example_download_impossible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip as if offline: fails at once, no network
    out, cache = tmp_path / "example", tmp_path / "cache"
    result = invoke("data", "example", "--out", out, "--cache-dir", cache)
    one_line_error(result, str(cache), "could not download totalsegmentator==2.18.0")
    assert not out.exists()
