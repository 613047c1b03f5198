"""Owning TFF's runtime: a worker that cannot outlive us and that no network can reach.

TFF 0.87's default context starts `worker_binary` lazily and never stops it (it was seen
orphaned, holding the parent's stdout open). `local_runtime()` replaces that context: it starts
the worker through `netns_bridge` (private network namespace, Unix socket, parent-death signal)
and installs TFF's own `SyncExecutionContext` over a `RemoteExecutor` stub on that socket. On exit
(normal, exception, Ctrl-C, SIGTERM) the worker is stopped and waited for; if this process is
killed outright, the kernel kills the bridge and the worker (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tff_privseg.errors import UserError
from tff_privseg.runtime.contexts import GRPC_OPTIONS, default_context_scope, worker_context


@dataclass
class LocalWorker:
    """A running worker: the bridge process, its Unix socket and the worker's private port."""

    bridge: subprocess.Popen
    socket_path: str
    port: int
    isolated: bool
    tmpdir: tempfile.TemporaryDirectory

    def stop(self) -> None:
        if self.bridge.poll() is None:
            self.bridge.send_signal(signal.SIGTERM)
            try:
                self.bridge.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.bridge.kill()
                self.bridge.wait()
        with contextlib.suppress(OSError):
            self.tmpdir.cleanup()


def worker_binary_path() -> Path:
    """TFF's worker binary, found without importing TFF (a bridge must start fast)."""
    import importlib.util

    spec = importlib.util.find_spec("tensorflow_federated")
    if spec is None or spec.origin is None:
        raise UserError("tensorflow_federated is not installed (run scripts/bootstrap.sh)")
    return Path(spec.origin).parent / "data" / "worker_binary"


def _die_with_parent() -> None:
    from tff_privseg.runtime.netns_bridge import die_with_parent

    os.setsid()  # own process group: a terminal's Ctrl-C reaches only us; we stop the worker
    die_with_parent()


_DIR_PREFIX = "tff-privseg-worker-"
_OWNER = "owner"  # "PID START_TIME" of the process that made the folder


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def remove_stale_worker_dirs(parent: str | None = None) -> list[str]:
    """Remove socket folders of runs that were killed outright (SIGKILL, OOM, power loss).

    A folder is stale when its owner process (pid and start time, written at creation) is gone
    and nothing answers on its socket. Only this user's folders are touched. Returns the folders
    removed.
    """
    import shutil

    removed = []
    base = Path(parent or tempfile.gettempdir())
    for folder in base.glob(_DIR_PREFIX + "*"):
        try:
            if folder.is_symlink() or folder.lstat().st_uid != os.getuid():
                continue
            pid, started = (folder / _OWNER).read_text().split()
        except (OSError, ValueError):
            continue  # not ours, being created right now, or from an older release
        if _start_time(int(pid)) != started and not _answers(folder / "worker.sock"):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


def _answers(sock_path: Path) -> bool:
    """Someone still serves this socket (an owner in another pid namespace, say)."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(sock_path))
        except OSError:
            return False
    return True


def start_local_worker(timeout: float = 60.0) -> LocalWorker:
    """Start worker_binary behind the namespace bridge; return once it is reachable."""
    remove_stale_worker_dirs()
    tmpdir = tempfile.TemporaryDirectory(prefix=_DIR_PREFIX)
    os.chmod(tmpdir.name, 0o700)
    Path(tmpdir.name, _OWNER).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    bridge = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tff_privseg.runtime.netns_bridge",
            str(worker_binary_path()),
            tmpdir.name,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
        text=True,
    )
    line = _read_line(bridge, timeout)
    if not line.startswith("READY"):
        bridge.kill()
        bridge.wait()
        tmpdir.cleanup()
        raise UserError(f"could not start the TFF worker: {line.removeprefix('FAILED ').strip()}")
    _, sock, port, isolated, *reason = line.split(" ", 4)
    if isolated != "1":
        warnings.warn(
            "WARNING: no private network namespace here "
            f"({' '.join(reason).strip()}); TFF's worker_binary listens on all interfaces "
            f"(port {port}) for the duration of this run.",
            RuntimeWarning,
            stacklevel=2,
        )
    return LocalWorker(bridge, sock, int(port), isolated == "1", tmpdir)


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        return "FAILED no answer from the worker bridge"
    return proc.stdout.readline().strip() or "FAILED the worker bridge exited"


def _connect(socket_path: str) -> object:
    """TFF's gRPC stub on the worker behind `socket_path`, once the worker answers."""
    import grpc
    import tensorflow_federated as tff

    channel = grpc.insecure_channel(f"unix:{socket_path}", GRPC_OPTIONS)
    stub = tff.framework.RemoteExecutorGrpcStub(channel)
    deadline = time.monotonic() + 60
    while not stub.is_ready:
        if time.monotonic() > deadline:
            raise UserError("the TFF worker did not become ready within 60 s")
        time.sleep(0.05)
    return stub


@contextlib.contextmanager
def local_runtime() -> Iterator[LocalWorker]:
    """Context manager: a private, owned TFF worker installed as TFF's default context.

    TFF's own default context (which would start an unowned worker on first use) is replaced
    for good; after the outermost block, TFF computations raise until a new runtime is entered.
    Runtimes nest: leaving an inner one hands TFF back to the enclosing one.
    """
    worker = start_local_worker()
    atexit.register(worker.stop)  # backstop if the caller never leaves the `with`
    try:
        with default_context_scope() as install:
            install(worker_context(_connect(worker.socket_path)))
            yield worker
    finally:
        worker.stop()
        atexit.unregister(worker.stop)
