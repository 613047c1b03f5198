"""`tff-privseg worker`: serve TFF's executor behind mutual TLS; `worker certs`: a test PKI."""

from __future__ import annotations

import logging
from typing import Any

import click

from cli import common
from cli.common import emit, handle_errors, json_option


@click.group(invoke_without_command=True)
@click.option("--port", type=click.IntRange(0, 65535), help="TCP port to listen on (0: any free).")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; use this machine's address (or 0.0.0.0) to serve a coordinator.",
)
@click.option("--cert", type=click.Path(dir_okay=False), help="Worker certificate (PEM).")
@click.option("--key", type=click.Path(dir_okay=False), help="Worker private key (PEM).")
@click.option(
    "--ca", type=click.Path(dir_okay=False), help="CA (PEM) whose client certificates we accept."
)
@common.tls_dir_option(
    "Directory from `worker certs`: server.pem, server.key, ca.pem (instead of the three)."
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Serve WITHOUT TLS or authentication (anyone reaching the port runs code). Tests only.",
)
@click.pass_context
@handle_errors
def worker(
    ctx: click.Context,
    port: int | None,
    host: str,
    cert: str | None,
    key: str | None,
    ca: str | None,
    tls_dir: str | None,
    insecure: bool,
) -> None:
    """Serve a TFF executor to a coordinator (`train --workers HOST:PORT,...`).

    TFF's worker_binary runs in a private network namespace, reachable only through a Unix
    socket; this command puts a mutual-TLS endpoint (TLS 1.2+, client certificates signed by
    --ca required) in front of it on HOST:PORT. Stop with Ctrl-C or SIGTERM: the worker stops
    with it. Prints `listening on tls://HOST:PORT` once ready.
    """
    if ctx.invoked_subcommand is not None:
        return
    from tff_privseg.errors import UserError
    from tff_privseg.runtime import TlsFiles, run_worker

    if port is None:
        raise UserError("--port is required (0 picks a free port)")
    given = {"--cert": cert, "--key": key, "--ca": ca}
    tls = None
    if tls_dir is not None:
        if any(given.values()):
            raise UserError("give either --tls-dir or --cert/--key/--ca, not both")
        tls = TlsFiles.server(tls_dir)
    elif any(given.values()):
        missing = [k for k, v in given.items() if not v]
        if missing:
            raise UserError(f"TLS needs --cert, --key and --ca; missing {', '.join(missing)}")
        tls = TlsFiles(cert, key, ca)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker: %(message)s")

    def ready(h: str, p: int) -> None:
        scheme = "tcp" if tls is None else "tls"
        click.echo(f"listening on {scheme}://{h}:{p}", nl=True)
        click.get_text_stream("stdout").flush()

    run_worker(host, port, tls, insecure=insecure, on_ready=ready)
    click.echo("stopped", err=True)


@worker.command()
@common.out_option("Output directory.", required=True, file_okay=False)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Name or IP the coordinator uses to reach a worker (repeatable); localhost is added.",
)
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@common.force_option("Overwrite existing files.")
@json_option
@handle_errors
def certs(out: str, hosts: tuple[str, ...], days: int, force: bool, as_json: bool) -> None:
    """Create a test CA, a worker certificate (for --host names) and a coordinator certificate.

    Writes ca.pem, ca.key, server.pem/.key (workers: `worker --tls-dir DIR`) and client.pem/.key
    (coordinator: `train --tls-dir DIR`). Keys are 0600. Copy only what each party needs: a
    worker needs ca.pem + server.*, the coordinator ca.pem + client.*; keep ca.key offline.
    """
    from tff_privseg.runtime import make_pki

    result = make_pki(out, hosts, days=days, force=force)
    emit(result, as_json, _print_certs)


def _print_certs(r: dict[str, Any]) -> None:
    click.echo(f"CA:          {r['ca']}  (key {r['ca_key']}: keep offline)")
    click.echo(f"worker:      {r['server_cert']}  {r['server_key']}  (valid for {r['hosts']})")
    click.echo(f"coordinator: {r['client_cert']}  {r['client_key']}")
