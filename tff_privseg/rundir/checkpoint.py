"""Round checkpoints: the whole TFF state and the privacy ledger, committed as one file.

One `.npz` per round holds the flattened learning-process state (model, optimizer and aggregator
state) next to a JSON header (round, privacy ledger, the run's secret noise key). Because state
and ledger share one file, written to a temporary name, fsynced and renamed, a crash can never
leave a checkpoint whose ε disagrees with its model, nor a half-written one. (TFF's
FileProgramStateManager writes a SavedModel directory per version, which would need a second
file for the ledger and a second rename.)

A checkpoint holds the noise key, so it is a secret: mode 0600 in a 0700 folder. A file damaged
after the fact (truncated, a flipped bit: the zip's CRC catches it) is skipped by `load_newest`,
which falls back to the newest one that loads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from tff_privseg.errors import UserError
from tff_privseg.io import atomic_write, private_dir

__all__ = [
    "all_checkpoints",
    "latest",
    "load",
    "load_newest",
    "model_arrays",
    "path_for",
    "round_of",
    "save",
]

_NAME = re.compile(r"round_(\d{6})\.npz$")


def save(ckpt_dir: Path, round_num: int, state: Any, header: dict[str, Any], keep: int = 2) -> Path:
    """Write `round_{round_num}.npz` atomically (0600) and prune all but the newest `keep`."""
    private_dir(ckpt_dir)
    flat = tf.nest.flatten(state)
    arrays = {f"s{i:05d}": np.asarray(v) for i, v in enumerate(flat)}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    path = path_for(ckpt_dir, round_num)
    atomic_write(path, lambda f: np.savez(f, **arrays), mode=0o600)
    for old in all_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def path_for(ckpt_dir: Path, round_num: int) -> Path:
    """The checkpoint file of round `round_num` (which may not exist)."""
    return ckpt_dir / f"round_{round_num:06d}.npz"


def all_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    return sorted(p for p in ckpt_dir.glob("round_*.npz") if _NAME.search(p.name))


def round_of(path: Path) -> int:
    return int(_NAME.search(path.name).group(1))


def latest(ckpt_dir: Path) -> Path | None:
    found = all_checkpoints(ckpt_dir)
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
    if header.get("round") != round_of(path):
        raise ValueError(f"{path}: header says round {header.get('round')}")
    return tf.nest.pack_sequence_as(template, flat), header


def model_arrays(path: Path, count: int) -> list[np.ndarray]:
    """The first `count` state tensors of a checkpoint (the global model's trainable weights
    lead the flattened TFF state); fewer when it holds fewer."""
    with np.load(path) as z:
        return [z[f"s{i:05d}"] for i in range(count) if f"s{i:05d}" in z.files]


def load_newest(
    ckpt_dir: Path, template: Any, warn: Callable[[str], None]
) -> tuple[Path, Any, dict[str, Any]] | None:
    """The newest checkpoint that loads: (path, state, header); None when there is none.

    A damaged newer one is reported through `warn` (one line naming it) and skipped; when
    checkpoints exist and none loads, one `UserError` names the newest and its problem.
    """
    found = all_checkpoints(ckpt_dir)
    problems = []
    for path in reversed(found):
        try:
            state, header = load(path, template)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # BadZipFile, a CRC mismatch, EOFError, ValueError, OSError ...
            problems.append((path, _why(e)))
            continue
        for bad, why in problems:
            warn(f"warning: {bad}: damaged checkpoint ({why}); resuming from {path.name}")
        return path, state, header
    if problems:
        bad, why = problems[0]
        others = f"; none of the {len(found)} checkpoints loads" if len(found) > 1 else ""
        raise UserError(f"damaged checkpoint ({why}){others}", bad)
    return None


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
