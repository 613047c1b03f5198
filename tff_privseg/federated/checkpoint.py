"""Round checkpoints: the whole TFF state and the privacy ledger, committed as one file.

One `.npz` per round holds the flattened learning-process state (model, optimizer and aggregator
state) next to a JSON header (round, privacy ledger, the run's secret noise key). Because state
and ledger share one file, written to a temporary name, fsynced and renamed, a crash can never
leave a checkpoint whose ε disagrees with its model, nor a half-written one. (TFF's
FileProgramStateManager writes a SavedModel directory per version, which would need a second
file for the ledger and a second rename.)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

_NAME = re.compile(r"round_(\d{6})\.npz$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save(ckpt_dir: Path, round_num: int, state: Any, header: dict[str, Any], keep: int = 2) -> Path:
    """Write `round_{round_num}.npz` atomically and prune all but the newest `keep`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    flat = tf.nest.flatten(state)
    arrays = {f"s{i:05d}": np.asarray(v) for i, v in enumerate(flat)}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    path = ckpt_dir / f"round_{round_num:06d}.npz"
    tmp = ckpt_dir / f".round_{round_num:06d}.npz.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in sorted(ckpt_dir.glob("round_*.npz"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest(ckpt_dir: Path) -> Path | None:
    found = sorted(p for p in ckpt_dir.glob("round_*.npz") if _NAME.search(p.name))
    return found[-1] if found else None


def load(path: Path, template: Any) -> tuple[Any, dict[str, Any]]:
    """(state shaped like `template`, header) from a checkpoint file."""
    with np.load(path) as z:
        header = json.loads(bytes(z["header"]).decode())
        keys = sorted(k for k in z.files if k.startswith("s"))
        flat = [z[k] for k in keys]
    expected = len(tf.nest.flatten(template))
    if len(flat) != expected:
        raise ValueError(f"{path}: holds {len(flat)} state tensors, the process expects {expected}")
    return tf.nest.pack_sequence_as(template, flat), header
