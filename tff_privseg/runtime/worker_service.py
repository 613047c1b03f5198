"""`tff-privseg worker`: a TFF executor service reachable only through mutual TLS.

The shipped `worker_binary` runs exactly as in local runs (`local.start_local_worker`: private
network namespace, Unix socket 0600, dies with us); a `tls_proxy.Forwarder` in this process is
its only network-facing door. SIGINT/SIGTERM stop the proxy, then the worker, and return; if
this process is killed outright, the kernel kills the bridge and the worker (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import ssl
import sys
from collections.abc import Callable

from tff_privseg.errors import UserError
from tff_privseg.runtime.pki import TlsFiles
from tff_privseg.runtime.tls_proxy import Forwarder, serve_until, server_context

log = logging.getLogger("tff_privseg.worker")

INSECURE_WARNING = (
    "WARNING: --insecure: the TFF executor service on {addr} is UNAUTHENTICATED and "
    "UNENCRYPTED. Anyone who can reach this port can run any TensorFlow graph as this user "
    "(read and write its files, the site's scans included) and read everything that crosses "
    "the wire. Use it only on a trusted, isolated network for testing."
)


def tls_context(tls: TlsFiles) -> ssl.SSLContext:
    """The worker's TLS context; a bad file gives one line naming that file."""
    return server_context(tls.check().cert, tls.key, tls.ca)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_worker(
    host: str,
    port: int,
    tls: TlsFiles | None,
    insecure: bool = False,
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve TFF's executor on host:port until SIGINT/SIGTERM. Blocks; always stops the worker."""
    if tls is None and not insecure:
        raise UserError(
            "refusing to serve the TFF executor without TLS: give --cert, --key and --ca "
            "(a test CA: `tff-privseg worker certs --out DIR`), or --insecure to accept "
            "unauthenticated connections"
        )
    if tls is not None and insecure:
        raise UserError("--insecure conflicts with --cert/--key/--ca: choose one")
    context = tls_context(tls) if tls is not None else None

    def ready(h: str, p: int) -> None:
        if context is None:
            msg = INSECURE_WARNING.format(addr=f"{h}:{p}")
            if not _is_loopback(h):
                msg += " It listens on a NON-LOOPBACK address."
            print(msg, file=sys.stderr, flush=True)
        if on_ready is not None:
            on_ready(h, p)

    from tff_privseg.runtime.local import start_local_worker

    worker = start_local_worker()
    try:
        if not worker.isolated:
            log.warning("the worker's own port %d is open on this host (no netns)", worker.port)

        async def main() -> bool:
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                forwarder = Forwarder(host, port, worker.socket_path, context)
                return await serve_until(
                    forwarder,
                    stop,
                    alive=lambda: worker.bridge.poll() is None,
                    on_ready=ready,
                )
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

        try:
            stopped_by_signal = asyncio.run(main())
        except OSError as e:  # bind failures: port in use, address not on this host
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
        if not stopped_by_signal:
            raise UserError("the TFF worker process exited unexpectedly; stopping")
    finally:
        worker.stop()
