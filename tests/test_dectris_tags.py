"""Unknown CBOR tags in DECTRIS Stream V2 messages. DECTRIS' reference decoder (the ``tag_hook``
of its Stream V2 client) decodes tags 40, 1040, 64–87 and 56500 and hands any other tag back
undecoded; ours skips them too, and reads a value we use through an unknown tag as its
content. Before, a start or image with such a tag on a field we read was undecodable (its
series skipped, its images lost)."""

from __future__ import annotations

from typing import Any

import cbor2
import numpy as np
from cryoptycho.protocols.dectris.convert import BridgeConfig, SeriesConverter
from cryoptycho.protocols.dectris.decode import V2_MAGIC, decode_v2, split_v2_image
from cryoptycho.protocols.dectris.schema import Image, SeriesStart
from cryoptycho.protocols.dectris.sim import SimSeries, v2_messages
from cryoptycho.protocols.messages import Frames, ScanEnd, ScanStart

UNKNOWN = 44444  # a tag no decoder here knows


def _tag(value: Any) -> cbor2.CBORTag:
    return cbor2.CBORTag(UNKNOWN, value)


def _series(n: int = 4) -> tuple[np.ndarray, list[bytes]]:
    frames = np.random.default_rng(1).poisson(2, (n, 32, 32)).astype(np.uint16)
    user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [2, n // 2], "step_m": [2e-10, 2e-10]},
                           "detector_pixel_angle_rad": 5e-4, "scan_id": "tagged"}}
    return frames, list(v2_messages(SimSeries(frames, compression="bslz4", user_data=user)))


def _retag(raw: bytes, change: Any) -> bytes:
    msg = cbor2.loads(raw[len(V2_MAGIC):])
    msg = change(dict(msg))
    return V2_MAGIC + cbor2.dumps(msg)


def _tag_start(msg: dict) -> dict:
    for key in ("series_unique_id", "incident_energy", "number_of_images", "user_data", "channels"):
        msg[key] = _tag(msg[key])
    msg["beam_center_x"] = _tag(_tag(msg["beam_center_x"]))  # tags on tags
    msg["future_key"] = _tag({"nested": _tag([1, 2])})  # a field nobody reads, as DECTRIS' decoder
    mask = np.zeros((32, 32), np.uint32)
    mask[3, 5] = 1
    # a column-major (tag 1040) mask, its typed array behind an unknown tag
    msg["pixel_mask"] = {"threshold_1": cbor2.CBORTag(1040, [[32, 32], _tag(cbor2.CBORTag(70, mask.T.tobytes()))])}
    return msg


def _tag_image(msg: dict) -> dict:
    for key in ("series_unique_id", "image_id", "start_time"):
        msg[key] = _tag(msg[key])
    msg["data"] = _tag({k: _tag(v) for k, v in msg["data"].items()})
    return msg


def test_unknown_tags_on_the_fields_we_read_are_skipped() -> None:
    frames, messages = _series()
    start = decode_v2(_retag(messages[0], _tag_start))
    plain = decode_v2(messages[0])
    assert isinstance(start, SeriesStart)
    assert (start.series_unique_id, start.energy_ev, start.number_of_images, start.channels) == (
        plain.series_unique_id, plain.energy_ev, plain.number_of_images, plain.channels)
    assert start.user_data == plain.user_data and start.beam_center_px == plain.beam_center_px
    assert start.raw["future_key"] == {"nested": [1, 2]}
    expected_mask = np.zeros((32, 32), np.uint32)
    expected_mask[3, 5] = 1  # (column-major: the bytes of its transpose)
    np.testing.assert_array_equal(start.pixel_mask["threshold_1"], expected_mask)
    for k, raw in enumerate(messages[1:-1]):
        tagged = _retag(raw, _tag_image)
        image = decode_v2(tagged)
        assert isinstance(image, Image) and image.image_id == k
        assert image.start_time_s == decode_v2(raw).start_time_s
        np.testing.assert_array_equal(image.data["threshold_1"], frames[k])
        parts, want = split_v2_image(tagged, "threshold_1"), split_v2_image(raw, "threshold_1")
        assert parts == want  # the same ids and the same still compressed payload


def test_a_series_with_unknown_tags_becomes_its_scan() -> None:
    frames, messages = _series()
    tagged = [_retag(messages[0], _tag_start), *(_retag(m, _tag_image) for m in messages[1:-1]), messages[-1]]
    conv = SeriesConverter(BridgeConfig())
    out = [o for m in tagged for o in conv.feed(decode_v2(m))]
    assert isinstance(out[0], ScanStart) and out[0].scan_id == "tagged-series1"
    assert out[0].mask[3, 5] == 0 and int(out[0].mask.sum()) == 32 * 32 - 1  # the tagged mask applied
    got = np.concatenate([o.data for o in out if isinstance(o, Frames)])
    expected = frames.copy()
    expected[:, 3, 5] = 0  # a masked pixel counts nothing
    np.testing.assert_array_equal(got, expected)
    assert isinstance(out[-1], ScanEnd) and out[-1].frame_count == len(frames)
    assert conv.stats["failed_series"] == 0


def test_a_message_inside_an_unknown_tag_and_tagged_map_keys_decode_as_plain_ones() -> None:
    """Unknown tags are skipped as the message loads (one tag hook), on a map's key as well as on
    values, and around the whole message: an image inside one was undecodable ("field 'data' of
    a image message has type frozendict": inside a tag cbor2 freezes the maps)."""
    frames, messages = _series()
    start = _retag(messages[0], lambda m: _tag({**m, "user_data": {_tag("k"): _tag({"a": 1})}}))
    got = decode_v2(start)
    assert isinstance(got, SeriesStart) and got.user_data == {"k": {"a": 1}}
    assert got.series_unique_id == decode_v2(messages[0]).series_unique_id
    raw = messages[1]
    tagged = _retag(raw, _tag)
    assert split_v2_image(tagged, "threshold_1") == split_v2_image(raw, "threshold_1")
    np.testing.assert_array_equal(decode_v2(tagged).data["threshold_1"], frames[0])
