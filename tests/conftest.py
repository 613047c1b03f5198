"""Shared fixtures. One TFF worker for the whole session, always stopped at the end."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def tff_runtime():
    """TFF's context on a private worker (network namespace + Unix socket) for the session."""
    from tff_privseg.federated.runtime import local_runtime

    with local_runtime() as worker:
        yield worker
