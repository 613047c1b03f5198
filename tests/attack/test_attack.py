"""Gradient inversion and membership audit on a tiny U-Net (16x16): fast, no TFF runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from tff_privseg import config as config_lib
from tff_privseg.attack import inversion as inv
from tff_privseg.attack.membership import membership_audit, threshold_attack
from tff_privseg.config import ModelConfig
from tff_privseg.data.slices import SiteData, SliceSet
from tff_privseg.losses import get_loss
from tff_privseg.models import build_model
from tff_privseg.privacy.dp_sgd import DpSgdSpec

R = 16
TINY = ModelConfig(name="unet", depth=2, base_filters=8, groups=2)


def phantom(res: int = R, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like slice: dark air, an elliptic body, a bright spot; and an organ mask."""
    yy, xx = np.mgrid[:res, :res] / res
    img = np.where((yy - 0.5) ** 2 / 0.16 + (xx - 0.5 - shift) ** 2 / 0.09 < 1, 0.5, 0.0)
    img = img + np.where((yy - 0.45) ** 2 + (xx - 0.4 - shift) ** 2 < 0.01, 0.5, 0.0)
    lab = ((yy - 0.55) ** 2 + (xx - 0.6 - shift) ** 2 < 0.04).astype(np.int32)
    return img[None, ..., None].astype(np.float32), lab[None]


@pytest.fixture(scope="module")
def tiny_model() -> tf.keras.Model:
    return build_model(TINY, R, 2, seed=0)


ATTACK = inv.InversionConfig(iterations=120, restarts=1, pyramid=2, seed=0)


def test_attack_recovers_image_from_plain_gradient(tiny_model):
    x, y = phantom()
    update = inv.site_gradient(tiny_model, "dice", x, y, dp=None, seed=0)
    rec = inv.reconstruct(tiny_model, "dice", update, ATTACK, labels=y)
    m = inv.evaluate(rec, x, y)
    assert rec.images.shape == x.shape
    assert rec.images.min() >= 0.0 and rec.images.max() <= 1.0
    assert m["mean_ssim"] > 0.6, m


def test_dp_sgd_defeats_the_attack(tiny_model):
    x, y = phantom()
    dp = DpSgdSpec(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=8.0)
    update = inv.site_gradient(tiny_model, "dice", x, y, dp=dp, seed=0)
    assert update.privacy == "sample"
    # The clipped signal has norm <= C / 8; the noise alone is ~ σC/8 · sqrt(#params).
    assert update.norm > 10 * (1.0 / 8.0)
    rec = inv.reconstruct(tiny_model, "dice", update, ATTACK, labels=y)
    m = inv.evaluate(rec, x, y)
    assert m["mean_ssim"] < 0.2, m


def test_reconstruction_is_deterministic_for_a_seed(tiny_model):
    x, y = phantom()
    update = inv.site_gradient(tiny_model, "dice", x, y, dp=None, seed=0)
    cfg = inv.InversionConfig(iterations=6, restarts=1, pyramid=1, labels="reconstruct", seed=3)
    a = inv.reconstruct(tiny_model, "dice", update, cfg)
    b = inv.reconstruct(tiny_model, "dice", update, cfg)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.label_probs, b.label_probs)
    assert a.restart_losses == b.restart_losses
    m = inv.evaluate(a, x, y)
    assert len(m["mask_dice"]) == 1 and 0.0 <= m["mask_dice"][0] <= 1.0


def test_delta_of_one_sgd_step_is_lr_times_the_gradient(tiny_model):
    """The delta path (the training's client_update) and the gradient path agree."""
    x, y = phantom()
    grad = inv.site_gradient(tiny_model, "dice", x, y, dp=None, seed=0)
    delta = inv.site_delta(
        lambda: build_model(TINY, R, 2, seed=0),
        tiny_model.get_weights(),
        "dice",
        x,
        y,
        dp=None,
        optimizer="sgd",
        learning_rate=0.5,
        local_steps=1,
        seed=0,
    )
    assert delta.kind == "delta" and delta.local_steps == 1
    for d, g in zip(delta.tensors, grad.tensors, strict=True):
        np.testing.assert_allclose(d, 0.5 * g, rtol=1e-4, atol=1e-7)


def test_dp_gradient_is_seeded_and_clipped(tiny_model):
    x, y = phantom()
    dp = DpSgdSpec(l2_norm_clip=1.0, noise_multiplier=1e-6, expected_batch_size=1.0)
    a = inv.site_gradient(tiny_model, "dice", x, y, dp=dp, seed=5)
    b = inv.site_gradient(tiny_model, "dice", x, y, dp=dp, seed=5)
    for u, v in zip(a.tensors, b.tensors, strict=True):
        np.testing.assert_array_equal(u, v)
    plain = inv.site_gradient(tiny_model, "dice", x, y, dp=None, seed=0)
    expected = min(1.0, plain.norm)  # batch 1: the clipped gradient, almost no noise
    assert a.norm == pytest.approx(expected, rel=1e-3)


def test_soft_label_loss_matches_training_loss_on_hard_labels():
    rng = np.random.default_rng(0)
    probs = tf.constant(rng.uniform(0.01, 0.99, (2, 8, 8, 1)), tf.float32)
    labels = rng.integers(0, 2, (2, 8, 8)).astype(np.int32)
    target = tf.constant(labels[..., None], tf.float32)
    for name in ("dice", "dice_ce"):
        np.testing.assert_allclose(
            inv.soft_label_loss(name, target, probs), get_loss(name)(labels, probs), rtol=1e-5
        )


def test_surrogate_mirrors_the_model(tiny_model):
    surrogate, beta = inv.smooth_surrogate(tiny_model)
    x, _ = phantom()
    beta.assign(1e4)  # β -> ∞: softplus(βz)/β -> relu, soft pool -> max pool
    np.testing.assert_allclose(surrogate(x), tiny_model(x), atol=1e-3)
    assert not any(isinstance(la, tf.keras.layers.ReLU) for la in surrogate.layers)


def _site(name: str, seed: int, n_train: int = 12, n_test: int = 6) -> SiteData:
    rng = np.random.default_rng(seed)

    def slices(n: int) -> SliceSet:
        if n == 0:
            return SliceSet.empty(R)
        imgs, labs = zip(*(phantom(shift=rng.uniform(-0.1, 0.1)) for _ in range(n)), strict=True)
        images = np.concatenate(imgs) + rng.normal(0, 0.02, (n, R, R, 1)).astype(np.float32)
        return SliceSet(
            np.clip(images, 0, 1).astype(np.float32),
            np.concatenate(labs).astype(np.uint8),
            np.zeros(n, np.int32),
            [],
        )

    return SiteData(name=name, train=slices(n_train), val=slices(2), test=slices(n_test - 2))


def test_membership_audit_gives_auc_per_site(tiny_model):
    sites = [_site("a", 0), _site("b", 1)]
    out = membership_audit(tiny_model, "dice", sites)
    assert set(out["sites"]) == {"a", "b"}
    for s in out["sites"].values():
        assert 0.0 <= s["auc"] <= 1.0 and 0.0 <= s["advantage"] <= 1.0
        assert s["n_train"] == 12 and s["n_held_out"] == 6
    assert 0.0 <= out["pooled"]["auc"] <= 1.0


def test_threshold_attack_separates_separable_losses():
    res = threshold_attack(np.array([0.1, 0.2, 0.15]), np.array([0.8, 0.9]))
    assert res["auc"] == pytest.approx(1.0) and res["advantage"] == pytest.approx(1.0)
    res = threshold_attack(np.array([0.5, 0.5]), np.array([0.5, 0.5]))
    assert res["auc"] == pytest.approx(0.5) and res["advantage"] == pytest.approx(0.0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model):
    """A run directory without training: config.toml, final weights, one checkpoint."""
    from tff_privseg.data.synth import write_synthetic_dataset

    root = tmp_path_factory.mktemp("attack")
    data = root / "data"
    write_synthetic_dataset(data, 2, 3, 0, (24, 24, 8))
    cfg = config_lib.from_dict(
        {
            "data": {"resolution": R, "crop_slices": 4, "test_fraction": 0.34},
            "model": {"name": "unet", "depth": 2, "base_filters": 8, "groups": 2},
            "train": {"batch_size": 4, "local_steps": 2},
        }
    )
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    config_lib.save(cfg, run / "config.toml")
    tiny_model.save_weights(run / "model.weights.h5")
    arrays = {f"s{i:05d}": v.numpy() for i, v in enumerate(tiny_model.trainable_variables)}
    np.savez(run / "checkpoints" / "round_000003.npz", **arrays)
    (run / "privacy.json").write_text(json.dumps({"epsilon": 1.5}))
    return run, data


def test_load_target_reads_checkpoints_and_rejects_missing_rounds(tiny_run, tiny_model):
    from tff_privseg.attack.run import load_target
    from tff_privseg.errors import UserError

    run, _ = tiny_run
    t = load_target(run, None, 3)
    assert t.round == 3
    for a, b in zip(t.model.trainable_variables, tiny_model.trainable_variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(UserError, match="no checkpoint for round 2"):
        load_target(run, None, 2)


def test_cli_attack_and_audit_json(tiny_run, tmp_path):
    from cli.main import cli

    run, data = tiny_run
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "attack", "--run", str(run), "--data", str(data), "--iterations", "4",
            "--restarts", "1", "--batch-size", "2", "--privacy", "sample",
            "--out", str(tmp_path / "atk"), "--quiet", "--json",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert set(out["results"]) == {"sample"}
    assert out["results"]["sample"]["noise_multiplier"] == 1.0
    assert out["batch_size"] == 2 and out["update"] == "gradient" and len(out["indices"]) == 2
    assert (tmp_path / "atk" / "attack.png").stat().st_size > 0
    assert json.loads((tmp_path / "atk" / "attack.json").read_text())["site"] == out["site"]

    res = runner.invoke(cli, ["audit", "--run", str(run), "--data", str(data), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["epsilon"] == 1.5
    assert all(0.0 <= s["auc"] <= 1.0 for s in out["sites"].values())

    res = runner.invoke(cli, ["attack", "--data", str(data), "--quiet"])
    assert res.exit_code == 2 and "--config" in res.output


def test_dp_params_refuses_multi_slice_patient_records():
    """The attack clips one slice per record: patient records of k > 1 slices are refused."""
    from tff_privseg.attack.run import dp_params
    from tff_privseg.errors import UserError

    def cfg(k: int):
        return config_lib.from_dict(
            {
                "train": {"batch_size": 24},
                "privacy": {"level": "sample", "unit": "patient", "slices_per_patient": k},
            }
        )

    params = dp_params(cfg(1))
    assert params.expected_batch_size == 24.0
    with pytest.raises(UserError, match="slices_per_patient"):
        dp_params(cfg(4))
