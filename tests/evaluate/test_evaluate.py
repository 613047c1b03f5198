"""`evaluate` and `predict`: masks on the source grid, metrics, CLI contract, bad input.

The run directory is built directly (config.toml + a freshly built model.keras + privacy.json),
the way `train` leaves it, so no TFF is involved. Resolution = the synthetic scans' in-plane
size (48), so a perfect model must reproduce the source label voxel for voxel.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import invoke, last_json, one_line_error

from tff_privseg import config as config_lib
from tff_privseg.config import Config
from tff_privseg.data import load_sites
from tff_privseg.data.synth import write_synthetic_dataset
from tff_privseg.metrics import pooled_dice

SHAPE = (48, 48, 12)


def make_cfg(root: Path) -> Config:
    return config_lib.from_dict(
        {
            "data": {"root": str(root), "resolution": 48, "crop_slices": 8},
            "model": {"name": "unet", "depth": 2, "base_filters": 4},
            "privacy": {"level": "sample", "noise_multiplier": 1.1, "l2_norm_clip": 1.0},
        }
    )


def make_run(path: Path, cfg: Config, epsilon: float | None = 2.5) -> None:
    """A run directory as `train` writes it, with an untrained (seeded) model."""
    from tff_privseg.models import build_model

    path.mkdir(parents=True)
    config_lib.save(cfg, path / "config.toml")
    build_model(cfg.model, cfg.data.resolution, cfg.data.num_classes, seed=0).save(
        path / "model.keras"
    )
    p = cfg.privacy
    privacy = {
        "level": p.level,
        "accountant": p.accountant,
        "noise_multiplier": p.noise_multiplier,
        "l2_norm_clip": p.l2_norm_clip,
        "delta": p.delta,
        "unit": "slice",
        "units": {},
        "epsilon": epsilon,
    }
    (path / "privacy.json").write_text(json.dumps(privacy))
    row = {"round": 1, "val_dice": 0.2, "epsilon": epsilon, "delta": p.delta}  # DP: no loss
    (path / "metrics.jsonl").write_text(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "sites"  # sites RAS, LPS and RAI on disk
    write_synthetic_dataset(root, sites=3, volumes_per_site=3, seed=3, shape=SHAPE)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    path = tmp_path_factory.mktemp("runs") / "run"
    make_run(path, make_cfg(data))
    return path


def oracle(cfg: Config, root: Path):
    """A 'perfect model': returns each slice's own label as its probability."""
    table = {}
    for site in load_sites(cfg.data, root):
        for split in (site.train, site.val, site.test):
            for image, label in zip(split.images, split.labels, strict=True):
                table[hashlib.sha1(image.tobytes()).hexdigest()] = label
    return lambda images: np.stack(
        [table[hashlib.sha1(im.tobytes()).hexdigest()] for im in images]
    ).astype(np.float32)[..., None]


def test_perfect_model_reproduces_labels_on_source_grid(
    run_dir: Path, data: Path, tmp_path: Path
) -> None:
    from tff_privseg.evaluate import evaluate

    cfg = make_cfg(data)
    out = tmp_path / "ev"
    result = evaluate(run_dir, data, out=out, overlays=1, predict_fn=oracle(cfg, data))
    assert result["dice"] == 1.0 and result["iou"] == 1.0 and result["hd95_median_mm"] == 0.0
    assert result["pooled_slice_dice"] == pytest.approx(1.0)
    assert len(result["volumes"]) == 3  # one test volume per site
    orientations = set()
    for vol in result["volumes"]:
        src = nib.load(vol["image"])
        mask = nib.load(out / vol["mask"])
        orientations.add(nib.aff2axcodes(src.affine))
        assert mask.shape == src.shape
        np.testing.assert_allclose(mask.affine, src.affine, atol=1e-6)
        assert mask.get_data_dtype() == np.uint8
        label = np.isin(np.asarray(nib.load(vol["label"]).dataobj), [1, 2])
        got = np.asarray(mask.dataobj)
        # Inside the evaluated slab the mask IS the label; outside it is 0.
        start, stop = vol["slab"]
        canon_got = np.asarray(nib.as_closest_canonical(mask).dataobj)
        canon_label = np.asarray(
            nib.as_closest_canonical(nib.Nifti1Image(label.astype(np.uint8), src.affine)).dataobj
        )
        np.testing.assert_array_equal(canon_got[:, :, start:stop], canon_label[:, :, start:stop])
        assert not canon_got[:, :, :start].any() and not canon_got[:, :, stop:].any()
        assert got.sum() > 0 and vol["classes"]["1"]["hd95_mm"] == 0.0
    assert orientations == {("R", "A", "S"), ("L", "P", "S"), ("R", "A", "I")}
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["dice"] == 1.0 and saved["out"] == str(out)


def test_mask_on_grid_matches_slices_to_volume(data: Path) -> None:
    """At a resolution != the scans' size: resize, z placement and reorientation agree with
    data.slices_to_volume (the data layer's inverse of preprocessing)."""
    from tff_privseg.data import slices_to_volume
    from tff_privseg.evaluate import mask_on_grid

    cfg = make_cfg(data).replace(**{"data.resolution": 32})
    for site in load_sites(cfg.data, data):
        s = site.test
        for i, info in enumerate(s.volumes):
            labels = s.labels[s.volume_slices(i)].astype(np.float32)
            got = mask_on_grid(labels[..., None], info)
            want = slices_to_volume(labels, info, order=1) >= 0.5
            assert got.shape == info.shape and got.dtype == np.uint8
            np.testing.assert_array_equal(got, want)
            assert 0 < got.sum() < got.size


def test_evaluate_cli(run_dir: Path, data: Path, tmp_path: Path) -> None:
    import tensorflow as tf

    out = tmp_path / "ev"
    result = last_json(
        invoke("evaluate", "--run", run_dir, "--data", data, "--out", out, "--json", "--quiet")
    )
    assert json.loads((out / "evaluation.json").read_text()) == result
    assert [s["site"] for s in result["sites"]] == ["siteA", "siteB", "siteC"]
    for key in ("dice", "iou", "hd95_median_mm", "pooled_slice_dice", "overall", "volumes"):
        assert key in result
    assert "baseline" in result["notes"]["pooled_slice_dice"]
    vol = result["volumes"][0]
    assert set(vol["classes"]["1"]) == {"dice", "iou", "hd95_mm"}
    assert nib.load(out / vol["mask"]).shape == nib.load(vol["image"]).shape
    for site in result["sites"]:
        png = (out / site["overlay"]).read_bytes()
        assert png.startswith(b"\x89PNG")
    # The labelled baseline number is metrics.pooled_dice of the model on the site's slices.
    model = tf.keras.models.load_model(run_dir / "model.keras", compile=False)
    site_a = load_sites(make_cfg(data).data, data)[0]
    expected = pooled_dice(model.predict(site_a.test.images, verbose=0), site_a.test.labels)
    assert result["sites"][0]["pooled_slice_dice"] == pytest.approx(expected, abs=1e-9)
    # Human table; a second evaluation replaces the first (same marker file).
    text = invoke(
        "evaluate", "--run", run_dir, "--data", data, "--out", out, "--quiet", "--overlays", "0"
    )
    assert text.exit_code == 0 and "pooled slice Dice" in text.stdout and "overall" in text.stdout


def test_predict_file_and_folder(run_dir: Path, data: Path, tmp_path: Path) -> None:
    scan = sorted((data / "siteB" / "imagesTr").iterdir())[0]  # LPS on disk
    out = tmp_path / "masks" / "one.nii.gz"
    result = last_json(invoke("predict", "--model", run_dir, scan, "--out", out, "--json"))
    assert result["model_kind"] == "run" and result["predictions"][0]["mask"] == str(out)
    src, mask = nib.load(scan), nib.load(out)
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine, atol=1e-6)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}

    folder = tmp_path / "folder"
    result = last_json(
        invoke(
            "predict", "--model", run_dir, data / "siteC" / "imagesTr", "--out", folder, "--json"
        )
    )
    assert len(result["predictions"]) == 3
    assert sorted(p.name for p in folder.iterdir()) == [
        "predictions.json",
        "siteC_case000.nii.gz",
        "siteC_case001.nii.gz",
        "siteC_case002.nii.gz",
    ]


def test_bad_input_one_line_nothing_written(run_dir: Path, data: Path, tmp_path: Path) -> None:
    scan = sorted((data / "siteA" / "imagesTr").iterdir())[0]
    out = tmp_path / "out"

    err = one_line_error(
        invoke("evaluate", "--run", tmp_path / "nope", "--data", data, "--out", out)
    )
    assert "run directory not found" in err
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.toml").write_text((run_dir / "config.toml").read_text())
    err = one_line_error(invoke("evaluate", "--run", incomplete, "--data", data, "--out", out))
    assert "incomplete run directory: no model.keras" in err
    (incomplete / "model.keras").write_bytes(b"not a zip")
    err = one_line_error(invoke("predict", "--model", incomplete, scan, "--out", out / "m.nii.gz"))
    assert "cannot load the Keras model" in err
    err = one_line_error(
        invoke("evaluate", "--run", run_dir, "--data", tmp_path / "nodata", "--out", out)
    )
    assert "nodata" in err

    # Scans: unreadable, wrong channel count, 2D.
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"\x1f\x8b this is not gzip")
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    rgb = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4, 3), np.float32), affine), rgb)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), affine), flat)
    for bad, words in [
        (garbage, "not a readable NIfTI"),
        (rgb, "3 channels"),
        (flat, "expected a 3D volume"),
    ]:
        err = one_line_error(invoke("predict", "--model", run_dir, bad, "--out", out / "m.nii.gz"))
        assert words in err and bad.name in err
    err = one_line_error(invoke("predict", "--model", tmp_path / "x", scan, "--out", out / "m.nii"))
    assert "model not found" in err

    # A folder with one bad scan among good ones: no output folder at all.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / scan.name).write_bytes(scan.read_bytes())
    (mixed / "rgb.nii.gz").write_bytes(rgb.read_bytes())
    one_line_error(invoke("predict", "--model", run_dir, mixed, "--out", out / "folder"))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers

    # An existing folder that is not an earlier evaluation is never touched.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    err = one_line_error(
        invoke("evaluate", "--run", run_dir, "--data", data, "--out", foreign, "--quiet")
    )
    assert "not empty" in err and (foreign / "keep.txt").read_text() == "mine"
