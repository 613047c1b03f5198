"""Coordinator side of multi-worker execution, on TFF's own distributed runtime.

Each worker (`tff-privseg worker`) is one TFF executor service. Here every worker gets TFF's
`RemoteExecutor` over a `RemoteExecutorGrpcStub` on a `grpc.secure_channel` (mutual TLS), inside
a `ResourceManagingExecutorFactory` and a `SyncExecutionContext`. With several workers TFF's
`MergeableCompExecutionContext` drives them (each behind a thread: see
`_threaded_async_context`): it compiles each computation to mergeable form (work up to the
single aggregation / merge / work after it), splits the CLIENTS-placed values into one
contiguous slice of clients per worker, runs `up_to_merge` on the workers in parallel, merges
the partial aggregates on a worker, then runs `after_merge` (DP noise, server update) once.
Secure-sum intrinsics are lowered to plain sums first, as in `contexts.compile_native`.

Failure policy: TFF's execution context retries "retryable" gRPC errors (UNAVAILABLE) forever,
which turns a dead worker into a silent hang. Our stub raises `WorkerLost` (a `UserError` naming
HOST:PORT, and a `grpc.RpcError` so TFF's own cleanup still swallows it) instead: the round fails
fast, the last checkpoint stays intact, and `train --resume` continues once the worker is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from tff_privseg.errors import UserError
from tff_privseg.runtime.contexts import GRPC_OPTIONS, default_context_scope, worker_context
from tff_privseg.runtime.local import local_runtime
from tff_privseg.runtime.pki import TlsFiles

# HTTP/2 keepalive: detect a worker host that vanished without closing the connection. The
# worker's gRPC server answers pings more often than every 5 min with GOAWAY (too_many_pings)
# while a long Compute call sends no data, so stay above that.
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 330_000),
    ("grpc.keepalive_timeout_ms", 60_000),
    ("grpc.keepalive_permit_without_calls", 0),
]

# HTTP/2 client preface + an empty SETTINGS frame: makes a gRPC server answer.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])

_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[A-Za-z0-9.\-_]+)):(?P<port>\d+)$")


class WorkerLost(UserError, grpc.RpcError):
    """A worker stopped answering (died, restarted, unreachable) or failed a call."""

    def __init__(self, address: str, detail: str) -> None:
        self.address = address
        super().__init__(
            f"worker {address} {detail}; the round was not applied (the last checkpoint is "
            "intact): restart the worker and continue with `train --resume`"
        )


def parse_workers(spec: str | Sequence[str]) -> list[str]:
    """'h1:p1,h2:p2' (or a list) -> ['h1:p1', 'h2:p2'], validated, order kept."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    workers = [w.strip() for w in items if w.strip()]
    if not workers:
        raise UserError("--workers: no worker given (HOST:PORT,HOST:PORT)")
    for w in workers:
        m = _ADDRESS.match(w)
        if not m or not 0 < int(m["port"]) < 65536:
            raise UserError(f"--workers: '{w}' is not HOST:PORT (IPv6: [ADDR]:PORT)")
    if len(set(workers)) != len(workers):
        raise UserError("--workers: the same worker is listed twice")
    return workers


@dataclass(frozen=True)
class RemoteTls:
    """Coordinator credentials: its certificate + key, and the CA that signs the workers."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_dir(cls, directory: str | Path) -> RemoteTls:
        files = TlsFiles.client(directory)
        return cls(files.cert, files.key, files.ca)

    def credentials(self) -> grpc.ChannelCredentials:
        TlsFiles(self.cert, self.key, self.ca).check()
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca).read_bytes(),
            private_key=Path(self.key).read_bytes(),
            certificate_chain=Path(self.cert).read_bytes(),
        )


class _UnretrievedWorkerLost(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" report of a `WorkerLost`.

    When a worker dies, TFF gathers the calls to it; the first `WorkerLost` ends the round with
    its one-line error, and the sibling tasks' identical errors are never retrieved, so asyncio
    logs each with a traceback when the task is garbage-collected (often at exit).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        unretrieved = record.getMessage().startswith("Task exception was never retrieved")
        return not (unretrieved and isinstance(exc, WorkerLost))


_QUIET = _UnretrievedWorkerLost()


def _tff_stub_class():
    import tensorflow_federated as tff

    if _QUIET not in logging.getLogger("asyncio").filters:
        logging.getLogger("asyncio").addFilter(_QUIET)

    class WorkerStub(tff.framework.RemoteExecutorGrpcStub):
        """TFF's gRPC stub that names its worker and fails fast instead of retrying forever."""

        def __init__(self, channel: grpc.Channel, address: str) -> None:
            super().__init__(channel)
            self.address = address

        def _call(self, method: str, request):
            try:
                return getattr(super(), method)(request)
            except WorkerLost:
                raise
            except (grpc.RpcError, ValueError) as e:
                if method.startswith("dispose"):
                    # TFF disposes values from garbage-collector finalizers, also after a
                    # worker died or its channel closed: those values died with it. Raising
                    # there prints "Exception ignored in ..." tracebacks after the run's
                    # one-line error.
                    return None
                if not isinstance(e, grpc.RpcError):
                    if "closed channel" not in str(e):
                        raise
                    raise WorkerLost(self.address, f"failed a {method} call: {e}") from e
                code = e.code() if isinstance(e, grpc.Call) else None
                details = e.details() if isinstance(e, grpc.Call) else str(e)
                if code == grpc.StatusCode.UNAVAILABLE:
                    raise WorkerLost(self.address, f"is unreachable or died ({details})") from e
                name = code.name if code is not None else type(e).__name__
                raise WorkerLost(self.address, f"failed a {method} call: {name}: {details}") from e

    for method in (
        "get_executor",
        "create_value",
        "create_struct",
        "create_call",
        "create_selection",
        "compute",
        "dispose",
        "dispose_executor",
    ):
        setattr(WorkerStub, method, lambda self, request, _m=method: self._call(_m, request))
    return WorkerStub


def _open_channel(address: str, tls: RemoteTls | None) -> grpc.Channel:
    options = [*GRPC_OPTIONS, *_KEEPALIVE]
    if tls is None:
        return grpc.insecure_channel(address, options)
    return grpc.secure_channel(address, tls.credentials(), options)


def probe(address: str, tls: RemoteTls | None, timeout: float = 5.0) -> str:
    """Why can't we reach `address`? One line, for error messages ('ok' if we can)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as e:
        return f"cannot connect: {e.strerror or e}"
    with raw:
        if tls is None:
            return "ok"
        from tff_privseg.runtime.tls_proxy import client_context

        try:
            ctx = client_context(tls.cert, tls.key, tls.ca)
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                s.settimeout(timeout)
                # TLS 1.3: the worker judges our certificate after our side of the handshake
                # is done; a refusal shows up on the first read (an alert or a closed socket).
                s.sendall(_H2_PREFACE)
                if not s.recv(1):
                    return (
                        "the worker closed the connection after the TLS handshake: our "
                        "certificate was refused (signed by another CA, or not a client cert)"
                    )
        except ssl.SSLCertVerificationError as e:
            return f"the worker's certificate is not trusted: {e.verify_message}"
        except ssl.SSLError as e:
            return f"TLS handshake failed: {e.reason or e}"
        except OSError as e:
            return f"TLS connection failed: {e.strerror or e}"
    return "ok"


def _wait_ready(channel: grpc.Channel, address: str, tls: RemoteTls | None, timeout: float):
    """Wait up to `timeout` for the channel; a worker that is not up yet may still start, but
    a TLS failure (wrong CA, not a TLS endpoint, our certificate refused) will not heal:
    fail on it at once, naming the worker, instead of after the whole timeout."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            grpc.channel_ready_future(channel).result(timeout=max(0.1, min(2.0, remaining)))
            return
        except grpc.FutureTimeoutError:
            reason = probe(address, tls)
            final = reason != "ok" and not reason.startswith("cannot connect")
            if final or deadline - time.monotonic() <= 0:
                if reason == "ok":
                    reason = f"no gRPC connection within {timeout:.0f} s"
                raise UserError(f"cannot reach worker {address}: {reason}") from None


def _threaded_async_context(sync_context: object) -> object:
    """An AsyncContext that runs `sync_context.invoke` on its own thread.

    TFF's `RemoteExecutor` makes blocking gRPC calls from its coroutines (its TODO b/134543154),
    so several workers' `AsyncExecutionContext`s on one event loop run one after the other:
    measured here, the second worker's CreateCall started only when the first one's returned.
    One thread per worker (gRPC releases the GIL) lets the subrounds really run in parallel.
    """
    import tensorflow_federated as tff

    class ThreadedContext(tff.framework.AsyncContext):
        def __init__(self, inner: object) -> None:
            self.inner = inner
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tff-worker")

        async def invoke(self, comp, arg):
            if asyncio.iscoroutine(arg):
                arg = await arg
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, self.inner.invoke, comp, arg)

        def close(self) -> None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    return ThreadedContext(sync_context)


def _compile_mergeable(comp: object) -> object:
    """Secure-sum lowering (as `contexts.compile_native`), then TFF's mergeable-form compiler."""
    import tensorflow_federated as tff

    lowered = tff.backends.test.replace_secure_intrinsics_with_bodies(comp)
    # The lowering rebuilds the computation from its proto, which drops Python containers
    # (LearningProcessOutput, ModelWeights...): put the original type signature back.
    lowered = tff.framework.ConcreteComputation.with_type(lowered, comp.type_signature)
    try:
        return tff.backends.native.compile_to_mergeable_comp_form(lowered)
    except ValueError as e:
        raise UserError(
            "this computation cannot be split across workers (it has dependent aggregations): "
            f"{str(e).splitlines()[0]}"
        ) from e


def _mergeable_context(async_contexts: list) -> object:
    """What tff.backends.native.create_mergeable_comp_execution_context builds, plus our
    secure-sum lowering, TFF's numpy result conversion and one thread per worker."""
    import tensorflow_federated as tff

    return tff.framework.MergeableCompExecutionContext(
        async_contexts=async_contexts,
        compiler_fn=_compile_mergeable,
        transform_args=tff.tensorflow.transform_args,
        transform_result=tff.tensorflow.transform_result,
    )


@contextlib.contextmanager
def remote_runtime(
    workers: Sequence[str],
    cert: str | Path | None = None,
    key: str | Path | None = None,
    ca: str | Path | None = None,
    insecure: bool = False,
    connect_timeout: float = 30.0,
) -> Iterator[list[str]]:
    """Install a TFF context that executes on `workers` ('HOST:PORT'); yields the addresses.

    mTLS with the coordinator's `cert`/`key`, workers verified against `ca`. `insecure=True`
    (plain gRPC) exists for tests against `worker --insecure` only.
    """
    workers = parse_workers(workers)
    tls = None
    if not insecure:
        if not (cert and key and ca):
            raise UserError(
                "remote workers need TLS: the coordinator's certificate, key and the CA "
                "(--tls-dir DIR with client.pem, client.key, ca.pem)"
            )
        tls = RemoteTls(Path(cert), Path(key), Path(ca))
    stub_class = _tff_stub_class()
    channels: list[grpc.Channel] = []
    threaded: list = []
    try:
        with default_context_scope() as install:
            stubs = []
            for address in workers:
                channel = _open_channel(address, tls)
                channels.append(channel)
                _wait_ready(channel, address, tls, connect_timeout)
                stubs.append(stub_class(channel, address))
            if len(stubs) == 1:
                install(worker_context(stubs[0]))
            else:
                threaded = [_threaded_async_context(worker_context(s)) for s in stubs]
                install(_mergeable_context(threaded))
            yield workers
    finally:
        for ctx in threaded:
            ctx.close()
        for channel in channels:
            channel.close()


def check_remote_args(workers: str | Sequence[str] | None, tls_dir: str | Path | None) -> None:
    """`--workers` / `--tls-dir` checked before any data is read: the addresses, and each
    credential file (it names the bad one). `runtime_for` applies the same rules."""
    if not workers:
        if tls_dir is not None:
            raise UserError("--tls-dir is for remote workers: give --workers HOST:PORT,...")
        return
    parse_workers(workers)
    if tls_dir is None:
        raise UserError("--workers needs --tls-dir DIR (client.pem, client.key, ca.pem)")
    TlsFiles.client(tls_dir).check()


def runtime_for(
    workers: str | Sequence[str] | None,
    tls: RemoteTls | str | Path | None = None,
    insecure: bool = False,
):
    """The runtime `train()` enters: the private local worker, or remote workers over mTLS.

    workers: None/empty (local), 'HOST:PORT,HOST:PORT' or a list. tls: a `RemoteTls` or a
    directory holding client.pem, client.key and ca.pem (`tff-privseg worker certs`).
    """
    if not workers:
        if tls is not None:
            raise UserError("--tls-dir is for remote workers: give --workers HOST:PORT,...")
        return local_runtime()
    workers = parse_workers(workers)
    if isinstance(tls, str | Path):
        tls = RemoteTls.from_dir(tls)
    if tls is None:
        if not insecure:
            raise UserError("--workers needs --tls-dir DIR (client.pem, client.key, ca.pem)")
        return remote_runtime(workers, insecure=True)
    return remote_runtime(workers, tls.cert, tls.key, tls.ca)
