"""`tff-privseg evaluate` and `tff-privseg predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.common import emit, handle_errors, json_option


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@click.command()
@click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Run directory written by `train --out` (config.toml, model.keras).",
)
@click.option(
    "--data",
    "data_root",
    type=click.Path(path_type=Path),
    help="Dataset root (one folder per site) [default: the run's data.root].",
)
@click.option(
    "--split",
    type=click.Choice(["test", "val", "train"]),
    default="test",
    show_default=True,
    help="Patient-level split to evaluate (the same split as in training).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Output folder [default: RUN/eval_SPLIT]; an earlier evaluation there is replaced.",
)
@click.option(
    "--overlays",
    type=click.IntRange(0, 50),
    default=3,
    show_default=True,
    help="Slices per site drawn in overlays/SITE.png (0: none).",
)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar while preprocessing.")
@json_option
@handle_errors
def evaluate(
    run_dir: Path,
    data_root: Path | None,
    split: str,
    out: Path | None,
    overlays: int,
    batch_size: int,
    quiet: bool,
    as_json: bool,
) -> None:
    """Evaluate a trained run: Dice, IoU and HD95 (mm) per class, volume, site and overall.

    Slice predictions are reassembled into 3D masks on each source CT's voxel grid and scored
    against the source label inside the evaluated z slab (data.crop_slices). Also reported: the
    pooled slice Dice that the PyTorch baseline prints (labelled as such; not comparable with
    the per-volume mean). Writes OUT/evaluation.json, OUT/predictions/SITE/CASE.nii.gz (same
    shape and affine as the CT: opens over it in 3D Slicer / ITK-SNAP) and OUT/overlays/SITE.png.
    """
    from tff_privseg.evaluate import evaluate as run_evaluation

    result = run_evaluation(
        run_dir,
        data_root,
        split=split,
        out=out,
        overlays=overlays,
        batch_size=batch_size,
        progress=not quiet,
    )
    emit(result, as_json, _print_evaluation)


def _print_evaluation(r: dict[str, Any]) -> None:
    rows = [
        [
            s["site"],
            str(s["volumes"]),
            _fmt(s["dice"]),
            _fmt(s["iou"]),
            _fmt(s["hd95_median_mm"], ".1f")
            + (f" ({s['hd95_infinite']} inf)" * bool(s["hd95_infinite"])),
            _fmt(s["pooled_slice_dice"]),
        ]
        for s in r["sites"]
    ]
    o = r["overall"]
    rows.append(
        [
            "overall",
            str(o["volumes"]),
            _fmt(o["dice"]),
            _fmt(o["iou"]),
            _fmt(o["hd95_median_mm"], ".1f")
            + (f" ({o['hd95_infinite']} inf)" * bool(o["hd95_infinite"])),
            _fmt(o["pooled_slice_dice"]),
        ]
    )
    click.echo(f"run {r['run']}, split '{r['split']}' ({r['data']})")
    _table(
        rows,
        ["site", "volumes", "Dice (3D)", "IoU (3D)", "HD95 mm (median)", "pooled slice Dice*"],
    )
    click.echo("* baseline-style: all slices pooled at the training resolution, threshold 0.5")
    from tff_privseg.parity.baseline_format import baseline_test_printout

    click.echo("\nIn the PyTorch baseline's format (pooled over the split's slices):")
    click.echo(baseline_test_printout(None, r["test"]["dice"], r["test"]["iou"]))
    click.echo(f"results: {r['out']}/evaluation.json, predictions/, overlays/")


@click.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Run directory (config.toml + model.keras) or a SavedModel from `export`.",
)
@click.argument("inputs", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Mask file (.nii.gz; .dcm for a DICOM-SEG) for one scan; a folder when INPUTS is a "
    "folder of NIfTI scans.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "nifti", "dicom-seg"]),
    default="auto",
    show_default=True,
    help="Mask format. auto: DICOM-SEG for a DICOM series, NIfTI otherwise.",
)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@json_option
@handle_errors
def predict(
    model_path: Path, inputs: Path, out: Path, fmt: str, batch_size: int, as_json: bool
) -> None:
    """Segment new CT scans: INPUTS is a .nii/.nii.gz file, a folder of them, or a folder
    holding one DICOM CT series.

    Every axial slice is predicted (a new scan has no label to crop around). Each mask is a
    uint8 NIfTI of class ids with the scan's own shape and affine. For a folder, OUT/CASE.nii.gz
    per scan plus OUT/predictions.json. For a DICOM series, OUT is a DICOM-SEG (.dcm) that
    references the series' slices (opens over it in a PACS viewer or 3D Slicer), or with
    --format nifti a NIfTI mask on the series' grid. Nothing is written when any input is bad.
    """
    from tff_privseg.evaluate import predict as run_predict

    result = run_predict(model_path, inputs, out, batch_size=batch_size, fmt=fmt)
    emit(result, as_json, _print_predictions)


def _print_predictions(r: dict[str, Any]) -> None:
    for p in r["predictions"]:
        click.echo(
            f"{p['input']} -> {p['mask']}  ({p['foreground_voxels']} foreground voxels, "
            f"{p['foreground_ml']:.1f} ml)"
        )
