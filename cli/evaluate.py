"""`tff-privseg evaluate` and `tff-privseg predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli import common
from cli.common import emit, handle_errors, json_option, table


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


@click.command()
@common.run_option(
    "Run directory written by `train --out` (config.toml, model.keras).",
    required=True,
    path_type=Path,
)
@common.data_option(
    "Dataset root (one folder per site) [default: the run's data.root].", path_type=Path
)
@common.choice_option(
    "--split",
    choices=["test", "val", "train"],
    default="test",
    help="Patient-level split to evaluate (the same split as in training).",
)
@common.out_option(
    "Output folder [default: RUN/eval_SPLIT]; an earlier evaluation there is replaced.",
    path_type=Path,
)
@click.option(
    "--overlays",
    type=click.IntRange(0, 50),
    default=3,
    show_default=True,
    help="Slices per site drawn in overlays/SITE.png (0: none).",
)
@common.batch_size_option()
@common.quiet_option("No progress bar while preprocessing.")
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
    rows = [_evaluation_row(s["site"], s) for s in r["sites"]]
    rows.append(_evaluation_row("overall", r["overall"]))
    click.echo(f"run {r['run']}, split '{r['split']}' ({r['data']})")
    table(
        rows,
        ["site", "volumes", "Dice (3D)", "IoU (3D)", "HD95 mm (median)", "pooled slice Dice*"],
    )
    click.echo("* baseline-style: all slices pooled at the training resolution, threshold 0.5")
    from tff_privseg.parity.baseline_format import baseline_test_printout

    click.echo("\nIn the PyTorch baseline's format (pooled over the split's slices):")
    click.echo(baseline_test_printout(None, r["test"]["dice"], r["test"]["iou"]))
    click.echo(f"results: {r['out']}/evaluation.json, predictions/, overlays/")


def _evaluation_row(name: str, m: dict[str, Any]) -> list[str]:
    """One table row: a site's (or the overall) volumes, Dice, IoU, HD95 and pooled Dice."""
    hd95 = _fmt(m["hd95_median_mm"], ".1f")
    if m["hd95_infinite"]:
        hd95 += f" ({m['hd95_infinite']} inf)"
    dice, iou, pooled = (_fmt(m[k]) for k in ("dice", "iou", "pooled_slice_dice"))
    return [name, str(m["volumes"]), dice, iou, hd95, pooled]


@click.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Run directory (config.toml + model.keras) or a SavedModel from `export`.",
)
@click.argument("inputs", type=click.Path(path_type=Path))
@common.out_option(
    "Mask file (.nii.gz; .dcm for a DICOM-SEG) for one scan; a folder when INPUTS is a "
    "folder of NIfTI scans.",
    required=True,
    path_type=Path,
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "nifti", "dicom-seg"]),
    default="auto",
    show_default=True,
    help="Mask format. auto: DICOM-SEG for a DICOM series, NIfTI otherwise.",
)
@common.batch_size_option()
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
