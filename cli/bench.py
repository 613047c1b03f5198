"""`tff-privseg bench`: timing benchmarks (the cost of privacy and of federation)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import click

import benchmarks
from cli import common
from cli.common import emit, handle_errors, json_option

DEFAULT = ("dp_overhead", "tff_overhead", "torch_reference")


def available() -> list[str]:
    """Benchmarks of this command: the modules with `run(quick: bool) -> dict`."""
    return list(benchmarks.BENCHMARKS)


def scripts() -> list[str]:
    """Modules of benchmarks/ without `run(quick)`: scripts, run as `python -m benchmarks.NAME`."""
    return list(benchmarks.SCRIPTS)


def _load(name: str) -> ModuleType:
    try:
        return benchmarks.load(name)
    except ModuleNotFoundError as e:
        from tff_privseg.errors import UserError

        raise UserError(f"benchmark {name!r} is not available here ({e})") from None


@click.command()
@click.option(
    "--only",
    "only",
    multiple=True,
    help="Run only this benchmark (repeatable): a module of benchmarks/ with run(quick): "
    + ", ".join(DEFAULT)
    + " (the default), memory, scaling, privacy_utility, lung_federation.",
)
@click.option("--quick", is_flag=True, help="Tiny sizes and few repetitions (a smoke run).")
@common.out_option(
    "Where NAME.json files go (default: benchmarks/results/).", file_okay=False, default=None
)
@json_option
@handle_errors
def bench(only: tuple[str, ...], quick: bool, out: str | None, as_json: bool) -> None:
    """Benchmarks: DP-SGD step vs non-private step, TFF round vs in-process, PyTorch/Opacus.

    \b
    Default: dp_overhead, tff_overhead, torch_reference. With --only NAME also:
      memory           RSS (coordinator + TFF worker) over 30 rounds; 3 vs 12 sites
      scaling          TFF round time vs sites (3/6/12) and resolution (64/128/256)
      privacy_utility  val and test Dice (mean ± sd over 3 secret keys) of centralized /
                       FedAvg / slice- and patient-level DP-SGD at ε 1, 3, 8 (trains each
                       3 times: an hour or more; --quick is 2 rounds of configs/smoke.toml)
      lung_federation  real lung CT (data/example_lung): FedAvg vs each site alone
                       (in-sample and on the unseen site) vs pooled vs slice-level DP-SGD,
                       Dice and HD95 per site (11 trainings, ~1 h; also NAME.md)

    Each benchmark prints its figures and writes benchmarks/results/NAME.json (figures,
    configuration, machine; privacy_utility also NAME.md). With --json the last line is one
    object whose top level has `dp_overhead` and `tff_overhead` (ratios; null when not run)
    and every benchmark's result. benchmarks/attack.py is a script (python -m benchmarks.attack).
    """
    from benchmarks.common import machine, save

    names = list(dict.fromkeys(only)) or list(DEFAULT)  # each once, in the order given
    bench_names, script_names = available(), scripts()
    unknown = [n for n in names if n not in bench_names]
    if unknown:  # checked before anything runs
        from tff_privseg.errors import UserError

        not_bench = [n for n in unknown if n in script_names]
        if not_bench:
            raise UserError(
                f"benchmarks/{not_bench[0]}.py is a script, not a benchmark of this command "
                f"(no run(quick)): run it as `python -m benchmarks.{not_bench[0]}` "
                f"(available: {', '.join(bench_names)})"
            )
        raise UserError(
            f"unknown benchmark {', '.join(unknown)} (available: {', '.join(bench_names)})"
        )
    command = "tff-privseg " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results: dict[str, Any] = {}
    for name in names:
        module = _load(name)
        if not callable(getattr(module, "run", None)):
            from tff_privseg.errors import UserError

            raise UserError(f"benchmarks/{name}.py has no run(quick) entry point")
        result = dict(module.run(quick=quick))
        markdown = result.pop("markdown", None)  # a table, written next to the JSON
        path = save(name, result, Path(out) if out else None, command=command)
        if markdown is not None:
            path.with_suffix(".md").write_text(markdown)
        result = {k: v for k, v in result.items() if k != "figures"} | {
            "figures": _strip(result.get("figures", {})),
            "file": str(path),
        }
        results[name] = result
    summary: dict[str, Any] = {
        "dp_overhead": results.get("dp_overhead", {}).get("ratio"),
        "tff_overhead": results.get("tff_overhead", {}).get("ratio"),
        "dp_over_opacus": results.get("torch_reference", {}).get("ratio"),
        "quick": quick,
        "machine": machine(),
        "benchmarks": results,
    }
    emit(summary, as_json, _print)


def _strip(figures: Any) -> Any:
    """Figures without raw per-repetition samples (they stay in the JSON files)."""
    if isinstance(figures, dict):
        return {
            k: _strip(v) for k, v in figures.items() if k not in ("timings",) and "samples" not in k
        }
    return figures


def _print(s: dict[str, Any]) -> None:
    m = s["machine"]
    click.echo(f"machine: {m['cpu']}, {m['cores_usable']} cores, TF {m['tensorflow']}")
    for name, r in s["benchmarks"].items():
        if r.get("skipped"):
            click.echo(f"{name}: {r['skipped']}")
            continue
        ratio = r.get("ratio")
        head = f"{ratio:.2f}x" if isinstance(ratio, int | float) else "-"
        click.echo(f"{name}: {head}  ({r.get('ratio_definition', '')})  -> {r['file']}")
        if isinstance(r.get("growth_pct"), int | float):
            click.echo(f"  growth {r['growth_pct']:+.1f} %  ({r.get('growth_definition', '')})")
