"""`cryoptycho reconstruct DATASET.h5 -o RESULT.h5`: offline full-batch reconstruction.

DATASET.h5 is any recorded scan: a dataset, a daemon spool file or a result file (its /raw
frames), read through storage/open.py. Options are layered: defaults < the scan's own
overrides (spool and result files) < ``--options file.json`` < the named flags < ``--set key=value``
(values parsed as JSON when they parse, else taken as strings; ``stream.batch_size=32`` sets a
nested field). The result is written with ``save_outputs``, plus phase exports
(RESULT.phase.mrc / .png, named by ``storage/outputs.py``) unless ``--no-export``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
from cryoptycho.daemon.overrides import parse_set
from cryoptycho.gpu.backend import BackendUnavailable
from cryoptycho.gpu.options import ReconOptions
from pydantic import ValidationError


def build_options(
    options_file: Path | None, flags: dict[str, Any], sets: tuple[str, ...],
    scan_overrides: dict[str, Any] | None = None,
) -> ReconOptions:
    try:
        base = ReconOptions().merged(scan_overrides or {})
    except ValidationError as exc:
        raise click.UsageError(f"the scan's own options are invalid: {exc}") from exc
    if options_file is not None:
        try:
            loaded = json.loads(Path(options_file).read_text())
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"{options_file}: not valid JSON ({exc})", param_hint="--options")
        if not isinstance(loaded, dict):
            raise click.BadParameter(f"{options_file}: expected a JSON object", param_hint="--options")
        base = base.merged(loaded)
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return base.merged(given).merged(parse_set(sets))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise click.UsageError(f"invalid options: {problems}") from exc


@click.command("reconstruct")
@click.argument("dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Result file (HDF5) to write.")
@click.option("--options", "options_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON file of reconstruction options.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Set any option (repeatable).")
@click.option("-n", "--iterations", type=click.IntRange(min=0), help="CG iterations.")
@click.option("--backend", type=click.Choice(["numpy", "cupy"]))
@click.option("--precision", type=click.Choice(["single", "double"]))
@click.option("--noise-model", type=click.Choice(["poisson", "amplitude"]))
@click.option("--truncation", type=click.Choice(["none", "chen-candes", "high-intensity", "poisson-floor"]))
@click.option("--alpha-h", type=float, help="Truncation threshold α_h (finite, > 0; --truncation none disables the truncation).")
@click.option("--prior", type=click.Choice(["none", "tikhonov", "sparse"]))
@click.option("--mu0", type=float, help="Tikhonov weight μ₀ (times κ).")
@click.option("--mu1", type=float, help="Sparse-prior weight μ₁ (times κ).")
@click.option("--denoiser", type=str, help="Denoiser of the sparse prior (bm3d, gaussian, …).")
@click.option("--refine-probe/--fixed-probe", default=None,
              help="Refine the probe jointly, or keep it fixed. Default: auto (refine_probe=auto: "
                   "refined only from probe_refine_min_counts mean counts per pattern).")
@click.option("--init", type=click.Choice(["random", "spectral", "ones"]))
@click.option("--time-budget", "time_budget_s", type=float, help="Stop after this many seconds.")
@click.option("--seed", type=int)
@click.option("--export/--no-export", default=None, help="Also write phase MRC and PNG (default: yes).")
@click.option("--formats", metavar="LIST", help="Outputs to write, e.g. h5,png (h5 always; default h5,mrc,png).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(
    dataset: Path, output: Path, options_file: Path | None, sets: tuple[str, ...],
    export: bool | None, formats: str | None, quiet: bool, **flags: Any,
) -> None:
    """Reconstruct DATASET.h5 (a cryoptycho dataset, spool or result file) into a result file."""
    # Imported here, not at module level, so that `cryoptycho --help` stays fast.
    from cryoptycho.daemon.storage.open import open_recorded
    from cryoptycho.daemon.storage.outputs import formats_for, save_outputs, stem_of
    from cryoptycho.gpu.reconstruct import reconstruct
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    try:
        chosen = formats_for(formats, export, export_default=True)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        recorded = open_recorded(dataset)
    except (ValueError, OSError) as exc:
        raise click.ClickException(f"cannot read dataset: {exc}") from exc
    data = recorded.data
    options = build_options(options_file, flags, sets, recorded.options)
    if not quiet:
        click.echo(recorded.describe())
    columns = (
        TextColumn("[bold]reconstruct"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.6g}"), TimeElapsedColumn(),
    )
    with Progress(*columns, disable=quiet, transient=False) as bar:
        task = bar.add_task("cg", total=options.iterations, loss=float("nan"))

        def progress(iteration: int, total: int, loss: float) -> None:
            bar.update(task, completed=iteration, total=total, loss=loss)

        _check_memory(data, options)
        try:
            state = reconstruct(data, options, progress=progress)
        except (ValueError, FloatingPointError, BackendUnavailable) as exc:
            raise click.ClickException(f"reconstruction failed: {exc}") from exc
        except MemoryError as exc:
            raise click.ClickException(f"reconstruction failed: out of memory ({exc})") from None
    written = save_outputs(stem_of(output), state, data, formats=chosen).values()
    final = f"{state.loss_values[-1]:.6g}" if state.loss_values else "n/a"
    probe = "refined" if state.options.get("refine_probe") else "fixed"
    if options.refine_probe == "auto":
        # the threshold alone read as if this scan had that many counts
        per_pixel = np.sum(data.frames, axis=0, dtype=np.float64)
        valid = per_pixel if data.mask is None else per_pixel * (np.asarray(data.mask) != 0)
        probe += (f" (auto: refined from {options.probe_refine_min_counts:g} mean counts per pattern; "
                  f"this scan has {valid.sum() / max(len(data.frames), 1):.4g})")
    click.echo(f"{state.iteration} iterations, probe {probe}, final loss {final}; wrote "
               + ", ".join(str(p) for p in written))


def _check_memory(data: Any, options: ReconOptions) -> None:
    """Refuse, as the daemon does at scan_start, a reconstruction that cannot fit this host's
    memory, naming the canvas: positions in µm read as metres asked NumPy for 16.6 PiB and
    ended in a traceback."""
    import os

    from cryoptycho.gpu.engines import memory_estimate
    from cryoptycho.gpu.geometry import fit_geometry

    declared = np.shape(data.probe)[0] if data.probe is not None and np.ndim(data.probe) == 3 else 1
    if declared > options.probe_modes:  # the engine runs every mode the file declares
        try:
            options = options.merged({"probe_modes": declared})
        except ValidationError as exc:  # as the daemon refuses it: a probe per position is not a mode
            err = exc.errors()[0]
            if err["type"] != "less_than_equal":
                raise click.ClickException(f"a probe of {declared} modes: {err['msg']}") from None
            limit = err["ctx"]["le"]
            raise click.ClickException(
                f"/probe declares {declared} modes, at most {limit} are run (option probe_modes): a "
                "(modes, M, M) probe holds the incoherent modes of one probe, not a probe per position") from None
    geometry = fit_geometry(data.positions, data.real_pixel_size, data.frame_shape)
    need = memory_estimate(options, frame_shape=data.frame_shape, frame_dtype=data.frames.dtype,
                           n_frames=len(data.frames), field_px=geometry.object_shape).total
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (not POSIX): leave it to NumPy
        return
    if need > have:
        ny, nx = geometry.object_shape
        raise click.ClickException(
            f"reconstruction needs ≈{need / 2**20:.0f} MiB but this host has {have / 2**20:.0f} MiB: "
            f"the positions span an object of {ny} × {nx} pixels of {data.real_pixel_size:.3g} m "
            "(are /positions_m in metres?)")
