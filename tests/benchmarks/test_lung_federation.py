"""benchmarks/lung_federation.py: the harness's own logic (no training, no download)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from benchmarks import lung_federation as lf
from tff_privseg.errors import UserError


def _dataset(root):
    for site in ("rider_lung", "radiomics_phantom"):
        (root / site / "case1").mkdir(parents=True)
    (root / ".cache").mkdir()
    return root


def test_lung_sites_of_a_root_skip_hidden_folders(tmp_path):
    assert lf.data_sites(_dataset(tmp_path / "lung")) == ["radiomics_phantom", "rider_lung"]


def test_lung_missing_data_root_is_one_line_naming_the_folder(tmp_path):
    missing = tmp_path / "example_lung"
    with pytest.raises(UserError) as e:
        lf.data_sites(missing)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(missing))
    assert f"tff-privseg data example --set lung --out {missing}" in msg


def test_lung_one_site_is_not_enough_for_leave_one_site_out(tmp_path):
    (tmp_path / "only" / "rider_lung").mkdir(parents=True)
    with pytest.raises(UserError, match="leave-one-site-out needs 2"):
        lf.data_sites(tmp_path / "only")


def test_lung_script_missing_data_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        lf.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "runs")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'nope'}: lung data not found")
    assert not (tmp_path / "runs").exists()


def test_lung_bench_missing_data_is_one_line(tmp_path, monkeypatch):
    from cli.bench import bench

    monkeypatch.chdir(tmp_path)  # no data/example_lung here
    result = CliRunner().invoke(bench, ["--only", "lung_federation", "--quick"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "data/example_lung: lung data not found" in lines[0]


def test_lung_single_site_root_holds_only_that_site(tmp_path):
    data = _dataset(tmp_path / "lung")
    root = lf.site_root(data, "rider_lung", tmp_path / "roots" / "rider_lung")
    assert lf.data_sites(data) and [p.name for p in root.iterdir()] == ["rider_lung"]
    link = root / "rider_lung"
    assert link.is_symlink() and link.resolve() == (data / "rider_lung").resolve()
    assert (link / "case1").is_dir()
    # again (a rerun): unchanged; a stale other site in the folder goes
    (root / "radiomics_phantom").symlink_to(data / "radiomics_phantom")
    assert lf.site_root(data, "rider_lung", root) == root
    assert [p.name for p in root.iterdir()] == ["rider_lung"]
    assert not list(data.glob("*/rider_lung"))  # the source folder is not written


def test_lung_trainings_cover_the_study():
    sites = ["radiomics_phantom", "rider_lung"]
    ts = {t.name: t for t in lf.trainings(sites, [8.0, 30.0], [0, 1])}
    assert list(ts) == [
        "fedavg",
        "alone_radiomics_phantom",
        "alone_rider_lung",
        "pooled",
        "dp_slice_eps8",
        "dp_slice_eps30",
        "fedavg_seed1",
    ]
    assert ts["alone_rider_lung"].sites == ("rider_lung",)
    assert ts["pooled"].overrides == {"privacy.level": "none", "train.mode": "centralized"}
    assert ts["dp_slice_eps8"].target_epsilon == 8.0
    assert ts["dp_slice_eps8"].overrides["privacy.unit"] == "slice"
    assert ts["fedavg_seed1"].overrides["train.seed"] == 1


def _score(kind, dice, hd95, cases, inf=0):
    return {
        "kind": kind,
        "volumes": len(cases),
        "dice": dice,
        "hd95_median_mm": hd95,
        "hd95_infinite": inf,
        "pooled_slice_dice": dice,
        "per_volume": [{"case": c, "dice": d, "hd95_mm": hd95} for c, d in cases],
    }


def _row(name, label, scores, eps=None, sigma=None, seed=0):
    return {
        "name": name,
        "label": label,
        "seed": seed,
        "epsilon": eps,
        "noise_multiplier": sigma,
        "target_epsilon": None if eps is None else round(eps),
        "train_wall_s": 100.4,
        "sites": scores,
    }


def test_lung_table_marks_unseen_sites_and_summarises_seeds():
    phantom = [("pat_1", 0.5), ("pat_2", 0.1)]
    rider = [("RIDER-1", 0.8)]
    rows = [
        _row(
            "fedavg",
            "FedAvg (all sites)",
            {
                "radiomics_phantom": _score("in-sample", 0.3, 55.78, phantom),
                "rider_lung": _score("in-sample", 0.8, 14.3, rider),
            },
        ),
        _row(
            "alone_rider_lung",
            "rider_lung alone",
            {
                "rider_lung": _score("in-sample", 0.9, 4.0, rider),
                "radiomics_phantom": _score("unseen", 0.05, None, phantom, inf=2),
            },
        ),
        _row(
            "dp_slice_eps8",
            "DP-SGD slice, ε 8",
            {
                "radiomics_phantom": _score("in-sample", 0.15, 70.0, phantom, inf=1),
                "rider_lung": _score("in-sample", 0.4, 30.0, rider),
            },
            eps=7.998,
            sigma=1.349,
        )
        | {
            "records": {"radiomics_phantom": 183, "rider_lung": 48},
            "privacy_plan": {
                "noise_multiplier": 1.349,
                "units": {
                    "radiomics_phantom": {"sampling_rate": 0.0437, "epsilon": 1.957},
                    "rider_lung": {"sampling_rate": 0.1667, "epsilon": 7.998},
                },
                "per_patient": {
                    "radiomics_phantom": {
                        "largest_bounded_group": 10,
                        "patient_level_epsilon": 61.4,
                    },
                    "rider_lung": {"largest_bounded_group": 6, "patient_level_epsilon": 61.4},
                },
            },
        },
        _row(
            "fedavg_seed1",
            "FedAvg, seed 1",
            {
                "radiomics_phantom": _score("in-sample", 0.5, 40.0, phantom),
                "rider_lung": _score("in-sample", 0.6, 10.0, rider),
            },
            seed=1,
        ),
    ]
    result = {"sites": ["radiomics_phantom", "rider_lung"], "rows": rows}
    result["fedavg_seeds"] = lf.fedavg_spread(rows)
    spread = result["fedavg_seeds"]
    assert spread["seeds"] == [0, 1]
    assert spread["rider_lung"]["dice_mean"] == pytest.approx(0.7)
    assert spread["rider_lung"]["dice_sd"] == pytest.approx(0.1414, abs=1e-4)
    head = lf.headline(rows)
    assert head["ratio"] == pytest.approx((0.15 + 0.4) / 2 / ((0.3 + 0.8) / 2))

    md = lf.table(result)
    lines = md.splitlines()
    assert lines[0] == (
        "| training | ε (slice, δ=1e-5) | σ | radiomics_phantom Dice | radiomics_phantom HD95 mm"
        " | rider_lung Dice | rider_lung HD95 mm | train wall s |"
    )
    assert "| FedAvg (all sites) | ∞ | – | 0.300 | 55.8 | 0.800 | 14.3 | 100 |" in lines
    assert "| rider_lung alone | ∞ | – | 0.050 † | inf † | 0.900 | 4.0 | 100 |" in lines
    assert (
        "| DP-SGD slice, ε 8 | 8.00 | 1.35 | 0.150 | 70.0 (1 inf) | 0.400 | 30.0 | 100 |" in lines
    )
    assert any(
        line.startswith("| FedAvg, mean ± sd over seeds 0, 1 | ∞ | – | 0.400 ± 0.141 |")
        for line in lines
    )
    assert "† = a site the model never saw" in md
    per_volume = md.split("Per-volume Dice:")[1]
    assert (
        "| training | radiomics_phantom/pat_1 | radiomics_phantom/pat_2 | rider_lung/RIDER-1 |"
        in per_volume
    )
    assert "| rider_lung alone | 0.500 † | 0.100 † | 0.800 |" in per_volume
    privacy = md.split("Privacy of the DP rows")[1]
    assert (
        "| DP-SGD slice, ε 8 | 1.349 | 183, 0.044, 1.96 | 48, 0.167, 8.00 | 10 | 6 | 61.4 |"
        in privacy
    )
    assert "FedAvg" not in privacy


def test_lung_site_scores_from_an_evaluation():
    evaluation = {
        "sites": [
            {
                "site": "rider_lung",
                "volumes": 1,
                "dice": 0.68,
                "hd95_median_mm": 14.3,
                "hd95_infinite": 0,
                "pooled_slice_dice": 0.68,
            }
        ],
        "volumes": [
            {
                "site": "rider_lung",
                "case": "RIDER-1",
                "classes": {"1": {"dice": 0.68, "hd95_mm": 14.3, "iou": 0.5}},
            }
        ],
    }
    scores = lf.site_scores(evaluation, "unseen")
    assert scores["rider_lung"]["kind"] == "unseen"
    assert scores["rider_lung"]["per_volume"] == [
        {"case": "RIDER-1", "dice": 0.68, "hd95_mm": 14.3}
    ]
