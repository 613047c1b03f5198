"""Whether a run directory can take this run: a new one, or `--resume` of the same computation.

`prepare_run_dir` locks RUN and refuses a resume that would change a round already run, its
noise or its accounting (the data is checked later, by `RunDir.check_data`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tff_privseg import config as config_lib
from tff_privseg.config import Config
from tff_privseg.errors import UserError
from tff_privseg.privacy.schedule import client_lr
from tff_privseg.rundir.key import read_run_key
from tff_privseg.rundir.writer import RunDir


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
