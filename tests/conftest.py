"""Shared fixtures. One TFF worker for the whole session, always stopped at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def tff_runtime():
    """TFF's context on a private worker (network namespace + Unix socket) for the session."""
    from tff_privseg.runtime import local_runtime

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


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll `predicate` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def synth_smoke(root: Path, seed: int = 1) -> Path:
    """`data synth` the smoke config's data (3 sites x 4 volumes, 48x48x16) in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "data", "synth", "--out", str(root), "--sites", "3",
         "--volumes-per-site", "4", "--seed", str(seed), "--shape", "48", "48", "16"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return root


def start_cli(tag: str, *args: str, cwd: Path | None = None, preexec_fn=None) -> subprocess.Popen:
    """`python -m cli ARGS` in a fresh process with pipes, `tag` in its environment (and its
    children's: `tagged_worker_pids(tag)` finds their TFF workers), TF's C++ log as users get it.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        cwd=cwd or Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TFF_PRIVSEG_TEST_TAG": tag, "TF_CPP_MIN_LOG_LEVEL": "3"},
        preexec_fn=preexec_fn,
    )
