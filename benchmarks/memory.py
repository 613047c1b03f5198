"""Resident memory of a TFF training: growth over 30 rounds, and peak RSS with 3 vs 12 sites.

A real training loop on TFF's runtime, as the training driver runs it: `build_process(...)`
(sample-level DP-SGD, fast clipping), `state = process.next(state, inputs).state` every round
with fresh per-site datasets of Poisson-sampled batches (rate batch/n, as the driver draws
them), the server weights copied into a Keras model after each round. TFF runs only inside
`local_runtime()`: each site count gets its own fresh worker, stopped at the end (checked: no
process of the worker's tree is left, `worker_left`).

After every round the RSS of the process tree is read from /proc/PID/status: this process
(the coordinator) and the worker's tree (the namespace bridge and `worker_binary`): VmRSS (now)
and VmHWM (peak since start; the coordinator's is reset per site count through
/proc/self/clear_refs after the process is traced, so it covers that site count's training
only; the worker is fresh per site count). Reported, per site count:

- growth of the total RSS (coordinator + worker) from round 5 to round 30 with 3 sites, in
  percent (target < 5 %), and of each process separately (12 sites: 5 rounds, growth 2 -> 5;
  a 12-site round costs ~4 3-site rounds);
- peak RSS: the largest total sampled after a round, and the sum of the peaks (VmHWM) of the
  processes (an upper bound of the true peak of the total, which falls inside a round).

Headline `ratio`: peak RSS (sum of VmHWM) with 12 sites / with 3 sites.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import log, process_tree

_MIB = 1024.0  # /proc reports kB


def proc_status(pid: int) -> dict[str, float] | None:
    """VmRSS and VmHWM of `pid` in MiB; None if it is gone (or a zombie without memory)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / _MIB
    return out if "VmRSS" in out else None


def tree_memory(root: int) -> dict[str, Any]:
    """Summed VmRSS / VmHWM (MiB) of `root`'s process tree, how many processes it has, and
    their pids."""
    rss = hwm = 0.0
    pids = process_tree(root)
    n = 0
    for pid in pids:
        s = proc_status(pid)
        if s is None:
            continue
        rss += s["VmRSS"]
        hwm += s.get("VmHWM", s["VmRSS"])
        n += 1
    return {"rss_mib": rss, "hwm_mib": hwm, "processes": n, "pids": pids}


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                left.append(pid)
    return left


def _growth(rows: list[dict[str, Any]], key: str, first: int) -> float:
    a, b = rows[first - 1][key], rows[-1][key]
    return 100.0 * (b - a) / a


def train_rounds(build: Callable[[], Any], sites: int, rounds: int) -> dict[str, Any]:
    """`rounds` rounds with `sites` sites on a fresh worker; memory after every round.

    `build()` returns the `scaling.Federation` (called inside the runtime; may be cached).
    """
    import numpy as np

    from tff_privseg.runtime import local_runtime

    me = os.getpid()
    rows: list[dict[str, Any]] = []
    with local_runtime() as worker:
        bridge = worker.bridge.pid
        worker_pids = process_tree(bridge)
        fed = build()
        reset = _reset_peak()  # after tracing (cached after the first site count): training only
        state = fed.process.initialize()
        model = fed.model_fn()
        for r in range(rounds):
            t0 = time.perf_counter()
            state = state._replace(client_work=np.float32(fed.client_lr))
            state = fed.process.next(state, fed.inputs(sites, r, poisson=True)).state
            for v, w in zip(
                model.trainable_variables,
                fed.process.get_model_weights(state).trainable,
                strict=True,
            ):
                v.assign(w)
            seconds = time.perf_counter() - t0
            own = proc_status(me) or {"VmRSS": 0.0, "VmHWM": 0.0}
            wk = tree_memory(bridge)
            worker_pids = sorted(set(worker_pids) | set(wk["pids"]))
            rows.append(
                {
                    "round": r + 1,
                    "seconds": round(seconds, 3),
                    "coordinator_rss_mib": round(own["VmRSS"], 1),
                    "coordinator_hwm_mib": round(own["VmHWM"], 1),
                    "worker_rss_mib": round(wk["rss_mib"], 1),
                    "worker_hwm_mib": round(wk["hwm_mib"], 1),
                    "worker_processes": wk["processes"],
                    "total_rss_mib": round(own["VmRSS"] + wk["rss_mib"], 1),
                }
            )
            log(
                f"  {sites} sites, round {r + 1}/{rounds}: {seconds:.1f} s, RSS coordinator "
                f"{own['VmRSS']:.0f} MiB + worker {wk['rss_mib']:.0f} MiB"
            )
    deadline = time.monotonic() + 10
    while _alive(worker_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    last = rows[-1]
    return {
        "rows": rows,
        "peak_total_rss_mib": max(row["total_rss_mib"] for row in rows),
        "peak_hwm_mib": round(last["coordinator_hwm_mib"] + last["worker_hwm_mib"], 1),
        "coordinator_peak_reset": reset,
        "worker_pids": worker_pids,
        "worker_left": _alive(worker_pids),
    }


def run(quick: bool = False) -> dict[str, Any]:
    from benchmarks.scaling import MODEL, QUICK_MODEL, federation, model_description

    if quick:
        resolution, sites_sweep, steps, batch = 32, (2, 3), 1, 4
        rounds, growth_from, model = {2: 3, 3: 3}, {2: 2, 3: 2}, QUICK_MODEL
    else:
        resolution, sites_sweep, steps, batch = 64, (3, 12), 2, 8
        rounds, growth_from, model = {3: 30, 12: 5}, {3: 5, 12: 2}, MODEL
    log(
        f"memory: {resolution}px, {model_description(model)}, {steps} DP steps x batch {batch}; "
        + ", ".join(f"{s} sites x {rounds[s]} rounds" for s in sites_sweep)
    )

    # Traced once, inside the first site count's runtime; every site count runs on its own.
    def build():
        return federation(resolution, max(sites_sweep), steps=steps, batch=batch, model=model)

    per_sites: dict[str, Any] = {}
    for sites in sites_sweep:
        res = train_rounds(build, sites, rounds[sites])
        rows = res["rows"]
        first = min(growth_from[sites], len(rows))
        res["growth_from_round"] = first
        res["growth_to_round"] = len(rows)
        res["growth_total_pct"] = _growth(rows, "total_rss_mib", first)
        res["growth_coordinator_pct"] = _growth(rows, "coordinator_rss_mib", first)
        res["growth_worker_pct"] = _growth(rows, "worker_rss_mib", first)
        res["median_round_seconds"] = sorted(r["seconds"] for r in rows)[len(rows) // 2]
        log(
            f"  {sites} sites: growth round {first}->{len(rows)} {res['growth_total_pct']:+.1f} % "
            f"(coordinator {res['growth_coordinator_pct']:+.1f} %, worker "
            f"{res['growth_worker_pct']:+.1f} %), peak {res['peak_hwm_mib']:.0f} MiB, "
            f"worker processes left: {len(res['worker_left'])}"
        )
        per_sites[str(sites)] = res
    lo, hi = str(min(sites_sweep)), str(max(sites_sweep))
    main = per_sites[lo]  # the long run (growth)
    return {
        "ratio": per_sites[hi]["peak_hwm_mib"] / per_sites[lo]["peak_hwm_mib"],
        "ratio_definition": f"peak RSS (coordinator + worker, sum of VmHWM) with {hi} sites / "
        f"with {lo} sites",
        "growth_pct": main["growth_total_pct"],
        "growth_definition": f"total RSS (coordinator + worker) after round "
        f"{main['growth_to_round']} vs after round {main['growth_from_round']}, {lo} sites, "
        "in percent (target < 5)",
        "peak_rss_mib": {k: v["peak_hwm_mib"] for k, v in per_sites.items()},
        "worker_left": sorted({p for v in per_sites.values() for p in v["worker_left"]}),
        "figures": {
            k: {
                "growth_total_pct": v["growth_total_pct"],
                "growth_coordinator_pct": v["growth_coordinator_pct"],
                "growth_worker_pct": v["growth_worker_pct"],
                "growth_rounds": [v["growth_from_round"], v["growth_to_round"]],
                "peak_hwm_mib": v["peak_hwm_mib"],
                "peak_total_rss_mib": v["peak_total_rss_mib"],
                "median_round_seconds": v["median_round_seconds"],
                "rounds": v["rows"],
            }
            for k, v in per_sites.items()
        },
        "config": {
            "resolution": resolution,
            "model": model_description(model),
            "sites": list(sites_sweep),
            "rounds": {str(k): v for k, v in rounds.items()},
            "local_steps": steps,
            "batch": batch,
            "sampling": "Poisson, rate batch/n, n = steps x batch synthetic slices per site",
            "privacy": "sample-level DP-SGD (dp_gradient, fast path), sigma 1, C 1",
            "runtime": "local_runtime(): a fresh worker per site count",
            "quick": quick,
        },
    }
