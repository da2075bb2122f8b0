"""The decoding job's plain path (decode.split_plain_v2_image, read inline by source.decode_job):
for ANY image message — as detectors send it, or with a field of the wrong type, an unknown tag,
another array layout, ids past 64 bits, another shape, a cut or flipped byte — the plain path
either gives exactly the fields the checked per-image path (split_v2_image) gives, or hands the
message to it; and a job gives, image by image and in order, what that path gives each alone:
the same ids, the same errors (message and order), the same chunks."""

from __future__ import annotations

import datetime

import cbor2
import numpy as np
import pytest
from cryoptycho.protocols import compression
from cryoptycho.protocols.dectris.codec import bslz4_array
from cryoptycho.protocols.dectris.decode import (
    V2_MAGIC,
    decode_v2,
    split_plain_v2_image,
    split_v2_image,
)
from cryoptycho.protocols.dectris.schema import DecodeError
from cryoptycho.protocols.dectris.source import decode_job, spool_chunk
from hypothesis import given, settings
from hypothesis import strategies as st

CHANNEL = "threshold_1"
_ID_MAX = (1 << 63) - 1
_FRAME = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) % 7
_BSLZ4 = compression.bslz4_compress(_FRAME)

#: (field, value) defects of an otherwise plain image; "drop" removes the field
_FIELD_DEFECTS = [
    ("series_id", True),
    ("series_id", 1.0),
    ("series_id", None),
    ("series_id", "1"),
    ("series_id", 1 << 64),
    ("series_id", -(1 << 63) - 1),
    ("series_id", "drop"),
    ("image_id", False),
    ("image_id", 1 << 63),
    ("image_id", -5),
    ("image_id", [1]),
    ("image_id", cbor2.CBORTag(9999, 3)),
    ("image_id", "drop"),
    ("series_unique_id", 7),
    ("series_unique_id", None),
    ("series_unique_id", "drop"),
    ("series_unique_id", cbor2.CBORTag(9999, "u")),
    ("type", "start"),
    ("type", "end"),
    ("type", 3),
    ("data", {}),
    ("data", []),
    ("data", "drop"),
    ("data", {"other": 1}),
    ("series_date", "drop"),
    ("series_date", cbor2.CBORTag(0, "not a date")),
    ("user_data", cbor2.CBORTag(9999, {"a": 1})),
]

#: the channel's layouts (_array)
_ARRAYS = [
    "plain",
    "column_major",
    "raw_le",
    "big_endian",
    "lz4",
    "modifier",
    "blob_text",
    "dims3",
    "dims0",
    "dims_bool",
    "dims_neg",
    "not_tag",
    "unknown_tag_inside",
    "short",
    "other_shape",
]


def _array(kind: str, frame: np.ndarray = _FRAME) -> object:
    """The channel's value: as detectors send it, or another layout or a defect of it."""
    y, x = frame.shape
    blob = compression.bslz4_compress(frame)
    typed = {np.dtype(np.uint16): 69, np.dtype(np.uint32): 70}[frame.dtype]
    good = cbor2.CBORTag(typed, cbor2.CBORTag(56500, ["bslz4", frame.dtype.itemsize, blob]))
    return {
        "plain": cbor2.CBORTag(40, [[y, x], good]),
        "column_major": cbor2.CBORTag(1040, [[x, y], good]),
        "raw_le": cbor2.CBORTag(
            40,
            [[y, x], cbor2.CBORTag(typed, frame.astype("<u2" if typed == 69 else "<u4").tobytes())],
        ),
        "big_endian": cbor2.CBORTag(
            40, [[y, x], cbor2.CBORTag(65, cbor2.CBORTag(56500, ["bslz4", 2, blob]))]
        ),
        "lz4": cbor2.CBORTag(
            40, [[y, x], cbor2.CBORTag(typed, cbor2.CBORTag(56500, ["lz4", 2, blob]))]
        ),
        "modifier": cbor2.CBORTag(
            40, [[y, x], cbor2.CBORTag(typed, cbor2.CBORTag(56500, ["bslz4", 4, blob]))]
        ),
        "blob_text": cbor2.CBORTag(
            40, [[y, x], cbor2.CBORTag(typed, cbor2.CBORTag(56500, ["bslz4", 2, "x"]))]
        ),
        "dims3": cbor2.CBORTag(40, [[1, y, x], good]),
        "dims0": cbor2.CBORTag(40, [[0, x], good]),
        "dims_bool": cbor2.CBORTag(40, [[True, x], good]),
        "dims_neg": cbor2.CBORTag(40, [[-y, x], good]),
        "not_tag": [[y, x], good],
        "unknown_tag_inside": cbor2.CBORTag(40, [[y, x], cbor2.CBORTag(9999, good)]),
        "short": cbor2.CBORTag(40, [[y, x]]),
        "other_shape": cbor2.CBORTag(
            40,
            [
                [x, y * 2],
                cbor2.CBORTag(
                    typed,
                    cbor2.CBORTag(
                        56500,
                        ["bslz4", 2, compression.bslz4_compress(np.zeros((x, 2 * y), frame.dtype))],
                    ),
                ),
            ],
        ),
    }[kind]


def _message(
    image_id: int, defect: tuple[str, object] | None, array: str, first_key: bool = True
) -> bytes:
    msg: dict[str, object] = {
        "type": "image",
        "series_id": 3,
        "series_unique_id": "u3",
        "image_id": image_id,
        "real_time": [1, 100],
        "series_date": datetime.datetime(2026, 12, 7, tzinfo=datetime.timezone.utc),
        "start_time": [image_id, 100],
        "stop_time": [image_id + 1, 100],
        "user_data": None,
        "data": {CHANNEL: _array(array)},
    }
    if defect is not None:
        key, value = defect
        if value == "drop":
            msg.pop(key)
        else:
            msg[key] = value
    if not first_key:
        msg = {k: msg[k] for k in [*msg][1:] + [*msg][:1]}
    return V2_MAGIC + cbor2.dumps(msg)


def _bytes_defect(raw: bytes, how: str, where: int) -> bytes:
    if how == "cut":
        return raw[: where % len(raw)]
    if how == "flip":
        pos = where % len(raw)
        return raw[:pos] + bytes([raw[pos] ^ (1 + where % 255)]) + raw[pos + 1 :]
    if how == "magic":
        return b"\xd9\xd9\xf6" + raw[3:]
    return raw


@st.composite
def _images(draw: st.DrawFn) -> bytes:
    # (by index: hypothesis hashes what it samples, and a CBORTag of a dict is not hashable)
    k = draw(st.none() | st.integers(0, len(_FIELD_DEFECTS) - 1))
    defect = None if k is None else _FIELD_DEFECTS[k]
    array = draw(st.sampled_from(["plain"] * 8 + _ARRAYS))
    raw = _message(draw(st.integers(0, 10)), defect, array, first_key=draw(st.integers(0, 9)) > 0)
    how = draw(st.sampled_from(["none"] * 6 + ["cut", "flip", "magic"]))
    return _bytes_defect(raw, how, draw(st.integers(0, 10**6)))


def _alone(raw: bytes) -> tuple | DecodeError:
    try:
        return split_v2_image(raw, CHANNEL)
    except DecodeError as exc:
        return exc


@settings(max_examples=300, deadline=None)
@given(raw=_images())
def test_the_plain_path_gives_the_checked_decoders_image_or_hands_over(raw: bytes) -> None:
    _plain_as_checked(raw)


def test_every_defect_of_a_field_or_array_alone() -> None:
    taken = 0
    for array in _ARRAYS:
        for defect in [None, *_FIELD_DEFECTS]:
            for first_key in (True, False):
                taken += _plain_as_checked(_message(2, defect, array, first_key))
    assert taken  # (images as detectors send them do take the plain path)


def _plain_as_checked(raw: bytes) -> bool:
    """Held to decode_v2 (its own reading of every field), not to split_v2_image, which reads
    images as detectors send them through the plain path too. Whether the plain path took it."""
    plain = split_plain_v2_image(raw, CHANNEL)
    if plain is None:
        return False
    try:
        checked = decode_v2(raw, (CHANNEL,))
    except DecodeError as exc:
        checked = exc
    series_id, unique_id, image_id, y, x, dtype, blob = plain
    try:
        frame = bslz4_array(blob, dtype, (y, x))
    except DecodeError:  # a fault of the payload: found where it is decompressed, on either path
        assert isinstance(checked, DecodeError)
        return True
    assert not isinstance(checked, DecodeError), (
        f"plain path took what the checked decoder refuses: {checked}"
    )
    assert (series_id, unique_id, image_id) == (
        checked.series_id,
        checked.series_unique_id,
        checked.image_id,
    )
    assert frame.dtype == checked.data[CHANNEL].dtype
    np.testing.assert_array_equal(frame, checked.data[CHANNEL])
    return True


def _expected_job(items: list[bytes]) -> tuple[list[int], list[str], list[bytes]]:
    """What a job gives, restated image by image from the checked path alone: the first image
    that splits sets the shape and dtype; an image of another, or with an id past 64 bits, is an error."""
    ids: list[int] = []
    errors: list[str] = []
    first = None
    for raw in items:
        parts = _alone(raw)
        if isinstance(parts, DecodeError):
            errors.append(str(parts))
            continue
        p = parts.payload
        if not (-_ID_MAX <= parts.image_id <= _ID_MAX and -_ID_MAX <= parts.series_id <= _ID_MAX):
            errors.append(
                f"image id {parts.image_id} of series {parts.series_id} does not fit in 64 bits"
            )
            continue
        if first is not None and (p.shape, p.dtype) != first:
            errors.append(
                f"image {parts.image_id} is {p.shape} {p.dtype}, the images before it {first[0]} {first[1]}"
            )
            continue
        first = first or (p.shape, p.dtype)
        ids.append(parts.image_id)
    return ids, errors, []


@settings(max_examples=150, deadline=None)
@given(items=st.lists(_images(), min_size=1, max_size=12))
def test_a_job_gives_each_image_as_the_checked_path_alone(items: list[bytes]) -> None:
    ids, errors, _ = _expected_job(items)
    batch = decode_job(items, CHANNEL, None, decode=False)
    assert batch.image_ids.tolist() == ids
    assert [str(e) for e in batch.errors] == errors


def test_a_job_of_plain_images_with_faults_between_keeps_order_and_chunks() -> None:
    good = [_message(i, None, "plain") for i in range(6)]
    items = [
        good[0],
        _message(90, ("image_id", True), "plain"),
        good[1],
        _message(91, None, "other_shape"),
        good[2],
        _message(1 << 63, None, "plain"),
        good[3],
        good[4][:-3],
        good[5],
    ]
    assert (
        split_plain_v2_image(good[0], CHANNEL) is not None
    )  # (the plain path is the one under test)
    batch = decode_job(items, CHANNEL, None)
    assert batch.image_ids.tolist() == [0, 1, 2, 3, 5]
    assert [str(e).split(" ")[0] for e in batch.errors] == ["field", "image", "image", "truncated"]
    assert "does not fit in 64 bits" in str(batch.errors[2])
    assert batch.raw == [spool_chunk(_BSLZ4, _FRAME.nbytes)] * 5
    np.testing.assert_array_equal(batch.frames, np.stack([_FRAME] * 5))


def test_an_odd_image_leading_a_binned_job_is_the_only_one_refused() -> None:
    """A job's size was its first image's: one of another size leading a job of the series
    (binned by its reducer) made every other image of the job an error ("is (16, 16), the
    images before it (8, 32)"), and the job's frames were then dropped as unlike the series:
    up to a job of the detector's images lost for one bad image. The series' size is its
    reducer's."""
    from cryoptycho.protocols.dectris.binning import FrameReducer

    reducer = FrameReducer.build(_FRAME.shape, _FRAME.dtype, crop=16, bin=2)
    items = [_message(0, None, "other_shape"), *(_message(i, None, "plain") for i in range(1, 6))]
    batch = decode_job(items, CHANNEL, reducer)
    assert batch.image_ids.tolist() == [1, 2, 3, 4, 5], [str(e) for e in batch.errors]
    assert [str(e) for e in batch.errors] == ["image 0 is (16, 32) uint16, its series images (16, 16) uint16"]
    assert batch.shape == _FRAME.shape and batch.reducer is reducer
    np.testing.assert_array_equal(batch.counts, np.stack([reducer.reduce_batch(_FRAME[None])[0][0]] * 5))
    assert batch.raw == [spool_chunk(_BSLZ4, _FRAME.nbytes)] * 5


def test_an_image_of_another_dtype_leading_a_binned_job_is_the_only_one_refused() -> None:
    """As its size, a binned job's dtype is its series' (the reducer's): a uint32 image of the
    series' size leading a job of uint16 images made each of them an error, and the job's
    frames left as uint32 for a uint16 spool."""
    import pickle

    from cryoptycho.protocols.dectris.binning import FrameReducer

    # (as a worker process gets it: its dtype is another object than the decoder's)
    reducer = pickle.loads(pickle.dumps(FrameReducer.build(_FRAME.shape, _FRAME.dtype, crop=16, bin=2)))
    wide = V2_MAGIC + cbor2.dumps({**cbor2.loads(_message(0, None, "plain")[len(V2_MAGIC):]),
                                   "data": {CHANNEL: _array("plain", _FRAME.astype(np.uint32))}})
    items = [wide, *(_message(i, None, "plain") for i in range(1, 6))]
    batch = decode_job(items, CHANNEL, reducer)
    assert batch.image_ids.tolist() == [1, 2, 3, 4, 5], [str(e) for e in batch.errors]
    assert [str(e) for e in batch.errors] == ["image 0 is (16, 16) uint32, its series images (16, 16) uint16"]
    assert batch.dtype == np.uint16 and batch.raw == [spool_chunk(_BSLZ4, _FRAME.nbytes)] * 5


@pytest.mark.parametrize("how", ["cut", "flip", "magic"])
def test_a_corrupt_message_is_handed_to_the_checked_path(how: str) -> None:
    raw = _bytes_defect(_message(1, None, "plain"), how, 7 if how != "cut" else 40)
    assert split_plain_v2_image(raw, CHANNEL) is None
    with pytest.raises(DecodeError):
        split_v2_image(raw, CHANNEL)


@pytest.mark.parametrize("array", ["raw_le", "lz4"])
def test_an_image_the_plain_path_does_not_take_is_loaded_once(array: str, monkeypatch) -> None:
    """A detector set to send uncompressed or LZ4 images: the plain path loads each message,
    finds it is not bslz4 and hands it on — the checked path reads the message it loaded
    instead of loading it again (review: uncompressed jobs cost 69 → 83 µs an image). (A
    message of another tag layout, e.g. column-major, is loaded again with the checked path's
    tag hook: that load reads it differently.)"""
    items = [_message(i, None, array) for i in range(6)]
    alone = [split_v2_image(raw, CHANNEL) for raw in items]
    loads = []
    real = cbor2.loads
    monkeypatch.setattr(cbor2, "loads", lambda *a, **k: loads.append(1) or real(*a, **k))
    batch = decode_job(items, CHANNEL, None, decode=False)
    assert list(batch.image_ids) == [parts[2] for parts in alone]
    assert len(loads) == len(items)
