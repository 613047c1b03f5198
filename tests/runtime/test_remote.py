"""Multi-worker execution over mutual TLS, on loopback: `tff-privseg worker` + `remote_runtime`.

Workers run as CLI subprocesses (as users run them); every process they start carries TAG in its
environment, and the module asserts at the end that none of them is left.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ServerProcess, tagged_pids, tiny_cfg, tiny_loss, tiny_model, tiny_site_inputs

from tff_privseg.errors import UserError
from tff_privseg.runtime import (
    RemoteTls,
    WorkerLost,
    make_pki,
    parse_workers,
    probe,
    remote_runtime,
)
from tff_privseg.runtime.remote import _tff_stub_class

ROOT = Path(__file__).resolve().parents[2]
TAG = f"tff-privseg-remote-test-{os.getpid()}"


class Worker(ServerProcess):
    """`tff-privseg worker` in a subprocess; stderr goes to a file (never a full pipe)."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.log = tmp / f"worker-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "worker", "--host", "127.0.0.1", *args],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**os.environ, "TFF_PRIVSEG_TEST_TAG": TAG, "TF_CPP_MIN_LOG_LEVEL": "3"},
            )

    def wait_ready(self, timeout: float = 120) -> Worker:
        self.ready_line(r"listening on tls://(\S+:\d+)", timeout)
        return self

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    make_pki(out)
    return out


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("other-pki")
    make_pki(out, ca_name="some other CA")
    return out


@pytest.fixture(scope="module")
def workers(pki, tmp_path_factory):
    """Two TLS workers for the module; afterwards no process of theirs may remain."""
    tmp = tmp_path_factory.mktemp("workers")
    started = [Worker(tmp, "--port", "0", "--tls-dir", str(pki)) for _ in range(2)]
    try:
        yield [w.wait_ready() for w in started]
    finally:
        codes = [w.stop() for w in started]
        deadline = time.monotonic() + 10
        while tagged_pids(TAG) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not tagged_pids(TAG), "a worker, bridge or worker_binary survived"
        assert codes[0] == 0, started[0].log.read_text()[-2000:]  # clean SIGTERM shutdown


# ---------------------------------------------------------------- TLS front door


def tls_client(pki: Path | None, cert_from: str = "client", tls12: bool = True):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca.pem" if pki else None)
    if tls12:  # the server's verdict on our certificate arrives inside the handshake
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    return ctx


def handshake(ctx: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_worker_refuses_to_listen_without_tls(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "worker", "--port", "0", "--host", "127.0.0.1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TFF_PRIVSEG_TEST_TAG": TAG},
    )
    assert proc.returncode == 2
    assert "refusing to serve the TFF executor without TLS" in proc.stderr
    assert "--insecure" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_client_without_a_valid_certificate_is_refused(workers, pki, other_pki):
    port = workers[0].port
    # No client certificate at all.
    with pytest.raises(ssl.SSLError):
        handshake(tls_client(pki), port).close()
    # A client certificate from another CA.
    ctx = tls_client(pki)
    ctx.load_cert_chain(other_pki / "client.pem", other_pki / "client.key")
    with pytest.raises(ssl.SSLError):
        handshake(ctx, port).close()
    # A certificate of the right CA that is a worker's (serverAuth), not a coordinator's.
    ctx = tls_client(pki)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    with pytest.raises(ssl.SSLError):
        handshake(ctx, port).close()
    # The coordinator's certificate: accepted, TLS 1.2+ with ALPN h2.
    for tls12 in (True, False):
        ctx = tls_client(pki, tls12=tls12)
        ctx.load_cert_chain(pki / "client.pem", pki / "client.key")
        with handshake(ctx, port) as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")
            assert s.selected_alpn_protocol() == "h2"
    # The coordinator's own diagnosis (TLS 1.3, as gRPC connects) names the cause.
    assert probe(workers[0].address, RemoteTls.from_dir(pki)) == "ok"
    assert "not trusted" in probe(workers[0].address, RemoteTls.from_dir(other_pki))
    wrong_role = RemoteTls(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    assert "refused" in probe(workers[0].address, wrong_role)


def test_remote_runtime_with_a_foreign_certificate_fails_naming_the_worker(workers, other_pki):
    runtime = remote_runtime([workers[0].address], **_tls(other_pki), connect_timeout=2)
    with pytest.raises(UserError, match=re.escape(workers[0].address)), runtime:
        pass


def test_unretrieved_worker_lost_tasks_print_nothing_more(caplog):
    """A dead worker's error is reported once; sibling tasks' copies are not logged at exit."""
    import asyncio
    import gc

    _tff_stub_class()  # building the remote stubs installs the asyncio log filter

    async def fail(exc: Exception) -> None:
        raise exc

    def unretrieved(exc: Exception) -> None:
        loop = asyncio.new_event_loop()
        task = loop.create_task(fail(exc))
        loop.run_until_complete(asyncio.wait([task]))
        loop.close()
        del task
        gc.collect()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        unretrieved(WorkerLost("10.0.0.2:8000", "is unreachable or died"))
        assert "never retrieved" not in caplog.text
        unretrieved(ValueError("another bug"))  # anything else is still reported
        assert "never retrieved" in caplog.text and "another bug" in caplog.text


def test_worker_addresses_are_validated():
    assert parse_workers("127.0.0.1:1, localhost:2,[::1]:3") == [
        "127.0.0.1:1",
        "localhost:2",
        "[::1]:3",
    ]
    for bad in ("", "host", "host:0", "a:1,a:1", "http://x:1"):
        with pytest.raises(UserError):
            parse_workers(bad)


# ---------------------------------------------------------------- federated process


def _tls(pki: Path) -> dict:
    return {"cert": pki / "client.pem", "key": pki / "client.key", "ca": pki / "ca.pem"}


SITES = 3
BATCHES = [np.array([0, 1, 2]), np.array([3, 4, 5])]


def build():
    from tff_privseg.federated.process import build_process

    cfg = tiny_cfg(
        **{"privacy.level": "none", "train.client_optimizer": "sgd", "train.client_lr": 0.5}
    )
    process = build_process(cfg, tiny_model, tiny_loss, SITES, None)
    state = process.initialize()
    weights = process.get_model_weights(state)
    rng = np.random.default_rng(0)  # the same start everywhere (tiny_model's init is random)
    fixed = [(0.3 * rng.standard_normal(np.shape(w))).astype(np.float32) for w in weights.trainable]
    return process, process.set_model_weights(state, weights._replace(trainable=fixed))


def run_rounds(rounds: int = 2):
    process, state = build()
    for r in range(rounds):
        state = process.next(state, tiny_site_inputs(r, BATCHES, SITES)).state
    return [np.asarray(w) for w in process.get_model_weights(state).trainable]


def test_two_workers_give_the_single_process_weights(tff_runtime, workers, pki):
    local = run_rounds()  # tff_runtime: the private local worker
    with remote_runtime([w.address for w in workers], **_tls(pki)):
        remote = run_rounds()
    for a, b in zip(local, remote, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)
    for w in workers:  # both took part, as the coordinator's certificate
        assert "coordinator connected" in w.log.read_text()
    # The local runtime is back in place after the remote block.
    assert len(run_rounds(1)) == len(local)


def test_site_level_round_with_no_site_drawn_runs_on_two_workers(tff_runtime, workers, pki):
    """An empty site-level Poisson sample still gets its noised server step (the driver runs
    it so that an unchanged model does not reveal the empty sample): TFF splits no sites
    across the workers without failing."""
    from tff_privseg.federated.process import build_process

    cfg = tiny_cfg(**{"privacy.level": "site", "privacy.noise_multiplier": 0.5})
    with remote_runtime([w.address for w in workers], **_tls(pki)):
        process = build_process(cfg, tiny_model, tiny_loss, 1, None)
        state = process.initialize()
        before = process.get_model_weights(state).trainable
        after = process.get_model_weights(process.next(state, []).state).trainable
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_a_worker_killed_mid_run_gives_an_error_naming_it(tff_runtime, workers, pki):
    """Runs last: it kills the module's second worker (its family must die with it)."""
    victim = workers[1]
    family = descendants(victim.proc.pid)
    assert len(family) >= 3  # the CLI (TLS proxy), the netns bridge, worker_binary
    with remote_runtime([w.address for w in workers], **_tls(pki)):
        process, state = build()
        # round 1 on both workers
        state = process.next(state, tiny_site_inputs(0, BATCHES, SITES)).state
        # SIGKILL (its bridge and worker_binary die with it) while round 2 runs, or, on a
        # fast machine, before a later round: either way that round must fail fast.
        killer = threading.Timer(0.3, victim.stop, args=(signal.SIGKILL,))
        t0 = time.monotonic()
        killer.start()
        try:
            with pytest.raises(UserError, match=re.escape(victim.address)) as err:
                for r in range(1, 20):
                    state = process.next(state, tiny_site_inputs(r, BATCHES, SITES)).state
        finally:
            killer.join()
        assert time.monotonic() - t0 < 60  # fails fast, no endless retry
        assert "--resume" in str(err.value)
    deadline = time.monotonic() + 10
    while family & tagged_pids(TAG) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not family & tagged_pids(TAG)


def descendants(root: int) -> set[int]:
    """`root` and every live process below it."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out
