"""TFF's runtime and transport: the owned local worker, remote workers over mutual TLS, the PKI.

* ``local``: ``local_runtime()``, a private TFF worker (network namespace, Unix socket) installed
  as TFF's default context for a ``with`` block.
* ``remote``: ``remote_runtime()`` / ``runtime_for()``, TFF's distributed runtime on
  ``tff-privseg worker`` processes; ``check_remote_args`` for the CLI.
* ``worker_service``: ``run_worker()``, the worker side (``tls_proxy`` in front of a local worker).
* ``pki``: ``TlsFiles`` and ``make_pki`` (a test CA and certificates).

Depends only on ``tff_privseg.errors`` and third-party packages, never on the learning code.
"""

from __future__ import annotations

import importlib

_MODULE_OF = {
    "LocalWorker": "local",
    "local_runtime": "local",
    "TlsFiles": "pki",
    "make_pki": "pki",
    "RemoteTls": "remote",
    "WorkerLost": "remote",
    "check_remote_args": "remote",
    "parse_workers": "remote",
    "probe": "remote",
    "remote_runtime": "remote",
    "runtime_for": "remote",
    "run_worker": "worker_service",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> object:
    # Lazy (PEP 562): `python -m tff_privseg.runtime.netns_bridge` imports this package and must
    # start fast, stdlib only, single-threaded (unshare); grpc and TFF load on first use.
    try:
        module = _MODULE_OF[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
