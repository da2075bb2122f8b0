"""Stream V1 decoder: JSON and binary ZeroMQ parts, fed one at a time (format notes: README.md)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction
from typing import Any

import numpy as np

from .bounds import load_json
from .codec import v1_decode
from .schema import (
    DecodeError,
    DectrisError,
    Image,
    Message,
    SeriesEnd,
    SeriesStart,
    WrongStreamVersion,
    parse_dtype,
)

V1_CHANNEL = "image"  #: V1 sends one image per frame; this is its channel name here
_ANGSTROM = 1e-10


_V1_HTYPES = ("dheader-1.0", "dimage-1.0", "dseries_end-1.0")
_HEADER_EXTRA_PARTS = {"all": 7, "basic": 1, "none": 0}
_V1_TABLES = {"dflatfield-1.0": "flatfield", "dpixelmask-1.0": "pixel_mask",
              "dcountrate_table-1.0": "countrate_table"}


def _json_part(part: bytes) -> dict[str, Any] | None:
    """A JSON object part, else None (pixel data, a part too large or too deeply nested for a
    header: .bounds.load_json; a RecursionError of the JSON decoder stopped the daemon)."""
    if part[:1] != b"{":
        return None
    try:
        obj = load_json(part)
    except DecodeError:
        return None
    return obj if isinstance(obj, dict) else None


#: how every Stream V2 message starts (CBOR tag 55799); decode.V2_MAGIC, not imported: decode imports us
_V2_MAGIC = b"\xd9\xd9\xf7"


def looks_v1(part: bytes) -> bool:
    """Whether ``part`` opens a Stream V1 message (a JSON part with a V1 ``htype``)."""
    header = _json_part(part) if len(part) < 4096 else None
    return header is not None and header.get("htype") in _V1_HTYPES


def _user_value(part: bytes) -> Any:
    # SIMPLON sends appendices verbatim; ours are JSON, anyone else's may be any text.
    try:
        text = part.decode()
    except UnicodeDecodeError:
        return part
    try:
        return load_json(part, what="V1 appendix")
    except DecodeError:  # (not JSON, larger than a header may be, or nested too deep: kept as text)
        return text


class V1Parser:
    """Stream V1 decoder fed one ZeroMQ part at a time (with its RCVMORE flag).

    A message ends at its last mandatory part unless RCVMORE says an appendix follows, so a
    sender that splits the global header into several ZeroMQ messages (the LiberTEM simulator
    sends ``dheader`` and the config separately) decodes the same as one that does not. Parts
    that cannot start a message while none is open (binary leftovers of a stream joined
    mid-series) are skipped and counted, as the detector's own clients do. A message broken
    off by the start of another is reported through ``on_error`` and the new one is decoded.
    A header is held until the next part shows whether that part is its appendix; an image
    whose ZeroMQ message ends early is reported as truncated.
    """

    def __init__(self, on_error: Callable[[DectrisError], None] | None = None, endpoint: str = "") -> None:
        self._on_error = on_error or _raise
        self._endpoint = endpoint  #: named in the wrong-version error
        self._parts: list[bytes] = []
        self._needed = 0
        self._kind: str | None = None
        self._complete: Message | None = None  # finished, waiting for its appendix
        self.skipped_parts = 0

    def feed(self, part: bytes, more: bool) -> list[Message]:
        """Decode ``part``; returns the messages it completes (0, 1 or 2)."""
        out: list[Message] = []
        if self._complete is not None:  # RCVMORE promised an appendix after a full message
            done, self._complete = self._complete, None
            header = _json_part(part)
            if header is None or header.get("htype") not in _V1_HTYPES:
                out.append(_with_user_data(done, _user_value(part)))
                return out
            out.append(done)  # not an appendix after all: a new message
        if self._kind is not None:
            # Message-opening parts are small JSON; a large part is pixel data, never parsed.
            header = _json_part(part) if len(part) < 4096 else None
            if header is not None and header.get("htype") in _V1_HTYPES:
                self._fail(f"V1 {self._kind} message broken off after {len(self._parts)} parts "
                           f"by a new {header['htype']} part")
            else:
                self._parts.append(part)
                if len(self._parts) == self._needed:
                    self._finish(more, out)
                elif not more and self._kind == "image":
                    # a detector never splits an image over several ZeroMQ messages
                    self._fail(f"V1 image message truncated: it ended after {len(self._parts)} of 4 parts")
                return out
        header = _json_part(part)
        htype = header.get("htype") if header else None
        if htype == "dseries_end-1.0":
            out.append(SeriesEnd(1, _int(header, "series")))
        elif htype in ("dheader-1.0", "dimage-1.0"):
            self._kind = "header" if htype == "dheader-1.0" else "image"
            self._parts = [part]
            if self._kind == "header":
                detail = header.get("header_detail", "basic")
                if detail not in _HEADER_EXTRA_PARTS:
                    self._kind, self._parts = None, []
                    self._on_error(DecodeError(f"dheader-1.0 header_detail {detail!r} is not all, "
                                               f"basic or none"))
                    return out
                self._needed = 1 + _HEADER_EXTRA_PARTS[detail]
            else:
                self._needed = 4
            if len(self._parts) == self._needed:
                self._finish(more, out)
            elif not more and self._kind == "image":
                self._fail("V1 image message truncated: it ended after 1 of 4 parts")
        elif part.startswith(_V2_MAGIC) and not more:
            # a Stream V2 message (single-part CBOR): skipped like any stray part, but said,
            # for otherwise a detector on the wrong URL scheme would look like one that is idle
            self.skipped_parts += 1
            self._on_error(WrongStreamVersion(2, self._endpoint or "HOST:PORT", "a Stream V2 (CBOR) message"))
        else:
            self.skipped_parts += 1
        return out

    def _fail(self, reason: str) -> None:
        self._kind, self._parts, self._needed = None, [], 0
        self._on_error(DecodeError(reason))

    def _finish(self, more: bool, out: list[Message]) -> None:
        parts, kind = self._parts, self._kind
        self._kind, self._parts, self._needed = None, [], 0
        try:
            msg = _v1_header(parts) if kind == "header" else _v1_image(parts)
        except DecodeError as exc:
            self._on_error(exc)
            return
        # A header sent in pieces may have its appendix in a piece of its own, so a header
        # always waits for the next part; for an image RCVMORE says whether one follows.
        if more or kind == "header":
            self._complete = msg
        else:
            out.append(msg)

    def flush(self) -> list[Message]:
        """A message held back for an appendix that never came (end of input)."""
        done, self._complete = self._complete, None
        return [done] if done is not None else []


def _raise(exc: DectrisError) -> None:
    raise exc


def _with_user_data(msg: Message, value: Any) -> Message:
    if isinstance(msg, (SeriesStart, Image)):
        return replace(msg, user_data=value)
    return msg


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DecodeError(f"{obj.get('htype', 'V1')} part lacks integer field {key!r}")
    return value


def _v1_header(parts: list[bytes]) -> SeriesStart:
    head = load_json(parts[0])
    series = _int(head, "series")
    detail = head.get("header_detail", "basic")
    config: dict[str, Any] = {}
    if len(parts) > 1:
        config = _json_part(parts[1]) or {}
        if not config:
            raise DecodeError(f"V1 series {series}: the detector config part is not a JSON object")
    tables: dict[str, np.ndarray] = {}
    for i in range(2, len(parts), 2):
        desc = _json_part(parts[i])
        if desc is None or desc.get("htype") not in _V1_TABLES:
            raise DecodeError(f"V1 series {series}: header part {i + 1} is not a "
                              f"{'/'.join(_V1_TABLES)} description")
        tables[_V1_TABLES[desc["htype"]]] = _v1_table(desc, parts[i + 1])
    mask = {V1_CHANNEL: tables["pixel_mask"]} if "pixel_mask" in tables else {}
    return SeriesStart(
        version=1,
        series_id=series,
        channels=(V1_CHANNEL,),
        image_shape=_v1_shape(config),
        image_dtype=_v1_dtype(config),
        number_of_images=_v1_image_count(config),
        energy_ev=_num(config, "incident_energy", "photon_energy"),
        wavelength_m=_scaled(_num(config, "wavelength"), _ANGSTROM),
        beam_center_px=_v1_pair(config, "beam_center_y", "beam_center_x"),
        pixel_size_m=_v1_pair(config, "y_pixel_size", "x_pixel_size"),
        detector_distance_m=_num(config, "detector_distance"),
        detector_translation_m=_v1_triple(config, "detector_translation"),
        count_time_s=_num(config, "count_time"),
        frame_time_s=_num(config, "frame_time"),
        saturation_value=_saturation(config),
        pixel_mask=mask,
        detector_description=config.get("description"),
        header_detail=detail,
        raw={**config, **{k: v for k, v in tables.items() if k != "pixel_mask"}},
    )


def _v1_dtype(config: dict[str, Any]) -> np.dtype | None:
    bits = config.get("bit_depth_image")
    return np.dtype(f"uint{bits}") if bits in (8, 16, 32) else None


def _scaled(value: float | None, scale: float) -> float | None:
    return value * scale if value is not None else None


def _num(config: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _v1_triple(config: dict[str, Any], key: str) -> tuple[float, float, float] | None:
    value = config.get(key)
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return (float(value[0]), float(value[1]), float(value[2]))
    return None


def _v1_pair(config: dict[str, Any], y: str, x: str) -> tuple[float, float] | None:
    vy, vx = _num(config, y), _num(config, x)
    return (vy, vx) if vy is not None and vx is not None else None


def _v1_shape(config: dict[str, Any]) -> tuple[int, int] | None:
    y, x = config.get("y_pixels_in_detector"), config.get("x_pixels_in_detector")
    return (int(y), int(x)) if isinstance(y, int) and isinstance(x, int) else None


def _v1_image_count(config: dict[str, Any]) -> int | None:
    nimages, ntrigger = config.get("nimages"), config.get("ntrigger")
    if not isinstance(nimages, int) or not isinstance(ntrigger, int):
        return None
    # External/internal "enable" triggering gives one image per trigger (LiberTEM's rule).
    return ntrigger if config.get("trigger_mode") in ("exte", "inte") else nimages * ntrigger


def _saturation(config: dict[str, Any]) -> int | None:
    for key in ("saturation_value", "countrate_correction_count_cutoff"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _v1_table(desc: dict[str, Any], blob: bytes) -> np.ndarray:
    shape, type_name = desc.get("shape"), desc.get("type")
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) for s in shape)):
        raise DecodeError(f"{desc['htype']} part needs an integer list 'shape', got {shape!r}")
    dtype = parse_dtype(str(type_name), f"{desc['htype']} type")
    flat = v1_decode("<", blob, dtype, int(np.prod(shape)))
    return flat.reshape(shape[::-1])  # V1 shapes are [x, y]


def _v1_image(parts: list[bytes]) -> Image:
    head = load_json(parts[0])
    series, frame = _int(head, "series"), _int(head, "frame")
    desc = _json_part(parts[1])
    if desc is None or desc.get("htype") != "dimage_d-1.0":
        raise DecodeError(f"V1 image {frame}: part 2 is not a dimage_d-1.0 description")
    config = _json_part(parts[3])
    if config is None or config.get("htype") != "dconfig-1.0":
        raise DecodeError(f"V1 image {frame}: part 4 is not a dconfig-1.0 part")
    blob = parts[2]
    size = desc.get("size")
    if isinstance(size, int) and size != len(blob):
        raise DecodeError(f"V1 image {frame}: data part is {len(blob)} bytes, dimage_d says {size}")
    digest = head.get("hash")
    if digest and hashlib.md5(blob).hexdigest() != digest:
        raise DecodeError(f"V1 image {frame}: data part fails its MD5 hash (corrupt or truncated)")
    shape = desc.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) for s in shape)):
        raise DecodeError(f"V1 image {frame}: dimage_d shape must be [x, y], got {shape!r}")
    dtype = parse_dtype(str(desc.get("type")), f"V1 image {frame} type")
    pixels = v1_decode(str(desc.get("encoding", "")), blob, dtype, shape[0] * shape[1])

    def ns(key: str) -> Fraction | None:
        value = config.get(key)
        return Fraction(value, 10**9) if isinstance(value, int) else None

    return Image(
        version=1, series_id=series, series_unique_id=None, image_id=frame,
        data={V1_CHANNEL: pixels.reshape(shape[1], shape[0])},
        real_time_s=ns("real_time"), start_time_s=ns("start_time"), stop_time_s=ns("stop_time"),
    )
