"""The message dataclasses of protocol v1 (import them from :mod:`.messages`).

Ingest (producer → daemon): :class:`ScanStart`, :class:`Frames`, :class:`ScanEnd`, :class:`Abort`.
Published (daemon → subscribers): :class:`ScanEvent`, :class:`Preview`, :class:`Metrics`,
:class:`Result`, :class:`ErrorEvent`. Control: :class:`Request`, :class:`Reply`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .errors import ProtocolError


@dataclass
class ProbeModelSpec:
    """A parametric probe: the fields of ``cryoptycho.gpu.data.ProbeModel``, units in the names."""

    kind: str = "defocused"
    semiangle_rad: float = 9.2e-3
    defocus_m: float | None = None  #: > 0 underfocus; None = the design's default
    cs_m: float = 0.0
    zones: int = 8
    diameter_m: float | None = None
    seed: int = 0
    #: rms (per axis) of the source's image at the sample, m, as the instrument states it
    #: (partial spatial coherence); None = not stated
    source_size_m: float | None = None


@dataclass
class RasterScan:
    """A raster: frame k = row i·nx + j (odd rows reversed when serpentine) sits at
    ``origin + R(rotation)·(i·step_y, j·step_x)``, R rotating (y, x) counter-clockwise."""

    shape: tuple[int, int]  #: (ny, nx)
    step_m: tuple[float, float]  #: (step_y, step_x)
    rotation_rad: float = 0.0
    serpentine: bool = False
    origin_m: tuple[float, float] = (0.0, 0.0)  #: (y, x) of frame 0

    def positions(self, indices: np.ndarray | None = None) -> np.ndarray:
        """(ny·nx, 2) float64 probe centres in acquisition order (or those of ``indices``)."""
        ny, nx = self.shape
        c, s = np.cos(self.rotation_rad), np.sin(self.rotation_rad)
        if indices is None:
            # rows × columns by broadcasting: a 1000×1000 raster in a few ms (a flat divmod of
            # every index took ~150 ms, most of it holding the interpreter lock)
            y = (np.arange(ny) * self.step_m[0])[:, None]
            x = np.broadcast_to(np.arange(nx) * self.step_m[1], (ny, nx))
            if self.serpentine:
                x = x.copy()
                x[1::2] = x[1::2, ::-1]
        else:
            i, j = np.divmod(np.asarray(indices, dtype=np.int64), nx)
            if self.serpentine:
                j = np.where(i % 2 == 1, nx - 1 - j, j)
            y, x = i * self.step_m[0], j * self.step_m[1]
        # counter-clockwise in the (x, y) plane: x' = c·x − s·y, y' = s·x + c·y
        out = np.empty((*np.broadcast_shapes(np.shape(y), np.shape(x)), 2))
        out[..., 0] = self.origin_m[0] + s * x + c * y
        out[..., 1] = self.origin_m[1] + c * x - s * y
        return out.reshape(-1, 2)


@dataclass
class ScanStart:
    """Opens a scan: geometry, probe, scan pattern, detector mask and option overrides."""

    type: ClassVar[str] = "scan_start"
    scan_id: str
    energy_eV: float
    frame_shape: tuple[int, int]
    frame_dtype: str  #: wire dtype of the frames: uint8 | uint16 | uint32 | float32
    expected_frames: int
    pixel_size_m: float | None = None  #: real-space pixel size; or detector_pixel_angle_rad
    detector_pixel_angle_rad: float | None = None
    probe: np.ndarray | None = None  #: (M, M) complex64 measured probe; or probe_model
    probe_model: ProbeModelSpec | None = None
    positions_m: np.ndarray | None = None  #: (K, 2) float64 declared positions; or raster
    raster: RasterScan | None = None  #: neither positions_m nor raster: frames carry positions
    mask: np.ndarray | None = None  #: (M, M) uint8, 1 = valid pixel, detector order
    options: dict[str, Any] = field(default_factory=dict)  #: ReconOptions overrides
    metadata: dict[str, Any] = field(default_factory=dict)
    time_s: float | None = None

    @property
    def positions_streamed(self) -> bool:
        """True when positions arrive with the frames."""
        return self.positions_m is None and self.raster is None

    def scan_positions(self) -> np.ndarray | None:
        """Every declared position (K, 2) in metres, or None when they are streamed."""
        if self.positions_m is not None:
            return np.asarray(self.positions_m, dtype=np.float64)
        return self.raster.positions() if self.raster is not None else None


@dataclass
class Frames:
    """A batch of frames: indices (n,) uint32, data (n, M, M) wire dtype, positions (n, 2) m."""

    type: ClassVar[str] = "frames"
    scan_id: str
    indices: np.ndarray
    data: np.ndarray
    positions_m: np.ndarray | None = None
    compression: str = "none"  #: codec of ``data`` on the wire ("none" | "lz4" | "bslz4")
    time_s: float | None = None
    #: received messages only: the ``bslz4`` part ``data`` was decoded from (a view of the
    #: received buffer), which the daemon's spool writes as HDF5 chunks as it is; None otherwise
    wire_data: Any = field(default=None, repr=False, compare=False)


@dataclass
class ScanEnd:
    type: ClassVar[str] = "scan_end"
    scan_id: str
    frame_count: int  #: frames the producer sent in total
    time_s: float | None = None


@dataclass
class Abort:
    type: ClassVar[str] = "abort"
    scan_id: str
    reason: str = ""
    time_s: float | None = None


@dataclass
class ScanEvent:
    """A scan's life: accepted, rejected (reason), acquiring, ended, finished, failed, aborted."""

    type: ClassVar[str] = "scan_event"
    scan_id: str
    event: str
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    time_s: float | None = None


@dataclass
class Preview:
    """Latest live images of a scan; viewers may skip stale ones."""

    type: ClassVar[str] = "preview"
    scan_id: str
    iteration: int
    frames_used: int
    pixel_size_m: float
    origin_m: tuple[float, float]  #: (y, x) of object pixel (0, 0)
    object_phase: np.ndarray  #: (Ny, Nx) float32, rad
    probe: np.ndarray  #: (M, M) complex64 (or (modes, M, M))
    object_amplitude: np.ndarray | None = None  #: (Ny, Nx) float32
    coverage: np.ndarray | None = None  #: (Ny, Nx) float32 illumination
    time_s: float | None = None


@dataclass
class Metrics:
    type: ClassVar[str] = "metrics"
    scan_id: str
    frames_received: int
    frames_used: int
    frames_dropped: int = 0
    iteration: int = 0
    loss: float | None = None
    resolution_m: float | None = None
    latency_s: float | None = None  #: frame arrival → preview published
    state: str = ""
    time_s: float | None = None


@dataclass
class Result:
    """The final reconstruction of a scan."""

    type: ClassVar[str] = "result"
    scan_id: str
    iterations: int
    pixel_size_m: float
    origin_m: tuple[float, float]
    object: np.ndarray  #: (Ny, Nx) complex64/complex128
    probe: np.ndarray  #: (M, M) or (modes, M, M) complex
    positions_m: np.ndarray  #: (K, 2) float64 (refined, if the engine refines them)
    loss: float | None = None
    files: dict[str, str] = field(default_factory=dict)  #: kind → path written by the daemon
    metadata: dict[str, Any] = field(default_factory=dict)
    time_s: float | None = None


@dataclass
class ErrorEvent:
    """A rejected message or a failure, published on topic ``error``."""

    type: ClassVar[str] = "error"
    field: str
    rule: str
    message: str
    scan_id: str | None = None
    time_s: float | None = None

    @classmethod
    def from_error(cls, exc: ProtocolError, time_s: float | None = None) -> ErrorEvent:
        return cls(exc.field, exc.rule, exc.message, exc.scan_id, time_s)


@dataclass
class Request:
    """Control request; arrays may sit anywhere in ``params``."""

    type: ClassVar[str] = "request"
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    time_s: float | None = None


@dataclass
class Reply:
    """Control reply; arrays may sit anywhere in ``result``."""

    type: ClassVar[str] = "reply"
    success: bool
    msg: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    time_s: float | None = None


Message = (
    ScanStart
    | Frames
    | ScanEnd
    | Abort
    | ScanEvent
    | Preview
    | Metrics
    | Result
    | ErrorEvent
    | Request
    | Reply
)
INGEST_TYPES = (ScanStart, Frames, ScanEnd, Abort)
EVENT_TYPES = (ScanEvent, Preview, Metrics, Result, ErrorEvent)
#: wire ``type`` → message class
CLASSES: dict[str, type] = {cls.type: cls for cls in (*INGEST_TYPES, *EVENT_TYPES, Request, Reply)}

__all__ = [
    "CLASSES",
    "EVENT_TYPES",
    "INGEST_TYPES",
    "Abort",
    "ErrorEvent",
    "Frames",
    "Message",
    "Metrics",
    "Preview",
    "ProbeModelSpec",
    "RasterScan",
    "Reply",
    "Request",
    "Result",
    "ScanEnd",
    "ScanEvent",
    "ScanStart",
]
