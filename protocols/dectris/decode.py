"""Decoders: SIMPLON Stream V2 (one CBOR message each) here, Stream V1 (JSON + binary parts) in
:mod:`.decode_v1`, re-exported.

V2 arrays are decoded lazily: the CBOR walk leaves each array as its CBOR tag, and a
channel is decompressed when asked for, so a receiver that wants ``threshold_1`` of a
three-channel detector pays for one channel. Format notes and sources: ``README.md`` here.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Collection
from datetime import datetime
from fractions import Fraction
from functools import lru_cache
from typing import Any, NamedTuple

import cbor2
import numpy as np

from .codec import bslz4_array, decompress
from .decode_v1 import V1_CHANNEL, V1Parser
from .schema import (
    TYPED_ARRAY_DTYPES,
    DecodeError,
    Image,
    Message,
    SeriesEnd,
    SeriesStart,
    parse_dtype,
)

__all__ = ["V1_CHANNEL", "V2_MAGIC", "ImageParts", "ImagePayload", "V1Parser", "decode_v2", "is_v2_image", "split_v2_image"]

V2_MAGIC = b"\xd9\xd9\xf7"  #: CBOR self-described tag 55799 that starts every V2 message
_ANGSTROM = 1e-10


_DTYPES = {tag: np.dtype(code) for tag, code in TYPED_ARRAY_DTYPES.items()}


def _typed_array(tag: cbor2.CBORTag) -> np.ndarray:
    """A typed array (tags 64–87, RFC 8746), its bytes raw or in a tag-56500 wrapper → flat,
    native byte order."""
    dtype = _DTYPES.get(tag.tag)
    if dtype is None:
        raise DecodeError(f"unsupported typed-array tag {tag.tag}")
    raw = tag.value
    if isinstance(raw, cbor2.CBORTag) and raw.tag == 56500:
        v = raw.value
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and isinstance(v[0], str)
                and isinstance(v[1], int) and isinstance(v[2], bytes)):
            raise DecodeError("tag 56500 must wrap [algorithm: text, modifier: uint, data: bytes]")
        raw = decompress(v[0], v[1], v[2], dtype.itemsize)
    elif not isinstance(raw, bytes):
        raise DecodeError(f"typed-array tag {tag.tag} must wrap a byte string")
    if len(raw) % dtype.itemsize:
        raise DecodeError(f"typed array of {len(raw)} bytes is not a whole number of {dtype}")
    flat = raw.view(dtype) if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype)
    return flat if dtype.isnative else flat.astype(dtype.newbyteorder("="))


def _bslz4_blob(typed: cbor2.CBORTag) -> tuple[np.dtype, bytes] | None:
    """(dtype, compressed bytes) when the typed array ``typed`` holds a bitshuffle-LZ4 blob of a
    native dtype (tag 56500, what DECTRIS detectors send), else None."""
    dtype, inner = _DTYPES.get(typed.tag), typed.value
    if (dtype is not None and dtype.isnative and isinstance(inner, cbor2.CBORTag)
            and inner.tag == 56500 and isinstance(inner.value, (list, tuple)) and len(inner.value) == 3
            and inner.value[0] == "bslz4" and inner.value[1] == dtype.itemsize
            and isinstance(inner.value[2], bytes)):
        return dtype, inner.value[2]
    return None


def _multi_dim(tag: cbor2.CBORTag) -> np.ndarray:
    """A tag-40 row-major array ``[dims, typed array]``."""
    v = tag.value
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[1], cbor2.CBORTag)
            and 64 <= v[1].tag <= 87 and isinstance(v[0], (list, tuple))
            and all(type(d) is int and d >= 0 for d in v[0])):
        raise DecodeError("tag 40 must wrap [dims: [uint, …], typed array]")
    dims, typed = v
    blob = _bslz4_blob(typed)
    if blob is not None:
        # what DECTRIS detectors send: decoded straight to the image's shape, no copies
        return bslz4_array(blob[1], blob[0], tuple(dims))
    flat = _typed_array(typed)
    if math.prod(v[0]) != flat.size:
        raise DecodeError(f"array dims {list(v[0])} need {math.prod(v[0])} elements, "
                          f"the data holds {flat.size}")
    return flat.reshape(v[0])


class ImagePayload(NamedTuple):
    """One channel of an image as it arrived: the bslz4 bytes (with their HDF5-filter header)
    when the detector sent bslz4, else the decoded array (``array``). A named tuple: one is
    made per image, and a frozen dataclass costs 1.2 µs more to build, under the GIL."""

    shape: tuple[int, int]
    dtype: np.dtype
    bslz4: bytes | None = None
    array: np.ndarray | None = None


class ImageParts(NamedTuple):
    """What the decoding workers need of a V2 image: its ids and one channel, still compressed."""

    series_id: int
    series_unique_id: str | None
    image_id: int
    payload: ImagePayload


#: ``"type": "image"`` as CBOR text keys, which every image message starts with
_IMAGE_KEY = b"\x64type\x65image"


def is_v2_image(raw: bytes) -> bool:
    """Whether a V2 message is (announces itself as) an image: a byte search in its first
    bytes, so that only images go to the decoding workers and start/end stay in order."""
    return raw.startswith(V2_MAGIC) and _IMAGE_KEY in raw[:16]


def split_v2_image(raw: bytes, channel: str | None) -> ImageParts:
    """Decode a V2 image message but leave its ``channel`` (None: its first) compressed: the ids the source
    uses (no timestamps or user data: their rationals cost a quarter of an image's parse)
    and the channel's payload. Any other message, or an image that breaks the format, is a
    :class:`DecodeError` naming what is wrong. The payload's framing is checked when it is
    decompressed (:func:`.codec.bslz4_array`). An image in the layout DECTRIS detectors send
    is read by :func:`_split_dectris_image` (≈ 8.5 against 10.3 µs of CPU per image, loaded box);
    anything else here.

    Every image of a stream goes through here under the GIL, so the checks are those of
    :func:`decode_v2` written without its per-field helpers (which doubled the time spent
    here beyond ``cbor2.loads``); ``tests/test_dectris_source.py`` holds the two to the same
    answers and errors."""
    fast = _split_dectris_image(raw, channel)
    return fast if fast is not None else _split_v2_full(raw, channel)


def _split_v2_full(raw: bytes, channel: str | None) -> ImageParts:
    """:func:`split_v2_image` through cbor2: any image, and the errors of the ones at fault."""
    parsed = _parse_v2(raw)
    if parsed["type"] != "image":
        raise DecodeError(f"a {parsed['type']!r} message announced itself as an image")
    series_id, unique_id, image_id = parsed.get("series_id"), parsed.get("series_unique_id"), parsed.get("image_id")
    if type(series_id) is not int or type(image_id) is not int or not (
            unique_id is None or type(unique_id) is str):
        _req(parsed, "series_id", int)  # the helpers name the field and the type at fault
        _req(parsed, "image_id", int)
        _opt(parsed, "series_unique_id", str)
    body = parsed.get("data")
    if type(body) is not dict:
        _req(parsed, "data", dict)
    if channel is None:  # no start named the channel (e.g. the daemon restarted mid-series)
        channel = next(iter(body), "")
    try:
        tag = body[channel]
    except KeyError:
        raise DecodeError(f"image {image_id} has no channel {channel!r} (it has {sorted(body)})") from None
    if type(tag) is not cbor2.CBORTag or tag.tag != 40:
        raise DecodeError(f"channel {channel!r} is not a multi-dimensional array (tag 40)")
    v = tag.value
    if (type(v) in (list, tuple) and len(v) == 2 and type(v[1]) is cbor2.CBORTag
            and type(v[0]) in (list, tuple) and len(v[0]) == 2
            and type(v[0][0]) is int and type(v[0][1]) is int and v[0][0] > 0 and v[0][1] > 0):
        blob = _bslz4_blob(v[1])
        if blob is not None:
            return ImageParts(series_id, unique_id, image_id,
                              ImagePayload((v[0][0], v[0][1]), blob[0], bslz4=blob[1]))
    arr = _multi_dim(tag)
    if arr.ndim != 2:
        raise DecodeError(f"channel {channel!r} has {arr.ndim} dims, images have 2 (y, x)")
    return ImageParts(series_id, unique_id, image_id,
                      ImagePayload((arr.shape[0], arr.shape[1]), arr.dtype, array=arr))


def _key(name: str) -> bytes:
    return re.escape(cbor2.dumps(name))


# An image message in the layout DECTRIS detectors send, as CBOR items in order (``_U`` an
# unsigned integer, ``_T`` a text string's head, ``_B`` a byte string's): read by
# :func:`_split_dectris_image` with a few regular-expression matches instead of cbor2 building
# every field (the series date's datetime, the rationals' lists, every channel's tags) and the
# checks walking them
_U = rb"([\x00-\x17]|\x18.|\x19..|\x1a....|\x1b........)"
_UN = rb"(?:[\x00-\x17]|\x18.|\x19..|\x1a....|\x1b........)"
_T = rb"([\x60-\x77]|\x78.|\x79..)"
_B = rb"([\x40-\x57]|\x58.|\x59..|\x5a....|\x5b........)"
_IMAGE_IDS = re.compile(V2_MAGIC + rb"\xaa" + _key("type") + _key("image") + _key("series_id") + _U
                        + _key("series_unique_id") + rb"(\xf6|[\x60-\x77]|\x78.|\x79..)", re.DOTALL)
_IMAGE_TIME = re.compile(_key("image_id") + _U + _key("real_time") + rb"\x82" + _UN + _UN
                         + _key("series_date") + rb"\xc0" + _T, re.DOTALL)
#: … and ``user_data``, with ``data``'s head (a map of 1–23 channels) when it is null
_IMAGE_USER = re.compile(_key("start_time") + rb"\x82" + _UN + _UN + _key("stop_time") + rb"\x82" + _UN + _UN
                         + _key("user_data") + rb"(?:\xf6" + _key("data") + rb"([\xa1-\xb7]))?", re.DOTALL)
_IMAGE_DATA = re.compile(_key("data") + rb"([\xa1-\xb7])", re.DOTALL)
_TEXT = re.compile(_T, re.DOTALL)
#: a channel: tag 40 [[h, w], typed array (tag 64–87) of tag 56500 ["bslz4", element size, bytes]]
_CHANNEL_BSLZ4 = re.compile(rb"\xd8\x28\x82\x82" + _U + _U + rb"\xd8([\x40-\x57])\xd9\xdc\xb4\x83"
                            + _key("bslz4") + _U + _B, re.DOTALL)
#: whole CBOR items (a series_date's tag 0 and text; a user_data) that cbor2 reads, as
#: ``series_date`` a datetime: the images of a series repeat both, so cbor2 reads each once (as
#: strictly as inside a message), and an image whose item is one of these needs no new read
_seen_items: dict[str, list[bytes]] = {"series_date": [], "user_data": []}
_seen_dates: set[bytes] = set()  #: the series_date items of ``_seen_items``, found by hash


def _arg(head: bytes) -> int:
    """The argument of a CBOR head of major type 0, 2 or 3 (a value or a length)."""
    return head[0] & 31 if len(head) == 1 else int.from_bytes(head[1:], "big")


def _known_item(raw: bytes, pos: int, field: str) -> int | None:
    """The end of the CBOR item at ``pos`` when cbor2 reads it (``series_date``: as a datetime),
    else None; items read before are found again by their bytes (a well-formed CBOR item is
    self-delimiting, so bytes that start with one are that item)."""
    seen = _seen_items[field]
    for item in seen:
        if raw.startswith(item, pos):
            return pos + len(item)
    fp = io.BytesIO(raw)
    fp.seek(pos)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except (cbor2.CBORDecodeError, ValueError, EOFError):
        return None
    if field == "series_date":
        if not isinstance(value, datetime):
            return None
        if len(_seen_dates) >= 256:
            _seen_dates.clear()
        _seen_dates.add(raw[pos:fp.tell()])
    if len(seen) >= 16:  # a new series brings new ones: keep the recent
        seen.clear()
    seen.append(raw[pos:fp.tell()])
    return fp.tell()


def _split_dectris_image(raw: bytes, channel: str | None) -> ImageParts | None:
    """:func:`split_v2_image` of an image in the layout DECTRIS detectors send (their recorded
    EIGER2 messages and our simulator's), read in place: a map of ten keys in this order —
    ``type`` "image", ``series_id`` (unsigned), ``series_unique_id`` (text or null),
    ``image_id`` (unsigned), ``real_time`` (two unsigned), ``series_date`` (tag 0 text that
    cbor2 reads as a datetime), ``start_time``, ``stop_time`` (two unsigned each),
    ``user_data`` (any item cbor2 reads), ``data``: channels each ``[[h, w] positive, typed
    array of a native unsigned dtype wrapping 56500 ["bslz4", its element size, bytes]]``, the
    one asked for among them (or the first) — and nothing after it. Anything else (another
    order, key or type, another compression, a repeated channel, a message cut short, text
    that is not UTF-8) is None: the full decoder reads it and names what is wrong with it.
    So this gives the full decoder's answer or none (``tests/test_dectris_decode.py`` holds
    the two to the same answers, mutated messages included)."""
    if type(raw) is not bytes:
        return None
    m = _IMAGE_IDS.match(raw)
    if m is None:
        return None
    series_id, pos = _arg(m[1]), m.end()
    try:
        unique_id = None
        if m[2] != b"\xf6":
            n = _arg(m[2])
            unique_id, pos = raw[pos:pos + n].decode("utf-8"), pos + n
        m = _IMAGE_TIME.match(raw, pos)
        if m is None:
            return None
        image_id, date, pos = _arg(m[1]), m.start(2) - 1, m.end() + _arg(m[2])
        if raw[date:pos] not in _seen_dates and _known_item(raw, date, "series_date") != pos:
            return None
        m = _IMAGE_USER.match(raw, pos)
        if m is not None and m[1] is None:  # user data not null: cbor2 reads it (once a series)
            pos = _known_item(raw, m.end(), "user_data")
            m = _IMAGE_DATA.match(raw, pos) if pos is not None else None
        if m is None:
            return None
        pos, found, names = m.end(), None, set()
        for _ in range(m[1][0] & 31):
            t = _TEXT.match(raw, pos)
            if t is None:
                return None
            pos = t.end() + _arg(t[1])
            name = raw[t.end():pos].decode("utf-8")
            c = _CHANNEL_BSLZ4.match(raw, pos)
            if c is None or name in names or pos > len(raw):
                return None
            names.add(name)
            pos = c.end() + _arg(c[5])
            if found is None and (channel is None or name == channel):
                found = c
    except UnicodeDecodeError:
        return None
    if pos != len(raw) or found is None:
        return None
    h, w, dtype, modifier = _arg(found[1]), _arg(found[2]), _DTYPES.get(found[3][0]), _arg(found[4])
    if not h or not w or dtype is None or dtype.kind != "u" or not dtype.isnative or modifier != dtype.itemsize:
        return None
    return ImageParts(series_id, unique_id, image_id,
                      ImagePayload((h, w), dtype, raw[found.end():found.end() + _arg(found[5])]))


def _is_multi_dim(value: Any) -> bool:
    return isinstance(value, cbor2.CBORTag) and value.tag == 40


def _materialise(value: Any) -> Any:
    if isinstance(value, cbor2.CBORTag):
        if value.tag == 40:
            return _multi_dim(value)
        if 64 <= value.tag <= 87:
            return _typed_array(value)
        return value  # unknown tags are kept as CBORTag and ignored unless their key matters
    if isinstance(value, dict):
        return {k: _materialise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_materialise(v) for v in value]
    return value


def decode_v2(raw: bytes, channels: Collection[str] | None = None) -> Message:
    """Decode one Stream V2 message. ``channels`` limits which image channels are decompressed
    (None = all); a requested channel that the image lacks is an error."""
    return _v2_message(_parse_v2(raw), channels)


def _parse_v2(raw: bytes) -> dict[str, Any]:
    if not raw.startswith(V2_MAGIC):
        raise DecodeError("not a Stream V2 message: it does not start with CBOR tag 55799 (d9 d9 f7)")
    try:
        # Decoding after the prefix gives plain dicts/lists (inside 55799 cbor2 freezes them).
        # No tag hook: arrays stay CBORTag objects until a field is used (a hook in Python
        # doubled the parse time of an image message).
        msg = cbor2.loads(memoryview(raw)[len(V2_MAGIC):])
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
    return msg


def _v2_message(msg: dict[str, Any], channels: Collection[str] | None) -> Message:
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
    if type(value) in (list, tuple) and len(value) == 2:
        num, den = value
        if type(num) is int and type(den) is int and den:
            return _fraction(num, den)
    raise DecodeError(f"field {key!r} must be a rational [numerator, denominator ≠ 0], got {value!r}")


#: Fractions are immutable and costly to build (1.5 µs); an image's start_time is the last
#: image's stop_time and real_time repeats, so two of its three rationals come from here
_fraction = lru_cache(maxsize=256)(Fraction)


def _pair(msg: dict[str, Any], y_key: str, x_key: str, scale: float = 1.0) -> tuple[float, float] | None:
    if msg.get(y_key) is None or msg.get(x_key) is None:
        return None
    return (_check(msg, y_key, float) * scale, _check(msg, x_key, float) * scale)


def _triple(msg: dict[str, Any], key: str) -> tuple[float, float, float] | None:
    value = _opt(msg, key, (list, tuple))
    if value is None:
        return None
    if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise DecodeError(f"field {key!r} must be 3 numbers (x, y, z metres), got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _v2_image(msg: dict[str, Any], channels: Collection[str] | None) -> Image:
    data = _req(msg, "data", dict)
    wanted = list(data) if channels is None else list(channels)
    arrays: dict[str, np.ndarray] = {}
    for name in wanted:
        if name not in data:
            raise DecodeError(f"image {msg.get('image_id')} has no channel {name!r} "
                              f"(it has {sorted(data)})")
        if not _is_multi_dim(data[name]):
            raise DecodeError(f"channel {name!r} is not a multi-dimensional array (tag 40)")
        arr = _multi_dim(data[name])
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
        if not _is_multi_dim(arr):
            raise DecodeError(f"pixel_mask[{name!r}] is not a multi-dimensional array (tag 40)")
        masks[name] = _multi_dim(arr)
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
        image_dtype=parse_dtype(dtype_name, "image_dtype") if dtype_name else None,
        number_of_images=_opt(msg, "number_of_images", int),
        energy_ev=_opt(msg, "incident_energy", float),
        wavelength_m=wavelength * _ANGSTROM if wavelength is not None else None,
        beam_center_px=_pair(msg, "beam_center_y", "beam_center_x"),
        pixel_size_m=_pair(msg, "pixel_size_y", "pixel_size_x"),
        detector_distance_m=_opt(msg, "detector_distance", float),
        detector_translation_m=_triple(msg, "detector_translation"),
        count_time_s=_opt(msg, "count_time", float),
        frame_time_s=_opt(msg, "frame_time", float),
        saturation_value=_opt(msg, "saturation_value", int),
        pixel_mask=masks,
        user_data=_materialise(msg.get("user_data")),
        arm_date=arm_date if isinstance(arm_date, datetime) else None,
        detector_description=_opt(msg, "detector_description", str),
        raw=_materialise(raw),
    )
