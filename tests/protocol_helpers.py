"""Small valid messages for the protocol tests (each test breaks one thing)."""

from __future__ import annotations

import threading
from typing import Any

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


def run_dectris_source(sink: Any, messages: list[bytes], config: Any, *, version: int = 2,
                       url_version: int | None = None, max_series: int = 1, **source: Any) -> tuple[Any, Any]:
    """Push ``messages`` from a simulated DECTRIS detector (Stream ``version``) through a
    :class:`DectrisSource` into ``sink`` (a daemon's direct sink) until ``max_series`` series
    ended; ``url_version``: the source's URL names that Stream version instead of the sender's;
    ``source``: the source's keyword arguments (workers, batch, on_notice, processes).
    Returns (source, its stats)."""
    from cryoptycho.protocols.dectris.sim import SimSender
    from cryoptycho.protocols.dectris.source import DectrisSource

    with SimSender(version) as sender:
        url = sender.url if url_version is None else f"dectris{url_version}://127.0.0.1:{sender.port}"
        src = DectrisSource(url, config, **source)
        pusher = threading.Thread(target=lambda: [sender.send_raw(m) for m in messages], daemon=True)
        pusher.start()
        stop = threading.Event()
        timer = threading.Timer(300.0, stop.set)  # a safety net, not a timing assertion
        timer.start()
        try:
            stats = src.run(sink, stop, max_series=max_series)
        finally:
            timer.cancel()
        pusher.join(10)
    return src, stats
