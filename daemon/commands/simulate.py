"""`cryoptycho simulate`: the virtual microscope — a simulated low-dose ptychography dataset.

    cryoptycho simulate --sample hemoglobin --dose 20 --probe randomized -o data.h5

Writes the dataset file (daemon/storage/dataset.py) with ground-truth object and probe, so that
`cryoptycho reconstruct` and `cryoptycho evaluate` can run on it.
"""

from __future__ import annotations

from pathlib import Path

import click
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
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", type=click.Choice(["numpy", "cupy"]), default="numpy", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Dataset file (HDF5) to write.")
def command(
    sample: str, dose: float, probe: str, frame_size: int, pixel_size: float, overlap: float,
    scan: str, ice: float, energy: float, semiangle: float, detector: str, thin: bool,
    slice_thickness: float, random_orientation: bool, no_hydrogens: bool, seed: int, backend: str,
    output: Path,
) -> None:
    """Simulate a low-dose ptychography scan of an atomic model in vitreous ice."""
    from cryoptycho.daemon.storage.dataset import write_dataset
    from cryoptycho.gpu.sim.ptycho import simulate_ptychography

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
                hydrogens=not no_hydrogens, backend=backend, progress=progress,
            )
        except (ValueError, FileNotFoundError) as exc:
            raise click.UsageError(str(exc)) from exc
    write_dataset(output, data)
    m = data.metadata
    k, frame, _ = data.frames.shape
    console.print(
        f"wrote [bold]{output}[/]: {k} patterns of {frame}×{frame}, step {m['step_m'] * 1e10:.1f} Å, "
        f"{m['counts_per_pattern']:.0f} e⁻ incident per pattern "
        f"({data.frames.mean():.3f} counts per detector pixel), {m['n_slices']} slice(s)"
    )
