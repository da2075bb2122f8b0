"""`cryoptycho bench engine`: the engine's cost against the FFTs it cannot avoid.

Figures, all measured side by side in one run on one backend:

* full-batch ratio — one CG iteration of ``refine_full_batch`` (and, beside it, one
  objective+gradient evaluation) over K frames ÷ one bare batched FFT + inverse FFT of the same
  K frames. The data term needs exactly that FFT pair per frame; the rest is overhead. CG is
  timed with its line model (trial steps without FFTs, ``gpu/line_model.py``) and without it
  (every trial a full evaluation); ``refine_*_peak_over_raw`` is (frame bytes + the peak
  that one such run allocates) ÷ frame bytes. ``--profile`` adds where an evaluation and a
  CG run spend their time (NumPy: cProfile own time by function group).
* mini-batch rate — frames visited per second by ``StreamingReconstructor.step`` (object and
  probe updates, Tikhonov prior) for 64×64 and 128×128 frames, with the bare FFT pair of one
  batch for the same ratio.
* memory — frame store bytes ÷ the frames' bytes as it holds them (``nbytes`` accounting; a
  store of uint8 rows for counts ≤ 255 holds half or a quarter of their raw bytes: ``held ÷ raw``)
  when the frame count is known up front and when the store has to grow; and the peak of everything the live engine
  allocated during the scan ÷ raw frame bytes (NumPy: tracemalloc; CuPy: the memory pool's
  total bytes, which keeps freed blocks and so bounds the peak).
"""

from __future__ import annotations

import contextlib
import cProfile
import json
import pstats
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import click
import numpy as np
from cryoptycho.gpu import line_model, operators
from cryoptycho.gpu.backend import fft2, get_xp, ifft2, synchronize
from cryoptycho.gpu.geometry import fit_geometry
from cryoptycho.gpu.objective import data_term
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.probes import make_probe
from cryoptycho.gpu.reconstruct import refine_full_batch
from cryoptycho.gpu.stream import StreamingReconstructor
from rich.console import Console
from rich.table import Table

PIXEL = 1e-10  #: m; 300 keV, so the largest sampled semi-angle is 9.8 mrad
SEMIANGLE = 8e-3  #: rad
DOSE = 1e4  #: electrons per pattern


@dataclass
class Scan:
    frames: np.ndarray  #: (K, M, M) uint16, detector order
    positions: np.ndarray  #: (K, 2) m
    probe: np.ndarray  #: (M, M) complex64


def synthetic_scan(n_frames: int, size: int, seed: int = 0) -> Scan:
    """A jittered raster at 75 % linear overlap over a random weak-phase object, Poisson
    counts at ``DOSE`` electrons per pattern; the probe fills about half the window."""
    rng = np.random.default_rng(seed)
    # defocus spread 2·Δf·α = half the window
    probe = make_probe(
        "defocused", (size, size), PIXEL, semiangle=SEMIANGLE,
        defocus=size * PIXEL / (4 * SEMIANGLE), total_intensity=DOSE,
    )
    side = int(np.ceil(np.sqrt(n_frames)))
    step = size / 8  # probe diameter ≈ size/2, so 75 % overlap
    ys, xs = np.divmod(np.arange(n_frames), side)
    pos = np.stack([ys, xs], axis=-1) * step * PIXEL
    pos += rng.uniform(-0.5, 0.5, pos.shape) * PIXEL  # stage jitter: sub-pixel shifts differ
    geo = fit_geometry(pos, PIXEL, (size, size))
    obj = np.exp(1j * 0.2 * rng.standard_normal(geo.object_shape)).astype(np.complex64)
    batch = operators.make_batch(geo.to_pixels(pos), geo.object_shape, (size, size))
    frames = np.empty((n_frames, size, size), dtype=np.uint16)
    for lo in range(0, n_frames, 256):
        sub = operators.sub_batch(batch, slice(lo, lo + 256))
        inten = np.abs(operators.forward(obj, probe, sub)) ** 2
        frames[lo : lo + 256] = operators.from_fft_order(rng.poisson(inten)).astype(np.uint16)
    return Scan(frames, pos, probe.astype(np.complex64))


def _best_times(fns: dict[str, Callable[[], Any]], xp: ModuleType, repeats: int) -> dict[str, float]:
    """Shortest of ``repeats`` timed runs of each function, run interleaved after one warm-up
    each: other load on the machine only ever adds time, and interleaving exposes every
    function to the same load."""
    for fn in fns.values():
        fn()
    synchronize(xp)
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            synchronize(xp)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def full_batch_ratio(
    scan: Scan, xp: ModuleType, repeats: int, cg_iterations: int, on_grid: bool = False,
    profile: bool = False,
) -> dict[str, Any]:
    """Full-batch cost ÷ bare FFT pair. ``on_grid`` rounds the positions to whole pixels, so
    all windows share one unshifted probe: the difference to the jittered scan is the cost
    of the sub-pixel probe shifts (an extra FFT pair per distinct shift)."""
    m = scan.frames.shape[1:]
    opts = ReconOptions(backend="cupy" if xp is not np else "numpy", prior="tikhonov")
    geo = fit_geometry(scan.positions, PIXEL, m)
    pixels = geo.to_pixels(scan.positions)
    if on_grid:
        pixels = np.round(pixels)
    batch = operators.make_batch(xp.asarray(pixels), geo.object_shape, m)
    counts = xp.asarray(operators.to_fft_order(scan.frames))
    probe = xp.asarray(scan.probe)
    obj = xp.ones(geo.object_shape, dtype=np.complex64)
    waves = xp.ones(counts.shape, dtype=np.complex64)
    chunk = opts.chunk_size
    subs = [
        (slice(lo, lo + chunk), operators.sub_batch(batch, slice(lo, lo + chunk)))
        for lo in range(0, batch.size, chunk)
    ]

    def evaluation() -> None:
        for sl, sub in subs:
            data_term(obj, probe, counts[sl], sub, want_probe=True)

    def cg() -> None:
        refine_full_batch(obj, probe, counts, batch, None, opts, cg_iterations)

    def cg_direct() -> None:
        with _without_line_model():
            cg()

    best = _best_times(
        {"fft": lambda: ifft2(fft2(waves)), "evaluation": evaluation, "cg": cg,
         "cg_direct": cg_direct}, xp, repeats
    )
    t_fft, t_eval = best["fft"], best["evaluation"]
    t_cg, t_direct = best["cg"] / cg_iterations, best["cg_direct"] / cg_iterations
    raw = float(counts.nbytes)
    result = {
        "frames": float(batch.size),
        "groups": float(batch.shifts.shape[0]),
        "fft_pair_s": t_fft,
        "evaluation_s": t_eval,
        "cg_iteration_s": t_cg,
        "cg_direct_iteration_s": t_direct,
        "evaluation_ratio": t_eval / t_fft,
        "cg_iteration_ratio": t_cg / t_fft,
        "cg_direct_iteration_ratio": t_direct / t_fft,
        "refine_peak_over_raw": (raw + _peak_bytes(cg, xp)) / raw,
        "refine_direct_peak_over_raw": (raw + _peak_bytes(cg_direct, xp)) / raw,
    }
    if profile:
        result["profile_evaluation"] = profile_shares(evaluation)
        result["profile_cg_iteration"] = profile_shares(cg)
    return result


@contextlib.contextmanager
def _without_line_model() -> Iterator[None]:
    """CG evaluating the objective at every line-search trial (the line model's memory share
    set to zero), for the side-by-side figure."""
    share = line_model.LINE_MEMORY_SHARE
    line_model.LINE_MEMORY_SHARE = 0.0
    try:
        yield
    finally:
        line_model.LINE_MEMORY_SHARE = share


def _peak_bytes(fn: Callable[[], Any], xp: ModuleType) -> int:
    """Bytes ``fn`` allocates at its peak beyond what exists before it (NumPy: tracemalloc;
    CuPy: growth of the memory pool, emptied first)."""
    if xp is np:
        tracemalloc.start()
        try:
            fn()
            return int(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    pool = xp.get_default_memory_pool()
    pool.free_all_blocks()
    before = _pool_bytes(xp)
    fn()
    synchronize(xp)
    return _pool_bytes(xp) - before


#: Where the time of an evaluation goes, by the function that spends it (cProfile, own time).
_GATHER_SCATTER = {"extract", "scatter_add", "_scatter_blocks", "_blocks", "group_sum", "flat_index"}
_SHIFTS = {"_shift", "_shift_back_sum", "_shift_factors", "_factors", "position_probes", "probe_adjoint",
           "shifted_probes", "shift_back"}


def profile_shares(fn: Callable[[], Any]) -> dict[str, float]:
    """Shares of ``fn``'s time (NumPy: cProfile own time) spent in FFTs, window gather/scatter,
    the likelihood (gpu/likelihood.py), the sub-pixel shift ramps, and everything else (the
    elementwise products of objective/line model/CG and NumPy reductions)."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    shares = {"fft": 0.0, "gather_scatter": 0.0, "likelihood": 0.0, "shift_ramps": 0.0, "other": 0.0}
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    for (filename, _line, name), (_cc, _nc, own, _cum, _callers) in stats.items():
        if "pocketfft" in filename or "pocketfft" in name:
            key = "fft"
        elif name in _GATHER_SCATTER or "bincount" in name:
            key = "gather_scatter"
        elif filename.endswith("likelihood.py"):
            key = "likelihood"
        elif name in _SHIFTS:
            key = "shift_ramps"
        else:
            key = "other"
        shares[key] += own
    total = sum(shares.values()) or 1.0
    return {k: v / total for k, v in shares.items()}


def _pool_bytes(xp: ModuleType) -> int:
    return int(xp.get_default_memory_pool().total_bytes())


def mini_batch_rate(scan: Scan, xp: ModuleType, steps: int, batch_size: int) -> dict[str, float]:
    """Frames/s of live steps (object + probe + prior) after the whole scan has arrived in
    chunks, and the peak memory of the live engine over that run ÷ raw frame bytes."""
    k, m = scan.frames.shape[0], scan.frames.shape[1:]
    backend = "cupy" if xp is not np else "numpy"
    opts = ReconOptions(
        backend=backend, prior="tikhonov", refine_probe=True,
        stream={"batch_size": batch_size, "probe_warmup_steps": 0},
    )
    waves = xp.ones((batch_size,) + tuple(m), dtype=np.complex64)  # before tracing starts
    if xp is np:
        tracemalloc.start()
    else:
        xp.get_default_memory_pool().free_all_blocks()
    engine = StreamingReconstructor(
        frame_shape=m, frame_dtype=scan.frames.dtype, pixel_size=PIXEL, probe=scan.probe,
        options=opts, expected_frames=k,
    )
    for lo in range(0, k, batch_size):
        engine.add_frames(scan.frames[lo : lo + batch_size], scan.positions[lo : lo + batch_size])
        engine.step()
    ifft2(fft2(waves))
    # Each step is followed by the bare FFT pair of one batch, so both see the same load;
    # medians, as steps differ a little (batch content, illumination refreshes).
    t_step, t_fft, visited = [], [], []
    for _ in range(steps):
        synchronize(xp)
        t0 = time.perf_counter()
        visited.append(engine.step().batch_size)
        synchronize(xp)
        t1 = time.perf_counter()
        ifft2(fft2(waves))
        synchronize(xp)
        t_step.append(t1 - t0)
        t_fft.append(time.perf_counter() - t1)
    if xp is np:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    else:
        peak = _pool_bytes(xp)
    raw = engine.frame_store.raw_nbytes
    step_s = float(np.median(t_step))
    rate = float(np.median(visited)) / step_s
    return {
        "frames": float(k),
        "batch": float(batch_size),
        "frames_per_s": rate,
        "step_ratio": step_s / float(np.median(t_fft)),
        "store_over_raw": engine.frame_store.nbytes / engine.frame_store.held_nbytes,
        "held_over_raw": engine.frame_store.held_nbytes / raw,
        "peak_over_raw": peak / raw,
    }


def growth_overhead(scan: Scan, xp: ModuleType) -> dict[str, float]:
    """Store bytes ÷ raw bytes when the frame count is *not* known: the store starts at 64
    frames and grows geometrically (×1.5)."""
    opts = ReconOptions(backend="cupy" if xp is not np else "numpy", stream={"initial_capacity": 64})
    engine = StreamingReconstructor(
        frame_shape=scan.frames.shape[1:], frame_dtype=scan.frames.dtype, pixel_size=PIXEL,
        probe=scan.probe, options=opts,
    )
    for lo in range(0, scan.frames.shape[0], 32):
        engine.add_frames(scan.frames[lo : lo + 32], scan.positions[lo : lo + 32])
    store = engine.frame_store
    return {"store_over_raw": store.nbytes / store.held_nbytes, "reallocations": float(store.reallocations)}


@click.command("engine")
@click.option("--backend", type=click.Choice(["numpy", "cupy"]), default="numpy", show_default=True)
@click.option("--frames", "n_frames", type=click.IntRange(16, 1_000_000), default=1024, show_default=True,
              help="frames of the full-batch comparison")
@click.option("--size", type=click.IntRange(16, 1024), default=64, show_default=True,
              help="frame size M of the full-batch comparison")
@click.option("--stream-frames", type=click.IntRange(64, 1_000_000), default=2048, show_default=True,
              help="frames of each mini-batch run (64×64 and 128×128)")
@click.option("--batch", "batch_size", type=click.IntRange(1, 65536), default=64, show_default=True)
@click.option("--steps", type=click.IntRange(1, 100_000), default=10, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--cg-iterations", type=click.IntRange(1, 1000), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON instead of tables")
@click.option("--profile", is_flag=True,
              help="also report where the time goes (FFT, gather/scatter, likelihood, shifts, other)")
def command(
    backend: str, n_frames: int, size: int, stream_frames: int, batch_size: int, steps: int,
    repeats: int, cg_iterations: int, as_json: bool, profile: bool,
) -> None:
    """Engine cost ÷ bare batched FFTs, live frames/s, and memory ÷ raw frame bytes."""
    xp = get_xp(backend)
    if profile and xp is not np:
        raise click.UsageError("--profile needs --backend numpy (cProfile sees CPU time only)")
    scan = synthetic_scan(n_frames, size)
    full = full_batch_ratio(scan, xp, repeats, cg_iterations, profile=profile)
    grid = full_batch_ratio(scan, xp, repeats, cg_iterations, on_grid=True, profile=profile)
    del scan
    live = {}
    for m in (64, 128):
        scan = synthetic_scan(stream_frames, m, seed=1)
        live[m] = mini_batch_rate(scan, xp, steps, batch_size)
        if m == 64:
            growth = growth_overhead(scan, xp)
    result = {"backend": backend, "full_batch": full, "full_batch_on_grid": grid, "mini_batch": {str(k): v for k, v in live.items()},
              "store_growth": growth}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    console = Console()
    t1 = Table(title=f"Full batch, {n_frames} frames of {size}×{size} ({backend})")
    for col in ("", "jittered: s", "÷ FFT+iFFT", "on grid: s", "÷ FFT+iFFT "):
        t1.add_column(col, justify="right")
    for label, key in (
        ("bare batched FFT + inverse FFT", "fft_pair"),
        ("objective + gradients (1 evaluation)", "evaluation"),
        ("CG iteration (refine_full_batch)", "cg_iteration"),
        ("CG iteration, no line model", "cg_direct_iteration"),
    ):
        ratio = "1.00" if key == "fft_pair" else f"{full[key + '_ratio']:.2f}"
        ratio_g = "1.00" if key == "fft_pair" else f"{grid[key + '_ratio']:.2f}"
        t1.add_row(label, f"{full[key + '_s']:.4f}", ratio, f"{grid[key + '_s']:.4f}", ratio_g)
    console.print(t1)
    console.print(
        f"  distinct sub-pixel probe shifts: jittered {int(full['groups'])} of "
        f"{int(full['frames'])} positions, on grid {int(grid['groups'])}"
    )
    console.print(
        f"  refine peak ÷ raw frame bytes (jittered): {full['refine_peak_over_raw']:.1f} with the "
        f"line model, {full['refine_direct_peak_over_raw']:.1f} without"
    )
    if profile:
        tp = Table(title="Where the time goes (share of cProfile own time)")
        for col in ("", "fft", "gather_scatter", "likelihood", "shift_ramps", "other"):
            tp.add_column(col, justify="right")
        for label, row in (
            ("evaluation, jittered", full["profile_evaluation"]),
            ("evaluation, on grid", grid["profile_evaluation"]),
            ("CG run, jittered", full["profile_cg_iteration"]),
            ("CG run, on grid", grid["profile_cg_iteration"]),
        ):
            tp.add_row(label, *(f"{row[k]:.0%}" for k in ("fft", "gather_scatter", "likelihood", "shift_ramps", "other")))
        console.print(tp)
    t2 = Table(title=f"Live mini-batch steps, batch {batch_size}, object + probe + prior ({backend})")
    for col in ("frame", "frames", "frames/s", "step ÷ FFT+iFFT of a batch", "store ÷ held", "held ÷ raw", "peak ÷ raw"):
        t2.add_column(col, justify="right")
    for m, row in live.items():
        t2.add_row(f"{m}×{m}", f"{int(row['frames'])}", f"{row['frames_per_s']:.0f}", f"{row['step_ratio']:.2f}",
                   f"{row['store_over_raw']:.4f}", f"{row['held_over_raw']:.2f}", f"{row['peak_over_raw']:.2f}")
    console.print(t2)
    how = "tracemalloc" if backend == "numpy" else "CuPy memory pool total"
    console.print(f"  store ÷ held: nbytes accounting over the frames' bytes as the store holds them (uint8 "
                  f"rows where every count ≤ 255: held ÷ raw < 1); peak ÷ raw: {how} (store, canvas and work buffers)")
    console.print(f"  store ÷ held without a declared frame count (geometric growth): "
                  f"{growth['store_over_raw']:.3f} after {int(growth['reallocations'])} re-allocations")
