"""`tff-privseg bench`: timing benchmarks (the cost of privacy and of federation)."""

from __future__ import annotations

import importlib
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from cli.common import emit, handle_errors, json_option

# The benchmarks live next to the package in the source tree (benchmarks/), not inside it.
_ROOT = Path(__file__).resolve().parents[1]

DEFAULT = ("dp_overhead", "tff_overhead", "torch_reference")
_NOT_BENCHMARKS = {"__init__", "common"}


def available() -> list[str]:
    """Benchmark modules in benchmarks/ (each has `run(quick: bool) -> dict`)."""
    return sorted(
        p.stem
        for p in (_ROOT / "benchmarks").glob("*.py")
        if p.stem not in _NOT_BENCHMARKS and not p.stem.startswith("_")
    )


def _load(name: str):
    if (_ROOT / "benchmarks" / "__init__.py").exists() and str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as e:
        from tff_privseg.errors import UserError

        raise UserError(f"benchmark {name!r} is not available here ({e})") from None


@click.command()
@click.option(
    "--only",
    "only",
    multiple=True,
    help="Run only this benchmark (repeatable): a module of benchmarks/, e.g. "
    + ", ".join(DEFAULT)
    + ". Default: those three.",
)
@click.option("--quick", is_flag=True, help="Tiny sizes and few repetitions (a smoke run).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where NAME.json files go (default: benchmarks/results/).",
)
@json_option
@handle_errors
def bench(only: tuple[str, ...], quick: bool, out_dir: str | None, as_json: bool) -> None:
    """Benchmarks: DP-SGD step vs non-private step, TFF round vs in-process, PyTorch/Opacus.

    Each benchmark prints its figures and writes benchmarks/results/NAME.json (figures,
    configuration, machine). With --json the last line is one object whose top level has
    `dp_overhead` and `tff_overhead` (ratios; null when not run) and every benchmark's result.
    """
    names = list(only) or list(DEFAULT)
    unknown = [n for n in names if n not in available()]
    if unknown:
        from tff_privseg.errors import UserError

        raise UserError(
            f"unknown benchmark {', '.join(unknown)} (available: {', '.join(available())})"
        )
    common = _load("common")
    command = "tff-privseg " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results: dict[str, Any] = {}
    for name in names:
        module = _load(name)
        if not callable(getattr(module, "run", None)):
            from tff_privseg.errors import UserError

            raise UserError(f"benchmarks/{name}.py has no run(quick) entry point")
        result = module.run(quick=quick)
        path = common.save(name, result, Path(out_dir) if out_dir else None, command=command)
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
        "machine": common.machine(),
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
