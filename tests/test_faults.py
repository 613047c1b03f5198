"""Bad input and faults, swept through the CLI as a user runs it.

Every case runs `python -m cli ...` in a fresh subprocess on files on disk and must end with:
exit code != 0; stderr exactly one non-empty line, starting with `error:` and naming the file (or
option) and the problem; no traceback; nothing half-written (the `{out}` target not created, or
unchanged when it existed); no TFF worker process and no worker socket folder left behind.

A case is one row of CASES: `(id, setup, argv, needles)`. `setup(ctx)` writes what the case needs
into `ctx["tmp"]` and adds placeholders; argv is formatted with `{data}` (a small synthetic
dataset made once per module), `{tmp}`, `{out}`, `{pki}` (a test PKI), `{cfg}` (a tiny valid
config on `{data}`) and what setup adds (`{worker}`). Most cases fail before TensorFlow loads
(well under a second each).
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w
from _pytest.mark.structures import ParameterSet
from conftest import alive, tagged_worker_pids

ROOT = Path(__file__).resolve().parents[1]
TAG = f"tff-privseg-faults-{os.getpid()}"  # in the environment of every process we start
NAN, INF = math.nan, math.inf
WORKER_DIR = "tff-privseg-worker-"


# ------------------------------------------------------------------------------ the harness


def run_cli(argv: list[str], tmpdir: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    """The CLI as users run it; TMPDIR is private so leftover socket folders can be seen."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TFF_PRIVSEG_TEST_TAG": TAG, "TMPDIR": str(tmpdir)}
    for name in ("GRPC_VERBOSITY", "TF_CPP_MIN_LOG_LEVEL"):  # the CLI's own defaults are tested
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "cli", *argv],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        env=env,
    )


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under `path` (or `path` itself) with its bytes; None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def assert_one_line_error(
    proc: subprocess.CompletedProcess, needles: tuple[str, ...], tmpdir: Path
) -> str:
    err = proc.stderr.decode("utf-8", "backslashreplace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode != 0, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    assert len(lines) == 1, f"more than one line on stderr:\n{err}"
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    deadline = time.monotonic() + 10  # (the parent-death signal is asynchronous)
    while tagged_worker_pids(TAG) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not tagged_worker_pids(TAG), "a TFF worker was left behind"
    assert not list(tmpdir.glob(WORKER_DIR + "*")), "a worker socket folder was left behind"
    return lines[-1]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """2 sites x 3 volumes of 32x32x8: the smallest dataset the default split accepts."""
    root = tmp_path_factory.mktemp("faults") / "data"
    proc = run_cli(["data", "synth", "--out", str(root), "--sites", "2", "--volumes-per-site",
                    "3", "--shape", "32", "32", "8"], root.parent / "tmp")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    from tff_privseg.runtime import make_pki

    out = tmp_path_factory.mktemp("pki")
    make_pki(out)
    return out


BASE = {
    "data": {"source": "files", "resolution": 32, "crop_slices": 8},
    "model": {"depth": 2, "base_filters": 4},
    "train": {"rounds": 1, "local_steps": 1, "batch_size": 2},
    "privacy": {"level": "sample", "noise_multiplier": 1.0, "l2_norm_clip": 1.0},
}


def write_config(path: Path, root: Path, **dotted: object) -> Path:
    raw = {section: dict(values) for section, values in BASE.items()}
    raw["data"]["root"] = str(root)
    for key, value in dotted.items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    path.write_text(tomli_w.dumps(raw))  # TOML has nan and inf: written as such
    return path


@pytest.fixture
def ctx(tmp_path: Path, data: Path, pki: Path) -> dict:
    return {
        "tmp": tmp_path,
        "data": data,
        "out": tmp_path / "out",
        "pki": pki,
        "cfg": write_config(tmp_path / "cfg.toml", data),
    }


# ------------------------------------------------------------------------------ case builders


def config(**dotted: object) -> Callable[[dict], None]:
    """`{cfg}` becomes the base config with dotted keys set (NaN and inf allowed)."""
    keys = {k.replace("__", "."): v for k, v in dotted.items()}

    def setup(c: dict) -> None:
        c["cfg"] = write_config(c["tmp"] / "cfg.toml", c["data"], **keys)

    return setup


def copied(key: str, change: Callable[[Path], None]) -> Callable[[dict], None]:
    """`{key}` (a folder) becomes a copy of the module's, in the case's TMP/key, changed by
    `change(copy)`."""

    def setup(c: dict) -> None:
        copy = c["tmp"] / key
        shutil.copytree(c[key], copy)
        change(copy)
        c[key] = copy

    return setup


def dataset(mutate: Callable[[Path], None]) -> Callable[[dict], None]:
    """`{data}` becomes a copy of the module's dataset, changed by `mutate(root)`; `{cfg}` the
    base config on it."""

    def setup(c: dict) -> None:
        copied("data", mutate)(c)
        c["cfg"] = write_config(c["tmp"] / "cfg.toml", c["data"])

    return setup


def huge_header(root: Path) -> None:
    """Image and label headers claim 30000^3 voxels (the data itself is a few bytes)."""
    import nibabel as nib

    for kind in ("imagesTr", "labelsTr"):
        path = root / "siteA" / kind / "siteA_case001.nii.gz"
        header = nib.load(path).header.copy()
        header.set_data_shape((30000, 30000, 30000))
        with gzip.open(path, "wb") as f:
            f.write(header.binaryblock + b"\0" * 1004)


def non_utf8_site(root: Path) -> None:
    os.rename(os.fsencode(root / "siteB"), os.fsencode(root) + b"/site\xffB")


def by_name(root: Path) -> Path:
    """siteA without dataset.json: its images and labels are paired by file name."""
    (root / "siteA" / "dataset.json").unlink()
    return root / "siteA"


def symlink_loop(root: Path) -> None:
    site = by_name(root)
    for kind in ("imagesTr", "labelsTr"):
        (site / kind / "loop.nii.gz").symlink_to("loop2.nii.gz")
        (site / kind / "loop2.nii.gz").symlink_to("loop.nii.gz")


def broken_symlink(root: Path) -> None:
    site = by_name(root)
    for kind in ("imagesTr", "labelsTr"):
        (site / kind / "moved.nii.gz").symlink_to(root / "elsewhere" / f"{kind}.nii.gz")


def folder_as_image(root: Path) -> None:
    site = by_name(root)
    for kind in ("imagesTr", "labelsTr"):
        (site / kind / "odd.nii.gz").mkdir()


def unreadable(root: Path) -> None:
    site = by_name(root)
    for kind in ("imagesTr", "labelsTr"):
        (site / kind / "siteA_case000.nii.gz").chmod(0)


def corrupted_after_a_clean_check(c: dict) -> None:
    """`data check` passes (and fills the cache); then an image is overwritten in place with
    zeros, size and mtime kept: the cache must not vouch for it."""
    dataset(lambda root: None)(c)
    ok = run_cli(["data", "check", str(c["data"])], c["tmp"] / "proc-tmp")
    assert ok.returncode == 0, ok.stderr
    image = c["data"] / "siteA" / "imagesTr" / "siteA_case000.nii.gz"
    stat = image.stat()
    image.write_bytes(b"\0" * stat.st_size)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def tls_dir(change: Callable[[Path], None]) -> Callable[[dict], None]:
    """`{pki}` becomes a copy of the test PKI, changed by `change(dir)`."""
    return copied("pki", change)


def write(name: str, text: str) -> Callable[[dict], None]:
    def setup(c: dict) -> None:
        (c["tmp"] / name).write_text(text)

    return setup


def existing_out(c: dict) -> None:
    """`{out}` exists and holds a file: it must be left exactly as it was."""
    c["out"].mkdir()
    (c["out"] / "keep.txt").write_text("mine")


def not_tls_listener(c: dict) -> None:
    """A TCP port that answers, but not with TLS: `{worker}`."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    c["worker"] = f"127.0.0.1:{srv.getsockname()[1]}"

    def close() -> None:
        srv.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux)
        srv.close()

    c["_close"] = close


def nothing(c: dict) -> None:
    pass


NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")


class HalfWritten(AssertionError):
    """The --out target was created or changed."""


# (id, setup, argv, needles that the error line must contain)
CASES = [
    # 1. Config values: NaN/inf anywhere, absurd integers, CLI overrides included.
    ("noise-nan-privacy", config(privacy__noise_multiplier=NAN), "privacy --config {cfg}",
     ("cfg.toml", "privacy.noise_multiplier", "finite", "nan")),
    ("noise-inf-train", config(privacy__noise_multiplier=INF), "train --config {cfg} --out {out}",
     ("cfg.toml", "privacy.noise_multiplier", "finite")),
    ("clip-nan-train", config(privacy__l2_norm_clip=NAN), "train --config {cfg} --out {out}",
     ("cfg.toml", "privacy.l2_norm_clip")),
    ("lr-nan", config(train__client_lr=NAN), "config validate {cfg}", ("train.client_lr",)),
    ("end-lr-inf", config(train__lr_schedule="loglinear", train__end_lr=INF),
     "config validate {cfg}", ("train.end_lr",)),
    ("hu-window-nan", config(data__hu_window=[NAN, 200.0]), "data check {data} --config {cfg}",
     ("cfg.toml", "data.hu_window")),
    ("target-epsilon-nan", config(privacy__target_epsilon=NAN), "privacy --config {cfg}",
     ("privacy.target_epsilon",)),
    ("target-epsilon-inf-option", nothing, "privacy --config {cfg} --target-epsilon inf",
     ("--target-epsilon", "finite")),
    ("rounds-overflow-option", nothing, "train --config {cfg} --rounds 1000000000000 --out {out}",
     ("cfg.toml", "train.rounds", "1000000000000")),
    ("rounds-not-a-number-option", nothing, "train --config {cfg} --rounds x --out {out}",
     ("--rounds", "not a valid integer")),
    ("seed-negative", config(train__seed=-1), "config validate {cfg}", ("train.seed",)),
    ("batch-size-2e62", config(train__batch_size=2**62), "config validate {cfg}",
     ("train.batch_size", "out of range")),
    # 2. Headers and names that used to crash.
    ("nifti-header-30000-cubed", dataset(huge_header), "data check {data}",
     ("siteA_case001.nii.gz", "30000x30000x30000", "not loading it")),
    ("site-name-not-utf8", dataset(non_utf8_site), "data check {data}",
     ("site\\xffB", "not valid UTF-8")),
    # 3. Problems that used to pass in silence.
    ("symlink-loop-pair", dataset(symlink_loop), "data check {data}",
     ("loop.nii.gz", "symlink loop")),
    ("broken-symlink-pair", dataset(broken_symlink), "data check {data}",
     ("moved.nii.gz", "broken symlink")),
    ("folder-named-like-an-image", dataset(folder_as_image), "data check {data}",
     ("odd.nii.gz", "not a regular file")),
    pytest.param(dataset(unreadable), "data check {data}", ("siteA_case000.nii.gz", "cannot read"),
                 id="unreadable-pair", marks=NOT_ROOT),
    ("corrupted-in-place-same-mtime", corrupted_after_a_clean_check, "data check {data}",
     ("siteA_case000.nii.gz", "NIfTI")),
    # 4. TLS files and remote workers.
    ("worker-ca-not-a-certificate", write("junk.pem", "not a certificate\n"),
     "worker --port 0 --cert {pki}/server.pem --key {pki}/server.key --ca {tmp}/junk.pem",
     ("junk.pem", "not a PEM CA certificate")),
    ("worker-ca-is-a-key", nothing,
     "worker --port 0 --cert {pki}/server.pem --key {pki}/server.key --ca {pki}/ca.key",
     ("ca.key", "not a PEM CA certificate")),
    ("worker-key-not-for-cert", nothing,
     "worker --port 0 --cert {pki}/server.pem --key {pki}/client.key --ca {pki}/ca.pem",
     ("client.key", "does not belong")),
    ("worker-key-readable-by-others", tls_dir(lambda d: (d / "server.key").chmod(0o644)),
     "worker --port 0 --tls-dir {pki}", ("server.key", "other users", "chmod 600")),
    ("coordinator-cert-not-pem", tls_dir(lambda d: (d / "client.pem").write_text("x\n")),
     "train --config {cfg} --workers 127.0.0.1:9 --tls-dir {pki}",
     ("client.pem", "not a PEM certificate")),
    pytest.param(not_tls_listener,
                 "train --config {cfg} --workers {worker} --tls-dir {pki} --quiet --out {out}",
                 ("cannot reach worker 127.0.0.1:", "TLS"),  # and no gRPC log lines before it
                 id="worker-not-speaking-tls"),
    # Every command, with a missing or wrong file (these already failed correctly).
    ("data-check-missing", nothing, "data check {tmp}/nope", ("nope", "not found")),
    ("data-synth-into-non-empty", existing_out, "data synth --out {out}",
     ("out", "not empty")),
    ("privacy-config-missing", nothing, "privacy --config {tmp}/nope.toml",
     ("nope.toml", "not found")),
    ("train-config-missing", nothing, "train --config {tmp}/nope.toml --out {out}",
     ("nope.toml", "not found")),
    ("evaluate-run-missing", nothing, "evaluate --run {tmp}/nope", ("nope", "not found")),
    ("predict-input-missing", nothing, "predict --model {tmp}/m {tmp}/ct.nii.gz --out {out}",
     ("ct.nii.gz", "not found")),
    ("export-not-a-run", nothing, "export --run {data} --out {out}", ("data",)),
    ("report-run-missing", nothing, "report {tmp}/nope", ("nope", "not found")),
    ("compare-run-missing", nothing, "compare {tmp}/nope {tmp}/b.csv", ("nope", "not found")),
    ("attack-not-a-run", nothing, "attack --run {tmp}", ("not a run directory",)),
    ("audit-run-missing", nothing, "audit --run {tmp}/nope", ("nope",)),
    ("config-not-toml", write("bad.toml", "[train\n"), "config validate {tmp}/bad.toml",
     ("bad.toml", "not valid TOML")),
    ("config-from-ini-not-ini", write("bad.ini", "\0\1 not an ini"),
     "config from-ini {tmp}/bad.ini --out {out}", ("bad.ini",)),
    ("worker-certs-would-overwrite", nothing, "worker certs --out {pki}", ("would overwrite",)),
    ("bench-unknown", nothing, "bench --only nosuch", ("unknown benchmark nosuch",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("setup", "argv", "needles"),
    [c if isinstance(c, ParameterSet) else pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_fault(ctx: dict, setup, argv: str, needles: tuple[str, ...]) -> None:
    setup(ctx)
    try:
        before = {k: snapshot(Path(v)) for k, v in ctx.items() if k in ("out", "pki")}
        args = [part.format(**ctx) for part in argv.split()]
        proc = run_cli(args, ctx["tmp"] / "proc-tmp")
    finally:
        ctx.get("_close", lambda: None)()
    assert_one_line_error(proc, needles, ctx["tmp"] / "proc-tmp")
    after = {k: snapshot(Path(ctx[k])) for k in before}
    if after != before:
        changed = [k for k in before if after[k] != before[k]]
        raise HalfWritten(f"created or changed: {', '.join(str(ctx[k]) for k in changed)}")


def test_the_base_config_and_dataset_are_valid(ctx: dict) -> None:
    """The control: without the fault, the same files pass (so each case fails for its fault)."""
    proc = run_cli(["data", "check", str(ctx["data"]), "--config", str(ctx["cfg"])],
                   ctx["tmp"] / "proc-tmp")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(["config", "validate", str(ctx["cfg"])], ctx["tmp"] / "proc-tmp")
    assert proc.returncode == 0, proc.stderr


def test_a_killed_worker_leaves_no_socket_folder_behind(tmp_path: Path) -> None:
    """SIGKILL leaves the run's socket folder (no `finally` runs); the next start removes it,
    and leaves alone folders whose owner still runs, or that it cannot attribute."""
    tmpdir = tmp_path / "proc-tmp"
    tmpdir.mkdir()
    alien = tmpdir / (WORKER_DIR + "older-release")  # no owner file: not ours to judge
    alien.mkdir()
    env = {**os.environ, "TFF_PRIVSEG_TEST_TAG": TAG, "TMPDIR": str(tmpdir)}

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--port", "0", "--insecure"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, text=True,
        )  # fmt: skip
        assert "listening on" in proc.stdout.readline()
        return proc

    first = start()
    (dirs,) = (p for p in tmpdir.glob(WORKER_DIR + "*") if p != alien)
    first.kill()
    first.wait()
    first.stdout.close()
    assert dirs.exists()  # what a killed run leaves
    second = start()
    try:
        assert not dirs.exists()  # removed: its owner is dead
        assert alien.exists()
        assert len(list(tmpdir.glob(WORKER_DIR + "*"))) == 2  # the alien and the live one
    finally:
        second.terminate()
        second.wait(timeout=30)
        second.stdout.close()
    assert sorted(tmpdir.glob(WORKER_DIR + "*")) == [alien]  # a clean stop removes its own
    deadline = time.monotonic() + 10
    while any(alive(p) for p in tagged_worker_pids(TAG)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not tagged_worker_pids(TAG)
