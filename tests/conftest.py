"""Shared fixtures. One TFF worker for the whole session, always stopped at the end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def tff_runtime():
    """TFF's context on a private worker (network namespace + Unix socket) for the session."""
    from tff_privseg.federated.runtime import local_runtime

    with local_runtime() as worker:
        yield worker


# ---------------------------------------------------------------------------------------------
# Leftover-process checks for tests that run the CLI in subprocesses. Such a test puts a TAG in
# the environment of every process it starts (children inherit it) and then asks which of them
# still run.


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def tagged_worker_pids(tag: str) -> set[int]:
    """Live TFF worker_binary processes whose environment holds `tag`."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
                env = (proc / "environ").read_bytes()
            except OSError:
                continue
            if b"worker_binary" in cmd and tag.encode() in env and alive(int(proc.name)):
                pids.add(int(proc.name))
    return pids
