"""`tff-privseg site serve`: one hospital's long-lived process, next to its data.

It loads and caches its own scans (`load_site`), keeps its own key and ledger (`state`), and
answers a coordinator over mutual TLS gRPC (`wire`):

- Hello(config): checks the coordinator's config against the site's policy and data settings;
  answers the site's name, its record count and sampling rate, its local steps per round.
- Round(run id, round, lr; global weights): draws the round's Poisson batches, augmentation
  and DP noise from ITS key (`federated.train.plan_round` on this one site: the simulation's
  draws when the keys are equal), checks the round against its policy and its ε budget, runs
  the local update (`federated.client.build_client_update`, as `HybridProcess.client_update`
  runs it: DP-SGD clipping and noise included, on its GPU when there is one), persists its
  ledger, and answers only the noised delta (and, without DP, the example count and loss).
- Evaluate(global weights): pooled Dice counts over its validation patients (three numbers).

A refusal is one line, to the coordinator (gRPC FAILED_PRECONDITION) and in the site's log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import tomllib
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tff_privseg import config as config_lib
from tff_privseg.config import Config, DataConfig
from tff_privseg.data import SiteData
from tff_privseg.errors import UserError
from tff_privseg.runtime import TlsFiles
from tff_privseg.silo import wire
from tff_privseg.silo.policy import SiteConfig, data_differences, refusal
from tff_privseg.silo.state import SiteState, derive_run_key

log = logging.getLogger("tff_privseg.site")


class Refused(Exception):
    """The site will not run what was asked: one line, for the coordinator and the log."""


def load_site(
    cfg: DataConfig, folder: str | Path, cache: Path | None, name: str | None
) -> SiteData:
    """One site folder (MSD layout or images/ + labels/): split by patient and preprocessed as
    `load_sites` does for the same folder under a dataset root (same split, same slices)."""
    from tff_privseg.data.layout import _detect, _read_images_labels, _read_msd
    from tff_privseg.data.loader import PreparedSite, allowed_labels, prepare_volume
    from tff_privseg.data.split import split_site

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            "site data folder not found" if not folder.exists() else "not a folder", folder
        )
    kind = _detect(folder) if cfg.layout == "auto" else cfg.layout
    files = _read_msd(folder) if kind == "msd" else _read_images_labels(folder)
    if not files.cases:
        raise UserError("empty site: no CT/label pairs found", folder)
    name = name or files.name
    split = split_site(
        [c.case for c in files.cases],
        name,
        cfg.test_fraction,
        cfg.val_fraction,
        cfg.split_seed,
        folder,
    )
    allowed = allowed_labels(cfg, files.labels)
    volumes = {c.case: prepare_volume(c, cfg, allowed, cache) for c in files.cases}
    prepared = PreparedSite(files, split, volumes)
    site = SiteData(
        name=name, **{s: prepared.slice_set(s, cfg.resolution) for s in ("train", "val", "test")}
    )
    if len(site.train) == 0:
        raise UserError(f"site '{name}' has no training slices", folder)
    return site


def config_digest(cfg: Config) -> str:
    """What must stay fixed within a run: the config without where the data lives and without
    train.rounds (a resumed run may add rounds; each round's lr is in its own request)."""
    fixed = cfg.replace(**{"data.root": "", "data.cache_dir": "", "train.rounds": 1})
    return hashlib.sha256(config_lib.dumps(fixed).encode()).hexdigest()[:32]


class _Session:
    """What one coordinator config needs at the site: its model, local update, schedule."""

    def __init__(self, cfg: Config, site: SiteData) -> None:
        import tensorflow as tf

        from tff_privseg.federated.client import build_client_update
        from tff_privseg.federated.hybrid import default_device
        from tff_privseg.federated.process import client_optimizer
        from tff_privseg.losses import get_loss
        from tff_privseg.models import training_model_fn
        from tff_privseg.privacy.dp_sgd import dp_sgd_spec
        from tff_privseg.privacy.schedule import local_steps, records, sampling_rate

        self.cfg = cfg
        self.digest = config_digest(cfg)
        self.records = records(cfg, site)
        self.sampling_rate = sampling_rate(cfg, self.records)
        self.local_steps = local_steps(cfg, len(site.train))
        dp = dp_sgd_spec(cfg) if cfg.privacy.level == "sample" else None
        model_fn = training_model_fn(cfg)
        self.device = default_device()
        with tf.device(self.device):
            self.update = build_client_update(
                model_fn, get_loss(cfg.train.loss), client_optimizer(cfg), dp
            )
        self.eval_model = model_fn()


class SiteService:
    def __init__(
        self, site_cfg: SiteConfig, data: str | Path, state_dir: str | Path, progress: bool = False
    ) -> None:
        self.site_cfg = site_cfg
        self.policy = site_cfg.policy
        self.state = SiteState(state_dir)
        self.key = self.state.key()  # created on first start, kept across restarts
        self.site = load_site(site_cfg.cfg.data, data, self.state.cache, site_cfg.name)
        self.name = self.site.name
        self._sessions: dict[str, _Session] = {}
        self._checked_data: set[str] = set()
        self._lock = threading.Lock()  # one request at a time: one model, one ledger

    # -- the three methods ---------------------------------------------------------------
    def hello(self, header: dict[str, Any], tensors: list) -> tuple[dict[str, Any], list]:
        expected = header.get("site")
        if expected != self.name:
            raise Refused(f"this is site {self.name!r}, not {expected!r}")
        try:
            cfg = config_lib.from_dict(tomllib.loads(header["config"]), source="coordinator config")
        except (UserError, tomllib.TOMLDecodeError, KeyError) as e:
            raise Refused(f"unusable config ({e})") from None
        differ = data_differences(self.site_cfg.cfg, cfg)
        if differ:
            raise Refused(f"config differs from the site's data settings in {', '.join(differ)}")
        # the same config again (a coordinator resuming): the traced update is reused
        session = self._sessions.get(config_digest(cfg)) or _Session(cfg, self.site)
        why = refusal(self.policy, cfg, session.sampling_rate)
        if why:
            raise Refused(why)
        self._sessions[session.digest] = session
        return {
            "site": self.name,
            "config_digest": session.digest,
            "records": session.records,
            "sampling_rate": session.sampling_rate,
            "local_steps": session.local_steps,
            "val_slices": len(self.site.val),
            "device": session.device,
        }, []

    def round(self, header: dict[str, Any], tensors: list) -> tuple[dict[str, Any], list]:
        import tensorflow as tf

        from tff_privseg.federated.train import client_inputs, plan_round
        from tff_privseg.privacy.accounting import PrivacyLedger
        from tff_privseg.privacy.planning import new_ledger
        from tff_privseg.rundir import data_digest

        session = self._session(header)
        cfg, run_id, r = session.cfg, str(header["run_id"]), int(header["round"])
        lr = np.float32(header["lr"])
        run_key = derive_run_key(self.key, run_id)
        asked = _request_digest(session.digest, r, float(lr), tensors)
        record = self.state.load_run(run_id)
        if record is None:
            ledger = new_ledger(cfg, [self.site]) if cfg.privacy.level == "sample" else None
            record = {
                "run_id": run_id,
                "site": self.name,
                "config_digest": session.digest,
                "data_digest": data_digest([self.site], run_key),
                "ledger": None if ledger is None else ledger.to_json(),
                "rounds": {},
            }
            self._checked_data.add(run_id)
        if record["config_digest"] != session.digest:
            raise Refused(f"run {run_id} was started here with another config")
        if run_id not in self._checked_data:
            if record["data_digest"] != data_digest([self.site], run_key):
                raise Refused(f"run {run_id} was trained on other data at this site")
            self._checked_data.add(run_id)
        previous = record["rounds"].get(str(r))
        repeat = previous is not None
        if repeat and previous != asked:
            raise Refused(
                f"round {r + 1} already ran here with other weights or learning rate "
                "(the same noise on another model would cancel out)"
            )
        plan = plan_round(cfg, [self.site], r, run_key, chosen=[0])  # the coordinator chose it
        steps = plan.steps([self.name])[self.name]
        ledger = None if record["ledger"] is None else PrivacyLedger.from_json(record["ledger"])
        total = None if ledger is None else self._total_epsilon(run_id, ledger)
        if ledger is not None and not repeat:
            ledger = ledger.with_round({self.name: steps})
            total = self._total_epsilon(run_id, ledger)
            if total > self.policy.max_epsilon:
                raise Refused(
                    f"round {r + 1} would take the site's ε to {total:.3f} > its limit "
                    f"{self.policy.max_epsilon:g} (δ = {self.policy.delta:g})"
                )
        data = client_inputs(cfg, [self.site], plan)[0]
        # as HybridProcess.client_update runs it
        with tf.device(session.device):
            seed = data["seed"].reduce(tf.zeros([2], tf.int64), lambda _, s: s)
            delta, examples, loss_sum = session.update(
                [tf.constant(w) for w in tensors], data["batches"], seed, tf.constant(lr)
            )
        private = cfg.privacy.level != "none"
        weight = float(examples.numpy()) if cfg.train.weighting == "examples" else 1.0
        if not repeat:  # counted before anything about it leaves
            record["rounds"][str(r)] = asked
            if ledger is not None:
                record["ledger"] = ledger.to_json()
            self.state.save_run(run_id, record)
        out: dict[str, Any] = {
            "site": self.name,
            "round": r,
            "repeat": repeat,
            "weight": weight,
            "examples": 0 if private else int(examples.numpy()),
            "loss": 0.0 if private else float(loss_sum.numpy()),
        }
        if ledger is not None:
            unit = ledger.units[self.name]
            out.update(
                epsilon=ledger.epsilon,
                steps=unit.steps,
                sampling_rate=unit.sampling_rate,
                records=unit.records,
                site_epsilon=total,
            )
        log.info("round %d of run %s: %s%s", r + 1, run_id[:8], "repeated" if repeat else "ran",
                 "" if ledger is None else f", ε = {ledger.epsilon:.3f}")  # fmt: skip
        return out, [d.numpy() for d in delta]

    def evaluate(self, header: dict[str, Any], tensors: list) -> tuple[dict[str, Any], list]:
        from tff_privseg.metrics import pooled_counts

        session = self._session(header)
        val = self.site.val
        if len(val) == 0:
            return {"site": self.name, "val_slices": 0}, []
        for var, value in zip(session.eval_model.trainable_variables, tensors, strict=True):
            var.assign(value)
        probs = session.eval_model.predict(val.images, batch_size=32, verbose=0)
        tp, n_pred, n_true = pooled_counts(probs, val.labels)
        return {
            "site": self.name,
            "val_slices": len(val),
            "tp": tp,
            "pred": n_pred,
            "true": n_true,
        }, []

    # -- helpers -------------------------------------------------------------------------
    def _session(self, header: dict[str, Any]) -> _Session:
        session = self._sessions.get(str(header.get("config_digest")))
        if session is None:
            raise Refused("no Hello for this config since the site started (say Hello first)")
        return session

    def _total_epsilon(self, run_id: str, ledger: Any) -> float:
        """The site's ε over every run on its data (composed), with `ledger` for `run_id`."""
        import dp_accounting

        from tff_privseg.privacy.accounting import PrivacyLedger, dp_sgd_event, make_accountant

        others = [
            PrivacyLedger.from_json(rec["ledger"])
            for rid, rec in self.state.all_runs().items()
            if rid != run_id and rec.get("ledger")
        ]
        if not any(u.steps for lg in others for u in lg.units.values()):
            return ledger.epsilon  # one run on this data: its own ε (already accounted)
        ledgers = [ledger, *others]
        events = [
            dp_sgd_event(u.sampling_rate, lg.noise_multiplier, u.steps)
            for lg in ledgers
            for u in lg.units.values()
            if u.steps
        ]
        if not events:
            return 0.0
        accountant = make_accountant(self.policy.accountant)  # type: ignore[arg-type]
        accountant.compose(dp_accounting.ComposedDpEvent(events))
        return float(accountant.get_epsilon(self.policy.delta))

    def handler(self) -> grpc.GenericRpcHandler:
        def method(name: str, fn: Callable) -> grpc.RpcMethodHandler:
            def call(request: bytes, context: grpc.ServicerContext) -> bytes:
                try:
                    header, tensors = wire.decode(request, side="site", method=name)
                    with self._lock:
                        out, arrays = fn(header, tensors)
                    return wire.encode(out, arrays, side="site", method=name)
                except Refused as e:
                    log.warning("refused %s: %s", name, e)
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
                except Exception as e:  # noqa: BLE001 - one line to the coordinator, trace here
                    if isinstance(e, UserError):
                        log.error("%s failed: %s", name, e)
                    else:
                        log.exception("%s failed", name)
                    first = (str(e).strip().splitlines() or ["(no message)"])[0]
                    context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {first}")
                raise AssertionError("unreachable")

            return grpc.unary_unary_rpc_method_handler(call)

        methods = {"Hello": self.hello, "Round": self.round, "Evaluate": self.evaluate}
        return grpc.method_handlers_generic_handler(
            wire.SERVICE, {n: method(n, f) for n, f in methods.items()}
        )


def _request_digest(config_digest: str, round_num: int, lr: float, weights: list) -> str:
    h = hashlib.sha256(json.dumps([config_digest, round_num, lr]).encode())
    for w in weights:
        a = np.ascontiguousarray(w)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()


def start_server(
    service: SiteService, host: str, port: int, tls: TlsFiles
) -> tuple[grpc.Server, int]:
    """A started gRPC server for `service` behind mutual TLS, and the port it is bound to."""
    tls.check()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=wire.OPTIONS)
    server.add_generic_rpc_handlers((service.handler(),))
    try:
        bound = server.add_secure_port(
            f"{host}:{port}", wire.server_credentials(tls.cert, tls.key, tls.ca)
        )
    except RuntimeError:
        bound = 0
    if not bound:
        server.stop(None)
        raise UserError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound


def serve(
    service: SiteService,
    host: str,
    port: int,
    tls: TlsFiles,
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (raised in this, the main, thread); the server is stopped on
    every way out."""
    server, bound = start_server(service, host, port, tls)
    try:
        log.info("site %s listening on %s:%d", service.name, host, bound)
        if on_ready is not None:
            on_ready(host, bound)
        while server.wait_for_termination(timeout=0.5):
            pass
    finally:
        server.stop(grace=None).wait(5)
