"""Small synthetic weak-phase datasets and image metrics for the engine tests (independent of
the engine under test: the simulation uses only the forward operator and NumPy's Poisson)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from cryoptycho.gpu import metrics, operators
from cryoptycho.gpu.data import ProbeModel, PtychoData
from cryoptycho.gpu.geometry import fit_geometry
from cryoptycho.gpu.probes import aberrate, make_probe

PIXEL = 1.0e-10  # 1 Å object pixels
ENERGY = 300e3


def weak_phase_object(
    shape: tuple[int, int], seed: int = 0, peak: float = 0.35,
    radius_px: tuple[float, float] = (1.0, 3.0),
) -> np.ndarray:
    """Unit-amplitude-ish object: random Gaussian blobs of phase (peak ≈ ``peak`` rad) with a
    little absorption, plus a uniform 'ice' phase of 1.2 rad."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    phase = np.zeros(shape)
    for _ in range(max(6, int(ny * nx / (6 * radius_px[1] ** 2)))):
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        r = rng.uniform(*radius_px)
        phase += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    phase *= peak / phase.max()
    return np.exp(1j * (phase + 1.2) - 0.1 * phase)


def synthetic_dataset(
    counts_per_pattern: float,
    m: int = 32,
    grid: int = 8,
    step_px: float = 3.0,
    seed: int = 0,
    defocus: float = 60e-9,
    semiangle: float = 8e-3,
    noiseless: bool = False,
    radius_px: tuple[float, float] = (1.0, 3.0),
) -> PtychoData:
    rng = np.random.default_rng(seed)
    probe = make_probe("defocused", (m, m), PIXEL, ENERGY, semiangle, defocus, precision="double",
                       total_intensity=counts_per_pattern)
    iy, ix = np.mgrid[0:grid, 0:grid]
    pos = np.stack([iy.ravel(), ix.ravel()], axis=1) * step_px * PIXEL
    pos = pos + rng.uniform(-0.3, 0.3, pos.shape) * PIXEL  # sub-pixel jitter
    geometry = fit_geometry(pos, PIXEL, (m, m))
    truth = weak_phase_object(geometry.object_shape, seed, radius_px=radius_px)
    batch = operators.make_batch(geometry.to_pixels(pos), geometry.object_shape, (m, m))
    inten = np.abs(operators.forward(truth, probe, batch)) ** 2
    frames = inten.astype(np.float32) if noiseless else rng.poisson(inten).astype(np.uint16)
    return PtychoData(
        frames=operators.from_fft_order(frames), positions=pos, energy=ENERGY, pixel_size=PIXEL,
        probe=probe.astype(np.complex64), truth_object=truth.astype(np.complex64),
        truth_probe=probe.astype(np.complex64), truth_origin=geometry.origin,
    )


def dose_per_a2(data: PtychoData, step_px: float = 3.0) -> float:
    area_a2 = (step_px * data.real_pixel_size * 1e10) ** 2
    return float(data.frames.sum()) / len(data.frames) / area_a2


def scored_region(truth: np.ndarray, margin: int) -> tuple[slice, slice]:
    ny, nx = truth.shape
    return slice(margin, ny - margin), slice(margin, nx - margin)


def nrmse(rec: np.ndarray, truth: np.ndarray, region: tuple[slice, slice]) -> float:
    """The product's NRMSE (gpu/metrics.py) inside ``region``, after the best global complex
    scale (the global phase and, with a refined probe, the amplitude are not determined by the
    data)."""
    return metrics.nrmse(np.asarray(rec)[region], np.asarray(truth)[region], scale=True)


def phase_corr(rec: np.ndarray, truth: np.ndarray, region: tuple[slice, slice]) -> float:
    """The product's phase correlation (gpu/metrics.py) of the phases inside ``region``, each
    taken relative to its mean transmission there."""
    return metrics.phase_correlation(metrics.unwrapped_phase(np.asarray(rec)[region]),
                                     metrics.unwrapped_phase(np.asarray(truth)[region]))


def frc_resolution(rec: np.ndarray, truth: np.ndarray, region: tuple[slice, slice],
                   threshold: float = 0.5) -> tuple[float, np.ndarray]:
    """FRC of the mean-removed phases (Hann-windowed) on pooled rings (two neighbouring rings
    per bin, the low-dose-findings advice against single noisy rings). Returns the first
    spatial frequency (cycles/pixel) where the curve drops below ``threshold`` — larger is
    finer — and the curve."""
    def phase(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t)[region]
        p = np.angle(t * np.exp(-1j * np.angle(t.mean())))
        return p - p.mean()

    a, b = phase(rec), phase(truth)
    ny, nx = a.shape
    win = np.outer(np.hanning(ny), np.hanning(nx))
    fa, fb = np.fft.fft2(a * win), np.fft.fft2(b * win)
    qy = np.fft.fftfreq(ny)[:, None]
    qx = np.fft.fftfreq(nx)[None, :]
    q = np.sqrt(qy * qy + qx * qx)
    width = 2.0 / min(ny, nx)
    edges = np.arange(0.0, 0.5 + width, width)
    curve = []
    for lo, hi in itertools.pairwise(edges):
        ring = (q >= lo) & (q < hi)
        num = np.abs((fa[ring] * fb[ring].conj()).sum())
        den = np.sqrt((np.abs(fa[ring]) ** 2).sum() * (np.abs(fb[ring]) ** 2).sum())
        curve.append(num / den if den > 0 else 0.0)
    curve = np.asarray(curve)
    below = np.nonzero(curve[1:] < threshold)[0]
    idx = below[0] + 1 if below.size else len(curve)
    return float(edges[idx]), curve


#: a few per cent of affine scan error and 0.3 px of jitter (a speckle probe pins positions)
def scan_errors():
    from cryoptycho.gpu.sim.errors import ExperimentErrors

    return ExperimentErrors(scale=(0.04, -0.03), rotation=np.deg2rad(2.0), shear=0.02, jitter=0.3 * PIXEL, seed=1)


def distorted_scan(counts: float = 1e5, grid: int = 8, step_px: float = 3.0, seed: int = 0, m: int = 32):
    """Poisson frames of a weak phase object recorded with a randomized (speckle) probe at the
    true, distorted (:func:`scan_errors`) positions of a nominal raster; returns (nominal m,
    true m, frames in FFT order, truth object, truth geometry, probe)."""
    rng = np.random.default_rng(seed)
    probe = make_probe("randomized", (m, m), PIXEL, ENERGY, 7e-3, 0.0, precision="double",
                       total_intensity=counts, diameter=12 * PIXEL, seed=seed)
    iy, ix = np.mgrid[0:grid, 0:grid]
    nominal = np.stack([iy.ravel(), ix.ravel()], axis=1) * step_px * PIXEL
    true = scan_errors().true_positions(nominal)
    geo = fit_geometry(np.vstack([nominal, true]), PIXEL, (m, m))
    truth = weak_phase_object(geo.object_shape, seed)
    batch = operators.make_batch(geo.to_pixels(true), geo.object_shape, (m, m))
    frames = rng.poisson(np.abs(operators.forward(truth, probe, batch)) ** 2).astype(np.uint16)
    return nominal, true, frames, truth, geo, probe


def aberrated_dataset(counts: float | None, errors: dict[str, float], seed: int = 0, grid: int = 10,
                      m: int = 32, semiangle: float = 8e-3, nominal_defocus: float = 60e-9) -> PtychoData:
    """Frames of a weak phase object recorded with the nominal defocused probe aberrated by
    ``errors`` (noiseless when ``counts`` is None, else Poisson at ``counts`` per pattern) on a
    ``grid``² raster of 3-pixel steps; the dataset gives the nominal probe model, the truth
    holds object and aberrated probe."""
    rng = np.random.default_rng(seed)
    nominal = make_probe("defocused", (m, m), PIXEL, ENERGY, semiangle, nominal_defocus, precision="double",
                         total_intensity=1e4 if counts is None else counts)
    true = aberrate(nominal, PIXEL, ENERGY, errors)
    iy, ix = np.mgrid[0:grid, 0:grid]
    pos = np.stack([iy.ravel(), ix.ravel()], axis=1) * 3.0 * PIXEL
    geometry = fit_geometry(pos, PIXEL, (m, m))
    truth = weak_phase_object(geometry.object_shape, seed, peak=0.5)
    batch = operators.make_batch(geometry.to_pixels(pos), geometry.object_shape, (m, m))
    inten = np.abs(operators.forward(truth, true, batch)) ** 2
    frames = inten.astype(np.float32) if counts is None else rng.poisson(inten).astype(np.uint16)
    return PtychoData(
        frames=operators.from_fft_order(frames), positions=pos, energy=ENERGY, pixel_size=PIXEL,
        probe_model=ProbeModel(kind="defocused", semiangle=semiangle, defocus=nominal_defocus),
        truth_object=truth.astype(np.complex64), truth_probe=true.astype(np.complex64),
        truth_origin=geometry.origin,
    )


def fractional_inside(px: np.ndarray, k: int) -> bool:
    """Whether position ``k`` sits well inside its pixel: a finite-difference move across a whole
    pixel changes the window (the shifted probe wraps differently)."""
    frac = px[k] - np.floor(px[k])
    return bool(np.all((frac > 0.1) & (frac < 0.9)))


def check_position_gradient(grad: np.ndarray, px: np.ndarray, loss_at: Callable[[np.ndarray], float],
                            eps: float = 1e-3) -> int:
    """Assert ``grad`` (n, 2) against central differences of ``loss_at(positions px)`` at every
    position well inside its pixel; how many were checked."""
    checked = 0
    for k in range(len(px)):
        if not fractional_inside(px, k):
            continue
        for a in (0, 1):
            up, down = px.copy(), px.copy()
            up[k, a] += eps
            down[k, a] -= eps
            fd = (loss_at(up) - loss_at(down)) / (2 * eps)
            assert grad[k, a] == pytest.approx(fd, rel=1e-3, abs=1e-4 * max(1.0, abs(fd)))
        checked += 1
    return checked


def check_coefficient_gradient(g: np.ndarray, x0: np.ndarray, loss: Callable[[np.ndarray], float],
                               names: Sequence[str], eps: float = 1e-5) -> None:
    """Assert the gradient ``g`` of ``loss`` with respect to a few coefficients (an aberration
    model's) against central differences, coefficient by coefficient."""
    for j in range(len(x0)):
        e = np.zeros_like(x0)
        e[j] = eps
        fd = (loss(x0 + e) - loss(x0 - e)) / (2 * eps)
        assert g[j] == pytest.approx(fd, rel=1e-4, abs=1e-6 * abs(loss(x0))), names[j]
