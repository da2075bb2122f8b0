"""Small valid messages for the protocol tests (each test breaks one thing)."""

from __future__ import annotations

import numpy as np
from cryoptycho.protocols.messages import Frames, ProbeModelSpec, RasterScan, ScanStart


def scan_fields(**over) -> dict:
    """The fields of a small raster scan (12 uint16 frames of 16×16), ``over`` replacing some."""
    fields = {
        "scan_id": "s1",
        "energy_eV": 300e3,
        "frame_shape": (16, 16),
        "frame_dtype": "uint16",
        "expected_frames": 12,
        "pixel_size_m": 1e-10,
        "probe_model": ProbeModelSpec(),
        "raster": RasterScan((3, 4), (2e-10, 2e-10)),
    }
    fields.update(over)
    return fields


def scan_start(**over) -> ScanStart:
    return ScanStart(**scan_fields(**over))


def frames(n: int = 4, m: int = 16, dtype=np.uint16, first: int = 0, **over) -> Frames:
    rng = np.random.default_rng(n * m)
    fields = {
        "scan_id": "s1",
        "indices": np.arange(first, first + n, dtype=np.uint32),
        "data": rng.poisson(0.3, (n, m, m)).astype(dtype),
    }
    fields.update(over)
    return Frames(**fields)
