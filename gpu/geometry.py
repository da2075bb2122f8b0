"""Physical constants, sampling and the mapping from scan positions (metres) to object pixels.

See ``CONVENTIONS.md``: positions are (y, x) in metres of the *probe centre* in the sample
frame; object pixel (i, j) sits at ``origin + (i, j) * pixel_size``; the probe window of a
position starts at the (fractional) pixel ``(pos - origin) / pixel_size - M / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import array_module

# CODATA 2018
PLANCK = 6.62607015e-34
ELECTRON_MASS = 9.1093837015e-31
ELEMENTARY_CHARGE = 1.602176634e-19
SPEED_OF_LIGHT = 299792458.0


#: Beam energies of transmission electron microscopes, eV: below, the value is almost surely
#: in keV (``300`` for 300 keV) or another unit; above, in meV or a typo. Outside this range
#: the pixel size, hence the whole reconstruction, is wrong by the same factor.
PLAUSIBLE_ENERGY_EV = (5e3, 3e6)


def implausible_energy(energy_ev: float) -> str | None:
    """A warning naming the beam energy when it lies outside what electron microscopes use
    (:data:`PLAUSIBLE_ENERGY_EV`), else ``None``. A warning, not a refusal: the value is
    physically possible, just far more likely a unit slip (keV given as eV)."""
    low, high = PLAUSIBLE_ENERGY_EV
    if low <= energy_ev <= high:
        return None
    hint = f" (was {energy_ev * 1e3:g} eV = {energy_ev:g} keV meant?)" if energy_ev < low else ""
    return (f"energy_eV = {energy_ev:g} is {energy_ev / 1e3:g} keV, outside the {low / 1e3:g} keV – "
            f"{high / 1e6:g} MeV of electron microscopes{hint}: the pixel size and the "
            f"reconstruction scale with it")


def wavelength(energy_ev: float) -> float:
    """Relativistic electron wavelength in metres for a beam energy in eV (300 keV → 1.969 pm)."""
    if not np.isfinite(energy_ev) or energy_ev <= 0:
        raise ValueError(f"energy must be a positive number of eV, got {energy_ev!r}")
    e = ELEMENTARY_CHARGE * energy_ev
    m0c2 = ELECTRON_MASS * SPEED_OF_LIGHT**2
    return PLANCK * SPEED_OF_LIGHT / np.sqrt(e * (2.0 * m0c2 + e))


def interaction_constant(energy_ev: float) -> float:
    """σ in rad/(V·m): phase shift per projected potential (V·m), relativistic (Kirkland eq. 5.6)."""
    lam = wavelength(energy_ev)
    m0c2 = ELECTRON_MASS * SPEED_OF_LIGHT**2
    e = ELEMENTARY_CHARGE * energy_ev
    return 2.0 * np.pi / (lam * energy_ev) * (m0c2 + e) / (2.0 * m0c2 + e)


def real_space_pixel_size(
    energy_ev: float, frame_size: int, detector_pixel_angle: float
) -> float:
    """Real-space pixel size (m) from the detector's angular pixel size (rad): λ / (M·Δθ)."""
    if detector_pixel_angle <= 0 or frame_size <= 0:
        raise ValueError("detector pixel angle and frame size must be positive")
    return wavelength(energy_ev) / (frame_size * detector_pixel_angle)


@dataclass(frozen=True)
class ScanGeometry:
    """Where each probe window sits on the object canvas."""

    pixel_size: float  #: metres per object pixel
    origin: tuple[float, float]  #: (y, x) metres of object pixel (0, 0)
    object_shape: tuple[int, int]  #: (Ny, Nx)
    probe_shape: tuple[int, int]  #: (M, M)

    def to_pixels(self, positions_m: Any) -> Any:
        """Top-left corner (fractional pixels) of each probe window, shape (K, 2)."""
        xp = array_module(positions_m)
        pos = xp.asarray(positions_m, dtype=np.float64)
        origin = xp.asarray(self.origin, dtype=np.float64)
        half = xp.asarray(self.probe_shape, dtype=np.float64) / 2.0
        return (pos - origin) / self.pixel_size - half

    def to_metres(self, pixels: Any) -> Any:
        """Inverse of :meth:`to_pixels`."""
        xp = array_module(pixels)
        origin = xp.asarray(self.origin, dtype=np.float64)
        half = xp.asarray(self.probe_shape, dtype=np.float64) / 2.0
        return (xp.asarray(pixels, dtype=np.float64) + half) * self.pixel_size + origin

    def contains(self, positions_m: Any) -> Any:
        """Boolean per position: does its whole probe window (plus one pixel for sub-pixel
        shifts) lie inside the canvas?"""
        xp = array_module(positions_m)
        px = self.to_pixels(positions_m)
        hi = xp.asarray(self.object_shape, dtype=np.float64) - xp.asarray(
            self.probe_shape, dtype=np.float64
        )
        return xp.all((px >= 0) & (px <= hi - 1), axis=-1) if px.size else xp.zeros(0, bool)


def fit_geometry(
    positions_m: Any,
    pixel_size: float,
    probe_shape: tuple[int, int],
    margin_px: int = 2,
    extent_m: tuple[tuple[float, float], tuple[float, float]] | None = None,
) -> ScanGeometry:
    """A canvas that holds every probe window of ``positions_m`` (and of the declared field
    ``extent_m = ((ymin, ymax), (xmin, xmax))`` if given), with ``margin_px`` spare pixels."""
    if pixel_size <= 0 or not np.isfinite(pixel_size):
        raise ValueError(f"pixel_size must be a positive number of metres, got {pixel_size!r}")
    pos = np.asarray(positions_m, dtype=np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(pos)):
        raise ValueError("positions contain NaN or infinite values")
    if extent_m is not None:
        # the field's corners join the positions; with no position yet (a live scan's canvas
        # made from its declaration) the origin (0, 0) must not: a stage 5 µm from it made a
        # 62596² canvas (29 GiB) for a scan of 64 frames
        corners = [[extent_m[0][0], extent_m[1][0]], [extent_m[0][1], extent_m[1][1]]]
        pos = np.concatenate([pos, np.asarray(corners, dtype=np.float64)])
    lo = pos.min(axis=0) if len(pos) else np.zeros(2)
    hi = pos.max(axis=0) if len(pos) else np.zeros(2)
    m = np.asarray(probe_shape, dtype=np.float64)
    origin = lo - (m / 2.0 + margin_px) * pixel_size
    span = np.ceil((hi - lo) / pixel_size).astype(int) + np.asarray(probe_shape) + 2 * margin_px + 1
    return ScanGeometry(
        pixel_size=float(pixel_size),
        origin=(float(origin[0]), float(origin[1])),
        object_shape=(int(span[0]), int(span[1])),
        probe_shape=(int(probe_shape[0]), int(probe_shape[1])),
    )
