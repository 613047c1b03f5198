"""Mutual-TLS front door for a TFF worker that listens only on a private Unix socket.

    coordinator --TLS 1.2+/mTLS, ALPN h2--> this proxy (HOST:PORT)
                --Unix socket 0600--> netns_bridge --private netns loopback--> worker_binary

Why a stdlib `ssl` + asyncio forwarder and not stunnel: TLS itself is OpenSSL either way (Python's
`ssl` module is a thin binding to the system OpenSSL 3), and what remains here is ~60 lines of
byte copying. It needs no system package, no config file generation and no third process to
supervise; it runs in the `tff-privseg worker` process itself, so the worker's lifecycle stays one
process tree that dies together (the bridge and the worker die with us via PR_SET_PDEATHSIG).
The policy is set explicitly rather than inherited: TLS >= 1.2, client certificate REQUIRED and
verified against the federation CA only (no system roots), strict X.509 checks, AEAD +
forward-secret ciphers for TLS 1.2, no renegotiation, ALPN "h2" (gRPC insists on it). OpenSSL
checks the client certificate's purpose (extended key usage clientAuth) on the server side.

The proxy is protocol-agnostic (bytes in, bytes out); gRPC/HTTP2 framing, keepalives and flow
control pass through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable

from tff_privseg.errors import UserError

log = logging.getLogger("tff_privseg.worker")

_CHUNK = 1 << 20
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_context(cert: str | os.PathLike, key: str | os.PathLike, ca: str | os.PathLike):
    """An SSLContext that accepts only clients with a certificate signed by `ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    except (ssl.SSLError, OSError) as e:  # OpenSSL does not say which of the two it was
        raise UserError(f"cannot load the certificate with key {key}: {e}", cert) from None
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca))  # the federation CA only, no system roots
    except (ssl.SSLError, OSError) as e:
        raise UserError(f"cannot load the CA certificate: {e}", ca) from None
    ctx.set_ciphers(_TLS12_CIPHERS)  # (TLS 1.3 suites are all AEAD + ephemeral already)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["h2"])
    return ctx


def client_context(cert: str | os.PathLike, key: str | os.PathLike, ca: str | os.PathLike):
    """The matching client side (used to probe a worker and explain a refused connection)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    ctx.load_verify_locations(cafile=os.fspath(ca))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
    cert = writer.get_extra_info("peercert") or {}
    cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None)
    return f"{addr} (CN={cn})" if cn else addr


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class Forwarder:
    """Listens on host:port (TLS unless `ssl_context` is None) and forwards to a Unix socket."""

    def __init__(
        self,
        host: str,
        port: int,
        upstream: str,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float = 15.0,
    ) -> None:
        self.host, self.port, self.upstream = host, port, upstream
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> tuple[str, int]:
        kwargs = {}
        if self.ssl_context is not None:
            kwargs = {"ssl": self.ssl_context, "ssl_handshake_timeout": self.handshake_timeout}
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=_CHUNK, reuse_address=True, **kwargs
        )
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        peer = _peer_name(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_unix_connection(
                    self.upstream, limit=_CHUNK
                )
            except OSError as e:
                log.error("connection from %s dropped: worker unreachable (%s)", peer, e)
                writer.close()
                return
            log.info("coordinator connected: %s", peer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            log.info("coordinator disconnected: %s", peer)
        finally:
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)


async def serve_until(
    forwarder: Forwarder,
    stop: asyncio.Event,
    alive: Callable[[], bool],
    on_ready: Callable[[str, int], None],
    poll: float = 0.5,
) -> bool:
    """Run `forwarder` until `stop` is set (True) or `alive()` turns False (returns False)."""
    host, port = await forwarder.start()
    on_ready(host, port)
    try:
        while not stop.is_set():
            if not alive():
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), poll)
        return True
    finally:
        await forwarder.close()
