"""The one home of a scan's description and of every conversion between its representations.

A scan exists as the wire declaration (:class:`~cryoptycho.protocols.messages.ScanStart`), the
daemon's :class:`ScanSpec` (defined here), the engine's
:class:`~cryoptycho.gpu.engines.EngineSpec` (live) and :class:`~cryoptycho.gpu.data.PtychoData`
(offline), and the spool header that a spool or result file carries. Each field's mapping between
them is written here once, so a new scan field touches the protocol, this module, storage (only
when the field has its own dataset layout) and the engine.

Conversions:

* ScanStart → ScanSpec: :func:`spec_from_scan_start` (probe built from its model) and
  :func:`outline_from_scan_start` (cheap, for admission);
* ScanSpec → ScanStart: :func:`start_from_spec` (a recovered scan's declaration);
* ScanSpec → EngineSpec: :func:`engine_spec`; ScanSpec → PtychoData: :func:`data_from_spec`;
* ScanSpec ↔ spool header: :func:`spool_header` / :func:`spec_from_spool_header`;
* PtychoData (any recorded file, storage/open.py) → ScanStart: :func:`start_from_data` (replay).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryoptycho.gpu.data import PtychoData, stated_source_size
from cryoptycho.gpu.engines import EngineSpec
from cryoptycho.gpu.geometry import real_space_pixel_size
from cryoptycho.gpu.probes import make_probe, scale_probe
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.messages import ProbeModelSpec, ScanStart

#: metadata key marking a probe built from a model: its power is set from the first frames
MODEL_PROBE = "_probe_from_model"

#: metadata key of the source size a scan states (rms at the sample, m): from its probe model;
#: the spool and the result keep it with the metadata, the engine's ``source_size_m`` "auto"
#: uses it (``PtychoData.stated_source_size``, ``EngineSpec.source_size_m``)
SOURCE_SIZE = "source_size_m"

#: ScanSpec fields the spool keeps as HDF5 datasets under ``/scan`` (name in the file → field);
#: every other field travels in the JSON header (:func:`spool_header`)
SPOOL_ARRAYS = {"probe": "probe", "mask": "mask", "positions_declared_m": "positions_m"}


@dataclass
class ScanSpec:
    """Everything the engine needs to know about a scan, independent of the wire format."""

    scan_id: str
    frame_shape: tuple[int, int]
    frame_dtype: str
    pixel_size_m: float
    energy_eV: float
    probe: np.ndarray  #: (M, M) complex, sample plane, centred
    expected_frames: int | None = None
    positions_m: np.ndarray | None = None  #: (K, 2) if declared up front
    extent_m: tuple[tuple[float, float], tuple[float, float]] | None = None
    mask: np.ndarray | None = None  #: (M, M) bool, detector order, True = valid
    options: dict[str, Any] = field(default_factory=dict)  #: overrides merged on the service defaults
    metadata: dict[str, Any] = field(default_factory=dict)

    def field_px(self) -> tuple[int, int]:
        """Object canvas (pixels) the declared field needs: extent plus one probe window."""
        m = self.frame_shape
        if self.extent_m is None:
            return (2 * m[0], 2 * m[1])
        (y0, y1), (x0, x1) = self.extent_m
        return (
            int(np.ceil((y1 - y0) / self.pixel_size_m)) + m[0] + 5,
            int(np.ceil((x1 - x0) / self.pixel_size_m)) + m[1] + 5,
        )


# ------------------------------------------------------------------------- wire → daemon → wire


def outline_from_scan_start(msg: ScanStart) -> ScanSpec:
    """The declared scan without its probe and positions (an empty probe, never given to an
    engine): enough for the admission checks (shape, count, extent, options), and cheap whatever
    the scan's size, so a scan that cannot fit is refused before anything large is built."""
    shape = (int(msg.frame_shape[0]), int(msg.frame_shape[1]))
    return ScanSpec(
        scan_id=msg.scan_id,
        frame_shape=shape,
        frame_dtype=str(msg.frame_dtype),
        pixel_size_m=_pixel_size(msg, shape),
        energy_eV=float(msg.energy_eV),
        # empty, but for its modes: how many the engine will run is part of the declaration
        probe=np.zeros((0, 0) if msg.probe is None or np.ndim(msg.probe) != 3 else (len(msg.probe), 0, 0),
                       np.complex64),
        expected_frames=int(msg.expected_frames),
        extent_m=declared_extent(msg),
        options=dict(msg.options),
        metadata=dict(msg.metadata),
    )


def declared_extent(msg: ScanStart) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """((y0, y1), (x0, x1)) of the declared positions; a raster's from its four corners (an
    affine grid reaches farthest there), not from all ny·nx positions."""
    if msg.raster is not None:
        ny, nx = msg.raster.shape
        pos = msg.raster.positions(np.array([0, nx - 1, (ny - 1) * nx, ny * nx - 1]))
    elif msg.positions_m is not None and len(msg.positions_m):
        pos = np.asarray(msg.positions_m, dtype=np.float64)
    else:
        return None
    lo, hi = pos.min(axis=0), pos.max(axis=0)
    return ((float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1])))


def _pixel_size(msg: ScanStart, shape: tuple[int, int]) -> float:
    if msg.pixel_size_m is not None:
        return float(msg.pixel_size_m)
    if msg.detector_pixel_angle_rad is not None:
        return real_space_pixel_size(msg.energy_eV, shape[0], msg.detector_pixel_angle_rad)
    raise ProtocolError("pixel_size_m", "geometry", "give pixel_size_m or detector_pixel_angle_rad", msg.scan_id)


def spec_from_scan_start(msg: ScanStart) -> ScanSpec:
    """The engine-facing description of a declared scan (probe built from its model if needed)."""
    shape = (int(msg.frame_shape[0]), int(msg.frame_shape[1]))
    pixel_size = _pixel_size(msg, shape)
    metadata = dict(msg.metadata)
    if msg.raster is not None:  # the grid shape goes into the spool and result (h5format.nav_shape_of)
        metadata.update(nav_shape=list(msg.raster.shape), raster_serpentine=bool(msg.raster.serpentine))
    if msg.probe is not None:
        probe = np.asarray(msg.probe, dtype=np.complex64)
    else:
        pm = msg.probe_model
        if pm is None:
            raise ProtocolError("probe", "probe", "give a measured probe or a probe_model", msg.scan_id)
        try:
            probe = make_probe(
                pm.kind,  # type: ignore[arg-type]
                shape, pixel_size, energy_ev=msg.energy_eV, semiangle=pm.semiangle_rad,
                defocus=pm.defocus_m, cs=pm.cs_m, zones=pm.zones, diameter=pm.diameter_m, seed=pm.seed,
            )
        except ValueError as exc:  # e.g. a semi-angle beyond what the pixel size samples
            raise ProtocolError("probe_model", "probe_model", str(exc), msg.scan_id) from None
        metadata[MODEL_PROBE] = True
        if pm.source_size_m is not None:  # the engine's "auto" source size (gpu/data.py)
            metadata[SOURCE_SIZE] = float(pm.source_size_m)
    positions = msg.scan_positions()
    extent = declared_extent(msg)
    return ScanSpec(
        scan_id=msg.scan_id,
        frame_shape=shape,
        frame_dtype=str(msg.frame_dtype),
        pixel_size_m=pixel_size,
        energy_eV=float(msg.energy_eV),
        probe=np.asarray(probe, dtype=np.complex64),
        expected_frames=int(msg.expected_frames),
        positions_m=positions,
        extent_m=extent,
        mask=None if msg.mask is None else np.asarray(msg.mask).astype(bool),
        options=dict(msg.options),
        metadata=metadata,
    )


def start_from_spec(spec: ScanSpec) -> ScanStart:
    """A ScanStart equivalent to a recovered scan's spooled description (for frame validation)."""
    return ScanStart(
        scan_id=spec.scan_id, energy_eV=spec.energy_eV, frame_shape=spec.frame_shape,
        frame_dtype=spec.frame_dtype, expected_frames=spec.expected_frames or 1,
        pixel_size_m=spec.pixel_size_m, probe=spec.probe.astype(np.complex64),
        positions_m=spec.positions_m, mask=None if spec.mask is None else spec.mask.astype(np.uint8),
        options=spec.options, metadata=spec.metadata,
    )


# ---------------------------------------------------------------------------- daemon → engine


def engine_spec(spec: ScanSpec, first: np.ndarray | None = None) -> EngineSpec:
    """The engine's view of the scan. A probe from a model (nominal lens settings) gets its
    power from the ``first`` frames (gpu/probes.py::scale_probe); ``spec`` itself is not
    changed (the manager thread owns the session)."""
    probe = spec.probe
    if first is not None and spec.metadata.get(MODEL_PROBE):
        probe = scale_probe(probe, first, spec.mask)
    return EngineSpec(
        frame_shape=spec.frame_shape,
        frame_dtype=np.dtype(spec.frame_dtype),
        pixel_size_m=spec.pixel_size_m,
        probe=probe,
        mask=spec.mask,
        extent_m=spec.extent_m,
        expected_frames=spec.expected_frames,
        energy_eV=spec.energy_eV,
        probe_from_model=bool(spec.metadata.get(MODEL_PROBE)),
        source_size_m=stated_source_size(None, spec.metadata),
    )



def data_from_spec(
    spec: ScanSpec, frames: np.ndarray, positions_m: np.ndarray, metadata: Mapping[str, Any] | None = None
) -> PtychoData:
    """The offline engine's view of a spooled scan: its frames and measured positions with the
    spec's geometry and probe; ``metadata`` is added to the spec's own."""
    return PtychoData(
        frames=np.asarray(frames),
        positions=np.asarray(positions_m, dtype=np.float64),
        energy=spec.energy_eV, pixel_size=spec.pixel_size_m,
        probe=np.asarray(spec.probe, np.complex64), mask=spec.mask,
        metadata={**spec.metadata, "scan_id": spec.scan_id, **(metadata or {})},
    )


# ------------------------------------------------------------------------- daemon ↔ spool header


def spool_header(spec: ScanSpec) -> tuple[str, dict[str, np.ndarray]]:
    """The spool's description of a scan: a JSON header and the arrays stored beside it, keyed
    by their dataset names under ``/scan`` (absent ones left out)."""
    head = json.dumps(
        {
            "scan_id": spec.scan_id,
            "frame_shape": list(spec.frame_shape),
            "frame_dtype": spec.frame_dtype,
            "pixel_size_m": spec.pixel_size_m,
            "energy_eV": spec.energy_eV,
            "expected_frames": spec.expected_frames,
            "extent_m": spec.extent_m,
            "options": spec.options,
            "metadata": spec.metadata,
        }
    )
    arrays = {"probe": np.asarray(spec.probe, dtype=np.complex64)}
    if spec.mask is not None:
        arrays["mask"] = np.asarray(spec.mask, dtype=np.uint8)
    if spec.positions_m is not None:
        arrays["positions_declared_m"] = np.asarray(spec.positions_m, dtype=np.float64)
    return head, arrays


def spec_from_spool_header(header: str, arrays: Mapping[str, np.ndarray]) -> ScanSpec:
    """The ScanSpec a spool header (:func:`spool_header`) describes; ``arrays`` maps the
    dataset names under ``/scan`` to their contents (the optional ones may be absent)."""
    head: dict[str, Any] = json.loads(header)
    ext = head.get("extent_m")
    mask = arrays.get("mask")
    return ScanSpec(
        scan_id=head["scan_id"],
        frame_shape=tuple(head["frame_shape"]),  # type: ignore[arg-type]
        frame_dtype=head["frame_dtype"],
        pixel_size_m=float(head["pixel_size_m"]),
        energy_eV=float(head["energy_eV"]),
        probe=arrays["probe"],
        expected_frames=head.get("expected_frames"),
        positions_m=arrays.get("positions_declared_m"),
        extent_m=(tuple(ext[0]), tuple(ext[1])) if ext else None,  # type: ignore[arg-type]
        mask=None if mask is None else np.asarray(mask).astype(bool),
        options=head.get("options") or {},
        metadata=head.get("metadata") or {},
    )


# ---------------------------------------------------------------------- recorded file → wire


def start_from_data(
    data: PtychoData,
    scan_id: str,
    *,
    frame_dtype: np.dtype | str | None = None,
    stream_positions: bool = False,
    options: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> ScanStart:
    """The declaration that sends a recorded or simulated scan to a daemon: its geometry, its
    probe (measured, or the model when only a model is known), mask and positions (left out when
    they are streamed with the frames); ``metadata`` is added to the data's own."""
    pm = data.probe_model
    return ScanStart(
        scan_id=scan_id,
        energy_eV=data.energy,
        frame_shape=data.frame_shape,
        frame_dtype=str(frame_dtype if frame_dtype is not None else data.frames.dtype),
        expected_frames=len(data.frames),
        pixel_size_m=data.pixel_size,
        detector_pixel_angle_rad=data.detector_pixel_angle,
        probe=None if data.probe is None else np.asarray(data.probe, np.complex64),
        probe_model=None
        if pm is None or data.probe is not None
        else ProbeModelSpec(pm.kind, pm.semiangle, pm.defocus, pm.cs, pm.zones, pm.diameter, pm.seed,
                            pm.source_size),
        positions_m=None if stream_positions else np.asarray(data.positions, dtype=np.float64),
        mask=None if data.mask is None else np.asarray(data.mask, np.uint8),
        options=dict(options or {}),
        metadata={**data.metadata, **(metadata or {})},
    )
