"""Results in the PyTorch baseline's formats, and a reader for its logs.

The baseline (PrivateSegmentation, ``train.py`` / ``test.py``) leaves two kinds of results:

* ``model_weights/completed_trainings.csv``: one row per training with every argument, a
  ``timestamp`` (``%Y-%m-%d_%H-%M-%S``, the training's start) and ``best_validation_score``
  (1 - the validation Dice loss of the best epoch, a fraction). Ours: one row per run with every
  config value under its dotted key (``train.batch_size``), a few run facts (``run_dir``,
  ``rounds``, ``epsilon``, ``delta``, ``seconds``), then ``timestamp`` and
  ``best_validation_score`` (the best validation Dice of the run, a fraction).
* the test printout of ``test.py --segmentation``, pooled over the whole test set::

      Dice Loss: 12.34%      (soft Dice loss of the probabilities)
      Dice Score: 87.66%     (1 - Dice loss of the predictions thresholded at 0.5)
      IoU: 78.06%            (IoU of the thresholded predictions)
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import math
import os
import re
from dataclasses import is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tff_privseg import config as config_lib
from tff_privseg.errors import UserError

TIMESTAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"  # the baseline's
SUMMARY_COLUMNS = ("run_dir", "rounds", "epsilon", "delta", "seconds")
TRAILING_COLUMNS = ("timestamp", "best_validation_score")

# Attribute names of the baseline's `Arguments` (the columns of its completed_trainings.csv and
# the rows of the argument table it prints at start-up).
BASELINE_ATTRIBUTES = frozenset(
    """
    DPSSE albu_prob batch_size beta1 beta2 bin_seg blur clahe cuda cutout data_dir dataset
    deterministic differentially_private dpsse_eps dump_gradients_every elastic encrypted_inference
    end_lr epochs equalize fog grid_distortion grid_dropout grid_shuffle hsv individual_albu_probs
    inference_resolution invert keep_optim_dict log_interval lr max_grad_norm microbatch_size
    mixup mixup_lambda mixup_prob model momentum name no_cuda noise_multiplier noise_prob noise_std
    num_threads optical_distortion optimizer pooling_type precision_fractional pretrained
    randombrightness randomgamma repetitions_dataset restarts rotation save_file scale seed shadow
    shear solarize sun_flare sync_every_n_batch target_delta test_batch_size test_interval
    train_federated train_resolution translate unencrypted_aggregation val_split
    validation_split vertical_flip_prob visdom wait_interval websockets weight_classes
    weight_decay weighted_averaging
    """.split()
)


# --------------------------------------------------------------------------------------------
# completed_trainings.csv


def flatten_config(cfg: config_lib.Config) -> dict[str, Any]:
    """Every config value under its dotted key (``data.augment.rotation``), in schema order."""
    out: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value

    walk(config_lib.to_dict(cfg) if is_dataclass(cfg) else cfg, "")
    return out


def csv_value(value: Any) -> str:
    """One CSV cell: booleans as pandas writes them (True/False), lists as JSON, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else repr(value)
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return str(value)


def completed_training_row(
    cfg: config_lib.Config, run_summary: dict[str, Any], timestamp: datetime | None = None
) -> dict[str, str]:
    """The CSV row (column -> cell) for one finished run."""
    row = {key: csv_value(v) for key, v in flatten_config(cfg).items()}
    for key in SUMMARY_COLUMNS:
        row[key] = csv_value(run_summary.get(key))
    best = run_summary.get("best_val_dice", run_summary.get("best_validation_score"))
    row["timestamp"] = (timestamp or datetime.now()).strftime(TIMESTAMP_FORMAT)
    row["best_validation_score"] = csv_value(best)
    return row


def append_completed_training(
    csv_path: str | Path,
    cfg: config_lib.Config,
    run_summary: dict[str, Any],
    timestamp: datetime | None = None,
) -> Path:
    """Append one row for a finished run to ``completed_trainings.csv``; returns the file used.

    ``run_summary`` is what ``federated.train.train`` returns (``best_val_dice`` becomes
    ``best_validation_score``; ``run_dir``, ``rounds``, ``epsilon``, ``delta`` and ``seconds``
    are copied when present). The file and its header are created when missing. The append holds
    an exclusive lock on the file, so concurrent runs never interleave rows.

    A file whose header has other columns (another config schema, or the PyTorch baseline's own
    CSV) is never rewritten or mis-aligned: the row goes to a sibling file named after the
    header, ``<stem>.<8 hex digits>.csv``, whose path is returned (compare it with ``csv_path``
    to tell the user). The same columns in another order are fine: the file's order is kept.
    """
    path = Path(csv_path)
    row = completed_training_row(cfg, run_summary, timestamp)
    written = _append_row(path, row)
    if written:
        return path
    digest = hashlib.sha256("\n".join(row).encode()).hexdigest()[:8]
    alternative = path.with_name(f"{path.stem}.{digest}{path.suffix or '.csv'}")
    if not _append_row(alternative, row):  # pragma: no cover - a digest collision
        raise UserError("header differs from this run's columns", alternative)
    return alternative


def _append_row(path: Path, row: dict[str, str]) -> bool:
    """Append under an exclusive lock; False (nothing written) when the header differs."""
    if path.is_dir():
        raise UserError("is a directory, expected a CSV file", path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+", encoding="utf-8", newline="") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            f.seek(0)
            first = f.readline()
            if first.strip():
                header = next(csv.reader([first]))
                if set(header) != set(row):
                    return False
            else:
                header = list(row)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
            if not first.strip():
                writer.writeheader()
            elif not first.endswith("\n"):  # pragma: no cover - a hand-edited file
                buf.write("\n")
            writer.writerow(row)
            f.seek(0, os.SEEK_END)
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
            return True
    except OSError as e:
        raise UserError(f"cannot append ({e.strerror or e})", path) from None


def read_text(path: Path, missing: str = "file not found") -> str:
    """The UTF-8 text of one of the baseline's files (a BOM dropped); one-line errors."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(missing, path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read ({e})", path) from None


def read_completed_trainings(path: str | Path) -> list[dict[str, str]]:
    """All rows of a completed_trainings.csv (ours or the baseline's) as column -> cell."""
    path = Path(path)
    text = read_text(path)
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as e:
        raise UserError(f"not a valid CSV file ({e})", path) from None
    if not rows:
        raise UserError("no rows (expected a header and at least one training)", path)
    return rows


# --------------------------------------------------------------------------------------------
# The test printout, and the baseline's log


def _percent(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * 100.0:.2f}%"


def baseline_test_printout(
    dice_loss: float | None, dice_score: float | None, iou: float | None
) -> str:
    """The baseline's test printout (three lines, no trailing newline). Arguments are fractions:
    the soft Dice loss, the Dice score at threshold 0.5 and the IoU, all pooled over the test set.
    """
    return "\n".join(
        [
            f"Dice Loss: {_percent(dice_loss)}",
            f"Dice Score: {_percent(dice_score)}",
            f"IoU: {_percent(iou)}",
        ]
    )


_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
_TEST_LINES = {
    "dice_loss": re.compile(rf"^\s*Dice Loss:\s*{_NUMBER}\s*%", re.M),
    "dice_score": re.compile(rf"^\s*Dice Score:\s*{_NUMBER}\s*%", re.M),
    "iou": re.compile(rf"^\s*IoU:\s*{_NUMBER}\s*%", re.M),
}
_VAL_DICE = re.compile(rf"Dice score on test set:\s*{_NUMBER}\s*%")
_EPOCH = re.compile(r"^\s*Train Epoch:\s*(\d+)", re.M)
_EPSILON = re.compile(rf"\(\s*(?:ε|eps|epsilon)\s*=\s*{_NUMBER}\s*,\s*(?:δ|delta)\s*=\s*{_NUMBER}")
_BEST = re.compile(rf"Highest objective was\s*{_NUMBER}\s*%\s*in epoch\s*(\d+)")
_ARG_ROW = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s{2,}(\S.*?)\s*$")


def parse_baseline_log(text: str) -> dict[str, Any]:
    """What a baseline training/test log says, as fractions where it prints percentages.

    Returns ``test`` (``dice_loss``, ``dice_score``, ``iou`` of the last test printout, or {}),
    ``val_dice`` (every "Dice score on test set" line: the per-epoch validation score),
    ``epochs`` (the highest "Train Epoch"), ``epsilon`` (the largest ε printed: ε grows during
    training, so this is the final ε, maximised over workers) with its ``delta``, ``best`` (the
    "Highest objective" line, value as printed) and ``args`` (the argument table printed at
    start-up, attribute -> text).
    """
    out: dict[str, Any] = {"test": {}, "val_dice": [], "epochs": None, "epsilon": None}
    out["delta"], out["best"], out["args"] = None, None, {}
    for key, pattern in _TEST_LINES.items():
        found = pattern.findall(text)
        if found:
            out["test"][key] = float(found[-1]) / 100.0
    out["val_dice"] = [float(v) / 100.0 for v in _VAL_DICE.findall(text)]
    epochs = [int(e) for e in _EPOCH.findall(text)]
    out["epochs"] = max(epochs) if epochs else None
    eps = [(float(e), float(d)) for e, d in _EPSILON.findall(text)]
    if eps:
        out["epsilon"], out["delta"] = max(eps)
    best = _BEST.findall(text)
    if best:
        out["best"] = {"value": float(best[-1][0]), "epoch": int(best[-1][1])}
    for line in text.splitlines():
        m = _ARG_ROW.match(line)
        if m and m.group(1) in BASELINE_ATTRIBUTES and m.group(1) not in out["args"]:
            out["args"][m.group(1)] = m.group(2)
    return out


__all__ = [
    "BASELINE_ATTRIBUTES",
    "append_completed_training",
    "baseline_test_printout",
    "completed_training_row",
    "flatten_config",
    "parse_baseline_log",
    "read_completed_trainings",
    "read_text",
]
