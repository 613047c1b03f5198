"""Cross-silo deployment on loopback: three `site serve` processes, each with its own data
folder, and a coordinator (`train --sites`) with no data path, in a working directory outside
the data; every CLI step in a fresh process, as a user runs it.

Keys are fixed the test-only way: each site's state folder gets the same pre-written site key,
the coordinator's run directory a pre-written run key (`train --resume` on a run directory
holding config.toml + secret/run_key), and the simulation's run directory the run key the sites
derive for that run (`derive_run_key(site key, run_id_of(coordinator key))`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ServerProcess, tagged_pids

from tests.conftest import synth_smoke
from tff_privseg import config as config_lib
from tff_privseg.runtime import make_pki
from tff_privseg.silo.state import derive_run_key, run_id_of

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.toml"
TAG = f"tff-privseg-silo-test-{os.getpid()}"
SITE_KEY = "5a" * 32
COORD_KEY = "c3" * 32
NAMES = ("siteA", "siteB", "siteC")
R = 32  # smoke resolution

SITE_TOML = """
[site.accept]
unit = "slice"
min_noise_multiplier = 1.0
max_sampling_rate = 0.5
max_epsilon = 50.0
delta = 1e-5

[data]
resolution = 32
crop_slices = 8
"""


def env(wire_log: Path | None = None) -> dict[str, str]:
    out = {**os.environ, "TFF_PRIVSEG_TEST_TAG": TAG, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out.pop("TFF_PRIVSEG_WIRE_LOG", None)
    if wire_log is not None:
        out["TFF_PRIVSEG_WIRE_LOG"] = str(wire_log)
    return out


class Site(ServerProcess):
    """`tff-privseg site serve` in a subprocess; its log (stderr) goes to a file."""

    def __init__(self, world: dict, name: str) -> None:
        self.name, self.world = name, world
        self.log = world["tmp"] / f"{name}.log"

    def start(self) -> Site:
        w = self.world
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "site", "serve", "--config", str(w["site_toml"]),
                 "--data", str(w["hosp"][self.name]), "--listen", "127.0.0.1:0",
                 "--tls-dir", str(w["pki"])],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                text=True, env=env(w["wire_log"]),
            )  # fmt: skip
        return self

    def wait_ready(self, timeout: float = 300) -> Site:
        m = self.ready_line(r"listening on tls://(\S+:\d+) (\S+)", timeout)
        assert m[2] == self.name
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        return super().stop(sig, timeout)


def cli(*args: str, cwd: Path, wire_log: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args], cwd=cwd, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**env(wire_log), "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def pre_run_dir(run: Path, key: str, cfg_path: Path = SMOKE) -> None:
    """A run directory that `train --resume` starts with the given key (test-only)."""
    (run / "secret").mkdir(parents=True)
    os.chmod(run / "secret", 0o700)
    (run / "config.toml").write_text(config_lib.dumps(config_lib.load(cfg_path)))
    (run / "secret" / "run_key").write_text(key + "\n")
    os.chmod(run / "secret" / "run_key", 0o600)


def sites_arg(sites: dict[str, Site]) -> str:
    return ",".join(f"{n}={s.address}" for n, s in sites.items())


def coordinator(world: dict, config: Path, *extra: str, cwd: Path, **kw: Any) -> subprocess.Popen:
    """`train --sites` on the world's sites into cwd/run (no data path), `extra` appended."""
    sites = sites_arg(world["sites"])
    return cli("train", "--config", str(config), "--sites", sites, "--tls-dir",
               str(world["pki"]), "--out", "run", *extra, cwd=cwd, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data (one folder per hospital), a PKI, and three running sites with the same key."""
    tmp = tmp_path_factory.mktemp("silo")
    data = synth_smoke(tmp / "data")
    pki = tmp / "pki"
    make_pki(pki)
    hosp = {}
    for name in NAMES:
        shutil.copytree(data / name, tmp / f"hosp_{name}" / name)
        hosp[name] = tmp / f"hosp_{name}" / name
        state = tmp / f"hosp_{name}" / f"{name}.site-state"  # the default: beside the data
        state.mkdir(mode=0o700)
        (state / "site_key").write_text(SITE_KEY + "\n")
        os.chmod(state / "site_key", 0o600)
    (tmp / "site.toml").write_text(SITE_TOML)
    w = {"tmp": tmp, "data": data, "pki": pki, "hosp": hosp, "site_toml": tmp / "site.toml",
         "wire_log": tmp / "wire.jsonl"}  # fmt: skip
    w["sites"] = {n: Site(w, n).start() for n in NAMES}
    try:
        for s in w["sites"].values():
            s.wait_ready()
        yield w
    finally:
        codes = {n: s.stop() for n, s in w["sites"].items()}
        assert all(c is not None for c in codes.values())
        deadline = time.monotonic() + 30
        while tagged_pids(TAG) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not tagged_pids(TAG), "a site process was left running"


@pytest.fixture(scope="module")
def trained(world):
    """The same two rounds cross-silo and as the single-machine simulation, side by side."""
    tmp = world["tmp"]
    coord_cwd = tmp / "coordinator"
    coord_cwd.mkdir()
    pre_run_dir(coord_cwd / "run", COORD_KEY)
    sim_run = tmp / "sim"
    pre_run_dir(sim_run, derive_run_key(SITE_KEY, run_id_of(COORD_KEY)))
    coord = coordinator(world, SMOKE, "--resume", "--quiet", "--json", cwd=coord_cwd,
                        wire_log=world["wire_log"])  # fmt: skip
    sim = cli("train", "--config", str(SMOKE), "--data", str(world["data"]), "--out",
              str(sim_run), "--resume", "--quiet", "--json", cwd=tmp)  # fmt: skip
    c_code, c_out, c_err = finish(coord)
    s_code, s_out, s_err = finish(sim)
    assert c_code == 0, c_err[-3000:]
    assert s_code == 0, s_err[-3000:]
    return {"coord": coord_cwd / "run", "coord_cwd": coord_cwd, "sim": sim_run,
            "summary": json.loads(c_out.strip().splitlines()[-1])}  # fmt: skip


def checkpoint_arrays(run: Path, round_num: int) -> list[np.ndarray]:
    with np.load(run / "checkpoints" / f"round_{round_num:06d}.npz") as z:
        return [z[k] for k in sorted(z.files) if k.startswith("s")]


def test_cross_silo_reaches_the_simulation_weights(world, trained):
    coord, sim = trained["coord"], trained["sim"]
    a, b = checkpoint_arrays(coord, 2), checkpoint_arrays(sim, 2)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    start = checkpoint_arrays(coord, 1)
    assert any(np.abs(x - y).max() > 1e-4 for x, y in zip(a, start, strict=True))  # it trained
    c_rows = [json.loads(line) for line in (coord / "metrics.jsonl").read_text().splitlines()]
    s_rows = [json.loads(line) for line in (sim / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in c_rows] == [1, 2]
    for c, s in zip(c_rows, s_rows, strict=True):
        assert c.keys() == s.keys()
        assert c["val_dice"] == pytest.approx(s["val_dice"], abs=1e-4)
        assert c["epsilon"] == pytest.approx(s["epsilon"], rel=1e-9)
        assert c["sites"] == s["sites"]
    c_priv = json.loads((coord / "privacy.json").read_text())
    s_priv = json.loads((sim / "privacy.json").read_text())
    assert c_priv["steps"] == s_priv["steps"]
    assert c_priv["sampling_rate"] == s_priv["sampling_rate"]
    for name in NAMES:  # each site's ε as it reported it: the same accountant, the same numbers
        assert c_priv["epsilon_per_unit"][name] == pytest.approx(s_priv["epsilon_per_unit"][name])
    assert c_priv["epsilon"] == max(c_priv["epsilon_per_unit"].values())
    # the coordinator never touched data: no data folder built in its working directory, and
    # each site's own ledger says the same
    assert not (trained["coord_cwd"] / "data").exists()
    for name in NAMES:
        state = world["hosp"][name].with_name(f"{name}.site-state")
        (record,) = (json.loads(p.read_text()) for p in (state / "runs").glob("*.json"))
        assert record["ledger"]["steps"] == {name: c_priv["steps"][name]}
        assert record["ledger"]["epsilon"] == pytest.approx(c_priv["epsilon_per_unit"][name])
        assert oct((state / "runs").stat().st_mode & 0o777) == "0o700"


def test_no_slice_or_label_crosses_the_wire(world, trained):
    """Both sides record every message's tensor shapes at the serialization layer: only the
    model's weight shapes ever travel; bytes per round per site against the model size."""
    import tensorflow as tf

    from tff_privseg.models import training_model_fn

    cfg = config_lib.load(SMOKE)
    model = training_model_fn(cfg)()
    weight_shapes = {tuple(v.shape) for v in model.trainable_variables}
    model_bytes = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)
    entries = [json.loads(line) for line in world["wire_log"].read_text().splitlines()]
    sides = {(e["side"], e["direction"]) for e in entries}
    assert sides == {("site", "send"), ("site", "recv"), ("coordinator", "send"),
                     ("coordinator", "recv")}  # fmt: skip
    for e in entries:
        for shape in e["shapes"]:
            assert tuple(shape) in weight_shapes, (e["method"], shape)
            assert sum(1 for d in shape if d == R) < 2, shape  # nothing image-shaped
            assert not (len(shape) >= 2 and shape[-2:] == [R, R])
    del tf
    sent = [e for e in entries if e["side"] == "coordinator" and e["direction"] == "send"]
    recv = [e for e in entries if e["side"] == "coordinator" and e["direction"] == "recv"]
    rounds, sites = 2, len(NAMES)
    down = sum(e["bytes"] for e in sent if e["method"] in ("Round", "Evaluate")) / rounds / sites
    up = sum(e["bytes"] for e in recv if e["method"] in ("Round", "Evaluate")) / rounds / sites
    hello = sum(e["bytes"] for e in sent if e["method"] == "Hello") / sites
    report = {"model_bytes": model_bytes, "down_per_round_per_site": down,
              "up_per_round_per_site": up, "hello_per_site": hello}  # fmt: skip
    print("cross-silo bytes:", json.dumps(report))
    (world["tmp"] / "bytes.json").write_text(json.dumps(report))
    # down: the weights twice (round + validation); up: the delta once (+ small headers)
    assert 2 * model_bytes <= down <= 2 * model_bytes * 1.1 + 4096
    assert model_bytes <= up <= model_bytes * 1.1 + 4096


def variant(tmp: Path, name: str, **train_or_privacy: object) -> Path:
    text = SMOKE.read_text()
    for key, value in train_or_privacy.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"noise_multiplier": 0.5}, "noise multiplier 0.5 is below the site's minimum 1"),
        ({"local_steps": 1000}, "round 1 would take the site's ε to"),
    ],
    ids=["low-noise", "over-budget"],
)
def test_site_refuses_and_the_coordinator_says_so_in_one_line(world, trained, change, why):
    tmp = world["tmp"]
    cfg = variant(tmp, "refused-" + next(iter(change)), **change)
    cwd = tmp / f"coord-{next(iter(change))}"
    cwd.mkdir()
    logs = {n: s.log.read_text() for n, s in world["sites"].items()}
    code, out, err = finish(coordinator(world, cfg, "--quiet", cwd=cwd))
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.match(r"error: site site[ABC] refused .*" + re.escape(why), lines[0]), lines[0]
    for n, s in world["sites"].items():  # each site logged its refusal in one line
        new = s.log.read_text()[len(logs[n]) :]
        assert "refused" in new and why in new
    # nothing was counted: each site still has only the first run's ledger
    for name in NAMES:
        state = world["hosp"][name].with_name(f"{name}.site-state")
        assert len(list((state / "runs").glob("*.json"))) == 1


def copy_of_trained_run(world: dict, trained: dict, name: str) -> Path:
    """A coordinator folder holding a copy of the two-round cross-silo run, ready to resume."""
    cwd = world["tmp"] / name
    shutil.copytree(trained["coord"], cwd / "run")
    (cwd / "run" / ".lock").unlink(missing_ok=True)
    return cwd


def site_ledger(world: dict, name: str) -> dict:
    state = world["hosp"][name].with_name(f"{name}.site-state")
    records = [json.loads(p.read_text()) for p in (state / "runs").glob("*.json")]
    (record,) = (r for r in records if len(r["rounds"]) >= 2)  # the trained run
    return record


@pytest.mark.slow
def test_a_site_that_stops_answering_ends_the_round_at_the_timeout(world, trained):
    """siteC is frozen (SIGSTOP): the coordinator's call to it runs past --site-timeout and the
    round ends with one line naming it; nothing about the round is committed. (The timeout is
    kept short: left long, a frozen site can fail gRPC's TLS handshake first, which is reported
    as unreachable -- also one line naming it.)"""
    cwd = copy_of_trained_run(world, trained, "coord-hung")
    c = world["sites"]["siteC"]
    os.kill(c.proc.pid, signal.SIGSTOP)
    try:
        args = ("--resume", "--rounds", "3", "--site-timeout", "5", "--quiet")
        code, _, err = finish(coordinator(world, SMOKE, *args, cwd=cwd))
    finally:
        os.kill(c.proc.pid, signal.SIGCONT)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert re.match(
        r"error: site siteC \(127\.0\.0\.1:\d+\) did not answer .* within 5 s", lines[0]
    )
    run = cwd / "run"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "privacy.json").read_text())["rounds"] == 2


@pytest.mark.slow  # about a minute more on 2 cores: run with -m slow
def test_site_lost_mid_round_then_restarted_and_resumed(world, trained):
    """siteB is killed (SIGKILL) while it trains round 3: one line naming it, the last
    checkpoint and every ledger consistent; restarted with the same state folder it keeps its
    key and ledger; `--resume` finishes round 3, which the other sites answer again with the
    same update without counting it twice."""
    cwd = copy_of_trained_run(world, trained, "coord-fault")
    b = world["sites"]["siteB"]
    key_file = world["hosp"]["siteB"].with_name("siteB.site-state") / "site_key"
    offset = len(world["wire_log"].read_bytes())
    args = ("--resume", "--rounds", "3", "--quiet")
    coord = coordinator(world, SMOKE, *args, cwd=cwd)

    def b_got_round() -> bool:
        new = world["wire_log"].read_bytes()[offset:].decode().splitlines()
        return any(
            (e := json.loads(line))["pid"] == b.proc.pid
            and e["method"] == "Round"
            and e["direction"] == "recv"
            for line in new
        )

    deadline = time.monotonic() + 600
    while not b_got_round():
        assert coord.poll() is None, coord.communicate()
        assert time.monotonic() < deadline, "siteB never got round 3"
        time.sleep(0.05)
    b.proc.kill()
    b.stop()
    code, _, err = finish(coord)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.match(r"error: site siteB \(127\.0\.0\.1:\d+\) .*lost during round 3", lines[0])
    run = cwd / "run"
    assert [p.name for p in sorted((run / "checkpoints").glob("*.npz"))][-1] == "round_000002.npz"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "privacy.json").read_text())["rounds"] == 2
    before = {n: site_ledger(world, n) for n in NAMES}
    before_logs = {n: world["sites"][n].log.read_text() for n in NAMES}
    assert before["siteB"]["ledger"]["steps"]["siteB"] in (4, 6)  # killed before or after
    key = key_file.read_text()

    restarted = Site(world, "siteB").start().wait_ready()
    world["sites"]["siteB"] = restarted
    assert key_file.read_text() == key  # the site keeps its key
    code, out, err = finish(coordinator(world, SMOKE, *args, cwd=cwd))  # the restarted siteB
    assert code == 0, err[-3000:]
    after = {n: site_ledger(world, n) for n in NAMES}
    priv = json.loads((run / "privacy.json").read_text())
    for n in NAMES:  # 3 rounds x 2 steps, round 3 counted once wherever it ran twice
        assert after[n]["ledger"]["steps"][n] == 6
        assert priv["steps"][n] == 6
        assert priv["epsilon_per_unit"][n] == pytest.approx(after[n]["ledger"]["epsilon"])
    for n in ("siteA", "siteC"):  # they had run round 3: asked again, answered uncounted
        assert "round 3 of run" in before_logs[n]
        assert re.search(r"round 3 of run \w+: repeated", world["sites"][n].log.read_text())
        assert before[n]["rounds"]["2"] == after[n]["rounds"]["2"]  # the same request again
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]


# --- units (no processes) ----------------------------------------------------------------


def test_wire_round_trip_and_site_config_checks(tmp_path):
    from tff_privseg.errors import UserError
    from tff_privseg.silo import wire
    from tff_privseg.silo.coordinator import parse_sites
    from tff_privseg.silo.policy import load_site_config, refusal

    tensors = [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros((0,), np.int64)]
    data = wire.encode({"a": 1}, tensors, side="t", method="Round")
    header, back = wire.decode(data, side="t", method="Round")
    assert header == {"a": 1}
    for x, y in zip(tensors, back, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)

    path = tmp_path / "site.toml"
    path.write_text(SITE_TOML)
    site = load_site_config(path)
    assert site.policy.max_epsilon == 50.0 and site.cfg.data.resolution == 32
    cfg = config_lib.load(SMOKE)
    assert refusal(site.policy, cfg, 0.25) is None
    assert "sampling rate 0.75 exceeds" in refusal(site.policy, cfg, 0.75)
    patient = cfg.replace(**{"privacy.unit": "patient"})
    assert "privacy unit 'patient' differs" in refusal(site.policy, patient, 0.25)
    path.write_text(SITE_TOML.replace("max_epsilon = 50.0", "max_epsilon = 5\nextra = 1"))
    with pytest.raises(UserError, match="unknown key site.accept.extra"):
        load_site_config(path)
    path.write_text(SITE_TOML.replace("delta = 1e-5", ""))
    with pytest.raises(UserError, match="missing key site.accept.delta"):
        load_site_config(path)

    assert parse_sites("b=h:2,a=h:1") == [("a", "h:1"), ("b", "h:2")]
    for bad in ("a=h:1,a=h:2", "h:1", "a=h", ""):
        with pytest.raises(UserError, match="--sites"):
            parse_sites(bad)
    k = derive_run_key(SITE_KEY, run_id_of(COORD_KEY))
    assert len(k) == 64 and k != derive_run_key("00" * 32, run_id_of(COORD_KEY))
    assert k == derive_run_key(SITE_KEY, run_id_of(COORD_KEY))
