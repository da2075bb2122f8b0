"""Conventional cryo-EM images for comparison (paper eq. 2): I(r) = |F⁻¹[F[ψ_exit](q) · CTF(q)]|².

CTF(q) = exp(−iχ(q)) · Z(q),  χ = πλΔf q² + π/2 Cs λ³ q⁴ (Δf > 0 underfocus, as for probes).
* ``defocus`` mode: Δf = 1.6 µm (paper), no phase plate — contrast transfer sin χ, with zeros
  at χ = nπ.
* ``phase-plate`` mode: a Zernike phase plate shifts the unscattered beam (|q| below the cut-on)
  by π/2, so a weak phase φ appears in the intensity as 1 + 2φ; Δf = 50 nm (paper).
Partial coherence envelopes are not modelled (the paper does not state them). The image is
recorded at the same dose and detector as ptychography, unbinned (the whole DQE curve applies).
The reference for FRC scoring, as in the paper, is the noiseless, aberration-free phase-plate
image (:func:`reference_image`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

from ..backend import array_module, fft2, ifft2, to_numpy
from ..geometry import wavelength
from .detector import DetectorModel, get_detector, record
from .potential import Grid, SlicedSpecimen, Specimen
from .ptycho import fresnel_propagator

ImagingMode = Literal["defocus", "phase-plate"]
DEFAULT_DEFOCUS = {"defocus": 1.6e-6, "phase-plate": 50e-9}


def transfer_function(
    shape: tuple[int, int], pixel_size: float, energy: float, defocus: float, cs: float = 0.0,
    phase_plate: bool = False, cut_on: float | None = None, xp: ModuleType = np,
) -> Any:
    """CTF(q) on the FFT-ordered grid. ``cut_on`` (1/m): radius of the phase plate's central
    spot; default one reciprocal pixel, so only the unscattered beam is shifted."""
    lam = wavelength(energy)
    qy = xp.fft.fftfreq(shape[0], pixel_size)[:, None]
    qx = xp.fft.fftfreq(shape[1], pixel_size)[None, :]
    q2 = qy * qy + qx * qx
    chi = np.pi * lam * defocus * q2 + 0.5 * np.pi * cs * lam**3 * q2 * q2
    ctf = xp.exp(-1j * chi)
    if phase_plate:
        radius = cut_on if cut_on is not None else 0.5 / (max(shape) * pixel_size)
        ctf = xp.where(q2 <= radius * radius, ctf * 1j, ctf)
    return ctf


def exit_wave(sliced: SlicedSpecimen, energy: float, multislice: bool = True) -> Any:
    """Plane-wave exit wave of the specimen, referred to the particle's middle plane."""
    xp = array_module(sliced.slices)
    n = sliced.slices.shape[0]
    if not multislice or n == 1:
        return sliced.projected()
    g = sliced.grid
    prop = fresnel_propagator(g.shape, g.pixel_size, energy, sliced.thickness, xp)
    wave = xp.ones(g.shape, dtype=sliced.slices.dtype) * sliced.ice_factor
    for s in range(n):
        wave = wave * sliced.slices[s]
        if s < n - 1:
            wave = ifft2(fft2(wave) * prop)
    back = fresnel_propagator(g.shape, g.pixel_size, energy, -0.5 * sliced.thickness * (n - 1), xp)
    return ifft2(fft2(wave) * back)


def image_intensity(wave: Any, ctf: Any) -> Any:
    """Eq. 2: |F⁻¹[F[ψ] · CTF]|² (relative to a unit incident beam)."""
    xp = array_module(wave)
    return xp.abs(ifft2(fft2(wave) * ctf)) ** 2


@dataclass
class CryoEMImage:
    image: np.ndarray  #: counts (or expected counts when noiseless)
    pixel_size: float
    origin: tuple[float, float]
    mode: str
    defocus: float
    dose: float
    truth_object: np.ndarray


def simulate_cryoem(
    specimen: Specimen,
    grid: Grid,
    dose: float = 20.0,
    mode: ImagingMode = "defocus",
    energy: float = 300e3,
    defocus: float | None = None,
    cs: float = 2.7e-3,
    detector: str | DetectorModel | None = "k2",
    seed: int = 0,
    noise: bool = True,
    slice_thickness: float = 2e-9,
    sliced: SlicedSpecimen | None = None,
) -> CryoEMImage:
    """A cryo-EM image of ``specimen`` on ``grid`` (unbinned detector: pixel = grid pixel).
    Pass ``sliced`` to reuse a specimen already sliced on this grid."""
    if mode not in DEFAULT_DEFOCUS:
        raise ValueError(f"unknown imaging mode {mode!r}: choose defocus or phase-plate")
    if not dose > 0:
        raise ValueError(f"dose must be positive e⁻/Å², got {dose!r}")
    df = DEFAULT_DEFOCUS[mode] if defocus is None else defocus
    sl = sliced if sliced is not None else specimen.sliced(grid, energy, slice_thickness)
    wave = exit_wave(sl, energy)
    ctf = transfer_function(grid.shape, grid.pixel_size, energy, df, cs, mode == "phase-plate")
    counts_per_pixel = dose * 1e20 * grid.pixel_size**2
    expected = image_intensity(wave, ctf) * counts_per_pixel
    det = get_detector(detector)
    img = record(expected, det, np.random.default_rng(seed), binning=1) if noise else expected
    return CryoEMImage(
        image=to_numpy(img).astype(np.float32),
        pixel_size=grid.pixel_size,
        origin=grid.origin,
        mode=mode,
        defocus=df,
        dose=dose,
        truth_object=to_numpy(sl.projected()).astype(np.complex64),
    )


def reference_image(specimen: Specimen, grid: Grid, energy: float = 300e3, sliced: SlicedSpecimen | None = None) -> np.ndarray:
    """The noiseless, aberration-free Zernike phase-plate image (unit incident intensity)."""
    sl = sliced if sliced is not None else specimen.sliced(grid, energy)
    ctf = transfer_function(grid.shape, grid.pixel_size, energy, 0.0, 0.0, phase_plate=True)
    return to_numpy(image_intensity(exit_wave(sl, energy), ctf)).astype(np.float64)
