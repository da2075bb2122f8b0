"""`cryoptycho simulate`: the virtual microscope — a simulated low-dose ptychography dataset.

    cryoptycho simulate --sample hemoglobin --dose 20 --probe randomized -o data.h5

Writes the dataset file (daemon/storage/dataset.py) with ground-truth object and probe, so that
`cryoptycho reconstruct` and `cryoptycho evaluate` can run on it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import numpy as np
from cryoptycho.gpu.sim.errors import ExperimentErrors
from cryoptycho.gpu.sim.scan import SCANS
from cryoptycho.gpu.sim.specimen import SAMPLES
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@click.command("simulate")
@click.option("--sample", default="hemoglobin", show_default=True,
              help=f"Sample name ({', '.join(SAMPLES)}) or a PDB/mmCIF path.")
@click.option("--dose", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="Electron dose, e⁻/Å².")
@click.option("--probe", type=click.Choice(["randomized", "defocused", "fzp"]), default="randomized",
              show_default=True)
@click.option("--frame-size", type=click.IntRange(min=8), default=64, show_default=True,
              help="Detector frame size M (pixels, after binning).")
@click.option("--pixel-size", type=click.FloatRange(min=0, min_open=True), default=0.8, show_default=True,
              help="Real-space pixel size, Å.")
@click.option("--overlap", type=click.FloatRange(0, 1, max_open=True), default=0.75, show_default=True,
              help="Probe-area overlap of neighbouring positions.")
@click.option("--scan", type=click.Choice(list(SCANS)), default="raster", show_default=True)
@click.option("--ice", type=click.FloatRange(min=0), default=50.0, show_default=True,
              help="Vitreous ice thickness, nm.")
@click.option("--energy", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Beam energy, keV.")
@click.option("--semiangle", type=click.FloatRange(min=0, min_open=True), default=9.2, show_default=True,
              help="Probe convergence semi-angle, mrad.")
@click.option("--detector", type=click.Choice(["k2", "ideal"]), default="k2", show_default=True)
@click.option("--thin", is_flag=True, help="Thin-object (projection) model instead of multislice.")
@click.option("--slice-thickness", type=click.FloatRange(min=0, min_open=True), default=2.0,
              show_default=True, help="Multislice slice thickness, nm.")
@click.option("--random-orientation", is_flag=True, help="Rotate the particle randomly (seeded).")
@click.option("--no-hydrogens", is_flag=True, help="Do not add the hydrogens the model omits.")
@click.option("--realistic", is_flag=True,
              help="A realistic experiment: the true probe and positions differ from the nominal ones "
                   "the dataset gives (20 nm defocus and 10 nm astigmatism off; 2 %/−1 % scan scale, "
                   "0.5° rotation, 1 % shear; 0.3 Å jitter; 1 Å drift). The error flags below override "
                   "single values; the truth is written under /truth.")
@click.option("--defocus-error", type=float, help="True − nominal defocus, nm (> 0: more underfocus).")
@click.option("--astigmatism", type=click.FloatRange(min=0), help="Two-fold astigmatism |C12| of the true probe, nm.")
@click.option("--astigmatism-angle", type=float, help="Azimuth of the astigmatism, degrees.")
@click.option("--scan-scale", type=(float, float), help="Scan scale error along y and x, per cent.")
@click.option("--scan-rotation", type=float, help="Scan rotation, degrees.")
@click.option("--scan-shear", type=float, help="Scan shear (x per y), per cent.")
@click.option("--jitter", type=click.FloatRange(min=0), help="Rms per-axis position jitter, Å.")
@click.option("--drift", type=(float, float), help="Drift (y, x) over the whole scan, Å.")
@click.option("--source-size", type=click.FloatRange(min=0),
              help="Rms size of a finite (Gaussian) source image at the sample, Å: partial spatial "
                   "coherence, recorded as incoherent probe modes (the truth keeps them, "
                   "/truth/probe (modes, M, M)).")
@click.option("--probe-modes", type=click.IntRange(min=1, max=16), default=3, show_default=True,
              help="Incoherent modes recorded for --source-size (the strongest of the mixed state).")
@click.option("--stated-source-size", metavar="Å|none",
              help="Source size the dataset's probe model states (/probe_model source_size_m), as "
                   "an operator would know it from the instrument: default the true --source-size "
                   "(none without it); a number states another value, 'none' states nothing. "
                   "Reconstructions use a stated size by default (source_size_m \"auto\").")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", type=click.Choice(["numpy", "cupy"]), default="numpy", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Dataset file (HDF5) to write.")
def command(
    sample: str, dose: float, probe: str, frame_size: int, pixel_size: float, overlap: float,
    scan: str, ice: float, energy: float, semiangle: float, detector: str, thin: bool,
    slice_thickness: float, random_orientation: bool, no_hydrogens: bool, realistic: bool,
    defocus_error: float | None, astigmatism: float | None, astigmatism_angle: float | None,
    scan_scale: tuple[float, float] | None, scan_rotation: float | None, scan_shear: float | None,
    jitter: float | None, drift: tuple[float, float] | None, source_size: float | None,
    probe_modes: int, stated_source_size: str | None, seed: int, backend: str, output: Path,
) -> None:
    """Simulate a low-dose ptychography scan of an atomic model in vitreous ice."""
    from cryoptycho.daemon.storage.dataset import write_dataset
    from cryoptycho.gpu.sim.ptycho import simulate_ptychography

    errors = experiment_errors(
        realistic, seed, defocus_error=defocus_error, astigmatism=astigmatism,
        astigmatism_angle=astigmatism_angle, scan_scale=scan_scale, scan_rotation=scan_rotation,
        scan_shear=scan_shear, jitter=jitter, drift=drift, source_size=source_size,
        probe_modes=probe_modes,
    )
    stated = _stated_source(stated_source_size, source_size)
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]simulating[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=False,
    ) as bar:
        task = bar.add_task(f"{sample} @ {dose:g} e⁻/Å²", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            data = simulate_ptychography(
                sample=sample, dose=dose, probe=probe, frame_size=frame_size,
                pixel_size=pixel_size * 1e-10, overlap=overlap, scan=scan,  # type: ignore[arg-type]
                ice_thickness=ice * 1e-9, energy=energy * 1e3, detector=detector, seed=seed,
                semiangle=semiangle * 1e-3, multislice=not thin,
                slice_thickness=slice_thickness * 1e-9, random_orientation=random_orientation,
                hydrogens=not no_hydrogens, backend=backend, progress=progress, errors=errors,
            )
        except (ValueError, FileNotFoundError) as exc:
            raise click.UsageError(str(exc)) from exc
    if stated is not None and data.probe_model is not None:
        data = dataclasses.replace(data, probe_model=dataclasses.replace(data.probe_model, source_size=stated))
    write_dataset(output, data)
    m = data.metadata
    k, frame, _ = data.frames.shape
    console.print(
        f"wrote [bold]{output}[/]: {k} patterns of {frame}×{frame}, step {m['step_m'] * 1e10:.1f} Å, "
        f"{m['counts_per_pattern']:.0f} e⁻ incident per pattern "
        f"({data.frames.mean():.3f} counts per detector pixel), {m['n_slices']} slice(s)"
    )
    if errors is not None:
        shift = np.linalg.norm(data.truth_positions - data.positions, axis=1)
        console.print(
            f"realistic: nominal probe and positions in the file, truth under /truth; "
            f"true probe {', '.join(f'{k} {v * 1e9:+.1f} nm' for k, v in errors.probe_errors.items()) or 'nominal'}; "
            f"positions off by {shift.mean() * 1e10:.2f} Å on average (max {shift.max() * 1e10:.2f} Å)"
            + (f"; {data.truth_probe.shape[0]} incoherent probe modes" if data.truth_probe.ndim == 3 else "")
        )


def _stated_source(stated: str | None, true_a: float | None) -> float | None:
    """The probe model's source size (m) for ``--stated-source-size`` (Å, or "none"): the
    true ``--source-size`` when not given."""
    if stated is None:
        return None if true_a is None else true_a * 1e-10
    if stated.strip().lower() == "none":
        return None
    try:
        value = float(stated)
    except ValueError:
        raise click.BadParameter(f"{stated!r} is neither a size in Å nor 'none'",
                                 param_hint="--stated-source-size") from None
    if not (np.isfinite(value) and value >= 0):
        raise click.BadParameter(f"{stated!r} must be a size ≥ 0 Å", param_hint="--stated-source-size")
    return value * 1e-10


def experiment_errors(
    realistic: bool, seed: int, *, defocus_error: float | None = None, astigmatism: float | None = None,
    astigmatism_angle: float | None = None, scan_scale: tuple[float, float] | None = None,
    scan_rotation: float | None = None, scan_shear: float | None = None, jitter: float | None = None,
    drift: tuple[float, float] | None = None, source_size: float | None = None, probe_modes: int = 3,
) -> ExperimentErrors | None:
    """The errors the flags ask for (CLI units: nm, degrees, per cent, Å), on top of the
    ``--realistic`` preset when given; None when there are none (an oracle experiment)."""
    base = ExperimentErrors.realistic(seed) if realistic else ExperimentErrors(seed=seed)
    updates: dict[str, object] = {}
    if defocus_error is not None:
        updates["defocus"] = defocus_error * 1e-9
    if astigmatism is not None:
        updates["astigmatism"] = astigmatism * 1e-9
    if astigmatism_angle is not None:
        updates["astigmatism_angle"] = float(np.deg2rad(astigmatism_angle))
    if scan_scale is not None:
        updates["scale"] = (scan_scale[0] * 1e-2, scan_scale[1] * 1e-2)
    if scan_rotation is not None:
        updates["rotation"] = float(np.deg2rad(scan_rotation))
    if scan_shear is not None:
        updates["shear"] = scan_shear * 1e-2
    if jitter is not None:
        updates["jitter"] = jitter * 1e-10
    if drift is not None:
        updates["drift"] = (drift[0] * 1e-10, drift[1] * 1e-10)
    if source_size is not None:
        updates["source_size"] = source_size * 1e-10
        updates["source_modes"] = int(probe_modes)
    errors = dataclasses.replace(base, **updates)  # type: ignore[arg-type]
    return errors if errors.any else None
