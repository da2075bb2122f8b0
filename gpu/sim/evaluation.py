"""Score a reconstruction against the simulation's ground truth.

Both objects are cut to the *scanned area* (the bounding box of the probe centres) on the
truth's pixel grid; the reconstruction is resampled there from its own origin (sub-pixel Fourier
shift), then registered to the truth by cross-correlation (a reconstruction with a refined
probe may drift by a fraction of a pixel). Scores, per the low-dose findings:

* FRC / SNR(q) of the ice-removed phase, apodised by the particle footprint (raw rings and
  pooled rings), and over the whole scanned area with a Tukey window;
* resolutions at 1-bit, ½-bit and 0.143;
* phase correlation inside the footprint; NRMSE of T after global phase and scale alignment
  (whole area, dominated by ice — reported for completeness; the scale because an engine that
  normalises its probe to the detected counts puts the uniform ice absorption into the probe).

A curve already below the threshold at ring 1 is reported as ∞ (not resolved): the crossing
would be interpolated (or extrapolated) from ring 0, the DC term, into a meaningless period.

:func:`quantum_limit` scores the ideal linear phase measurement at the same dose — a perfect
Zernike phase-contrast image (every electron that survives the ice, transfer 2φ at every
frequency, no aberrations, DQE 1) — in exactly the same way, so that a reconstruction's figures
can be read against what the dose allows for this specimen (gpu/MEASUREMENTS.md, "Low-dose quality").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..metrics import (
    THRESHOLDS,
    FRCCurve,
    Threshold,
    fourier_shift,
    frc,
    ice_phase_removed,
    nrmse,
    particle_footprint,
    phase_correlation,
    phase_ramp,
    register_translation,
    remove_phase_ramp,
    soft_mask,
    tukey_window,
)


@dataclass
class Evaluation:
    pixel_size: float
    frc_particle: FRCCurve
    frc_area: FRCCurve
    pool: int
    phase_correlation: float
    nrmse: float
    shift_px: tuple[float, float]
    resolutions: dict[str, float] = field(default_factory=dict)  #: key "<region>/<curve>/<thr>"
    lowpass_px: float = 0.0  #: :func:`quantum_limit` only: the Gaussian σ of its phase correlation
    ramp_rad_per_px: tuple[float, float] = (0.0, 0.0)  #: the phase ramp removed (y, x)
    #: ‖φ − φ_true‖ / ‖φ_true‖ of the ice-removed phase inside the footprint, no scale fitted:
    #: a flat image scores 1, an over-contrasted one can score more (read beside the correlation)
    phase_nrmse: float = float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "resolution_m": dict(self.resolutions),
            "phase_correlation": self.phase_correlation,
            "nrmse": self.nrmse,
            "phase_nrmse": self.phase_nrmse,
            "registration_shift_px": list(self.shift_px),
            "phase_ramp_rad_per_px": list(self.ramp_rad_per_px),
            "pixel_size_m": self.pixel_size,
        }


def scanned_box(positions: np.ndarray, origin: tuple[float, float], pixel_size: float,
                shape: tuple[int, int]) -> tuple[slice, slice]:
    """Pixel slices of ``shape`` (grid at ``origin``) covering the probe centres' bounding box."""
    pos = np.asarray(positions, dtype=np.float64)
    lo = np.floor((pos.min(axis=0) - np.asarray(origin)) / pixel_size).astype(int)
    hi = np.ceil((pos.max(axis=0) - np.asarray(origin)) / pixel_size).astype(int) + 1
    lo = np.clip(lo, 0, np.asarray(shape))
    hi = np.clip(hi, 0, np.asarray(shape))
    if np.any(hi - lo < 8):
        raise ValueError("the scanned area is smaller than 8 pixels across: nothing to score")
    return slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1]))


def resample(obj: np.ndarray, origin: tuple[float, float], pixel_size: float,
             target_origin: tuple[float, float], target_shape: tuple[int, int]) -> np.ndarray:
    """``obj`` (grid at ``origin``) on the grid at ``target_origin`` (same pixel size)."""
    off = (np.asarray(target_origin) - np.asarray(origin)) / pixel_size
    base = np.floor(off).astype(int)
    frac = off - base
    ny, nx = target_shape
    pad_y = max(0, -base[0]) + max(0, base[0] + ny + 1 - obj.shape[0])
    pad_x = max(0, -base[1]) + max(0, base[1] + nx + 1 - obj.shape[1])
    if pad_y or pad_x:
        raise ValueError(
            "the reconstruction does not cover the scanned area of the truth "
            f"(needs {pad_y}×{pad_x} more pixels): were they made from the same scan?"
        )
    crop = obj[base[0]:base[0] + ny + 1, base[1]:base[1] + nx + 1]
    if np.any(np.abs(frac) > 1e-6):
        crop = fourier_shift(crop, (-float(frac[0]), -float(frac[1])))
    return crop[:ny, :nx]


def evaluate_against_truth(
    recon: np.ndarray, recon_origin: tuple[float, float], truth: np.ndarray,
    truth_origin: tuple[float, float], pixel_size: float, positions: np.ndarray,
    pool: int = 3, register: bool = True, deramp: bool = True,
) -> Evaluation:
    """Scores of ``recon`` against ``truth`` (both complex transmissions, same pixel size).
    ``register``: a sub-pixel translation is removed first; ``deramp``: then the linear phase
    ramp of recon relative to truth, fitted on the ice of the scanned box (metrics.phase_ramp —
    the exact gauge between object and probe; a fixed probe leaves ≈ 10⁻³ rad/px)."""
    sy, sx = scanned_box(positions, truth_origin, pixel_size, truth.shape)
    t = np.asarray(truth)[sy, sx].astype(np.complex128)
    box_origin = (truth_origin[0] + sy.start * pixel_size, truth_origin[1] + sx.start * pixel_size)
    r = resample(np.asarray(recon).astype(np.complex128), recon_origin, pixel_size, box_origin, t.shape)
    truth_ph = ice_phase_removed(t)
    footprint = particle_footprint(truth_ph)
    truth_ph = ice_phase_removed(t, footprint)
    recon_ph = ice_phase_removed(r, footprint)
    shift = (0.0, 0.0)
    if register:
        win = tukey_window(t.shape)
        shift = register_translation(truth_ph * win, recon_ph * win)
        if max(abs(shift[0]), abs(shift[1])) > 0.25 * min(t.shape):
            shift = (0.0, 0.0)  # no credible correlation peak (e.g. pure noise): do not move
        if shift != (0.0, 0.0):
            r = fourier_shift(r, shift)
            recon_ph = ice_phase_removed(r, footprint)
    ramp = (0.0, 0.0)
    if deramp:
        # fitted on the ice: the gauge is one plane everywhere, and where the particle is a
        # wrong reconstruction's structure would pass for a ramp
        ice = tukey_window(t.shape) * ~footprint
        ramp = phase_ramp(r, t, ice if ice.sum() > 0.1 * t.size else tukey_window(t.shape))
        r = remove_phase_ramp(r, ramp)
        recon_ph = ice_phase_removed(r, footprint)
    w_particle = soft_mask(footprint, 2.0) * tukey_window(t.shape, 0.05)
    w_area = tukey_window(t.shape)
    curves = {
        "particle": frc(recon_ph * w_particle, truth_ph * w_particle, pixel_size),
        "area": frc(recon_ph * w_area, truth_ph * w_area, pixel_size),
    }
    res: dict[str, float] = {}
    for region, curve in curves.items():
        for name, c in (("raw", curve), ("pooled", curve.pooled(pool))):
            for thr in THRESHOLDS:
                res[f"{region}/{name}/{thr}"] = _resolution(c, thr)
    return Evaluation(
        pixel_size=pixel_size,
        frc_particle=curves["particle"],
        frc_area=curves["area"],
        pool=pool,
        phase_correlation=phase_correlation(recon_ph, truth_ph, footprint),
        nrmse=nrmse(r, t, scale=True),
        shift_px=shift,
        resolutions=res,
        ramp_rad_per_px=ramp,
        phase_nrmse=float(np.sqrt(np.sum((recon_ph - truth_ph)[footprint] ** 2)
                                  / max(float(np.sum(truth_ph[footprint] ** 2)), 1e-300))),
    )


def _resolution(curve: FRCCurve, threshold: Threshold) -> float:
    """First-crossing resolution, ∞ when ring 1 is already below the threshold."""
    if len(curve.frc) < 2 or curve.frc[1] < curve.threshold(threshold)[1]:
        return float("inf")
    return curve.resolution(threshold)


#: Gaussian low-pass widths (pixels) tried for the quantum limit's phase correlation
QUANTUM_LIMIT_FILTERS_PX: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def ideal_phase_image(truth: np.ndarray, dose: float, pixel_size: float, rng: np.random.Generator) -> np.ndarray:
    """Phase (rad, ice removed) measured by an ideal Zernike phase-contrast image of ``truth``.

    Counts ~ Poisson(N (1 + 2φ)) with N = dose · pixel² · ⟨|T|²⟩ the electrons per pixel that
    survive the ice (zero-loss), φ the truth's phase above the mean ice phase; the estimate is
    (counts/N − 1)/2: unbiased, with variance 1/(4N) per pixel, white. This is the weak-phase
    optimum of any linear phase measurement at that dose (no CTF zeros, no detector loss)."""
    if not dose > 0:
        raise ValueError(f"dose must be positive (e⁻/Å²), got {dose!r}")
    t = np.asarray(truth).astype(np.complex128)
    phase = ice_phase_removed(t)
    electrons = dose * (pixel_size * 1e10) ** 2 * float(np.mean(np.abs(t) ** 2))
    counts = rng.poisson(electrons * np.clip(1.0 + 2.0 * phase, 0.0, None))
    return (counts / electrons - 1.0) / 2.0


def quantum_limit(
    truth: np.ndarray, truth_origin: tuple[float, float], pixel_size: float, positions: np.ndarray,
    dose: float, seed: int = 0, pool: int = 3,
) -> Evaluation:
    """Scores of the ideal phase-contrast image (:func:`ideal_phase_image`) at ``dose`` e⁻/Å²,
    computed exactly like :func:`evaluate_against_truth`. FRC and resolutions are those of the
    raw image (a ring-wise filter does not change an FRC); phase correlation and NRMSE are the
    best over Gaussian low-passes of ``QUANTUM_LIMIT_FILTERS_PX`` — what the ideal data give
    with the best simple smoothing prior."""
    from scipy import ndimage

    phase = ideal_phase_image(truth, dose, pixel_size, np.random.default_rng(seed))

    def score(sigma: float) -> Evaluation:
        smooth = ndimage.gaussian_filter(phase, sigma) if sigma > 0 else phase
        return evaluate_against_truth(np.exp(1j * smooth), truth_origin, truth, truth_origin, pixel_size,
                                      positions, pool=pool, register=False)

    raw = score(0.0)
    sigma, best = max(((s, score(s)) for s in QUANTUM_LIMIT_FILTERS_PX if s > 0),
                      key=lambda pair: pair[1].phase_correlation)
    if best.phase_correlation > raw.phase_correlation:
        raw.phase_correlation, raw.nrmse, raw.lowpass_px = best.phase_correlation, best.nrmse, sigma
        raw.phase_nrmse = best.phase_nrmse
    return raw


#: Doses (× the reconstruction's) at which :func:`dose_efficiency` scores the ideal image
DOSE_EFFICIENCY_GRID: tuple[float, ...] = tuple(float(v) for v in np.geomspace(0.05, 2.0, 17))


def dose_efficiency(
    resolution_m: float, truth: np.ndarray, truth_origin: tuple[float, float], pixel_size: float,
    positions: np.ndarray, dose: float, key: str = "particle/pooled/1-bit", seeds: tuple[int, ...] = (0, 1),
    pool: int = 3,
) -> float:
    """The dose at which the ideal phase-contrast image (:func:`ideal_phase_image`, scored like a
    reconstruction) first reaches ``resolution_m`` (its ``key`` resolution, median over
    ``seeds``), divided by ``dose``: ½ is Dwyer & Paganin's bound for unbiased 4D-STEM
    ptychography. Log-linear interpolation between the doses of :data:`DOSE_EFFICIENCY_GRID`;
    0 when the reconstruction resolves nothing, the grid's top (2) when even that dose does not
    reach it — a lower bound."""
    if not np.isfinite(resolution_m):
        return 0.0
    prev: tuple[float, float] | None = None
    for f in DOSE_EFFICIENCY_GRID:
        res = float(np.median([
            evaluate_against_truth(
                np.exp(1j * ideal_phase_image(truth, f * dose, pixel_size, np.random.default_rng(s))),
                truth_origin, truth, truth_origin, pixel_size, positions, pool=pool, register=False,
                deramp=False,
            ).resolutions[key]
            for s in seeds
        ]))
        if res <= resolution_m:
            if prev is None or not np.isfinite(prev[1]) or prev[1] <= res:
                return f
            # log-dose interpolation between the grid points that bracket the resolution
            w = (prev[1] - resolution_m) / (prev[1] - res)
            return float(np.exp(np.log(prev[0]) + w * (np.log(f) - np.log(prev[0]))))
        prev = (f, res)
    return DOSE_EFFICIENCY_GRID[-1]


def evaluate_image(image: np.ndarray, reference: np.ndarray, pixel_size: float,
                   footprint: np.ndarray, pool: int = 3) -> dict[str, float]:
    """FRC resolutions of a cryo-EM image against the reference image (same grid), inside the
    particle ``footprint`` with soft edges — the same scoring as ptychography."""
    w = soft_mask(footprint, 2.0) * tukey_window(image.shape, 0.05)
    a = (image - np.average(image, weights=w + 1e-12)) * w
    b = (reference - np.average(reference, weights=w + 1e-12)) * w
    curve = frc(a, b, pixel_size)
    out = {}
    for name, c in (("raw", curve), ("pooled", curve.pooled(pool))):
        for thr in THRESHOLDS:
            out[f"particle/{name}/{thr}"] = c.resolution(thr)
    return out
