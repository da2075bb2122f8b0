"""`cryoptycho bench gpu`: the GPU figures of issue 15 in one run (and the same on NumPy).

Whoever first has a GPU runs ``cryoptycho bench gpu`` and gets, side by side on that machine:

* frames/s folded into the live reconstruction, 64×64 and 128×128 frames: frames arrive in
  detector-sized chunks (``add_frames``, the host → device copy included) and mini-batch steps
  run until every frame has been visited at least once — the service's "frames used" rate when
  frames come faster than the engine takes them;
* last frame → final image: from the last ``add_frames`` to the host copy of the refined object,
  with a refinement budget (``--refine-s``; the target is ≤ 1 s in all);
* objective ÷ FFT pair: one full-batch objective + gradient evaluation (data term, truncation,
  prior, probe normalisation, in chunks) ÷ one bare batched FFT + inverse FFT of the same frames;
  with and without the fused CuPy likelihood kernel (gpu/likelihood.py) on CuPy;
* host synchronisations per mini-batch step and per CG iteration, counted on the strict backend
  (gpu/strict.py: the same engine code with CuPy's semantics on the CPU; CuPy itself does not
  count them). These do not depend on the device.

``--backend numpy`` runs everything on the CPU (the test suite does, with tiny sizes).
"""

from __future__ import annotations

import json
import time
from types import ModuleType
from typing import Any

import click
import numpy as np
from cryoptycho.gpu import likelihood, strict
from cryoptycho.gpu.backend import BackendUnavailable, fft2, get_xp, ifft2, synchronize, to_numpy
from cryoptycho.gpu.geometry import fit_geometry
from cryoptycho.gpu.operators import make_batch, to_fft_order
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.reconstruct import FullBatchObjective, problem_kappa
from cryoptycho.gpu.stream import StreamingReconstructor
from rich.console import Console
from rich.table import Table

from .engine import PIXEL, Scan, _best_times, synthetic_scan


def _engine(scan: Scan, backend: str, batch: int, **options: Any) -> StreamingReconstructor:
    return StreamingReconstructor(
        frame_shape=scan.frames.shape[1:], frame_dtype=scan.frames.dtype, pixel_size=PIXEL,
        probe=scan.probe, options=ReconOptions(backend=backend, stream={"batch_size": batch}, **options),
        expected_frames=len(scan.frames),
    )


def fold_rate(scan: Scan, backend: str, batch: int, chunk: int
              ) -> tuple[dict[str, float], StreamingReconstructor]:
    """Frames/s folded in: chunks of ``chunk`` frames arrive, steps run until each frame has
    been visited once; wall time from the first chunk to the device being done. A first
    pass (untimed) warms the FFT plans and kernels. Returns the figures and the engine, which
    then holds every frame, each folded in once: the state at the last frame."""
    xp = get_xp(backend)
    out: dict[str, float] = {}
    for timed in (False, True):
        engine = _engine(scan, backend, batch)
        k = len(scan.frames)
        folded = steps = 0
        synchronize(xp)
        t0 = time.perf_counter()
        for lo in range(0, k, chunk):
            engine.add_frames(scan.frames[lo : lo + chunk], scan.positions[lo : lo + chunk])
            while folded < min(lo + chunk, k):
                folded += engine.step().fresh
                steps += 1
        synchronize(xp)
        elapsed = time.perf_counter() - t0
        if timed:
            out = {"frames": float(k), "frames_per_s": k / elapsed, "steps": float(steps),
                   "batch": float(batch)}
    return out, engine


def final_image(engine: StreamingReconstructor, xp: ModuleType, refine_s: float = 0.0) -> dict[str, float]:
    """Seconds from the last frame (already added) to the refined object on the host."""
    synchronize(xp)
    t0 = time.perf_counter()
    losses = engine.refine(10_000, time_budget_s=refine_s) if refine_s > 0 else []
    image = to_numpy(engine.obj)
    elapsed = time.perf_counter() - t0
    return {"final_image_s": elapsed, "refine_iterations": float(len(losses)),
            "final_image_finite": float(np.all(np.isfinite(image)))}


def objective_ratio(scan: Scan, backend: str, repeats: int) -> dict[str, float]:
    """Full-batch objective + gradient ÷ bare FFT pair of the same frames (best of
    ``repeats``, interleaved); on CuPy also with the likelihood's fused kernel switched off."""
    xp = get_xp(backend)
    m = scan.frames.shape[1:]
    opts = ReconOptions(backend=backend)
    geo = fit_geometry(scan.positions, PIXEL, m)
    batch = make_batch(geo.to_pixels(scan.positions), geo.object_shape, m, xp=xp)
    counts = xp.asarray(np.ascontiguousarray(to_fft_order(scan.frames)))
    probe = xp.asarray(scan.probe)
    power = float((np.abs(scan.probe) ** 2).sum())
    fun = FullBatchObjective(counts, batch, None, opts, problem_kappa(counts, None, probe, batch), power)
    x = {"object": xp.ones(geo.object_shape, dtype=np.complex64), "probe": probe}
    waves = xp.ones(counts.shape, dtype=np.complex64)

    def evaluate() -> None:
        fun(x)

    def unfused() -> None:
        saved = likelihood.fused_available
        likelihood.fused_available = lambda xp: False  # the reference array code on the device
        try:
            fun(x)
        finally:
            likelihood.fused_available = saved

    fns = {"fft": lambda: ifft2(fft2(waves)), "objective": evaluate}
    if likelihood.fused_available(xp):
        fns["objective_unfused"] = unfused
    best = _best_times(fns, xp, repeats)
    out = {"fft_pair_s": best["fft"], "objective_s": best["objective"],
           "objective_ratio": best["objective"] / best["fft"]}
    if "objective_unfused" in best:
        out["objective_unfused_ratio"] = best["objective_unfused"] / best["fft"]
    return out


def host_syncs(scan: Scan, steps: int, iterations: int) -> dict[str, float]:
    """Synchronisations per mini-batch step and per CG iteration, counted on the strict
    backend (no preview or metric is due inside these: their reads are counted apart)."""
    engine = _engine(scan, "strict", 32)
    engine.add_frames(scan.frames, scan.positions)
    with strict.counting() as c:
        for _ in range(steps):
            engine.step()
    step_syncs = c.syncs
    stored_copies = [e for e in c.events if e.kind != "sync" and tuple(e.shape[-2:]) == scan.frames.shape[1:]]
    with strict.counting() as c:
        engine.flush_losses()
    read = c.syncs
    marks: list[int] = []
    with strict.counting() as c:
        engine.refine(iterations, callback=lambda *_: marks.append(c.syncs))
    per_iteration = np.diff(marks) if len(marks) > 1 else np.zeros(1)
    return {
        "syncs_per_step": step_syncs / steps,
        "syncs_to_read_step_losses": float(read),
        "syncs_per_cg_iteration_mean": float(np.mean(per_iteration)),
        "syncs_per_cg_iteration_max": float(np.max(per_iteration)),
        "syncs_refine_set_up": float(marks[0]) if marks else float(c.syncs),
        "frame_copies_while_stepping": float(len(stored_copies)),
    }


@click.command("gpu")
@click.option("--backend", type=click.Choice(["cupy", "numpy"]), default="cupy", show_default=True)
@click.option("--sizes", default="64,128", show_default=True, help="frame sizes of the fold rate")
@click.option("--frames", "n_frames", type=click.IntRange(16, 1_000_000), default=4096, show_default=True,
              help="frames per scan")
@click.option("--batch", "batch_size", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="mini-batch size of the live steps")
@click.option("--chunk", type=click.IntRange(1, 65536), default=512, show_default=True,
              help="frames per arriving chunk")
@click.option("--refine-s", type=click.FloatRange(min=0.0), default=0.8, show_default=True,
              help="refinement budget between the last frame and the final image")
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
def command(backend: str, sizes: str, n_frames: int, batch_size: int, chunk: int, refine_s: float,
            repeats: int, as_json: bool) -> None:
    """GPU figures: frames/s folded in (64², 128²), last frame → final image, objective ÷ FFT
    pair, host synchronisations per step and per CG iteration."""
    try:
        xp = get_xp(backend)
    except BackendUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    try:
        frame_sizes = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {sizes!r}", param_hint="--sizes") from None
    if not frame_sizes or min(frame_sizes) < 16:
        raise click.BadParameter("frame sizes must be ≥ 16", param_hint="--sizes")
    console = Console(stderr=True)
    figures: dict[str, Any] = {"backend": backend, "frames": n_frames, "batch": batch_size, "refine_s": refine_s}
    for size in frame_sizes:
        with console.status(f"{size}×{size}: simulating {n_frames} frames…"):
            scan = synthetic_scan(n_frames, size)
        with console.status(f"{size}×{size}: folding frames in, then the final image…"):
            fold, engine = fold_rate(scan, backend, batch_size, chunk)
            fold.update(final_image(engine, xp, refine_s))
        with console.status(f"{size}×{size}: objective ÷ FFT pair…"):
            fold.update(objective_ratio(scan, backend, repeats))
        figures[str(size)] = fold
    with console.status("host synchronisations (strict backend)…"):
        figures["syncs"] = host_syncs(synthetic_scan(64, 32), steps=10, iterations=8)
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    _print(figures, frame_sizes, refine_s)


def _print(figures: dict[str, Any], sizes: list[int], refine_s: float) -> None:
    table = Table(title=f"bench gpu — backend {figures['backend']}, {figures['frames']} frames, "
                        f"batch {figures['batch']}")
    table.add_column("figure")
    for size in sizes:
        table.add_column(f"{size}×{size}", justify="right")
    table.add_column("target", justify="right")

    def row(label: str, key: str, spec: str, target: str = "") -> None:
        cells = []
        for size in sizes:
            value = figures[str(size)].get(key)
            cells.append("—" if value is None else format(value, spec))
        table.add_row(label, *cells, target)

    row("frames/s folded into the live reconstruction", "frames_per_s", ",.0f", "≥ 20,000 (64², H100)")
    row(f"last frame → final image (s), refine budget {refine_s:g} s", "final_image_s", ".2f", "≤ 1")
    row("refinement iterations in that time", "refine_iterations", ".0f")
    row("objective + gradient ÷ FFT pair", "objective_ratio", ".2f", "≤ 1.5")
    row("  … without the fused likelihood kernel", "objective_unfused_ratio", ".2f")
    syncs = figures["syncs"]
    table.add_row("host syncs per mini-batch step (strict)", f"{syncs['syncs_per_step']:.1f}", *[""] * (len(sizes) - 1), "0")
    table.add_row("host syncs per CG iteration, mean / max (strict)",
                  f"{syncs['syncs_per_cg_iteration_mean']:.2f} / {syncs['syncs_per_cg_iteration_max']:.0f}",
                  *[""] * (len(sizes) - 1), "≤ 2")
    table.add_row("frames copied host↔device while stepping", f"{syncs['frame_copies_while_stepping']:.0f}",
                  *[""] * (len(sizes) - 1), "0")
    Console().print(table)
