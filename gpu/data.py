"""The in-memory ptychography dataset the engine consumes (file formats live in the daemon)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .geometry import real_space_pixel_size

log = logging.getLogger(__name__)

#: largest |y| or |x| of a probe position: beyond 1 cm is a unit error (the wire protocol's
#: limit ``max_abs_position_m`` says the same for live scans)
MAX_ABS_POSITION_M = 1e-2


@dataclass
class ProbeModel:
    """Parameters of a probe design (see :func:`cryoptycho.gpu.probes.make_probe`)."""

    kind: str = "defocused"
    semiangle: float = 9.2e-3  #: convergence semi-angle, rad
    defocus: float | None = None  #: m, > 0 underfocus; None = the design's default
    cs: float = 0.0  #: spherical aberration, m
    zones: int = 8
    diameter: float | None = None  #: randomized probe speckle extent, m
    seed: int = 0
    #: rms (per axis) of the source's image at the sample, m, as the instrument states it
    #: (partial spatial coherence); None = not stated, 0 = a point source
    source_size: float | None = None


def stated_source_size(probe_model: ProbeModel | None, metadata: Mapping[str, Any]) -> float | None:
    """The source size (rms at the sample, m) a scan states: its probe model's ``source_size``,
    else its metadata's ``source_size_m`` (where the daemon keeps a size stated on the wire);
    None when neither states one. Metadata is free-form: a value there that is not a length
    ≥ 0 is ignored with a warning, not an error that would stop the scan."""
    if probe_model is not None and probe_model.source_size is not None:
        return float(probe_model.source_size)
    value = metadata.get("source_size_m")
    if value is None:
        return None
    try:
        size = float(value)
    except (TypeError, ValueError):
        size = math.nan
    if not (math.isfinite(size) and size >= 0):
        log.warning("metadata source_size_m=%r is not a length ≥ 0 in metres: no source size stated", value)
        return None
    return size


@dataclass
class PtychoData:
    """Frames, positions and geometry of one scan.

    ``frames`` are counts in *detector order* (zero frequency at index M//2), in their own dtype.
    ``positions`` are (y, x) probe centres in metres. Exactly one of ``pixel_size`` (real-space,
    m) and ``detector_pixel_angle`` (rad) must be given.
    """

    frames: np.ndarray
    positions: np.ndarray
    energy: float
    pixel_size: float | None = None
    detector_pixel_angle: float | None = None
    probe: np.ndarray | None = None
    probe_model: ProbeModel | None = None
    mask: np.ndarray | None = None  #: (M, M) bool/uint8, True = valid pixel, detector order
    truth_object: np.ndarray | None = None
    truth_probe: np.ndarray | None = None
    truth_origin: tuple[float, float] | None = None  #: (y, x) m of truth_object pixel (0, 0)
    #: (K, 2) m, where the probe really was (a realistic simulation; ``positions`` are nominal)
    truth_positions: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (int(self.frames.shape[1]), int(self.frames.shape[2]))

    @property
    def stated_source_size(self) -> float | None:
        """The source size (rms at the sample, m) the scan states: its probe model's
        ``source_size``, else the ``source_size_m`` of its metadata (where the daemon keeps a
        size stated on the wire); None when it states none."""
        return stated_source_size(self.probe_model, self.metadata)

    @property
    def real_pixel_size(self) -> float:
        if self.pixel_size is not None:
            return float(self.pixel_size)
        assert self.detector_pixel_angle is not None
        return real_space_pixel_size(self.energy, self.frame_shape[0], self.detector_pixel_angle)

    def validate(self) -> None:
        """Raise ValueError naming the first problem found."""
        f = self.frames
        if not isinstance(f, np.ndarray) or f.ndim != 3:
            four_d = isinstance(f, np.ndarray) and f.ndim == 4
            raise ValueError(f"frames must be a (K, M, M) array, got shape {getattr(f, 'shape', None)}"
                             + (": a 4D-STEM (ny, nx, M, M) array is reshaped to (ny·nx, M, M), its positions "
                                "in the same row-major order" if four_d else ""))
        if f.shape[0] == 0:
            raise ValueError("dataset is empty: frames has 0 patterns")
        if f.shape[1] != f.shape[2]:
            raise ValueError(f"frames must be square, got {f.shape[1]}×{f.shape[2]}")
        if f.dtype.kind not in "uif":
            raise ValueError(f"frames must hold counts (integer or float), got dtype {f.dtype}")
        if f.dtype.kind == "f" and not np.all(np.isfinite(f)):
            raise ValueError("frames contain NaN or infinite counts")
        if f.dtype.kind in "if" and (f < 0).any():
            raise ValueError("frames contain negative counts")
        pos = np.asarray(self.positions)
        if pos.shape != (f.shape[0], 2):
            raise ValueError(
                f"positions must have shape (K, 2) = ({f.shape[0]}, 2) to match frames, got {pos.shape}"
            )
        if not np.all(np.isfinite(pos)):
            raise ValueError("positions contain NaN or infinite values")
        if pos.size and np.abs(pos).max() > MAX_ABS_POSITION_M:
            # an object canvas of 10^10 pixels failed as "array is too big" from NumPy
            raise ValueError(
                f"positions reach {np.abs(pos).max():.3g} m, beyond ±{MAX_ABS_POSITION_M} m: positions "
                "are in metres (were they given in Å, nm or pixels?)")
        if not np.isfinite(self.energy) or self.energy <= 0:
            raise ValueError(f"energy must be a positive number of eV, got {self.energy!r}")
        if (self.pixel_size is None) == (self.detector_pixel_angle is None):
            raise ValueError("give exactly one of pixel_size (m) and detector_pixel_angle (rad)")
        size = self.pixel_size if self.pixel_size is not None else self.detector_pixel_angle
        if not np.isfinite(size) or size <= 0:
            raise ValueError(f"pixel size / angle must be positive, got {size!r}")
        m = self.frame_shape
        if self.probe is not None and (tuple(self.probe.shape[-2:]) != m or self.probe.ndim not in (2, 3)
                                       or self.probe.shape[0] == 0):
            raise ValueError(f"probe shape {self.probe.shape} does not match frame shape {m} "
                             "(give (M, M), or (modes, M, M) for a mixed-state probe)")
        source = None if self.probe_model is None else self.probe_model.source_size
        if source is not None and not (math.isfinite(source) and source >= 0):
            raise ValueError(f"probe model source size must be a length ≥ 0 in metres, got {source!r}")
        if self.truth_positions is not None and np.shape(self.truth_positions) != pos.shape:
            raise ValueError(
                f"truth positions must have shape {pos.shape} like positions, got "
                f"{np.shape(self.truth_positions)}"
            )
        if self.mask is not None and tuple(np.shape(self.mask)) != m:
            raise ValueError(f"mask shape {np.shape(self.mask)} does not match frame shape {m}")
