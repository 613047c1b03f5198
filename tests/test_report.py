"""`report`: per-round PNG plots, privacy-utility plot and markdown table; bad input."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from conftest import invoke as invoke_cli


def fake_run(path: Path, level: str, rounds: int, dice0: float, sigma: float = 1.0) -> Path:
    """A run directory with metrics.jsonl + privacy.json as `train` writes them (no model)."""
    path.mkdir(parents=True)
    rows = []
    for r in range(1, rounds + 1):
        eps = None if level == "none" else 0.8 * r / sigma
        row = {
            "round": r,
            "loss": 1.0 - 0.1 * r,
            "val_dice": dice0 + 0.05 * r,
            "epsilon": eps,
            "delta": None if level == "none" else 1e-5,
            "seconds": 1.5,
        }
        if level != "none":
            del row["loss"]  # not released under DP (un-noised)
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    privacy = {
        "level": level,
        "noise_multiplier": sigma,
        "l2_norm_clip": 1.0,
        "delta": 1e-5,
        "epsilon": rows[-1]["epsilon"],
    }
    (path / "privacy.json").write_text(json.dumps(privacy))
    return path


invoke = functools.partial(invoke_cli, "report")


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_run_default_out(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "dp", "sample", 4, 0.2)
    result = invoke(run, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    out = run / "report"
    assert summary["out"] == str(out)
    # a DP run releases no training loss: no loss curve
    assert summary["files"] == ["val_dice.png", "epsilon.png", "report.md"]
    assert all(is_png(out / f) for f in summary["files"] if f.endswith(".png"))
    (r,) = summary["runs"]
    assert r["rounds"] == 4 and r["epsilon"] == pytest.approx(3.2)
    assert r["final_val_dice"] == pytest.approx(0.4) and r["best_val_dice"] == pytest.approx(0.4)
    assert not (out / "privacy_utility.png").exists()


def test_several_runs_privacy_utility_and_table(tmp_path: Path) -> None:
    runs = [
        fake_run(tmp_path / "a" / "run", "sample", 3, 0.1, sigma=0.5),
        fake_run(tmp_path / "b" / "run", "sample", 3, 0.3, sigma=2.0),  # same folder name
        fake_run(tmp_path / "nodp", "none", 2, 0.5),
    ]
    out = tmp_path / "cmp"
    result = invoke(*runs, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert "privacy_utility.png" in summary["files"] and is_png(out / "privacy_utility.png")
    assert "loss.png" in summary["files"]  # the run without DP has its loss curve
    assert [r["label"] for r in summary["runs"]] == ["a/run", "b/run", "nodp"]
    assert summary["runs"][2]["epsilon"] is None
    table = (out / "report.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ")]
    assert rows[0].startswith("| run | privacy | σ | C | rounds | ε | δ |")
    assert rows[1].startswith("| a/run | sample | 0.5 | 1 | 3 | 4.800 | 1e-05 | 0.2500 |")
    assert rows[3].startswith("| nodp | none | – | – | 2 | ∞ | – | 0.6000 |")
    assert json.loads((out / "report.json").read_text()) == summary
    # Human output; an earlier report in --out is replaced.
    again = invoke(*runs[:2], "--out", out)
    assert again.exit_code == 0 and "ε = 4.800" in again.stdout
    assert (out / "privacy_utility.png").stat().st_size != 0


def test_bad_input_one_line_nothing_written(tmp_path: Path) -> None:
    good = fake_run(tmp_path / "good", "sample", 2, 0.2)
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = fake_run(tmp_path / "broken", "sample", 2, 0.2)
    with open(broken / "metrics.jsonl", "a") as f:
        f.write("{half a line\n")
    out = tmp_path / "out"
    for runs, words in [
        ([tmp_path / "missing"], "run directory not found"),
        ([good, empty], "no metrics.jsonl"),
        ([good, broken], "line 3 is not JSON"),
    ]:
        result = invoke(*runs, "--out", out)
        assert result.exit_code == 2, result.output
        err = result.stderr.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
