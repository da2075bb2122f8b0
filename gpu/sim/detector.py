"""Detector model of the paper's eq. 3 (after Vulović et al. 2013, InSilicoTEM):

    I = F⁻¹[ F[ Poisson( F⁻¹[ F[I₀] · √DQE(q) ] ) ] · NTF(q) ]

so that the signal is transferred with √DQE·NTF = MTF and the shot noise with NTF.

K2-class counting detector at 300 keV (McMullan et al., Ultramicroscopy 147:156, 2014):
MTF(f) ≈ sinc(π f / 2) — the pixel aperture of a counting detector — with f the spatial
frequency in units of the *native* Nyquist frequency, DQE(0) ≈ 0.77 and a near-flat noise
transfer (counting removes the charge-sharing correlation), so DQE(f) = DQE(0)·MTF²/NTF².
The transfer functions are normalised to 1 at f = 0 so that the mean count equals the dose
(DQE(0) < 1 acts like a lower dose; pass ``dose × DQE(0)`` to model it).

Binning b native pixels into one frame pixel (per axis) maps frame frequency u (cycles per frame
pixel, |u| ≤ ½) to f = 2u/b: heavily binned ptychography frames see DQE ≈ NTF ≈ const, which is
why the reconstruction may ignore them (paper, p. 4), while unbinned cryo-EM images see the whole
curve. Outputs are integer counts (the NTF filter is rounded back to counts; at the binned
frequencies it deviates from 1 by < 1 %, so rounding is exact for ptychography frames).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..backend import array_module


@dataclass(frozen=True)
class DetectorModel:
    """A counting detector: DQE(f), NTF(f) in units of the native Nyquist frequency."""

    name: str = "k2"
    dqe0: float = 0.77
    ntf_nyquist: float = 1.0  #: NTF at Nyquist (1 = flat noise transfer), quadratic in f
    binning: int = 16  #: native pixels per frame pixel (per axis), e.g. 2048 → 128

    def __post_init__(self) -> None:
        if not 0 < self.dqe0 <= 1:
            raise ValueError(f"detector dqe0 must be in (0, 1], got {self.dqe0!r}")
        if self.binning < 1:
            raise ValueError(f"detector binning must be ≥ 1, got {self.binning!r}")
        if not self.ntf_nyquist > 0:
            raise ValueError(f"detector ntf_nyquist must be positive, got {self.ntf_nyquist!r}")

    def mtf(self, f: Any) -> Any:
        xp = array_module(f)
        return xp.sinc(f / 2.0)

    def ntf(self, f: Any) -> Any:
        return 1.0 + (self.ntf_nyquist - 1.0) * f * f

    def dqe(self, f: Any) -> Any:
        return self.dqe0 * self.mtf(f) ** 2 / self.ntf(f) ** 2

    def _native_frequency(self, shape: tuple[int, int], xp: ModuleType, binning: int) -> Any:
        uy = xp.fft.fftfreq(shape[0])[:, None]
        ux = xp.fft.fftfreq(shape[1])[None, :]
        return 2.0 * xp.sqrt(uy * uy + ux * ux) / binning

    def detect(
        self, intensity: Any, rng: np.random.Generator, binning: int | None = None
    ) -> Any:
        """Counts recorded for the expected ``intensity`` (..., Ny, Nx): eq. 3."""
        xp = array_module(intensity)
        b = self.binning if binning is None else binning
        f = self._native_frequency(intensity.shape[-2:], xp, b)
        signal = xp.sqrt(self.dqe(f) / self.dqe0)
        noise = self.ntf(f) / self.ntf(0.0)
        filtered = xp.fft.ifft2(xp.fft.fft2(intensity, axes=(-2, -1)) * signal, axes=(-2, -1)).real
        counts = poisson(xp.clip(filtered, 0.0, None), rng)
        if self.ntf_nyquist == 1.0:
            return counts
        out = xp.fft.ifft2(xp.fft.fft2(counts.astype(np.float64), axes=(-2, -1)) * noise, axes=(-2, -1)).real
        return xp.clip(xp.rint(out), 0, None).astype(counts.dtype)


def poisson(mean: Any, rng: np.random.Generator) -> Any:
    """Poisson samples (int64) of ``mean`` on its own backend (a host generator drives both,
    so results are reproducible from one seed whatever the backend)."""
    xp = array_module(mean)
    if xp is np:
        return rng.poisson(mean)
    seed = int(rng.integers(0, 2**63 - 1))
    return xp.random.RandomState(seed).poisson(mean)


#: named detectors: "k2" (K2 Summit class, counting) and "ideal" (Poisson only)
DETECTORS: dict[str, DetectorModel | None] = {"k2": DetectorModel(), "ideal": None}


def get_detector(name: str | DetectorModel | None) -> DetectorModel | None:
    if name is None or isinstance(name, DetectorModel):
        return name
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}: choose one of {sorted(DETECTORS)}")
    return DETECTORS[name]


def record(
    intensity: Any, detector: DetectorModel | None, rng: np.random.Generator,
    binning: int | None = None,
) -> Any:
    """Integer counts for ``intensity`` through ``detector`` (None: Poisson noise only)."""
    if detector is None:
        return poisson(intensity, rng)
    return detector.detect(intensity, rng, binning)
