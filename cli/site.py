"""`tff-privseg site serve`: a hospital's site process for cross-silo training."""

from __future__ import annotations

import logging

import click

from cli import common
from cli.common import handle_errors


@click.group()
def site() -> None:
    """A site (hospital) process for cross-silo training: data, key and budget stay here."""


@site.command()
@common.config_option(
    "Site config: a [site.accept] table (what the site accepts) and the [data] settings.",
    required=True,
)
@common.data_option(
    "This site's folder (any layout `data check` reads).", required=True, file_okay=False
)
@click.option(
    "--listen",
    required=True,
    metavar="HOST:PORT",
    help="Address to serve the coordinator on (port 0: any free port).",
)
@common.tls_dir_option(
    "server.pem, server.key and ca.pem (the coordinator's client certificate must be "
    "signed by this CA).",
    required=True,
)
@common.path_option(
    "--state",
    "state_dir",
    file_okay=False,
    help="Where the site keeps its key, ledgers and preprocessed cache "
    "[default: DATA.site-state beside the data folder].",
)
@handle_errors
def serve(
    config_path: str, data_root: str, listen: str, tls_dir: str, state_dir: str | None
) -> None:
    """Serve this site's local training to a coordinator (`train --sites NAME=HOST:PORT,...`).

    Loads and preprocesses the site's scans, keeps the site's own secret key and privacy
    ledger in the state folder, and answers only noised updates and aggregate validation
    counts; rounds outside [site.accept] or over the site's ε limit are refused (one line, to
    the coordinator and here). Prints `listening on tls://HOST:PORT NAME` once ready; stops on
    Ctrl-C or SIGTERM.
    """
    from pathlib import Path

    from tff_privseg.errors import UserError
    from tff_privseg.runtime import TlsFiles
    from tff_privseg.silo.policy import load_site_config

    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UserError(f"--listen: '{listen}' is not HOST:PORT")
    tls = TlsFiles.server(tls_dir).check()
    site_cfg = load_site_config(config_path)
    data = Path(data_root).resolve()
    state = Path(state_dir) if state_dir else data.with_name(data.name + ".site-state")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s site: %(message)s")

    from tff_privseg.silo.site import SiteService
    from tff_privseg.silo.site import serve as run_server

    service = SiteService(site_cfg, data, state)

    def ready(h: str, p: int) -> None:
        click.echo(f"listening on tls://{h}:{p} {service.name}")
        click.get_text_stream("stdout").flush()

    run_server(service, host.strip("[]"), int(port), tls, on_ready=ready)
    click.echo("stopped", err=True)
