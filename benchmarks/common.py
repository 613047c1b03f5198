"""Shared benchmark plumbing: machine description, interleaved timing, JSON results."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Where results go unless the caller names a folder: relative to the current directory (the
# repository root in every documented command), never inside the installed package.
RESULTS = Path("benchmarks", "results")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where the numbers come from (CPU, cores, memory, library versions, load)."""
    try:
        cores_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores_usable = os.cpu_count()
    mem_gib = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gib = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": cores_usable,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow"),
        "tensorflow_federated": _version("tensorflow-federated"),
        "tensorflow_privacy": _version("tensorflow-privacy"),
        "torch": _version("torch"),
        "opacus": _version("opacus"),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86 Linux)"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import tensorflow as tf

        info["gpus"] = [d.name for d in tf.config.list_physical_devices("GPU")]
    except Exception:  # pragma: no cover
        info["gpus"] = []
    return info


def log(msg: str) -> None:
    """Progress to stderr (stdout stays free for the --json line)."""
    print(msg, file=sys.stderr, flush=True)


def time_interleaved(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 2
) -> dict[str, dict[str, Any]]:
    """Median/min seconds per call, the calls of all variants interleaved round-robin.

    Interleaving puts every variant under the same background load, so ratios of medians
    measured side by side stay meaningful on a shared machine. `fn()` must block until done
    (return numpy, or call .numpy()).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {
        k: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "samples_s": [round(s, 5) for s in v],
        }
        for k, v in samples.items()
    }


def paired_ratio(timings: dict[str, dict[str, Any]], num: str, den: str) -> float:
    """Median over repetitions of time(num)/time(den), each pair measured back to back."""
    a, b = timings[num]["samples_s"], timings[den]["samples_s"]
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def save(name: str, result: dict[str, Any], out_dir: Path | None = None, command: str = "") -> Path:
    """Write OUT_DIR/NAME.json (default RESULTS) with the machine description and the command."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "command": command or " ".join(["tff-privseg", "bench", "--only", name]),
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **result,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_jsonable) + "\n")
    return path


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def synthetic_batch(batch: int, resolution: int, seed: int = 0):
    """A CT-like batch: a bright disc ("organ") on noise, and its mask."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:resolution, :resolution] / resolution
    images, labels = [], []
    for _ in range(batch):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        img = 0.3 + 0.4 * mask + 0.1 * rng.standard_normal((resolution, resolution))
        images.append(img.astype(np.float32)[..., None])
        labels.append(mask.astype(np.int32))
    return np.stack(images), np.stack(labels)


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from the parent pid of every process in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree
