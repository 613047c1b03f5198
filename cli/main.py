"""`tff-privseg`: the click group. Sub-commands live in their own modules and stay thin.

Commands are imported on first use (LazyGroup), so `--help` and `data` never load TensorFlow.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from cli import common  # (also sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)

# name -> "module:attribute"; a module that is not there yet simply hides its command.
COMMANDS = {
    "data": "cli.data:data",
    "privacy": "cli.privacy:privacy",
    "train": "cli.train:train",
    "evaluate": "cli.evaluate:evaluate",
    "predict": "cli.evaluate:predict",
    "export": "cli.export:export",
    "report": "cli.report:report",
    "attack": "cli.attack:attack",
    "audit": "cli.attack:audit",
    "bench": "cli.bench:bench",
    "worker": "cli.worker:worker",
    "site": "cli.site:site",
    "config": "cli.config_cmd:config",
    "compare": "cli.compare:compare",
}


def _one_line(error: click.UsageError) -> click.UsageError:
    """A usage error (bad option value, missing argument) shown like every other error: one
    line on stderr, ``error: ...`` (click's default is usage, hint and message on 3+ lines)."""
    if isinstance(error, click.exceptions.NoArgsIsHelpError):
        return error  # no arguments at all: click shows the help, as it should
    ctx = error.ctx

    def show(file: object = None) -> None:
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        click.echo(f"error: {error.format_message()}{hint}", err=True)

    error.show = show  # type: ignore[method-assign]
    return error


class LazyGroup(click.Group):
    def make_context(self, *args, **kwargs) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _one_line(e) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, target in COMMANDS.items() if _exists(target))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None or not _exists(target):
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


def _exists(target: str) -> bool:
    return importlib.util.find_spec(target.split(":")[0]) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="tff_privseg")
def cli(debug: bool) -> None:
    """Differentially private federated CT segmentation on TensorFlow Federated.

    Typical flow: `data synth` (or `data example`) -> `data check` -> `privacy` -> `train`
    -> `evaluate` / `export` / `attack`.
    """


def main() -> None:
    common.install_signal_handlers()
    cli(prog_name="tff-privseg")


if __name__ == "__main__":
    sys.exit(main())
