"""Shared fixtures and helpers: one TFF worker for the whole session (always stopped at the
end), the CLI in-process and in fresh processes, a tiny model for the federated process tests."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import tensorflow as tf
    from click.testing import Result

    from tff_privseg.config import Config

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


def tagged_pids(tag: str, command: bytes = b"") -> set[int]:
    """Live processes whose environment holds `tag` (and whose command line holds `command`)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
                env = (proc / "environ").read_bytes()
            except OSError:
                continue
            if command in cmd and tag.encode() in env and alive(int(proc.name)):
                pids.add(int(proc.name))
    return pids


def tagged_worker_pids(tag: str) -> set[int]:
    """Live TFF worker_binary processes whose environment holds `tag`."""
    return tagged_pids(tag, b"worker_binary")


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


def invoke(*args: object, catch_exceptions: bool = True) -> Result:
    """`tff-privseg ARGS` in this process (click's CliRunner); every argument is str()-ed."""
    from click.testing import CliRunner

    from cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch_exceptions)


def last_json(result: Result) -> dict:
    """The --json object on the last line of a successful command's stdout."""
    assert result.exit_code == 0, result.output + (result.stderr or "")
    return json.loads(result.stdout.strip().splitlines()[-1])


def one_line_error(result: Result, *needles: str, code: int = 2) -> str:
    """The command failed with exit `code` and one `error: ...` line on stderr, no traceback,
    holding every one of `needles`."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in result.output, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


class ServerProcess:
    """A CLI server in a subprocess (`worker`, `site serve`) that announces its address on the
    first line of stdout; its stderr goes to `log` (never a full pipe)."""

    proc: subprocess.Popen
    log: Path
    address = ""

    def ready_line(self, pattern: str, timeout: float) -> re.Match:
        """The first stdout line, which must match `pattern` within `timeout` seconds."""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        line = self.proc.stdout.readline() if sel.select(timeout) else ""
        m = re.search(pattern, line)
        assert m, f"not ready: {line!r} {self.log.read_text()[-2000:]}"
        self.address = m[1]
        return m

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal, wait (kill after `timeout`), and return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        return self.proc.returncode


# ---------------------------------------------------------------------------------------------
# A tiny segmentation model and config for the federated process tests (TensorFlow is imported
# only when they are used).

TINY_RES = 8  # slices of TINY_RES x TINY_RES pixels


def tiny_model() -> tf.keras.Model:
    """Conv 3x3 (3 filters), GroupNorm, ReLU, 1x1 sigmoid: [batch, 8, 8, 1] -> [batch, 8, 8, 1]."""
    import tensorflow as tf

    inp = tf.keras.Input((TINY_RES, TINY_RES, 1))
    h = tf.keras.layers.Conv2D(3, 3, padding="same")(inp)
    h = tf.keras.layers.GroupNormalization(3)(h)
    h = tf.keras.layers.ReLU()(h)
    return tf.keras.Model(inp, tf.keras.layers.Conv2D(1, 1, activation="sigmoid")(h))


def tiny_loss(y: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """Soft Dice loss per example: masks y [batch, H, W] int, probabilities p [batch, H, W, 1]."""
    import tensorflow as tf

    y = tf.cast(y, tf.float32)[..., None]
    return 1.0 - (2 * tf.reduce_sum(y * p, [1, 2, 3]) + 1) / (tf.reduce_sum(y + p, [1, 2, 3]) + 1)


def tiny_cfg(**overrides: object) -> Config:
    """The default config at TINY_RES with a depth-1 model, dotted keys overridden."""
    from tff_privseg import config

    return config.from_dict({"data": {"resolution": TINY_RES}, "model": {"depth": 1}}).replace(
        **overrides
    )


def tiny_site_inputs(round_num: int, batches: list, sites: int = 3) -> list[dict]:
    """One round's client data: per site 6 random slices (seeded by round and site) split into
    `batches` (index arrays), and the site's seed [round_num, site]."""
    import numpy as np
    import tensorflow as tf

    from tff_privseg.federated import sampling

    out = []
    for i in range(sites):
        rng = np.random.default_rng(100 * round_num + i)
        x = rng.random((6, TINY_RES, TINY_RES, 1)).astype(np.float32)
        y = (x[..., 0] > 0.6).astype(np.int32)
        out.append(
            {
                "batches": sampling.batches_dataset(x, y, batches),
                "seed": tf.data.Dataset.from_tensors(np.array([round_num, i], np.int64)),
            }
        )
    return out
