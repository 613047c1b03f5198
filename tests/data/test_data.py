"""Data layer: phantom, orientation, preprocessing, layout, split, cache, tf.data, CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from tff_privseg.config import DataConfig, SynthConfig
from tff_privseg.data import (
    SliceSet,
    ensure_synthetic,
    load_sites,
    site_dataset,
    slices_to_volume,
    write_synthetic_dataset,
)
from tff_privseg.data import loader as loader_mod
from tff_privseg.data._fs import staged_dir
from tff_privseg.data.layout import discover_sites
from tff_privseg.data.nifti import CaseVolume, read_case
from tff_privseg.data.preprocess import (
    map_labels,
    preprocess_case,
    scale_intensity,
    volume_info,
    z_crop_range,
)
from tff_privseg.data.split import split_site, split_sizes
from tff_privseg.data.synth import _stored, phantom, site_profile
from tff_privseg.errors import UserError

SHAPE = (40, 40, 20)
CFG = DataConfig(resolution=32, crop_slices=8)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 sites x 4 synthetic volumes (treat as read-only; copy before changing files)."""
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic_dataset(root, sites=3, volumes_per_site=4, seed=1, shape=SHAPE)
    return root


def cases_of(root: Path) -> list:
    return [c for s in discover_sites(root) for c in s.cases]


def make_case(image: np.ndarray, label: np.ndarray) -> CaseVolume:
    eye = np.eye(4)
    return CaseVolume(image, label, eye, image.shape, eye, {})


# --- synthetic phantom -------------------------------------------------------------------------


def test_synth_writes_msd_sites_with_unique_case_ids(synth_root: Path) -> None:
    sites = discover_sites(synth_root)
    assert [s.name for s in sites] == ["siteA", "siteB", "siteC"]
    ids = [c.case for s in sites for c in s.cases]
    assert len(ids) == len(set(ids)) == 12 and ids[0] == "siteA_case000"
    assert sites[0].labels == {0: "background", 1: "liver", 2: "tumour"}
    img = nib.load(sites[1].cases[0].image)
    lab = nib.load(sites[1].cases[0].label)
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    axes = ["".join(nib.aff2axcodes(nib.load(s.cases[0].image).affine)) for s in sites]
    assert axes == ["RAS", "LPS", "RAI"]  # stored voxel orders differ per site
    spacings = {nib.load(s.cases[0].image).header.get_zooms() for s in sites}
    assert len(spacings) == 3  # and so do the scanners' voxel sizes


def test_synth_is_deterministic(tmp_path: Path) -> None:
    a = write_synthetic_dataset(tmp_path / "a", sites=1, volumes_per_site=1, seed=3, shape=SHAPE)
    b = write_synthetic_dataset(tmp_path / "b", sites=1, volumes_per_site=1, seed=3, shape=SHAPE)
    c = write_synthetic_dataset(tmp_path / "c", sites=1, volumes_per_site=1, seed=4, shape=SHAPE)
    load = lambda p: np.asanyarray(nib.load(p / "imagesTr" / "siteA_case000.nii.gz").dataobj)
    assert np.array_equal(load(a[0]), load(b[0]))
    assert not np.array_equal(load(a[0]), load(c[0]))


def test_canonical_orientation_aligns_every_site(synth_root: Path) -> None:
    """Liver on the patient's right (+x), spine posterior, whatever order the file stores."""
    for case in cases_of(synth_root):
        vol = read_case(case.image, case.label, {0, 1, 2})
        nx, ny, _ = vol.image.shape
        liver = np.argwhere(vol.label > 0).mean(axis=0)
        bone = np.argwhere(vol.image > 500).mean(axis=0)
        assert liver[0] > nx / 2, case.case  # RAS+: high x index = patient's right
        assert bone[1] < ny / 2, case.case  # low y index = posterior
        assert nib.aff2axcodes(vol.canonical_affine) == ("R", "A", "S")
    raw = np.asanyarray(nib.load(synth_root / "siteB/labelsTr/siteB_case000.nii.gz").dataobj)
    assert np.argwhere(raw > 0).mean(axis=0)[0] < SHAPE[0] / 2  # LPS file: flipped on disk


def test_any_stored_orientation_gives_the_same_canonical_volume(tmp_path: Path) -> None:
    spacing = (4.0, 4.0, 6.0)
    hu, label = phantom(SHAPE, spacing, site_profile(0, 0), np.random.default_rng(0))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-80, -80, 10]
    volumes = []
    for axes in ("RAS", "LPS", "RAI", "ASL"):  # ASL also permutes the axes
        image = tmp_path / f"{axes}_img.nii.gz"
        labels = tmp_path / f"{axes}_lab.nii.gz"
        nib.save(_stored(hu, affine, axes, np.int16), image)
        nib.save(_stored(label, affine, axes, np.uint8), labels)
        assert "".join(nib.aff2axcodes(nib.load(image).affine)) == axes
        volumes.append(read_case(image, labels, {0, 1, 2}))
    for vol in volumes[1:]:
        assert np.array_equal(vol.image, volumes[0].image)
        assert np.array_equal(vol.label, volumes[0].label)
        assert np.allclose(vol.canonical_affine, affine, atol=1e-4)


def test_phantom_hounsfield_units_are_ct_like() -> None:
    profile = site_profile(0, 0)
    hu, label = phantom((64, 64, 32), (6.0, 6.0, 5.0), profile, np.random.default_rng(5))
    assert abs(np.median(hu[:2, :2, :]) + 1000) < 40  # air in the corners
    assert 40 < np.median(hu[label == 1]) < 85  # liver ~60 HU
    assert (hu > 500).sum() > 0  # bone
    fat = hu[(hu > -150) & (hu < -60)]
    assert fat.size > 0.02 * hu.size  # subcutaneous / visceral fat
    if (label == 2).any():
        assert np.median(hu[label == 2]) < np.median(hu[label == 1])  # hypodense lesions


# --- preprocessing -----------------------------------------------------------------------------


def test_window_scaling_maps_the_hu_window_to_unit_range() -> None:
    hu = np.array([-1000, -150, 25, 200, 1500], np.int16)
    out = scale_intensity(hu, (-150.0, 200.0), "window")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1], atol=1e-6)


def test_minmax_scaling_uses_the_clipped_volume_range() -> None:
    hu = np.array([-50, 0, 50, 150], np.float32)
    np.testing.assert_allclose(scale_intensity(hu, (-150, 200), "minmax"), [0, 0.25, 0.5, 1])
    crop = scale_intensity(hu[1:3], (-150, 200), "minmax", volume_range=(-50, 150))
    np.testing.assert_allclose(crop, [0.25, 0.5])  # range of the whole volume, not the crop
    clipped = np.array([-900, 0, 900], np.float32)  # clip first: -150..200 -> 0..1
    np.testing.assert_allclose(
        scale_intensity(clipped, (-150, 200), "minmax"), [0, 150 / 350, 1], atol=1e-6
    )


@pytest.mark.parametrize(
    ("fg_z", "depth", "crop", "expected"),
    [
        ((30, 40), 100, 8, (31, 39)),  # centred on the label's z extent (middle 35)
        ((0, 3), 100, 8, (0, 8)),  # clamped at the bottom
        ((95, 100), 100, 8, (92, 100)),  # clamped at the top
        ((40, 50), 6, 8, (0, 6)),  # volume shorter than the crop: keep all
        (None, 100, 10, (45, 55)),  # no foreground: centre of the volume
        ((30, 40), 100, 0, (0, 100)),  # 0 = keep all
    ],
)
def test_crop_is_centred_on_the_label(fg_z, depth, crop, expected) -> None:
    label = np.zeros((4, 4, depth), np.uint8)
    if fg_z is not None:
        label[1, 1, fg_z[0] : min(fg_z[1], depth)] = 1
    assert z_crop_range(label, crop) == expected


def test_preprocess_outputs_slices_in_range_with_valid_class_ids() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 1000, (50, 37, 30)).astype(np.int16)
    label = np.zeros(image.shape, np.uint8)
    label[10:30, 5:20, 12:20] = 1
    label[15:20, 8:12, 14:16] = 2
    label[31:33, 30:33, 10:12] = 3  # a small structure next to nothing
    multi = DataConfig(resolution=32, crop_slices=8, labels="multiclass", num_classes=4)
    images, labels, z = preprocess_case(make_case(image, label), multi)
    assert z == (11, 19)  # every class counts: z extent 10..19
    assert images.shape == (8, 32, 32, 1) and images.dtype == np.float32
    assert labels.shape == (8, 32, 32) and labels.dtype == np.uint8
    assert images.min() >= 0 and images.max() <= 1
    assert set(np.unique(labels)) == {0, 1, 2, 3}  # nearest: no blended ids
    _, _, z = preprocess_case(make_case(image, label), CFG)
    assert z == (12, 20)  # binary: label 3 is background, extent 12..19
    keep_all = {"resolution": 32, "crop_slices": 0}
    multi_cfg = DataConfig(**keep_all, labels="multiclass", num_classes=4)
    _, multi_all, _ = preprocess_case(make_case(image, label), multi_cfg)
    _, binary_all, _ = preprocess_case(make_case(image, label), DataConfig(**keep_all))
    assert set(np.unique(binary_all)) == {0, 1}
    np.testing.assert_array_equal(binary_all, np.isin(multi_all, (1, 2)))  # 1, 2 -> 1; 3 -> 0


def test_label_resize_nearest_on_a_checkerboard() -> None:
    """Linear interpolation of 0/2 would give 1s; nearest never invents a class."""
    label = np.indices((24, 24, 4)).sum(axis=0) % 2 * 2
    multi = DataConfig(resolution=16, crop_slices=0, labels="multiclass", num_classes=3)
    _, labels, _ = preprocess_case(make_case(np.zeros(label.shape, np.int16), label), multi)
    assert set(np.unique(labels)) == {0, 2}


def test_map_labels_binary_and_multiclass() -> None:
    label = np.array([0, 1, 2, 3])
    assert map_labels(label, "binary", (1, 2)).tolist() == [0, 1, 1, 0]
    assert map_labels(label, "multiclass", ()).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("site", ["siteB", "siteC"])  # stored LPS and RAI (z flipped)
def test_slices_map_back_onto_the_source_grid(synth_root: Path, site: str) -> None:
    case = next(c for c in cases_of(synth_root) if c.site == site)
    vol = read_case(case.image, case.label, {0, 1, 2})
    cfg = DataConfig(resolution=SHAPE[0], crop_slices=8)  # no in-plane resampling: exact
    _, labels, (z0, z1) = preprocess_case(vol, cfg)
    info = volume_info(vol, case.site, case.case, case.image, case.label, (z0, z1))
    back = slices_to_volume(labels, info, order=0)
    assert back.shape == info.shape == SHAPE
    overlay = nib.Nifti1Image(back.astype(np.uint8), info.affine)  # overlays the source file
    again = np.asanyarray(nib.as_closest_canonical(overlay).dataobj)
    assert np.array_equal(again[:, :, z0:z1], vol.label[:, :, z0:z1] > 0)
    assert not again[:, :, :z0].any() and not again[:, :, z1:].any()
    source = np.asanyarray(nib.load(case.label).dataobj) > 0
    assert np.array_equal(back, source & back.astype(bool))  # never outside the true label
    assert back.sum() == (vol.label[:, :, z0:z1] > 0).sum()


# --- layout ------------------------------------------------------------------------------------


def test_layouts_msd_without_json_images_labels_and_nnunet_names(tmp_path: Path) -> None:
    src = write_synthetic_dataset(tmp_path / "src", sites=2, volumes_per_site=2, shape=SHAPE)
    root = tmp_path / "data"
    msd = root / "one"
    shutil.copytree(src[0], msd)
    (msd / "dataset.json").unlink()  # imagesTr/labelsTr matched by name
    (msd / "imagesTr" / "._siteA_case000.nii.gz").write_bytes(b"macOS resource fork")
    il = root / "two"
    (il / "images").mkdir(parents=True)
    shutil.copytree(src[1] / "labelsTr", il / "labels")
    for f in sorted((src[1] / "imagesTr").iterdir()):
        shutil.copy(f, il / "images" / f.name.replace(".nii.gz", "_0000.nii.gz"))  # nnU-Net
    sites = discover_sites(root)
    assert [(s.name, s.layout) for s in sites] == [("one", "msd"), ("two", "images_labels")]
    assert [c.case for c in sites[1].cases] == ["siteB_case000", "siteB_case001"]
    assert len(load_sites(DataConfig(resolution=16, test_fraction=0.0, val_fraction=0.0), root))


# --- split -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "test", "val", "expected"),
    [
        (10, 0.3, 0.1, (6, 1, 3)),
        (3, 0.3, 0.1, (1, 1, 1)),  # min 1 per non-zero fraction
        (131, 0.3, 0.1, (83, 9, 39)),  # MSD Task03_Liver
        (5, 0.0, 0.0, (5, 0, 0)),
        (4, 0.5, 0.0, (2, 0, 2)),
    ],
)
def test_split_sizes(n, test, val, expected) -> None:
    assert split_sizes(n, test, val) == expected


def test_split_is_by_volume_per_site_and_reproducible(synth_root: Path, tmp_path: Path) -> None:
    cfg = DataConfig(
        resolution=16,
        crop_slices=4,
        test_fraction=0.25,
        val_fraction=0.34,
        cache_dir=str(tmp_path / "cache"),
    )
    first, again = load_sites(cfg, synth_root), load_sites(cfg, synth_root)
    seen_sites: dict[str, str] = {}
    for site, site2 in zip(first, again, strict=True):
        parts = {k: [v.case for v in getattr(site, k).volumes] for k in ("train", "val", "test")}
        assert [len(v) for v in parts.values()] == [2, 1, 1]
        flat = sum(parts.values(), [])
        assert len(flat) == len(set(flat)) == 4  # no volume in two splits
        for case in flat:
            assert seen_sites.setdefault(case, site.name) == site.name  # no case at two sites
            assert case.startswith(site.name)
        for k in ("train", "val", "test"):
            assert [v.case for v in getattr(site2, k).volumes] == parts[k]
            ss = getattr(site, k)
            # every slice of a volume stays in that volume's split
            assert set(np.unique(ss.volume_index)) == set(range(len(ss.volumes)))


def test_split_depends_on_seed_and_site_only() -> None:
    cases = [f"c{i:02d}" for i in range(20)]
    a = split_site(cases, "siteA", 0.3, 0.1, seed=42)
    assert a == split_site(list(reversed(cases)), "siteA", 0.3, 0.1, seed=42)  # order-free
    assert a != split_site(cases, "siteA", 0.3, 0.1, seed=43)
    assert a != split_site(cases, "siteB", 0.3, 0.1, seed=42)
    assert sorted(a.train + a.val + a.test) == cases


# --- loading, cache, tf.data -------------------------------------------------------------------


def test_load_sites_returns_the_public_records(synth_root: Path, tmp_path: Path) -> None:
    cfg = DataConfig(resolution=32, crop_slices=8, cache_dir=str(tmp_path / "cache"))
    sites = load_sites(cfg, synth_root, progress=True)
    assert [s.name for s in sites] == ["siteA", "siteB", "siteC"]
    train = sites[1].train
    assert isinstance(train, SliceSet) and len(train) == 8 * len(train.volumes)
    assert train.images.shape == (len(train), 32, 32, 1) and train.images.dtype == np.float32
    assert train.labels.shape == (len(train), 32, 32) and train.labels.dtype == np.uint8
    assert train.volume_index.dtype == np.int32
    assert train.images.min() >= 0.0 and train.images.max() <= 1.0
    info = train.volumes[0]
    assert info.site == "siteB" and info.case.startswith("siteB_case")
    assert info.affine.shape == (4, 4) and info.shape == info.canonical_shape == SHAPE
    assert nib.aff2axcodes(info.affine) == ("L", "P", "S")
    expected = nib.affines.voxel_sizes(nib.load(info.image_path).affine)
    np.testing.assert_allclose(info.spacing, expected, rtol=1e-5)
    assert info.z_range[1] - info.z_range[0] == 8
    assert Path(info.label_path).is_file()


def test_cache_is_reused_invalidated_and_never_half_written(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    shutil.copytree(synth_root / "siteA", root / "siteA")
    cfg = DataConfig(resolution=16, crop_slices=4, test_fraction=0.25, val_fraction=0.0)
    first = load_sites(cfg, root)
    entries = sorted((root / ".cache" / "siteA").glob("*.npz"))
    assert len(entries) == 4
    assert not list((root / ".cache").rglob("*.tmp"))

    calls = []
    real = loader_mod.read_case
    monkeypatch.setattr(loader_mod, "read_case", lambda *a: calls.append(a) or real(*a))
    again = load_sites(cfg, root)
    assert calls == []  # all from cache
    np.testing.assert_array_equal(again[0].train.images, first[0].train.images)
    assert [v.z_range for v in again[0].test.volumes] == [v.z_range for v in first[0].test.volumes]

    image = root / "siteA" / "imagesTr" / "siteA_case001.nii.gz"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same content
    entries[0].write_bytes(b"garbage")  # an unreadable entry is recomputed
    load_sites(cfg, root)
    assert len(calls) == 1
    load_sites(DataConfig(resolution=32, crop_slices=4, test_fraction=0.25, val_fraction=0), root)
    assert len(calls) == 5  # other settings, other keys

    # Corrupted in place, size and mtime kept: the key is the content, so it is read again.
    image.write_bytes(b"\0" * stat.st_size)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(UserError, match="siteA_case001"):
        load_sites(cfg, root)


def test_site_dataset_batches_have_model_shapes_and_dtypes() -> None:
    n, r = 10, 16
    rng = np.random.default_rng(0)
    slices = SliceSet(
        images=rng.random((n, r, r, 1), dtype=np.float32),
        labels=rng.integers(0, 2, (n, r, r)).astype(np.uint8),
        volume_index=np.zeros(n, np.int32),
        volumes=[],
    )
    ds = site_dataset(slices, 4)
    x_spec, y_spec = ds.element_spec
    assert x_spec.shape.as_list() == [None, r, r, 1] and x_spec.dtype.name == "float32"
    assert y_spec.shape.as_list() == [None, r, r] and y_spec.dtype.name == "int32"
    batches = list(ds.as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), slices.labels)
    fixed = site_dataset(slices, 4, shuffle_seed=1, repeat=True, drop_remainder=True)
    assert fixed.element_spec[0].shape.as_list() == [4, r, r, 1]
    take = lambda ds: np.concatenate([y for _, y in ds.take(5).as_numpy_iterator()])
    same = site_dataset(slices, 4, shuffle_seed=1, repeat=True, drop_remainder=True)
    np.testing.assert_array_equal(take(fixed), take(same))  # seeded shuffle is reproducible


# --- CLI, ensure_synthetic, atomic writes ------------------------------------------------------


def test_cli_synth_then_check_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    runner = CliRunner()
    args = ["--sites", 2, "--volumes-per-site", 4, "--seed", 7, "--shape", 32, 32, 16, "--json"]
    made = runner.invoke(cli, ["data", "synth", "--out", str(out), *map(str, args)])
    assert made.exit_code == 0, made.output
    summary = json.loads(made.stdout.strip().splitlines()[-1])
    assert summary["volumes"] == 8 and [s["name"] for s in summary["sites"]] == ["siteA", "siteB"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folder gone

    checked = runner.invoke(cli, ["data", "check", str(out), "--json"])
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout.strip().splitlines()[-1])
    assert report["totals"]["sites"] == 2 and report["totals"]["volumes"] == 8
    assert report["totals"]["split_volumes"] == {"train": 4, "val": 2, "test": 2}
    assert report["totals"]["slices"] == {"train": 64, "val": 32, "test": 32}
    site = report["sites"][1]
    assert site["orientations"] == ["LPS"] and site["shape"]["max"] == [32, 32, 16]
    names = {row["name"]: row["voxels"] for row in site["labels"]}
    assert names["liver"] > 0 and names["background"] > names["liver"]

    human = runner.invoke(cli, ["data", "check", str(out)])
    assert human.exit_code == 0 and "siteB" in human.stdout and "liver=" in human.stdout


def test_ensure_synthetic_builds_once(tmp_path: Path) -> None:
    small = SynthConfig(sites=2, volumes_per_site=1, shape=(16, 16, 8))
    cfg = DataConfig(root=str(tmp_path / "auto"), synth=small)
    root = ensure_synthetic(cfg)
    assert sorted(p.name for p in root.iterdir()) == ["siteA", "siteB"]
    stamp = (root / "siteA" / "dataset.json").stat().st_mtime_ns
    assert ensure_synthetic(cfg, root) == root
    assert (root / "siteA" / "dataset.json").stat().st_mtime_ns == stamp
    bigger = DataConfig(root=cfg.root, synth=SynthConfig(sites=2, volumes_per_site=3))
    with pytest.raises(UserError, match="2 sites x 1 volumes, but .* asks for 2 x 3"):
        ensure_synthetic(bigger)  # a stale set of another size is not silently reused


def test_staged_dir_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), staged_dir(tmp_path / "out") as tmp:
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# --- DICOM geometry (the example dataset's converter) ------------------------------------------


def _dicom_slice(pixels: np.ndarray, ipp, iop, spacing) -> bytes:
    import io

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = list(ipp), list(iop)
    ds.PixelSpacing = list(spacing)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


def test_dicom_series_affine_follows_the_patient_frame() -> None:
    """Voxel (i=column, j=row, k) lands where IPP/IOP/PixelSpacing put it (LPS -> RAS)."""
    from tff_privseg.data.example import dicom_series

    rows, cols = np.arange(4)[:, None], np.arange(3)[None, :]
    files = {}
    for n, z in enumerate([-10.0, -12.5, -7.5]):  # out of order on purpose
        hu = 100 * rows + 10 * cols + int(-4 * z)  # encodes row, column and slice
        files[f"s{n}"] = _dicom_slice(hu + 1024, (-50.0, 20.0, z), (1, 0, 0, 0, 1, 0), (0.8, 0.5))
    img = dicom_series(files)
    data = np.asanyarray(img.dataobj)
    assert data.shape == (3, 4, 3) and data.dtype == np.int16
    for i, j, k in [(0, 0, 0), (2, 3, 0), (1, 2, 2)]:
        z = -12.5 + 2.5 * k
        assert data[i, j, k] == 100 * j + 10 * i - 4 * z
        lps = np.array([-50.0 + 0.5 * i, 20.0 + 0.8 * j, z])
        np.testing.assert_allclose((img.affine @ [i, j, k, 1])[:3], lps * [-1, -1, 1])
