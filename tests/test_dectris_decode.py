"""DECTRIS Stream V2 / V1 decoding: golden recorded messages, codecs, malformed input."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import cbor2
import numpy as np
import pytest
from cryoptycho.protocols.dectris.codec import (
    bslz4_compress,
    bslz4_decompress,
    lz4_hdf5_compress,
    lz4_hdf5_decompress,
    v1_decode,
    v1_encode,
)
from cryoptycho.protocols.dectris.decode import V1_CHANNEL, V1Parser, decode_v2
from cryoptycho.protocols.dectris.schema import DecodeError, Image, SeriesEnd, SeriesStart
from cryoptycho.protocols.dectris.sim import SimSeries, v1_messages, v2_messages
from hypothesis import given, settings
from hypothesis import strategies as st

compression = pytest.importorskip("dectris.compression")

DATA = Path(__file__).resolve().parents[1] / "shared" / "data" / "dectris-stream2"
if not DATA.exists():  # the shared folder sits beside the checkout in CI
    DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dectris-stream2"
RECORDED = sorted(DATA.glob("*/*.cbor"))
TAG_DTYPE = {64: np.uint8, 69: np.uint16, 70: np.uint32}


def _raw_channels(raw: bytes) -> dict[str, tuple[list[int], int, str, int, bytes]]:
    """Channel → (dims, typed-array tag, algorithm, modifier, payload), read with cbor2 alone."""
    msg = cbor2.loads(raw[3:])
    out = {}
    for name, md in msg["data"].items():
        assert md.tag == 40
        dims, typed = md.value
        comp = typed.value
        assert comp.tag == 56500
        out[name] = (list(dims), typed.tag, comp.value[0], comp.value[1], comp.value[2])
    return out


@pytest.mark.skipif(not RECORDED, reason="recorded DECTRIS messages (shared/data) not present")
@pytest.mark.parametrize("path", [p for p in RECORDED if p.stem != "000011"], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden_image_matches_dectris_reference_decompressor(path: Path) -> None:
    raw = path.read_bytes()
    msg = decode_v2(raw)
    assert isinstance(msg, Image)
    reference = _raw_channels(raw)
    assert set(msg.data) == set(reference) == {"threshold_1", "threshold_2", "difference"}
    for name, (dims, tag, algorithm, modifier, payload) in reference.items():
        dtype = np.dtype(TAG_DTYPE[tag])
        expected = np.frombuffer(
            compression.decompress(payload, algorithm, elem_size=dtype.itemsize), dtype
        ).reshape(dims)
        assert dims == [514, 1030]
        assert msg.data[name].dtype == dtype
        assert msg.data[name].shape == (514, 1030)
        np.testing.assert_array_equal(msg.data[name], expected)
    # the recording's exposure is real_time = num/den on a 50 MHz time base
    assert msg.real_time_s == Fraction(*cbor2.loads(raw[3:])["real_time"])


@pytest.mark.skipif(not RECORDED, reason="recorded DECTRIS messages (shared/data) not present")
@pytest.mark.parametrize("folder", ["r500k_bm_bslz4_16bit", "r500k_bm_lz4_16bit"])
def test_golden_image_and_end_ids_are_consistent(folder: str) -> None:
    images = [decode_v2(p.read_bytes()) for p in sorted((DATA / folder).glob("00000[12].cbor"))]
    end = decode_v2((DATA / folder / "000011.cbor").read_bytes())
    assert isinstance(end, SeriesEnd)
    assert [i.image_id for i in images] == list(range(len(images)))
    for image in images:
        assert (image.series_id, image.series_unique_id) == (end.series_id, end.series_unique_id)
        assert image.series_unique_id == cbor2.loads((DATA / folder / "000011.cbor").read_bytes()[3:])["series_unique_id"]


@pytest.mark.skipif(not RECORDED, reason="recorded DECTRIS messages (shared/data) not present")
def test_channel_selection_decodes_only_the_requested_channel() -> None:
    raw = (DATA / "r500k_bm_bslz4_16bit" / "000001.cbor").read_bytes()
    msg = decode_v2(raw, channels=["threshold_2"])
    assert list(msg.data) == ["threshold_2"]
    with pytest.raises(DecodeError, match="no channel 'threshold_9'"):
        decode_v2(raw, channels=["threshold_9"])


@pytest.mark.skipif(not RECORDED, reason="recorded DECTRIS messages (shared/data) not present")
def test_truncated_recorded_message_is_a_clear_error() -> None:
    raw = (DATA / "r500k_bm_bslz4_8bit" / "000001.cbor").read_bytes()
    with pytest.raises(DecodeError, match="truncated"):
        decode_v2(raw[: len(raw) // 2])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
@pytest.mark.parametrize("n", [1, 7, 8, 1000, 4096 + 13])
def test_bslz4_and_lz4_framing_agree_with_the_reference(dtype: type, n: int) -> None:
    rng = np.random.default_rng(n)
    arr = rng.poisson(3, n).astype(dtype)
    elem = arr.dtype.itemsize
    packed = bslz4_compress(arr)
    assert compression.decompress(packed, "bslz4", elem_size=elem) == arr.tobytes()
    assert bslz4_decompress(packed, elem) == arr.tobytes()
    packed = lz4_hdf5_compress(arr, block_bytes=1024)
    assert compression.decompress(packed, "lz4") == arr.tobytes()
    assert lz4_hdf5_decompress(packed) == arr.tobytes()


def test_lz4_framing_stores_incompressible_blocks_raw() -> None:
    noise = np.random.default_rng(0).integers(0, 2**32, 600, dtype=np.uint32)
    packed = lz4_hdf5_compress(noise, block_bytes=1024)
    assert len(packed) == 12 + 3 * 4 + noise.nbytes  # header, three block lengths, raw bytes
    assert compression.decompress(packed, "lz4") == noise.tobytes()
    assert lz4_hdf5_decompress(packed) == noise.tobytes()


def test_truncated_compressed_payloads_are_decode_errors() -> None:
    arr = np.arange(5000, dtype=np.uint16)
    for packed, decoder in ((bslz4_compress(arr), lambda b: bslz4_decompress(b, 2)),
                            (lz4_hdf5_compress(arr), lz4_hdf5_decompress)):
        for cut in (5, 20, len(packed) - 3):
            with pytest.raises(DecodeError, match="truncated"):
                decoder(packed[:cut])


@pytest.mark.parametrize("encoding", ["<", "lz4<", "bs16-lz4<"])
def test_v1_encodings_round_trip(encoding: str) -> None:
    arr = np.random.default_rng(1).poisson(2, (30, 20)).astype(np.uint16)
    flat = v1_decode(encoding, v1_encode(encoding, arr), np.dtype(np.uint16), arr.size)
    np.testing.assert_array_equal(flat.reshape(30, 20), arr)


def test_v1_bitshuffle_with_zeroed_header_uses_default_block() -> None:
    # LiberTEM's simulator writes 12 zero bytes instead of the size/block header.
    arr = np.arange(3000, dtype=np.uint32)
    packed = bslz4_compress(arr)
    zeroed = bytes(8) + bytes(4) + packed[12:]
    flat = v1_decode("bs32-lz4<", zeroed, np.dtype(np.uint32), arr.size)
    np.testing.assert_array_equal(flat, arr)


def _v2(msg: dict) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(55799, msg))


def _md(arr: np.ndarray, tag: int) -> cbor2.CBORTag:
    return cbor2.CBORTag(40, [list(arr.shape), cbor2.CBORTag(tag, arr.tobytes())])


def test_start_fields_units_tags_and_unknown_keys() -> None:
    mask = np.zeros((4, 6), np.uint32)
    mask[1, 2] = 2
    raw = _v2({
        "type": "start", "series_id": 7, "series_unique_id": "01ABC",
        "arm_date": cbor2.CBORTag(0, "2023-02-10T15:49:05.281+01:00"),
        "beam_center_x": 2.5, "beam_center_y": 1.5, "channels": ["threshold_1", "threshold_2"],
        "image_size_x": 6, "image_size_y": 4, "image_dtype": "uint16", "incident_energy": 300000.0,
        "incident_wavelength": 0.01969, "pixel_size_x": 75e-6, "pixel_size_y": 75e-6,
        "number_of_images": 12, "saturation_value": 1000, "future_key": {"nested": [1, 2]},
        "flatfield": {"threshold_1": _md(np.ones((4, 6), "<f4"), 85)},
        "pixel_mask": {"threshold_1": _md(mask, 70)},
        "user_data": {"cryoptycho": {"scan": {"kind": "raster", "shape": [3, 4], "step_m": [1e-10, 1e-10]}}},
    })
    start = decode_v2(raw)
    assert isinstance(start, SeriesStart)
    assert start.series_id == 7 and start.channels == ("threshold_1", "threshold_2")
    assert start.image_shape == (4, 6) and start.image_dtype == np.uint16
    assert start.beam_center_px == (1.5, 2.5)
    assert start.wavelength_m == pytest.approx(1.969e-12)
    assert start.arm_date == datetime.fromisoformat("2023-02-10T15:49:05.281+01:00")
    np.testing.assert_array_equal(start.pixel_mask["threshold_1"], mask)
    assert start.raw["future_key"] == {"nested": [1, 2]}
    assert start.user_data["cryoptycho"]["scan"]["shape"] == [3, 4]


def test_image_with_tag30_rationals_and_big_endian_typed_array() -> None:
    arr = np.arange(12, dtype=">u2").reshape(3, 4)
    raw = _v2({"type": "image", "series_id": 1, "series_unique_id": "u", "image_id": 3,
               "real_time": cbor2.CBORTag(30, [1, 1000]), "start_time": [3, 1000],
               "data": {"threshold_1": _md(arr, 65)}})
    img = decode_v2(raw)
    assert img.real_time_s == Fraction(1, 1000) and img.start_time_s == Fraction(3, 1000)
    np.testing.assert_array_equal(img.data["threshold_1"], arr.astype(np.uint16))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (cbor2.dumps({"type": "end", "series_id": 1}), "55799"),
        (_v2({"series_id": 1, "type": "end"}), "first key"),
        (_v2({"type": "banana"}), "unknown Stream V2 message type"),
        (_v2({"type": "end"}), "series_id"),
        (_v2({"type": "end", "series_id": "one"}), "series_id"),
        (_v2({"type": "image", "series_id": 1, "image_id": 0, "data": {"threshold_1": cbor2.CBORTag(
            40, [[2, 2], cbor2.CBORTag(69, cbor2.CBORTag(56500, ["zstd9", 0, b"xx"]))])}}), "zstd9"),
        (_v2({"type": "image", "series_id": 1, "image_id": 0, "data": {"threshold_1": cbor2.CBORTag(
            40, [[3, 3], cbor2.CBORTag(69, bytes(8))])}}), "dims"),
        (_v2({"type": "image", "series_id": 1, "image_id": 0, "real_time": [1, 0], "data": {}}), "real_time"),
    ],
    ids=["no-magic", "type-not-first", "unknown-type", "missing-field", "wrong-type",
         "unknown-compression", "dims-mismatch", "zero-denominator"],
)
def test_malformed_v2_messages_name_the_problem(raw: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_v2(raw)


def _feed_all(parser: V1Parser, messages: list[list[bytes]]) -> list:
    out = []
    for parts in messages:
        for i, part in enumerate(parts):
            out += parser.feed(part, i < len(parts) - 1)
    return out


@pytest.mark.parametrize("detail", ["all", "basic", "none"])
@pytest.mark.parametrize("split", [False, True])
def test_v1_header_detail_and_split_headers(detail: str, split: bool) -> None:
    frames = np.random.default_rng(2).poisson(1, (3, 6, 8)).astype(np.uint16)
    mask = np.zeros((6, 8), np.uint32)
    mask[0, 7] = 1
    series = SimSeries(frames, series_id=4, header_detail=detail, pixel_mask=mask,
                       user_data={"cryoptycho": {"k": 1}}, image_user_data="static text")
    out = _feed_all(V1Parser(), list(v1_messages(series, split_header=split)))
    assert [type(m).__name__ for m in out] == ["SeriesStart", "Image", "Image", "Image", "SeriesEnd"]
    start = out[0]
    assert start.series_id == 4 and start.header_detail == detail
    assert start.user_data == {"cryoptycho": {"k": 1}}
    if detail == "none":
        assert start.image_shape is None
    else:
        assert start.image_shape == (6, 8) and start.number_of_images == 3
    if detail == "all":
        np.testing.assert_array_equal(start.pixel_mask[V1_CHANNEL], mask)
    for img in out[1:4]:
        np.testing.assert_array_equal(img.data[V1_CHANNEL], frames[img.image_id])
        assert img.user_data == "static text"


def test_v1_message_broken_off_is_reported_and_the_next_one_decoded() -> None:
    frames = np.ones((2, 4, 4), np.uint8)
    msgs = list(v1_messages(SimSeries(frames)))
    header, first, second, end = msgs
    errors: list[Exception] = []
    parser = V1Parser(on_error=errors.append)
    out = _feed_all(parser, [header, first[:2], second, end])  # image 0 lost its data and config
    assert [type(m).__name__ for m in out] == ["SeriesStart", "Image", "SeriesEnd"]
    assert out[1].image_id == 1
    assert len(errors) == 1 and "truncated: it ended after 2 of 4 parts" in str(errors[0])


def test_v1_split_header_broken_off_by_an_image_is_reported() -> None:
    frames = np.ones((1, 4, 4), np.uint8)
    header, image, end = list(v1_messages(SimSeries(frames, header_detail="all")))
    errors: list[Exception] = []
    out = _feed_all(V1Parser(on_error=errors.append), [[p] for p in header[:3]] + [image, end])
    assert [type(m).__name__ for m in out] == ["Image", "SeriesEnd"]
    assert "header message broken off after 3 parts by a new dimage-1.0 part" in str(errors[0])


def test_v1_corrupt_data_part_fails_its_hash() -> None:
    frames = np.ones((1, 4, 4), np.uint8)
    header, image, end = list(v1_messages(SimSeries(frames, compression="none")))
    bad = list(image)
    bad[2] = bytes(len(bad[2]))
    errors: list[Exception] = []
    out = _feed_all(V1Parser(on_error=errors.append), [header, bad, end])
    assert [type(m).__name__ for m in out] == ["SeriesStart", "SeriesEnd"]
    assert "MD5" in str(errors[0])


def test_v1_leading_binary_parts_are_skipped_and_counted() -> None:
    parser = V1Parser()
    assert parser.feed(b"\x00\x01binary leftovers", False) == []
    assert parser.feed(json.dumps({"htype": "dconfig-1.0"}).encode(), False) == []
    assert parser.skipped_parts == 2
    (end,) = parser.feed(json.dumps({"htype": "dseries_end-1.0", "series": 9}).encode(), False)
    assert end == SeriesEnd(1, 9)


def test_v1_size_mismatch_is_a_truncation_error() -> None:
    frames = np.ones((1, 4, 4), np.uint16)
    header, image, _ = list(v1_messages(SimSeries(frames, compression="none")))
    bad = list(image)
    bad[2] = bad[2][:-2]
    bad[0] = json.dumps({**json.loads(bad[0]), "hash": hashlib.md5(bad[2]).hexdigest()}).encode()
    with pytest.raises(DecodeError, match="data part is 30 bytes, dimage_d says 32"):
        _feed_all(V1Parser(), [header, bad])


@pytest.mark.parametrize("comp", ["bslz4", "lz4", "none"])
def test_v2_simulated_series_round_trips(comp: str) -> None:
    frames = {"threshold_1": np.random.default_rng(3).poisson(2, (3, 5, 7)).astype(np.uint32),
              "threshold_2": np.zeros((3, 5, 7), np.uint32)}
    out = [decode_v2(m) for m in v2_messages(SimSeries(frames, compression=comp))]
    assert isinstance(out[0], SeriesStart) and out[0].channels == ("threshold_1", "threshold_2")
    for img in out[1:-1]:
        for name, arr in frames.items():
            np.testing.assert_array_equal(img.data[name], arr[img.image_id])
    assert isinstance(out[-1], SeriesEnd)


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([np.uint8, np.uint16, np.uint32]),
    n=st.integers(1, 3000),
    block_elems=st.sampled_from([8, 64, 512, 2048]),
    seed=st.integers(0, 2**16),
)
def test_codecs_agree_with_the_reference_for_any_size_and_block(dtype: type, n: int, block_elems: int,
                                                                  seed: int) -> None:
    arr = np.random.default_rng(seed).poisson(5, n).astype(dtype)
    block = block_elems * arr.dtype.itemsize
    for algorithm, packed, ours in (
        ("bslz4", bslz4_compress(arr, block), lambda b: bslz4_decompress(b, arr.dtype.itemsize)),
        ("lz4", lz4_hdf5_compress(arr, block), lz4_hdf5_decompress),
    ):
        assert compression.decompress(packed, algorithm, elem_size=arr.dtype.itemsize) == arr.tobytes()
        assert ours(packed) == arr.tobytes()


def _v2(msg: dict) -> bytes:
    return b"\xd9\xd9\xf7" + cbor2.dumps(msg)


def _set_dims(msg: dict, dims: list[int]) -> None:
    tag = msg["data"]["threshold_1"]
    msg["data"]["threshold_1"] = cbor2.CBORTag(40, [dims, tag.value[1]])


#: one defect each, applied to a good image message (a dict as cbor2 reads it)
_IMAGE_DEFECTS = {
    "none": lambda m: None,
    "image_id_bool": lambda m: m.update(image_id=True),
    "image_id_missing": lambda m: m.pop("image_id"),
    "series_id_text": lambda m: m.update(series_id="1"),
    "unique_id_number": lambda m: m.update(series_unique_id=5),
    "data_list": lambda m: m.update(data=[1]),
    "channel_missing": lambda m: m["data"].pop("threshold_1"),
    "channel_not_tag_40": lambda m: m["data"].update(threshold_1=b"\x00" * 8),
    "dims_zero": lambda m: _set_dims(m, [0, 8]),
    "dims_three": lambda m: _set_dims(m, [1, 8, 8]),
    "not_bslz4": lambda m: m["data"].update(threshold_1=cbor2.CBORTag(40, [[8, 8], cbor2.CBORTag(69, b"\x01\x00" * 64)])),
}


@pytest.mark.parametrize("defect", sorted(_IMAGE_DEFECTS))
def test_the_workers_image_split_agrees_with_the_full_decoder(defect: str) -> None:
    """split_v2_image (the decoding workers' per-image parse, written without decode_v2's
    per-field helpers for speed) gives the ids and pixels decode_v2 gives, and the same
    named error for each defect."""
    from cryoptycho.protocols.dectris.codec import bslz4_array
    from cryoptycho.protocols.dectris.decode import split_v2_image

    frames = np.arange(2 * 64, dtype=np.uint16).reshape(2, 8, 8)
    raw = list(v2_messages(SimSeries(frames, compression="bslz4", series_unique_id="u1")))[2]
    msg = cbor2.loads(raw[3:])
    _IMAGE_DEFECTS[defect](msg)
    raw = _v2(msg)
    try:
        full = decode_v2(raw, ("threshold_1",))
    except DecodeError as exc:
        with pytest.raises(DecodeError) as split_exc:
            split_v2_image(raw, "threshold_1")
        assert str(split_exc.value) == str(exc)
        return
    assert defect in ("none", "not_bslz4")
    series_id, unique_id, image_id, payload = split_v2_image(raw, "threshold_1")
    assert (series_id, unique_id, image_id) == (full.series_id, full.series_unique_id, full.image_id) == (1, "u1", 1)
    pixels = payload.array if payload.bslz4 is None else bslz4_array(payload.bslz4, payload.dtype, payload.shape)
    np.testing.assert_array_equal(pixels, full.data["threshold_1"])
    assert (payload.bslz4 is None) == (defect == "not_bslz4")


def test_the_workers_image_split_refuses_other_messages() -> None:
    from cryoptycho.protocols.dectris.decode import split_v2_image

    start, _, end = v2_messages(SimSeries(np.zeros((1, 8, 8), np.uint16), compression="bslz4"))
    for raw, kind in ((start, "start"), (end, "end")):
        with pytest.raises(DecodeError, match=f"a '{kind}' message announced itself as an image"):
            split_v2_image(raw, "threshold_1")


# --- the workers' fast path for images in the DECTRIS layout (decode._split_dectris_image) ---

_DECTRIS_ORDER = ("type", "series_id", "series_unique_id", "image_id", "real_time", "series_date",
                  "start_time", "stop_time", "user_data", "data")


def _channel(draw: st.DrawFn) -> cbor2.CBORTag:
    dims = draw(st.sampled_from([[8, 8], [192, 192], [514, 1030], [3, 300], [0, 8]]))
    tag = draw(st.sampled_from([64, 69, 70, 71, 69, 70, 65, 72, 85]))  # u8 u16 u32 u64, big-endian u16, s8, f32 LE
    item = {64: 1, 69: 2, 70: 4, 71: 8, 65: 2, 72: 1, 85: 4}[tag]
    modifier = draw(st.sampled_from([item, item, item, 3]))
    algorithm = draw(st.sampled_from(["bslz4", "bslz4", "bslz4", "lz4"]))
    return cbor2.CBORTag(40, [dims, cbor2.CBORTag(tag, cbor2.CBORTag(56500, [algorithm, modifier,
                                                                              draw(st.binary(max_size=40))]))])


@st.composite
def _image_messages(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """An image message as detectors send it, with up to two defects drawn (a field of another
    type or missing, another key order, an extra key) and maybe cut short or a byte changed."""
    names = draw(st.lists(st.sampled_from(["threshold_1", "threshold_2", "difference", "ü"]),
                          min_size=1, max_size=3, unique=True))
    u = st.integers(0, 2**64 - 1)
    msg = {
        "type": "image",
        "series_id": draw(u),
        "series_unique_id": draw(st.one_of(st.none(), st.text(max_size=30))),
        "image_id": draw(u),
        "real_time": [draw(u), draw(u)],
        "series_date": draw(st.datetimes(timezones=st.just(timezone.utc))),
        "start_time": [draw(u), draw(u)],
        "stop_time": [draw(u), draw(u)],
        "user_data": draw(st.one_of(st.none(), st.just([1, "💙"]),
                                    st.dictionaries(st.text(max_size=5), u, max_size=3))),
        "data": {name: _channel(draw) for name in names},
    }
    defects = {
        "type": lambda: msg.update(type="end"),
        "series_id": lambda: msg.update(series_id=draw(st.sampled_from([-1, "1", 1.0]))),
        "unique_id": lambda: msg.update(series_unique_id=7),
        "image_id": lambda: msg.update(image_id=None),
        "time": lambda: msg.update(start_time=draw(st.sampled_from([Fraction(1, 3), [1.5, 2], [1]]))),
        "date": lambda: msg.update(series_date=draw(st.sampled_from([cbor2.CBORTag(0, "not a date"),
                                                                      cbor2.CBORTag(0, 5), "2026"]))),
        "user_data": lambda: msg.update(user_data=cbor2.CBORTag(0, "bad")),
        "missing": lambda: msg.pop(draw(st.sampled_from(_DECTRIS_ORDER))),
        "extra": lambda: msg.update(extra=1),
    }
    for name in draw(st.lists(st.sampled_from(sorted(defects)), max_size=2)):
        defects[name]()
    keys = list(msg)
    if draw(st.integers(0, 4)) == 0:
        keys = draw(st.permutations(keys))
    raw = bytearray(_v2({k: msg[k] for k in keys}))
    cut = draw(st.integers(0, len(raw) - 1))
    mutation = draw(st.sampled_from(["none", "none", "none", "truncate", "flip", "insert"]))
    if mutation == "truncate":
        del raw[cut:]
    elif mutation == "flip":
        raw[cut] ^= draw(st.integers(1, 255))
    elif mutation == "insert":
        raw.insert(cut, draw(st.integers(0, 255)))
    return bytes(raw), draw(st.sampled_from([None, names[0], names[-1], "nope"]))


@settings(max_examples=250, deadline=None)
@given(_image_messages())
def test_the_dectris_layout_fast_path_answers_as_the_full_decoder_or_not_at_all(case: tuple) -> None:
    """Whatever the message (any field of the wrong type or missing, another key order, extra
    keys, several channels, other dtypes and codecs, bad dates, then truncated, a byte flipped or
    inserted): where the fast path answers, the full decoder gives the same answer, not an error."""
    from cryoptycho.protocols.dectris.decode import _split_dectris_image, _split_v2_full

    raw, channel = case
    fast = _split_dectris_image(raw, channel)
    if fast is None:
        return
    assert _split_v2_full(raw, channel) == fast


def test_dectris_and_simulated_images_take_the_fast_path() -> None:
    """The layout the fast path reads is the detectors': DECTRIS' recorded EIGER2 images (three
    bslz4 channels, user data) and our simulator's; every channel agrees with the full decoder.
    An lz4 image and a channel the image lacks are left to the full decoder (its error)."""
    from cryoptycho.protocols.dectris.decode import (
        _split_dectris_image,
        _split_v2_full,
        split_v2_image,
    )

    images = [raw for raw in v2_messages(SimSeries(np.arange(3 * 64, dtype=np.uint16).reshape(3, 8, 8),
                                                   compression="bslz4", series_unique_id="u1"))
              if raw[3:].startswith(b"\xaa")]
    recorded = [p.read_bytes() for p in RECORDED if "bslz4" in p.parent.name and p.name != "000011.cbor"]
    assert len(images) == 3
    for raw in images + recorded:
        names = list(cbor2.loads(raw[3:])["data"])
        for channel in (None, *names):
            fast = _split_dectris_image(raw, channel)
            assert fast is not None and fast == _split_v2_full(raw, channel)
        assert _split_dectris_image(raw, "nope") is None
        with pytest.raises(DecodeError, match="has no channel 'nope'"):
            split_v2_image(raw, "nope")
    for p in RECORDED:
        if "lz4_16bit" in p.parent.name and p.name == "000001.cbor":
            assert _split_dectris_image(p.read_bytes(), None) is None
