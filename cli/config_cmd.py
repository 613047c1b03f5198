"""`tff-privseg config`: convert the PyTorch baseline's INI, show and validate TOML configs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cli import common
from cli.common import emit, handle_errors, json_option


@click.group()
def config() -> None:
    """Convert, show and validate configs.

    `from-ini` turns the PyTorch baseline's INI file (PrivateSegmentation) into a TOML config and
    accounts for every key; `show` prints a config with every default filled in; `validate`
    checks one.
    """


@config.command("from-ini", short_help="Convert the PyTorch baseline's INI file into TOML.")
@click.argument("ini", type=click.Path(dir_okay=False, path_type=Path))
@common.out_option(
    "TOML file to write (atomically). Without it the TOML goes to stdout, the report to " "stderr.",
    dir_okay=False,
    path_type=Path,
)
@common.force_option("Overwrite --out if it exists.")
@click.option(
    "--slices-per-site",
    type=click.IntRange(1),
    help="Training slices of the largest site: turns the baseline's epochs into rounds "
    "(rounds = epochs x ceil(ceil(slices / batch_size) / sync_every_n_batch)).",
)
@common.data_option(
    "Dataset root (one folder per site): becomes data.root, and its training slices per "
    "site are counted for the epochs -> rounds conversion (loads the data).",
    file_okay=False,
    path_type=Path,
)
@click.option(
    "--base",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config for everything the INI does not set [default: the study's MoNet on MSD "
    "Task03_Liver in data/msd_liver, as configs/baseline_liver.toml].",
)
@click.option(
    "--no-augment",
    is_flag=True,
    help="Write no augmentation (what the baseline's federated segmentation actually does).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Fail (exit 2, nothing written) if any key is unsupported or unknown.",
)
@json_option
@handle_errors
def from_ini(
    ini: Path,
    out: Path | None,
    force: bool,
    slices_per_site: int | None,
    data_root: Path | None,
    base: Path | None,
    no_augment: bool,
    strict: bool,
    as_json: bool,
) -> None:
    """Convert the baseline's INI file (segmentation.ini) into our TOML config.

    Every key of the INI is reported as mapped, approximate, matched (off there and here),
    ignored, unsupported or unknown, with the reason; none is dropped silently. The report is
    also written as comments at the top of the TOML.
    """
    from tff_privseg.errors import UserError
    from tff_privseg.io import atomic_write_text
    from tff_privseg.parity.ini import convert_ini_file

    if slices_per_site is not None and data_root is not None:
        raise UserError("give --slices-per-site or --data, not both")
    if out is not None and out.exists() and not force:
        raise UserError("exists (use --force to overwrite)", out)
    conversion = convert_ini_file(
        ini,
        slices_per_site=slices_per_site,
        data_root=data_root,
        base_toml=base,
        augment=not no_augment,
        progress=None if as_json else lambda m: click.echo(m, err=True),
    )
    if strict and conversion.blocking:
        first = conversion.blocking[0]
        raise UserError(
            f"--strict: {len(conversion.blocking)} key(s) cannot be honoured, first: "
            f"[{first.section}] {first.key} ({first.status}: {first.reason})",
            ini,
        )
    text = conversion.toml()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
    result = conversion.to_json()
    result["out"] = str(out) if out is not None else None
    if out is None:
        result["toml"] = text
    if as_json:
        emit(result, True, lambda r: None)
        return
    if out is None:
        click.echo(text, nl=False)
        _print_report(result, err=True)
    else:
        _print_report(result, err=False)


def _print_report(r: dict[str, Any], err: bool) -> None:
    def say(line: str = "") -> None:
        click.echo(line, err=err)

    counts = ", ".join(f"{n} {status}" for status, n in r["counts"].items() if n)
    if r["out"]:
        say(f"wrote {r['out']} (config digest {r['digest']})")
    say(f"{r['source']}: {len(r['keys'])} keys: {counts}")
    say(r["schedule"]["explanation"])
    not_honoured = r["not_honoured"]
    if not_honoured:
        say(f"not honoured ({len(not_honoured)}):")
        for k in not_honoured:
            say(f"  [{k['section']}] {k['key']} = {k['value']}  ({k['status']}) {k['reason']}")
    approx = [k for k in r["keys"] if k["status"] == "approximate"]
    if approx:
        say(f"approximations ({len(approx)}):")
        for k in approx:
            say(f"  [{k['section']}] {k['key']} = {k['value']} -> {k['target']}  {k['reason']}")
    if r["defaults"]:
        say("absent from the INI, the baseline's defaults used: " + "; ".join(r["defaults"]))
    for note in r["notes"]:
        say(f"note: {note}")


def _file_command(name: str, short_help: str) -> Callable[[Callable], click.Command]:
    """A `config` sub-command on one TOML FILE, with --json and one-line errors."""

    def make(fn: Callable) -> click.Command:
        fn = json_option(handle_errors(fn))
        fn = click.argument("file", type=click.Path(dir_okay=False, path_type=Path))(fn)
        return config.command(name, short_help=short_help)(fn)

    return make


def _load(file: Path) -> tuple[Any, dict[str, Any]]:
    """FILE's validated config and the result fields every sub-command reports."""
    from tff_privseg import config as config_lib

    cfg = config_lib.load(file)
    return cfg, {"path": str(file), "digest": cfg.digest()}


@_file_command("show", "Print a config with every default filled in.")
def show(file: Path, as_json: bool) -> None:
    """Print the resolved TOML of FILE (validated, every default filled in)."""
    from tff_privseg import config as config_lib

    cfg, result = _load(file)
    result["config"] = config_lib.to_dict(cfg)
    emit(result, as_json, lambda r: click.echo(config_lib.dumps(cfg), nl=False))


@_file_command("validate", "Check a config; exit 2 with the problem if invalid.")
def validate(file: Path, as_json: bool) -> None:
    """Check that FILE is a valid config: known keys, right types, consistent settings."""
    _, result = _load(file)
    result["valid"] = True
    emit(result, as_json, lambda r: click.echo(f"{r['path']}: valid (digest {r['digest']})"))
