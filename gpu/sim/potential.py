"""Projected potentials of atomic models in vitreous ice, and transmission functions.

Potentials are computed in Fourier space on a periodic grid: for atoms at r_j the projected
potential is  V_z(r) = (1/A) Σ_q e^{2πi q·r} Σ_j w_j V̂_j(q),  V̂_j(q) = (h²/2πm₀e) f_e(|q|)
(Kirkland eq. 5.9 with the Lobato f_e). The structure factor Σ_j w_j e^{−2πi q·r_j} is exact
for sub-pixel positions and separable in y and x, so for a whole grid it is one matrix product
E_y · diag(w) · E_x per element (no delta-splatting, no aliasing) — on NumPy or CuPy alike. The
result is the band-limited ("infinite projection") potential of each slice.

Ice (the paper's model, after InSilicoTEM): a uniform layer of thickness t with mean inner
potential U_ice and an amplitude attenuation e^{−t/2Λ} from the inelastic mean free path Λ.
Each atom displaces a volume of ice (its mass × the protein partial specific volume), spread as
a Gaussian of width ``solvent_blur``: the displaced ice's potential is subtracted and the
absorption follows the mass thickness (protein is denser than ice, so it absorbs slightly more:
the "minimal transmission contrast" of the paper). U_ice defaults to the same parametrisation
applied to water at the density of vitreous ice, so that particle and solvent are consistent.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..backend import array_module, complex_dtype
from ..geometry import interaction_constant
from .elements import POTENTIAL_PREFACTOR_V_A2, fe0, scattering_factor
from .specimen import PARTIAL_SPECIFIC_VOLUME, AtomicModel

#: density of vitreous (low-density amorphous) ice, g/cm³
ICE_DENSITY = 0.94
#: inelastic mean free path of vitreous ice at 300 keV (m); ≈ 320–400 nm are measured
ICE_IMFP_300KEV = 350e-9
_AVOGADRO = 6.02214076e23
_WATER_G_MOL = 18.015
#: atoms per matrix-product chunk (bounds temporary memory to ~ Ny × chunk complex values)
_CHUNK = 4096


def water_mean_inner_potential(density_g_cm3: float = ICE_DENSITY) -> float:
    """Mean inner potential (V) of water at ``density`` from the Lobato neutral atoms:
    n · (h²/2πm₀e) · (f_e,O(0) + 2 f_e,H(0)) ≈ 4.6 V at 0.94 g/cm³."""
    n_per_a3 = density_g_cm3 / _WATER_G_MOL * _AVOGADRO * 1e-24
    return n_per_a3 * POTENTIAL_PREFACTOR_V_A2 * (fe0("O") + 2.0 * fe0("H"))


@dataclass(frozen=True)
class Grid:
    """A periodic real-space grid: pixel (i, j) sits at origin + (i, j)·pixel_size, (y, x) m."""

    shape: tuple[int, int]
    pixel_size: float
    origin: tuple[float, float]

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(self.shape) < 2:
            raise ValueError(f"grid shape must be two sizes ≥ 2, got {self.shape}")
        if not self.pixel_size > 0:
            raise ValueError(f"grid pixel_size must be positive, got {self.pixel_size!r}")

    def frequencies_a(self, xp: ModuleType) -> tuple[Any, Any]:
        """(qy, qx) in Å⁻¹ for a real FFT (qx non-negative)."""
        d = self.pixel_size * 1e10
        return xp.fft.fftfreq(self.shape[0], d), xp.fft.rfftfreq(self.shape[1], d)


def _structure_factors(
    yx_a: Any, weights: list[Any], qy: Any, qx: Any, xp: ModuleType
) -> list[Any]:
    """Σ_j w_j exp(−2πi q·r_j) on the (qy, qx) grid, for each weight vector in ``weights``."""
    out = [xp.zeros((qy.size, qx.size), dtype=np.complex128) for _ in weights]
    for start in range(0, yx_a.shape[0], _CHUNK):
        sl = slice(start, start + _CHUNK)
        ey = xp.exp(-2j * np.pi * qy[:, None] * yx_a[None, sl, 0])
        ex = xp.exp(-2j * np.pi * yx_a[sl, 1, None] * qx[None, :])
        for acc, w in zip(out, weights):
            acc += ey @ (w[sl, None] * ex)
    return out


def projected_maps(
    model: AtomicModel,
    grid: Grid,
    solvent_blur: float = 1.5e-10,
    solvent_mip: float = 0.0,
    xp: ModuleType = np,
) -> tuple[Any, Any]:
    """Projected potential (V·m) of the atoms in ``model``, minus ``solvent_mip`` × the
    displaced volume, and the displaced-solvent thickness map τ (m), on ``grid``."""
    if len(model) == 0:
        z = xp.zeros(grid.shape)
        return z, z.copy()
    qy, qx = grid.frequencies_a(xp)
    q2 = qy[:, None] ** 2 + qx[None, :] ** 2
    yx = xp.asarray((model.positions[:, 1:] - np.asarray(grid.origin)) * 1e10)
    occ = xp.asarray(model.occupancy)
    v_hat = xp.zeros(q2.shape, dtype=np.complex128)
    for el in np.unique(model.elements):
        sel = np.flatnonzero(model.elements == el)
        (s,) = _structure_factors(yx[sel], [occ[sel]], qy, qx, xp)
        v_hat += scattering_factor(str(el), q2, xp) * s
    s_h, s_vol = _structure_factors(
        yx, [occ * xp.asarray(model.hydrogens), occ * xp.asarray(model.volume * 1e30)], qy, qx, xp
    )
    blur = xp.exp(-2.0 * np.pi**2 * (solvent_blur * 1e10) ** 2 * q2)
    v_hat = POTENTIAL_PREFACTOR_V_A2 * (v_hat + scattering_factor("H", q2, xp) * s_h)
    v_hat -= solvent_mip * blur * s_vol
    # irfft2 divides by Ny·Nx; a Fourier series over a periodic cell divides by its area
    # Ny·Nx·d², so the two together divide by d² (Å²); then V·Å → V·m and Å → m.
    d2 = (grid.pixel_size * 1e10) ** 2
    potential = xp.fft.irfft2(v_hat, s=grid.shape) / d2 * 1e-10
    tau = xp.fft.irfft2(blur * s_vol, s=grid.shape) / d2 * 1e-10
    return potential, tau


@dataclass
class SlicedSpecimen:
    """Per-slice transmission functions plus the uniform ice factor.

    ``slices[s]`` multiplies the wave in slice s; the uniform ice (phase σ·U·t, attenuation
    e^{−t/2Λ}) is one complex constant ``ice_factor`` because a constant commutes with free
    propagation. ``thickness`` (m) is the spacing of the slices."""

    slices: Any  #: (S, Ny, Nx) complex
    ice_factor: complex
    thickness: float
    grid: Grid

    def projected(self) -> Any:
        """The thin-object transmission: the product of all slices and the ice factor."""
        xp = array_module(self.slices)
        return xp.prod(self.slices, axis=0) * self.ice_factor


@dataclass
class Specimen:
    """An atomic model embedded in a slab of vitreous ice (model centred in the slab)."""

    model: AtomicModel
    ice_thickness: float = 50e-9
    ice_mip: float | None = None  #: V; None = from the parametrisation (water at 0.94 g/cm³)
    ice_imfp: float = ICE_IMFP_300KEV
    solvent_blur: float = 1.5e-10

    def __post_init__(self) -> None:
        if self.ice_mip is None:
            self.ice_mip = water_mean_inner_potential()
        thick = float(self.model.extent[0]) if len(self.model) else 0.0
        if self.ice_thickness < 0 or not np.isfinite(self.ice_thickness):
            raise ValueError(f"ice_thickness must be ≥ 0 m, got {self.ice_thickness!r}")
        if 0 < self.ice_thickness < thick:
            raise ValueError(
                f"ice_thickness {self.ice_thickness * 1e9:.1f} nm is thinner than the particle "
                f"({thick * 1e9:.1f} nm along the beam)"
            )
        if self.ice_imfp <= 0:
            raise ValueError(f"ice_imfp must be positive, got {self.ice_imfp!r}")

    def _solvent_present(self) -> bool:
        return self.ice_thickness > 0

    def sliced(
        self, grid: Grid, energy: float, slice_thickness: float = 2e-9, xp: ModuleType = np,
        precision: str = "single",
    ) -> SlicedSpecimen:
        """Slices of ``slice_thickness`` through the particle (atoms binned by depth)."""
        if slice_thickness <= 0:
            raise ValueError(f"slice_thickness must be positive, got {slice_thickness!r}")
        sigma = interaction_constant(energy)
        mip = float(self.ice_mip) if self._solvent_present() else 0.0
        z = self.model.positions[:, 0]
        z0 = float(z.min()) if len(z) else 0.0
        n_slices = max(1, int(np.ceil((float(np.ptp(z)) + 1e-15) / slice_thickness))) if len(z) else 1
        which = np.clip(((z - z0) / slice_thickness).astype(int), 0, n_slices - 1)
        # protein is denser than ice: its extra mass thickness absorbs a little more
        density_ratio = (1.0 / PARTIAL_SPECIFIC_VOLUME) / ICE_DENSITY
        excess_mass = density_ratio - 1.0 if mip else density_ratio
        out = xp.empty((n_slices,) + grid.shape, dtype=complex_dtype(precision))
        for s in range(n_slices):
            sub = _subset(self.model, which == s)
            pot, tau = projected_maps(sub, grid, self.solvent_blur, mip, xp)
            out[s] = xp.exp(1j * sigma * pot - excess_mass * tau / (2.0 * self.ice_imfp))
        t = self.ice_thickness
        ice = complex(np.exp(1j * sigma * mip * t - t / (2.0 * self.ice_imfp)))
        return SlicedSpecimen(slices=out, ice_factor=ice, thickness=slice_thickness, grid=grid)

    def transmission(self, grid: Grid, energy: float, xp: ModuleType = np, precision: str = "single") -> Any:
        """The thin-object (projected) transmission function on ``grid``."""
        return self.sliced(grid, energy, slice_thickness=1.0, xp=xp, precision=precision).projected()


def _subset(model: AtomicModel, keep: np.ndarray) -> AtomicModel:
    return AtomicModel(
        positions=model.positions[keep],
        elements=model.elements[keep],
        occupancy=model.occupancy[keep],
        hydrogens=model.hydrogens[keep],
        volume=model.volume[keep],
        name=model.name,
    )
