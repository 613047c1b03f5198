"""Cross-silo training: the coordinator drives sites that keep their data (`site serve`).

`train --sites A=HOST:PORT,B=...` with no data path. The federated algorithm stays the TFF
computation of hybrid execution (`hybrid._server_step`: aggregation -- mean, secure-sum
semantics or `DifferentiallyPrivateFactory` -- and the server optimizer step), and checkpoints
are the same. `CrossSiloProcess` is a `HybridProcess` whose per-site client update is a remote
call to the site (mutual TLS gRPC, `tff_privseg.silo.wire`); sites train in parallel.

What stays with the coordinator: which sites take part (site-level Poisson sampling from the
run key, or the public fixed-size subset), the server state, checkpoints and the run directory.
What the sites own: their data, their Poisson batches, augmentation seeds and DP-SGD noise
(from each site's own key, per run: `silo.state.derive_run_key(site key, run id)`), their
ledger and policy. `privacy.json` reports each site's ε as the site reported it, and their
maximum; validation Dice is pooled from the sites' counts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tff_privseg import config as config_lib
from tff_privseg.config import Config
from tff_privseg.errors import UserError
from tff_privseg.federated.hybrid import HybridProcess
from tff_privseg.federated.train import run_rounds
from tff_privseg.losses import get_loss
from tff_privseg.metrics import dice_of_counts
from tff_privseg.privacy.accounting import PrivacyLedger, UnitLedger
from tff_privseg.privacy.planning import ledger_of_sites
from tff_privseg.privacy.schedule import sites_per_round
from tff_privseg.runtime import TlsFiles
from tff_privseg.silo import wire
from tff_privseg.silo.state import run_id_of

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_sites(spec: str | Sequence[str]) -> list[tuple[str, str]]:
    """'A=h1:p1,B=h2:p2' -> [('A', 'h1:p1'), ('B', 'h2:p2')], sorted by site name (the order
    of the simulation, which loads sites sorted by name)."""
    from tff_privseg.runtime import parse_workers

    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in (i.strip() for i in items if i.strip()):
        name, sep, address = item.partition("=")
        if not sep or not _NAME.match(name):
            raise UserError(f"--sites: '{item}' is not NAME=HOST:PORT")
        try:
            out.append((name, parse_workers(address)[0]))
        except UserError:
            raise UserError(
                f"--sites: '{item}' is not NAME=HOST:PORT (IPv6: [ADDR]:PORT)"
            ) from None
    if not out:
        raise UserError("--sites: no site given (NAME=HOST:PORT,...)")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UserError("--sites: a site name is listed twice")
    return sorted(out)


def check_site_args(sites: str, tls_dir: str | Path | None, data_root: str | None) -> None:
    parse_sites(sites)
    if data_root is not None:
        raise UserError("--sites: the coordinator takes no --data (each site holds its own)")
    if tls_dir is None:
        raise UserError("--sites needs --tls-dir DIR (client.pem, client.key, ca.pem)")
    TlsFiles.client(tls_dir).check()


class SiteError(UserError):
    pass


class SiteClient:
    """One site over mutual TLS; every failure becomes one line naming the site."""

    def __init__(
        self,
        name: str,
        address: str,
        creds: grpc.ChannelCredentials,
        timeout: float | None = None,
    ) -> None:
        """timeout: seconds a call may take (None: no limit); a site past it ends the round."""
        self.name, self.address, self.timeout = name, address, timeout
        self.channel = grpc.secure_channel(address, creds, options=wire.OPTIONS)
        self._calls = {m: self.channel.unary_unary(f"/{wire.SERVICE}/{m}") for m in wire.METHODS}
        self.config_digest = ""

    def call(
        self,
        method: str,
        header: dict[str, Any],
        tensors: Sequence[np.ndarray] = (),
        what: str = "",
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        request = wire.encode(header, list(tensors), side="coordinator", method=method)
        try:
            response = self._calls[method](request, timeout=self.timeout)
        except grpc.RpcError as e:
            code, details = e.code(), (e.details() or "").strip()
            what = what or method
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise SiteError(f"site {self.name} refused {what}: {details}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise SiteError(
                    f"site {self.name} ({self.address}) did not answer {what} within "
                    f"{self.timeout:g} s; the last checkpoint is intact: check the site and run "
                    "`train --resume`"
                ) from None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise SiteError(
                    f"site {self.name} ({self.address}) unreachable or lost during {what} "
                    f"({_short(details)}); the last checkpoint is intact: restart the site and "
                    "run `train --resume`"
                ) from None
            raise SiteError(f"site {self.name} failed {what}: {_short(details)}") from None
        return wire.decode(response, side="coordinator", method=method)

    def close(self) -> None:
        self.channel.close()


def _short(text: str) -> str:
    return (text.splitlines() or [""])[0][:300]


class CrossSiloProcess(HybridProcess):
    """`HybridProcess` whose client update runs at the site, over gRPC."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reports: dict[str, dict[str, Any]] = {}

    def client_update(self, weights: Sequence[np.ndarray], data: dict, lr: float) -> tuple:
        client: SiteClient = data["site"]
        r = data["round"]
        header, delta = client.call(
            "Round",
            {
                "run_id": data["run_id"],
                "round": r,
                "lr": float(lr),
                "config_digest": client.config_digest,
            },
            [np.asarray(w) for w in weights],
            what=f"round {r + 1}",
        )
        self.reports[client.name] = header
        return (
            delta,
            np.float32(header["weight"]),
            np.int64(header["examples"]),
            np.float32(header["loss"]),
        )

    def next(self, state, client_data: Sequence[dict]):
        weights = state.global_model_weights.trainable
        lr = np.float32(state.client_work)
        self.reports = {}
        results = _parallel([lambda d=d: self.client_update(weights, d, lr) for d in client_data])
        updates, update_weights, examples, losses = (
            [list(col) for col in zip(*results, strict=True)] if results else ([], [], [], [])
        )
        return self._server_step(state, updates, update_weights, examples, losses)


def _parallel(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls on threads; results in order; the first failure (in order) is raised
    once all have ended."""
    if not calls:
        return []
    with ThreadPoolExecutor(len(calls)) as pool:
        futs = [pool.submit(c) for c in calls]
        return [f.result() for f in futs]


def _counted_round(ledger: PrivacyLedger) -> PrivacyLedger:
    """`ledger` with one more round, steps and ε to be filled in from the sites' reports."""
    out = PrivacyLedger.from_json(ledger.to_json())
    out.epsilon_per_unit = dict(ledger.epsilon_per_unit)
    out.rounds += 1
    return out


def _with_reports(ledger: PrivacyLedger, reports: dict[str, dict[str, Any]]) -> PrivacyLedger:
    """`ledger` with each reporting site's steps and ε as the site reported them."""
    for name, rep in reports.items():
        if "epsilon" in rep and name in ledger.units:
            u = ledger.units[name]
            ledger.units[name] = UnitLedger(rep["sampling_rate"], rep["steps"], u.records)
            ledger.epsilon_per_unit[name] = float(rep["epsilon"])
    if ledger.epsilon_per_unit:
        ledger.epsilon = max(ledger.epsilon_per_unit.values())
    return ledger


def train_cross_silo(
    cfg: Config,
    out: str | Path,
    sites: str | Sequence[str],
    tls_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """`train --sites`: the coordinator's loop. No data is read here. `timeout`: seconds a
    site may take to answer one call (None: no limit)."""
    from tff_privseg.rundir import prepare_run_dir
    from tff_privseg.runtime import RemoteTls, local_runtime

    addresses = parse_sites(sites)
    if cfg.train.mode != "federated":
        raise UserError("--sites: train.mode = centralized pools the data; use a federated config")
    creds = RemoteTls.from_dir(tls_dir).credentials()
    run = prepare_run_dir(cfg, Path(out), resume)
    clients = [SiteClient(n, a, creds, timeout) for n, a in addresses]
    try:
        run.check_data([], resume)  # the coordinator holds no data; each site checks its own
        with local_runtime():  # the server step: a TFF computation on a private local worker
            summary = run_rounds(cfg, run, RemoteSites(cfg, clients), resume, progress, on_round)
        summary["sites"] = {c.name: c.address for c in clients}
        return summary
    except BaseException:
        run.abandon()  # failed before any round: leave nothing
        raise
    finally:
        for c in clients:
            c.close()
        run.close()


class RemoteSites:
    """The cross-silo federation for `train.run_rounds`: each site plans, trains and accounts
    its part of a round itself, behind `site serve`; this side holds no data."""

    def __init__(self, cfg: Config, clients: list[SiteClient]) -> None:
        self.cfg, self.clients = cfg, clients
        self.names = [c.name for c in clients]
        text = config_lib.dumps(cfg)
        hellos = _parallel(
            [
                lambda c=c: c.call(
                    "Hello", {"site": c.name, "config": text}, what="the run's settings"
                )[0]
                for c in clients
            ]
        )
        self.hello = dict(zip(self.names, hellos, strict=True))
        for c in clients:
            c.config_digest = self.hello[c.name]["config_digest"]

    def new_ledger(self) -> PrivacyLedger:
        return ledger_of_sites(self.cfg, {n: h["records"] for n, h in self.hello.items()})

    def build_process(self, model_fn: Callable[[], Any], dp: Any) -> CrossSiloProcess:
        """The hybrid process with remote client updates (`dp` gives the types only: the
        DP-SGD itself runs at the sites)."""
        k = sites_per_round(self.cfg, len(self.clients))
        return CrossSiloProcess(self.cfg, model_fn, get_loss(self.cfg.train.loss), k, dp)

    def plan(
        self, ledger: PrivacyLedger, round_num: int, run_key: str, chosen: list[int]
    ) -> tuple[list[dict[str, Any]], PrivacyLedger]:
        """The sites' requests, and the ledger predicted for the round (the sites' reports
        replace it in `released`)."""
        if self.cfg.privacy.level != "sample":  # site level: the coordinator's own accounting
            next_ledger = ledger.with_round({"federation": 1})
        elif self.cfg.privacy.target_epsilon > 0:  # predicted only when a target is checked
            steps = {self.names[i]: self.hello[self.names[i]]["local_steps"] for i in chosen}
            next_ledger = ledger.with_round(steps)
        else:
            next_ledger = _counted_round(ledger)
        run_id = run_id_of(run_key)
        inputs = [{"site": self.clients[i], "round": round_num, "run_id": run_id} for i in chosen]
        return inputs, next_ledger

    def released(self, ledger: PrivacyLedger, process: CrossSiloProcess) -> PrivacyLedger:
        return _with_reports(ledger, process.reports)

    def validation_dice(self, model: Any, round_num: int) -> float:
        """Mean over sites of each site's pooled validation Dice, from its counts (as
        `train.validation_dice` computes it on the sites' data in the simulation)."""
        tensors = [v.numpy() for v in model.trainable_variables]
        counts = _parallel(
            [
                lambda c=c: c.call(
                    "Evaluate",
                    {"round": round_num, "config_digest": c.config_digest},
                    tensors,
                    what=f"validation of round {round_num + 1}",
                )[0]
                for c in self.clients
            ]
        )
        scores = [
            dice_of_counts(h["tp"], h["pred"], h["true"]) for h in counts if h.get("val_slices")
        ]
        return float(np.mean(scores)) if scores else float("nan")
