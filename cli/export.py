"""`tff-privseg export`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli import common
from cli.common import emit, handle_errors, json_option


@click.command()
@common.run_option(
    "Run directory written by `train --out` (config.toml, model.keras, privacy.json).",
    required=True,
    path_type=Path,
)
@common.out_option(
    "SavedModel folder to create, e.g. saved_models/NAME (must be missing or empty).",
    required=True,
    path_type=Path,
)
@common.force_option("Replace an earlier export in --out.")
@json_option
@handle_errors
def export(run_dir: Path, out: Path, force: bool, as_json: bool) -> None:
    """Export a run's model as a TF SavedModel for serving (TF Serving, tf.saved_model.load).

    Signature serving_default: `slices` float32 [batch, H, W, 1] in raw HU (any H, W; canonical
    RAS axial planes) -> `probabilities` float32 [batch, H, W, C] and `mask` uint8 [batch, H, W].
    HU window, scaling and resizing run inside the graph. OUT/metadata.json records classes,
    window, resolution, model, privacy level, ε, δ and the config hash. The export is reloaded
    and checked against the Keras model (max difference <= 1e-5) before it is put in place.
    See saved_models/README.md.
    """
    from tff_privseg.export import export as run_export

    emit(run_export(run_dir, out, force=force), as_json, _print_export)


def _print_export(r: dict[str, Any]) -> None:
    p = r["privacy"]
    eps = "∞ (no DP)" if p["epsilon"] is None else f"{p['epsilon']:.3f} (δ = {p['delta']:g})"
    click.echo(f"SavedModel: {r['out']}")
    click.echo(f"signatures: {', '.join(sorted(r['signatures']))}")
    click.echo(
        f"model:      {r['model']['name']}, {r['model']['parameters']} parameters, "
        f"input {r['resolution']}x{r['resolution']}"
    )
    click.echo(f"privacy:    {p['level']}, ε = {eps}")
    click.echo(f"checked:    max |SavedModel - Keras| = {r['verified_max_abs_diff']:.2g}")
