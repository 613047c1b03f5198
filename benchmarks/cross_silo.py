"""A cross-silo round over mutual TLS on loopback vs the single-machine simulation.

Three sites (`SiteService`, each with its own data folder, state and gRPC server behind mutual
TLS on 127.0.0.1, in this process: the same code `site serve` runs) and the coordinator's
`CrossSiloProcess` (remote client updates, sites in parallel, TFF server step); against it,
for the same sites, data, steps, keys and the same start weights:

- simulation: `build_process(...).next` (TFF's client work on the private local worker: what
  `train` runs by default);
- hybrid: `HybridProcess.next` (the same client function in this process, sites one by one).

Headline `ratio`: cross-silo round / simulation round (median of paired rounds; each
cross-silo round includes the Round calls, the server step and the Evaluate calls of
validation and the sites' own accounting, the simulation round its `next`, the same
validation in-process and the ledger update `train` makes each round). Bytes per
round per site each way come from the wire log (`TFF_PRIVSEG_WIRE_LOG`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import log, paired_ratio, time_interleaved


def run(quick: bool = False) -> dict[str, Any]:
    import numpy as np

    from tff_privseg import config as config_lib
    from tff_privseg.data import load_sites
    from tff_privseg.data.synth import write_synthetic_dataset
    from tff_privseg.federated.hybrid import HybridProcess
    from tff_privseg.federated.process import build_process
    from tff_privseg.federated.train import client_inputs, plan_round
    from tff_privseg.federated.train import validation_dice as sim_validation_dice
    from tff_privseg.losses import get_loss
    from tff_privseg.models import training_model_fn
    from tff_privseg.privacy.dp_sgd import DpSgdSpec
    from tff_privseg.privacy.planning import new_ledger
    from tff_privseg.runtime import RemoteTls, TlsFiles, local_runtime, make_pki
    from tff_privseg.silo.coordinator import CrossSiloProcess, RemoteSites, SiteClient
    from tff_privseg.silo.policy import SiteConfig, SitePolicy
    from tff_privseg.silo.site import SiteService, start_server
    from tff_privseg.silo.state import derive_run_key

    resolution, volumes, steps, batch, rounds = (32, 4, 2, 4, 2) if quick else (64, 8, 10, 8, 5)
    cfg = config_lib.from_dict(
        {
            "data": {"resolution": resolution, "crop_slices": 8},
            "model": {
                "name": "unet",
                "depth": 2 if quick else 3,
                "base_filters": 4 if quick else 16,
            },
            "train": {"local_steps": steps, "batch_size": batch, "client_optimizer": "adam"},
            "privacy": {"level": "sample", "noise_multiplier": 1.0, "l2_norm_clip": 1.0},
        }
    )
    site_key, run_id = "5a" * 32, "0" * 32
    run_key = derive_run_key(site_key, run_id)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cross-silo-"))
    wire_log = tmp / "wire.jsonl"
    os.environ["TFF_PRIVSEG_WIRE_LOG"] = str(wire_log)
    write_synthetic_dataset(tmp / "data", 3, volumes, 1, (48, 48, 16))
    make_pki(tmp / "pki")
    policy = SitePolicy("slice", 0.5, 1.0, 1e6, cfg.privacy.delta)
    services, servers, clients = [], [], []
    creds = RemoteTls.from_dir(tmp / "pki").credentials()
    sites = load_sites(cfg.data, tmp / "data")
    log(f"cross_silo: 3 sites x {steps} DP steps, batch {batch}, {resolution}px, mutual TLS")
    try:
        for s in sites:
            state = tmp / f"{s.name}.state"
            state.mkdir(mode=0o700)
            (state / "site_key").write_text(site_key + "\n")
            os.chmod(state / "site_key", 0o600)
            svc = SiteService(SiteConfig(None, policy, cfg), tmp / "data" / s.name, state)
            server, port = start_server(svc, "127.0.0.1", 0, TlsFiles.server(tmp / "pki"))
            services.append(svc)
            servers.append(server)
            clients.append(SiteClient(s.name, f"127.0.0.1:{port}", creds))
        remote = RemoteSites(cfg, clients)  # Hello: each site checks the config
        dp = DpSgdSpec(cfg.privacy.l2_norm_clip, cfg.privacy.noise_multiplier, float(batch))
        model_fn, loss_fn = training_model_fn(cfg), get_loss(cfg.train.loss)
        with local_runtime():
            sim = build_process(cfg, model_fn, loss_fn, 3, dp)
            hybrid = HybridProcess(cfg, model_fn, loss_fn, 3, dp, process=sim)
            silo = CrossSiloProcess(cfg, model_fn, loss_fn, 3, dp, process=sim)
            state = sim.initialize()._replace(client_work=np.float32(cfg.train.client_lr))
            eval_model = model_fn()
            counter = {"r": 0}
            ledger, names = new_ledger(cfg, sites), [s.name for s in sites]

            def sim_round(proc):
                def go():
                    plan = plan_round(cfg, sites, 0, run_key)
                    out = proc.next(state, client_inputs(cfg, sites, plan))
                    ledger.with_round(plan.steps(names))  # what `train` accounts per round
                    proc.get_model_weights(out.state).assign_weights_to(eval_model)
                    sim_validation_dice(eval_model, sites)

                return go

            def silo_round():
                # a fresh round number each call: a site runs each round once (repeats are
                # answered again, uncounted, which this benchmark should not time)
                r = counter["r"] = counter["r"] + 1
                inputs = [{"site": c, "round": r, "run_id": run_id} for c in clients]
                out = silo.next(state, inputs)
                sim.get_model_weights(out.state).assign_weights_to(eval_model)
                remote.validation_dice(eval_model, r)

            weights = sim.get_model_weights(state).trainable
            model_bytes = int(sum(np.asarray(w).nbytes for w in weights))
            timings = time_interleaved(
                {
                    "cross_silo": silo_round,
                    "simulation": sim_round(sim),
                    "hybrid": sim_round(hybrid),
                },
                rounds,
                warmup=1,
            )
    finally:
        for server in servers:
            server.stop(None)
        for c in clients:
            c.close()
        os.environ.pop("TFF_PRIVSEG_WIRE_LOG", None)
    entries = [json.loads(line) for line in wire_log.read_text().splitlines()]
    coord = [e for e in entries if e["side"] == "coordinator"]
    per = (rounds + 1) * len(clients)  # warm-up included
    down = sum(e["bytes"] for e in coord if e["direction"] == "send" and e["method"] != "Hello")
    up = sum(e["bytes"] for e in coord if e["direction"] == "recv" and e["method"] != "Hello")
    ratio = paired_ratio(timings, "cross_silo", "simulation")
    vs_hybrid = paired_ratio(timings, "cross_silo", "hybrid")
    log(
        "  "
        + "  ".join(f"{k} {t['median_s']:.2f} s" for k, t in timings.items())
        + f" | cross-silo/simulation {ratio:.2f}x, /hybrid {vs_hybrid:.2f}x"
        + f" | bytes/round/site down {down / per:.0f} up {up / per:.0f} (model {model_bytes})"
    )
    return {
        "ratio": ratio,
        "ratio_definition": "median over paired rounds of cross-silo round time (3 sites over "
        "mutual TLS gRPC on loopback, in parallel, + validation by Evaluate calls) / simulation "
        "round time (TFF process.next + in-process validation), same sites, steps and keys",
        "ratio_over_hybrid": vs_hybrid,
        "bytes_per_round_per_site": {"down": down / per, "up": up / per},
        "model_bytes": model_bytes,
        "figures": {
            "seconds_per_round": {k: round(t["median_s"], 4) for k, t in timings.items()},
            "timings": timings,
        },
        "config": {
            "sites": 3,
            "local_steps": steps,
            "batch": batch,
            "resolution": resolution,
            "privacy": "sample-level DP-SGD, sigma 1, C 1",
            "rounds_timed": rounds,
            "quick": quick,
        },
    }
