"""Experimental errors of a realistic virtual experiment: the microscope does not do what the
user asked for.

A real scan knows its probe from nominal lens settings (defocus and two-fold astigmatism off by
tens of nanometres) and its positions from the nominal scan pattern (a few per cent of affine
scan-coil error, sub-ångström jitter, slow drift). :class:`ExperimentErrors` describes such
errors; the simulation records frames with the *true* probe at the *true* positions, while the
dataset gives the user the nominal ones (the truth is kept under ``/truth``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..probes import aberrate, source_modes


@dataclass(frozen=True)
class ExperimentErrors:
    """True − nominal, for the probe and the scan."""

    defocus: float = 0.0  #: m, extra defocus (> 0 more underfocus; C10 of probes.ABERRATIONS)
    astigmatism: float = 0.0  #: m, two-fold astigmatism |C12|
    astigmatism_angle: float = 0.0  #: rad, azimuth of the astigmatism (C12a = |C12| cos 2θ)
    scale: tuple[float, float] = (0.0, 0.0)  #: relative scan scale error along (y, x)
    rotation: float = 0.0  #: rad, scan rotation
    shear: float = 0.0  #: x displacement per unit y of the scan (scan-coil non-orthogonality)
    jitter: float = 0.0  #: m, rms per-axis random displacement of each position
    drift: tuple[float, float] = (0.0, 0.0)  #: m, (y, x) drift accumulated over the whole scan
    seed: int = 0  #: random jitter
    source_size: float = 0.0  #: m, rms (per axis) of the Gaussian source image at the sample
    source_modes: int = 3  #: incoherent probe modes recorded for a finite source

    @classmethod
    def realistic(cls, seed: int = 0) -> ExperimentErrors:
        """A typical cryo scan's errors: 20 nm defocus and 10 nm astigmatism off; 2 % / −1 %
        scale, 0.5° rotation, 1 % shear; 0.3 Å jitter; 1 Å drift over the scan."""
        return cls(defocus=20e-9, astigmatism=10e-9, astigmatism_angle=np.deg2rad(30.0),
                   scale=(0.02, -0.01), rotation=np.deg2rad(0.5), shear=0.01, jitter=0.3e-10,
                   drift=(1.0e-10, -0.6e-10), seed=seed)

    @property
    def probe_errors(self) -> dict[str, float]:
        """The probe's aberration errors as coefficients of ``probes.aberrate``."""
        out = {}
        if self.defocus:
            out["C10"] = float(self.defocus)
        if self.astigmatism:
            out["C12a"] = float(self.astigmatism * np.cos(2 * self.astigmatism_angle))
            out["C12b"] = float(self.astigmatism * np.sin(2 * self.astigmatism_angle))
        return out

    def affine(self) -> np.ndarray:
        """The 2×2 matrix acting on (y, x) nominal offsets from the scan centre."""
        c, s = np.cos(self.rotation), np.sin(self.rotation)
        rot = np.array([[c, s], [-s, c]])
        scale_shear = np.array([[1.0 + self.scale[0], 0.0], [self.shear, 1.0 + self.scale[1]]])
        return rot @ scale_shear

    def true_positions(self, nominal: np.ndarray) -> np.ndarray:
        """Where the probe really was for each nominal position (K, 2) m, in acquisition order."""
        nominal = np.asarray(nominal, dtype=np.float64).reshape(-1, 2)
        centre = nominal.mean(axis=0)
        out = (nominal - centre) @ self.affine().T + centre
        k = len(nominal)
        t = np.arange(k) / max(k - 1, 1)
        out += t[:, None] * np.asarray(self.drift, dtype=np.float64)[None, :]
        if self.jitter:
            rng = np.random.default_rng([int(self.seed), 14])
            out += rng.normal(0.0, self.jitter, size=out.shape)
        return out

    def true_probe(self, probe: Any, pixel_size: float, energy: float) -> Any:
        """The probe the microscope really formed, from the nominal one."""
        return aberrate(probe, pixel_size, energy, self.probe_errors)

    def true_modes(self, probe: Any, pixel_size: float, energy: float) -> Any:
        """The true probe as incoherent modes (``source_modes``, M, M) of a finite source
        (probes.source_modes), or the (M, M) true probe when the source is a point."""
        true = self.true_probe(probe, pixel_size, energy)
        if not self.source_size:
            return true
        return source_modes(true, pixel_size, float(self.source_size), int(self.source_modes))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"] = list(self.scale)
        d["drift"] = list(self.drift)
        return d

    @property
    def any(self) -> bool:
        return self != ExperimentErrors(seed=self.seed)
