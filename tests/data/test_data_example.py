"""`data example`: the real CT dataset from TotalSegmentator's sdist (downloads 38 MB once).

Slow and needs the package index: run with ``pytest -m slow tests/data/test_data_example.py``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from conftest import invoke, last_json

pytestmark = pytest.mark.slow


run = functools.partial(invoke, "data")


def test_example_builds_real_liver_sites(tmp_path: Path) -> None:
    out = tmp_path / "example"
    summary = last_json(run("example", "--out", out, "--json"))
    sites = {s["name"]: s for s in summary["sites"]}
    assert sorted(sites) == ["ts_abdomen", "ts_dicom"]
    assert [s["name"] for s in summary["skipped"]] == ["ts_aorta"]  # its masks have no liver
    # TotalSegmentator's own liver masks (class 5 of task "total"), from the pinned sdist.
    assert sites["ts_abdomen"]["target_voxels"] == 41692
    assert sites["ts_dicom"]["target_voxels"] == 366708
    assert sites["ts_dicom"]["shape"] == [512, 512, 20]
    for site in sites.values():  # the masks sit on liver tissue: the geometry lines up
        assert 30 <= site["target_median_hu"] <= 150
        assert 600 <= site["target_ml"] <= 2500
    meta = json.loads((out / "ts_dicom" / "dataset.json").read_text())
    assert "model prediction" in meta["description"] and "single patient" in meta["description"]
    assert meta["labels"] == {"0": "background", "1": "liver"}

    report = last_json(run("check", out, "--config", out / "data.toml", "--json"))
    assert report["totals"]["volumes"] == 2 and report["totals"]["slices"]["train"] == 52
    default = run("check", out)
    assert default.exit_code == 2 and "need at least 3" in default.stderr


def test_example_other_targets(tmp_path: Path) -> None:
    summary = last_json(run("example", "--out", tmp_path / "aorta", "--target", "aorta", "--json"))
    assert [s["name"] for s in summary["sites"]] == ["ts_abdomen", "ts_dicom", "ts_aorta"]
    bad = run("example", "--out", tmp_path / "x", "--target", "livr")
    assert bad.exit_code == 2 and "did you mean liver" in bad.stderr
    assert not (tmp_path / "x").exists()
