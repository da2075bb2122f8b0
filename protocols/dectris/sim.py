"""Test senders: a series of frames in DECTRIS Stream V2 (CBOR) or V1 (JSON + binary) form.

The encoders write what a detector control unit writes (tags 55799 / 40 / typed arrays / 56500,
rationals on a 50 MHz time base, HDF5-framed bslz4 and lz4), so the decoders and any third-party
client (DECTRIS' reference ``client.py``, LiberTEM's ``libertem_dectris``) can be pointed at them.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import cbor2
import numpy as np
import zmq

from ..client import SocketClient
from .codec import bslz4_compress, lz4_hdf5_compress, v1_encode
from .schema import DTYPE_TYPED_ARRAY_TAGS

TIME_BASE = 50_000_000  #: ticks per second of the rationals, as on real detectors
V1_ENCODINGS = {"none": "<", "lz4": "lz4<", "bslz4": "bs{bits}-lz4<"}


@dataclass
class SimSeries:
    """One series to send. ``frames`` maps channel → (K, H, W) unsigned counts (a bare array is
    channel ``threshold_1``; V1 sends the first channel only)."""

    frames: Mapping[str, np.ndarray] | np.ndarray
    series_id: int = 1
    series_unique_id: str = "01SIMULATEDCRYOPTYCHO00001"
    compression: str = "bslz4"  #: bslz4 | lz4 | none
    energy_ev: float | None = 300e3
    beam_center_px: tuple[float, float] | None = None  #: (y, x); default the frame centre
    pixel_size_m: float = 100e-6
    detector_distance_m: float | None = None
    saturation_value: int | None = None
    pixel_mask: np.ndarray | None = None  #: (H, W) uint32, 0 = good (DECTRIS convention)
    user_data: Any = None  #: header appendix (V2 start user_data)
    image_user_data: Any = None  #: image appendix
    frame_time_s: float = 1e-3
    header_detail: str = "basic"  #: V1: all | basic | none (V2 sends the mask whenever given)
    image_ids: list[int] | None = None  #: ids to send, in order (default all); for gap tests
    extra_start: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.frames, np.ndarray):
            self.frames = {"threshold_1": self.frames}
        if not self.frames:
            raise ValueError("frames: give at least one channel")
        shapes = {a.shape for a in self.frames.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ValueError(f"frames: every channel must be (K, H, W) of one shape, got {shapes}")
        for name, a in self.frames.items():
            if a.dtype.name not in ("uint8", "uint16", "uint32"):
                raise ValueError(f"frames[{name!r}]: dtype must be uint8/16/32, got {a.dtype}")
        if self.compression not in V1_ENCODINGS:
            raise ValueError(f"compression must be one of {sorted(V1_ENCODINGS)}, got {self.compression!r}")
        if self.header_detail not in ("all", "basic", "none"):
            raise ValueError(f"header_detail must be all, basic or none, got {self.header_detail!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return next(iter(self.frames.values())).shape  # type: ignore[union-attr]

    @property
    def dtype(self) -> np.dtype:
        return next(iter(self.frames.values())).dtype  # type: ignore[union-attr]

    def ids(self) -> list[int]:
        return list(range(self.shape[0])) if self.image_ids is None else list(self.image_ids)

    def centre(self) -> tuple[float, float]:
        _, h, w = self.shape
        # the zero frequency of a centred (detector-order) frame is pixel (H//2, W//2)
        return self.beam_center_px if self.beam_center_px is not None else (h // 2, w // 2)


# --------------------------------------------------------------------------------- Stream V2


def _v2_array(array: np.ndarray, compression: str) -> cbor2.CBORTag:
    le = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    if compression == "bslz4":
        content: Any = cbor2.CBORTag(56500, ["bslz4", le.dtype.itemsize, bslz4_compress(le)])
    elif compression == "lz4":
        content = cbor2.CBORTag(56500, ["lz4", 0, lz4_hdf5_compress(le)])
    else:
        content = le.tobytes()
    typed = cbor2.CBORTag(DTYPE_TYPED_ARRAY_TAGS[array.dtype.name], content)
    return cbor2.CBORTag(40, [list(array.shape), typed])


def _v2(msg: dict[str, Any]) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(55799, msg))


def v2_messages(series: SimSeries) -> Iterator[bytes]:
    """start, images, end of ``series`` as Stream V2 messages."""
    k, h, w = series.shape
    cy, cx = series.centre()
    arm = datetime.now(timezone.utc)
    start: dict[str, Any] = {
        "type": "start",
        "series_id": series.series_id,
        "series_unique_id": series.series_unique_id,
        "arm_date": arm,
        "beam_center_x": float(cx),
        "beam_center_y": float(cy),
        "channels": list(series.frames),
        "count_time": series.frame_time_s,
        "detector_description": "cryoptycho simulated DECTRIS detector",
        "frame_time": series.frame_time_s,
        "image_dtype": series.dtype.name,
        "image_size_x": w,
        "image_size_y": h,
        "number_of_images": k,
        "pixel_size_x": series.pixel_size_m,
        "pixel_size_y": series.pixel_size_m,
        "pixel_mask_enabled": series.pixel_mask is not None,
    }
    if series.energy_ev is not None:
        start["incident_energy"] = float(series.energy_ev)
    if series.detector_distance_m is not None:
        start["detector_distance"] = series.detector_distance_m
    if series.saturation_value is not None:
        start["saturation_value"] = int(series.saturation_value)
    if series.pixel_mask is not None:
        mask = np.asarray(series.pixel_mask, dtype=np.uint32)
        start["pixel_mask"] = {c: _v2_array(mask, "none") for c in series.frames}
    if series.user_data is not None:
        start["user_data"] = series.user_data
    start.update(series.extra_start)
    yield _v2(start)
    ticks = round(series.frame_time_s * TIME_BASE)
    for i in series.ids():
        yield _v2({
            "type": "image",
            "series_id": series.series_id,
            "series_unique_id": series.series_unique_id,
            "image_id": i,
            "real_time": [ticks, TIME_BASE],
            "series_date": arm,
            "start_time": [i * ticks, TIME_BASE],
            "stop_time": [(i + 1) * ticks, TIME_BASE],
            "user_data": series.image_user_data,
            "data": {c: _v2_array(a[i], series.compression) for c, a in series.frames.items()},
        })
    yield _v2({"type": "end", "series_id": series.series_id, "series_unique_id": series.series_unique_id})


# --------------------------------------------------------------------------------- Stream V1


def _j(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def _appendix(value: Any) -> bytes:
    return value if isinstance(value, bytes) else (value if isinstance(value, str) else json.dumps(value)).encode()


def v1_messages(series: SimSeries, split_header: bool = False) -> Iterator[list[bytes]]:
    """Multipart messages of ``series`` in Stream V1; ``split_header`` sends the global header's
    parts as separate messages (as the LiberTEM simulator does)."""
    k, h, w = series.shape
    frames = next(iter(series.frames.values()))
    cy, cx = series.centre()
    bits = series.dtype.itemsize * 8
    config: dict[str, Any] = {
        "beam_center_x": cx, "beam_center_y": cy, "bit_depth_image": bits,
        "count_time": series.frame_time_s, "frame_time": series.frame_time_s,
        "description": "cryoptycho simulated DECTRIS detector", "nimages": 1, "ntrigger": k,
        "trigger_mode": "exte", "x_pixels_in_detector": w, "y_pixels_in_detector": h,
        "x_pixel_size": series.pixel_size_m, "y_pixel_size": series.pixel_size_m,
        "compression": {"bslz4": "bslz4", "lz4": "lz4", "none": "none"}[series.compression],
    }
    if series.energy_ev is not None:
        config["incident_energy"] = series.energy_ev
    if series.detector_distance_m is not None:
        config["detector_distance"] = series.detector_distance_m
    if series.saturation_value is not None:
        config["countrate_correction_count_cutoff"] = series.saturation_value
    config.update(series.extra_start)
    header = [_j({"htype": "dheader-1.0", "series": series.series_id, "header_detail": series.header_detail})]
    if series.header_detail != "none":
        header.append(_j(config))
    if series.header_detail == "all":
        mask = np.zeros((h, w), np.uint32) if series.pixel_mask is None else np.asarray(series.pixel_mask, np.uint32)
        header += [
            _j({"htype": "dflatfield-1.0", "shape": [w, h], "type": "float32"}),
            np.ones((h, w), "<f4").tobytes(),
            _j({"htype": "dpixelmask-1.0", "shape": [w, h], "type": "uint32"}),
            mask.astype("<u4").tobytes(),
            _j({"htype": "dcountrate_table-1.0", "shape": [2, 4], "type": "float32"}),
            np.zeros((4, 2), "<f4").tobytes(),
        ]
    if series.user_data is not None:
        header.append(_appendix(series.user_data))
    if split_header:
        for part in header:
            yield [part]
    else:
        yield header
    encoding = V1_ENCODINGS[series.compression].format(bits=bits)
    ns = round(series.frame_time_s * 1e9)
    for i in series.ids():
        blob = v1_encode(encoding, frames[i])
        parts = [
            _j({"htype": "dimage-1.0", "series": series.series_id, "frame": i,
                "hash": hashlib.md5(blob).hexdigest()}),
            _j({"htype": "dimage_d-1.0", "shape": [w, h], "type": series.dtype.name,
                "encoding": encoding, "size": len(blob)}),
            blob,
            _j({"htype": "dconfig-1.0", "start_time": i * ns, "stop_time": (i + 1) * ns, "real_time": ns}),
        ]
        if series.image_user_data is not None:
            parts.append(_appendix(series.image_user_data))
        yield parts
    yield [_j({"htype": "dseries_end-1.0", "series": series.series_id})]



# ------------------------------------------------------------------------------------ sender


class SimSender(SocketClient):
    """A PUSH socket bound like a detector control unit's; ``port=0`` picks a free port."""

    def __init__(self, version: int, port: int = 0, host: str = "127.0.0.1",
                 context: zmq.Context | None = None, sndhwm: int = 100000) -> None:
        if version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {version!r}")
        self.version = version
        # an own context, terminated by close(): only zmq_ctx_term waits for queued messages, so
        # a simulator that exits right after its last image still delivers the whole series
        self._own_context = context is None
        self._ctx = zmq.Context() if context is None else context
        self._socket = self._ctx.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        self._socket.setsockopt(zmq.LINGER, 2000)
        if port:
            self._socket.bind(f"tcp://{host}:{port}")
        else:
            self._socket.bind(f"tcp://{host}:*")
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port = int(self.endpoint.rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        """The source URL a receiver or the bridge connects to."""
        return f"dectris{self.version}://127.0.0.1:{self.port}"

    def send_raw(self, parts: list[bytes] | bytes) -> None:
        """One message as given (single part or multipart); for malformed-input tests."""
        if isinstance(parts, bytes):
            self._socket.send(parts)
        else:
            self._socket.send_multipart(parts)

    def send_series(self, series: SimSeries, split_header: bool = False,
                    stop: threading.Event | None = None, rate: float = 0.0) -> int:
        """Send a whole series (blocks until a receiver takes it), paced to ``rate`` images/s
        (0 = as fast as the receiver takes them); returns messages sent."""
        sent = 0
        messages = v2_messages(series) if self.version == 2 else v1_messages(series, split_header)
        t0 = time.perf_counter()
        for msg in messages:
            if stop is not None and stop.is_set():
                break
            if rate > 0 and sent > 1:
                # an absolute schedule, so jitter does not accumulate into drift
                delay = t0 + (sent - 1) / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            self.send_raw(msg)
            sent += 1
        return sent

    def close(self, linger_s: float | None = 2.0) -> None:
        """Close the socket, waiting up to ``linger_s`` for queued messages to leave (None: until
        they have, or their receiver is gone)."""
        self._socket.close(linger=-1 if linger_s is None else int(linger_s * 1000))
        if self._own_context and not self._ctx.closed:
            self._ctx.term()
