"""The same U-Net in PyTorch (non-private and Opacus DP-SGD) next to our Keras steps.

Optional extra: `pip install .[bench]` (torch, opacus); skipped with a message without torch.
The PyTorch side runs in a child process (this file as a script, self-contained): TensorFlow
and PyTorch then do not fight over one process's thread pools, and a torch installed outside
the environment can be named with TFF_PRIVSEG_BENCH_TORCH_PATH (prepended to the child's
sys.path only). Our steps (non-private and dp_fast) are timed in this process right after, on
the same batch. Same architecture as `tff_privseg.models.unet` (depth 3, 16 filters,
GroupNorm(8), ReLU, max-pool, ConvTranspose 2x2/2 with bias, concat skips, 1x1 sigmoid head),
soft Dice, Adam 1e-3, batch 8; Opacus: GradSampleModule + DPOptimizer (σ = 1, C = 1).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BATCH = 8


# ------------------------------------------------------------------ child (PyTorch) side


def _torch_worker(resolutions: list[int], reps: int) -> dict[str, Any]:
    import os

    import numpy as np
    import torch
    from torch import nn

    # Measured here: with 2 threads on 2 busy cores, torch's OpenMP pool stalls (2.6 s per
    # step at 64 px instead of 0.1-0.3 s), so every thread count up to the core count is timed
    # and the fastest is used (all of them are reported).
    thread_counts = sorted({1, len(os.sched_getaffinity(0))})

    torch.manual_seed(0)

    def double_conv(cin, cout):
        g = 8
        while cout % g:
            g -= 1
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.GroupNorm(g, cout, eps=1e-5),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.GroupNorm(g, cout, eps=1e-5),
            nn.ReLU(),
        )

    class UNet(nn.Module):
        def __init__(self, depth=3, base=16):
            super().__init__()
            widths = [base * 2**i for i in range(depth)]
            self.enc = nn.ModuleList()
            cin = 1
            for w in widths:
                self.enc.append(double_conv(cin, w))
                cin = w
            self.pool = nn.MaxPool2d(2)
            self.bottleneck = double_conv(cin, widths[-1])
            self.up, self.dec = nn.ModuleList(), nn.ModuleList()
            cin = widths[-1]
            for w in reversed(widths):
                self.up.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
                self.dec.append(double_conv(2 * w, w))
                cin = w
            self.head = nn.Conv2d(cin, 1, 1)

        def forward(self, x):
            skips = []
            for block in self.enc:
                x = block(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottleneck(x)
            for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
                x = dec(torch.cat([up(x), skip], dim=1))
            return torch.sigmoid(self.head(x))

    def dice(p, y):  # per example
        inter = (p * y).sum((1, 2, 3))
        return 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)

    out: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    try:
        import opacus
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        out["opacus"] = opacus.__version__
    except ImportError:
        GradSampleModule = None  # noqa: N806
    for r in resolutions:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:r, :r] / r
        masks = [
            ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < rng.uniform(0.01, 0.06)) for _ in range(BATCH)
        ]
        y = torch.tensor(np.stack(masks)[:, None].astype(np.float32))
        x = y * 0.4 + 0.3 + 0.1 * torch.randn_like(y)
        model = UNet()
        opt = torch.optim.Adam(model.parameters(), 1e-3)

        def plain_step(model=model, opt=opt, x=x, y=y):
            opt.zero_grad(set_to_none=True)
            dice(model(x), y).mean().backward()
            opt.step()

        base = {"torch": plain_step}
        if GradSampleModule is not None:
            gsm = GradSampleModule(UNet())
            dpopt = DPOptimizer(
                torch.optim.Adam(gsm.parameters(), 1e-3),
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                expected_batch_size=BATCH,
            )

            def dp_step(gsm=gsm, dpopt=dpopt, x=x, y=y):
                dpopt.zero_grad(set_to_none=True)
                dice(gsm(x), y).mean().backward()
                dpopt.step()

            base["opacus"] = dp_step
        by_threads: dict[int, dict[str, list[float]]] = {}
        for n in thread_counts:
            torch.set_num_threads(n)
            for fn in base.values():
                fn()
                fn()
            samples = {k: [] for k in base}
            for _ in range(reps):
                for k, fn in base.items():
                    t0 = time.perf_counter()
                    fn()
                    samples[k].append(time.perf_counter() - t0)
            by_threads[n] = samples
        best = {k: min(statistics.median(by_threads[n][k]) for n in thread_counts) for k in base}
        out[str(r)] = {
            "seconds_per_step": best,
            "seconds_per_step_by_threads": {
                str(n): {k: statistics.median(v) for k, v in smp.items()}
                for n, smp in by_threads.items()
            },
            "samples_s": {
                str(n): {k: [round(x, 5) for x in v] for k, v in smp.items()}
                for n, smp in by_threads.items()
            },
            "params": sum(p.numel() for p in model.parameters()),
        }
    return out


# ------------------------------------------------------------------ parent side


def _run_child(resolutions: list[int], reps: int) -> dict[str, Any]:
    env = dict(os.environ)
    extra = os.environ.get("TFF_PRIVSEG_BENCH_TORCH_PATH")
    if extra:
        env["PYTHONPATH"] = os.pathsep.join([extra, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps([resolutions, reps]),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:300]}
    return json.loads(lines[-1])


def run(quick: bool = False) -> dict[str, Any]:
    """PyTorch (child process) and ours (this process) in alternating blocks.

    One block = every PyTorch variant, then ours, at every resolution. Two blocks (torch, ours,
    torch, ours) and medians over the pooled samples: measured here, one block each gave
    ratios that moved by 10-20 % between runs as the machine's state drifted.
    """
    from benchmarks.common import log

    resolutions, reps, blocks = ([32], 3, 1) if quick else ([64, 128], 9, 2)
    children: list[dict[str, Any]] = []
    ours: dict[int, list[dict[str, Any]]] = {r: [] for r in resolutions}
    for block in range(blocks):
        log(f"torch_reference block {block + 1}/{blocks}: PyTorch / Opacus at {resolutions}")
        child = _run_child(resolutions, reps)
        if "error" in child:
            return _skipped(child["error"], quick)
        children.append(child)
        for r in resolutions:
            log(f"  ours at {r}x{r} (keras, dp_fast)")
            ours[r].append(_time_ours(r, reps))
    figures = {str(r): _figure(r, [c[str(r)] for c in children], ours[r]) for r in resolutions}
    headline = [f.get("ours_dp_over_opacus") for f in figures.values()]
    return {
        "ratio": max(h for h in headline if h is not None) if any(headline) else None,
        "ratio_definition": "max over resolutions of our DP step / Opacus DP step "
        f"(medians over {blocks} alternating blocks; PyTorch in a child process at its fastest "
        "thread count)",
        "figures": figures,
        "torch": {k: children[0].get(k) for k in ("torch", "opacus", "threads")},
        "config": {
            "batch": BATCH,
            "resolutions": resolutions,
            "repetitions": reps,
            "blocks": blocks,
            "quick": quick,
        },
    }


def _skipped(error: str, quick: bool) -> dict[str, Any]:
    from benchmarks.common import log

    msg = (
        "skipped: PyTorch not available (pip install .[bench] or set TFF_PRIVSEG_BENCH_TORCH_PATH)"
        if "No module named 'torch'" in error
        else f"skipped: the PyTorch run failed: {error}"
    )
    log(f"  {msg}")
    return {"skipped": msg, "ratio": None, "figures": {}, "config": {"quick": quick}}


def _time_ours(resolution: int, reps: int) -> dict[str, list[float]]:
    from benchmarks.common import time_interleaved
    from benchmarks.dp_overhead import _steps

    timings = time_interleaved(_steps(resolution, ["keras", "dp_fast"]), reps)
    return {k: t["samples_s"] for k, t in timings.items()}


def _figure(
    resolution: int, torch_blocks: list[dict[str, Any]], our_blocks: list[dict[str, list[float]]]
) -> dict[str, Any]:
    """Pooled medians: PyTorch per variant at its fastest thread count, ours per variant."""
    from benchmarks.common import log

    threads = list(torch_blocks[0]["samples_s"])
    pooled = {
        n: {
            k: [x for b in torch_blocks for x in b["samples_s"][n][k]]
            for k in torch_blocks[0]["samples_s"][n]
        }
        for n in threads
    }
    by_threads = {n: {k: statistics.median(v) for k, v in smp.items()} for n, smp in pooled.items()}
    theirs = {k: min(by_threads[n][k] for n in threads) for k in by_threads[threads[0]]}
    our_samples = {k: [x for b in our_blocks for x in b[k]] for k in our_blocks[0]}
    mine = {k: statistics.median(v) for k, v in our_samples.items()}
    entry: dict[str, Any] = {
        "seconds_per_step": {**{k: round(v, 4) for k, v in theirs.items()}, **mine},
        "ours_over_torch_nonprivate": round(mine["keras"] / theirs["torch"], 3),
        "ours_over_torch_nonprivate_by_block": [
            round(statistics.median(o["keras"]) / t["seconds_per_step"]["torch"], 3)
            for o, t in zip(our_blocks, torch_blocks, strict=True)
        ],
        "torch_params": torch_blocks[0]["params"],
        "torch_seconds_by_threads": by_threads,
        "torch_samples_s": pooled,
        "ours_samples_s": our_samples,
    }
    if "opacus" in theirs:
        entry["opacus_over_torch"] = round(theirs["opacus"] / theirs["torch"], 3)
        entry["ours_dp_over_opacus"] = round(mine["dp_fast"] / theirs["opacus"], 3)
    log("  " + "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in entry["seconds_per_step"].items()))
    return entry


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    res, n = json.loads(sys.argv[2])
    print(json.dumps(_torch_worker(res, n)))
