"""Parity with the PyTorch baseline: INI conversion, its result formats, `compare`."""

from __future__ import annotations

import configparser
import csv
import functools
import json
import math
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from conftest import invoke as invoke_cli

from tff_privseg import config as config_lib
from tff_privseg.errors import UserError
from tff_privseg.parity.baseline_format import (
    append_completed_training,
    baseline_test_printout,
    flatten_config,
    parse_baseline_log,
    read_completed_trainings,
)
from tff_privseg.parity.compare import compare, format_comparison, load_run
from tff_privseg.parity.ini import KNOWN_KEYS, convert_ini, read_ini

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
INI = FIXTURES / "segmentation.ini"
LOG = FIXTURES / "baseline_train.log"


invoke = functools.partial(invoke_cli, catch_exceptions=False)


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def write_ini(tmp_path: Path, text: str, name: str = "x.ini") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# INI -> TOML


def test_fixture_converts_into_the_baseline_settings():
    conv = convert_ini(INI, slices_per_site=885)
    c = conv.config
    assert (c.train.batch_size, c.data.resolution) == (32, 256)
    assert (c.train.client_optimizer, c.train.client_lr, c.train.end_lr) == ("adam", 1e-3, 1e-4)
    assert c.train.lr_schedule == "loglinear"
    assert (c.train.beta1, c.train.beta2, c.train.weight_decay) == (0.9, 0.999, 1e-3)
    assert (c.model.name, c.model.depth, c.model.groups, c.model.dropout) == ("monet", 2, 32, 0.2)
    assert c.train.seed == 1 and c.train.weighting == "uniform"
    assert (c.privacy.level, c.privacy.noise_multiplier) == ("sample", 0.38)
    assert (c.privacy.l2_norm_clip, c.privacy.delta) == (1.2, 1e-5)
    assert c.data.val_fraction == pytest.approx(0.1)
    assert (c.data.labels, c.data.foreground_labels, c.data.scaling) == ("binary", (1, 2), "minmax")
    a = c.data.augment
    assert (a.rotation, a.translate, a.scale, a.noise_std, a.noise_prob) == (45, 0, 0.1, 0.05, 0.5)
    # 885 slices / batch 32 = 28 batches per epoch, averaged after each: 28 rounds x 50 epochs
    assert (c.train.rounds, c.train.local_steps) == (1400, 1)
    assert conv.schedule["batches_per_epoch"] == 28


def test_every_key_is_reported_once_with_a_reason():
    conv = convert_ini(INI)
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
    parser.read(INI)
    in_file = {(s, k) for s in parser.sections() for k in parser[s]}
    reported = [(k.section, k.key) for k in conv.keys]
    assert len(reported) == len(set(reported)) and set(reported) == in_file
    assert all(k.reason for k in conv.keys)
    status = {(k.section, k.key): k.status for k in conv.keys}
    assert status["config", "restarts"] == "unsupported"
    assert status["federated", "precision_fractional"] == "unsupported"
    assert status["augmentation", "translate"] == "unsupported"  # 1.0: out of view
    assert status["system", "num_threads"] == "ignored"
    assert status["albumentations", "clahe"] == "matched"  # off there, absent here
    assert status["config", "epochs"] == "approximate"  # no slices per site given
    names = {(k.section, k.key) for k in conv.not_honoured}
    assert ("DP", "dp_sse_epsilon") in names and ("config", "lr") not in names


def test_every_key_the_baseline_reads_is_known(tmp_path):
    extra = {
        "config": "momentum = 0.5\ndifferentially_private = no\n",
        "augmentation": "mixup_lambda = 0.5\nvertical_flip_prob = 0\nnoise_std = 0.1\n"
        "noise_prob = 0\n",
    }
    text = INI.read_text()
    for section, lines in extra.items():
        text = text.replace(f"[{section}]", f"[{section}]\n{lines}", 1)
    conv = convert_ini(write_ini(tmp_path, text))
    seen = {(k.section, k.key) for k in conv.keys if k.status != "unknown"}
    assert seen == {(s, k) for s, keys in KNOWN_KEYS.items() for k in keys}
    status = {(k.section, k.key): k.status for k in conv.keys}
    assert status["config", "differentially_private"] == "ignored"  # [DP] wins
    assert status["augmentation", "noise_std"] == "ignored"  # [albumentations] wins


def test_unsupported_and_unknown_keys_are_reported(tmp_path):
    path = write_ini(
        tmp_path,
        "[config]\nbacth_size = 8\noptimizer = SGD\nbeta1 = 0.5\nmomentum = 0.9\n"
        "inference_resolution = 512\ntrain_resolution = 128\n"
        "[augmentation]\nmixup = yes\nmixup_prob = 0.5\n"
        "[albumentations]\nelastic = yes\nclahe = on\n"
        "[federated]\nkeep_optim_dict = yes\nweighted_averaging = yes\n"
        "[dp]\ndifferentially_private = yes\nmicrobatch_size = 32\ndp_stats_exchange = yes\n"
        "[extras]\nfoo = 1\n[augmentation]\nmixup_lambda =\n",
    )
    conv = convert_ini(path)
    status = {(k.section, k.key): k.status for k in conv.keys}
    assert status["config", "bacth_size"] == "unknown"
    assert status["extras", "foo"] == "unknown"
    assert status["augmentation", "mixup_lambda"] == "ignored"  # empty, not unknown
    for key in (
        ("augmentation", "mixup"),
        ("augmentation", "mixup_prob"),
        ("albumentations", "elastic"),
        ("albumentations", "clahe"),
        ("federated", "keep_optim_dict"),
        ("DP", "microbatch_size"),  # [dp] is matched case-insensitively
        ("config", "inference_resolution"),
    ):
        assert status[key] == "unsupported", key
    assert status["config", "beta1"] == "ignored"  # SGD
    assert status["config", "momentum"] == "ignored"
    assert status["DP", "dp_stats_exchange"] == "ignored"
    # weighted averaging under DP: written as uniform, reported with the reason
    weighting = next(k for k in conv.keys if k.key == "weighted_averaging")
    assert weighting.status == "unsupported" and "uniform" in weighting.reason
    assert conv.config.train.weighting == "uniform"
    assert conv.config.train.client_optimizer == "sgd"
    assert conv.config.data.resolution == 128
    # absent keys fall back to the baseline's defaults, and say so
    assert any(d.startswith("[config] epochs = 50") for d in conv.defaults)
    assert conv.config.train.batch_size == 32

    r = invoke("config", "from-ini", str(path), "--strict")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--strict" in r.stderr


def test_weighted_averaging_without_dp_is_example_weighting(tmp_path):
    path = write_ini(tmp_path, "[federated]\nweighted_averaging = yes\nsync_every_n_batch = 4\n")
    conv = convert_ini(path, slices_per_site=100)
    assert conv.config.train.weighting == "examples"
    # ceil(100 / 32) = 4 batches per epoch, every 4 -> 1 round per epoch, 50 epochs
    assert (conv.config.train.rounds, conv.config.train.local_steps) == (50, 4)


def test_bad_values_are_one_line_errors(tmp_path):
    bad = write_ini(tmp_path, "[config]\nbatch_size = many\n")
    with pytest.raises(UserError, match=r"batch_size = 'many': expected a number"):
        convert_ini(bad)
    broken = write_ini(tmp_path, "batch_size = 3\n", "broken.ini")
    r = invoke("config", "from-ini", str(broken))
    assert r.exit_code == 2 and "not a valid INI file" in r.stderr
    assert r.stderr.count("\n") == 1
    r = invoke("config", "from-ini", str(tmp_path / "missing.ini"))
    assert r.exit_code == 2 and "not found" in r.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[config]\nbatch_size = 0\n", "[config] batch_size = '0': expected an integer >= 1"),
        ("[config]\nepochs = 2.5\n", "[config] epochs = '2.5': expected an integer"),
        ("[config]\nepochs = 0\n", "[config] epochs = '0': expected an integer >= 1"),
        ("[config]\nvalidation_split = 100\n", "expected a percentage in [0, 100)"),
        ("[config]\nlr = 1e-3\nend_lr = 0\n", "[config] lr and end_lr must be > 0"),
        ("[config]\nweight_decay = -1\n", "[config] weight_decay = '-1': expected a number >= 0"),
        ("[config]\nbinary_segmentation = maybe\n", "expected yes/no (or true/false"),
        ("[DP]\nnoise_multiplier = inf\n", "noise_multiplier = 'inf': expected a finite number"),
        ("[DP]\ntarget_delta = 1\n", "[DP] target_delta = '1': expected a number > 0 and < 1"),
        ("[DP]\nmax_grad_norm = 0\n", "[DP] max_grad_norm = '0': expected a number > 0"),
        ("[federated]\nsync_every_n_batch = 0\n", "expected an integer >= 1"),
        ("[federated]\nrepetitions_dataset = 0\n", "repetitions_dataset = '0': expected an"),
        # the first bad key in the baseline's reading order is the one named
        ("[config]\nseed = x\nbatch_size = x\n", "[config] batch_size = 'x'"),
        ("[augmentation]\nnoise_std = 0.1\n", "[augmentation] noise_prob = '': expected a finite"),
    ],
)
def test_each_bad_value_is_named_in_one_line(tmp_path, text, message):
    with pytest.raises(UserError) as raised:
        convert_ini(write_ini(tmp_path, text))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_coupled_keys_depend_on_the_keys_they_read(tmp_path):
    """Keys whose meaning depends on others: privacy layout, optimizer, model, schedule, noise."""
    path = write_ini(
        tmp_path,
        "[config]\ndifferentially_private = yes\noptimizer = RMSprop\nmodel = unet\n"
        "end_lr = 1e-4\nrestarts = 2\ninference_resolution = 256\nbinary_segmentation = no\n"
        "weight_classes = yes\n[augmentation]\nrotation = 190\nnoise_std = 0.1\n"
        "noise_prob = 2\n[DP]\nmicrobatch_size = 4\n",
    )
    conv = convert_ini(path, slices_per_site=100)
    by_key = {(k.section, k.key): k for k in conv.keys}
    assert conv.config.privacy.level == "sample"  # read from [config]: the older layout
    assert any("older INI layout" in n for n in conv.notes)
    assert any("No [federated] section" in n for n in conv.notes)
    assert not any("Learning-rate schedule" in n for n in conv.notes)  # needs [federated]
    assert conv.config.train.client_optimizer == "adam"
    assert by_key["config", "optimizer"].status == "unsupported"
    assert (conv.config.model.name, conv.config.model.depth) == ("unet", 3)
    assert "decay 3 times" in by_key["config", "restarts"].reason
    assert by_key["config", "inference_resolution"].status == "matched"
    assert by_key["config", "weight_classes"].status == "unsupported"  # not binary
    assert by_key["augmentation", "rotation"].reason.startswith("190 is outside [0, 180)")
    assert conv.config.data.augment.rotation == 0
    assert by_key["augmentation", "noise_prob"].status == "unsupported"  # [augmentation] read
    assert conv.config.data.augment.noise_std == 0
    assert "4-example microbatches" in by_key["DP", "microbatch_size"].reason

    path = write_ini(
        tmp_path,
        "[config]\nend_lr = 1e-4\nmodel = ResNet18\n[federated]\nrepetitions_dataset = 2\n"
        "sync_every_n_batch = 3\n[DP]\ndifferentially_private = no\n",
        "second.ini",
    )
    conv = convert_ini(path, slices_per_site=100)
    by_key = {(k.section, k.key): k for k in conv.keys}
    assert any("Learning-rate schedule" in n for n in conv.notes)
    assert by_key["config", "model"].status == "unsupported" and conv.config.model.name == "monet"
    assert by_key["federated", "repetitions_dataset"].target == "train.rounds"
    # ceil(2 x 100 / 32) = 7 batches per epoch, every 3 -> 3 rounds per epoch, 50 // 2 epochs
    assert (conv.config.train.rounds, conv.config.train.local_steps) == (75, 3)
    assert conv.config.privacy.level == "none"
    assert conv.defaults[0] == "[config] optimizer = Adam"  # listed in the order they are read


def test_cli_from_ini_writes_toml_atomically_and_reports(tmp_path):
    out = tmp_path / "my.toml"
    r = invoke("config", "from-ini", str(INI), "--out", str(out), "--slices-per-site", "885")
    assert r.exit_code == 0, r.stderr
    assert "not honoured" in r.stdout and "precision_fractional" in r.stdout
    text = out.read_text()
    assert text.startswith("# Converted by `tff-privseg config from-ini`")
    assert "[config] restarts = 1" in text  # the report travels with the TOML
    assert config_lib.load(out) == convert_ini(INI, slices_per_site=885).config
    assert not list(tmp_path.glob(".*tmp*"))
    r = invoke("config", "from-ini", str(INI), "--out", str(out))
    assert r.exit_code == 2 and "--force" in r.stderr
    r = invoke("config", "from-ini", str(INI), "--out", str(out), "--force", "--json")
    assert r.exit_code == 0
    result = last_json(r.stdout)
    assert result["out"] == str(out) and result["config"]["train"]["rounds"] == 50
    assert {k["key"] for k in result["not_honoured"]} >= {"num_threads", "restarts"}
    # without --out: TOML on stdout, report on stderr
    r = invoke("config", "from-ini", str(INI), "--no-augment")
    assert r.exit_code == 0 and r.stdout.startswith("# Converted") and "[data]" in r.stdout
    assert "not honoured" in r.stderr and "rotation = 0.0" in r.stdout


def test_cli_show_and_validate(tmp_path):
    r = invoke("config", "show", str(ROOT / "configs" / "smoke.toml"))
    assert r.exit_code == 0 and "slices_per_patient" in r.stdout  # defaults filled in
    r = invoke("config", "validate", str(ROOT / "configs" / "baseline_liver.toml"), "--json")
    assert r.exit_code == 0 and last_json(r.stdout)["valid"] is True
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nweighting = "examples"\n')  # with the default sample-level DP
    r = invoke("config", "validate", str(bad))
    assert r.exit_code == 2 and "train.weighting" in r.stderr and r.stderr.count("\n") == 1


def test_baseline_liver_toml_is_the_converted_baseline_ini():
    cfg = config_lib.load(ROOT / "configs" / "baseline_liver.toml")
    assert cfg == convert_ini(INI, slices_per_site=896, augment=False).config
    assert (cfg.data.layout, cfg.data.source, cfg.data.root) == ("msd", "files", "data/msd_liver")
    assert (cfg.data.hu_window, cfg.data.crop_slices, cfg.data.split_seed) == ((-150, 200), 32, 42)
    text = (ROOT / "configs" / "baseline_liver.toml").read_text()
    assert "leakage" in text and "PATIENT" in text


# --------------------------------------------------------------------------------------------
# The baseline's result formats


def test_test_printout_is_the_baselines_and_parses_back():
    text = baseline_test_printout(0.27412, 0.76018, 0.6131)
    assert text == "Dice Loss: 27.41%\nDice Score: 76.02%\nIoU: 61.31%"
    parsed = parse_baseline_log("noise\n" + text + "\n")["test"]
    assert parsed == pytest.approx({"dice_loss": 0.2741, "dice_score": 0.7602, "iou": 0.6131})
    assert baseline_test_printout(None, 0.5, float("nan")).splitlines()[0] == "Dice Loss: n/a"


def test_completed_trainings_rows_append_and_headers_never_mix(tmp_path):
    cfg = config_lib.load(ROOT / "configs" / "smoke.toml")
    summary = {"run_dir": "runs/a", "rounds": 2, "best_val_dice": 0.5, "epsilon": 1.5}
    summary |= {"delta": 1e-5, "seconds": 3.0}
    path = tmp_path / "model_weights" / "completed_trainings.csv"
    stamp = datetime(2024, 5, 6, 7, 8, 9)
    assert append_completed_training(path, cfg, summary, stamp) == path
    assert append_completed_training(path, cfg, summary | {"best_val_dice": 0.6}) == path
    rows = read_completed_trainings(path)
    assert len(rows) == 2
    header = path.read_text().splitlines()[0].split(",")
    assert header[-2:] == ["timestamp", "best_validation_score"]
    assert set(flatten_config(cfg)) <= set(header)
    assert rows[0]["train.batch_size"] == "4" and rows[0]["data.hu_window"] == "[-150.0, 200.0]"
    assert rows[0]["timestamp"] == "2024-05-06_07-08-09"
    assert [r["best_validation_score"] for r in rows] == ["0.5", "0.6"]
    # a CSV with other columns (the baseline's own) is left alone: the row goes next to it
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("batch_size,lr,timestamp,best_validation_score\n32,0.001,x,0.7\n")
    written = append_completed_training(theirs, cfg, summary)
    assert written != theirs and written.parent == tmp_path and written.suffix == ".csv"
    assert theirs.read_text().count("\n") == 2
    assert read_completed_trainings(written)[0]["run_dir"] == "runs/a"


# --------------------------------------------------------------------------------------------
# compare


def fabricate_run(run: Path, cfg: config_lib.Config, evaluation: dict | None = None) -> None:
    run.mkdir(parents=True)
    (run / "config.toml").write_text(config_lib.dumps(cfg))
    rows = [
        {"round": r, "val_dice": 0.6 + 0.05 * r, "epsilon": 0.3 * r, "seconds": 2.5}  # no loss (DP)
        for r in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    privacy = {"level": cfg.privacy.level, "epsilon": 0.9, "delta": cfg.privacy.delta}
    (run / "privacy.json").write_text(json.dumps(privacy))
    if evaluation is not None:
        (run / "evaluation.json").write_text(json.dumps(evaluation))


def baseline_csv(path: Path, **changes: str) -> Path:
    """A completed_trainings.csv in the baseline's format, from the fixture log's arguments."""
    args = parse_baseline_log(LOG.read_text())["args"] | changes
    row = dict(sorted(args.items())) | {"timestamp": "2021-03-04_05-06-07"}
    row["best_validation_score"] = "0.7485"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row | {"lr": "0.0005", "best_validation_score": "0.5"})
        writer.writerow(row)
    return path


def test_compare_flags_differing_settings_against_a_baseline_csv(tmp_path):
    cfg = convert_ini(INI, slices_per_site=885).config.replace(
        **{"train.client_lr": 5e-4, "train.batch_size": 16}
    )
    evaluation = {"test": {"dice": 0.78, "iou": 0.64}, "sites": {"siteA": {"dice": 0.1}}}
    fabricate_run(tmp_path / "run", cfg, evaluation)
    csv_path = baseline_csv(tmp_path / "completed_trainings.csv")
    result = compare(tmp_path / "run", csv_path)
    assert result["baseline_row"] == 1
    differing = set(result["differing_settings"])
    # lr and batch size changed; translate 1.0 was written as 0; SMPC is on in the baseline
    assert differing == {
        "train.client_lr",
        "train.batch_size",
        "data.augment.translate",
        "privacy.secure_aggregation",
    }
    assert [e["name"] for e in result["baseline_only"]] == ["restarts"]
    metrics = {m["key"]: m for m in result["metrics"]}
    assert metrics["test_dice"]["ours"] == 0.78 and metrics["test_dice"]["baseline"] is None
    assert metrics["best_val_dice"]["difference"] == pytest.approx(0.75 - 0.7485)
    assert metrics["seconds"]["ours"] == 7.5 and metrics["epochs"]["baseline"] == 3
    assert "DIFFERS" in format_comparison(result)

    assert "train.client_lr" not in compare(tmp_path / "run", csv_path, row=0)["differing_settings"]
    r = invoke("compare", str(tmp_path / "run"), str(csv_path), "--json")
    assert r.exit_code == 0 and set(last_json(r.stdout)["differing_settings"]) == differing
    r = invoke("compare", str(tmp_path / "run"), str(csv_path), "--row", "7")
    assert r.exit_code == 2 and "out of range" in r.stderr and r.stderr.count("\n") == 1
    r = invoke("compare", str(tmp_path / "nope"), str(csv_path))
    assert r.exit_code == 2 and "run directory not found" in r.stderr


def test_compare_with_a_baseline_log(tmp_path):
    cfg = convert_ini(INI, slices_per_site=885).config
    fabricate_run(tmp_path / "run", cfg, {"dice_score": 78.0, "note": "x"})  # a percentage
    result = compare(tmp_path / "run", LOG)
    metrics = {m["key"]: m for m in result["metrics"]}
    assert metrics["test_dice"]["baseline"] == pytest.approx(0.7602)
    assert metrics["test_iou"]["baseline"] == pytest.approx(0.6131)
    assert metrics["test_dice"]["ours"] == pytest.approx(0.78)
    assert metrics["epsilon"]["baseline"] == 0.81 and metrics["delta"]["baseline"] == 1e-5
    assert metrics["best_val_dice"]["baseline"] == pytest.approx(0.7485)
    assert any("percentage" in w for w in result["warnings"])
    assert set(result["differing_settings"]) == {
        "data.augment.translate",
        "privacy.secure_aggregation",
    }
    r = invoke("compare", str(tmp_path / "run"), str(LOG))
    assert r.exit_code == 0 and "76.02%" in r.stdout and "restarts = 1" in r.stdout
    junk = write_ini(tmp_path, "hello\n", "junk.log")
    r = invoke("compare", str(tmp_path / "run"), str(junk))
    assert r.exit_code == 2 and "no baseline results found" in r.stderr


# --------------------------------------------------------------------------------------------
# The converted fixture trains


def test_converted_ini_trains_and_round_trips_through_the_result_formats(tmp_path):
    from tff_privseg.federated.train import train

    data = tmp_path / "D"
    synth = [sys.executable, "-m", "cli", "data", "synth", "--out", str(data), "--sites", "3"]
    synth += ["--volumes-per-site", "4", "--seed", "1", "--shape", "48", "48", "16"]
    subprocess.run(synth, cwd=ROOT, check=True, capture_output=True, timeout=120)
    toml = tmp_path / "from_ini.toml"
    r = invoke("config", "from-ini", str(INI), "--out", str(toml), "--slices-per-site", "16")
    assert r.exit_code == 0, r.stderr
    converted = config_lib.load(toml)
    assert converted.model.name == "monet" and converted.privacy.level == "sample"
    assert converted.train.lr_schedule == "loglinear" and converted.data.augment.rotation == 45
    # Tiny everything (a MoNet under DP-SGD takes minutes to trace on 2 busy cores; models are
    # tested in test_models.py); the INI's optimizer, schedule, augmentation and DP stay.
    tiny = {
        "data.resolution": 16,
        "data.crop_slices": 8,
        "model.name": "unet",
        "model.depth": 1,
        "model.base_filters": 4,
        "model.groups": 2,
        "model.dropout": 0.0,
        "train.rounds": 1,
        "train.local_steps": 1,
        "train.batch_size": 4,
    }
    cfg = converted.replace(**tiny)
    run = tmp_path / "run"
    summary = train(cfg, run, data_root=str(data), progress=False)
    assert summary["rounds"] == 1 and summary["epsilon"] is not None
    assert math.isfinite(summary["epsilon"]) and (run / "metrics.jsonl").is_file()

    csv_path = append_completed_training(tmp_path / "completed_trainings.csv", cfg, summary)
    loaded = load_run(run)
    assert loaded["metrics"]["rounds"] == 1 and loaded["settings"]["train.weight_decay"] == 1e-3
    result = compare(run, csv_path)  # our own CSV row of the same run: nothing differs
    assert result["baseline_kind"] == "csv (ours)" and result["differing_settings"] == []
    metrics = {m["key"]: m for m in result["metrics"]}
    assert metrics["epsilon"]["difference"] == pytest.approx(0.0)
    assert metrics["rounds"]["ours"] == metrics["rounds"]["baseline"] == 1


def test_read_ini_matches_sections_case_insensitively(tmp_path):
    path = write_ini(tmp_path, "[Config]\nlr = 1e-2 ; inline comment\n[dp]\nnoise_multiplier=2\n")
    assert read_ini(path) == {"config": {"lr": "1e-2"}, "DP": {"noise_multiplier": "2"}}
