"""Gradient inversion against what a site sends: rebuild CT slices from an update.

The update is computed with the training code itself (``dp_sgd.plain_gradient`` /
``dp_sgd.dp_gradient`` for one step, ``federated.client.build_client_update`` for the model delta
after k local steps), so DP clipping and noise are exactly what training releases.

The reconstruction follows Geiping et al. 2020 ("Inverting Gradients"): dummy images in [0, 1]
(sigmoid box constraint) and, optionally, dummy segmentation logits are optimised with Adam on
signed gradients so that the dummy's gradient matches the observed one in cosine distance
(or L2, as in DLG), plus a total-variation prior; several restarts, the best kept by its
gradient loss. Two additions make it work on a GroupNorm/ReLU U-Net in a few hundred steps:

* A smooth surrogate. The weight gradient of a ReLU network is a *discontinuous* function of the
  input (it holds relu'(z), a step, and max-pool argmaxes), so the matching loss is piecewise
  smooth with jumps and autodiff sees only the smooth pieces (measured: finite differences of
  the cosine loss at a noisy copy of the slice disagree with autodiff in sign and magnitude).
  The attacker therefore differentiates a copy of the model in which ReLU is softplus(βz)/β and
  2x2 max-pooling a softmax(β)-weighted pool, with β annealed geometrically from
  ``smooth_start`` to ``smooth_end`` (a homotopy towards the real network). The observed update
  is always the real model's; restarts are ranked with the real model.
* A multi-scale image parameter: the logit image is a full-resolution map plus bilinearly
  upsampled maps at R/2, R/4, R/8 (``pyramid`` levels), which lets sign-Adam move large smooth
  regions first.

Scale: conv (no bias) -> GroupNorm makes the network almost blind to the image's contrast
(the gradients of 0.5·x and of x are almost parallel), so the reconstruction's intensity
scale is set by the sigmoid box and the TV prior, not by the gradient.

Restarts are vectorised at the graph level: all restarts are independent sub-graphs of one
``tf.function`` step (TF runs them concurrently). A pfor ``vectorized_map`` over restarts was
measured slower on CPU: pfor has no rule for ``Conv2DBackpropFilter`` and loops.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import tensorflow as tf

from tff_privseg.losses import cross_entropy_of, get_loss, soft_dice_of
from tff_privseg.privacy.dp_sgd import DpSgdSpec, dp_gradient, plain_gradient

# --------------------------------------------------------------------------------------------
# What a site sends.


@dataclass
class SiteUpdate:
    """One released update: a gradient (one step) or a model delta (k local steps).

    ``tensors`` follow ``model.trainable_variables``; a delta is ``initial - trained`` (TFF's
    convention, so it points along the gradient).
    """

    kind: Literal["gradient", "delta"]
    tensors: list[np.ndarray]
    privacy: Literal["none", "sample"]
    batch_size: int
    local_steps: int = 1
    optimizer: str = "sgd"
    learning_rate: float = 1.0
    dp: DpSgdSpec | None = None

    @classmethod
    def released(
        cls,
        kind: Literal["gradient", "delta"],
        tensors: Sequence[tf.Tensor],
        batch_size: int,
        dp: DpSgdSpec | None,
        **training: int | float | str,
    ) -> SiteUpdate:
        """The update of ``kind`` made of ``tensors``; ``training``: how a delta was trained."""
        return cls(
            kind=kind,
            tensors=[np.asarray(t) for t in tensors],
            privacy="none" if dp is None else "sample",
            batch_size=batch_size,
            dp=dp,
            **training,
        )

    @property
    def norm(self) -> float:
        return float(math.sqrt(sum(float(np.sum(np.square(t))) for t in self.tensors)))


def site_gradient(
    model: tf.keras.Model,
    loss_name: str,
    images: np.ndarray,
    labels: np.ndarray,
    dp: DpSgdSpec | None,
    seed: int,
) -> SiteUpdate:
    """The gradient one training step releases for this batch (plain, or DP-SGD).

    DP: ``dp_gradient`` with ``dp.query(seed)``: per-example clipping to C, Gaussian noise
    N(0, (σC)²) on the sum, division by the expected batch size; the noise seed stands for the
    site's secret seed (the attacker does not know it).
    """
    loss_fn = get_loss(loss_name)
    x = tf.constant(images, tf.float32)
    y = tf.constant(labels, tf.int32)
    if dp is None:
        grads, _ = plain_gradient(model, loss_fn, x, y)
    else:
        query = dp.query(_seed_pair(seed))
        grads, _ = dp_gradient(model, loss_fn, x, y, query, dp.expected_batch_size)
    return SiteUpdate.released("gradient", grads, len(images), dp)


def site_delta(
    model_fn: Callable[[], tf.keras.Model],
    weights: Sequence[np.ndarray],
    loss_name: str,
    images: np.ndarray,
    labels: np.ndarray,
    dp: DpSgdSpec | None,
    optimizer: str,
    learning_rate: float,
    local_steps: int,
    seed: int,
) -> SiteUpdate:
    """The model delta a site sends after ``local_steps`` local steps on this batch.

    Runs the training code's own ``client_update`` (eagerly, no TFF runtime) with the run's
    client optimizer; every step uses the same slices (the site's data is this batch: the
    attacker's best case), DP-SGD noise seeded per step from ``seed`` as in training.
    """
    from tff_privseg.federated.client import build_client_update
    from tff_privseg.federated.process import tff_optimizer
    from tff_privseg.federated.sampling import batches_dataset

    update = build_client_update(
        model_fn, get_loss(loss_name), tff_optimizer(optimizer, learning_rate), dp
    )
    index = np.arange(len(images))
    data = batches_dataset(images, labels, [index] * local_steps)
    initial = [tf.constant(w) for w in weights]
    delta, _, _ = update(initial, data, tf.constant(_seed_pair(seed), tf.int64))
    return SiteUpdate.released(
        "delta",
        delta,
        len(images),
        dp,
        local_steps=local_steps,
        optimizer=optimizer,
        learning_rate=learning_rate,
    )


def _seed_pair(seed: int) -> np.ndarray:
    return np.random.default_rng([int(seed), 7]).integers(0, 2**62, size=2, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# The attack.


@dataclass(frozen=True)
class InversionConfig:
    iterations: int = 3000  # Adam steps; what more steps buy: docs/attack.md
    restarts: int = 2
    lr: float = 0.1  # Adam step on the image logits (signed gradients: the step per pixel)
    lr_schedule: Literal["step", "cosine", "cycles", "constant"] = "step"
    tv_weight: float = 0.1
    distance: Literal["cosine", "l2"] = "cosine"
    # Per-variable weights in the distance: "equal", or "linear" (first variable 1, last 1/L;
    # Geiping et al.'s option to favour the layers nearest the input).
    layer_weights: Literal["equal", "linear"] = "equal"
    signed: bool = True
    labels: Literal["known", "reconstruct"] = "known"
    box: Literal["sigmoid", "clip"] = "sigmoid"
    # "minmax": each dummy image is rescaled to span [0, 1]. The gradient is blind to contrast,
    # and the TV prior alone then shrinks it; windowed CT slices contain air (0) and bone (1).
    intensity: Literal["free", "minmax"] = "minmax"
    pyramid: int = 3  # extra coarse levels at R/2 .. R/2**pyramid (0: one full-res map)
    smooth_start: float = 2.0  # surrogate β at the first step; 0: attack the ReLU model itself
    smooth_end: float = 50.0  # β at the last step
    smooth_until: float = 1.0  # fraction of the iterations after which β stays at smooth_end
    # How a delta is matched: "gradient" treats it as one gradient (exact for one SGD step);
    # "softsign" compares g/(|g| + ε·rms(g)) per variable: the shape of an Adam step (whose
    # first step is lr·g/(|g| + 1e-7) ≈ lr·sign(g)). "auto": softsign for Adam deltas.
    delta_match: Literal["auto", "gradient", "softsign"] = "auto"
    softsign_eps: float = 0.5  # softsign: g / (|g| + softsign_eps · rms(g)) per variable
    init_scale: float = 0.1  # std of the initial logits (noise around init_mean)
    init_mean: float = 0.5  # initial intensity of the dummy images
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Reconstruction:
    images: np.ndarray  # [B, R, R, 1] in [0, 1], the best restart
    label_probs: np.ndarray | None  # [B, R, R, C'] soft labels (labels="reconstruct")
    restart_losses: list[float]  # gradient loss of each restart on the real model
    best_restart: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    restart_images: np.ndarray | None = None  # [K, B, R, R, 1], every restart's result


def smooth_surrogate(model: tf.keras.Model) -> tuple[tf.keras.Model, tf.Variable]:
    """A copy of ``model`` with ReLU -> softplus(βz)/β and 2x2 max-pool -> softmax(βz)-pool.

    Dropout layers become the identity (their expectation). Same weights, same variable order.
    Returns the copy and its β variable.
    """
    beta = tf.Variable(10.0, trainable=False, dtype=tf.float32, name="surrogate_beta")

    def soft_relu(z: tf.Tensor) -> tf.Tensor:
        return tf.nn.softplus(beta * z) / beta

    def soft_pool(z: tf.Tensor) -> tf.Tensor:
        h, w, c = z.shape[1], z.shape[2], z.shape[3]
        t = tf.reshape(z, [-1, h // 2, 2, w // 2, 2, c])
        t = tf.reshape(tf.transpose(t, [0, 1, 3, 5, 2, 4]), [-1, h // 2, w // 2, c, 4])
        return tf.reduce_sum(tf.nn.softmax(beta * t, axis=-1) * t, axis=-1)

    def clone(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        cfg = layer.get_config()
        if isinstance(layer, tf.keras.layers.ReLU) and _plain_relu(cfg):
            return tf.keras.layers.Lambda(soft_relu, name=layer.name)
        if isinstance(layer, tf.keras.layers.Activation) and cfg.get("activation") == "relu":
            return tf.keras.layers.Lambda(soft_relu, name=layer.name)
        if isinstance(layer, tf.keras.layers.MaxPool2D) and _pool_2x2(cfg):
            return tf.keras.layers.Lambda(soft_pool, name=layer.name)
        if isinstance(layer, tf.keras.layers.Dropout | tf.keras.layers.SpatialDropout2D):
            return tf.keras.layers.Lambda(tf.identity, name=layer.name)
        return layer.__class__.from_config(cfg)

    copy = tf.keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    if [v.shape for v in copy.trainable_variables] != [v.shape for v in model.trainable_variables]:
        raise ValueError("surrogate model does not mirror the model's variables")
    return copy, beta


def _plain_relu(cfg: dict) -> bool:
    return (
        cfg.get("max_value") is None and not cfg.get("negative_slope") and not cfg.get("threshold")
    )


def _pool_2x2(cfg: dict) -> bool:
    return (
        tuple(cfg.get("pool_size", ())) == (2, 2)
        and tuple(cfg.get("strides") or (2, 2)) == (2, 2)
        and cfg.get("padding", "valid") == "valid"
    )


def soft_label_loss(loss_name: str, target: tf.Tensor, y_prob: tf.Tensor) -> tf.Tensor:
    """``get_loss(loss_name)`` with soft targets [B, H, W, C] (C = probs' channels), [B].

    Equal to the training loss when ``target`` is one-hot (binary: the foreground map).
    """
    y_prob = tf.cast(y_prob, tf.float32)
    loss = soft_dice_of(target, y_prob)
    if loss_name == "dice":
        return loss
    return loss + cross_entropy_of(target, y_prob)


def total_variation(img: tf.Tensor) -> tf.Tensor:
    """Mean absolute difference of neighbouring pixels (both axes), per image stack."""
    dy = tf.reduce_mean(tf.abs(img[:, 1:] - img[:, :-1]))
    dx = tf.reduce_mean(tf.abs(img[:, :, 1:] - img[:, :, :-1]))
    return dx + dy


def _match_transform(update: SiteUpdate, cfg: InversionConfig) -> Callable[[tf.Tensor], tf.Tensor]:
    mode = cfg.delta_match
    if mode == "auto":
        mode = "softsign" if update.kind == "delta" and update.optimizer == "adam" else "gradient"
    if mode == "gradient":
        return tf.identity

    def softsign(g: tf.Tensor) -> tf.Tensor:
        rms = tf.sqrt(tf.reduce_mean(tf.square(g)) + 1e-30)
        return g / (tf.abs(g) + cfg.softsign_eps * rms)

    return softsign


def gradient_distance(
    grads: Sequence[tf.Tensor],
    target: Sequence[tf.Tensor],
    distance: str,
    scale: float = 1.0,
    weights: Sequence[float] | None = None,
) -> tf.Tensor:
    """1 - cos(g, t) over all variables (Geiping), or Σ‖scale·g - t‖² (DLG); optionally with
    per-variable weights w (cosine of the w-weighted inner product)."""
    w = list(weights) if weights is not None else [1.0] * len(grads)
    pairs = list(zip(grads, target, w, strict=True))
    if distance == "cosine":
        dot = tf.add_n([c * tf.reduce_sum(g * t) for g, t, c in pairs])
        gg = tf.add_n([c * tf.reduce_sum(tf.square(g)) for g, _, c in pairs])
        tt = tf.add_n([c * tf.reduce_sum(tf.square(t)) for _, t, c in pairs])
        return 1.0 - dot / (tf.sqrt(gg) * tf.sqrt(tt) + 1e-20)
    return tf.add_n([c * tf.reduce_sum(tf.square(scale * g - t)) for g, t, c in pairs])


def _l2_scale(update: SiteUpdate) -> float:
    """What the dummy gradient is multiplied by before an L2 comparison with the update."""
    if update.kind == "delta":
        return update.learning_rate * update.local_steps
    return 1.0


def reconstruct(
    model: tf.keras.Model,
    loss_name: str,
    update: SiteUpdate,
    cfg: InversionConfig,
    labels: np.ndarray | None = None,
    num_label_channels: int = 1,
    progress: Callable[[int, dict], None] | None = None,
) -> Reconstruction:
    """Rebuild the ``update.batch_size`` slices behind ``update``.

    Args:
      model: the model at the weights the update was computed from.
      labels: int [B, R, R] true masks when ``cfg.labels == "known"``.
      num_label_channels: probability channels of the model (1 = binary sigmoid).
      progress: called as ``progress(iterations_done, info)`` every few iterations.
    """
    if cfg.labels == "known" and labels is None:
        raise ValueError("labels='known' needs the true labels")
    t0 = time.perf_counter()
    res = int(model.input_shape[1])
    batch, restarts = update.batch_size, max(1, cfg.restarts)
    target = [tf.constant(t, tf.float32) for t in update.tensors]
    transform = _match_transform(update, cfg)
    scale = _l2_scale(update)
    n_vars = len(target)
    weights = None
    if cfg.layer_weights == "linear":
        weights = [(n_vars - i) / n_vars for i in range(n_vars)]
    smooth = cfg.smooth_start > 0
    attack_model, beta = smooth_surrogate(model) if smooth else (model, None)
    variables = attack_model.trainable_variables

    gen = np.random.default_rng([cfg.seed, 11])
    levels = [res // 2**i for i in range(1, cfg.pyramid + 1) if res // 2**i >= 2]
    params = []  # per restart: [full-res logits, *coarse levels, (label logits)]
    for _ in range(restarts):
        init = cfg.init_scale * gen.standard_normal((batch, res, res, 1))
        if cfg.box == "clip":
            init = np.clip(cfg.init_mean + init, 0.0, 1.0)
        else:
            m = min(max(cfg.init_mean, 1e-3), 1 - 1e-3)
            init = init + math.log(m / (1 - m))
        vs = [tf.Variable(init.astype(np.float32))]
        vs += [tf.Variable(tf.zeros([batch, r, r, 1])) for r in levels]
        if cfg.labels == "reconstruct":
            lab = cfg.init_scale * gen.standard_normal((batch, res, res, num_label_channels))
            vs.append(tf.Variable(lab.astype(np.float32)))
        params.append(vs)
    flat_params = [v for vs in params for v in vs]
    nlev = len(levels)

    def image_of(vs: list[tf.Variable]) -> tf.Tensor:
        u = vs[0]
        for v in vs[1 : 1 + nlev]:
            u = u + tf.image.resize(v, [res, res], "bilinear")
        img = tf.sigmoid(u) if cfg.box == "sigmoid" else tf.clip_by_value(u, 0.0, 1.0)
        if cfg.intensity == "minmax":
            lo = tf.reduce_min(img, axis=[1, 2, 3], keepdims=True)
            hi = tf.reduce_max(img, axis=[1, 2, 3], keepdims=True)
            img = (img - lo) / (hi - lo + 1e-6)
        return img

    def soft_labels_of(vs: list[tf.Variable]) -> tf.Tensor:
        logits = vs[-1]
        return tf.sigmoid(logits) if num_label_channels == 1 else tf.nn.softmax(logits)

    y_known = None if labels is None else tf.constant(labels, tf.int32)
    train_loss = get_loss(loss_name)

    def objective(net: tf.keras.Model, vs: list[tf.Variable], net_vars) -> tf.Tensor:
        img = image_of(vs)
        with tf.GradientTape() as inner:
            probs = net(img, training=True)
            if cfg.labels == "known":
                per_example = train_loss(y_known, probs)
            else:
                per_example = soft_label_loss(loss_name, soft_labels_of(vs), probs)
            loss = tf.reduce_mean(per_example)
        grads = inner.gradient(loss, net_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        grads = [transform(g) for g in grads]
        dist = gradient_distance(grads, target, cfg.distance, scale, weights)
        return dist + cfg.tv_weight * total_variation(img)

    # Adam, written out: the step size and β change every iteration from Python.
    m_slots = [tf.Variable(tf.zeros_like(v)) for v in flat_params]
    v_slots = [tf.Variable(tf.zeros_like(v)) for v in flat_params]
    b1, b2, eps = 0.9, 0.999, 1e-8

    @tf.function
    def step(beta_value: tf.Tensor, lr: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        if beta is not None:
            beta.assign(beta_value)
        with tf.GradientTape() as tape:
            losses = [objective(attack_model, vs, variables) for vs in params]
            total = tf.add_n(losses)
        grads = tape.gradient(total, flat_params)
        for g, p, m, v in zip(grads, flat_params, m_slots, v_slots, strict=True):
            if cfg.signed:
                g = tf.sign(g)
            m.assign(b1 * m + (1 - b1) * g)
            v.assign(b2 * v + (1 - b2) * tf.square(g))
            m_hat = m / (1 - tf.pow(b1, t))
            v_hat = v / (1 - tf.pow(b2, t))
            p.assign_sub(lr * m_hat / (tf.sqrt(v_hat) + eps))
        if cfg.box == "clip":
            for vs in params:
                vs[0].assign(tf.clip_by_value(vs[0], 0.0, 1.0))
        return tf.stack(losses)

    history = []
    report_every = max(1, cfg.iterations // 20)
    for i in range(cfg.iterations):
        b = _beta_at(cfg, i) if smooth else 0.0
        losses = step(
            tf.constant(b, tf.float32),
            tf.constant(_lr_at(cfg, i), tf.float32),
            tf.constant(i + 1, tf.float32),
        )
        if progress is not None and ((i + 1) % report_every == 0 or i + 1 == cfg.iterations):
            info = {"iteration": i + 1, "loss": float(tf.reduce_min(losses)), "beta": b}
            history.append(info)
            progress(i + 1, info)

    # Rank the restarts on the real model (not the surrogate): the attacker's only evidence.
    final = [float(objective(model, vs, model.trainable_variables)) for vs in params]
    best = int(np.argmin(final))
    label_probs = None
    if cfg.labels == "reconstruct":
        label_probs = soft_labels_of(params[best]).numpy()
    return Reconstruction(
        images=image_of(params[best]).numpy(),
        label_probs=label_probs,
        restart_losses=final,
        best_restart=best,
        seconds=time.perf_counter() - t0,
        history=history,
        restart_images=np.stack([image_of(vs).numpy() for vs in params]),
    )


def _lr_at(cfg: InversionConfig, i: int) -> float:
    n = max(1, cfg.iterations)
    if cfg.lr_schedule == "step":  # Geiping et al.: x0.1 at 3/8, 5/8 and 7/8 of the run
        return cfg.lr * 0.1 ** sum(i >= int(n * f) for f in (3 / 8, 5 / 8, 7 / 8))
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * i / n))
    if cfg.lr_schedule == "cycles":  # three cosine cycles (warm restarts)
        c = n / 3
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (i % c) / c))
    return cfg.lr


def _beta_at(cfg: InversionConfig, i: int) -> float:
    frac = min(1.0, i / max(1.0, cfg.smooth_until * (cfg.iterations - 1)))
    return float(cfg.smooth_start * (cfg.smooth_end / cfg.smooth_start) ** frac)


# --------------------------------------------------------------------------------------------
# Metrics.


def match_order(recon: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Permutation p minimising Σ MSE(recon[p[i]], original[i]) (a batch comes back unordered)."""
    from scipy.optimize import linear_sum_assignment

    b = len(original)
    cost = np.array(
        [[float(np.mean((recon[j] - original[i]) ** 2)) for j in range(b)] for i in range(b)]
    )
    _, cols = linear_sum_assignment(cost)
    return cols


def image_metrics(recon: np.ndarray, original: np.ndarray) -> dict[str, list[float]]:
    """SSIM (tf.image.ssim), PSNR (dB) and MSE per image; images [B, R, R, 1] in [0, 1]."""
    r = tf.constant(recon, tf.float32)
    o = tf.constant(original, tf.float32)
    filter_size = min(11, int(original.shape[1]))
    ssim = tf.image.ssim(r, o, max_val=1.0, filter_size=filter_size)
    psnr = tf.image.psnr(r, o, max_val=1.0)
    mse = tf.reduce_mean(tf.square(r - o), axis=[1, 2, 3])
    return {
        "ssim": [float(v) for v in ssim.numpy()],
        "psnr": [float(v) for v in psnr.numpy()],
        "mse": [float(v) for v in mse.numpy()],
    }


def label_masks(label_probs: np.ndarray) -> np.ndarray:
    """Hard masks [B, R, R] from soft labels (binary: p > 0.5; multiclass: argmax)."""
    if label_probs.shape[-1] == 1:
        return (label_probs[..., 0] > 0.5).astype(np.uint8)
    return np.argmax(label_probs, axis=-1).astype(np.uint8)


def evaluate(
    rec: Reconstruction, original: np.ndarray, labels: np.ndarray | None = None
) -> dict[str, object]:
    """Metrics of the best restart against the originals, after matching the batch order."""
    from tff_privseg.metrics import dice

    order = match_order(rec.images, original)
    images = rec.images[order]
    out: dict[str, object] = image_metrics(images, original)
    out["order"] = [int(i) for i in order]
    if rec.label_probs is not None and labels is not None:
        masks = label_masks(rec.label_probs[order])
        out["mask_dice"] = [float(dice(m > 0, t > 0)) for m, t in zip(masks, labels, strict=True)]
    for key in ("ssim", "psnr", "mse", "mask_dice"):
        if key in out:
            out[f"mean_{key}"] = float(np.mean(out[key]))
    return out


__all__ = [
    "InversionConfig",
    "Reconstruction",
    "SiteUpdate",
    "evaluate",
    "gradient_distance",
    "image_metrics",
    "label_masks",
    "match_order",
    "reconstruct",
    "site_delta",
    "site_gradient",
    "smooth_surrogate",
    "soft_label_loss",
    "total_variation",
]
