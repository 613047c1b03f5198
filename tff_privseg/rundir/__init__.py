"""The run directory (`train --out RUN`): its names, checkpoints, writer, resume checks, reader.

Layout and file names: `layout`; ε's JSON encoding: `epsilon`; round checkpoints:
`checkpoint`; the run key and data digest: `key`; writing: `writer.RunDir`; whether a directory
can take a run: `resume.prepare_run_dir`; reading it back: `reader.open_run`.
"""

from tff_privseg.rundir import checkpoint, layout
from tff_privseg.rundir.epsilon import epsilon_from_json, epsilon_to_json, finite_epsilon
from tff_privseg.rundir.key import data_digest, new_run_key, read_run_key
from tff_privseg.rundir.reader import (
    Run,
    check_run_dir,
    load_keras_model,
    open_run,
    read_json,
    read_json_object,
    read_metrics,
    read_privacy,
)
from tff_privseg.rundir.resume import config_differences, prepare_run_dir
from tff_privseg.rundir.writer import RunDir

__all__ = [
    "Run",
    "RunDir",
    "check_run_dir",
    "checkpoint",
    "config_differences",
    "data_digest",
    "epsilon_from_json",
    "epsilon_to_json",
    "finite_epsilon",
    "layout",
    "load_keras_model",
    "new_run_key",
    "open_run",
    "prepare_run_dir",
    "read_json",
    "read_json_object",
    "read_metrics",
    "read_privacy",
    "read_run_key",
]
