"""Probe (illumination) models from physical parameters — the paper's three designs (Fig. 5).

All probes are formed in the probe-forming aperture (reciprocal space), then propagated to the
sample plane:   ψ(r) = F⁻¹[ A(k) · P(k) · exp(−i χ(k)) ],   χ(k) = π λ Δf |k|² + π/2 Cs λ³ |k|⁴
with A the aperture of semi-angle α (|k| ≤ α/λ), P a phase plate (1, a Fresnel zone plate or a
random holographic plate) and Δf > 0 meaning underfocus (probe focused above the sample).
Probes are returned centred in the M×M window and normalised to ``total_intensity`` (= counts
per pattern under the unitary FFT convention).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Literal

import numpy as np

from .backend import (
    array_module,
    complex_dtype,
    complex_of,
    dev_float,
    fft2,
    host_floats,
    ifft2,
    scalar_as,
)
from .geometry import wavelength

ProbeKind = Literal["defocused", "fzp", "randomized"]


def _k_grid(shape: tuple[int, int], pixel_size: float, xp: ModuleType) -> tuple[Any, Any]:
    ky = xp.fft.fftfreq(shape[0], pixel_size)[:, None]
    kx = xp.fft.fftfreq(shape[1], pixel_size)[None, :]
    return ky, kx


def aberration_phase(
    shape: tuple[int, int], pixel_size: float, energy_ev: float, defocus: float, cs: float = 0.0,
    xp: ModuleType = np,
) -> Any:
    """χ(k) on the FFT-ordered grid (radians)."""
    lam = wavelength(energy_ev)
    ky, kx = _k_grid(shape, pixel_size, xp)
    k2 = ky * ky + kx * kx
    return np.pi * lam * defocus * k2 + 0.5 * np.pi * cs * lam**3 * k2 * k2


def aperture(
    shape: tuple[int, int], pixel_size: float, energy_ev: float, semiangle: float,
    xp: ModuleType = np, edge_px: float = 1.0,
) -> Any:
    """Probe-forming aperture (FFT order) with a soft edge ``edge_px`` reciprocal pixels wide
    (a hard edge rings in real space and wraps around the window)."""
    lam = wavelength(energy_ev)
    nyquist_angle = lam / (2.0 * pixel_size)
    if not 0 < semiangle <= nyquist_angle:
        raise ValueError(
            f"convergence semi-angle {semiangle * 1e3:.2f} mrad must be in (0, "
            f"{nyquist_angle * 1e3:.2f}] mrad, the largest angle sampled by {pixel_size * 1e10:.2f} Å "
            "pixels at this energy"
        )
    ky, kx = _k_grid(shape, pixel_size, xp)
    kr = xp.sqrt(ky * ky + kx * kx)
    k_max = semiangle / lam
    dk = 1.0 / (max(shape) * pixel_size)
    return xp.clip((k_max - kr) / (edge_px * dk) + 0.5, 0.0, 1.0)


def fresnel_zone_plate(
    shape: tuple[int, int], pixel_size: float, energy_ev: float, semiangle: float, zones: int = 8,
    xp: ModuleType = np,
) -> Any:
    """Binary (0/π) phase zone plate filling the aperture with ``zones`` zones, zone edges at
    radii k_n = k_max·√(n / zones) as for a Fresnel lens."""
    lam = wavelength(energy_ev)
    ky, kx = _k_grid(shape, pixel_size, xp)
    k2 = (ky * ky + kx * kx) / (semiangle / lam) ** 2
    zone = xp.floor(k2 * zones).astype(np.int64)
    return xp.exp(1j * np.pi * (zone % 2))


def random_phase_plate(
    shape: tuple[int, int], pixel_size: float, diameter: float, seed: int = 0, xp: ModuleType = np,
) -> Any:
    """A smooth random phase plate whose in-focus probe is a speckle of about ``diameter``
    metres: white phase noise in the aperture plane, band-limited so that its Fourier transform
    (the sample-plane field) is confined to a Gaussian envelope of that diameter."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    y = (np.fft.fftfreq(shape[0]) * shape[0] * pixel_size)[:, None]
    x = (np.fft.fftfreq(shape[1]) * shape[1] * pixel_size)[None, :]
    sigma = diameter / 4.0
    envelope = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    smooth = np.fft.fft2(np.fft.ifft2(noise) * envelope)
    phase = np.angle(smooth)
    return xp.asarray(np.exp(1j * phase))


#: Aberration coefficients of :func:`aberration_basis`, in metres (Krivanek's names; C10 here
#: is the defocus Δf of :func:`make_probe`, > 0 underfocus).
ABERRATIONS: tuple[str, ...] = ("C10", "C12a", "C12b", "C21a", "C21b", "C30")


def aberration_basis(
    shape: tuple[int, int], pixel_size: float, energy_ev: float, names: tuple[str, ...] = ABERRATIONS,
    xp: ModuleType = np,
) -> Any:
    """χ per metre of each coefficient of ``names`` on the FFT-ordered grid, (n, M, M) radians/m:
    χ(k) = (2π/λ)[½ C10 ω² + ½ ω² (C12a cos 2φ + C12b sin 2φ) + ⅓ ω³ (C21a cos φ + C21b sin φ)
    + ¼ C30 ω⁴], ω = λ|k| and φ the azimuth of k (x towards y). χ is linear in the
    coefficients, so a probe's aberrations are a dot product with this basis."""
    lam = wavelength(energy_ev)
    ky, kx = _k_grid(shape, pixel_size, xp)
    k2 = ky * ky + kx * kx
    terms = {
        "C10": 0.5 * lam**2 * k2,
        "C12a": 0.5 * lam**2 * (kx * kx - ky * ky),
        "C12b": lam**2 * kx * ky,
        "C21a": lam**3 * k2 * kx / 3.0,
        "C21b": lam**3 * k2 * ky / 3.0,
        "C30": 0.25 * lam**4 * k2 * k2,
    }
    unknown = [n for n in names if n not in terms]
    if unknown:
        raise ValueError(f"unknown aberration(s) {unknown}: choose from {ABERRATIONS}")
    scale = 2.0 * np.pi / lam
    return xp.stack([xp.broadcast_to(scale * terms[n], (shape[0], shape[1])) for n in names])


def aberrate(probe: Any, pixel_size: float, energy_ev: float, coefficients: dict[str, float]) -> Any:
    """``probe`` with the extra aberrations ``coefficients`` (metres, names of
    :data:`ABERRATIONS`): ψ' = F⁻¹[F ψ · exp(−i χ)]. Its power is unchanged."""
    xp = array_module(probe)
    names = tuple(coefficients)
    if not names:
        return probe.copy()
    basis = aberration_basis(tuple(probe.shape), pixel_size, energy_ev, names, xp)
    c = xp.asarray([float(coefficients[n]) for n in names])
    chi = (basis * c[:, None, None]).sum(axis=0)
    return ifft2(fft2(probe) * xp.exp(-1j * chi).astype(complex_of(probe.dtype)))


def make_probe(
    kind: ProbeKind,
    shape: tuple[int, int],
    pixel_size: float,
    energy_ev: float = 300e3,
    semiangle: float = 9.2e-3,
    defocus: float | None = None,
    cs: float = 0.0,
    total_intensity: float = 1.0,
    zones: int = 8,
    diameter: float | None = None,
    seed: int = 0,
    xp: ModuleType = np,
    precision: str = "single",
) -> Any:
    """A probe of one of the paper's designs (defaults: 300 keV, α = 9.2 mrad).

    * ``defocused``: plain aperture, Δf = 400 nm by default.
    * ``fzp``: Fresnel zone plate phase in the aperture, Δf = 600 nm by default.
    * ``randomized``: holographic random phase plate focused by the lens (Δf = 0 by default);
      ``diameter`` sets the speckle extent (default: half the window).
    """
    if kind not in ("defocused", "fzp", "randomized"):
        raise ValueError(f"unknown probe kind {kind!r}: choose defocused, fzp or randomized")
    if defocus is None:
        defocus = {"defocused": 400e-9, "fzp": 600e-9, "randomized": 0.0}[kind]
    field = aperture(shape, pixel_size, energy_ev, semiangle, xp).astype(np.complex128)
    if kind == "fzp":
        field = field * fresnel_zone_plate(shape, pixel_size, energy_ev, semiangle, zones, xp)
    elif kind == "randomized":
        extent = diameter if diameter is not None else 0.5 * min(shape) * pixel_size
        field = field * random_phase_plate(shape, pixel_size, extent, seed, xp)
    field = field * xp.exp(-1j * aberration_phase(shape, pixel_size, energy_ev, defocus, cs, xp))
    probe = xp.fft.fftshift(ifft2(field))
    return normalise_probe(probe, total_intensity).astype(complex_dtype(precision))


def normalise_probe(probe: Any, total_intensity: float) -> Any:
    """Scale so that Σ|ψ|² = total_intensity (the mean counts per pattern)."""
    xp = array_module(probe)
    (power,) = host_floats(xp.sum(xp.abs(probe) ** 2))
    if power <= 0:
        raise ValueError("probe has zero intensity")
    return probe * np.sqrt(total_intensity / power)


def scale_probe(probe: np.ndarray, frames: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Probe scaled to Σ|ψ|² = mean counts per pattern (the engines' convention), counting
    only valid detector pixels (``mask`` True, detector order) and the share of the probe's far
    field that falls on them: a probe from nominal lens settings gets its power from the first
    frames of a scan. Host arrays; the probe comes back unchanged when there are no counts."""
    valid = np.ones(frames.shape[1:], bool) if mask is None else np.asarray(mask, bool)
    counts = float(frames[:, valid].sum(dtype=np.float64)) / max(len(frames), 1)
    far = np.abs(np.fft.fftshift(np.fft.fft2(probe, norm="ortho"))) ** 2
    share = float(far[valid].sum() / max(far.sum(), 1e-30))
    power = float((np.abs(probe) ** 2).sum())
    if counts <= 0 or power <= 0:
        return probe
    return (probe * np.sqrt(counts / max(share, 1e-6) / power)).astype(probe.dtype)


def probe_area_mask(probe: Any, threshold: float = 0.01) -> Any:
    """Pixels where |ψ|² exceeds ``threshold`` × max — the paper's probe area (1 %)."""
    xp = array_module(probe)
    inten = xp.abs(probe) ** 2
    return inten > scalar_as(threshold * dev_float(inten.max()), inten.dtype)


def probe_diffraction_pattern(probe: Any) -> Any:
    """|F ψ|² in detector order (centred) — the vacuum pattern of this probe."""
    xp = array_module(probe)
    return xp.fft.fftshift(xp.abs(fft2(probe)) ** 2)
