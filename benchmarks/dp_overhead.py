"""DP-SGD client step vs the non-private client step: same U-Net, batch 8, 64/128/256 px.

Variants (each a `tf.function`: gradient + Adam update of its own model copy):
  keras         non-private: `plain_gradient` (mean loss; fused GroupNorm walk), Keras Adam
  keras_call    non-private, stock: GradientTape over `model(x, training=True)`
  dp_fast       `dp_gradient` default path (book-keeping clipping, `privacy/fast_clip/`)
  dp_jacobian   `dp_gradient(method="jacobian")`, the previous path (64 px only: slow)
  tfp_vectorized  tensorflow-privacy's VectorizedDPKerasAdamOptimizer (64/128 px)
  keras_xla / dp_fast_xla   the same with `jit_compile=True` (64 px, to see if XLA helps)
All variants of a resolution are timed interleaved, so they share the background load.
Headline `ratio`: the largest dp_fast/keras ratio over the resolutions.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.common import log, paired_ratio, synthetic_batch, time_interleaved

BATCH = 8


def _steps(resolution: int, variants: list[str]) -> dict[str, Any]:
    import tensorflow as tf

    from tff_privseg.losses import soft_dice_loss
    from tff_privseg.models import unet
    from tff_privseg.privacy.dp_sgd import SeededGaussianSumQuery, dp_gradient, plain_gradient

    x, y = synthetic_batch(BATCH, resolution)
    x, y = tf.constant(x), tf.constant(y)
    seed = tf.constant([1, 2], tf.int64)

    def query():
        return SeededGaussianSumQuery(1.0, 1.0, seed)

    def keras_like(grad_fn, jit: bool):
        model = unet(resolution=resolution, seed=0)
        opt = tf.keras.optimizers.Adam(1e-3)
        opt.build(model.trainable_variables)

        @tf.function(jit_compile=jit)
        def step(x, y):
            grads, loss = grad_fn(model, x, y)
            opt.apply_gradients(zip(grads, model.trainable_variables, strict=False))
            return loss

        return lambda: step(x, y).numpy()

    def plain(model, x, y):
        return plain_gradient(model, soft_dice_loss, x, y)

    def keras_call(model, x, y):
        with tf.GradientTape() as tape:
            losses = soft_dice_loss(y, model(x, training=True))
            loss = tf.reduce_mean(losses)
        return tape.gradient(loss, model.trainable_variables), tf.reduce_sum(losses)

    def dp(method):
        def fn(model, x, y):
            return dp_gradient(model, soft_dice_loss, x, y, query(), float(BATCH), method=method)

        return fn

    def tfp_vectorized():
        from tensorflow_privacy import VectorizedDPKerasAdamOptimizer

        model = unet(resolution=resolution, seed=0)
        opt = VectorizedDPKerasAdamOptimizer(
            l2_norm_clip=1.0, noise_multiplier=1.0, num_microbatches=None, learning_rate=1e-3
        )

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                losses = soft_dice_loss(y, model(x, training=True))
            opt.minimize(losses, model.trainable_variables, tape=tape)
            return tf.reduce_sum(losses)

        return lambda: step(x, y).numpy()

    makers = {
        "keras": lambda: keras_like(plain, False),
        "keras_call": lambda: keras_like(keras_call, False),
        "dp_fast": lambda: keras_like(dp("fast"), False),
        "dp_jacobian": lambda: keras_like(dp("jacobian"), False),
        "tfp_vectorized": tfp_vectorized,
        "keras_xla": lambda: keras_like(plain, True),
        "dp_fast_xla": lambda: keras_like(dp("fast"), True),
    }
    return {v: makers[v]() for v in variants}


def plan(quick: bool) -> dict[int, tuple[list[str], int]]:
    """resolution -> (variants, repetitions). XLA variants only with TFF_PRIVSEG_BENCH_XLA=1:
    on CPU they measured 25-30x slower than the graph executor (TF 2.14, 2 cores)."""
    if quick:
        return {32: (["keras", "dp_fast"], 3)}
    xla = ["keras_xla", "dp_fast_xla"] if os.environ.get("TFF_PRIVSEG_BENCH_XLA") == "1" else []
    return {
        64: (["keras", "keras_call", "dp_fast", "tfp_vectorized", "dp_jacobian", *xla], 11),
        128: (["keras", "keras_call", "dp_fast", "tfp_vectorized"], 9),
        256: (["keras", "dp_fast"], 5),
    }


def run(quick: bool = False) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for resolution, (variants, reps) in plan(quick).items():
        log(f"dp_overhead: {resolution}x{resolution}, batch {BATCH}: {', '.join(variants)}")
        steps = {}
        for v in variants:
            try:
                steps[v] = _steps(resolution, [v])[v]
            except Exception as e:  # e.g. XLA without a kernel for an op: report, go on
                figures.setdefault(str(resolution), {}).setdefault("failed", {})[v] = (
                    f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                )
        timings = time_interleaved(steps, reps)
        ratios = {v: paired_ratio(timings, v, "keras") for v in timings if v != "keras"}
        entry = figures.setdefault(str(resolution), {})
        entry.update(
            {
                "seconds_per_step": {v: round(t["median_s"], 4) for v, t in timings.items()},
                "min_seconds_per_step": {v: round(t["min_s"], 4) for v, t in timings.items()},
                "ratio_to_keras": {v: round(r, 3) for v, r in ratios.items()},
                "repetitions": reps,
                "timings": timings,
            }
        )
        log(
            "  "
            + "  ".join(f"{v} {t['median_s'] * 1000:.0f} ms" for v, t in timings.items())
            + "  | dp_fast/keras "
            + f"{ratios.get('dp_fast', float('nan')):.2f}x"
        )
    ratio = max(f["ratio_to_keras"]["dp_fast"] for f in figures.values() if "ratio_to_keras" in f)
    return {
        "ratio": ratio,
        "ratio_definition": "max over resolutions of median(time dp_fast / time keras), "
        "paired back-to-back repetitions",
        "figures": figures,
        "config": {
            "model": "unet depth 3, base_filters 16, groups 8 (tff_privseg.models.unet)",
            "batch": BATCH,
            "loss": "soft dice",
            "optimizer": "Adam 1e-3",
            "dp": {"l2_norm_clip": 1.0, "noise_multiplier": 1.0},
            "quick": quick,
        },
    }
