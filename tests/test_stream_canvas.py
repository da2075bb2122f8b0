"""The live canvas: a declared field is fitted once; only positions truly outside it grow it."""

from __future__ import annotations

import numpy as np
from cryoptycho.gpu.backend import backend_name
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.stream import StreamingReconstructor
from daemon_support import synthetic_scan


def _engine(xp, scan, extent):
    return StreamingReconstructor(frame_shape=scan.frames.shape[1:], frame_dtype=np.uint16, pixel_size=1e-10,
                                  probe=scan.probe, options=ReconOptions(backend=backend_name(xp)), extent_m=extent,
                                  expected_frames=len(scan.frames))


def test_declared_field_is_not_grown_by_its_own_positions(xp):
    scan = synthetic_scan(n_side=16)
    lo, hi = scan.positions.min(axis=0), scan.positions.max(axis=0)
    engine = _engine(xp, scan, ((lo[0], hi[0]), (lo[1], hi[1])))
    declared = engine.geometry.object_shape
    for i in range(0, len(scan.frames), 16):  # row by row, as a raster scan arrives
        engine.add_frames(scan.frames[i:i + 16], scan.positions[i:i + 16])
    assert engine.geometry.object_shape == declared == scan.geometry.object_shape


def test_a_position_outside_the_declared_field_grows_the_canvas(xp):
    scan = synthetic_scan(n_side=8)
    lo, hi = scan.positions.min(axis=0), scan.positions.max(axis=0)
    engine = _engine(xp, scan, ((lo[0], hi[0]), (lo[1], hi[1])))
    ny, nx = engine.geometry.object_shape
    outside = scan.positions[:1] + np.array([[0.0, (hi[1] - lo[1]) + 5e-10]])
    engine.add_frames(scan.frames[:1], outside)
    assert engine.geometry.object_shape[0] == ny and engine.geometry.object_shape[1] > nx
