"""From validated wire messages (protocols.messages) to the service's own scan description."""

from __future__ import annotations

import numpy as np
from cryoptycho.gpu.geometry import real_space_pixel_size
from cryoptycho.gpu.probes import make_probe
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.messages import Frames, ScanStart

from .session import ScanSpec

#: metadata key marking a probe built from a model: its power is set from the first frames
MODEL_PROBE = "_probe_from_model"


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
        probe=np.zeros((0, 0), np.complex64),
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


def frame_positions(msg: Frames, spec: ScanSpec) -> np.ndarray:
    """Positions (n, 2) m of a frames message: carried, or looked up in the declared scan."""
    if msg.positions_m is not None:
        return np.asarray(msg.positions_m, dtype=np.float64)
    if spec.positions_m is None:
        raise ProtocolError("positions_m", "positions", "this scan streams positions: send them with the frames",
                            msg.scan_id)
    idx = np.asarray(msg.indices, dtype=np.int64)
    if idx.size and idx.max() >= len(spec.positions_m):
        raise ProtocolError("indices", "index_range", f"index {int(idx.max())} ≥ {len(spec.positions_m)} declared "
                            "positions", msg.scan_id)
    return spec.positions_m[idx]
