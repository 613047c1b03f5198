"""The run directory's lifecycle, through the CLI in subprocesses, as users meet it.

The secret run key is persisted (0600 in a 0700 folder) before round 1 and reused by --resume;
a resume that would change the computation or the accounting is refused; one train at a time
per run directory (an OS lock); a damaged checkpoint falls back to the previous one and the rounds
re-run release exactly what they released before; the final model is written atomically (disk
full: one line, no partial file); a failed start leaves nothing, so the same command then works.
Every error: exit code != 0, one line on stderr naming the file or problem, no traceback, no TFF
worker left behind, the run directory unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import start_cli, synth_smoke, tagged_worker_pids, wait_for

ROOT = Path(__file__).resolve().parents[2]
TAG = f"tff-privseg-run-dir-{os.getpid()}"  # in the environment of every process we start


def worker_pids() -> set[int]:
    return tagged_worker_pids(TAG)


SMOKE = ROOT / "configs" / "smoke.toml"


def cli(*args: str, preexec_fn=None) -> subprocess.Popen:
    return start_cli(TAG, *args, preexec_fn=preexec_fn)


def run_cli(*args: str, timeout: float = 300, preexec_fn=None) -> tuple[int, str, str]:
    proc = cli(*args, "--quiet", preexec_fn=preexec_fn)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run_ok(*args: str, timeout: float = 300) -> dict:
    rc, out, err = run_cli(*args, "--json", timeout=timeout)
    assert rc == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def one_line_error(rc: int, err: str, *words: str) -> str:
    """Assert the CLI's error contract and that the line names every one of `words`."""
    assert rc != 0
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    assert not worker_pids()
    return lines[0]


def snapshot(run: Path) -> dict[str, tuple[int, str]]:
    """Every file under `run` (but the lock, whose content is its holder's pid): mode, digest."""
    return {
        str(p.relative_to(run)): (p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def train_args(data: Path, out: Path, *more: str) -> list[str]:
    return ["train", "--config", str(SMOKE), "--data", str(data), "--out", str(out), *more]


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> Path:
    return synth_smoke(tmp_path_factory.mktemp("data") / "smoke")


@pytest.fixture(scope="module")
def trained(smoke_data, tmp_path_factory) -> dict:
    """One 2-round run shared by the tests below, started the way issue 15 #5 failed.

    First with a site's labels missing (the start fails), then, once they are back, with the
    very same command; everything under umask 0, so only the code decides the private modes.
    """
    base = tmp_path_factory.mktemp("trained")
    data, run = base / "data", base / "run"
    shutil.copytree(smoke_data, data)
    labels = data / "siteB" / "labelsTr"
    labels.rename(labels.with_name("labelsTr.away"))
    umask0 = lambda: os.umask(0)  # noqa: E731
    failed = run_cli(*train_args(data, run), preexec_fn=umask0)
    failed_left = run.exists()
    labels.with_name("labelsTr.away").rename(labels)
    rc, out, err = run_cli(*train_args(data, run), "--json", preexec_fn=umask0)
    assert rc == 0, err[-2000:]
    return {
        "data": data,
        "run": run,
        "summary": json.loads(out.strip().splitlines()[-1]),
        "failed": failed,
        "failed_left": failed_left,
    }


def copy_run(trained: dict, dest: Path) -> Path:
    shutil.copytree(trained["run"], dest, symlinks=True)
    (dest / ".lock").unlink(missing_ok=True)
    return dest


def test_failed_start_leaves_nothing_and_the_same_command_then_works(trained):
    rc, _, err = trained["failed"]
    one_line_error(rc, err, "siteB", "labelsTr")
    assert not trained["failed_left"]  # no config.toml, no key, not even the directory
    assert trained["summary"]["rounds"] == 2  # the retry of the same command trained


def test_key_and_checkpoints_are_private_whatever_the_umask(trained):
    run = trained["run"]

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(run / "secret") == 0o700
    assert mode(run / "secret" / "run_key") == 0o600
    assert mode(run / "checkpoints") == 0o700
    ckpts = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["round_000001.npz", "round_000002.npz"]
    assert {mode(p) for p in ckpts} == {0o600}
    key = (run / "secret" / "run_key").read_text().strip()
    assert len(key) == 64 and int(key, 16) >= 0  # 256 bits, hex
    assert mode(run / "secret" / "data_digest") == 0o600
    assert not (run / "data.sha256").exists()  # an unkeyed digest would be a membership test
    with np.load(ckpts[-1]) as z:  # the checkpoints carry the same key (checked on resume)
        assert json.loads(bytes(z["header"]).decode())["run_key"] == key
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def test_sigkill_before_the_first_checkpoint_then_resume_reuses_the_key(trained, tmp_path):
    run = tmp_path / "run"
    proc = cli(*train_args(trained["data"], run), "--quiet")
    key_file = run / "secret" / "run_key"
    wait_for(lambda: key_file.exists(), 120, "the run key", interval=0.02)
    proc.send_signal(signal.SIGKILL)  # during round 1 (the first TFF call takes seconds)
    proc.communicate(timeout=30)
    key = key_file.read_text()
    assert not list(run.glob("checkpoints/round_*.npz"))  # killed before the first checkpoint
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    resumed = run_ok(*train_args(trained["data"], run), "--resume")
    assert key_file.read_text() == key  # not a fresh key: round 1 released once, same noise
    assert resumed["rounds"] == 2
    assert [r["round"] for r in rows(run)] == [1, 2]
    ledger = json.loads((run / "privacy.json").read_text())
    assert ledger["rounds"] == 2 and set(ledger["steps"].values()) == {4}  # counted once
    assert resumed["epsilon"] == trained["summary"]["epsilon"]
    assert not worker_pids()


def test_resume_with_a_changed_noise_multiplier_is_refused(trained, tmp_path):
    from tff_privseg import config as config_lib

    run = copy_run(trained, tmp_path / "run")
    before = snapshot(run)
    changed = tmp_path / "changed.toml"
    config_lib.save(config_lib.load(SMOKE).replace(**{"privacy.noise_multiplier": 2.0}), changed)
    args = ["train", "--config", str(changed), "--data", str(trained["data"]), "--out", str(run)]
    rc, _, err = run_cli(*args, "--resume")
    line = one_line_error(rc, err, str(run), "privacy.noise_multiplier")
    assert "train.rounds" in line  # says what may change
    assert snapshot(run) == before


def test_resume_on_other_data_is_refused(trained, tmp_path):
    """Same key, other records: the rerun round's noise would cancel against the first's."""

    run = copy_run(trained, tmp_path / "run")
    (run / "model.keras").unlink()  # as if killed before the end
    other = tmp_path / "other"  # the same layout and config, other patients
    synth_smoke(other, seed=2)
    before = snapshot(run)
    args = ["train", "--config", str(SMOKE), "--data", str(other), "--out", str(run)]
    rc, _, err = run_cli(*args, "--resume")
    one_line_error(rc, err, str(run / "secret" / "data_digest"), "other data")
    assert snapshot(run) == before
    # the same records in another folder: data.root may change, the keyed digest still matches
    moved = tmp_path / "moved"
    shutil.copytree(trained["data"], moved)
    args = ["train", "--config", str(SMOKE), "--data", str(moved), "--out", str(run)]
    rc, _, err = run_cli(*args, "--resume")
    assert rc == 0, err
    assert (run / "model.keras").is_file()


def test_resume_may_change_rounds_only_where_no_round_run_changes(trained, tmp_path):
    """lr_schedule loglinear: more rounds move the learning rate of rounds 2.. already run."""
    from tff_privseg import config as config_lib
    from tff_privseg.errors import UserError
    from tff_privseg.rundir import prepare_run_dir

    run = copy_run(trained, tmp_path / "run")
    saved = config_lib.load(run / "config.toml")
    prepare_run_dir(saved.replace(**{"train.rounds": 5}), run, resume=True).close()  # constant
    loglinear = saved.replace(**{"train.lr_schedule": "loglinear"})
    config_lib.save(loglinear, run / "config.toml")
    with pytest.raises(UserError, match=r"train\.rounds"):
        prepare_run_dir(loglinear.replace(**{"train.rounds": 5}), run, resume=True)
    with pytest.raises(UserError, match=r"train\.rounds = 1 is below the 2 rounds"):
        prepare_run_dir(loglinear.replace(**{"train.rounds": 1}), run, resume=True)
    (run / "secret" / "run_key").unlink()
    with pytest.raises(UserError, match=r"run_key: missing, but rounds were already run"):
        prepare_run_dir(loglinear, run, resume=True)


def test_a_second_train_on_a_running_run_directory_is_refused(trained, tmp_path):
    run = tmp_path / "run"
    first = cli(*train_args(trained["data"], run, "--rounds", "50"), "--quiet")
    try:
        wait_for(lambda: (run / "config.toml").exists(), 120, "the first train to begin")
        second = cli(*train_args(trained["data"], run, "--rounds", "50"), "--quiet")
        third = cli(*train_args(trained["data"], run, "--rounds", "50"), "--resume", "--quiet")
        for proc in (second, third):
            _, err = proc.communicate(timeout=120)
            assert proc.returncode != 0 and "Traceback" not in err
            assert err.strip().splitlines() == [
                f"error: {run}: another train is running on this run directory (pid {first.pid})"
            ]
        assert first.poll() is None  # the first one is untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    done = [r["round"] for r in rows(run)] if (run / "metrics.jsonl").exists() else []
    assert done == list(range(1, len(done) + 1))  # no duplicated row
    # the kernel released the lock with the SIGKILL: the next start is no longer locked out
    rc, _, err = run_cli(*train_args(trained["data"], run))
    one_line_error(rc, err, "exists and is not empty")


def test_damaged_last_checkpoint_falls_back_and_the_rerun_round_is_the_same(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    last = run / "checkpoints" / "round_000002.npz"
    original = {k: v for k, v in np.load(last).items()}
    lost_rows, ledger = rows(run), (run / "privacy.json").read_text()
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit inside the state tensors (zip CRC)
    last.write_bytes(bytes(data))

    rc, out, err = run_cli(*train_args(trained["data"], run), "--resume", "--json")
    assert rc == 0, err
    warnings = [x for x in err.strip().splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and str(last) in warnings[0] and "round_000001.npz" in warnings[0]
    # round 2 ran again with the same key: the same plan and noise, so the same release ...
    with np.load(last) as z:
        assert sorted(z.files) == sorted(original)
        for k in original:
            if k == "header":  # the same round, ledger, key and row; only its wall time differs
                new, old = (json.loads(bytes(h).decode()) for h in (z[k], original[k]))
                for h in (new, old):
                    h["row"].pop("seconds")
                assert new == old
            else:
                np.testing.assert_array_equal(z[k], original[k], err_msg=k)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(rows(run)) == strip(lost_rows)
    # ... and the ledger counts it once
    assert (run / "privacy.json").read_text() == ledger
    assert json.loads(out.strip().splitlines()[-1])["epsilon"] == trained["summary"]["epsilon"]


def test_no_checkpoint_loads_is_one_line_naming_it(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    for p in (run / "checkpoints").glob("round_*.npz"):
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)
    before = snapshot(run)
    rc, _, err = run_cli(*train_args(trained["data"], run), "--resume")
    one_line_error(rc, err, str(run / "checkpoints" / "round_000002.npz"), "damaged checkpoint")
    assert snapshot(run) == before


def _file_size_limit(limit: int):
    def preexec() -> None:  # writes past `limit` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_disk_full_while_saving_the_model_is_one_line_and_no_partial_file(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    assert (run / "model.keras").stat().st_size > 64_000  # checkpoints are ~30 kB
    (run / "model.keras").unlink()
    (run / "model.weights.h5").unlink()
    # all rounds are checkpointed: --resume only writes the final model
    args = train_args(trained["data"], run)
    rc, _, err = run_cli(*args, "--resume", preexec_fn=_file_size_limit(64_000))
    one_line_error(rc, err, str(run / "model.keras"), "File too large")
    assert not [p.name for p in run.iterdir() if p.name.startswith(("model", ".model"))]

    assert run_ok(*args, "--resume")["rounds"] == 2  # space again: the same command finishes
    import tensorflow as tf

    import tff_privseg.models  # noqa: F401  (registers the custom layers)

    tf.keras.models.load_model(run / "model.keras", compile=False)


def test_a_crash_after_the_checkpoint_restores_the_rounds_row_without_rerunning(trained, tmp_path):
    """The checkpoint commits a round before its row is written: --resume restores the row."""
    run = copy_run(trained, tmp_path / "run")
    full = rows(run)
    (run / "metrics.jsonl").write_text(json.dumps(full[0]) + "\n")  # killed before row 2
    (run / "model.keras").unlink()
    ckpt = (run / "checkpoints" / "round_000002.npz").read_bytes()
    rc, _, err = run_cli(*train_args(trained["data"], run), "--resume")
    assert rc == 0, err
    assert rows(run) == full  # round 2's row comes back as it was, seconds included
    assert (run / "checkpoints" / "round_000002.npz").read_bytes() == ckpt  # not run again


def test_site_level_reruns_are_counted_again():
    """Site-level noise is drawn by TFF's aggregator, not from the run key: a round released,
    lost with its checkpoint and run again is a second release."""
    from tff_privseg import config as config_lib
    from tff_privseg.federated.train import _count_site_level_reruns
    from tff_privseg.privacy.accounting import PrivacyLedger, UnitLedger

    def ledger(level: str, steps: int, rounds: int) -> PrivacyLedger:
        unit = "federation" if level == "site" else "siteA"
        out = PrivacyLedger(level, "rdp", 1.2, 1.0, 1e-5, units={unit: UnitLedger(0.3, steps, 24)})
        out.rounds = rounds
        out.refresh()
        return out

    site = config_lib.load(SMOKE).replace(**{"privacy.level": "site"})
    counted = _count_site_level_reruns(site, ledger("site", 3, 3), 2)
    assert counted.rounds == 3 and counted.units["federation"].steps == 5
    assert counted.epsilon == pytest.approx(ledger("site", 5, 5).epsilon)
    assert counted.epsilon > ledger("site", 3, 3).epsilon
    sample = config_lib.load(SMOKE)  # same key, same plan and noise: the same release
    assert _count_site_level_reruns(sample, ledger("sample", 6, 3), 2).units["siteA"].steps == 6
    assert _count_site_level_reruns(site, ledger("site", 3, 3), 0).units["federation"].steps == 3
