"""`cryoptycho evaluate RESULT.h5 --truth DATA.h5`: resolution figures and FRC/SNR plots.

With ``--truth`` the reconstruction is scored against the simulation's ground truth (FRC at
1-bit / ½-bit / 0.143, raw and pooled rings, inside the particle footprint and over the scanned
area; phase correlation; NRMSE). With ``--half OTHER.h5`` (a reconstruction of the other
binomial half of the same scan) the resolution is estimated without ground truth.
Writes STEM.json and STEM.frc.png (STEM defaults to the result's path without suffix).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
from cryoptycho.daemon.plots import plot_frc
from cryoptycho.gpu.metrics import THRESHOLDS, FRCCurve
from rich.console import Console
from rich.table import Table


def _angstrom(v: float) -> str:
    return f"{v * 1e10:.2f}"


@click.command("evaluate")
@click.argument("result", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--truth", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Simulated dataset holding the ground truth (cryoptycho simulate).")
@click.option("--half", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Reconstruction of the other half-dose dataset (resolution without truth).")
@click.option("--pool", type=click.IntRange(min=1), default=3, show_default=True,
              help="Rings pooled per point of the smoothed FRC.")
@click.option("-o", "--output", "stem", type=click.Path(path_type=Path),
              help="Output stem for STEM.json and STEM.frc.png.")
def command(result: Path, truth: Path | None, half: Path | None, pool: int, stem: Path | None) -> None:
    """Resolution figures (FRC/SNR) of a reconstruction."""
    from cryoptycho.daemon.storage.dataset import read_dataset
    from cryoptycho.daemon.storage.open import identify
    from cryoptycho.daemon.storage.result import read_result
    from cryoptycho.gpu.metrics import frc, half_set_resolution, unwrapped_phase
    from cryoptycho.gpu.sim.evaluation import evaluate_against_truth

    if truth is None and half is None:
        raise click.UsageError("give --truth DATA.h5 (simulations) or --half OTHER.h5 (half sets)")
    try:
        for path, want, role in ((result, "result", "RESULT"), (half, "result", "--half"),
                                 (truth, "dataset", "--truth")):
            if path is not None and (kind := identify(path)) != want:
                raise click.UsageError(f"{role} {path} is a cryoptycho {kind} file; it takes a {want} file"
                                       + (" (the ground truth is in simulated datasets)" if want == "dataset" else ""))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    console = Console()
    state = read_result(result).state
    px = float(state.geometry.pixel_size)
    stem = stem if stem is not None else result.with_suffix("")
    summary: dict[str, Any] = {"result": str(result)}
    curves: dict[str, FRCCurve] = {}
    table = Table(title=f"resolution of {result.name} (Å, full period)")
    table.add_column("curve")
    for thr in THRESHOLDS:
        table.add_column(thr, justify="right")

    if truth is not None:
        data = read_dataset(truth)
        if data.truth_object is None or data.truth_origin is None:
            raise click.UsageError(f"{truth} holds no ground truth (/truth/object with origin_m)")
        if abs(data.real_pixel_size - px) > 1e-6 * px:
            raise click.UsageError(
                f"pixel sizes differ: result {px * 1e10:.4f} Å, truth {data.real_pixel_size * 1e10:.4f} Å"
            )
        try:
            ev = evaluate_against_truth(
                np.asarray(state.object), state.geometry.origin, data.truth_object,
                data.truth_origin, px, np.asarray(data.positions), pool=pool,
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        summary["truth"] = str(truth)
        summary.update(ev.summary())
        for region in ("particle", "area"):
            for kind in ("raw", "pooled"):
                table.add_row(f"{region} / {kind}", *(
                    _angstrom(ev.resolutions[f"{region}/{kind}/{t}"]) for t in THRESHOLDS))
        curves["particle vs truth"] = ev.frc_particle
        curves["scanned area vs truth"] = ev.frc_area
        console.print(f"phase correlation in the particle: {ev.phase_correlation:.3f}   "
                      f"NRMSE (whole area, after global phase): {ev.nrmse:.4f}")

    if half is not None:
        other = read_result(half).state
        a, b = np.asarray(state.object), np.asarray(other.object)
        if a.shape != b.shape or state.geometry.origin != other.geometry.origin:
            raise click.UsageError("the two half-set reconstructions must share one object canvas")
        res = {thr: half_set_resolution(a, b, px, threshold=thr, pool=pool) for thr in THRESHOLDS}
        summary["half_set_resolution_m"] = res
        table.add_row("half sets / pooled", *(_angstrom(res[t]) for t in THRESHOLDS))
        curves["half sets"] = frc(unwrapped_phase(a), unwrapped_phase(b), px)

    console.print(table)
    json_path = Path(f"{stem}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2))
    png = plot_frc(curves, Path(f"{stem}.frc.png"), result.name, pool)
    console.print(f"wrote {json_path} and {png}")
