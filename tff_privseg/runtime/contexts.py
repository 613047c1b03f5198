"""TFF execution contexts on our workers, and which one is TFF's default context.

Each runtime here (local, remote) installs a context as TFF's default for a block; on leaving,
TFF goes back to the enclosing runtime's context, or to a closed one that raises: TFF's stock
default context would start an unowned worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

GRPC_OPTIONS = [
    ("grpc.max_message_length", 2_000_000_000),
    ("grpc.max_receive_message_length", 2_000_000_000),
    ("grpc.max_send_message_length", 2_000_000_000),
]


def compile_native(comp: object) -> object:
    """TFF's native compilation, after lowering secure-sum intrinsics to plain sums.

    TFF's runtime has no cryptographic secure aggregation: the secure-sum factories give the
    *semantics* (bounded, modular integer sums of clipped values) and run as ordinary sums here,
    exactly as in TFF's own test context.
    """
    import tensorflow_federated as tff

    comp = tff.backends.test.replace_secure_intrinsics_with_bodies(comp)
    return tff.backends.native.desugar_and_transform_to_native(comp)


def worker_context(stub: object) -> object:
    """TFF's `SyncExecutionContext` on the worker behind `stub` (a `RemoteExecutorGrpcStub`)."""
    import tensorflow_federated as tff

    def stack_fn(cardinalities):
        cardinalities.setdefault(tff.CLIENTS, 0)
        # Dispose each worker value as soon as Python drops it. TFF's default batches 20
        # disposals, so ~3 rounds of states, datasets and results stay alive on the worker:
        # ~40 MiB more in use there (malloc_stats, 3 sites, 64x64 U-Net) and, interleaved with
        # the newer rounds' values, more fragmentation. One small RPC per value.
        executor = tff.framework.RemoteExecutor(stub, dispose_batch_size=1)
        executor.set_cardinalities(cardinalities)
        return executor

    return _sync_context(stack_fn)


def _closed_context() -> object:
    """A context in which TFF calls fail loudly instead of starting an unowned worker."""

    def stack_fn(cardinalities):
        raise RuntimeError("no TFF runtime is running: execute inside local_runtime()")

    return _sync_context(stack_fn)


def _sync_context(stack_fn: Callable) -> object:
    import tensorflow_federated as tff

    return tff.framework.SyncExecutionContext(
        executor_fn=tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn),
        compiler_fn=compile_native,
        transform_args=tff.tensorflow.transform_args,
        transform_result=tff.tensorflow.transform_result,
    )


_INSTALLED: list[object] = []  # contexts our runtimes installed, innermost last (they nest)


@contextlib.contextmanager
def default_context_scope() -> Iterator[Callable[[object], None]]:
    """A block that yields `install(context)`, which makes `context` TFF's default context.

    On leaving (also after an error, installed or not) TFF's default is the enclosing block's
    context, or a closed one when there is none.
    """
    import tensorflow_federated as tff

    depth = len(_INSTALLED)

    def install(context: object) -> None:
        _INSTALLED.append(context)
        tff.framework.set_default_context(context)

    try:
        yield install
    finally:
        del _INSTALLED[depth:]
        tff.framework.set_default_context(_INSTALLED[-1] if _INSTALLED else _closed_context())
