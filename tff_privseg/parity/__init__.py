"""Parity with the PyTorch reference implementation ("PrivateSegmentation", PyTorch + PySyft).

* ``ini``: the baseline's INI file -> our TOML config, every key accounted for.
* ``baseline_format``: results in the baseline's formats (``completed_trainings.csv`` rows, the
  test printout) and a parser for its logs.
* ``compare``: a run directory side by side with a baseline CSV row or log.

Nothing here imports TensorFlow (except ``ini.count_training_slices``, which loads a dataset).
"""
