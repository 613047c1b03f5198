"""Reading a run directory back: `evaluate`, `predict`, `export`, `report`, `compare`, `attack`.

`open_run` checks the folder and loads what the evaluating commands need (config, privacy
ledger, metrics rows, the Keras model); the smaller readers serve the commands that read a run
more defensively (`report` needs only the rows, `compare` reads whatever is there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tff_privseg import config as config_lib
from tff_privseg.config import Config
from tff_privseg.errors import UserError
from tff_privseg.rundir import checkpoint, layout
from tff_privseg.rundir.epsilon import epsilon_from_json


@dataclass
class Run:
    """A finished training run: resolved config, Keras model and the privacy ledger (if any)."""

    path: Path
    cfg: Config
    model: Any  # tf.keras.Model: probabilities out, input (R, R, 1); None when not loaded
    privacy: dict[str, Any] | None
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rounds(self) -> int | None:
        """The last round logged in metrics.jsonl (None: none)."""
        return self.metrics[-1]["round"] if self.metrics else None

    @property
    def epsilon(self) -> float | None:
        """The ledger's ε (∞ without DP); None without privacy.json or without a number."""
        return None if self.privacy is None else epsilon_from_json(self.privacy.get("epsilon"))

    def latest_checkpoint(self) -> Path | None:
        return checkpoint.latest(self.path / layout.CHECKPOINTS)


def check_run_dir(path: str | Path, need: tuple[str, ...] = (layout.CONFIG, layout.MODEL)) -> Path:
    """The run directory ``path`` exists and holds the files in ``need`` (else UserError)."""
    path = Path(path)
    if not path.exists():
        raise UserError("run directory not found", path)
    if not path.is_dir():
        raise UserError("not a run directory (expected the folder of `train --out`)", path)
    for name in need:
        if not (path / name).is_file():
            hint = " (training not finished?)" if name == layout.MODEL else ""
            raise UserError(f"incomplete run directory: no {name}{hint}", path)
    return path


def open_run(path: str | Path, need_privacy: bool = False, model: bool = True) -> Run:
    """Load a run directory written by ``train`` (config.toml, model.keras[, privacy.json])."""
    need = (layout.CONFIG, layout.MODEL) + ((layout.PRIVACY,) if need_privacy else ())
    path = check_run_dir(path, need)
    cfg = config_lib.load(path / layout.CONFIG)
    privacy = read_privacy(path)
    keras = load_keras_model(path / layout.MODEL, cfg.data.resolution) if model else None
    return Run(path, cfg, keras, privacy, read_metrics(path / layout.METRICS))


def read_privacy(path: Path) -> dict[str, Any] | None:
    """RUN/privacy.json as a dict; None when missing (UserError when not a JSON object)."""
    file = path / layout.PRIVACY
    privacy = read_json(file) if file.exists() else None
    if privacy is not None and not isinstance(privacy, dict):
        raise UserError("not a privacy ledger (expected a JSON object)", file)
    return privacy


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"not readable JSON ({type(e).__name__}: {e})", path) from None


def read_json_object(path: Path, warnings: list[str], required: bool) -> dict[str, Any] | None:
    """A JSON object, or None with a line in ``warnings`` (missing, unreadable, not an object)."""
    if not path.is_file():
        if required:
            warnings.append(f"{path.name} missing")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.append(f"{path.name} unreadable ({e}); ignored")
        return None
    if not isinstance(data, dict):
        warnings.append(f"{path.name} is not a JSON object; ignored")
        return None
    return data


def read_metrics(
    path: Path, lenient: bool = False, warnings: list[str] | None = None
) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` (one JSON object per round); [] when the file is missing.

    A line that is not a round record raises UserError, or (``lenient``: a row cut short by a
    crash or a full disk) is skipped, with a line in ``warnings`` when given.
    """
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"not readable ({e})", path) from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problem, detail = f"line {n} is not JSON", f" ({e})"
        else:
            if isinstance(row, dict) and "round" in row:
                rows.append(row)
                continue
            problem, detail = f"line {n} is not a round record", ""
        if not lenient:
            raise UserError(problem + detail, path)
        if warnings is not None:
            warnings.append(f"{path.name} {problem}; skipped")
    return rows


def load_keras_model(path: Path, resolution: int | None = None) -> Any:
    """``model.keras`` -> tf.keras.Model (uncompiled); input must be (None, R, R, 1)."""
    from tff_privseg.models import load_model

    try:
        model = load_model(path)
    except Exception as e:  # noqa: BLE001 - any failure to deserialise is the file's problem
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"cannot load the Keras model ({first})", path) from None
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 1 or (resolution and shape[1:3] != (resolution,) * 2):
        raise UserError(
            f"model input shape {shape} does not match the config "
            f"(expected (None, {resolution}, {resolution}, 1))",
            path,
        )
    return model
