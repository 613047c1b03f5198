"""`tff-privseg`: the click group. Sub-commands live in their own modules and stay thin."""

from __future__ import annotations

import signal
import sys

import click

from cli import common  # (also sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)
from cli.data import data
from cli.privacy import privacy
from cli.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="tff_privseg")
def cli(debug: bool) -> None:
    """Differentially private federated CT segmentation on TensorFlow Federated.

    Typical flow: `data synth` (or `data example`) -> `data check` -> `privacy` -> `train`.
    """


cli.add_command(data)
cli.add_command(train)
cli.add_command(privacy)


def main() -> None:
    signal.signal(signal.SIGTERM, common.raise_terminated)
    cli(prog_name="tff-privseg")


if __name__ == "__main__":
    sys.exit(main())
