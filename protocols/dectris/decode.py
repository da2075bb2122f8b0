"""Decoders: SIMPLON Stream V2 (one CBOR message each) and Stream V1 (JSON + binary parts).

V2 arrays are decoded lazily: the CBOR walk only records where each array's bytes are, and a
channel is decompressed when asked for, so a receiver that wants ``threshold_1`` of a
three-channel detector pays for one channel. Format notes and sources: ``README.md`` here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from datetime import datetime
from fractions import Fraction
from typing import Any

import cbor2
import numpy as np

from .codec import decompress, v1_decode
from .schema import (
    TYPED_ARRAY_DTYPES,
    DecodeError,
    DectrisError,
    Image,
    Message,
    SeriesEnd,
    SeriesStart,
)

V2_MAGIC = b"\xd9\xd9\xf7"  #: CBOR self-described tag 55799 that starts every V2 message
V1_CHANNEL = "image"  #: V1 sends one image per frame; this is its channel name here
_ANGSTROM = 1e-10


@dataclass(frozen=True)
class _Compressed:
    algorithm: str
    modifier: int
    payload: bytes


@dataclass(frozen=True)
class _Typed:
    dtype: np.dtype
    content: bytes | _Compressed

    def array(self) -> np.ndarray:
        raw = self.content
        if isinstance(raw, _Compressed):
            raw = decompress(raw.algorithm, raw.modifier, raw.payload, self.dtype.itemsize)
        if len(raw) % self.dtype.itemsize:
            raise DecodeError(f"typed array of {len(raw)} bytes is not a whole number of {self.dtype}")
        return np.frombuffer(raw, self.dtype).astype(self.dtype.newbyteorder("="), copy=False)


@dataclass(frozen=True)
class _MultiDim:
    dims: tuple[int, ...]
    typed: _Typed

    def array(self) -> np.ndarray:
        flat = self.typed.array()
        if int(np.prod(self.dims)) != flat.size:
            raise DecodeError(f"array dims {list(self.dims)} need {int(np.prod(self.dims))} "
                              f"elements, the data holds {flat.size}")
        return flat.reshape(self.dims)


def _tag_hook(tag: cbor2.CBORTag, immutable: bool) -> Any:
    # Called innermost first: 56500 → typed array → 40.
    if tag.tag == 56500:
        v = tag.value
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and isinstance(v[0], str)
                and isinstance(v[1], int) and isinstance(v[2], bytes)):
            raise DecodeError("tag 56500 must wrap [algorithm: text, modifier: uint, data: bytes]")
        return _Compressed(v[0], v[1], v[2])
    if 64 <= tag.tag <= 87:
        if tag.tag not in TYPED_ARRAY_DTYPES:
            raise DecodeError(f"unsupported typed-array tag {tag.tag}")
        if not isinstance(tag.value, (bytes, _Compressed)):
            raise DecodeError(f"typed-array tag {tag.tag} must wrap a byte string")
        return _Typed(np.dtype(TYPED_ARRAY_DTYPES[tag.tag]), tag.value)
    if tag.tag == 40:
        v = tag.value
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[1], _Typed)
                and isinstance(v[0], (list, tuple)) and all(isinstance(d, int) for d in v[0])):
            raise DecodeError("tag 40 must wrap [dims: [uint, …], typed array]")
        return _MultiDim(tuple(v[0]), v[1])
    return tag  # unknown tags are kept as CBORTag and ignored unless their key matters


def _materialise(value: Any) -> Any:
    if isinstance(value, (_MultiDim, _Typed)):
        return value.array()
    if isinstance(value, dict):
        return {k: _materialise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_materialise(v) for v in value]
    return value


def decode_v2(raw: bytes, channels: Collection[str] | None = None) -> Message:
    """Decode one Stream V2 message. ``channels`` limits which image channels are decompressed
    (None = all); a requested channel that the image lacks is an error."""
    if not raw.startswith(V2_MAGIC):
        raise DecodeError("not a Stream V2 message: it does not start with CBOR tag 55799 (d9 d9 f7)")
    try:
        # Decoding after the prefix gives plain dicts/lists (inside 55799 cbor2 freezes them).
        msg = cbor2.loads(raw[len(V2_MAGIC):], tag_hook=_tag_hook)
    except cbor2.CBORDecodeEOF as exc:
        raise DecodeError(f"truncated Stream V2 message ({len(raw)} bytes): {exc}") from exc
    except cbor2.CBORDecodeError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, DecodeError):
            raise cause from None
        raise DecodeError(f"malformed Stream V2 CBOR ({len(raw)} bytes): {exc}") from exc
    if not isinstance(msg, dict) or not msg:
        raise DecodeError("a Stream V2 message must be a non-empty CBOR map")
    first = next(iter(msg))
    if first != "type":
        raise DecodeError(f"the first key of a Stream V2 message must be 'type', got {first!r}")
    kind = msg["type"]
    if kind == "image":
        return _v2_image(msg, channels)
    if kind == "start":
        return _v2_start(msg)
    if kind == "end":
        return SeriesEnd(2, _req(msg, "series_id", int), _opt(msg, "series_unique_id", str))
    raise DecodeError(f"unknown Stream V2 message type {kind!r} (expected start, image or end)")


def _req(msg: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in msg:
        raise DecodeError(f"{msg.get('type', '?')} message lacks required field {key!r}")
    return _check(msg, key, kind)


def _opt(msg: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    return _check(msg, key, kind) if msg.get(key) is not None else None


def _check(msg: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = msg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DecodeError(f"field {key!r} of a {msg.get('type', '?')} message has type "
                          f"{type(value).__name__}, expected {getattr(kind, '__name__', kind)}")
    return value


def _rational(msg: dict[str, Any], key: str) -> Fraction | None:
    value = msg.get(key)
    if value is None:
        return None
    if isinstance(value, Fraction):  # tag 30, decoded by cbor2
        return value
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) for v in value) and value[1] != 0):
        return Fraction(value[0], value[1])
    raise DecodeError(f"field {key!r} must be a rational [numerator, denominator ≠ 0], got {value!r}")


def _pair(msg: dict[str, Any], y_key: str, x_key: str, scale: float = 1.0) -> tuple[float, float] | None:
    if msg.get(y_key) is None or msg.get(x_key) is None:
        return None
    return (_check(msg, y_key, float) * scale, _check(msg, x_key, float) * scale)


def _v2_image(msg: dict[str, Any], channels: Collection[str] | None) -> Image:
    data = _req(msg, "data", dict)
    wanted = list(data) if channels is None else list(channels)
    arrays: dict[str, np.ndarray] = {}
    for name in wanted:
        if name not in data:
            raise DecodeError(f"image {msg.get('image_id')} has no channel {name!r} "
                              f"(it has {sorted(data)})")
        if not isinstance(data[name], _MultiDim):
            raise DecodeError(f"channel {name!r} is not a multi-dimensional array (tag 40)")
        arr = data[name].array()
        if arr.ndim != 2:
            raise DecodeError(f"channel {name!r} has {arr.ndim} dims, images have 2 (y, x)")
        arrays[name] = arr
    return Image(
        version=2,
        series_id=_req(msg, "series_id", int),
        series_unique_id=_opt(msg, "series_unique_id", str),
        image_id=_req(msg, "image_id", int),
        data=arrays,
        real_time_s=_rational(msg, "real_time"),
        start_time_s=_rational(msg, "start_time"),
        stop_time_s=_rational(msg, "stop_time"),
        user_data=_materialise(msg.get("user_data")),
    )


def _v2_start(msg: dict[str, Any]) -> SeriesStart:
    channels = tuple(_opt(msg, "channels", (list, tuple)) or ())
    if not all(isinstance(c, str) for c in channels):
        raise DecodeError("field 'channels' of a start message must be a list of text strings")
    masks = {}
    for name, arr in (_opt(msg, "pixel_mask", dict) or {}).items():
        if not isinstance(arr, _MultiDim):
            raise DecodeError(f"pixel_mask[{name!r}] is not a multi-dimensional array (tag 40)")
        masks[name] = arr.array()
    shape = None
    if msg.get("image_size_y") is not None and msg.get("image_size_x") is not None:
        shape = (_check(msg, "image_size_y", int), _check(msg, "image_size_x", int))
    dtype_name = _opt(msg, "image_dtype", str)
    wavelength = _opt(msg, "incident_wavelength", float)
    arm_date = msg.get("arm_date")
    raw = {k: v for k, v in msg.items() if k not in ("pixel_mask", "flatfield")}
    return SeriesStart(
        version=2,
        series_id=_req(msg, "series_id", int),
        series_unique_id=_opt(msg, "series_unique_id", str),
        channels=channels,
        image_shape=shape,
        image_dtype=_dtype(dtype_name, "image_dtype") if dtype_name else None,
        number_of_images=_opt(msg, "number_of_images", int),
        energy_ev=_opt(msg, "incident_energy", float),
        wavelength_m=wavelength * _ANGSTROM if wavelength is not None else None,
        beam_center_px=_pair(msg, "beam_center_y", "beam_center_x"),
        pixel_size_m=_pair(msg, "pixel_size_y", "pixel_size_x"),
        detector_distance_m=_opt(msg, "detector_distance", float),
        count_time_s=_opt(msg, "count_time", float),
        frame_time_s=_opt(msg, "frame_time", float),
        saturation_value=_opt(msg, "saturation_value", int),
        pixel_mask=masks,
        user_data=_materialise(msg.get("user_data")),
        arm_date=arm_date if isinstance(arm_date, datetime) else None,
        detector_description=_opt(msg, "detector_description", str),
        raw=_materialise(raw),
    )


def _dtype(name: str, field_name: str) -> np.dtype:
    if name not in ("uint8", "uint16", "uint32", "float32"):
        raise DecodeError(f"{field_name} {name!r} is not one of uint8, uint16, uint32, float32")
    return np.dtype(name)


# --------------------------------------------------------------------------- Stream V1


_V1_HTYPES = ("dheader-1.0", "dimage-1.0", "dseries_end-1.0")
_HEADER_EXTRA_PARTS = {"all": 7, "basic": 1, "none": 0}
_V1_TABLES = {"dflatfield-1.0": "flatfield", "dpixelmask-1.0": "pixel_mask",
              "dcountrate_table-1.0": "countrate_table"}


def _json_part(part: bytes) -> dict[str, Any] | None:
    if not part[:1] == b"{":
        return None
    try:
        obj = json.loads(part)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _user_value(part: bytes) -> Any:
    # SIMPLON sends appendices verbatim; ours are JSON, anyone else's may be any text.
    try:
        text = part.decode()
    except UnicodeDecodeError:
        return part
    try:
        return json.loads(text)
    except ValueError:
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

    def __init__(self, on_error: Callable[[DectrisError], None] | None = None) -> None:
        self._on_error = on_error or _raise
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
    head = json.loads(parts[0])
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
    dtype = _dtype(str(type_name), f"{desc['htype']} type")
    flat = v1_decode("<", blob, dtype, int(np.prod(shape)))
    return flat.reshape(shape[::-1])  # V1 shapes are [x, y]


def _v1_image(parts: list[bytes]) -> Image:
    head = json.loads(parts[0])
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
    dtype = _dtype(str(desc.get("type")), f"V1 image {frame} type")
    pixels = v1_decode(str(desc.get("encoding", "")), blob, dtype, shape[0] * shape[1])

    def ns(key: str) -> Fraction | None:
        value = config.get(key)
        return Fraction(value, 10**9) if isinstance(value, int) else None

    return Image(
        version=1, series_id=series, series_unique_id=None, image_id=frame,
        data={V1_CHANNEL: pixels.reshape(shape[1], shape[0])},
        real_time_s=ns("real_time"), start_time_s=ns("start_time"), stop_time_s=ns("stop_time"),
    )
