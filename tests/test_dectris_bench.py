"""`cryoptycho bench dectris` and the fast paths it measures: both bslz4 decoders, the
per-arrival binning, the receiver's batched drain, and the JSON the benchmark reports."""

from __future__ import annotations

import json
import time

import cbor2
import numpy as np
import pytest
from click.testing import CliRunner
from cryoptycho.daemon.bench import dectris as bench
from cryoptycho.daemon.bench.dectris import DOSES, make_frames, make_series
from cryoptycho.daemon.cli import main
from cryoptycho.protocols import compression
from cryoptycho.protocols.dectris.binning import FrameReducer
from cryoptycho.protocols.dectris.decode import decode_v2
from cryoptycho.protocols.dectris.receiver import DectrisReceiver
from cryoptycho.protocols.dectris.schema import DecodeError, Image, SeriesEnd, SeriesStart
from cryoptycho.protocols.dectris.sim import SimSender, SimSeries, v1_messages, v2_messages
from cryoptycho.protocols.errors import ProtocolError
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    from dectris import compression as reference
except ImportError:  # DECTRIS' decoder is optional (test extra); tests that need it skip
    reference = None
needs_reference = pytest.mark.skipif(reference is None, reason="dectris-compression not installed")
#: the bslz4 decoders this installation has
DECODERS = [d for d in compression.BSLZ4_DECODERS if d != "dectris" or reference is not None]


@needs_reference
def test_bench_reports_every_stage_and_its_frames_decode_like_the_reference() -> None:
    result = CliRunner().invoke(main, ["bench", "dectris", "--frames", "4", "--seconds", "0.01",
                                       "--rounds", "1", "--case", "sparse", "--profile", "--daemon-frames", "0",
                                       "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["reference"] == "dectris.compression" and out["bslz4_decoder"] == "dectris"
    row = out["cases"]["sparse"]
    stages = {"decode_ours", "decode_reference", "codec_ours", "codec_bitshuffle", "codec_reference", "bin", "full"}
    assert set(row["fps"]) == stages | {"bridge_sockets"} and set(row["fps_cpu"]) == stages
    assert all(v > 0 for v in row["fps"].values())
    assert set(row["ratio_to_reference"]) == {"decode_ours", "codec_ours", "codec_bitshuffle", "full"}
    assert row["ratio_to_reference"]["full"] == pytest.approx(
        row["fps_cpu"]["full"] / row["fps_cpu"]["decode_reference"], rel=1e-2)
    assert row["frame_shape"] == [192, 192] and row["binned_shape"] == [96, 96]
    assert row["decoded_equal_to_frames"] is True
    assert row["target_met"] == (row["fps"]["full"] >= 20_000)
    assert sum(row["profile_shares_full"].values()) == pytest.approx(1.0, abs=0.01)
    assert {"cbor_decode", "bslz4", "binning"} <= set(row["profile_shares_full"])

    # the benchmark's messages, decoded here by DECTRIS' library and by ours, give its frames
    frames = make_frames(4, 192, *DOSES["sparse"])
    assert frames.max() >= 1 and (frames == 0).mean() > 0.5  # low dose: mostly zeros
    for i, raw in enumerate(make_series(frames)[1:-1]):
        typed = cbor2.loads(raw[3:])["data"]["threshold_1"].value[1]
        algorithm, elem, payload = typed.value.value
        assert (typed.tag, algorithm, elem) == (69, "bslz4", 2)
        theirs = np.frombuffer(reference.decompress(payload, algorithm, elem_size=elem), "<u2")
        np.testing.assert_array_equal(theirs.reshape(192, 192), frames[i])
        np.testing.assert_array_equal(decode_v2(raw, ("threshold_1",)).data["threshold_1"], frames[i])


def test_bench_without_the_reference_leaves_its_columns_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "reference_decompress", None)
    out = bench.run(3, 0.005, 1, ["dense"], profile=False, sockets=False)
    row = out["cases"]["dense"]
    assert out["reference"] is None
    assert set(row["fps"]) == {"decode_ours", "codec_ours", "codec_bitshuffle", "bin", "full"}
    assert set(row["ratio_to_reference"].values()) == {None}
    assert row["mean_count"] > 1  # the dense case


@needs_reference
@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([np.uint8, np.uint16, np.uint32]),
    n=st.integers(0, 3000),
    block_elems=st.sampled_from([0, 8, 64, 256, 4096]),
    lam=st.sampled_from([0.05, 1.0, 300.0]),
)
def test_both_bslz4_decoders_agree_with_the_reference(dtype: type, n: int, block_elems: int, lam: float) -> None:
    data = np.random.default_rng(n).poisson(lam, n).astype(dtype)
    item = data.dtype.itemsize
    blob = compression.bslz4_compress(data, block_elems * item or compression.BLOCK_BYTES)
    if block_elems == 0:  # a zero block size in the header means bitshuffle's default
        blob = blob[:8] + bytes(4) + blob[12:]
    expected = np.frombuffer(reference.decompress(blob, "bslz4", elem_size=item), dtype) if block_elems else data
    for decoder in DECODERS:
        out = compression.bslz4_decompress(blob, data.dtype, (n,), decoder=decoder)
        assert out.dtype == data.dtype
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(out, data)


@pytest.mark.parametrize("decoder", DECODERS)
def test_broken_bslz4_streams_are_refused_alike_by_both_decoders(decoder: str) -> None:
    data = np.random.default_rng(1).poisson(2.0, 5000).astype(np.uint16)
    blob = compression.bslz4_compress(data, 1024)
    shape, u16 = (5000,), np.dtype(np.uint16)
    with pytest.raises(ProtocolError, match="beyond its blocks"):
        compression.bslz4_decompress(blob + b"\0", u16, shape, decoder=decoder)
    with pytest.raises(ProtocolError, match="truncated bslz4 stream"):
        compression.bslz4_decompress(blob[:-20], u16, shape, decoder=decoder)
    # framing intact, LZ4 content garbage: the decoder itself must notice
    first_len = int.from_bytes(blob[12:16], "big")
    corrupt = blob[:16] + bytes([0xF0]) * first_len + blob[16 + first_len:]
    with pytest.raises(ProtocolError, match="corrupt bslz4 stream"):
        compression.bslz4_decompress(corrupt, u16, shape, decoder=decoder)


def test_unknown_or_missing_decoder_is_named() -> None:
    with pytest.raises(ValueError, match="decoder must be one of"):
        compression.bslz4_decompress(compression.bslz4_compress(np.zeros(8, np.uint16)),
                                     np.dtype(np.uint16), decoder="zstd")


@pytest.mark.parametrize(
    ("shape", "kwargs", "flag"),
    [
        ((192, 192), {"crop": 192, "bin": 2}, None),  # the window is the detector: a view
        ((200, 210), {"crop": 96, "bin": 4, "beam_center_px": (90.0, 120.0)}, None),
        ((64, 64), {"crop": 64, "bin": 2, "beam_center_px": (4.0, 40.0)}, None),  # beyond the edge
        ((64, 64), {"crop": 32, "bin": 2, "saturation_value": 50}, "saturate"),
        ((64, 64), {"crop": 32, "bin": 2}, "mask"),
    ],
)
def test_per_arrival_binning_equals_the_batch_reducer(shape: tuple[int, int], kwargs: dict, flag: str | None) -> None:
    frames = np.random.default_rng(2).poisson(3.0, (5, *shape)).astype(np.uint16)
    if flag == "mask":
        bad = np.zeros(shape, bool)
        bad[30:33, 31] = True
        frames[:, bad] = 65535
        kwargs = {**kwargs, "bad_pixels": bad}
    if flag == "saturate":
        frames[2, 32, 32] = 60
    red = FrameReducer.build(shape, np.uint16, **kwargs)
    counts, valid = red(frames)
    m = red.frame_side
    row = np.full((m, m), 7, red.out_dtype)
    for i, frame in enumerate(frames):
        one, saturated = red.reduce_frame(frame, out=row)
        assert one is row
        np.testing.assert_array_equal(one, counts[i])
        assert saturated == bool((red.static_valid & ~valid[i]).any())
    assert (flag == "saturate") == any(red.reduce_frame(f)[1] for f in frames)
    # every binned pixel is the exact sum of its block, here with an independent int64 sum
    window = np.zeros((5, red.window, red.window), np.int64)
    (y0, x0), c = red.corner, red.window
    ys, xs = slice(max(y0, 0), min(y0 + c, shape[0])), slice(max(x0, 0), min(x0 + c, shape[1]))
    window[:, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = frames[:, ys, xs]
    window = np.where(red.window_valid, np.minimum(window, red.saturation_value or 65534), 0)
    b = red.bin
    np.testing.assert_array_equal(counts, window.reshape(5, m, b, m, b).sum(axis=(2, 4)))


@pytest.mark.parametrize("version", [2, 1])
def test_drain_takes_waiting_messages_in_batches_without_splitting_one(version: int) -> None:
    frames = make_frames(5, 16, 2.0, 0.1)
    series = SimSeries(frames)
    messages = list(v2_messages(series)) if version == 2 else list(v1_messages(series))
    errors: list = []
    with SimSender(version) as sender, DectrisReceiver(sender.endpoint, version, on_error=errors.append) as rx:
        if version == 2:  # a stray multipart message: one decode error, then the series
            sender.send_raw([b"a", b"b", b"c"])
        for msg in messages:
            sender.send_raw(msg)
        got: list = []
        deadline = time.monotonic() + 10
        while not any(isinstance(m, SeriesEnd) for m in got) and time.monotonic() < deadline:
            got += list(rx.drain(0.1, max_parts=2))  # V1 images are 4 parts: never cut
    assert [type(m) for m in got] == [SeriesStart] + [Image] * 5 + [SeriesEnd]
    assert [m.image_id for m in got[1:-1]] == list(range(5))
    for m in got[1:-1]:
        (frame,) = m.data.values()  # V1 names its one channel differently
        np.testing.assert_array_equal(frame, frames[m.image_id])
    assert rx.decode_errors == len(errors) == (1 if version == 2 else 0)
    assert all("multipart message on a Stream V2 socket" in str(e) for e in errors)


def test_drain_keeps_the_parts_after_a_raising_error_for_the_next_call() -> None:
    start, *_ = v2_messages(SimSeries(make_frames(1, 8, 1.0, 1.0)))
    with SimSender(2) as sender, DectrisReceiver(sender.endpoint, 2) as rx:  # errors raise
        # two parts drained in one go (as from the socket), the first one bad
        rx._pending.extend([(b"not cbor", False), (start, False)])
        with pytest.raises(DecodeError, match="not a Stream V2 message"):
            list(rx.drain(0.1))
        assert [type(m) for m in rx.drain(0.1)] == [SeriesStart]
        assert list(rx.drain(0.01)) == []


def test_bench_runs_both_paths_end_to_end_into_a_daemon() -> None:
    result = CliRunner().invoke(main, ["bench", "dectris", "--frames", "4", "--seconds", "0.01", "--rounds", "1",
                                       "--case", "sparse", "--no-sockets", "--daemon-frames", "48",
                                       "--daemon-rounds", "1", "--no-live", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)["cases"]["sparse"]
    assert set(row["daemon"]) == {"bridge_paused", "direct_1_paused", "direct_2_paused", "direct_1p_paused",
                                  "direct_2p_paused"}
    assert row["binned_dtype"] == "uint32"  # no saturation value declared: exact sums need 18 bits
    for name, figures in row["daemon"].items():
        # every frame reached the store, after it was received (spooled and counted)
        assert figures["fps_received"] >= figures["fps"] > 0 and figures["cpu_us_per_frame"] > 0
        # and the work after the window is reported: one round ends its scans, so the close of
        # an ended scan; a direct scan's binned rows come from its frame store, whose largest
        # count (≤ 255 at this dose) makes them uint8 (derived rows with no peak stay uint32);
        # the bridge's were written in the window as they came
        assert figures["close_cpu_us_per_frame"] > 0 and "close_aborted_cpu_us_per_frame" not in figures
        assert figures["close_binned_dtype"] == ("uint32" if name == "bridge_paused" else "uint8")
        assert figures["close_stages_us_per_frame"]["spool"] >= 0
        by_thread = figures["stages_us_per_frame"]
        # the daemon's own threads did the work: the spool wrote, the frame store took the frames
        assert by_thread["spool"] > 0 and by_thread["frame_store"] > 0 and by_thread["manager"] > 0
        if name.startswith("direct"):
            # decoding ran where it was asked to, and its CPU time is counted there
            assert by_thread["receive_convert"] > 0
            assert (by_thread.get("decode_processes", 0) > 0) == name.endswith("p_paused")
            assert (by_thread.get("decode_threads", 0) > 0) != name.endswith("p_paused")
    stages = row["stages_cpu_us_per_frame"]
    assert stages["direct_total"] == pytest.approx(
        stages["decode_job"] + stages["spool_direct"] + stages["frame_store"], abs=0.2)
    assert stages["frame_store_reused"] > 0 and stages["direct_total_reused"] == pytest.approx(
        stages["decode_job"] + stages["spool_direct"] + stages["frame_store_reused"], abs=0.2)


@pytest.fixture(scope="module")
def two_rounds_saturated() -> dict:
    """One `bench dectris` run into the daemon shared by the two tests below (each of its
    daemon runs starts a daemon and a detector process): two rounds, the first ending its
    scans and the second stopping the daemon with them open, the series' start declaring a
    saturation value of 4000."""
    result = CliRunner().invoke(main, ["bench", "dectris", "--frames", "4", "--seconds", "0.01", "--rounds", "1",
                                       "--case", "sparse", "--no-sockets", "--daemon-frames", "48",
                                       "--daemon-rounds", "2", "--no-live", "--no-processes",
                                       "--saturation-value", "4000", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["cases"]["sparse"]


def test_bench_reports_the_close_of_an_ended_and_of_an_aborted_scan(two_rounds_saturated: dict) -> None:
    """Two rounds take turns: the first ends its scans (the series' end sent), the second stops
    the daemon with them open; both closes are reported, under different names."""
    daemon = two_rounds_saturated["daemon"]
    assert set(daemon) == {"bridge_paused", "direct_1_paused", "direct_2_paused"}
    for name, figures in daemon.items():
        assert figures["close_cpu_us_per_frame"] > 0 and figures["close_aborted_cpu_us_per_frame"] > 0
        # the bridge stores the binned frames in the dtype the declared saturation value allows
        # (uint32 with none declared: test_bench_runs_both_paths_end_to_end_into_a_daemon); a
        # direct scan's rows come from its frame store, whose largest count (≤ 255) makes them uint8
        assert figures["close_binned_dtype"] == ("uint16" if name == "bridge_paused" else "uint8")


def test_bench_declares_the_saturation_value_it_is_given(two_rounds_saturated: dict) -> None:
    """--saturation-value goes into the series' start: 2×2 bins of counts up to 4000 fit
    uint16 (the frames are binned to it end to end), none declared keeps uint32."""
    from cryoptycho.daemon.bench.dectris import make_series
    from cryoptycho.protocols.dectris.decode import decode_v2

    frames = np.zeros((2, 8, 8), np.uint16)
    assert decode_v2(make_series(frames, saturation_value=4000)[0]).saturation_value == 4000
    assert decode_v2(make_series(frames)[0]).saturation_value is None
    row = two_rounds_saturated  # (the bench run with --saturation-value 4000)
    assert row["binned_dtype"] == "uint16"
    assert all(figures["fps"] > 0 for figures in row["daemon"].values())
    # end to end: the daemon's spool holds the bridge's binned frames as uint16
    assert row["daemon"]["bridge_paused"]["close_binned_dtype"] == "uint16"
