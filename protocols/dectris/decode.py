"""Decoders: SIMPLON Stream V2 (one CBOR message each) here, Stream V1 (JSON + binary parts) in
:mod:`.decode_v1`, re-exported.

V2 arrays are decoded lazily: the CBOR walk leaves each array as its CBOR tag, and a
channel is decompressed when asked for, so a receiver that wants ``threshold_1`` of a
three-channel detector pays for one channel. Format notes and sources: ``README.md`` here.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from datetime import datetime
from fractions import Fraction
from functools import lru_cache
from typing import Any, NamedTuple

import cbor2
import numpy as np

from ..limits import Limits
from .bounds import DEFAULT_LIMITS, check_cbor
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

__all__ = ["V1_CHANNEL", "V2_MAGIC", "ImageParts", "ImagePayload", "PlainImage", "V1Parser", "decode_v2",
           "is_v2_image", "load_plain_v2", "plain_bslz4_image", "split_plain_v2_image", "split_v2_image"]

V2_MAGIC = b"\xd9\xd9\xf7"  #: CBOR self-described tag 55799 that starts every V2 message
_ANGSTROM = 1e-10


_DTYPES = {tag: np.dtype(code) for tag, code in TYPED_ARRAY_DTYPES.items()}

#: the tags this decoder reads (multi-dimensional arrays row- and column-major, RFC 8746's typed
#: arrays, DECTRIS' compression); cbor2 itself decodes its semantic tags (dates, rationals, …).
#: Any other tag is skipped: DECTRIS' reference decoder (its Stream V2 client's ``tag_hook``)
#: decodes the same tags and hands back any other undecoded, so a detector or a later firmware
#: may tag a value we do not know; we read such a value as its content (a tag adds meaning to
#: a value, RFC 8949 § 3.4), where a field we use would otherwise be of the wrong type. They are
#: skipped once, as the message loads (:func:`_skip_unknown_tag`), not where each value is read
_KNOWN_TAGS = frozenset({40, 1040, 56500, *_DTYPES})


def _skip_unknown_tag(tag: cbor2.CBORTag, immutable: bool) -> Any:
    """cbor2's tag hook: a tag of :data:`_KNOWN_TAGS` stays a CBORTag (an array is decoded when
    its field is used), any other gives its content (cbor2 calls the hook for the innermost
    tag first, so tags on tags go too). Not on the images' own path (:func:`split_v2_image`)."""
    if tag.tag in _KNOWN_TAGS:
        return tag
    value = tag.value
    # inside a tag cbor2 freezes maps (FrozenDict), which the fields' type checks take for dicts
    if not immutable and isinstance(value, Mapping) and not isinstance(value, dict):
        return dict(value)
    return value


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
    """A tag-40 row-major (or tag-1040 column-major, RFC 8746) array ``[dims, typed array]``;
    C-ordered either way."""
    v = tag.value
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[1], cbor2.CBORTag)
            and 64 <= v[1].tag <= 87 and isinstance(v[0], (list, tuple))
            and all(type(d) is int and d >= 0 for d in v[0])):
        raise DecodeError(f"tag {tag.tag} must wrap [dims: [uint, …], typed array]")
    dims, typed = v
    column_major = tag.tag == 1040
    blob = _bslz4_blob(typed)
    if blob is not None and not column_major:
        # what DECTRIS detectors send: decoded straight to the image's shape, no copies
        return bslz4_array(blob[1], blob[0], tuple(dims))
    flat = _typed_array(typed)
    if math.prod(dims) != flat.size:
        raise DecodeError(f"array dims {list(dims)} need {math.prod(dims)} elements, "
                          f"the data holds {flat.size}")
    if column_major:
        return np.ascontiguousarray(flat.reshape(dims, order="F"))
    return flat.reshape(dims)


class ImagePayload(NamedTuple):
    """One channel of an image as it arrived: the bslz4 bytes (with their HDF5-filter header)
    when the detector sent bslz4, else the decoded array (``array``). A named tuple: a frozen
    dataclass costs 1.2 µs more to build, under the GIL (the decoding jobs make none for an
    image as detectors send it: :func:`split_plain_v2_image`)."""

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


def split_v2_image(raw: bytes, channel: str | None, plain: Any = None) -> ImageParts:
    """Decode a V2 image message but leave its ``channel`` (None: its first) compressed: the ids the source
    uses (no timestamps or user data: their rationals cost a quarter of an image's parse)
    and the channel's payload. Any other message, or an image that breaks the format, is a
    :class:`DecodeError` naming what is wrong. The payload's framing is checked when it is
    decompressed (:func:`.codec.bslz4_array`).

    The decoding jobs read an image as detectors send it through :func:`split_plain_v2_image`
    (no object per image) and come here for any other. Here too such an image is loaded without
    a tag hook and read without :func:`decode_v2`'s per-field helpers (measured: the hook cost
    0.3 µs, 3 %, of this parse; the helpers doubled the time spent here beyond ``cbor2.loads``);
    anything else (an unknown tag, a fault) is loaded again as :func:`decode_v2` loads it and
    checked field by field. ``tests/test_dectris_decode.py`` holds the two to the same answers
    and errors. ``plain``: the message as :func:`load_plain_v2` loaded it, where the caller
    already has it (a decoding job's image the plain path did not take: not loaded twice)."""
    if plain is None:
        plain = _load_v2(raw, None)
    if type(plain) is dict:
        parts = _plain_image(plain, channel)
        if parts is not None:
            return parts
    return _checked_image(_parse_v2(raw), channel)


#: what :func:`split_plain_v2_image` gives: series_id, series_unique_id, image_id, height, width,
#: dtype, the channel's bslz4 bytes (with their HDF5-filter header)
PlainImage = tuple[int, "str | None", int, int, int, np.dtype, bytes]


def split_plain_v2_image(raw: bytes, channel: str | None) -> PlainImage | None:
    """:func:`split_v2_image` of an image exactly as detectors send it (plain fields, its
    ``channel`` — None: its first — a row-major bslz4 array of a native dtype), as a plain
    tuple; None for any other message, a fault included, which :func:`split_v2_image` then
    reads or names. The decoding jobs' path (:func:`.source.decode_job`): no object per image
    but cbor2's and the tuple (an ImageParts and its ImagePayload, and the per-field helper
    calls, were ≈ 3.5 µs of Python per image beside cbor2's 4.5)."""
    msg = load_plain_v2(raw)
    return None if msg is None else plain_bslz4_image(msg, channel)


def load_plain_v2(raw: bytes) -> Any:
    """A V2 message loaded as :func:`split_v2_image` first loads it (no tag hook), or None where
    that load fails (not V2, a fault: :func:`split_v2_image`'s own load names it)."""
    if not raw.startswith(V2_MAGIC):
        return None
    if len(raw) > _SCAN_IMAGES_OVER:  # (the images' path: :func:`_check_bounds` inlined, 0.6 µs an image)
        try:
            check_cbor(memoryview(raw), DEFAULT_LIMITS.max_header_values)
        except DecodeError:
            return None
    try:
        return cbor2.loads(memoryview(raw)[len(V2_MAGIC):])
    except cbor2.CBORDecodeError:
        return None


def plain_bslz4_image(msg: Any, channel: str | None) -> PlainImage | None:
    """:func:`split_plain_v2_image` of a message cbor2 loaded without a tag hook."""
    if type(msg) is not dict or msg.get("type") != "image" or next(iter(msg)) != "type":
        return None
    series_id, unique_id, image_id, body = (msg.get("series_id"), msg.get("series_unique_id"),
                                            msg.get("image_id"), msg.get("data"))
    if (type(series_id) is not int or type(image_id) is not int
            or not (unique_id is None or type(unique_id) is str) or type(body) is not dict or not body):
        return None
    tag = body.get(next(iter(body)) if channel is None else channel)
    if type(tag) is not cbor2.CBORTag or tag.tag != 40:
        return None
    v = tag.value
    if type(v) not in (list, tuple) or len(v) != 2:
        return None
    dims, typed = v
    if type(dims) not in (list, tuple) or len(dims) != 2 or type(typed) is not cbor2.CBORTag:
        return None
    y, x = dims
    if type(y) is not int or type(x) is not int or y <= 0 or x <= 0:
        return None
    dtype, inner = _DTYPES.get(typed.tag), typed.value
    if dtype is None or not dtype.isnative or type(inner) is not cbor2.CBORTag or inner.tag != 56500:
        return None
    w = inner.value
    if (type(w) not in (list, tuple) or len(w) != 3 or w[0] != "bslz4" or w[1] != dtype.itemsize
            or type(w[2]) is not bytes):
        return None
    return series_id, unique_id, image_id, y, x, dtype, w[2]


def _plain_image(msg: dict[str, Any], channel: str | None) -> ImageParts | None:
    """:func:`split_v2_image` of an image of plain fields (no tag but the array's), or None."""
    fields = plain_bslz4_image(msg, channel)
    if fields is not None:
        series_id, unique_id, image_id, y, x, dtype, blob = fields
        return ImageParts(series_id, unique_id, image_id, ImagePayload((y, x), dtype, bslz4=blob))
    series_id, unique_id, image_id = msg.get("series_id"), msg.get("series_unique_id"), msg.get("image_id")
    body = msg.get("data")
    if (msg.get("type") != "image" or next(iter(msg)) != "type" or type(series_id) is not int
            or type(image_id) is not int or not (unique_id is None or type(unique_id) is str)
            or type(body) is not dict or not body):
        return None
    if channel is None:
        channel = next(iter(body))
    tag = body.get(channel)
    if type(tag) is not cbor2.CBORTag or tag.tag != 40:
        return None
    try:
        return ImageParts(series_id, unique_id, image_id, _image_payload(tag, channel))
    except DecodeError:  # (a tag inside the array, or a fault: the checked parse names it)
        return None


def _checked_image(msg: dict[str, Any], channel: str | None) -> ImageParts:
    """:func:`split_v2_image` of a message loaded by :func:`_parse_v2`, each field checked."""
    if msg["type"] != "image":
        raise DecodeError(f"a {msg['type']!r} message announced itself as an image")
    series_id, image_id = _req(msg, "series_id", int), _req(msg, "image_id", int)
    unique_id = _opt(msg, "series_unique_id", str)
    body = _req(msg, "data", dict)
    if channel is None:  # no start named the channel (e.g. the daemon restarted mid-series)
        channel = next(iter(body), "")
    try:
        tag = body[channel]
    except KeyError:
        raise DecodeError(f"image {image_id} has no channel {channel!r} (it has {sorted(body)})") from None
    if not _is_multi_dim(tag):
        raise DecodeError(f"channel {channel!r} is not a multi-dimensional array (tag 40)")
    return ImageParts(series_id, unique_id, image_id, _image_payload(tag, channel))


def _image_payload(tag: cbor2.CBORTag, channel: str) -> ImagePayload:
    """An image channel's array (tag 40 or 1040): its bslz4 bytes as they came, what detectors
    send (the framing is checked when they are decompressed), else the array decoded."""
    v = tag.value
    if (tag.tag == 40 and type(v) in (list, tuple) and len(v) == 2 and type(v[1]) is cbor2.CBORTag
            and type(v[0]) in (list, tuple) and len(v[0]) == 2
            and type(v[0][0]) is int and type(v[0][1]) is int and v[0][0] > 0 and v[0][1] > 0):
        blob = _bslz4_blob(v[1])
        if blob is not None:
            return ImagePayload((v[0][0], v[0][1]), blob[0], bslz4=blob[1])
    arr = _multi_dim(tag)
    if arr.ndim != 2:
        raise DecodeError(f"channel {channel!r} has {arr.ndim} dims, images have 2 (y, x)")
    return ImagePayload((arr.shape[0], arr.shape[1]), arr.dtype, array=arr)


def _is_multi_dim(value: Any) -> bool:
    return isinstance(value, cbor2.CBORTag) and value.tag in (40, 1040)


def _materialise(value: Any) -> Any:
    if isinstance(value, cbor2.CBORTag):
        if value.tag in (40, 1040):
            return _multi_dim(value)
        if 64 <= value.tag <= 87:
            return _typed_array(value)
        return value  # 56500: compressed bytes outside an array, nothing says what they hold
    if isinstance(value, Mapping):  # (FrozenDict inside a tag)
        return {k: _materialise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_materialise(v) for v in value]
    return value


def decode_v2(raw: bytes, channels: Collection[str] | None = None, limits: Limits | None = None) -> Message:
    """Decode one Stream V2 message. ``channels`` limits which image channels are decompressed
    (None = all); a requested channel that the image lacks is an error. ``limits``: the
    bounds on its values and nesting (:func:`_check_bounds`; None: the defaults)."""
    return _v2_message(_parse_v2(raw, limits), channels)


#: an image larger than this is walked before it is loaded (:func:`_check_bounds`)
_SCAN_IMAGES_OVER = DEFAULT_LIMITS.max_header_bytes


def _check_bounds(raw: bytes, limits: Limits | None) -> None:
    """Refuse a message of more values or deeper nesting than the limits allow, before cbor2
    builds it (:mod:`.bounds`). Every message but an image, and an image larger than
    ``max_header_bytes``: an image up to that size costs its decoding worker no more than a
    header of that size (a few ms), and the walk (≈ 0.3 µs a value) is kept off the images'
    own path, where a detector's 20-odd values a message would add ≈ 10 % to its decoding."""
    lim = DEFAULT_LIMITS if limits is None else limits
    if len(raw) > lim.max_header_bytes or not is_v2_image(raw):
        check_cbor(memoryview(raw), lim.max_header_values)


def _parse_v2(raw: bytes, limits: Limits | None = None) -> dict[str, Any]:
    """A V2 message as a map, unknown tags skipped (:func:`_skip_unknown_tag`)."""
    msg = _load_v2(raw, _skip_unknown_tag, limits)
    if not isinstance(msg, dict) or not msg:
        raise DecodeError("a Stream V2 message must be a non-empty CBOR map")
    first = next(iter(msg))
    if first != "type":
        raise DecodeError(f"the first key of a Stream V2 message must be 'type', got {first!r}")
    return msg


def _load_v2(raw: bytes, tag_hook: Any, limits: Limits | None = None) -> Any:
    if not raw.startswith(V2_MAGIC):
        raise DecodeError("not a Stream V2 message: it does not start with CBOR tag 55799 (d9 d9 f7)")
    _check_bounds(raw, limits)
    try:
        # Decoding after the prefix gives plain dicts/lists (inside 55799 cbor2 freezes them);
        # arrays stay CBORTag objects until a field is used
        return cbor2.loads(memoryview(raw)[len(V2_MAGIC):], tag_hook=tag_hook)
    except cbor2.CBORDecodeEOF as exc:
        raise DecodeError(f"truncated Stream V2 message ({len(raw)} bytes): {exc}") from exc
    except cbor2.CBORDecodeError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, DecodeError):
            raise cause from None
        raise DecodeError(f"malformed Stream V2 CBOR ({len(raw)} bytes): {exc}") from exc


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
    if kind is dict and isinstance(value, Mapping) and not isinstance(value, dict):
        return dict(value)  # a map inside a tag, which cbor2 freezes (a message inside an unknown tag)
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
        tag = data[name]
        if not _is_multi_dim(tag):
            raise DecodeError(f"channel {name!r} is not a multi-dimensional array (tag 40)")
        arr = _multi_dim(tag)
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
