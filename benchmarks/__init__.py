"""Timing benchmarks of tff_privseg (run them with `tff-privseg bench`).

Each benchmark module has `run(quick: bool) -> dict` returning JSON-able results with
`figures`, `config` and a headline `ratio`; `benchmarks.common.save` adds the machine
description and writes benchmarks/results/NAME.json. See benchmarks/README.md.
"""
