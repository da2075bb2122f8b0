"""Round trips of every message type, zero-copy receive, and the codecs."""

from __future__ import annotations

import numpy as np
import pytest
import zmq
from cryoptycho.protocols.compression import compress, decompress
from cryoptycho.protocols.limits import Limits
from cryoptycho.protocols.messages import (
    Abort,
    ErrorEvent,
    Frames,
    Metrics,
    Preview,
    ProbeModelSpec,
    RasterScan,
    Reply,
    Request,
    Result,
    ScanEnd,
    ScanEvent,
    ScanStart,
    decode,
    encode,
    peek,
)
from cryoptycho.protocols.topics import decode_event, encode_event
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_helpers import scan_start

FAST = settings(max_examples=15, deadline=None)
frame_dtypes = st.sampled_from(["uint8", "uint16", "uint32", "float32"])
codecs = st.sampled_from(["none", "lz4", "bslz4"])


def assert_same(a, b) -> None:
    """Dataclass equality with arrays compared by value, dtype and shape (of the fields that
    take part in equality: not Frames.wire_data, which only received messages have)."""
    assert type(a) is type(b)
    for name in (f.name for f in a.__dataclass_fields__.values() if f.compare):
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray), name
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(x, y, err_msg=name)
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), name
            for k in x:
                if isinstance(x[k], np.ndarray):
                    np.testing.assert_array_equal(x[k], y[k])
                elif isinstance(x[k], dict):
                    assert_same_tree(x[k], y[k])
                else:
                    assert x[k] == y[k], (name, k)
        else:
            assert x == y, name


def assert_same_tree(x: dict, y: dict) -> None:
    assert x.keys() == y.keys()
    for k, value in x.items():
        if isinstance(value, np.ndarray):
            assert value.dtype == y[k].dtype
            np.testing.assert_array_equal(value, y[k])
        elif isinstance(value, dict):
            assert_same_tree(value, y[k])
        else:
            assert value == y[k]


def counts(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    top = {"uint8": 255, "uint16": 65535, "uint32": 2**32 - 1, "float32": 1e6}[dtype]
    if dtype == "float32":
        return (rng.random(shape) * top).astype(np.float32)
    # mostly Poisson-sparse like low-dose data, with a few saturated pixels
    out = rng.poisson(0.2, shape).astype(dtype)
    out.reshape(-1)[:: max(1, out.size // 7)] = top
    return out


@FAST
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 48),
    dtype=frame_dtypes,
    codec=codecs,
    streamed=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_frames_round_trip(n, m, dtype, codec, streamed, seed):
    rng = np.random.default_rng(seed)
    msg = Frames(
        "scan-1",
        rng.permutation(10 * n)[:n].astype(np.uint32),
        counts(rng, (n, m, m), dtype),
        rng.normal(0, 1e-8, (n, 2)) if streamed else None,
        codec,
        time_s=1.5,
    )
    parts = encode(msg)
    back = decode(parts)
    assert_same(back, msg)
    # a received bslz4 part is kept as it came (the daemon's spool writes it as it is)
    assert back.wire_data == (memoryview(parts[2]) if codec == "bslz4" else None)


@FAST
@given(
    m=st.integers(2, 32),  # frames of at least 2×2 (rule min_frame_side)
    kind=st.sampled_from(["positions", "raster", "streamed"]),
    measured_probe=st.booleans(),
    with_mask=st.booleans(),
    angle=st.booleans(),
    seed=st.integers(0, 99),
)
def test_scan_start_round_trip(m, kind, measured_probe, with_mask, angle, seed):
    rng = np.random.default_rng(seed)
    k = 6
    probe = (rng.normal(size=(m, m)) + 1j * rng.normal(size=(m, m))).astype(np.complex64)
    msg = ScanStart(
        scan_id="a.b-c:1",
        energy_eV=200e3,
        frame_shape=(m, m),
        frame_dtype="uint8",
        expected_frames=k,
        pixel_size_m=None if angle else 5e-11,
        detector_pixel_angle_rad=1e-3 if angle else None,
        probe=probe if measured_probe else None,
        probe_model=None
        if measured_probe
        else ProbeModelSpec("fzp", 20e-3, 1e-8, 1e-3, 12, 5e-9, 3),
        positions_m=rng.normal(0, 1e-8, (k, 2)) if kind == "positions" else None,
        raster=RasterScan((2, 3), (1e-10, 2e-10), 0.3, True, (1e-9, -1e-9))
        if kind == "raster"
        else None,
        mask=np.maximum(rng.integers(0, 2, (m, m), dtype=np.uint8), np.eye(m, dtype=np.uint8)) if with_mask else None,
        options={"iterations": 5, "stream": {"batch_size": 32}},
        metadata={"operator": "ä", "n": [1, 2.5]},
    )
    assert_same(decode(encode(msg)), msg)


def test_small_messages_round_trip():
    rng = np.random.default_rng(0)
    messages = [
        ScanEnd("s", 17, time_s=3.0),
        Abort("s", "stage crashed"),
        ScanEvent("s", "rejected", "does not fit", {"needed_bytes": 10}),
        Metrics("s", 10, 8, 2, 5, 0.25, 2e-10, 0.1, "acquiring"),
        ErrorEvent("data", "frame_dtype", "frames are uint8", "s"),
        Preview(
            "s",
            4,
            9,
            1e-10,
            (1e-9, 2e-9),
            rng.random((7, 9)).astype(np.float32),
            np.ones((3, 5, 5), np.complex64),
            rng.random((7, 9)).astype(np.float32),
            rng.random((7, 9)).astype(np.float32),
        ),
        Result(
            "s",
            50,
            1e-10,
            (0.0, 0.0),
            np.ones((6, 6), np.complex128),
            np.ones((4, 4), np.complex64),
            rng.normal(size=(3, 2)),
            1.5,
            {"hdf5": "/tmp/s.h5"},
            {"k": 1},
        ),
        Request("snapshot", {"scan_id": "s", "region": {"mask": np.ones((2, 2), bool)}}),
        Reply(
            True,
            "ok",
            {"preview": {"phase": np.zeros((2, 3), np.float32), "iteration": 3}, "n": None},
        ),
    ]
    for msg in messages:
        assert_same(decode(encode(msg)), msg)


def test_published_events_carry_their_topic():
    ev = ScanEvent("s", "finished")
    parts = encode_event(ev)
    assert parts[0] == b"scan.finished"
    assert_same(decode_event(parts), ev)
    assert encode_event(Metrics("s", 1, 1))[0] == b"metrics"


def test_preview_float64_is_sent_as_float32():
    msg = Preview("s", 0, 0, 1e-10, (0, 0), np.zeros((3, 3)), np.ones((2, 2), complex))
    out = decode(encode(msg))
    assert out.object_phase.dtype == np.float32 and out.probe.dtype == np.complex64


def test_peek_reads_type_and_scan_without_payload():
    parts = encode(scan_start(scan_id="route-me"))
    assert peek(parts) == ("scan_start", "route-me")


def test_raster_positions_follow_documented_order():
    r = RasterScan((2, 3), (1.0, 10.0), serpentine=True, origin_m=(5.0, 7.0))
    expected = [[5, 7], [5, 17], [5, 27], [6, 27], [6, 17], [6, 7]]
    np.testing.assert_allclose(r.positions(), expected)
    # a quarter turn maps the x axis (columns) onto +y
    rot = RasterScan((1, 2), (1.0, 1.0), rotation_rad=np.pi / 2).positions()
    np.testing.assert_allclose(rot[1], [1.0, 0.0], atol=1e-12)


def test_large_frames_are_not_copied_on_receive():
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        data = np.arange(32 * 64 * 64, dtype=np.uint16).reshape(32, 64, 64)  # 256 kB
        push.send_multipart(encode(Frames("s", np.arange(32), data)), copy=False)
        parts = pull.recv_multipart(copy=False)
        msg = decode(parts, Limits())
        wire = np.frombuffer(parts[2].buffer, dtype=np.uint8)
        assert np.shares_memory(msg.data, wire)
        assert msg.data.shape == (32, 64, 64) and msg.data.dtype == np.uint16
        np.testing.assert_array_equal(msg.data, data)
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


@FAST
@given(
    shape=st.tuples(st.integers(0, 9), st.integers(1, 33), st.integers(1, 33)),
    dtype=st.sampled_from(["uint8", "uint16", "uint32", "float32", "float64", "complex64"]),
    codec=st.sampled_from(["lz4", "bslz4"]),
    seed=st.integers(0, 99),
)
def test_compression_round_trip(shape, dtype, codec, seed):
    rng = np.random.default_rng(seed)
    a = (rng.poisson(1.0, shape) * (1 + 1j if dtype.startswith("complex") else 1)).astype(dtype)
    out = decompress(compress(a, codec), codec, np.dtype(dtype), shape, "data")
    assert out.dtype == a.dtype and out.shape == a.shape
    np.testing.assert_array_equal(out, a)


def test_bslz4_matches_detector_framing():
    """A bslz4 part is the 12-byte-header HDF5/DECTRIS blob: u64 BE size, u32 BE block bytes."""
    import bitshuffle

    a = np.random.default_rng(1).poisson(0.5, (3, 20, 20)).astype(np.uint16)
    blob = compress(a, "bslz4")
    assert int.from_bytes(blob[:8], "big") == a.nbytes
    assert int.from_bytes(blob[8:12], "big") == 8192
    body = np.frombuffer(blob, np.uint8, offset=12)
    np.testing.assert_array_equal(bitshuffle.decompress_lz4(body, a.shape, a.dtype, 4096), a)
    # a blob with a zero header block size (as some simulators write) decodes with the default
    zero = blob[:8] + b"\0\0\0\0" + blob[12:]
    np.testing.assert_array_equal(decompress(zero, "bslz4", a.dtype, a.shape, "data"), a)


def test_compressed_frames_are_smaller_for_sparse_counts():
    data = np.random.default_rng(2).poisson(0.05, (64, 32, 32)).astype(np.uint16)
    raw = sum(memoryview(p).nbytes for p in encode(Frames("s", np.arange(64), data)))
    for codec in ("lz4", "bslz4"):
        packed = sum(
            memoryview(p).nbytes
            for p in encode(Frames("s", np.arange(64), data, compression=codec))
        )
        assert packed < raw / 3, codec


@pytest.mark.parametrize("checksum", [False, True])
def test_checksum_is_optional(checksum):
    parts = encode(Frames("s", np.arange(2), np.ones((2, 4, 4), np.uint8)), checksum=checksum)
    assert decode(parts).data.sum() == 32


def test_control_trees_carry_numpy_scalars_but_not_arrays_in_lists():
    reply = Reply(True, "ok", {"scans": [{"n": np.int64(3), "t": (1, np.float32(2.5))}]})
    assert decode(encode(reply)).result == {"scans": [{"n": 3, "t": [1, 2.5]}]}
    with pytest.raises(ValueError, match=r"result\.l\[0\]: arrays inside lists"):
        encode(Reply(True, "ok", {"l": [np.ones(2)]}))
