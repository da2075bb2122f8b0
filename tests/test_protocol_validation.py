"""Every validation rule: send the bad message, check the named field and rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from cryoptycho.protocols.compression import compress
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.limits import Limits
from cryoptycho.protocols.messages import (
    ErrorEvent,
    Frames,
    Metrics,
    ProbeModelSpec,
    RasterScan,
    Reply,
    Request,
    ScanEnd,
    ScanEvent,
    decode,
    encode,
)
from cryoptycho.protocols.topics import decode_event, encode_event
from cryoptycho.protocols.wire import read_header
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_helpers import frames, scan_start

SCANS = {"s1": scan_start()}
STREAMED = {"s1": scan_start(raster=None)}


def edit(parts: list[Any], fn: Callable[[dict], None]) -> list[Any]:
    """Re-pack the header after ``fn`` changed it (arrays untouched)."""
    header = msgpack.unpackb(parts[0])
    fn(header)
    return [msgpack.packb(header), *parts[1:]]


def setter(path: str, value: Any) -> Callable[[dict], None]:
    """Set (or DELETE) the header key at a dotted path."""

    def fn(h: dict) -> None:
        *keys, leaf = path.split(".")
        for k in keys:
            h = h[k]
        if value is DELETE:
            del h[leaf]
        else:
            h[leaf] = value

    return fn


DELETE = object()


def _nested(depth: int) -> dict:
    tree: dict = {}
    for _ in range(depth):
        tree = {"a": tree}
    return tree


def arr(i: int, key: str, value: Any) -> Callable[[dict], None]:
    def fn(h: dict) -> None:
        if value is DELETE:
            del h["arrays"][i][key]
        else:
            h["arrays"][i][key] = value

    return fn


def start_parts(**over) -> list[Any]:
    return encode(scan_start(**over))


def frame_parts(**over) -> list[Any]:
    return encode(frames(**over))


# (id, parts, scans, limits, field, rule)
CASES: list[tuple[str, Callable[[], list[Any]], Any, Limits | None, str, str]] = [
    # envelope
    ("empty", list, None, None, "message", "part_count"),
    (
        "message too big",
        lambda: frame_parts(n=8),
        None,
        Limits(max_message_bytes=4096),
        "message",
        "max_message_bytes",
    ),
    (
        "header too big",
        lambda: encode(ScanEvent("s", "accepted", "x" * 400)),
        None,
        Limits(max_header_bytes=256),
        "header",
        "max_header_bytes",
    ),
    (
        "a list longer than the header's values",
        lambda: [msgpack.packb({"protocol": "cryoptycho", "version": 1, "x": [0] * 300})],
        None,
        Limits(max_header_values=256),
        "header",
        "max_header_values",
    ),
    (
        "more values than the header's, in short lists",
        lambda: [msgpack.packb({"protocol": "cryoptycho", "version": 1, "x": [[0] * 100] * 3})],
        None,
        Limits(max_header_values=256),
        "header",
        "max_header_values",
    ),
    ("not msgpack", lambda: [b"\xc1\xc1"], None, None, "header", "msgpack"),
    (
        "ext type",
        lambda: [msgpack.packb(msgpack.ExtType(5, b"x"))],
        None,
        None,
        "header",
        "no_ext_types",
    ),
    ("not a map", lambda: [msgpack.packb([1, 2])], None, None, "header", "map"),
    (
        "timestamp in metadata",
        lambda: edit(start_parts(), setter("metadata", {"when": msgpack.Timestamp(1, 0)})),
        None,
        None,
        "metadata.when",
        "no_ext_types",
    ),
    (
        "timestamp as time_s",
        lambda: edit(start_parts(), setter("time_s", msgpack.Timestamp(1, 0))),
        None,
        None,
        "time_s",
        "no_ext_types",
    ),
    (
        "binary in metadata",
        lambda: edit(start_parts(), setter("metadata", {"raw": [1, b"\x00"]})),
        None,
        None,
        "metadata.raw[1]",
        "no_binary",
    ),
    (
        "binary map key",
        lambda: edit(start_parts(), setter("options", {b"iterations": 3})),
        None,
        None,
        "options",
        "string_key",
    ),
    (
        "nested too deep",
        lambda: edit(start_parts(), setter("metadata", _nested(40))),
        None,
        None,
        "metadata" + ".a" * 32,
        "max_depth",
    ),
    (
        "float version",
        lambda: edit(start_parts(), setter("version", 1.0)),
        None,
        None,
        "version",
        "supported",
    ),
    (
        "float nbytes",
        lambda: edit(frame_parts(), arr(0, "nbytes", 16.0)),
        SCANS,
        None,
        "arrays[0].nbytes",
        "size_match",
    ),
    ("request on ingest", lambda: encode(Request("ping")), {}, None, "type", "ingest_expected"),
    ("reply on ingest", lambda: encode(Reply(True)), SCANS, None, "type", "ingest_expected"),
    ("event on ingest", lambda: encode(ScanEvent("s1", "accepted")), SCANS, None, "type", "ingest_expected"),
    ("error on ingest", lambda: encode(ErrorEvent("f", "r", "m", "s1")), SCANS, None, "type", "ingest_expected"),
    (
        "wrong protocol",
        lambda: edit(start_parts(), setter("protocol", "ptypy")),
        None,
        None,
        "protocol",
        "value",
    ),
    (
        "future version",
        lambda: edit(start_parts(), setter("version", 2)),
        None,
        None,
        "version",
        "supported",
    ),
    (
        "bool version",
        lambda: edit(start_parts(), setter("version", True)),
        None,
        None,
        "version",
        "supported",
    ),
    (
        "unknown type",
        lambda: edit(start_parts(), setter("type", "pickle")),
        None,
        None,
        "type",
        "known_type",
    ),
    (
        "arrays not a list",
        lambda: edit(frame_parts(), setter("arrays", {})),
        None,
        None,
        "arrays",
        "list",
    ),
    ("part missing", lambda: frame_parts()[:-1], None, None, "message", "part_count"),
    ("extra part", lambda: [*frame_parts(), b"x"], None, None, "message", "part_count"),
    (
        "descriptor not a map",
        lambda: edit(frame_parts(), lambda h: h["arrays"].__setitem__(0, 3)),
        None,
        None,
        "arrays[0]",
        "map",
    ),
    (
        "descriptor extra key",
        lambda: edit(frame_parts(), arr(0, "order", "F")),
        None,
        None,
        "arrays[0].order",
        "extra_forbidden",
    ),
    (
        "descriptor bad name",
        lambda: edit(frame_parts(), arr(0, "name", 7)),
        None,
        None,
        "arrays[0].name",
        "string_type",
    ),
    (
        "array dtype unknown",
        lambda: edit(frame_parts(), arr(1, "dtype", "object")),
        None,
        None,
        "arrays[1].dtype",
        "allowed_dtype",
    ),
    (
        "big-endian dtype",
        lambda: edit(frame_parts(), arr(1, "dtype", ">u2")),
        None,
        None,
        "arrays[1].dtype",
        "allowed_dtype",
    ),
    (
        "array shape negative",
        lambda: edit(frame_parts(), arr(1, "shape", [-4, 16, 16])),
        None,
        None,
        "arrays[1].shape",
        "shape",
    ),
    (
        "array shape 5-d",
        lambda: edit(frame_parts(), arr(1, "shape", [1, 1, 4, 16, 16])),
        None,
        None,
        "arrays[1].shape",
        "shape",
    ),
    (
        "unknown codec",
        lambda: edit(frame_parts(), arr(1, "compression", "zstd")),
        None,
        None,
        "arrays[1].compression",
        "allowed_compression",
    ),
    (
        "codec not allowed here",
        lambda: frame_parts(compression="lz4"),
        None,
        Limits(compressions=("none",)),
        "arrays[1].compression",
        "allowed_compression",
    ),
    (
        "nbytes lies",
        lambda: edit(frame_parts(), arr(1, "nbytes", 5)),
        None,
        None,
        "arrays[1].nbytes",
        "size_match",
    ),
    (
        "raw size mismatch",
        lambda: edit(frame_parts(), arr(1, "shape", [4, 16, 15])),
        None,
        None,
        "arrays[1].nbytes",
        "size_match",
    ),
    (
        "decoded too large",
        lambda: edit(frame_parts(compression="lz4"), arr(1, "shape", [4096, 1024, 1024])),
        None,
        None,
        "arrays[1].shape",
        "max_message_bytes",
    ),
    (
        "duplicate array",
        lambda: edit(
            [*frame_parts(), frame_parts()[1]], lambda h: h["arrays"].append(dict(h["arrays"][0]))
        ),
        None,
        None,
        "arrays[2].name",
        "unique",
    ),
    (
        "bad checksum",
        lambda: edit(encode(frames(), checksum=True), arr(1, "crc32", 1)),
        None,
        None,
        "arrays[1].crc32",
        "checksum",
    ),
    # codecs
    (
        "lz4 garbage",
        lambda: swap_data(frame_parts(compression="lz4"), b"\xff" * 40),
        None,
        None,
        "arrays[1].data",
        "decompress",
    ),
    ("lz4 short", lambda: lz4_short(), None, None, "arrays[1].data", "decoded_size"),
    (
        "bslz4 no header",
        lambda: swap_data(frame_parts(compression="bslz4"), b"\0" * 5),
        None,
        None,
        "arrays[1].data",
        "decompress",
    ),
    (
        "bslz4 size header lies",
        lambda: bslz4_header(size=999),
        None,
        None,
        "arrays[1].data",
        "decoded_size",
    ),
    (
        # LiberTEM's simulator writes 0 here; the DECTRIS bridge accepts it, the protocol does not
        "bslz4 zero size header",
        lambda: bslz4_header(size=0),
        None,
        None,
        "arrays[1].data",
        "decoded_size",
    ),
    (
        "bslz4 odd block size",
        lambda: bslz4_header(block=12),
        None,
        None,
        "arrays[1].data",
        "decompress",
    ),
    ("bslz4 truncated", lambda: bslz4_cut(-3), None, None, "arrays[1].data", "decompress"),
    ("bslz4 trailing bytes", lambda: bslz4_cut(+3), None, None, "arrays[1].data", "decompress"),
    (
        "bslz4 forged block length",
        lambda: bslz4_forged(),
        None,
        None,
        "arrays[1].data",
        "decompress",
    ),
    # schema (pydantic rule names)
    (
        "missing key",
        lambda: edit(start_parts(), setter("energy_eV", DELETE)),
        None,
        None,
        "energy_eV",
        "missing",
    ),
    (
        "unknown key",
        lambda: edit(start_parts(), setter("energy_keV", 300)),
        None,
        None,
        "energy_keV",
        "extra_forbidden",
    ),
    (
        "energy negative",
        lambda: edit(start_parts(), setter("energy_eV", -1.0)),
        None,
        None,
        "energy_eV",
        "greater_than",
    ),
    (
        "energy NaN",
        lambda: edit(start_parts(), setter("energy_eV", float("nan"))),
        None,
        None,
        "energy_eV",
        "finite_number",
    ),
    (
        "string for number",
        lambda: edit(start_parts(), setter("expected_frames", "12")),
        None,
        None,
        "expected_frames",
        "int_type",
    ),
    (
        "bad scan id",
        lambda: edit(start_parts(), setter("scan_id", "../etc")),
        None,
        None,
        "scan_id",
        "string_pattern_mismatch",
    ),
    (
        "unknown scan kind",
        lambda: edit(start_parts(), setter("scan.kind", "spiral")),
        None,
        None,
        "scan",
        "union_tag_invalid",
    ),
    (
        "raster step zero",
        lambda: edit(start_parts(), setter("scan.step_m", [0.0, 1e-10])),
        None,
        None,
        "scan.raster.step_m.0",
        "greater_than",
    ),
    (
        "unknown probe kind",
        lambda: edit(start_parts(), setter("probe_model.kind", "airy")),
        None,
        None,
        "probe_model.kind",
        "literal_error",
    ),
    (
        "options not a map",
        lambda: edit(start_parts(), setter("options", [1])),
        None,
        None,
        "options",
        "dict_type",
    ),
    (
        "frame count negative",
        lambda: edit(encode(ScanEnd("s1", 1)), setter("frame_count", -1)),
        None,
        None,
        "frame_count",
        "greater_than_equal",
    ),
    (
        "unknown event",
        lambda: edit(encode(ScanEvent("s1", "accepted")), setter("event", "exploded")),
        None,
        None,
        "event",
        "literal_error",
    ),
    (
        "bad method name",
        lambda: edit(encode(Request("ping")), setter("method", "__init__")),
        None,
        None,
        "method",
        "string_pattern_mismatch",
    ),
    # arrays per message type
    (
        "unknown array",
        lambda: edit(frame_parts(), arr(1, "name", "frames")),
        None,
        None,
        "frames",
        "known_array",
    ),
    ("required array missing", lambda: drop_array(frame_parts(), 1), None, None, "data", "missing"),
    (
        "indices not uint32",
        lambda: retype(frame_parts(), 0, "int32"),
        None,
        None,
        "indices",
        "array_dtype",
    ),
    (
        "data 2-d",
        lambda: edit(frame_parts(), arr(1, "shape", [64, 16])),
        None,
        None,
        "data",
        "ndim",
    ),
    (
        "frames in complex",
        lambda: encode(Frames("s1", np.arange(2), np.ones((2, 4, 4), np.complex64))),
        None,
        None,
        "data",
        "array_dtype",
    ),
    (
        "positions for non-positions scan",
        lambda: with_scan_positions(),
        None,
        None,
        "scan.positions_m",
        "known_array",
    ),
    (
        "positions kind without array",
        lambda: drop_array(start_parts(raster=None, positions_m=np.zeros((12, 2))), 0),
        None,
        None,
        "scan.positions_m",
        "missing",
    ),
    (
        "request arrays outside params",
        lambda: edit(encode(Request("x", {"a": np.ones(2)})), arr(0, "name", "a")),
        None,
        None,
        "a",
        "array_path",
    ),
    # scan_start semantics
    (
        "long scan id",
        lambda: start_parts(scan_id="s" * 20),
        None,
        Limits(max_scan_id_length=8),
        "scan_id",
        "max_length",
    ),
    ("not square", lambda: start_parts(frame_shape=(16, 32)), None, None, "frame_shape", "square"),
    (
        "frame side below 2",
        lambda: start_parts(frame_shape=(1, 1)),
        None,
        None,
        "frame_shape",
        "min_frame_side",
    ),
    (
        "frame side",
        lambda: start_parts(frame_shape=(2048, 2048)),
        None,
        None,
        "frame_shape",
        "max_frame_side",
    ),
    (
        "frame dtype",
        lambda: start_parts(frame_dtype="int16"),
        None,
        None,
        "frame_dtype",
        "allowed_dtype",
    ),
    (
        "too many frames",
        lambda: start_parts(expected_frames=12),
        None,
        Limits(max_frames_per_scan=10),
        "expected_frames",
        "max_frames_per_scan",
    ),
    (
        "two pixel sizes",
        lambda: start_parts(detector_pixel_angle_rad=1e-3),
        None,
        None,
        "pixel_size_m",
        "exactly_one",
    ),
    (
        "no pixel size",
        lambda: start_parts(pixel_size_m=None),
        None,
        None,
        "pixel_size_m",
        "exactly_one",
    ),
    ("no probe", lambda: start_parts(probe_model=None), None, None, "probe", "exactly_one"),
    (
        "two probes",
        lambda: start_parts(probe=np.ones((16, 16), np.complex64)),
        None,
        None,
        "probe",
        "exactly_one",
    ),
    (
        "probe shape",
        lambda: start_parts(probe_model=None, probe=np.ones((8, 8), np.complex64)),
        None,
        None,
        "probe",
        "shape",
    ),
    (
        "probe NaN",
        lambda: start_parts(probe_model=None, probe=np.full((16, 16), np.nan, np.complex64)),
        None,
        None,
        "probe",
        "finite",
    ),
    (
        "probe zero",
        lambda: start_parts(probe_model=None, probe=np.zeros((16, 16), np.complex64)),
        None,
        None,
        "probe",
        "non_zero",
    ),
    (
        "mask shape",
        lambda: start_parts(mask=np.ones((8, 8), np.uint8)),
        None,
        None,
        "mask",
        "shape",
    ),
    (
        "mask of zeros",
        lambda: start_parts(mask=np.zeros((16, 16), np.uint8)),
        None,
        None,
        "mask",
        "non_zero",
    ),
    (
        "positions count",
        lambda: start_parts(raster=None, positions_m=np.zeros((5, 2))),
        None,
        None,
        "scan.positions_m",
        "shape",
    ),
    (
        "positions NaN",
        lambda: start_parts(raster=None, positions_m=np.full((12, 2), np.nan)),
        None,
        None,
        "scan.positions_m",
        "finite",
    ),
    (
        "positions in nm",
        lambda: start_parts(raster=None, positions_m=np.full((12, 2), 50.0)),
        None,
        None,
        "scan.positions_m",
        "max_abs_position_m",
    ),
    (
        "raster count",
        lambda: start_parts(raster=RasterScan((3, 3), (1e-10, 1e-10))),
        None,
        None,
        "scan.shape",
        "count_match",
    ),
    (
        "raster too wide",
        lambda: start_parts(raster=RasterScan((3, 4), (1.0, 1.0))),
        None,
        None,
        "scan",
        "max_abs_position_m",
    ),
    ("scan started twice", lambda: start_parts(), SCANS, None, "scan_id", "unique_scan"),
    # frames semantics
    ("unknown scan", lambda: frame_parts(scan_id="nope"), SCANS, None, "scan_id", "known_scan"),
    (
        "scan_end of unknown scan",
        lambda: encode(ScanEnd("nope", 3)),
        SCANS,
        None,
        "scan_id",
        "known_scan",
    ),
    ("no frames", lambda: frame_parts(n=0), None, None, "data", "non_empty"),
    (
        "too many per message",
        lambda: frame_parts(n=9),
        None,
        Limits(max_frames_per_message=8),
        "data",
        "max_frames_per_message",
    ),
    (
        "frames not square",
        lambda: encode(frames(data=np.zeros((4, 16, 8), np.uint16))),
        None,
        None,
        "data",
        "square",
    ),
    ("frames too big", lambda: frame_parts(n=1, m=1100), None, None, "data", "max_frame_side"),
    (
        "frame dtype not accepted",
        lambda: frame_parts(dtype=np.uint32),
        None,
        Limits(frame_dtypes=("uint8", "uint16")),
        "data",
        "allowed_dtype",
    ),
    (
        "indices length",
        lambda: encode(frames(indices=np.arange(3, dtype=np.uint32))),
        None,
        None,
        "indices",
        "shape",
    ),
    (
        "indices repeat",
        lambda: encode(frames(indices=np.array([1, 2, 2, 3], np.uint32))),
        None,
        None,
        "indices",
        "unique",
    ),
    (
        "positions shape",
        lambda: encode(frames(positions_m=np.zeros((4, 3)))),
        STREAMED,
        None,
        "positions_m",
        "shape",
    ),
    (
        "positions infinite",
        lambda: encode(frames(positions_m=np.full((4, 2), np.inf))),
        STREAMED,
        None,
        "positions_m",
        "finite",
    ),
    (
        "positions far",
        lambda: encode(frames(positions_m=np.full((4, 2), 1.0))),
        STREAMED,
        None,
        "positions_m",
        "max_abs_position_m",
    ),
    (
        "float counts NaN",
        lambda: encode(frames(data=np.full((4, 16, 16), np.nan, np.float32))),
        None,
        None,
        "data",
        "finite",
    ),
    (
        "float counts negative",
        lambda: encode(frames(data=np.full((4, 16, 16), -1, np.float32))),
        None,
        None,
        "data",
        "non_negative",
    ),
    ("wrong frame shape", lambda: frame_parts(m=8), SCANS, None, "data", "frame_shape"),
    ("wrong frame dtype", lambda: frame_parts(dtype=np.uint8), SCANS, None, "data", "frame_dtype"),
    ("index beyond scan", lambda: frame_parts(first=10), SCANS, None, "indices", "index_range"),
    ("positions missing", lambda: frame_parts(), STREAMED, None, "positions_m", "required"),
    (
        "positions already declared",
        lambda: encode(frames(positions_m=np.zeros((4, 2)))),
        SCANS,
        None,
        "positions_m",
        "declared_by_scan",
    ),
    (
        "scan_end beyond expected",
        lambda: encode(ScanEnd("s1", 13)),
        SCANS,
        None,
        "frame_count",
        "max_expected",
    ),
]


def swap_data(parts: list[Any], blob: bytes) -> list[Any]:
    parts = list(parts)
    parts[2] = blob
    return edit(parts, arr(1, "nbytes", len(blob)))


def lz4_short() -> list[Any]:
    data = np.arange(4 * 16 * 8, dtype=np.uint16)  # half the bytes the header will claim
    return swap_data(frame_parts(compression="lz4"), compress(data, "lz4"))


def bslz4_header(size: int | None = None, block: int | None = None) -> list[Any]:
    parts = frame_parts(compression="bslz4")
    blob = bytearray(parts[2])
    if size is not None:
        blob[:8] = size.to_bytes(8, "big")
    if block is not None:
        blob[8:12] = block.to_bytes(4, "big")
    return swap_data(parts, bytes(blob))


def bslz4_cut(delta: int) -> list[Any]:
    blob = bytes(frame_parts(compression="bslz4")[2])
    return swap_data(
        frame_parts(compression="bslz4"), blob[:delta] if delta < 0 else blob + b"\0" * delta
    )


def bslz4_forged() -> list[Any]:
    blob = bytearray(frame_parts(compression="bslz4")[2])
    blob[12:16] = (1 << 30).to_bytes(4, "big")  # first block claims 1 GiB: must not be followed
    return swap_data(frame_parts(compression="bslz4"), bytes(blob))


def drop_array(parts: list[Any], i: int) -> list[Any]:
    parts = list(parts)
    del parts[1 + i]
    return edit(parts, lambda h: h["arrays"].pop(i))


def retype(parts: list[Any], i: int, dtype: str) -> list[Any]:
    return edit(parts, arr(i, "dtype", dtype))


def with_scan_positions() -> list[Any]:
    parts = start_parts(raster=None, positions_m=np.zeros((12, 2)))
    return edit(parts, setter("scan", {"kind": "streamed"}))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule(case):
    _, make, scans, limits, field, rule = case
    with pytest.raises(ProtocolError) as info:
        decode(make(), limits, scans)
    assert (info.value.field, info.value.rule) == (field, rule), str(info.value)


def test_every_rule_in_the_code_has_a_case():
    """Rules named in protocols/*.py all appear in CASES (or in the published/control tests)."""
    import pathlib
    import re

    src = "".join(
        p.read_text() for p in pathlib.Path(__file__).parents[1].joinpath("protocols").glob("*.py")
    )
    named = set(
        re.findall(r'(?:ProtocolError\([^()]*?|fail\()\s*"?[^,]*,\s*"([a-z_]+)"', src, re.DOTALL)
    )
    tested = {c[5] for c in CASES} | {
        "topic_match",
        "event_type",
        "request_expected",
        "reply_expected",
    }
    assert named - tested == set()


def test_published_topic_must_match_header():
    parts = encode_event(Metrics("s", 1, 1))
    parts[0] = b"preview"
    with pytest.raises(ProtocolError) as info:
        decode_event(parts)
    assert (info.value.field, info.value.rule) == ("topic", "topic_match")


def test_subscriber_rejects_ingest_types():
    with pytest.raises(ProtocolError) as info:
        decode_event([b"frames", *encode(frames())])
    assert (info.value.field, info.value.rule) == ("type", "event_type")


def test_error_carries_scan_id_for_publishing():
    with pytest.raises(ProtocolError) as info:
        decode(frame_parts(m=8), None, SCANS)
    assert info.value.to_dict() == {
        "field": "data",
        "rule": "frame_shape",
        "scan_id": "s1",
        "message": info.value.message,
    }


def test_encode_refuses_what_decode_would():
    with pytest.raises(ProtocolError) as info:
        encode(ScanEvent("s", "exploded"))
    assert info.value.field == "event"
    with pytest.raises(ProtocolError) as info:
        encode(Metrics("s", -1, 0))
    assert (info.value.field, info.value.rule) == ("frames_received", "greater_than_equal")


@pytest.mark.parametrize(
    "field, value",
    [("frame_dtypes", ("int64",)), ("frame_dtypes", ()), ("compressions", ("zstd",))],
)
def test_limits_accept_only_known_subsets(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a non-empty subset"):
        Limits(**{field: value})
    assert Limits(**{field: ("uint8",) if field == "frame_dtypes" else ("lz4",)})


def test_good_messages_pass_with_state():
    assert decode(frame_parts(), None, SCANS).indices.tolist() == [0, 1, 2, 3]
    assert decode(
        encode(frames(positions_m=np.zeros((4, 2)))), None, STREAMED
    ).positions_m.shape == (4, 2)
    assert (
        decode(
            start_parts(probe_model=ProbeModelSpec("randomized", diameter_m=1e-9)), None, {}
        ).scan_id
        == "s1"
    )


@settings(max_examples=60, deadline=None)
@given(
    which=st.sampled_from(["start", "frames", "bslz4", "lz4", "reply"]),
    part=st.integers(0, 3),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 40),
)
def test_mangled_bytes_only_ever_raise_protocol_errors(which, part, edits, cut):
    """Whatever bytes arrive, the receiver answers with a ProtocolError or a valid message."""
    parts = {
        "start": lambda: start_parts(probe_model=None, probe=np.ones((16, 16), np.complex64)),
        "frames": lambda: encode(frames(positions_m=np.zeros((4, 2)))),
        "bslz4": lambda: frame_parts(compression="bslz4"),
        "lz4": lambda: frame_parts(compression="lz4"),
        "reply": lambda: encode(Reply(True, "ok", {"a": {"b": np.ones(3)}})),
    }[which]()
    parts = [
        bytes(memoryview(p).cast("B")) if isinstance(p, np.ndarray) else bytes(p) for p in parts
    ]
    k = part % len(parts)
    blob = bytearray(parts[k])
    for pos, value in edits:
        if blob:
            blob[pos % len(blob)] = value
    parts[k] = bytes(blob[: max(0, len(blob) - cut)])
    try:
        decode(parts, None, STREAMED if which == "frames" else SCANS if which != "start" else {})
    except ProtocolError:
        pass


@pytest.mark.parametrize(("head", "rule", "says"), [
    (b"\x81\xa1x" + b"\x91" * 5000 + b"\xc0", "max_depth", "nest deeper than 32"),  # past msgpack's own stack
    (b"\x81\xa1x\xc1", "msgpack", "0xc1"),
])
def test_headers_msgpack_refuses_without_a_reason_are_refused_with_one(head, rule, says):
    """msgpack's StackError and FormatError carry no text: the refusal read "header is not valid
    msgpack: " and nothing after it."""
    with pytest.raises(ProtocolError) as info:
        read_header([head], Limits())
    assert (info.value.field, info.value.rule) == ("header", rule)
    assert says in info.value.message, info.value.message


def test_a_header_of_a_million_tiny_values_is_checked_without_a_string_per_value():
    """A header within max_header_bytes can hold a million one-byte values (``[[], [], …]``,
    1 MiB); the check of what msgpack decoded named each value's path as it walked: 150 MB and
    1.2 s of the daemon's manager loop per such message, every other client waiting. It now
    holds only references (8 bytes a value); a refused value's path is still named."""
    import tracemalloc

    from cryoptycho.protocols.wire import _check_tree

    n = 1 << 20
    tree = {"protocol": "cryoptycho", "x": [[] for _ in range(n)]}
    tracemalloc.start()
    try:
        _check_tree(tree)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * n, f"{peak / n:.0f} bytes a value"
    tree["x"][-1] = [b"at the end"]
    with pytest.raises(ProtocolError) as info:
        _check_tree(tree)
    assert (info.value.field, info.value.rule) == (f"x[{n - 1}][0]", "no_binary")


def _bomb(flat: bool) -> bytes:
    """A scan_start header of 1 MiB holding a million empty lists: one list of them (``flat``)
    or a thousand lists of a thousand."""
    n = (1 << 20) - 256
    bombs = [[] for _ in range(n)] if flat else [[[] for _ in range(1000)] for _ in range(n // 1004)]
    head = msgpack.packb({"protocol": "cryoptycho", "version": 1, "type": "scan_start", "scan_id": "bomb",
                          "metadata": {"x": bombs}, "arrays": []})
    assert len(head) <= Limits().max_header_bytes
    return head


@pytest.mark.parametrize("flat", [True, False], ids=["one list", "nested lists"])
def test_a_header_of_a_million_values_is_refused_by_its_count(monkeypatch, flat):
    """A 1 MiB header of a million empty lists cost the daemon's manager loop 1.1–1.6 s of CPU
    (msgpack building and freeing a million objects, the garbage collector walking them over and
    over, the tree check walking them), every other peer waiting: its values are now limited
    (``max_header_values``). One list that long is refused by msgpack at its length, before one
    value is built; short lists are counted level by level, refused before the walk goes deeper.
    Counted here: the trees the check walks (none for one list), and the garbage collections
    while msgpack builds the tree (none: they walked every container built so far, again and
    again)."""
    import gc

    from cryoptycho.protocols import wire

    walked: list[int] = []
    check = wire._check_tree

    def counting(tree, max_values=None):
        walked.append(1)
        return check(tree, max_values)

    monkeypatch.setattr(wire, "_check_tree", counting)
    collections = []
    reading = []
    unpackb = wire.msgpack.unpackb

    def watched(*args, **kwargs):
        reading.append(1)
        try:
            return unpackb(*args, **kwargs)
        finally:
            reading.clear()

    monkeypatch.setattr(wire.msgpack, "unpackb", watched)

    def on_gc(phase, info):
        if phase == "start" and reading:
            collections.append(info["generation"])

    head = _bomb(flat)
    gc.collect()
    gc.callbacks.append(on_gc)
    try:
        with pytest.raises(ProtocolError) as info:
            decode([head], Limits(), {})
    finally:
        gc.callbacks.remove(on_gc)
    assert (info.value.field, info.value.rule, info.value.scan_id) == ("header", "max_header_values",
                                                                       None if flat else "bomb")
    assert "max_header_values" in info.value.message
    assert walked == ([] if flat else [1])  # one list: refused by msgpack, the tree never built
    assert collections == [], f"{len(collections)} garbage collections while the header was read"
    assert gc.isenabled()


def test_a_header_at_its_values_limit_is_read():
    """The limit takes what it says: a header of exactly ``max_header_values`` values is read
    (the map itself and its 5 keys' values count: 5 + 1 + 250 = 256), one more is refused."""
    def head(n):
        return msgpack.packb({"protocol": "cryoptycho", "version": 1, "type": "x", "scan_id": "s",
                              "x": [0] * n})

    assert len(read_header([head(250)], Limits(max_header_values=256))["x"]) == 250
    with pytest.raises(ProtocolError, match="max_header_values"):
        read_header([head(251)], Limits(max_header_values=256))


def test_a_refused_message_tells_its_type_and_frames_without_a_second_reading():
    """A receiver accounts for a refused message (a scan_start refused is remembered for its
    producer's receipt; a refused frames message's frames are counted as dropped): the decoder
    now says both, and the daemon reads no header twice (a header bomb cost it once per reading)."""
    with pytest.raises(ProtocolError) as info:
        decode(frame_parts(scan_id="gone", n=5), Limits(), {})
    assert (info.value.rule, info.value.message_type, info.value.frames) == ("known_scan", "frames", 5)
    with pytest.raises(ProtocolError) as info:
        decode(start_parts(scan_id="s"), Limits(), {"s": None})  # a second start of scan s
    assert (info.value.rule, info.value.message_type, info.value.frames) == ("unique_scan", "scan_start", 0)
    with pytest.raises(ProtocolError) as info:
        decode(frame_parts(scan_id="s9")[:-1])  # its arrays do not match its header: no frames read
    assert (info.value.rule, info.value.message_type, info.value.frames) == ("part_count", "frames", 0)
    with pytest.raises(ProtocolError) as info:
        decode([b"\xc1"])
    assert info.value.message_type is None


def test_envelope_errors_name_the_scan_when_the_header_is_readable():
    with pytest.raises(ProtocolError) as info:
        decode(frame_parts(scan_id="scan-9")[:-1])
    assert (info.value.rule, info.value.scan_id) == ("part_count", "scan-9")


@settings(max_examples=60, deadline=None)
@given(
    scan_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}", fullmatch=True),
)
def test_every_scan_id_the_protocol_accepts_names_a_spool_file(scan_id):
    """The daemon spools every accepted scan; its file name must not refuse a valid id."""
    from cryoptycho.daemon.storage.spool import spool_path

    assert decode(start_parts(scan_id=scan_id)).scan_id == scan_id
    path = spool_path("spool", scan_id)
    assert path.parent.name == "spool" and path.name.endswith(".spool.h5")


def test_distinct_scan_ids_name_distinct_files():
    from cryoptycho.daemon.storage.spool import file_stem, spool_path

    ids = ["a:b", "a_b", "a:3Ab", "a.b"]
    assert len({spool_path("spool", i) for i in ids}) == len(ids)
    assert len({file_stem(i) for i in ids}) == len(ids)
    assert ":" not in file_stem("run:7:scan:2")


@pytest.mark.parametrize("scan_id", ["-x", "a/b", "a b", "a\n", ""])
def test_spool_names_refuse_what_the_protocol_refuses(scan_id):
    from cryoptycho.daemon.storage.spool import spool_path

    with pytest.raises(ValueError, match="cannot name a spool file"):
        spool_path("spool", scan_id)


@pytest.mark.parametrize("scan_id", ["a" + ":" * 127, "b" * 1024, "c:" * 400, "x" * 201])
def test_long_scan_ids_name_files_the_file_system_takes(tmp_path, scan_id):
    """127 ':' escape to 382 bytes, over the 255 a file name holds: stems are bounded."""
    from cryoptycho.daemon.storage.spool import MAX_STEM, file_stem, spool_path

    assert decode(start_parts(scan_id=scan_id[:128])).scan_id == scan_id[:128]
    stem = file_stem(scan_id)
    assert len(stem) <= MAX_STEM and "/" not in stem and ":" not in stem
    for name in (spool_path(tmp_path, scan_id), tmp_path / f"{stem}.phase.png", tmp_path / f"{stem}.h5"):
        name.write_bytes(b"x")  # the file system takes the name
        assert name.exists()


@settings(max_examples=200, deadline=None)
@given(
    a=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,300}", fullmatch=True),
    b=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,300}", fullmatch=True),
)
def test_file_stems_are_injective(a, b):
    from cryoptycho.daemon.storage.spool import file_stem

    assert (file_stem(a) == file_stem(b)) == (a == b)


def test_shortened_stems_differ_from_full_ones_and_each_other():
    from cryoptycho.daemon.storage.spool import MAX_STEM, file_stem

    base = "r" * (MAX_STEM - 10)
    ids = [base + ":" * k for k in range(12)] + [base + ":" * 11 + "a", base + ":" * 11 + "b"]
    stems = [file_stem(i) for i in ids]
    assert len(set(stems)) == len(ids)
    assert any("~" in s for s in stems) and any("~" not in s for s in stems)
