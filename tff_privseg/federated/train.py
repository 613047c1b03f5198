"""The training driver: data -> TFF process rounds -> run directory.

The run directory it writes is described in `rundir.layout`; a metrics row is `round_row`
(loss and examples only without DP, sites not under site-level DP).

Secrets (the key, the checkpoints holding it) are 0600 in 0700 folders whatever the umask.
Lifecycle: `prepare_run_dir` (lock, checks) -> data loaded, process built -> `RunDir.begin`
(config.toml, key) -> rounds -> final model. A start that fails before `begin` leaves nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from tff_privseg.config import Config
from tff_privseg.data import SiteData, ensure_synthetic, load_sites
from tff_privseg.errors import UserError
from tff_privseg.federated import sampling
from tff_privseg.io import atomic_path
from tff_privseg.losses import get_loss
from tff_privseg.metrics import pooled_dice
from tff_privseg.models import training_model_fn
from tff_privseg.privacy.accounting import PrivacyLedger
from tff_privseg.privacy.dp_sgd import DpSgdSpec, dp_sgd_spec
from tff_privseg.privacy.planning import new_ledger
from tff_privseg.privacy.schedule import (
    client_lr,
    local_steps,
    patient_unit,
    records,
    sampling_rate,
    sites_per_round,
)
from tff_privseg.rundir import (
    RunDir,
    checkpoint,
    epsilon_to_json,
    layout,
    prepare_run_dir,
    read_run_key,
)


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


def choose_sites(cfg: Config, names: list[str], round_num: int, run_key: sampling.Key) -> list[int]:
    """The round's sites (the coordinator's choice): a Poisson sample from the run key under
    site-level DP, else the public fixed-size subset from `train.seed`."""
    k = sites_per_round(cfg, len(names))
    if cfg.privacy.level == "site":
        return sampling.poisson_sites(names, k / len(names), run_key, round_num).tolist()
    gen = sampling.rng(cfg.train.seed, round_num, -1, "sites")
    return sampling.sample_sites(len(names), k, gen).tolist()


def plan_round(
    cfg: Config,
    sites: list[SiteData],
    round_num: int,
    run_key: sampling.Key,
    chosen: list[int] | None = None,
) -> RoundPlan:
    """The round's sites, batches, slot augmentation seeds and noise seeds.

    Under DP (privacy.level != "none") every choice the analysis assumes secret comes from
    `run_key` and the record's identity (`sampling` module): Poisson records and patients, the
    slots of a patient, augmentation, and the sites under site-level DP. Public choices (the
    shuffled batches of non-private and site-level runs, a fixed-size site subset) come from
    `train.seed`; without DP the augmentation key is derived from `train.seed` too, so
    non-private runs stay reproducible. `chosen`: the sites, when already chosen (a site
    process plans its own part of a round the coordinator chose).
    """
    seed, private = cfg.train.seed, cfg.privacy.level != "none"
    if chosen is None:
        chosen = choose_sites(cfg, [s.name for s in sites], round_num, run_key)
    augment_key = run_key if private else sampling.public_key(seed)
    augment = sampling.enabled(cfg.data.augment)
    batches, weights, seeds, aug = {}, {}, {}, {}
    for i in chosen:
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
        views = None
        if cfg.data.augment.multiplicity > 1:  # each record as M augmented views (De et al.)
            slots = cfg.privacy.slices_per_patient if patient_unit(cfg) else 1
            if weights[i] is None and cfg.privacy.level == "sample":
                weights[i] = [np.ones(len(b), np.float32) for b in batches[i]]
            batches[i], weights[i], views = sampling.with_views(
                batches[i], weights[i], slots, cfg.data.augment.multiplicity
            )
        aug[i] = (
            sampling.slot_seeds(ids.slices, batches[i], augment_key, round_num, views)
            if augment
            else None
        )
        seeds[i] = sampling.noise_seed(run_key, round_num, site.name)
    return RoundPlan(round_num, list(chosen), batches, weights, seeds, aug)


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
    return split_dice(model, sites, "val", batch)


def split_dice(model: tf.keras.Model, sites: list[SiteData], split: str, batch: int = 32) -> float:
    """Mean over sites of the pooled Dice on `split` ("val" or "test"; threshold 0.5)."""
    scores = []
    for s in sites:
        part = getattr(s, split)
        if len(part) == 0:
            continue
        probs = model.predict(part.images, batch_size=batch, verbose=0)
        scores.append(float(pooled_dice(probs, part.labels)))
    return float(np.mean(scores)) if scores else float("nan")


def ema_update(
    ema: list[np.ndarray] | None, weights: list[np.ndarray], decay: float
) -> list[np.ndarray]:
    """The EMA of the released global models after one more: decay·ema + (1 - decay)·weights;
    the first released model itself when there is none yet (`train.ema_decay`)."""
    if ema is None:
        return [np.array(w, np.float32, copy=True) for w in weights]
    return [
        (decay * e + (1.0 - decay) * np.asarray(w)).astype(np.float32)
        for e, w in zip(ema, weights, strict=True)
    ]


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


def initial_weights(cfg: Config) -> list[np.ndarray] | None:
    """The trainable weights named by `train.init_from` (a run directory or a .weights.h5
    file of this architecture), or None: the seeded initialisation.

    Loaded through Keras (`load_weights`), so a file of another architecture is refused with
    one line naming it.
    """
    if not cfg.train.init_from:
        return None
    path = Path(cfg.train.init_from)
    file = path / layout.WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise UserError(
            "train.init_from: no model weights here "
            f"(a run directory with {layout.WEIGHTS}, or a .weights.h5 file)",
            file,
        )
    model = training_model_fn(cfg)()
    try:
        model.load_weights(str(file))
    except Exception as e:  # h5py/Keras raise ValueError, OSError, KeyError... for a bad file
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"train.init_from: not weights of this model ({first})", file) from None
    return [v.numpy() for v in model.trainable_variables]


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
    Cross-silo training (sites that keep their data) is `silo.coordinator.train_cross_silo`.
    """
    if data_root is not None:  # record where the data really was (evaluate reads it back)
        cfg = cfg.replace(**{"data.root": str(Path(data_root).resolve())})
    run = prepare_run_dir(cfg, Path(out), resume)
    try:
        sites = load_training_data(cfg, None, progress)
        run.check_data(sites, resume)
        if cfg.train.mode == "centralized":
            return _train_centralized(cfg, run, sites, resume, on_round)
        from tff_privseg.runtime import runtime_for

        with runtime_for(workers, tls_dir):
            return run_rounds(cfg, run, SimulatedSites(cfg, sites), resume, progress, on_round)
    except BaseException:
        run.abandon()  # failed before any round: leave nothing, so the same command works again
        raise
    finally:
        run.close()


class SimulatedSites:
    """The single-machine federation: every site's data in this process.

    What the round loop (`run_rounds`) asks of a federation; `silo.coordinator.RemoteSites`
    answers the same over gRPC."""

    def __init__(self, cfg: Config, sites: list[SiteData]) -> None:
        self.cfg, self.sites = cfg, sites
        self.names = [s.name for s in sites]

    def new_ledger(self) -> PrivacyLedger:
        return new_ledger(self.cfg, self.sites)

    def build_process(self, model_fn: Callable[[], tf.keras.Model], dp: DpSgdSpec | None) -> Any:
        from tff_privseg.federated.hybrid import build_hybrid_process
        from tff_privseg.federated.process import build_process

        cfg = self.cfg
        build = build_hybrid_process if cfg.train.execution == "hybrid" else build_process
        k = sites_per_round(cfg, len(self.sites))
        return build(cfg, model_fn, get_loss(cfg.train.loss), k, dp)

    def plan(
        self, ledger: PrivacyLedger, round_num: int, run_key: str, chosen: list[int]
    ) -> tuple[list[Any], PrivacyLedger]:
        """The round's client data and the ledger once it is released."""
        plan = plan_round(self.cfg, self.sites, round_num, run_key, chosen)
        level = self.cfg.privacy.level
        steps = plan.steps(self.names) if level == "sample" else {"federation": 1}
        return client_inputs(self.cfg, self.sites, plan), ledger.with_round(steps)

    def released(self, ledger: PrivacyLedger, process: Any) -> PrivacyLedger:
        return ledger

    def validation_dice(self, model: tf.keras.Model, round_num: int) -> float:
        return validation_dice(model, self.sites)


def run_rounds(
    cfg: Config,
    run: RunDir,
    federation: Any,
    resume: bool,
    progress: bool,
    on_round: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """The federated round loop, for the simulation (`SimulatedSites`) and cross-silo
    (`silo.coordinator.RemoteSites`): plan, account, run `process.next`, validate, commit."""
    names = federation.names
    dp = dp_sgd_spec(cfg) if cfg.privacy.level == "sample" else None
    model_fn = training_model_fn(cfg)
    process = federation.build_process(model_fn, dp)
    state = process.initialize()
    ledger, start = federation.new_ledger(), 0
    decay = cfg.train.ema_decay
    ema = None  # the EMA of the released global models (train.ema_decay > 0)
    template = (state, process.get_model_weights(state).trainable) if decay > 0 else state
    found = checkpoint.load_newest(run.checkpoints, template, _warn) if resume else None
    if found is not None and found[2]["run_key"] != read_run_key(run):
        raise UserError(f"made with another run key than {run.key_file}", found[0])
    if found is None:  # before `begin`: a bad train.init_from file leaves nothing behind
        state = _with_initial_weights(process, state, cfg)
    run_key = run.begin(cfg, resume)  # persisted before any round is released
    if found is not None:
        path, state, header = found
        if decay > 0:
            state, ema = state[0], [np.asarray(e) for e in state[1]]
        ledger = PrivacyLedger.from_json(header["ledger"])
        start = header["round"]
        ledger = _count_site_level_reruns(cfg, ledger, run.rounds_released() - start)
        run.truncate_metrics(start)
        if "row" in header and not any(r["round"] == start for r in run.metrics_rows()):
            run.append_metrics(header["row"])  # committed, but the crash came before its row
    elif resume:
        if cfg.train.init_from and run.rounds_released() > 0:
            # Released rounds would run again with the same key from a file nothing pins to
            # this run: if it changed, two releases share their noise.
            raise UserError(
                "--resume: no loadable checkpoint, and the rounds already released started from "
                "train.init_from, which this run does not pin; start a new run (--out)",
                run.checkpoints,
            )
        run.truncate_metrics(0)
    eval_model = model_fn()
    writer = tf.summary.create_file_writer(str(run.tensorboard))
    stopped = None
    rows = run.metrics_rows()
    bar = _progress_bar(progress, start, cfg.train.rounds)
    for r in range(start, cfg.train.rounds):
        chosen = choose_sites(cfg, names, r, run_key)
        inputs, next_ledger = federation.plan(ledger, r, run_key, chosen)
        budget = cfg.privacy.target_epsilon
        if budget > 0 and next_ledger.epsilon > budget:
            stopped = (
                f"stopped before round {r + 1}: ε would reach {next_ledger.epsilon:.3f} "
                f"> target_epsilon {budget}"
            )
            break
        t0 = time.perf_counter()
        state = state._replace(client_work=np.float32(client_lr(cfg, r)))
        # Every round runs, also a site-level round whose Poisson sample is empty: it still
        # applies its noised (zero) sum, else an unchanged model would reveal the empty draw.
        output = process.next(state, inputs)
        state, metrics = output.state, output.metrics["client_work"]
        examples, loss_sum = int(metrics["examples"]), float(metrics["loss_sum"])
        ledger = federation.released(next_ledger, process)
        released = process.get_model_weights(state).trainable
        extra = {}
        if decay > 0:  # post-processing of released models only: no privacy cost
            _assign(eval_model, released)
            extra["val_dice_raw"] = federation.validation_dice(eval_model, r)
            ema = ema_update(ema, released, decay)
        _assign(eval_model, ema if decay > 0 else released)
        row = (
            round_row(
                cfg,
                r + 1,
                val_dice=federation.validation_dice(eval_model, r),
                epsilon=ledger.epsilon,
                seconds=time.perf_counter() - t0,
                loss=loss_sum / examples if examples else float("nan"),
                examples=examples,
                sites=[names[i] for i in chosen],
            )
            | extra
        )
        # The round is committed before anything about it leaves: a crash after the checkpoint
        # never re-runs the round (its row is restored from the header on --resume).
        header = {"round": r + 1, "ledger": ledger.to_json(), "run_key": run_key, "row": row}
        checkpoint.save(run.checkpoints, r + 1, (state, ema) if decay > 0 else state, header)
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
    final = process.get_model_weights(state).trainable
    _assign(eval_model, ema if decay > 0 and ema is not None else final)
    _save_model(eval_model, run)
    return _summary(cfg, run, rows, ledger, stopped)


def _with_initial_weights(process: Any, state: Any, cfg: Config) -> Any:
    """`state` starting from `train.init_from`'s public weights (unchanged without it)."""
    init = initial_weights(cfg)
    if init is None:
        return state
    import tensorflow_federated as tff

    weights = tff.learning.models.ModelWeights(trainable=init, non_trainable=[])
    return process.set_model_weights(state, weights)


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
    row["epsilon"] = epsilon_to_json(epsilon)
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
    model = training_model_fn(cfg)()
    init = initial_weights(cfg)
    if init is not None:
        _assign(model, init)
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
    writer = tf.summary.create_file_writer(str(run.tensorboard))
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
    run.publish_ledger(ledger)
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
        "epsilon": epsilon_to_json(ledger.epsilon),
        "delta": cfg.privacy.delta if cfg.privacy.level != "none" else None,
        "privacy": cfg.privacy.level,
        "seconds": sum(r["seconds"] for r in rows),
        "stopped": stopped,
    }
