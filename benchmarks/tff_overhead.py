"""One TFF round (all sites, TFF's runtime) vs the same local steps in plain Keras.

- tff_round: `build_process(...).next(state, inputs)`, every site participating, on our own
  worker (`local_runtime()`, never TFF's default context, whose worker outlives the process).
- keras_loop: plain Keras style, in this process: per site, load the server weights, then one
  compiled step (`dp_gradient` + Keras Adam) per batch from a Python loop; mean of the deltas.
- in_process_client_update: the very same `build_client_update` tf.function that TFF runs,
  called in this process per site (isolates TFF's runtime from the cost of the client
  function itself, which loops over a tf.data dataset inside the graph).
Warm-up: one round each (tracing, worker start); rounds interleaved. Headline `ratio`:
tff_round / keras_loop (median of paired rounds). `cpu_ratio`: the same for CPU seconds (this
process plus the TFF worker and its bridge, from /proc), which a loaded machine disturbs far
less than wall time.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    log,
    paired_ratio,
    process_tree,
    synthetic_batch,
    time_interleaved,
)


def _descendants_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the processes below `pid` (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid)[1:]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _with_cpu_time(
    fns: dict[str, Callable[[], Any]], worker_pid: int
) -> tuple[dict[str, Callable[[], Any]], dict[str, list[float]]]:
    """Wrap each fn to record its CPU seconds: this process + the TFF worker below worker_pid."""
    samples: dict[str, list[float]] = {name: [] for name in fns}

    def wrap(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            c0 = time.process_time() + _descendants_cpu_seconds(worker_pid)
            out = fn()
            samples[name].append(time.process_time() + _descendants_cpu_seconds(worker_pid) - c0)
            return out

        return call

    return {name: wrap(name, fn) for name, fn in fns.items()}, samples


def run(quick: bool = False) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf

    from tff_privseg import config as config_lib
    from tff_privseg.federated import sampling
    from tff_privseg.federated.client import build_client_update
    from tff_privseg.federated.process import build_process, tff_optimizer
    from tff_privseg.losses import get_loss
    from tff_privseg.models import build_model
    from tff_privseg.privacy.dp_sgd import DpSgdSpec, SeededGaussianSumQuery, dp_gradient
    from tff_privseg.runtime import local_runtime

    resolution, sites, steps, batch = (32, 2, 2, 4) if quick else (64, 3, 10, 8)
    rounds = 2 if quick else 9
    cfg = config_lib.from_dict(
        {
            "data": {"resolution": resolution},
            "model": {"name": "unet", "depth": 3, "base_filters": 16},
            "train": {"local_steps": steps, "batch_size": batch, "client_optimizer": "adam"},
            "privacy": {"level": "sample", "noise_multiplier": 1.0, "l2_norm_clip": 1.0},
        }
    )
    dp = DpSgdSpec(cfg.privacy.l2_norm_clip, cfg.privacy.noise_multiplier, float(batch))
    loss_fn = get_loss(cfg.train.loss)

    def model_fn() -> tf.keras.Model:
        return build_model(cfg.model, resolution, seed=0)

    data = [synthetic_batch(batch * steps, resolution, seed=i) for i in range(sites)]
    plans = [[np.arange(k * batch, (k + 1) * batch) for k in range(steps)] for _ in range(sites)]

    def inputs():
        return [
            {
                "batches": sampling.batches_dataset(x, y, plan),
                "seed": tf.data.Dataset.from_tensors(np.array([7, i], np.int64)),
            }
            for i, ((x, y), plan) in enumerate(zip(data, plans, strict=True))
        ]

    log(f"tff_overhead: {sites} sites x {steps} DP steps, batch {batch}, {resolution}px")
    with local_runtime() as worker:
        process = build_process(cfg, model_fn, loss_fn, sites, dp)
        state = process.initialize()
        w0 = [np.asarray(w) for w in process.get_model_weights(state).trainable]
        update = build_client_update(
            model_fn, loss_fn, tff_optimizer(cfg.train.client_optimizer, cfg.train.client_lr), dp
        )
        lr = tf.constant(cfg.train.client_lr, tf.float32)

        def tff_round():
            process.next(state, inputs())

        model = model_fn()
        keras_opt = tf.keras.optimizers.Adam(cfg.train.client_lr)
        keras_opt.build(model.trainable_variables)

        @tf.function
        def keras_step(x, y, seed):
            query = SeededGaussianSumQuery(
                dp.l2_norm_clip, dp.l2_norm_clip * dp.noise_multiplier, seed
            )
            grads, loss = dp_gradient(model, loss_fn, x, y, query, dp.expected_batch_size)
            keras_opt.apply_gradients(zip(grads, model.trainable_variables, strict=False))
            return loss

        def keras_round():
            deltas = []
            for i, ((x, y), plan) in enumerate(zip(data, plans, strict=True)):
                for v, w in zip(model.trainable_variables, w0, strict=True):
                    v.assign(w)
                for k, idx in enumerate(plan):
                    keras_step(tf.constant(x[idx]), tf.constant(y[idx]), tf.constant([i, k]))
                trained = model.trainable_variables
                deltas.append([w - v.numpy() for w, v in zip(w0, trained, strict=True)])
            return [np.mean(d, axis=0) for d in zip(*deltas, strict=True)]

        def local_round():
            deltas = []
            for i, site in enumerate(inputs()):
                seed = tf.constant([7, i], tf.int64)
                delta, _, _ = update(w0, site["batches"], seed, lr)
                deltas.append([d.numpy() for d in delta])
            return [np.mean(d, axis=0) for d in zip(*deltas, strict=True)]

        fns, cpu_samples = _with_cpu_time(
            {
                "tff_round": tff_round,
                "keras_loop": keras_round,
                "in_process_client_update": local_round,
            },
            worker.bridge.pid,
        )
        timings = time_interleaved(fns, rounds, warmup=1)
    cpu = {
        k: {
            "median_s": statistics.median(v[1:]),  # [0]: the warm-up round
            "min_s": min(v[1:]),
            "samples_s": [round(s, 5) for s in v[1:]],
        }
        for k, v in cpu_samples.items()
    }
    ratio = paired_ratio(timings, "tff_round", "keras_loop")
    vs_update = paired_ratio(timings, "tff_round", "in_process_client_update")
    cpu_ratio = paired_ratio(cpu, "tff_round", "keras_loop")
    log(
        "  "
        + "  ".join(f"{k} {t['median_s']:.2f} s" for k, t in timings.items())
        + f" | tff/keras {ratio:.2f}x, tff/in-process client_update {vs_update:.2f}x"
        + " | CPU s: "
        + "  ".join(f"{k} {t['median_s']:.2f}" for k, t in cpu.items())
        + f", tff/keras {cpu_ratio:.2f}x"
    )
    return {
        "ratio": ratio,
        "ratio_definition": "median over paired rounds of TFF round time / plain-Keras round "
        "time (same DP steps, same batches)",
        "ratio_tff_over_in_process_client_update": vs_update,
        "cpu_ratio": cpu_ratio,
        "cpu_ratio_definition": "as ratio, for CPU seconds: this process plus the TFF worker "
        "process tree (from /proc)",
        "local_step_seconds": timings["keras_loop"]["median_s"] / (sites * steps),
        "figures": {
            "seconds_per_round": {k: round(t["median_s"], 4) for k, t in timings.items()},
            "timings": timings,
            "cpu_seconds_per_round": {k: round(t["median_s"], 4) for k, t in cpu.items()},
            "cpu_timings": cpu,
        },
        "config": {
            "sites": sites,
            "local_steps": steps,
            "batch": batch,
            "resolution": resolution,
            "model": "unet depth 3, 16 filters",
            "privacy": "sample-level DP-SGD (dp_gradient, fast path), sigma 1, C 1",
            "rounds_timed": rounds,
            "quick": quick,
        },
    }
