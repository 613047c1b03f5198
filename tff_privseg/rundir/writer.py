"""The run directory's writer: lock, start, rows, ledger (layout: `rundir.layout`).

`RunDir.begin` writes config.toml, the secret run key and the keyed data digest before any
round; `abandon` removes what a start that failed before round 1 created. Secrets (the key, the
checkpoints holding it) are 0600 in 0700 folders whatever the umask.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from tff_privseg import config as config_lib
from tff_privseg.config import Config
from tff_privseg.data import SiteData
from tff_privseg.errors import UserError
from tff_privseg.io import atomic_write_text, os_problem, private_dir
from tff_privseg.privacy.accounting import PrivacyLedger
from tff_privseg.rundir import checkpoint, layout
from tff_privseg.rundir.key import data_digest, new_run_key, read_run_key
from tff_privseg.rundir.reader import read_metrics


class RunDir:
    """Paths and writers of a run directory, and its lifecycle.

    `prepare_run_dir` locks the directory and checks that it can take this run, writing
    nothing but the lock file; `begin` (once the data loaded and the process built) writes
    config.toml and the secret run key; `abandon` removes what a start that failed before
    `begin` created, so the same command can simply be run again; `close` drops the lock.
    """

    LOCK = layout.LOCK

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metrics = path / layout.METRICS
        self.privacy = path / layout.PRIVACY
        self.config = path / layout.CONFIG
        self.checkpoints = path / layout.CHECKPOINTS
        self.model = path / layout.MODEL
        self.weights = path / layout.WEIGHTS
        self.tensorboard = path / layout.TENSORBOARD
        self.secret = path / layout.SECRET
        self.key_file = self.secret / layout.RUN_KEY
        self.lock_file = path / self.LOCK
        self.data_file = self.secret / layout.DATA_DIGEST
        self._sites: list[SiteData] = []
        self._digest: str | None = None  # of `_sites` under the persisted key, once computed
        self.begun = False
        self._lock_fd: int | None = None
        self._created: list[Path] = []  # what this invocation created before `begin`

    # -- lifecycle -------------------------------------------------------------------------
    def lock(self) -> None:
        """Hold an exclusive OS lock on RUN/.lock for this process' life.

        The kernel releases it when the process ends, however it ends (SIGKILL included); the
        descriptor is not inherited by the TFF worker. The file is never deleted while in use
        (that would let a second process lock a fresh inode), only by `abandon`.
        """
        for _ in range(3):
            existed = self.lock_file.exists()
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(
                    f"another train is running on this run directory (pid {self._holder()})",
                    self.path,
                ) from None
            try:  # the file we locked is still the one at that path (not removed meanwhile)
                same = os.fstat(fd).st_ino == os.stat(self.lock_file).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._lock_fd = fd
            if not existed:
                self._created.append(self.lock_file)
            return
        raise UserError("could not lock the run directory (it keeps being replaced)", self.path)

    def _holder(self) -> str:
        for _ in range(10):
            with contextlib.suppress(OSError, ValueError):
                return str(int(self.lock_file.read_text().strip()))
            time.sleep(0.05)  # the holder may be between truncating and writing its pid
        return "unknown"

    def check_data(self, sites: list[SiteData], resume: bool) -> None:
        """Refuse to resume on other data than the run's (RUN/secret/data_digest).

        A round run again reuses its noise; on other records, the two releases' difference
        would be the difference of their gradients with the noise cancelled. The digest is
        keyed with the run key: an unkeyed hash of the training slices would let anyone holding
        all records but one test which one was used.
        """
        self._sites = sites
        if not resume or not self.key_file.exists():  # no key: _check_resume allowed a fresh one
            return
        try:
            recorded = self.data_file.read_text().strip()
        except FileNotFoundError:
            if self.rounds_released():
                raise UserError(
                    "missing, but rounds were already run: cannot tell whether --resume reads "
                    "the run's data",
                    self.data_file,
                ) from None
            return
        except OSError as e:
            raise UserError(f"unreadable ({os_problem(e)})", self.data_file) from None
        self._digest = data_digest(sites, read_run_key(self))
        if recorded != self._digest:
            raise UserError(
                "--resume on other data than the run was trained on (its training and "
                "validation slices differ from this digest)",
                self.data_file,
            )

    def begin(self, cfg: Config, resume: bool) -> str:
        """Write config.toml, persist the secret run key and the keyed data digest (before any
        round); return the key. What this call creates is removed if it fails half-way.

        A resumed run reuses its key: the same key gives the same plan and the same noise, so a
        round released before a crash and run again releases exactly the same update.
        """
        for path in (self.config, self.secret, self.key_file, self.data_file):
            if not path.exists():
                self._created.append(path)
        atomic_write_text(self.config, config_lib.dumps(cfg))
        key = read_run_key(self) if resume and self.key_file.exists() else None
        private_dir(self.secret)
        if key is None:
            key = new_run_key()
            atomic_write_text(self.key_file, f"{key}\n", mode=0o600)
        digest = self._digest or data_digest(self._sites, key)  # check_data used this key
        atomic_write_text(self.data_file, digest + "\n", mode=0o600)
        self._make_private()
        self.begun = True
        return key

    def _make_private(self) -> None:
        """The key and the checkpoints (which hold it): 0600 in 0700 folders."""
        private_dir(self.secret)
        os.chmod(self.key_file, 0o600)
        if self.checkpoints.exists():
            private_dir(self.checkpoints)
            for p in self.checkpoints.iterdir():
                os.chmod(p, 0o600)

    def abandon(self) -> None:
        """A start that failed before `begin` ended: remove what this invocation created."""
        if self.begun:
            return
        for p in reversed(self._created):
            with contextlib.suppress(OSError):
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        self._created.clear()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- contents --------------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        try:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
        except OSError as e:
            raise UserError(f"cannot write ({os_problem(e)})", self.metrics) from e

    def metrics_rows(self) -> list[dict[str, Any]]:
        """The rows written so far; a row cut short by a crash or a full disk is skipped."""
        return read_metrics(self.metrics, lenient=True)

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows of rounds that were never checkpointed (after a crash)."""
        rows = [r for r in self.metrics_rows() if r["round"] <= last_round]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def rounds_released(self) -> int:
        """The last round any file of the run records (metrics, checkpoints, privacy.json)."""
        done = max((r["round"] for r in self.metrics_rows()), default=0)
        if self.checkpoints.exists():
            done = max(
                [done]
                + [checkpoint.round_of(p) for p in checkpoint.all_checkpoints(self.checkpoints)]
            )
        return max(done, _ledger_rounds(self.privacy))

    def publish_ledger(self, ledger: PrivacyLedger) -> None:
        """Write privacy.json, never lowering the rounds it counts.

        After a fall-back to an older checkpoint the later rounds run again with the same key
        (the same releases); until they have, privacy.json keeps counting them.
        """
        if ledger.rounds >= _ledger_rounds(self.privacy):
            atomic_write_text(self.privacy, json.dumps(ledger.to_json(), indent=2))


def _ledger_rounds(path: Path) -> int:
    try:
        return int(json.loads(path.read_text()).get("rounds", 0))
    except (OSError, ValueError, AttributeError):
        return 0
