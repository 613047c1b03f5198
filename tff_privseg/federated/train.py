"""The training driver: data -> TFF process rounds -> run directory.

Run directory (`train --out RUN`):
  config.toml      resolved config
  metrics.jsonl    one object per round: round, val_dice, epsilon, delta, seconds, sites;
                   loss and examples only without DP, sites not under site-level DP
                   (`round_row`)
  privacy.json     the privacy ledger: every number needed to recompute ε
  checkpoints/     round_NNNNNN.npz (TFF state + ledger + noise key, one atomic file each)
  secret/run_key   the run's secret noise key, written before round 1, reused by --resume
  secret/data_digest  keyed digest of the training/validation slices (--resume refuses other data)
  model.keras      final Keras model (probabilities out), and model.weights.h5
  tensorboard/     scalars per round
  .lock            held (flock) by the one train running on the directory

Secrets (the key, the checkpoints holding it) are 0600 in 0700 folders whatever the umask.
Lifecycle: `prepare_run_dir` (lock, checks) -> data loaded, process built -> `RunDir.begin`
(config.toml, key) -> rounds -> final model. A start that fails before `begin` leaves nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from tff_privseg import config as config_lib
from tff_privseg.config import Config
from tff_privseg.data import SiteData, ensure_synthetic, load_sites
from tff_privseg.errors import UserError
from tff_privseg.federated import checkpoint, sampling
from tff_privseg.io import atomic_path, atomic_write_text, os_problem, private_dir
from tff_privseg.losses import get_loss
from tff_privseg.metrics import pooled_dice
from tff_privseg.models import build_model
from tff_privseg.privacy.accounting import PrivacyLedger, UnitLedger


@dataclass
class RoundPlan:
    """What one round does: participating sites, their batches (and slot weights), seeds.

    augment: per site, one int64 [b, 2] seed per slot of each batch (None: no augmentation).
    Under DP every choice here that concerns a record is secret: drawn from the run key.
    """

    round_num: int
    sites: list[int]
    batches: dict[int, list[np.ndarray]]
    weights: dict[int, list[np.ndarray] | None]
    seeds: dict[int, np.ndarray]
    augment: dict[int, list[np.ndarray] | None] = field(default_factory=dict)

    def steps(self, names: list[str]) -> dict[str, int]:
        return {names[i]: len(self.batches[i]) for i in self.sites}


def local_steps(cfg: Config, site_size: int) -> int:
    t = cfg.train
    if t.local_epochs > 0:
        return t.local_epochs * math.ceil(site_size / t.batch_size)
    return t.local_steps


def sampling_rate(cfg: Config, records: int) -> float:
    """Poisson rate q = batch_size / records (records: slices, or patients for unit=patient)."""
    return min(1.0, cfg.train.batch_size / records)


def patient_unit(cfg: Config) -> bool:
    return cfg.privacy.level == "sample" and cfg.privacy.unit == "patient"


def records(cfg: Config, site: SiteData) -> int:
    """Privacy records at a site: training slices, or training patients."""
    if patient_unit(cfg):
        return len(np.unique(site.train.volume_index))
    return len(site.train)


def client_lr(cfg: Config, round_num: int) -> float:
    """Client learning rate of a round (0-based): constant, or log-linear client_lr -> end_lr."""
    t = cfg.train
    if t.lr_schedule == "constant" or t.rounds == 1:
        return t.client_lr
    frac = round_num / (t.rounds - 1)
    return float(t.client_lr * (t.end_lr / t.client_lr) ** frac)


def new_ledger(cfg: Config, sites: list[SiteData]) -> PrivacyLedger:
    p = cfg.privacy
    ledger = PrivacyLedger(
        level=p.level,
        accountant=p.accountant,
        noise_multiplier=p.noise_multiplier,
        l2_norm_clip=p.l2_norm_clip,
        delta=p.delta,
    )
    if p.level == "sample":
        ledger.unit = p.unit
        for s in sites:
            n = records(cfg, s)
            ledger.units[s.name] = UnitLedger(sampling_rate(cfg, n), 0, n)
    elif p.level == "site":
        ledger.unit = "site"
        q = sites_per_round(cfg, len(sites)) / len(sites)
        ledger.units["federation"] = UnitLedger(q, 0, len(sites))
    ledger.refresh()
    return ledger


def sites_per_round(cfg: Config, num_sites: int) -> int:
    k = cfg.train.sites_per_round
    return num_sites if k <= 0 or k >= num_sites else k


def plan_round(
    cfg: Config, sites: list[SiteData], round_num: int, run_key: sampling.Key
) -> RoundPlan:
    """The round's sites, batches, slot augmentation seeds and noise seeds.

    Under DP (privacy.level != "none") every choice the analysis assumes secret comes from
    `run_key` and the record's identity (`sampling` module): Poisson records and patients, the
    slots of a patient, augmentation, and the sites under site-level DP. Public choices (the
    shuffled batches of non-private and site-level runs, a fixed-size site subset) come from
    `train.seed`; without DP the augmentation key is derived from `train.seed` too, so
    non-private runs stay reproducible.
    """
    seed, private = cfg.train.seed, cfg.privacy.level != "none"
    names = [s.name for s in sites]
    k = sites_per_round(cfg, len(sites))
    if cfg.privacy.level == "site":
        chosen = sampling.poisson_sites(names, k / len(sites), run_key, round_num)
    else:
        chosen = sampling.sample_sites(len(sites), k, sampling.rng(seed, round_num, -1, "sites"))
    augment_key = run_key if private else sampling.public_key(seed)
    augment = sampling.enabled(cfg.data.augment)
    batches, weights, seeds, aug = {}, {}, {}, {}
    for i in chosen.tolist():
        site = sites[i]
        ids = sampling.record_ids(site.name, site.train)
        steps = local_steps(cfg, len(site.train))
        q = sampling_rate(cfg, records(cfg, site))
        weights[i] = None
        if patient_unit(cfg):
            batches[i], weights[i] = sampling.poisson_patient_batches(
                site.train.volume_index,
                ids,
                q,
                cfg.privacy.slices_per_patient,
                steps,
                run_key,
                round_num,
            )
        elif cfg.privacy.level == "sample":
            batches[i] = sampling.poisson_batches(ids.slices, q, steps, run_key, round_num)
        else:  # no DP, or site-level DP (a site's whole update is the record): public shuffle
            gen = sampling.site_rng(seed, round_num, site.name, "batches")
            batches[i] = sampling.shuffled_batches(
                len(site.train), cfg.train.batch_size, steps, gen
            )
        aug[i] = (
            sampling.slot_seeds(ids.slices, batches[i], augment_key, round_num) if augment else None
        )
        seeds[i] = sampling.noise_seed(run_key, round_num, site.name)
    return RoundPlan(round_num, chosen.tolist(), batches, weights, seeds, aug)


def client_inputs(
    cfg: Config, sites: list[SiteData], plan: RoundPlan
) -> list[dict[str, tf.data.Dataset]]:
    inputs = []
    for i in plan.sites:
        batches = sampling.batches_dataset(
            sites[i].train.images,
            sites[i].train.labels,
            plan.batches[i],
            plan.weights[i],
            augment=cfg.data.augment,
            seeds=plan.augment.get(i),
        )
        inputs.append({"batches": batches, "seed": tf.data.Dataset.from_tensors(plan.seeds[i])})
    return inputs


def validation_dice(model: tf.keras.Model, sites: list[SiteData], batch: int = 32) -> float:
    """Mean over sites of the pooled validation Dice (threshold 0.5)."""
    scores = []
    for s in sites:
        if len(s.val) == 0:
            continue
        probs = model.predict(s.val.images, batch_size=batch, verbose=0)
        scores.append(float(pooled_dice(probs, s.val.labels)))
    return float(np.mean(scores)) if scores else float("nan")


class RunDir:
    """Paths and writers of a run directory, and its lifecycle.

    `prepare_run_dir` locks the directory and checks that it can take this run, writing
    nothing but the lock file; `begin` (once the data loaded and the process built) writes
    config.toml and the secret run key; `abandon` removes what a start that failed before
    `begin` created, so the same command can simply be run again; `close` drops the lock.
    """

    LOCK = ".lock"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metrics = path / "metrics.jsonl"
        self.privacy = path / "privacy.json"
        self.config = path / "config.toml"
        self.checkpoints = path / "checkpoints"
        self.model = path / "model.keras"
        self.weights = path / "model.weights.h5"
        self.secret = path / "secret"
        self.key_file = self.secret / "run_key"
        self.lock_file = path / self.LOCK
        self.data_file = self.secret / "data_digest"
        self._sites: list[SiteData] = []
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
        if recorded != data_digest(sites, read_run_key(self)):
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
        atomic_write_text(self.data_file, data_digest(self._sites, key) + "\n", mode=0o600)
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
        if not self.metrics.exists():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a row cut short by a crash or a full disk
                continue
        return rows

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


def data_digest(sites: list[SiteData], key: str) -> str:
    """Keyed BLAKE2b of what training and validation read: every site's slices, labels and
    patients (keyed with the run key: without it, the digest reveals nothing about them)."""
    h = hashlib.blake2b(key=sampling.key_bytes(key), person=b"data")
    for s in sites:
        h.update(s.name.encode() + b"\0")
        for part in (s.train, s.val):
            for a in (part.images, part.labels, part.volume_index):
                a = np.ascontiguousarray(a)
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update(a.data)
    return h.hexdigest()


def new_run_key() -> str:
    """The run's secret, 256 bits as hex: it keys the sampling PRF and the DP noise.

    Never in the config, never printed. 256 bits so that no search over keys can recover the
    sample from what a run releases.
    """
    return secrets.token_hex(32)


def read_run_key(run: RunDir) -> str:
    try:
        key = run.key_file.read_text().strip()
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError("not a 256-bit hex key")
        return key
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable run key ({os_problem(e) or e})", run.key_file) from None


def _ledger_rounds(path: Path) -> int:
    try:
        return int(json.loads(path.read_text()).get("rounds", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    a, b = _flat(config_lib.to_dict(old)), _flat(config_lib.to_dict(new))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def prepare_run_dir(cfg: Config, out: Path, resume: bool) -> RunDir:
    """Lock `out` and check that it can take this run (a new one, or `resume` of the same).

    Writes nothing but RUN/.lock (and RUN itself for a new run): config.toml and the run key
    come with `RunDir.begin`, so a start that fails before it leaves nothing behind.
    """
    run = RunDir(out)
    if resume:
        if not run.config.exists():
            raise UserError("nothing to resume: no config.toml", out)
        run.lock()
        try:
            _check_resume(cfg, run)
        except BaseException:
            run.abandon()
            run.close()
            raise
        return run
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a directory", out)
    if not out.exists():
        out.mkdir(parents=True)
        run._created.append(out)
    run.lock()
    if any(p.name != RunDir.LOCK for p in out.iterdir()):
        run.abandon()
        run.close()
        raise UserError("run directory exists and is not empty (use --resume or a new --out)", out)
    return run


def _check_resume(cfg: Config, run: RunDir) -> None:
    """Refuse a resume that would change a round already run, its noise or its accounting."""
    saved = config_lib.load(run.config)
    # Where the data lives may change: its content is checked against the run's keyed digest.
    moved = {"train.rounds", "data.root", "data.cache_dir"}
    differ = [k for k in config_differences(saved, cfg) if k not in moved]
    if differ:
        raise UserError(
            f"--resume with a config that differs from the run's config.toml in {', '.join(differ)}"
            " (only train.rounds may change)",
            run.path,
        )
    done = run.rounds_released()
    old, new = saved.train.rounds, cfg.train.rounds
    if new != old:
        if new < done:
            raise UserError(
                f"--resume: train.rounds = {new} is below the {done} rounds already run", run.path
            )
        if any(client_lr(saved, r) != client_lr(cfg, r) for r in range(done)):
            raise UserError(
                f"--resume: changing train.rounds ({old} -> {new}) changes the learning rate of "
                f"rounds already run (lr_schedule = {cfg.train.lr_schedule}); keep train.rounds",
                run.path,
            )
    if not run.key_file.exists():
        if done or (run.checkpoints.exists() and any(run.checkpoints.iterdir())):
            raise UserError(
                "missing, but rounds were already run: resuming would draw a new noise key and "
                "release them again with different noise",
                run.key_file,
            )
    else:
        read_run_key(run)


def _model_fn(cfg: Config) -> Callable[[], tf.keras.Model]:
    def model_fn() -> tf.keras.Model:
        return build_model(
            cfg.model, cfg.data.resolution, cfg.data.num_classes, seed=cfg.train.seed
        )

    return model_fn


def load_training_data(cfg: Config, data_root: str | None, progress: bool) -> list[SiteData]:
    """The sites of `data_root` (default cfg.data.root; synthetic data is built if missing)."""
    root = Path(data_root or cfg.data.root)
    if data_root is None and cfg.data.source == "synthetic":
        ensure_synthetic(cfg.data, root)  # the embedded default data is built on first use
    sites = load_sites(cfg.data, root, progress=progress)
    for s in sites:
        if len(s.train) == 0:
            raise UserError(f"site '{s.name}' has no training slices", root / s.name)
    return sites


def train(
    cfg: Config,
    out: str | Path,
    data_root: str | None = None,
    resume: bool = False,
    progress: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    workers: str | list[str] | None = None,
    tls_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train per `cfg` into run directory `out`; returns the final summary.

    workers: remote TFF workers ('HOST:PORT,...', `tff-privseg worker`), reached over mutual
    TLS with the coordinator credentials in `tls_dir`; None runs on a private local worker.
    """
    if data_root is not None:  # record where the data really was (evaluate reads it back)
        cfg = cfg.replace(**{"data.root": str(Path(data_root).resolve())})
    run = prepare_run_dir(cfg, Path(out), resume)
    try:
        sites = load_training_data(cfg, None, progress)
        run.check_data(sites, resume)
        if cfg.train.mode == "centralized":
            return _train_centralized(cfg, run, sites, resume, on_round)
        from tff_privseg.federated.remote import runtime_for

        with runtime_for(workers, tls_dir):
            return _train_federated(cfg, run, sites, resume, progress, on_round)
    except BaseException:
        run.abandon()  # failed before any round: leave nothing, so the same command works again
        raise
    finally:
        run.close()


def _train_federated(
    cfg: Config,
    run: RunDir,
    sites: list[SiteData],
    resume: bool,
    progress: bool,
    on_round: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from tff_privseg.federated.client import DpSgdSpec
    from tff_privseg.federated.hybrid import build_hybrid_process
    from tff_privseg.federated.process import build_process

    names = [s.name for s in sites]
    dp = None
    if cfg.privacy.level == "sample":
        group = cfg.privacy.slices_per_patient if patient_unit(cfg) else 1
        dp = DpSgdSpec(
            cfg.privacy.l2_norm_clip, cfg.privacy.noise_multiplier, cfg.train.batch_size, group
        )
    model_fn = _model_fn(cfg)
    build = build_hybrid_process if cfg.train.execution == "hybrid" else build_process
    process = build(cfg, model_fn, get_loss(cfg.train.loss), sites_per_round(cfg, len(sites)), dp)
    state = process.initialize()
    ledger, start = new_ledger(cfg, sites), 0
    found = checkpoint.load_newest(run.checkpoints, state, _warn) if resume else None
    if found is not None and found[2]["run_key"] != read_run_key(run):
        raise UserError(f"made with another run key than {run.key_file}", found[0])
    run_key = run.begin(cfg, resume)  # persisted before any round is released
    if found is not None:
        path, state, header = found
        ledger = PrivacyLedger.from_json(header["ledger"])
        start = header["round"]
        ledger = _count_site_level_reruns(cfg, ledger, run.rounds_released() - start)
        run.truncate_metrics(start)
        if "row" in header and not any(r["round"] == start for r in run.metrics_rows()):
            run.append_metrics(header["row"])  # committed, but the crash came before its row
    elif resume:
        run.truncate_metrics(0)
    eval_model = model_fn()
    writer = tf.summary.create_file_writer(str(run.path / "tensorboard"))
    stopped = None
    rows = run.metrics_rows()
    bar = _progress_bar(progress, start, cfg.train.rounds)
    for r in range(start, cfg.train.rounds):
        plan = plan_round(cfg, sites, r, run_key)
        next_ledger = ledger.with_round(
            plan.steps(names) if cfg.privacy.level == "sample" else {"federation": 1}
        )
        budget = cfg.privacy.target_epsilon
        if budget > 0 and next_ledger.epsilon > budget:
            stopped = (
                f"stopped before round {r + 1}: ε would reach {next_ledger.epsilon:.3f} "
                f"> target_epsilon {budget}"
            )
            break
        t0 = time.perf_counter()
        state = state._replace(client_work=np.float32(client_lr(cfg, r)))
        # Site-level DP: a round whose Poisson sample is empty still applies its noised (zero)
        # sum, else an unchanged model would reveal that no site was drawn.
        if plan.sites or cfg.privacy.level == "site":
            output = process.next(state, client_inputs(cfg, sites, plan))
            state, metrics = output.state, output.metrics["client_work"]
            examples, loss_sum = int(metrics["examples"]), float(metrics["loss_sum"])
        else:  # no site drawn this round: nothing released, the draw still counts (see ledger)
            examples, loss_sum = 0, float("nan")
        ledger = next_ledger
        _assign(eval_model, process.get_model_weights(state).trainable)
        row = round_row(
            cfg,
            r + 1,
            val_dice=validation_dice(eval_model, sites),
            epsilon=ledger.epsilon,
            seconds=time.perf_counter() - t0,
            loss=loss_sum / examples if examples else float("nan"),
            examples=examples,
            sites=[names[i] for i in plan.sites],
        )
        # The round is committed before anything about it leaves: a crash after the checkpoint
        # never re-runs the round (its row is restored from the header on --resume).
        header = {"round": r + 1, "ledger": ledger.to_json(), "run_key": run_key, "row": row}
        checkpoint.save(run.checkpoints, r + 1, state, header)
        run.publish_ledger(ledger)
        run.append_metrics(row)
        _tensorboard(writer, row)
        rows.append(row)
        _advance(bar, row)
        if on_round:
            on_round(row)
    if bar is not None:
        bar.close()
    if not run.privacy.exists():
        run.publish_ledger(ledger)
    _assign(eval_model, process.get_model_weights(state).trainable)
    _save_model(eval_model, run)
    return _summary(cfg, run, rows, ledger, stopped)


def _count_site_level_reruns(cfg: Config, ledger: PrivacyLedger, reruns: int) -> PrivacyLedger:
    """The ledger to resume with when `reruns` released rounds must run again (the newest
    checkpoints were damaged).

    Sample level: a re-run round has the same plan and noise (both from the run key), so it is
    the same release and counts once. Site level: TFF's aggregator draws its noise itself, not
    from the run key, so a re-run round is a second release with fresh noise: counted again.
    """
    if reruns <= 0 or cfg.privacy.level != "site":
        return ledger
    _warn(
        f"warning: {reruns} released round(s) run again with fresh site-level noise; "
        "ε counts them twice"
    )
    return ledger.with_repeats({name: reruns for name in ledger.units})


def round_row(
    cfg: Config,
    round_num: int,
    *,
    val_dice: float,
    epsilon: float,
    seconds: float,
    loss: float,
    examples: int,
    sites: list[str],
) -> dict[str, Any]:
    """One metrics.jsonl row: what a round releases.

    Under DP (privacy.level != "none") the training loss (an un-noised sum over the sampled
    records) and the example count (the exact Poisson batch sizes) are left out: neither is
    noised or accounted. Under site-level DP so are the sampled sites (the Poisson site sample
    must stay secret). Validation Dice is computed on validation patients, not training
    records; it gives those patients no protection (README: what the guarantee covers).
    """
    level = cfg.privacy.level
    row: dict[str, Any] = {"round": round_num}
    if level == "none":
        row["loss"] = loss
    row["val_dice"] = val_dice
    row["epsilon"] = None if math.isinf(epsilon) else epsilon
    row["delta"] = cfg.privacy.delta if level != "none" else None
    row["seconds"] = seconds
    if level == "none":
        row["examples"] = examples
    if level != "site":
        row["sites"] = sites
    return row


def _train_centralized(
    cfg: Config,
    run: RunDir,
    sites: list[SiteData],
    resume: bool,
    on_round: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """Upper bound: all sites' training slices pooled, plain Keras, same number of batches.

    No checkpoints: `--resume` trains again from the start (its rows replace the old ones).
    """
    images = np.concatenate([s.train.images for s in sites])
    labels = np.concatenate([s.train.labels for s in sites])
    model = _model_fn(cfg)()
    loss_fn = get_loss(cfg.train.loss)
    t = cfg.train
    if t.client_optimizer == "adam":
        optimizer = tf.keras.optimizers.Adam(t.client_lr, beta_1=t.beta1, beta_2=t.beta2)
    else:
        optimizer = tf.keras.optimizers.SGD(t.client_lr)
    model.compile(optimizer=optimizer, loss=lambda y, p: loss_fn(tf.cast(y, tf.int32), p))
    steps = sum(local_steps(cfg, len(s.train)) for s in sites)
    ds = (
        tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
        .shuffle(len(images), seed=cfg.train.seed)
        .repeat()
        .batch(cfg.train.batch_size)
        .prefetch(2)
    )
    schedule = tf.keras.callbacks.LearningRateScheduler(lambda epoch: client_lr(cfg, epoch))
    run.begin(cfg, resume)
    if resume:
        run.truncate_metrics(0)
    rows = []
    writer = tf.summary.create_file_writer(str(run.path / "tensorboard"))
    for r in range(cfg.train.rounds):
        t0 = time.perf_counter()
        hist = model.fit(
            ds,
            steps_per_epoch=steps,
            initial_epoch=r,
            epochs=r + 1,
            callbacks=[schedule],
            verbose=0,
        )
        row = {
            "round": r + 1,
            "loss": float(hist.history["loss"][-1]),
            "val_dice": validation_dice(model, sites),
            "epsilon": None,
            "delta": None,
            "seconds": time.perf_counter() - t0,
            "examples": steps * cfg.train.batch_size,
            "sites": [s.name for s in sites],
        }
        run.append_metrics(row)
        _tensorboard(writer, row)
        rows.append(row)
        if on_round:
            on_round(row)
    ledger = new_ledger(cfg, sites)
    atomic_write_text(run.privacy, json.dumps(ledger.to_json(), indent=2))
    _save_model(model, run)
    return _summary(cfg, run, rows, ledger, None)


def _assign(model: tf.keras.Model, weights: list[np.ndarray]) -> None:
    for var, value in zip(model.trainable_variables, weights, strict=True):
        var.assign(value)


def _save_model(model: tf.keras.Model, run: RunDir) -> None:
    """model.keras and model.weights.h5, each complete or absent (disk full: one line, no file).

    Each is written to a temporary name and renamed once complete (the weights first: a
    model.keras in place means both are).
    """
    with atomic_path(run.model) as keras_tmp:  # nested: each names its own file on failure
        model.save(keras_tmp)
        with atomic_path(run.weights) as weights_tmp:
            model.save_weights(weights_tmp)


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tensorboard(writer: Any, row: dict[str, Any]) -> None:
    with writer.as_default():
        for key in ("loss", "val_dice", "epsilon"):
            if row.get(key) is not None and np.isfinite(row[key]):
                tf.summary.scalar(key, row[key], step=row["round"])
        writer.flush()


def _progress_bar(enabled: bool, start: int, total: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(initial=start, total=total, unit="round", file=sys.stderr, dynamic_ncols=True)


def _advance(bar: Any, row: dict[str, Any]) -> None:
    if bar is None:
        return
    eps = row["epsilon"]
    shown = {"loss": f"{row['loss']:.4f}"} if "loss" in row else {}  # absent under DP
    bar.set_postfix(
        **shown,
        val_dice=f"{row['val_dice']:.3f}",
        eps="inf" if eps is None else f"{eps:.2f}",
    )
    bar.update(1)


def _summary(
    cfg: Config, run: RunDir, rows: list[dict[str, Any]], ledger: PrivacyLedger, stopped: str | None
) -> dict[str, Any]:
    last = rows[-1] if rows else {}
    return {
        "run_dir": str(run.path),
        "rounds": last.get("round", 0),
        "val_dice": last.get("val_dice"),
        "best_val_dice": max(
            (r["val_dice"] for r in rows if r["val_dice"] == r["val_dice"]), default=None
        ),
        "epsilon": None if math.isinf(ledger.epsilon) else ledger.epsilon,
        "delta": cfg.privacy.delta if cfg.privacy.level != "none" else None,
        "privacy": cfg.privacy.level,
        "seconds": sum(r["seconds"] for r in rows),
        "stopped": stopped,
    }
