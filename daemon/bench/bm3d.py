"""`cryoptycho bench bm3d`: our open BM3D against the reference `bm3d` package, side by side.

For each image size and noise level the same noisy image goes through both implementations in
the same process; the table gives the PSNR of each, their difference, the wall time of each and
the time ratio (reference / ours: > 1 means ours is faster). The test image is scikit-image's
``camera`` (when scikit-image is installed; 512² native, 256² by 2×2 binning, other sizes by
cropping or tiling) or else a synthetic piecewise-smooth image with texture.

``--recon``: the denoiser's effect on a low-dose reconstruction instead (bm3d_recon.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

import click
import numpy as np
from cryoptycho.gpu.backend import BackendUnavailable, get_xp, synchronize, to_numpy
from cryoptycho.gpu.bm3d import bm3d
from rich.console import Console
from rich.table import Table

from .bm3d_recon import ReconConfig, _numbers, _recon_command, recon_rows, recon_table

__all__ = ["ReconConfig", "command", "recon_rows", "recon_table"]


def bench_image(size: int) -> tuple[np.ndarray, str]:
    """A size×size grey image on 0–255 and its name."""
    try:
        from skimage import data
    except ImportError:
        return synthetic_image(size), "synthetic"
    cam = data.camera().astype(np.float64)
    if size <= 256:
        cam = cam.reshape(256, 2, 256, 2).mean(axis=(1, 3))
    reps = -(-size // cam.shape[0])
    return np.tile(cam, (reps, reps))[:size, :size].astype(np.float32), "camera"


def synthetic_image(size: int) -> np.ndarray:
    """Piecewise-smooth regions with sharp edges plus a textured patch, on 0–255."""
    yy, xx = np.mgrid[:size, :size] / size
    img = 60 + 80 * xx + 40 * yy
    img = np.where((yy - 0.35) ** 2 + (xx - 0.3) ** 2 < 0.04, 200 - 60 * yy, img)
    img = np.where((np.abs(yy - 0.7) < 0.12) & (np.abs(xx - 0.65) < 0.2), 30 + 20 * xx, img)
    texture = (np.abs(yy - 0.25) < 0.15) & (np.abs(xx - 0.75) < 0.15)
    img = np.where(texture, 128 + 50 * np.sin(2 * np.pi * (xx * 14 + yy * 5)), img)
    return img.astype(np.float32)


def _psnr(estimate: np.ndarray, clean: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(estimate, np.float64) - clean) ** 2))
    return 10 * np.log10(255.0**2 / mse)


def _timed(fn: Any, repeat: int, *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and its best wall time of ``repeat`` runs."""
    best, out = np.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return out, best


def _ours(xp: Any, image: Any, sigma: float) -> Any:
    out = bm3d(image, sigma)
    synchronize(xp)  # a GPU call returns before the work is done
    return out


def _reference_run(package: Any, image: np.ndarray, sigma: float) -> np.ndarray:
    return package.bm3d(image / 255.0, sigma / 255.0) * 255.0


def _reference() -> Any | None:
    try:
        import bm3d as package
    except ImportError:
        return None
    return package


#: figures taken from an evaluation's summary into a row (key in the row ← key in the summary)
_IMAGE_ONLY = ("sizes", "sigmas", "repeat", "reference")
_RECON_ONLY = (
    "sample",
    "doses",
    "iterations",
    "frame_size",
    "pixel_size",
    "priors",
    "mu1",
    "denoise_every",
    "sparse_sigma",
    "seed",
)


@click.command(name="bm3d")
@click.option("--backend", type=click.Choice(["numpy", "cupy"]), default="numpy", show_default=True)
@click.option("--sizes", default="256,512", show_default=True, help="Comma-separated image sides.")
@click.option("--sigmas", default="10,25,50", show_default=True, help="Noise σ on 0–255.")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(1), help="Best of N.")
@click.option(
    "--reference/--no-reference",
    default=True,
    show_default=True,
    help="Also run the `bm3d` package (when installed).",
)
@click.option(
    "--recon",
    is_flag=True,
    help="Instead: FRC of a simulated low-dose reconstruction with the BM3D prior vs Tikhonov vs none.",
)
@click.option(
    "--sample", default="hemoglobin", show_default=True, help="--recon: simulated specimen."
)
@click.option("--doses", default="5,20", show_default=True, help="--recon: comma-separated, e⁻/Å².")
@click.option(
    "--iterations",
    type=click.IntRange(min=1),
    default=40,
    show_default=True,
    help="--recon: CG iterations of every reconstruction.",
)
@click.option(
    "--frame-size", type=click.IntRange(min=16), default=64, show_default=True, help="--recon."
)
@click.option(
    "--pixel-size",
    type=click.FloatRange(min=0, min_open=True),
    default=0.8,
    show_default=True,
    help="--recon: Å.",
)
@click.option(
    "--priors", default="none,tikhonov,sparse", show_default=True, help="--recon: comma-separated."
)
@click.option(
    "--mu1",
    default=None,
    help="--recon: comma-separated sparse-prior weights  [default: engine's μ₁]",
)
@click.option(
    "--denoise-every",
    type=click.IntRange(min=1),
    default=None,
    help="--recon: iterations between BM3D refreshes  [default: engine's]",
)
@click.option(
    "--sparse-sigma",
    default="est",
    show_default=True,
    help="--recon: comma-separated BM3D noise σ (rad) for the sparse prior; est = estimated "
    "from each iterate (the engine)",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="--recon: noise, probe and start."
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the rows as JSON here.",
)
@click.pass_context
def command(
    ctx: click.Context,
    backend: str,
    sizes: str,
    sigmas: str,
    repeat: int,
    reference: bool,
    recon: bool,
    sample: str,
    doses: str,
    iterations: int,
    frame_size: int,
    pixel_size: float,
    priors: str,
    mu1: str | None,
    denoise_every: int | None,
    sparse_sigma: str,
    seed: int,
    json_path: str | None,
) -> None:
    """Time and PSNR of the open BM3D vs the reference `bm3d` package (or, with --recon, its
    effect as the sparse prior of a low-dose reconstruction)."""
    given = {
        name
        for name in _IMAGE_ONLY + _RECON_ONLY
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }
    stray = sorted(given & set(_RECON_ONLY if not recon else _IMAGE_ONLY))
    if stray:
        opts = ", ".join("--" + n.replace("_", "-") for n in stray)
        raise click.UsageError(f"{opts}: {'only with' if not recon else 'not with'} --recon")
    if recon:
        _recon_command(ctx.params)
        return
    size_list = _numbers(sizes, int, "--sizes")
    sigma_list = _numbers(sigmas, float, "--sigmas")
    if min(size_list) < 8:
        raise click.BadParameter("every size must be >= 8", param_hint="--sizes")
    if min(sigma_list) <= 0:
        raise click.BadParameter("every sigma must be > 0", param_hint="--sigmas")
    try:
        xp = get_xp(backend)
    except BackendUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    package = _reference() if reference else None
    console = Console()
    if reference and package is None:
        console.print("[yellow]the `bm3d` package is not installed: timing ours only[/]")
    # One small warm-up call: CuPy compiles its kernels on first use.
    warm = xp.asarray(synthetic_image(32))
    bm3d(warm, 5.0)
    synchronize(xp)

    rows = []
    for size in size_list:
        clean, name = bench_image(size)
        for sigma in sigma_list:
            noisy = clean + np.random.default_rng(int(size * 1000 + sigma)).normal(
                0, sigma, clean.shape
            )
            noisy = noisy.astype(np.float32)
            device = xp.asarray(noisy)

            est, t_ours = _timed(_ours, repeat, xp, device, sigma)
            row = {
                "image": name,
                "size": size,
                "sigma": sigma,
                "backend": backend,
                "psnr_noisy": _psnr(noisy, clean),
                "psnr_ours": _psnr(to_numpy(est), clean),
                "time_ours_s": t_ours,
            }
            if package is not None:
                ref_est, t_ref = _timed(_reference_run, repeat, package, noisy, sigma)
                row.update(psnr_ref=_psnr(ref_est, clean), time_ref_s=t_ref)
                row.update(psnr_delta=row["psnr_ours"] - row["psnr_ref"], speedup=t_ref / t_ours)
            rows.append(row)
            console.print(
                f"{size}² σ={sigma:g}: ours {row['psnr_ours']:.2f} dB in {t_ours:.2f} s"
                + (
                    f", reference {row['psnr_ref']:.2f} dB in {row['time_ref_s']:.2f} s"
                    if package is not None
                    else ""
                )
            )
    console.print(
        _table(rows, package is not None, title=f"BM3D, ours ({backend}) vs `bm3d` package")
    )
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)


def _table(rows: list[dict], with_ref: bool, title: str | None) -> Table:
    table = Table(title=title)
    for col in ("image", "size", "σ", "PSNR noisy", "PSNR ours", "time ours [s]"):
        table.add_column(col, justify="right")
    if with_ref:
        for col in ("PSNR ref", "ΔPSNR", "time ref [s]", "ref/ours time"):
            table.add_column(col, justify="right")
    for r in rows:
        cells = [
            r["image"],
            f"{r['size']}²",
            f"{r['sigma']:g}",
            f"{r['psnr_noisy']:.2f}",
            f"{r['psnr_ours']:.2f}",
            f"{r['time_ours_s']:.2f}",
        ]
        if with_ref:
            cells += [
                f"{r['psnr_ref']:.2f}",
                f"{r['psnr_delta']:+.2f}",
                f"{r['time_ref_s']:.2f}",
                f"{r['speedup']:.2f}×",
            ]
        table.add_row(*cells)
    return table
