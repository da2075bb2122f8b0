"""Replaying a recorded scan to a daemon: the reading side :func:`read_source` (dataset, spool or
result file → :class:`ReplaySource`, through storage/open.py and scan.py::start_from_data) and the sending side
:func:`replay` (source → Producer). Library code: `cryoptycho replay`, `cryoptycho demo` and
the benchmarks use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryoptycho.daemon.scan import start_from_data
from cryoptycho.daemon.storage.open import open_recorded
from cryoptycho.protocols.messages import ScanStart
from cryoptycho.protocols.producer import Producer, Receipt


@dataclass
class ReplaySource:
    """One scan ready to send: its declaration, frames in the wire dtype, and positions."""

    start: ScanStart
    frames: np.ndarray  #: (K, M, M)
    positions_m: np.ndarray  #: (K, 2)


def read_source(
    path: str | Path, scan_id: str | None = None, stream_positions: bool = False
) -> ReplaySource:
    """Read a recorded scan: a dataset, spool or result file (daemon/storage/open.py); spooled
    frames are sent in frame-index order."""
    path = Path(path)
    rec = open_recorded(path)
    data = rec.data
    frames = _wire_frames(data.frames)
    positions = np.asarray(data.positions, dtype=np.float64)
    start = start_from_data(
        data, scan_id or rec.scan_id or path.stem, frame_dtype=frames.dtype, stream_positions=stream_positions,
        options=rec.options, metadata={"replayed_from": str(path)},
    )
    return ReplaySource(start, frames, positions)


def _wire_frames(frames: np.ndarray) -> np.ndarray:
    """Counts in the narrowest wire dtype that holds them (frames are never rescaled)."""
    if frames.dtype.kind == "f":
        return frames.astype(np.float32, copy=False)
    top = int(frames.max()) if frames.size else 0
    if int(frames.min()) < 0:
        raise ValueError("frames contain negative counts")
    for dt in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dt).max:
            return frames.astype(dt, copy=False) if frames.dtype != dt else frames
    raise ValueError(f"counts up to {top} do not fit uint32")


def replay(source: ReplaySource, producer: Producer, rate: float = 0.0, batch: int = 64) -> Receipt:
    """Send the scan, paced to ``rate`` frames/s (0 = as fast as the daemon takes them).

    Returns the daemon's acknowledgement (``Producer.end_scan``): frames it holds and the rate
    from the first message to the acknowledgement of the last. Raises DeliveryError when the
    daemon does not hold every frame.
    """
    if batch < 1:
        raise ValueError("batch must be ≥ 1")
    start = source.start
    producer.start_scan(start)
    streamed = start.positions_streamed
    n = len(source.frames)
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        if rate > 0:
            # an absolute schedule, so per-batch jitter does not accumulate into drift
            delay = t0 + lo / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        producer.send_frames(
            source.frames[lo:hi],
            np.arange(lo, hi),
            positions_m=source.positions_m[lo:hi] if streamed else None,
        )
    return producer.end_scan(n)
