"""The names of a run directory's files (`train --out RUN`), in one place.

config.toml         resolved config
metrics.jsonl       one JSON object per round (`round`, `val_dice`, `epsilon`, `delta`, ...)
privacy.json        the privacy ledger: every number needed to recompute ε
checkpoints/        round_NNNNNN.npz (TFF state + ledger + noise key, one atomic file each)
secret/run_key      the run's secret noise key
secret/data_digest  keyed digest of the training/validation slices
model.keras         final Keras model (probabilities out), and model.weights.h5
tensorboard/        scalars per round
eval_SPLIT/         `evaluate`'s output (evaluation.json, predictions/, overlays/)
.lock               held (flock) by the one train running on the directory
"""

from __future__ import annotations

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
PRIVACY = "privacy.json"
CHECKPOINTS = "checkpoints"
SECRET = "secret"
RUN_KEY = "run_key"
DATA_DIGEST = "data_digest"
MODEL = "model.keras"
WEIGHTS = "model.weights.h5"
TENSORBOARD = "tensorboard"
EVALUATION = "evaluation.json"
LOCK = ".lock"


def eval_dir(split: str) -> str:
    """`evaluate`'s default output folder inside the run directory."""
    return f"eval_{split}"
