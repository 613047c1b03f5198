"""Evaluation and prediction: a run directory -> metrics, NIfTI masks on the source grid, overlays.

``evaluate`` (``evaluation``) scores a run on a split of a dataset (``scores``, ``overlay``);
``predict`` (``prediction``) runs a run directory or an exported SavedModel on new scans
(``scans``). Output folders are staged and renamed into place (``output``); volume geometry
is ``data.geometry``.
"""

from tff_privseg.data.geometry import THRESHOLD, mask_on_grid
from tff_privseg.evaluate.evaluation import EVALUATION_FILE, SPLITS, evaluate, evaluate_sites
from tff_privseg.evaluate.output import check_output, staged_output
from tff_privseg.evaluate.prediction import (
    PREDICTIONS_FILE,
    SAVED_MODEL_FILE,
    PredictFn,
    keras_predict_fn,
    load_predictor,
    predict,
)
from tff_privseg.evaluate.scans import read_scan
from tff_privseg.rundir import Run
from tff_privseg.rundir import open_run as load_run

__all__ = [
    "EVALUATION_FILE",
    "PREDICTIONS_FILE",
    "SAVED_MODEL_FILE",
    "SPLITS",
    "THRESHOLD",
    "PredictFn",
    "Run",
    "check_output",
    "evaluate",
    "evaluate_sites",
    "keras_predict_fn",
    "load_predictor",
    "load_run",
    "mask_on_grid",
    "predict",
    "read_scan",
    "staged_output",
]
