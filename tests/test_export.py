"""`export`: the SavedModel equals the Keras model (<= 1e-5) in a fresh TF-only process and
through saved_model_cli; metadata; any input size; atomic, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import nibabel as nib
import numpy as np
import pytest
from conftest import invoke, one_line_error

from tff_privseg import config as config_lib
from tff_privseg.config import Config
from tff_privseg.data.preprocess import resize_plane, scale_intensity

ROOT = Path(__file__).resolve().parents[1]
SAVED_MODEL_CLI = Path(sys.executable).with_name("saved_model_cli")
RES = 32

# Runs in a fresh interpreter: only tensorflow and numpy are imported.
FRESH = """
import sys
import numpy as np
import tensorflow as tf

serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
for name in sys.argv[2:]:
    out = serve(slices=tf.constant(np.load(name + ".npy")))
    np.save(name + ".probabilities.npy", out["probabilities"].numpy())
    np.save(name + ".mask.npy", out["mask"].numpy())
assert not [m for m in sys.modules if m.startswith(("tff_privseg", "cli"))]
print("ok")
"""


def make_cfg(scaling: str = "window") -> Config:
    return config_lib.from_dict(
        {
            "data": {"resolution": RES, "scaling": scaling},
            "model": {"name": "unet", "depth": 2, "base_filters": 4},
            "privacy": {"level": "sample", "noise_multiplier": 1.1, "delta": 1e-5},
        }
    )


def make_run(path: Path, cfg: Config, epsilon: float = 3.25):
    """A run directory as `train` leaves it (untrained, seeded model). Returns the model."""
    from tff_privseg.models import build_model

    path.mkdir(parents=True)
    config_lib.save(cfg, path / "config.toml")
    model = build_model(cfg.model, RES, cfg.data.num_classes, seed=1)
    model.save(path / "model.keras")
    privacy = {"level": cfg.privacy.level, "epsilon": epsilon, "delta": cfg.privacy.delta}
    privacy.update(accountant="rdp", noise_multiplier=1.1, l2_norm_clip=1.0, unit="slice")
    (path / "privacy.json").write_text(json.dumps(privacy))
    (path / "metrics.jsonl").write_text(json.dumps({"round": 4, "val_dice": 0.5}) + "\n")
    return model


def ct_slices(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Raw HU [B, H, W, 1]: air, soft tissue with structure, bone."""
    rng = np.random.default_rng(seed)
    b, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
    x = np.where(body, 40.0 + 80 * np.sin(xx / 3.0), -1000.0) + rng.normal(0, 30, (b, h, w))
    x[:, h // 2 - 2 : h // 2 + 2, w // 2 - 2 : w // 2 + 2] = 900.0
    return x[..., None].astype(np.float32)


def _resize(batch: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[B, H, W] -> [B, *size] with the training's resize (scipy zoom, linear)."""
    return np.moveaxis(resize_plane(np.moveaxis(batch, 0, 2), size, order=1), 2, 0)


def keras_reference(model, slices: np.ndarray, scaling: str = "window") -> np.ndarray:
    """Training pipeline in numpy/scipy (per-slice range for minmax) + Keras, resized back:
    raw HU [B, H, W, 1] -> probabilities [B, H, W, 1]."""
    h, w = slices.shape[1:3]
    x = np.stack([scale_intensity(s[..., 0], (-150.0, 200.0), scaling) for s in slices])
    x = np.clip(_resize(x, (RES, RES)), 0.0, 1.0)[..., None]
    probs = model.predict(x, verbose=0)
    return _resize(probs[..., 0], (h, w))[..., None]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """(run dir, Keras model, SavedModel dir) for a window-scaled binary run."""
    from tff_privseg.export import export

    base = tmp_path_factory.mktemp("export")
    model = make_run(base / "run", make_cfg())
    export(base / "run", base / "saved_models" / "m")
    return base / "run", model, base / "saved_models" / "m"


def test_fresh_process_and_saved_model_cli_equal_keras(exported, tmp_path: Path) -> None:
    run, model, saved = exported
    x = ct_slices((3, RES, RES), seed=0)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def start(*args: str, **kw: object) -> subprocess.Popen:
        return subprocess.Popen(args, stdout=PIPE, stderr=PIPE, text=True, env=env, **kw)

    signature = ("--dir", str(saved), "--tag_set", "serve", "--signature_def", "serving_default")
    procs = [  # three fresh processes at once (each mostly waits on importing TensorFlow)
        start(sys.executable, "-c", FRESH, str(saved), str(tmp_path / "x"), cwd=tmp_path),
        start(str(SAVED_MODEL_CLI), "show", *signature),
        start(
            str(SAVED_MODEL_CLI),
            "run",
            *signature,
            "--inputs",
            f"slices={tmp_path / 'x.npy'}",
            "--outdir",
            str(tmp_path / "cli_out"),
        ),
    ]
    results = [(p.communicate(timeout=240), p.returncode) for p in procs]
    for (_, err), code in results:
        assert code == 0, err[-3000:]
    assert results[0][0][0].strip().endswith("ok")
    show = results[1][0][0]
    for text in ("inputs['slices']", "(-1, -1, -1, 1)", "outputs['probabilities']", "DT_UINT8"):
        assert text in show, show

    expected = keras_reference(model, x)  # at R x R both resizes are the identity
    fresh = np.load(tmp_path / "x.probabilities.npy")
    via_cli = np.load(tmp_path / "cli_out" / "probabilities.npy")
    assert fresh.shape == expected.shape == (3, RES, RES, 1)
    np.testing.assert_allclose(fresh, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(via_cli, expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.load(tmp_path / "x.mask.npy"), expected[..., 0] >= 0.5)
    np.testing.assert_array_equal(np.load(tmp_path / "cli_out" / "mask.npy"), fresh[..., 0] >= 0.5)


def test_any_input_size_and_metadata(exported) -> None:
    import tensorflow as tf

    run, model, saved = exported
    serve = tf.saved_model.load(str(saved)).signatures["serving_default"]
    x = ct_slices((2, 45, 60), seed=1)  # not square, not the model's resolution
    out = serve(slices=tf.constant(x))
    assert out["probabilities"].shape == (2, 45, 60, 1) and out["mask"].dtype == tf.uint8
    # In-graph window + tf.image.resize == the training's numpy/scipy path, resized back.
    np.testing.assert_allclose(out["probabilities"].numpy(), keras_reference(model, x), atol=1e-4)

    meta = json.loads((saved / "metadata.json").read_text())
    cfg = config_lib.load(run / "config.toml")
    assert meta["config_hash"] == cfg.digest()
    assert meta["classes"]["1"].startswith("foreground") and meta["hu_window"] == [-150.0, 200.0]
    assert meta["resolution"] == RES and meta["model"]["name"] == "unet"
    assert meta["privacy"] == {
        "level": "sample",
        "epsilon": 3.25,
        "delta": 1e-5,
        "accountant": "rdp",
        "unit": "slice",
        "noise_multiplier": 1.1,
        "l2_norm_clip": 1.0,
    }
    assert meta["verified_max_abs_diff"] <= 1e-5 and meta["rounds"] == 4


def test_minmax_run_per_slice_and_volume_range(tmp_path: Path) -> None:
    import tensorflow as tf

    from tff_privseg.export import export

    model = make_run(tmp_path / "run", make_cfg("minmax"))
    result = export(tmp_path / "run", tmp_path / "sm")
    assert sorted(result["signatures"]) == ["serving_default", "serving_volume_range"]
    assert result["serving_scaling"]["serving_default"] == "minmax per slice"
    sigs = tf.saved_model.load(str(tmp_path / "sm")).signatures
    x = ct_slices((2, RES, RES), seed=2) * 0.1  # soft tissue only: range inside the window
    lo, hi = float(x.min()), float(x.max())
    ranged = sigs["serving_volume_range"](
        slices=tf.constant(x), hu_range=tf.constant([[lo, hi]] * 2, tf.float32)
    )["probabilities"].numpy()
    volume_scaled = np.clip((np.clip(x, -150, 200) - max(lo, -150)) / (min(hi, 200) - lo), 0, 1)
    expected = model.predict(volume_scaled, verbose=0)
    np.testing.assert_allclose(ranged, expected, atol=1e-5, rtol=0)
    per_slice = sigs["serving_default"](slices=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(per_slice, keras_reference(model, x, "minmax"), atol=1e-5, rtol=0)


def test_predict_with_saved_model_matches_run(exported, tmp_path: Path) -> None:
    run, _, saved = exported
    hu = np.moveaxis(ct_slices((5, 40, 36), seed=3)[..., 0], 0, 2)  # [X, Y, Z]
    affine = np.array([[-0.8, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    scan = tmp_path / "scan.nii.gz"  # LPS voxel order, as DICOM converters write
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), scan)
    for model_path, name in ((run, "run.nii.gz"), (saved, "sm.nii.gz")):
        result = invoke("predict", "--model", model_path, scan, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
    a, b = nib.load(tmp_path / "run.nii.gz"), nib.load(tmp_path / "sm.nii.gz")
    assert a.shape == b.shape == (40, 36, 5)
    assert np.allclose(a.affine, affine) and np.allclose(b.affine, affine)
    differ = np.mean(np.asarray(a.dataobj) != np.asarray(b.dataobj))
    assert differ <= 0.005, differ  # scipy vs tf.image.resize: at most a few threshold ties


def test_cli_atomic_force_and_errors(exported, tmp_path: Path) -> None:
    run, _, saved = exported
    before = (saved / "metadata.json").read_text()
    assert "--force" in one_line_error(invoke("export", "--run", run, "--out", saved))
    assert (saved / "metadata.json").read_text() == before  # untouched
    result = invoke("export", "--run", run, "--out", saved, "--force", "--json")
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout.strip().splitlines()[-1])
    assert meta["out"] == str(saved) and meta["verified_max_abs_diff"] <= 1e-5
    assert json.loads((saved / "metadata.json").read_text()) == {
        k: v for k, v in meta.items() if k != "out"
    }
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temp left

    assert "not found" in one_line_error(invoke("export", "--run", tmp_path / "no", "--out", "x"))
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.toml", "model.keras"):
        (partial / name).write_bytes((run / name).read_bytes())
    new = tmp_path / "new"
    err = one_line_error(invoke("export", "--run", partial, "--out", new))
    assert "incomplete run directory: no privacy.json" in err
    (partial / "privacy.json").write_text("{not json")
    assert "not readable JSON" in one_line_error(invoke("export", "--run", partial, "--out", new))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert "not empty" in one_line_error(invoke("export", "--run", run, "--out", foreign))
    assert not new.exists() and (foreign / "keep.txt").read_text() == "mine"
