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

_GRPC_OPTIONS = [
    ("grpc.max_message_length", 2_000_000_000),
    ("grpc.max_receive_message_length", 2_000_000_000),
    ("grpc.max_send_message_length", 2_000_000_000),
]


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


def _compile(comp: object) -> object:
    """TFF's native compilation, after lowering secure-sum intrinsics to plain sums.

    TFF's runtime has no cryptographic secure aggregation: the secure-sum factories give the
    *semantics* (bounded, modular integer sums of clipped values) and run as ordinary sums here,
    exactly as in TFF's own test context.
    """
    import tensorflow_federated as tff
    from tensorflow_federated.python.core.backends.test import compiler as test_compiler

    comp = test_compiler.replace_secure_intrinsics_with_bodies(comp)
    return tff.backends.native.desugar_and_transform_to_native(comp)


def _context(stack_fn) -> object:
    import tensorflow_federated as tff

    return tff.framework.SyncExecutionContext(
        executor_fn=tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn),
        compiler_fn=_compile,
        transform_args=tff.tensorflow.transform_args,
        transform_result=tff.tensorflow.transform_result,
    )


def _set_default_context(context: object) -> None:
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    context_stack_impl.context_stack.set_default_context(context)


_ACTIVE: list[object] = []  # our live contexts, innermost last (runtimes may nest)


def _install_context(socket_path: str, default_num_clients: int = 0) -> None:
    """Make TFF execute on the worker behind `socket_path`."""
    import grpc
    import tensorflow_federated as tff

    channel = grpc.insecure_channel(f"unix:{socket_path}", _GRPC_OPTIONS)
    stub = tff.framework.RemoteExecutorGrpcStub(channel)
    deadline = time.monotonic() + 60
    while not stub.is_ready:
        if time.monotonic() > deadline:
            raise UserError("the TFF worker did not become ready within 60 s")
        time.sleep(0.05)

    def stack_fn(cardinalities):
        cardinalities.setdefault(tff.CLIENTS, default_num_clients)
        # Dispose each worker value as soon as Python drops it. TFF's default batches 20
        # disposals, so ~3 rounds of states, datasets and results stay alive on the worker:
        # ~40 MiB more in use there (malloc_stats, 3 sites, 64x64 U-Net) and, interleaved with
        # the newer rounds' values, more fragmentation. One small RPC per value.
        executor = tff.framework.RemoteExecutor(stub, dispose_batch_size=1)
        executor.set_cardinalities(cardinalities)
        return executor

    context = _context(stack_fn)
    _ACTIVE.append(context)
    _set_default_context(context)


def _install_closed_context() -> None:
    """After the runtime stops, TFF calls fail loudly instead of starting an unowned worker."""

    def stack_fn(cardinalities):
        raise RuntimeError("no TFF runtime is running: execute inside local_runtime()")

    _set_default_context(_context(stack_fn))


@contextlib.contextmanager
def local_runtime() -> Iterator[LocalWorker]:
    """Context manager: a private, owned TFF worker installed as TFF's default context.

    TFF's own default context (which would start an unowned worker on first use) is replaced
    for good; after the outermost block, TFF computations raise until a new runtime is entered.
    Runtimes nest: leaving an inner one hands TFF back to the enclosing one.
    """
    worker = start_local_worker()
    atexit.register(worker.stop)  # backstop if the caller never leaves the `with`
    depth = len(_ACTIVE)
    try:
        _install_context(worker.socket_path)
        yield worker
    finally:
        del _ACTIVE[depth:]
        if _ACTIVE:  # an enclosing runtime is still running: give TFF back to it
            _set_default_context(_ACTIVE[-1])
        else:
            _install_closed_context()
        worker.stop()
        atexit.unregister(worker.stop)
