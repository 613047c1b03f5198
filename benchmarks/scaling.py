"""Round time against the number of sites and against the image resolution.

The round is the one of tff_overhead: `build_process(...).next(state, inputs)` on our own worker
(`local_runtime()`, never TFF's default context), every site participating, sample-level DP-SGD
(fast clipping, sigma 1, C 1), `steps` local steps of `batch` examples per site, U-Net depth 3
with 16 filters. One warm-up round per configuration (tracing, first run on the worker), then
`rounds` timed rounds, all configurations interleaved round-robin (`common.time_interleaved`)
so that they share the background load of this machine.

- sites: 3, 6, 12 at 64x64;
- resolution: 64, 128, 256 at 3 sites (3 sites at 64x64 is shared by both sweeps).

With sample-level DP the learning process does not depend on the number of sites (a plain mean
of the client deltas; TFF takes the client count from the inputs), so one process per resolution
serves every site count. Headline `ratio`: median round time with 12 sites / with 3 sites
(4.0 would be linear in the sites: TFF's worker runs the clients one after another on 2 cores).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.common import log, synthetic_batch, time_interleaved

MODEL = {"name": "unet", "depth": 3, "base_filters": 16}
QUICK_MODEL = {"name": "unet", "depth": 2, "base_filters": 4}


@dataclass
class Federation:
    """One learning process at one resolution, and synthetic data for up to `max_sites` sites."""

    resolution: int
    steps: int
    batch: int
    process: Any
    model_fn: Callable[[], Any]
    client_lr: float
    data: list[tuple[Any, Any]]

    def inputs(self, sites: int, round_num: int = 0, poisson: bool = False) -> list[dict]:
        """Per-site TFF inputs of one round: `steps` batches and the site's noise seed.

        poisson=False: fixed batches of `batch` examples (as tff_overhead); True: Poisson
        sampling at rate batch/n, as the training driver draws them (variable batch sizes).
        """
        import numpy as np
        import tensorflow as tf

        from tff_privseg.federated import sampling

        out = []
        for i in range(sites):
            x, y = self.data[i]
            n = len(x)
            if poisson:
                ids = [b"site%d\0%d" % (i, j) for j in range(n)]  # stand-in record identities
                plan = sampling.poisson_batches(ids, self.batch / n, self.steps, 0, round_num)
            else:
                plan = [np.arange(k * self.batch, (k + 1) * self.batch) for k in range(self.steps)]
            out.append(
                {
                    "batches": sampling.batches_dataset(x, y, plan),
                    "seed": tf.data.Dataset.from_tensors(np.array([round_num, i], np.int64)),
                }
            )
        return out


_CACHE: dict[tuple, Federation] = {}


def federation(
    resolution: int, max_sites: int, *, steps: int, batch: int, model: dict | None = None
) -> Federation:
    """The TFF learning process and synthetic site data (call it inside `local_runtime()`).

    Cached within this process (tracing `build_process` costs 10-40 s on this machine): the
    computations do not depend on the runtime they later run in, nor, with sample-level DP, on
    the number of sites (memory and scaling share the 64x64 one in `tff-privseg bench --only
    memory --only scaling`). A cached one gets more sites' data when asked for more.
    """
    model = model or MODEL
    key = (resolution, steps, batch, tuple(sorted(model.items())))
    if key not in _CACHE:
        _CACHE[key] = _federation(resolution, max_sites, steps=steps, batch=batch, model=model)
    fed = _CACHE[key]
    fed.data.extend(
        synthetic_batch(batch * steps, resolution, seed=i) for i in range(len(fed.data), max_sites)
    )
    return fed


def _federation(resolution: int, max_sites: int, *, steps: int, batch: int, model: dict):
    from tff_privseg import config as config_lib
    from tff_privseg.federated.process import build_process
    from tff_privseg.losses import get_loss
    from tff_privseg.models import build_model
    from tff_privseg.privacy.dp_sgd import DpSgdSpec

    cfg = config_lib.from_dict(
        {
            "data": {"resolution": resolution},
            "model": model,
            "train": {"local_steps": steps, "batch_size": batch, "client_optimizer": "adam"},
            "privacy": {"level": "sample", "noise_multiplier": 1.0, "l2_norm_clip": 1.0},
        }
    )
    dp = DpSgdSpec(cfg.privacy.l2_norm_clip, cfg.privacy.noise_multiplier, float(batch))

    def model_fn():
        return build_model(cfg.model, resolution, seed=0)

    process = build_process(cfg, model_fn, get_loss(cfg.train.loss), max_sites, dp)
    data = [synthetic_batch(batch * steps, resolution, seed=i) for i in range(max_sites)]
    return Federation(resolution, steps, batch, process, model_fn, cfg.train.client_lr, data)


def model_description(model: dict) -> str:
    return f"{model['name']} depth {model['depth']}, {model['base_filters']} filters"


def run(quick: bool = False) -> dict[str, Any]:
    import numpy as np

    from tff_privseg.runtime import local_runtime

    if quick:
        sites_sweep, res_sweep, base_res, base_sites = (1, 2), (16, 32), 32, 1
        steps, batch, rounds, model = 1, 4, 1, QUICK_MODEL
    else:
        sites_sweep, res_sweep, base_res, base_sites = (3, 6, 12), (64, 128, 256), 64, 3
        steps, batch, rounds, model = 2, 8, 2, MODEL
    log(
        f"scaling: sites {sites_sweep} at {base_res}px, resolution {res_sweep} at "
        f"{base_sites} sites; {steps} DP steps x batch {batch}, {rounds} timed rounds"
    )
    configs = {(s, base_res) for s in sites_sweep} | {(base_sites, r) for r in res_sweep}
    configs = sorted(configs, key=lambda c: (c[1], c[0]))

    def key(sites: int, res: int) -> str:
        return f"sites{sites}_{res}px"

    with local_runtime():
        feds = {
            r: federation(
                r,
                max(sites_sweep) if r == base_res else base_sites,
                steps=steps,
                batch=batch,
                model=model,
            )
            for r in res_sweep
        }
        states = {r: f.process.initialize() for r, f in feds.items()}

        def round_fn(sites: int, res: int) -> Callable[[], None]:
            fed = feds[res]

            def one_round() -> None:
                out = fed.process.next(states[res], fed.inputs(sites))
                np.asarray(out.metrics["client_work"]["examples"])  # block until done

            return one_round

        timings = time_interleaved(
            {key(s, r): round_fn(s, r) for s, r in configs}, rounds, warmup=1
        )
    med = {k: t["median_s"] for k, t in timings.items()}
    by_sites = {str(s): med[key(s, base_res)] for s in sites_sweep}
    by_res = {str(r): med[key(base_sites, r)] for r in res_sweep}
    xs = np.array(sites_sweep, float)
    slope, intercept = np.polyfit(xs, [by_sites[str(s)] for s in sites_sweep], 1)
    lo, hi = min(sites_sweep), max(sites_sweep)
    ratio = by_sites[str(hi)] / by_sites[str(lo)]
    res_ratio = by_res[str(max(res_sweep))] / by_res[str(min(res_sweep))]
    log(
        "  sites "
        + "  ".join(f"{s}: {t:.2f} s" for s, t in by_sites.items())
        + f" | {hi}/{lo} sites {ratio:.2f}x; {slope:.2f} s per site + {intercept:.2f} s"
    )
    log(
        "  resolution "
        + "  ".join(f"{r}px: {t:.2f} s" for r, t in by_res.items())
        + f" | {max(res_sweep)}/{min(res_sweep)} px {res_ratio:.2f}x"
    )
    return {
        "ratio": ratio,
        "ratio_definition": f"median TFF round time with {hi} sites / with {lo} sites "
        f"({base_res}px; {hi / lo:g} = linear in the sites)",
        "ratio_resolution": res_ratio,
        "seconds_per_site": float(slope),
        "seconds_fixed_per_round": float(intercept),
        "figures": {
            "round_seconds_by_sites": {k: round(v, 4) for k, v in by_sites.items()},
            "round_seconds_by_resolution": {k: round(v, 4) for k, v in by_res.items()},
            "seconds_per_site_step": {
                key(s, r): round(med[key(s, r)] / (s * steps), 4) for s, r in configs
            },
            "linear_fit_by_sites": {"seconds_per_site": slope, "seconds_fixed": intercept},
            "timings": timings,
        },
        "config": {
            "sites": list(sites_sweep),
            "resolutions": list(res_sweep),
            "sites_at_resolution_sweep": base_sites,
            "resolution_at_sites_sweep": base_res,
            "local_steps": steps,
            "batch": batch,
            "model": model_description(model),
            "privacy": "sample-level DP-SGD (dp_gradient, fast path), sigma 1, C 1",
            "round": "build_process(...).next, all sites participate, local_runtime() worker",
            "rounds_timed": rounds,
            "warmup_rounds": 1,
            "quick": quick,
        },
    }
