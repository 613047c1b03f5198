"""Timing benchmarks of tff_privseg (run them with `tff-privseg bench`).

Each benchmark module of BENCHMARKS has `run(quick: bool) -> dict` returning JSON-able results
with `figures`, `config` and a headline `ratio`; `benchmarks.common.save` adds the machine
description and writes NAME.json into the caller's results folder (default
benchmarks/results/ under the current directory). SCRIPTS are run as
`python -m benchmarks.NAME`, not through `bench`. See benchmarks/README.md.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> module; imported only when run (most import TensorFlow).
BENCHMARKS: dict[str, str] = {
    "cross_silo": "benchmarks.cross_silo",
    "dp_overhead": "benchmarks.dp_overhead",
    "lung_federation": "benchmarks.lung_federation",
    "memory": "benchmarks.memory",
    "privacy_utility": "benchmarks.privacy_utility",
    "scaling": "benchmarks.scaling",
    "tff_overhead": "benchmarks.tff_overhead",
    "torch_reference": "benchmarks.torch_reference",
}
SCRIPTS: dict[str, str] = {"attack": "benchmarks.attack"}


def load(name: str) -> ModuleType:
    """The module of benchmark or script `name` (KeyError when it is neither)."""
    return importlib.import_module({**BENCHMARKS, **SCRIPTS}[name])
