"""DECTRIS series → ingest scans: series bookkeeping, geometry precedence, socket round trips."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import zmq
from cryoptycho.protocols.dectris.bridge import (
    BridgeConfig,
    SeriesConverter,
    bridge_messages,
    run_bridge,
)
from cryoptycho.protocols.dectris.decode import decode_v2
from cryoptycho.protocols.dectris.receiver import DectrisReceiver, SeriesTracker, parse_source
from cryoptycho.protocols.dectris.scan import positions_message
from cryoptycho.protocols.dectris.schema import Image, SeriesEnd, SeriesError, SeriesStart
from cryoptycho.protocols.dectris.sim import SimSender, SimSeries, v2_messages
from cryoptycho.protocols.messages import Abort, Frames, ScanEnd, ScanStart, decode, encode

STEP = 2e-10
USER_SCAN = {"kind": "raster", "shape": [2, 3], "step_m": [STEP, STEP]}


def _frames(n: int = 6, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(2, (n, size, size)).astype(np.uint16)


def _series(frames: np.ndarray | None = None, user: dict | None = None, **kw: Any) -> SimSeries:
    frames = _frames() if frames is None else frames
    kw.setdefault("detector_distance_m", 0.1)
    return SimSeries(frames, user_data=None if user is None else {"cryoptycho": user}, **kw)


def _decoded(series: SimSeries) -> list:
    return [decode_v2(m) for m in v2_messages(series)]


# ------------------------------------------------------------------------------ series tracker


def test_tracker_rejects_and_counts_images_of_unknown_series() -> None:
    start, *images, end = _decoded(_series())
    tracker = SeriesTracker()
    assert not tracker.accept(images[0])  # no start yet
    tracker.begin(start)
    stranger = Image(2, start.series_id + 1, start.series_unique_id, 0, {})
    impostor = Image(2, start.series_id, "01OTHERSERIES", 1, {})
    assert not tracker.accept(stranger) and not tracker.accept(impostor)
    assert tracker.accept(images[0]) and not tracker.accept(images[0])
    beyond = Image(2, start.series_id, start.series_unique_id, 6, {})
    assert not tracker.accept(beyond)
    assert tracker.rejected == {"no_start": 1, "unknown_series": 2, "duplicate": 1, "image_id_range": 1}
    summary = tracker.end(end)
    assert summary.received == 1 and summary.missing_image_ids == [1, 2, 3, 4, 5]


def test_the_rest_of_a_series_begun_before_a_bridge_restart_is_not_a_line_per_image(
        caplog: pytest.LogCaptureFixture) -> None:
    """A bridge restarted mid-series takes the rest of it one image at a time, each without
    its start: each was a WARNING line of its own (4,000 a second at ARINA rates). The first
    is logged in full; the rest are counted, and their number logged when the series ends."""
    _, *images, end = _decoded(_series(_frames(200)))  # (the start was the bridge before its restart)
    tracker = SeriesTracker()
    with caplog.at_level(logging.WARNING):
        assert not any(tracker.accept(image) for image in images)
        with pytest.raises(SeriesError, match="without its start"):
            tracker.end(end)
    said = [r.getMessage() for r in caplog.records if "rejected DECTRIS image" in r.getMessage()]
    assert tracker.rejected == {"no_start": 200}
    assert len(said) == 2, said
    assert "image 0 of series 1 arrived without a start message" in said[0], said
    assert "199 more like it" in said[1] and "image 199 of series 1" in said[1], said


def test_end_without_start_is_a_series_error() -> None:
    with pytest.raises(SeriesError, match="end of series 3 arrived without its start"):
        SeriesTracker().end(SeriesEnd(2, 3, "x"))
    tracker = SeriesTracker()
    tracker.begin(SeriesStart(2, 1, "a"))
    with pytest.raises(SeriesError, match="the open series is 1/a"):
        tracker.end(SeriesEnd(2, 1, "b"))


@pytest.mark.parametrize(
    ("url", "expected"),
    [("dectris2://dcu.local", (2, "tcp://dcu.local:31001")), ("dectris1://10.0.0.5", (1, "tcp://10.0.0.5:9999")),
     ("dectris2://127.0.0.1:4000", (2, "tcp://127.0.0.1:4000"))],
)
def test_source_urls(url: str, expected: tuple[int, str]) -> None:
    assert parse_source(url) == expected


def test_bad_source_url_names_the_scheme() -> None:
    with pytest.raises(ValueError, match="scheme must be dectris2://"):
        parse_source("tcp://127.0.0.1:31001")


# ------------------------------------------------------------------------- geometry precedence


def _convert(series: SimSeries, config: BridgeConfig, side: bool = False,
             positions: tuple | None = None) -> tuple[list, SeriesConverter]:
    conv = SeriesConverter(config, side_channel=side)
    out = []
    msgs = _decoded(series)
    for msg in msgs[:-1]:
        out += conv.feed(msg)
    if positions is not None:
        out += conv.add_positions(*positions)
    out += conv.feed(msgs[-1])
    return out, conv


CONFIG_RASTER = {"kind": "raster", "shape": [3, 2], "step_m": [5e-10, 5e-10], "serpentine": True}


def test_a_first_image_unlike_the_start_does_not_open_the_scan() -> None:
    """The scan's binning was built from the series' first image whatever its size: a first
    image of the start's bytes as 8 × 32 (not the 16 × 16 of image_size_y/x) opened the scan,
    and every image as the start said was then unlike it and dropped. It is refused alone."""
    frames = _frames()
    msgs = _decoded(_series(frames, user={"scan": USER_SCAN}))
    first = msgs[1]
    msgs[1] = replace(first, data={name: a.reshape(8, 32) for name, a in first.data.items()})
    conv = SeriesConverter(BridgeConfig(detector_pixel_angle_rad=1e-3))
    out = [m for msg in msgs for m in conv.feed(msg)]
    assert len([m for m in out if isinstance(m, ScanStart)]) == 1, out  # opened, once
    sent = [m for m in out if isinstance(m, Frames)]
    assert [int(i) for f in sent for i in f.indices] == [1, 2, 3, 4, 5], sent
    assert all(f.data.shape[1:] == (16, 16) for f in sent), [f.data.shape for f in sent]
    assert conv.stats["skipped_images"] == 1, conv.stats


def test_user_data_scan_wins_over_side_channel_and_config() -> None:
    cfg = BridgeConfig(raster=CONFIG_RASTER, detector_pixel_angle_rad=1e-3)
    out, _ = _convert(_series(user={"scan": USER_SCAN}), cfg, side=True,
                      positions=(None, np.arange(6), np.zeros((6, 2))))
    start = out[0]
    assert isinstance(start, ScanStart)
    assert start.raster is not None and start.raster.shape == (2, 3) and start.raster.step_m == (STEP, STEP)
    assert start.metadata["geometry_from"] == "user_data"
    assert all(f.positions_m is None for f in out if isinstance(f, Frames))


def test_side_channel_wins_over_config_and_frames_wait_for_positions() -> None:
    cfg = BridgeConfig(raster=CONFIG_RASTER, detector_pixel_angle_rad=1e-3, frames_per_message=4)
    pos = np.arange(12, dtype=float).reshape(6, 2) * 1e-10
    conv = SeriesConverter(cfg, side_channel=True)
    start, *images, end = _decoded(_series())
    assert conv.feed(start) == []
    out = conv.feed(images[0])  # the scan opens; the frame waits for its position
    assert [type(m) for m in out] == [ScanStart]
    assert out[0].positions_streamed and out[0].metadata["geometry_from"] == "side_channel"
    for img in images[1:]:
        assert conv.feed(img) == []
    released = conv.add_positions(start.series_id, np.arange(6)[::-1], pos[::-1])
    released += conv.feed(end)
    frames = [m for m in released if isinstance(m, Frames)]
    assert [len(f.indices) for f in frames] == [4, 2]
    for f in frames:
        np.testing.assert_array_equal(f.positions_m, pos[f.indices])
    assert isinstance(released[-1], ScanEnd) and released[-1].frame_count == 6


def test_positions_of_series_that_never_come_are_not_kept_for_ever(caplog: pytest.LogCaptureFixture) -> None:
    """A scan system that sends positions under series ids no series arrives with (wrong ids, an
    acquisition cancelled before arming) made the converter keep them for the life of the daemon;
    the series that is waiting for its positions keeps them however many strays come."""
    from cryoptycho.protocols.dectris.convert import MAX_POSITION_SERIES

    cfg = BridgeConfig(raster=CONFIG_RASTER, detector_pixel_angle_rad=1e-3, frames_per_message=4)
    conv = SeriesConverter(cfg, side_channel=True)
    start, *images, end = _decoded(_series())
    conv.feed(start)
    conv.feed(images[0])  # the series opens and waits for its positions
    pos = np.arange(12, dtype=float).reshape(6, 2) * 1e-10
    conv.add_positions(start.series_id, np.arange(3), pos[:3])  # half of them now
    stray_ids = [start.series_id + 1000 + k for k in range(3 * MAX_POSITION_SERIES)]
    with caplog.at_level("ERROR"):
        for stray in stray_ids:
            conv.add_positions(stray, np.arange(64), np.zeros((64, 2)))
    kept = set(conv._positions)
    assert len(kept) <= MAX_POSITION_SERIES and start.series_id in kept
    assert stray_ids[-1] in kept and stray_ids[0] not in kept  # the oldest strays went
    assert "no series has claimed" in caplog.text
    out = []
    for img in images[1:]:
        out += conv.feed(img)
    out += conv.add_positions(start.series_id, np.arange(3, 6), pos[3:])
    out += conv.feed(end)
    frames = [m for m in out if isinstance(m, Frames)]
    assert sum(len(f.indices) for f in frames) == 6  # every image of the waiting series placed
    for f in frames:
        np.testing.assert_array_equal(f.positions_m, pos[f.indices])


def test_the_side_channel_bounds_the_parts_it_takes() -> None:
    from cryoptycho.protocols.dectris.bridge import open_side_channel
    from cryoptycho.protocols.limits import Limits, ingest_max_part_bytes

    ctx = zmq.Context()
    side = open_side_channel(ctx, BridgeConfig(positions_endpoint="tcp://127.0.0.1:*"))
    try:
        assert side is not None and side.getsockopt(zmq.MAXMSGSIZE) == ingest_max_part_bytes(Limits())
    finally:
        side.close(0)
        ctx.term()


def test_config_raster_is_the_last_resort() -> None:
    cfg = BridgeConfig(raster=CONFIG_RASTER, detector_pixel_angle_rad=1e-3)
    out, _ = _convert(_series(), cfg)
    assert out[0].raster.shape == (3, 2) and out[0].raster.serpentine
    assert out[0].metadata["geometry_from"] == "config"
    assert sum(len(m.indices) for m in out if isinstance(m, Frames)) == 6


def test_no_geometry_skips_the_series_with_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        out, conv = _convert(_series(), BridgeConfig(detector_pixel_angle_rad=1e-3))
    assert out == []
    assert conv.stats["failed_series"] == 1 and conv.stats["skipped_images"] == 6
    assert "no scan geometry" in caplog.text
    # each way out named as the user sets it, not "a raster in the config"
    for how in ("--print-schema", "[dectris] positions_endpoint", "[dectris.raster] shape and step_m"):
        assert how in caplog.text, how


def test_invalid_user_data_is_not_silently_replaced_by_the_config(caplog: pytest.LogCaptureFixture) -> None:
    bad = {"scan": {"kind": "raster", "shape": [2, 3], "step_m": [-1.0, 1e-10]}}
    with caplog.at_level(logging.ERROR):
        out, conv = _convert(_series(user=bad), BridgeConfig(raster=CONFIG_RASTER, detector_pixel_angle_rad=1e-3))
    assert out == [] and conv.stats["failed_series"] == 1
    assert "user_data.cryoptycho.scan.raster.step_m.0" in caplog.text


def test_a_series_with_more_images_than_the_scan_has_positions_is_reconstructed_not_skipped(
        caplog: pytest.LogCaptureFixture) -> None:
    """(The series was skipped.) Over our ingest protocol, which has no place for images without
    a position, the bridge sends the positioned ones and refuses the rest by name; the daemon's
    own DECTRIS source keeps them (test_field_dectris)."""
    with caplog.at_level(logging.WARNING):
        out, conv = _convert(_series(), BridgeConfig(raster={"kind": "raster", "shape": [2, 2],
                                                             "step_m": [1e-10, 1e-10]}, detector_pixel_angle_rad=1e-3))
    assert isinstance(out[0], ScanStart) and out[0].expected_frames == 4
    assert sorted(int(i) for m in out if isinstance(m, Frames) for i in m.indices) == [0, 1, 2, 3]
    assert isinstance(out[-1], ScanEnd) and out[-1].frame_count == 4
    assert conv.rejected == {"no_position": 2} and conv.stats["failed_series"] == 0
    assert "the detector series has 6 images, the scan 4 positions" in caplog.text


def test_energy_and_pixel_angle_precedence() -> None:
    cfg = BridgeConfig(raster=CONFIG_RASTER, energy_eV=80e3, camera_length_m=0.2, bin=2, crop=16)
    # detector header: 300 keV, 100 µm pixels, detector_distance 0.1 m; config camera length wins
    out, _ = _convert(_series(), cfg)
    assert out[0].energy_eV == 300e3
    assert out[0].detector_pixel_angle_rad == pytest.approx(2 * 100e-6 / 0.2)
    user = {"scan": USER_SCAN, "energy_eV": 200e3, "detector_pixel_angle_rad": 3e-4}
    out, _ = _convert(_series(user=user), cfg)
    assert out[0].energy_eV == 200e3 and out[0].detector_pixel_angle_rad == pytest.approx(6e-4)
    out, _ = _convert(_series(energy_ev=None), cfg)
    assert out[0].energy_eV == 80e3


def test_frames_are_binned_sums_and_the_mask_covers_bad_and_flagged_pixels() -> None:
    frames = _frames(size=16)
    frames[:, 0, 0] = 65535  # a gap pixel, flagged in every image but absent from the header
    mask = np.zeros((16, 16), np.uint32)
    mask[8, 9] = 4  # a hot pixel from the header's pixel mask
    out = list(bridge_messages(_decoded(_series(frames, user={"scan": USER_SCAN}, pixel_mask=mask)),
                               BridgeConfig(bin=2, detector_pixel_angle_rad=1e-3)))
    start = out[0]
    expected_mask = np.ones((8, 8), np.uint8)
    expected_mask[0, 0] = expected_mask[4, 4] = 0
    np.testing.assert_array_equal(start.mask, expected_mask)
    data = np.concatenate([m.data for m in out if isinstance(m, Frames)])
    clean = frames.astype(np.int64)
    clean[:, 0, 0] = clean[:, 8, 9] = 0
    np.testing.assert_array_equal(data, clean.reshape(6, 8, 2, 8, 2).sum(axis=(2, 4)))
    assert start.frame_dtype == "uint32" and data.dtype == np.uint32


def test_a_new_start_aborts_the_unfinished_scan() -> None:
    first = _decoded(_series(user={"scan": USER_SCAN}))
    second = _decoded(_series(user={"scan": USER_SCAN}, series_id=2, series_unique_id="01SECOND"))
    out = list(bridge_messages(first[:3] + second, BridgeConfig(detector_pixel_angle_rad=1e-3)))
    aborts = [m for m in out if isinstance(m, Abort)]
    assert len(aborts) == 1 and "replaced by series 2" in aborts[0].reason
    assert [type(m) for m in out].count(ScanStart) == 2 and isinstance(out[-1], ScanEnd)


def _resumed(received: int) -> tuple[list, SeriesConverter, ScanStart]:
    """A series whose daemon restarted after ``received`` images: the messages of the series,
    and a new converter that took it up from the scan recovered with those images."""
    from cryoptycho.protocols.sources import RecoveredScan

    msgs = _decoded(_series(user={"scan": USER_SCAN}))
    before = SeriesConverter(BridgeConfig(detector_pixel_angle_rad=1e-3))
    out = [m for msg in msgs[:1 + received] for m in before.feed(msg)]
    scan = out[0]
    assert isinstance(scan, ScanStart) and before.plan is not None
    conv = SeriesConverter(BridgeConfig(detector_pixel_angle_rad=1e-3))
    recovered = RecoveredScan(scan, np.arange(received, dtype=np.int64), before.plan.reducer)
    assert conv.resume([recovered], 2) is not None
    return msgs, conv, scan


def test_a_resumed_series_goes_on_in_its_scan_and_refuses_images_it_holds() -> None:
    msgs, conv, scan = _resumed(3)
    out = [m for msg in msgs[1 + 2:] for m in conv.feed(msg)]  # image 2 again, images 3-5, the end
    frames = [m for m in out if isinstance(m, Frames)]
    assert not any(isinstance(m, (ScanStart, Abort)) for m in out)
    assert {m.scan_id for m in frames} == {scan.scan_id}
    assert np.concatenate([m.indices for m in frames]).tolist() == [3, 4, 5]
    assert out[-1] == ScanEnd(scan.scan_id, 6) and conv.rejected == {"duplicate": 1}
    assert conv.stats["missing_images"] == 0


def test_a_new_series_after_a_resumed_one_aborts_it_with_what_it_holds_kept(caplog: pytest.LogCaptureFixture) -> None:
    """The detector moved on while the daemon was down: the resumed series' rest will not come
    (one series at a time, in order). Its scan is partial, and stopped as the daemon stops a
    recovered scan whose producer does not return and a live one whose sender went silent:
    aborted, the reason naming the images held of those declared, its frames kept in the spool
    for `finish_scan` — not a ScanEnd, which the daemon reports `finished` (until d09c75f the
    converter ended it so, matching the daemon's recovery then). A series cut short while the
    daemon ran is aborted too."""
    _msgs, conv, scan = _resumed(3)
    second = _decoded(_series(user={"scan": USER_SCAN}, series_id=2, series_unique_id="01SECOND"))
    with caplog.at_level(logging.WARNING):
        out = [m for msg in second[:3] for m in conv.feed(msg)]  # its start and two images
    assert not any(isinstance(m, ScanEnd) and m.scan_id == scan.scan_id for m in out)
    assert isinstance(out[0], Abort) and out[0].scan_id == scan.scan_id and isinstance(out[1], ScanStart)
    assert "3 of its 6 images held" in out[0].reason and "after the daemon's restart" in out[0].reason
    assert "finish_scan" in out[0].reason
    assert "resumed in recovered scan" in caplog.text
    third = _decoded(_series(user={"scan": USER_SCAN}, series_id=3, series_unique_id="01THIRD"))
    out = [m for msg in third for m in conv.feed(msg)]
    # (not resumed; its two images leave before its abort: test_a_series_replaced_before_its_end_*)
    assert isinstance(out[0], Frames) and out[0].indices.tolist() == [0, 1]
    assert isinstance(out[1], Abort) and "replaced by series 3" in out[1].reason
    assert isinstance(out[-1], ScanEnd) and out[-1].scan_id != scan.scan_id


@pytest.mark.parametrize("per_message", [64, 3])
def test_a_series_replaced_before_its_end_sends_every_image_it_holds_before_its_abort(
        per_message: int, caplog: pytest.LogCaptureFixture) -> None:
    """The detector starts another series after 4 of 6 images (an acquisition cancelled and
    restarted): the images of the partial batch not yet sent leave before the abort, bit for
    bit as the detector sent them, and the reason says how many the scan holds. Until this
    the converter dropped the batch: all 4 images lost with ``frames_per_message`` 64, the
    fourth with 3 (a batch partly filled)."""
    frames = _frames(6, seed=21)
    first = _decoded(_series(frames, user={"scan": USER_SCAN}))
    second = _decoded(_series(_frames(6, seed=22), user={"scan": USER_SCAN}, series_id=2,
                              series_unique_id="01SECOND"))
    conv = SeriesConverter(BridgeConfig(detector_pixel_angle_rad=1e-3, frames_per_message=per_message))
    out = [m for msg in first[:1 + 4] for m in conv.feed(msg)]
    scan = out[0]
    assert isinstance(scan, ScanStart)
    with caplog.at_level(logging.WARNING):
        out += conv.feed(second[0])
    mine = [m for m in out if getattr(m, "scan_id", None) == scan.scan_id]
    sent = [m for m in mine if isinstance(m, Frames)]
    assert isinstance(mine[-1], Abort) and not any(isinstance(m, ScanEnd) for m in mine)
    assert np.concatenate([m.indices for m in sent]).tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.concatenate([m.data for m in sent]), frames[:4])  # bin 1: as sent
    assert "replaced by series 2" in mine[-1].reason and "4 of its 6 images held" in mine[-1].reason
    assert "finish_scan" in mine[-1].reason and "4 of its 6 images held" in caplog.text
    assert conv.stats["frames_sent"] == 4


def test_a_stream_stopped_mid_series_sends_the_images_it_holds_before_its_abort() -> None:
    """The converter stopped in a series (the bridge or the daemon's source stopping, the
    detector's stream gone, a decoding failure): its partial batch leaves before the abort,
    the reason counting it. A scan its receiver refused keeps nothing (``keep=False``)."""
    frames = _frames(6, seed=23)
    msgs = _decoded(_series(frames, user={"scan": USER_SCAN}))
    conv = SeriesConverter(BridgeConfig(detector_pixel_angle_rad=1e-3))
    out = [m for msg in msgs[:1 + 5] for m in conv.feed(msg)]
    out += conv.stop("the DECTRIS bridge stopped before the series ended")
    sent = [m for m in out if isinstance(m, Frames)]
    np.testing.assert_array_equal(np.concatenate([m.data for m in sent]), frames[:5])
    assert isinstance(out[-1], Abort) and "stopped before the series ended: 5 of its 6 images held" in out[-1].reason
    refused = SeriesConverter(BridgeConfig(detector_pixel_angle_rad=1e-3))
    out = [m for msg in msgs[:1 + 5] for m in refused.feed(msg)]
    out = refused.refused(out[0].scan_id, "positions_m", "out of range")
    assert [type(m) for m in out] == [Abort]


# ------------------------------------------------------------------------------ over sockets


@pytest.fixture
def daemon() -> Iterator[tuple[str, zmq.Socket]]:
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    yield sock.getsockopt_string(zmq.LAST_ENDPOINT), sock
    sock.close()


def _received(sock: zmq.Socket) -> list:
    """What the bridge sent, up to its ScanEnd (one connection keeps the order: all before it
    is in), then whatever follows within 300 ms (there should be nothing)."""
    out: list = []
    while not (out and isinstance(out[-1], ScanEnd)):
        assert sock.poll(120_000), f"no ScanEnd after {[type(m).__name__ for m in out]}"
        out.append(decode(sock.recv_multipart()))
    while sock.poll(300):
        out.append(decode(sock.recv_multipart()))
    return out


def _bridge(sender: SimSender, send: Any, endpoint: str, config: dict, series: int = 1) -> Any:
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    stop = threading.Event()
    timer = threading.Timer(300.0, stop.set)  # a safety net, not a timing assertion
    timer.start()
    try:
        stats = run_bridge(sender.url, endpoint, config, stop, max_series=series, confirm=False)  # a bare PULL
    finally:
        timer.cancel()
    thread.join(5)
    return stats


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("compression", ["bslz4", "lz4"])
def test_round_trip_over_sockets(daemon: tuple[str, zmq.Socket], version: int, compression: str) -> None:
    endpoint, sock = daemon
    frames = _frames(size=32)
    series = _series(frames, user={"scan": USER_SCAN, "scan_id": "round-trip", "detector_pixel_angle_rad": 1e-3},
                     compression=compression)
    with SimSender(version) as sender:
        stats = _bridge(sender, lambda: sender.send_series(series, split_header=version == 1), endpoint,
                        {"crop": 16, "bin": 2, "frames_per_message": 4})
    msgs = _received(sock)
    assert type(msgs[0]) is ScanStart and type(msgs[-1]) is ScanEnd
    assert all(type(m) is Frames for m in msgs[1:-1])
    start = msgs[0]
    assert start.scan_id == "round-trip-series1" and start.frame_shape == (8, 8) and start.expected_frames == 6
    assert start.detector_pixel_angle_rad == pytest.approx(2e-3)
    data = np.concatenate([m.data for m in msgs[1:-1]])
    idx = np.concatenate([m.indices for m in msgs[1:-1]])
    np.testing.assert_array_equal(idx, np.arange(6))
    window = frames[:, 8:24, 8:24].astype(np.int64)  # beam centre (16, 16), 16-pixel crop
    np.testing.assert_array_equal(data, window.reshape(6, 8, 2, 8, 2).sum(axis=(2, 4)))
    assert msgs[-1].frame_count == 6
    assert stats.frames_sent == 6 and stats.decode_errors == 0 and stats.rejected_images == {}


def test_side_channel_positions_over_sockets(daemon: tuple[str, zmq.Socket]) -> None:
    endpoint, sock = daemon
    ctx = zmq.Context.instance()
    # A free port for the bridge's side channel, from a plain socket: a ZeroMQ socket closes
    # asynchronously, and a PUSH connecting meanwhile would hand the positions to the dying one.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    side_ep = f"tcp://127.0.0.1:{port}"
    pos = np.random.default_rng(5).uniform(-1e-9, 1e-9, (6, 2))
    with SimSender(2) as sender:
        def send() -> None:
            push = ctx.socket(zmq.PUSH)
            push.connect(side_ep)
            push.send_multipart(encode(positions_message(np.arange(6), pos, series_id=1)))
            sender.send_series(_series())
            push.close(linger=2000)

        stats = _bridge(sender, send, endpoint, {"positions_endpoint": side_ep,
                                                 "detector_pixel_angle_rad": 1e-3})
    msgs = _received(sock)
    assert msgs[0].positions_streamed
    frames = [m for m in msgs if isinstance(m, Frames)]
    got = np.concatenate([f.positions_m for f in frames])
    np.testing.assert_array_equal(got, pos[np.concatenate([f.indices for f in frames])])
    assert stats.frames_sent == 6 and stats.converter["images_without_position"] == 0


def test_bad_messages_are_counted_and_the_series_still_arrives(
    daemon: tuple[str, zmq.Socket], caplog: pytest.LogCaptureFixture
) -> None:
    endpoint, sock = daemon
    series = _series(user={"scan": USER_SCAN, "detector_pixel_angle_rad": 1e-3}, image_ids=[0, 1, 2, 4, 5])
    start, *images, end = list(v2_messages(series))
    stranger = list(v2_messages(_series(series_id=99, series_unique_id="01STRANGER")))[1]

    def send() -> None:
        sender.send_raw(end)  # a stale end from an earlier series: no start yet
        sender.send_raw(start)
        sender.send_raw(images[0][: len(images[0]) // 3])  # truncated
        sender.send_raw(stranger)
        for img in images[1:]:
            sender.send_raw(img)
        sender.send_raw(end)

    with caplog.at_level(logging.WARNING), SimSender(2) as sender:
        # one series: the stale end ends none this bridge took (it was counted, and a bridge
        # started with --series 1 stopped at it, before the series it was started for)
        stats = _bridge(sender, send, endpoint, {}, series=1)
    msgs = _received(sock)
    assert type(msgs[0]) is ScanStart and type(msgs[-1]) is ScanEnd
    frames = msgs[1:-1]  # batches leave when full or after flush_interval_s: any split is right
    assert all(type(m) is Frames for m in frames)
    np.testing.assert_array_equal(np.concatenate([m.indices for m in frames]), [1, 2, 4, 5])
    assert stats.decode_errors == 1 and stats.series_errors == 1
    assert stats.rejected_images == {"unknown_series": 1}
    assert stats.converter["missing_images"] == 2  # image 0 (truncated) and 3 (never sent)
    assert "truncated Stream V2 message" in caplog.text
    assert "end of series 1 arrived without its start" in caplog.text
    assert "2 of 6 images never arrived (ids [0, 3])" in caplog.text


def test_a_daemon_that_never_reads_stops_the_bridge_cleanly_with_the_series_lost_by_name(
        caplog: pytest.LogCaptureFixture) -> None:
    """Endless back-pressure: the daemon's ingest socket is connected but never read, so the
    producer's send times out. The bridge stops without a traceback (it raised ProducerTimeout)
    and returns its counters, the series in progress lost by name, and sends nothing more.
    ``frames_sent`` counts the frames the producer took: it counted the frames converted,
    which on a loaded host (CI) were all 48 before the first send timed out."""
    from cryoptycho.protocols.producer import Producer

    ctx = zmq.Context.instance()
    never_read = ctx.socket(zmq.PULL)
    never_read.setsockopt(zmq.LINGER, 0)
    never_read.setsockopt(zmq.RCVHWM, 1)
    never_read.setsockopt(zmq.RCVBUF, 4096)
    never_read.bind("tcp://127.0.0.1:*")
    endpoint = never_read.getsockopt_string(zmq.LAST_ENDPOINT)
    # 48 frames of 256² uint32 after the bridge (256 KiB a message): far beyond both sockets'
    # single-message queues and the kernel's buffers
    frames = np.random.default_rng(0).poisson(2, (48, 256, 256)).astype(np.uint32)
    series = _series(frames, user={"scan": {"kind": "raster", "shape": [6, 8], "step_m": [STEP, STEP]},
                                   "scan_id": "unread"})
    prod = Producer(endpoint, confirm=False, send_timeout_s=0.5, hwm=1)
    prod._socket.setsockopt(zmq.SNDBUF, 4096)
    try:
        with SimSender(2) as sender, caplog.at_level(logging.ERROR):
            thread = threading.Thread(target=lambda: sender.send_series(series), daemon=True)
            thread.start()
            stats = run_bridge(sender.url, endpoint, {"frames_per_message": 1}, max_series=1, producer=prod,
                               confirm=False)
            thread.join(30)
    finally:
        prod.close()
        never_read.close()
    assert stats.series_lost == 1 and stats.series_errors == 1
    assert 0 < stats.frames_sent < 48
    assert prod.scan is None
    assert any("unread-series1" in r.getMessage() and "lost" in r.getMessage() for r in caplog.records)
    assert any("took no message" in r.getMessage() for r in caplog.records)  # the cause, said once


def test_receiver_decodes_only_the_chosen_channel() -> None:
    frames = {"threshold_1": _frames(2), "threshold_2": _frames(2, seed=1)}
    series = SimSeries(frames)
    with SimSender(2) as sender, DectrisReceiver(sender.endpoint, 2, channels=["threshold_2"]) as rx:
        threading.Thread(target=sender.send_series, args=(series,), daemon=True).start()
        got: list = []
        stop = threading.Event()
        for msg in rx.messages(stop):
            got.append(msg)
            if isinstance(msg, SeriesEnd):
                stop.set()
    images = [m for m in got if isinstance(m, Image)]
    assert [list(m.data) for m in images] == [["threshold_2"], ["threshold_2"]]
    np.testing.assert_array_equal(images[1].data["threshold_2"], frames["threshold_2"][1])


def test_series_end_waits_for_lagging_positions_then_gives_up() -> None:
    start, *images, end = _decoded(_series())
    pos = np.zeros((6, 2))
    conv = SeriesConverter(BridgeConfig(raster=CONFIG_RASTER, detector_pixel_angle_rad=1e-3), side_channel=True)
    out = [m for msg in (start, *images, end) for m in conv.feed(msg)]
    assert [type(m) for m in out] == [ScanStart] and conv.closing
    assert conv.add_positions(None, np.arange(3), pos[:3]) == [] and conv.closing  # three still wait
    (partial,) = conv.flush()
    np.testing.assert_array_equal(partial.indices, [0, 1, 2])
    out = conv.add_positions(None, np.arange(3, 6), pos[3:])
    assert [type(m) for m in out] == [Frames, ScanEnd] and out[-1].frame_count == 6

    conv = SeriesConverter(BridgeConfig(raster=CONFIG_RASTER, detector_pixel_angle_rad=1e-3,
                                        position_wait_s=0), side_channel=True)
    out = [m for msg in (start, *images) for m in conv.feed(msg)]
    out += conv.add_positions(start.series_id, np.arange(4), pos[:4])
    out += conv.feed(end)
    assert isinstance(out[-1], ScanEnd) and out[-1].frame_count == 4
    assert conv.stats["images_without_position"] == 2


def test_user_camera_length_wins_over_config_pixel_angle() -> None:
    cfg = BridgeConfig(detector_pixel_angle_rad=1e-3)
    out, _ = _convert(_series(user={"scan": USER_SCAN, "camera_length_m": 0.5}), cfg)
    assert out[0].detector_pixel_angle_rad == pytest.approx(100e-6 / 0.5)
    out, _ = _convert(_series(user={"scan": USER_SCAN}), cfg)
    assert out[0].detector_pixel_angle_rad == pytest.approx(1e-3)


# ---------------------------------------------------------------------------- a real daemon


def _start_bridge(daemon: Any, series: int, *sim_args: str, config: dict | None = None,
                  tmp_path: Any = None) -> tuple[Any, Any]:
    """``cryoptycho dectris-bridge`` from ``cryoptycho dectris-sim --series N`` into the real
    ``daemon``, started: (the bridge's process, the simulator's)."""
    import json
    import subprocess
    import sys

    from daemon_support import start_dectris_sim

    sim, url = start_dectris_sim("--series", str(series), *sim_args)
    cmd = [sys.executable, "-m", "cryoptycho.daemon.cli", "dectris-bridge", url, "--ingest", daemon.ingest,
           "--control", daemon.control, "--series", str(series)]
    if config is not None:
        (tmp_path / "bridge.json").write_text(json.dumps(config))
        cmd += ["--config", str(tmp_path / "bridge.json")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), sim


def _bridge_result(bridge: Any, sim: Any) -> tuple[int, dict, str]:
    """The bridge's exit status, its printed counters and its log, once it has exited."""
    import json

    try:
        out, err = bridge.communicate(timeout=300)
    finally:
        bridge.kill()
        sim.kill()
        sim.wait(10)
    lines = out.strip().splitlines()
    assert lines and lines[-1].startswith("{"), (bridge.returncode, out, err)
    return bridge.returncode, json.loads(lines[-1]), err


def _bridge_into(daemon: Any, series: int, *sim_args: str, config: dict | None = None,
                 tmp_path: Any = None) -> tuple[int, dict, str]:
    return _bridge_result(*_start_bridge(daemon, series, *sim_args, config=config, tmp_path=tmp_path))


def test_series_refused_for_a_full_queue_wait_in_the_bridge_and_all_finish(tmp_path: Any) -> None:
    """The bridge sends unconfirmed, so the daemon's refusal of a series (its scan queue full:
    max_concurrent_scans + max_queued_scans) never reached it: 3 of 5 series were lost while
    its stats said series=5, frames_sent=180, series_errors=0. A refused scan_start is now read
    back (control `receipt`); one refused for a full queue waits in the bridge's memory and is
    sent again when the daemon has room, and every series is reconstructed."""
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import metrics_of, start_daemon, synthetic_scan, wait_for

    series, frames = 5, 36
    scan = synthetic_scan(n_side=4, m=32)
    daemon = start_daemon(tmp_path, "--set", "options.iterations=2", "--set", "refine_time_budget_s=0.5",
                          "--set", "max_concurrent_scans=1", "--set", "max_queued_scans=1",
                          "--set", 'output_formats=["h5"]')

    def refused() -> float:
        return metrics_of(daemon).get("cryoptycho_scans_total{outcome=refused}", 0)

    try:
        with (ControlClient(daemon.control, timeout_s=30) as ctl, Producer(daemon.ingest, control=daemon.control) as one,
              Producer(daemon.ingest, control=daemon.control) as two):
            one.start_scan(**scan.start_fields("running"))  # the slot and the queue are taken: no scan_end
            wait_for(lambda: ctl.status()["running"] == ["running"], 120, "the first scan to run", daemon)
            two.start_scan(**scan.start_fields("queued"))
            wait_for(lambda: ctl.status()["waiting"] == ["queued"], 120, "the second scan to queue", daemon)
            bridge = _start_bridge(daemon, series, "--frames", str(frames), "--size", "32")
            wait_for(lambda: refused() >= 1, 120, "the daemon to refuse the bridge's first series", daemon)
            one.abort("room for the bridge's series")
            two.abort("room for the bridge's series")
        rc, stats, log = _bridge_result(*bridge)
        assert rc == 0, log
        assert (stats["series"], stats["frames_sent"]) == (series, series * frames)
        assert (stats["series_refused"], stats["series_lost"], stats["series_errors"]) == (0, 0, 0), stats
        assert stats["series_waited"] >= 1, stats
        assert "the daemon's scan queue is full" in log and "max_queued_scans" in log

        def finished() -> float:
            return metrics_of(daemon).get("cryoptycho_scans_total{outcome=finished}", 0)

        wait_for(lambda: finished() >= series, 240, f"{series} scans to finish", daemon)
        m = metrics_of(daemon)
        assert m.get("cryoptycho_frames_received_total") == series * frames, daemon.log()  # (the others sent none)
        assert m.get("cryoptycho_frames_dropped_total{reason=unknown_scan}", 0) == 0
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_a_series_the_daemon_refuses_is_counted_logged_and_fails_the_exit_status(tmp_path: Any) -> None:
    """A refusal other than a full queue (here: the scan cannot fit the daemon's memory budget)
    cannot be waited out: the series is counted as refused, logged with the daemon's reason and
    the bridge exits 1 (it was counted as sent, exit 0); the bridge goes on with the next."""
    from daemon_support import start_daemon

    daemon = start_daemon(tmp_path, "--set", "host_memory_budget_bytes=1000")
    try:
        rc, stats, log = _bridge_into(daemon, 2, "--frames", "16", "--size", "32")
        assert rc == 1, log
        assert (stats["series_refused"], stats["series_errors"], stats["series_lost"]) == (2, 2, 0), stats
        assert stats["converter"]["rejected_series"] == 2
        assert "the daemon refused scan" in log and "memory_budget" in log, log
        assert "series that did not reach the daemon whole: 2 refused by the daemon" in log
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_a_series_named_as_a_result_the_daemon_holds_is_named_anew_not_refused(tmp_path: Any) -> None:
    """After the detector and the daemon restarted, the series counter (or, here, the simulator's
    scan id left in user_data) names a series as one the daemon already has a result of. The
    daemon's own --source then picks a free name; the bridge sent the old one, the daemon refused
    it (unique_scan_id) and the whole series was lost — a detector cannot send it again."""
    from cryoptycho.daemon.storage.dataset import write_dataset
    from cryoptycho.daemon.storage.outputs import output_paths
    from cryoptycho.daemon.storage.spool import file_stem
    from cryoptycho.gpu.data import PtychoData
    from cryoptycho.protocols.control import ControlClient
    from daemon_support import start_daemon

    rng = np.random.default_rng(0)
    dataset = write_dataset(tmp_path / "grid.h5", PtychoData(
        frames=rng.poisson(3, (16, 32, 32)).astype(np.uint16), positions=rng.uniform(-2e-9, 2e-9, (16, 2)),
        energy=300e3, detector_pixel_angle=1e-3))
    old = "grid-series1"  # user_data's scan id (the file's stem) and the series id (README, DECTRIS detectors)
    daemon = start_daemon(tmp_path, "--set", "options.iterations=2", "--set", "refine_time_budget_s=0.5",
                          "--set", 'output_formats=["h5"]')
    (kept,) = output_paths(tmp_path / "results" / file_stem(old), ["h5"]).values()
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(b"the result of an earlier run")
    try:
        rc, stats, log = _bridge_into(daemon, 1, "--dataset", str(dataset))
        assert rc == 0, log
        assert (stats["series_refused"], stats["series_lost"], stats["series_errors"]) == (0, 0, 0), stats
        assert stats["frames_sent"] == 16, stats
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            (scan,) = ctl.list_scans()
        assert scan["scan_id"] != old and scan["scan_id"].startswith(old), scan
        assert kept.read_bytes() == b"the result of an earlier run"
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_series_beyond_max_held_bytes_are_dropped_by_name_while_the_queue_stays_full(tmp_path: Any) -> None:
    """What the bridge holds for a full queue is bounded (max_held_bytes): beyond it a series
    is dropped, logged and counted as lost, never held without bound nor dropped unseen."""
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import start_daemon, synthetic_scan, wait_for

    scan = synthetic_scan(n_side=4, m=32)
    daemon = start_daemon(tmp_path, "--set", "max_concurrent_scans=1", "--set", "max_queued_scans=1")
    try:
        with (ControlClient(daemon.control, timeout_s=30) as ctl, Producer(daemon.ingest, control=daemon.control) as one,
              Producer(daemon.ingest, control=daemon.control) as two):
            one.start_scan(**scan.start_fields("running"))  # the slot and the queue stay taken: no scan_end
            wait_for(lambda: ctl.status()["running"] == ["running"], 120, "the first scan to run", daemon)
            two.start_scan(**scan.start_fields("queued"))
            wait_for(lambda: ctl.status()["waiting"] == ["queued"], 120, "the second scan to queue", daemon)
            rc, stats, log = _bridge_into(daemon, 2, "--frames", "16", "--size", "32", config={"max_held_bytes": 0},
                                          tmp_path=tmp_path)
            assert rc == 1, log
            assert (stats["series_lost"], stats["series_errors"], stats["series_refused"], stats["series_waited"]) \
                == (2, 2, 0, 0), stats
            assert "the daemon's scan queue is full" in log
            assert "lost: the daemon's scan queue stayed full" in log and "max_held_bytes" in log
            one.abort("test ends")
            two.abort("test ends")
    finally:
        assert daemon.stop() == 0, daemon.log()


# ------------------------------------------------------------------------------ start gate, unit


class _Clock:
    """The bridge module's clock, advanced by the test (deadlines without sleeping)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t


class _Control:
    """A stand-in for the daemon's control socket: its receipt says what the test sets."""

    endpoint = "stand-in"

    def __init__(self) -> None:
        self.state = "unknown"
        self.extra: dict[str, Any] = {}  #: further receipt fields (starts_refused, start_time_s)

    def receipt(self, scan_id: str) -> dict[str, Any]:
        return {"scan_id": scan_id, "state": self.state, "refused_at": None, "error": None, **self.extra}

    def status(self) -> dict[str, Any]:
        return {"running": [], "waiting": []}


@pytest.fixture
def gate_rig(daemon: tuple[str, zmq.Socket], monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    from cryoptycho.protocols.dectris import bridge as bridge_module
    from cryoptycho.protocols.dectris.bridge import BridgeStats, StartGate
    from cryoptycho.protocols.producer import Producer

    clock = _Clock()
    monkeypatch.setattr(bridge_module, "time", clock)
    endpoint, sock = daemon
    prod = Producer(endpoint, confirm=False, send_timeout_s=5.0)
    out, _conv = _convert(_series(user={"scan": USER_SCAN}), BridgeConfig())
    frames_bytes = sum(m.data.nbytes for m in out if isinstance(m, Frames))
    control, stats = _Control(), BridgeStats()
    gate = StartGate(prod, control, SeriesConverter(BridgeConfig()), stats,  # type: ignore[arg-type]
                     max_held_bytes=frames_bytes, timeout_s=5.0)
    try:
        yield gate, control, clock, sock, out, stats
    finally:
        prod.close()


def _next(sock: zmq.Socket) -> Any:
    assert sock.poll(30_000), "the bridge sent nothing"
    return decode(sock.recv_multipart())


def test_a_start_a_restarted_daemon_lost_is_sent_again_and_the_series_then_delivered(gate_rig: tuple) -> None:
    """The daemon restarts after the bridge sent a scan_start, before reading it: its receipt
    says "unknown" for good. Past the send timeout the gate sends the start once more; the
    restarted daemon takes it and the series follows."""
    gate, control, clock, sock, out, stats = gate_rig
    gate.put(out)
    first = _next(sock)
    assert isinstance(first, ScanStart)  # ... read by the daemon that then died: lost
    gate.put([])
    assert gate.busy and not sock.poll(0)  # within the timeout: nothing sent again yet
    clock.t += 6.0
    gate.put([])
    again = _next(sock)
    assert isinstance(again, ScanStart) and again.scan_id == first.scan_id
    control.state = "receiving"  # the restarted daemon read it
    gate.put([])
    rest = []
    while not (rest and isinstance(rest[-1], ScanEnd)):
        rest.append(_next(sock))
    assert [type(m) for m in rest] == [type(m) for m in out[1:]]
    assert not gate.busy and stats.series_lost == 0


def test_a_start_never_read_is_lost_after_it_was_sent_twice(gate_rig: tuple, caplog: pytest.LogCaptureFixture) -> None:
    gate, _control, clock, sock, out, stats = gate_rig
    gate.put(out[:1])
    start = _next(sock)
    clock.t += 6.0
    gate.put([])
    assert isinstance(_next(sock), ScanStart)
    clock.t += 6.0
    with caplog.at_level(logging.ERROR):
        gate.put(out[1:])
    abort = _next(sock)
    assert isinstance(abort, Abort) and abort.scan_id == start.scan_id  # if it ever reads the start
    assert not gate.busy and gate.held_bytes == 0
    assert stats.series_lost == 1 and stats.series_errors == 1
    assert any(start.scan_id in r.getMessage() and "sent twice" in r.getMessage() for r in caplog.records)


def test_a_daemon_that_reads_nothing_costs_the_bridge_at_most_max_held_bytes(
        gate_rig: tuple, caplog: pytest.LogCaptureFixture) -> None:
    """A daemon in back-pressure answers receipt "unknown" and reads nothing: the frames held
    for the verdict stop at max_held_bytes, the series is dropped by name and counted, and the
    next series is tried."""
    gate, _control, _clock, sock, out, stats = gate_rig
    frames = [m for m in out if isinstance(m, Frames)]
    gate.put(out[:1])
    start = _next(sock)
    with caplog.at_level(logging.ERROR):
        for msg in frames + frames[:1]:  # one past the cap (the whole series fits it)
            gate.put([msg])
            assert gate.held_bytes <= gate.max_held_bytes
    assert stats.series_lost == 1 and gate.pending is None
    abort = _next(sock)
    assert isinstance(abort, Abort) and abort.scan_id == start.scan_id
    assert any(start.scan_id in r.getMessage() and "max_held_bytes" in r.getMessage() for r in caplog.records)
    gate.put(out[1:])  # the rest of the lost series goes nowhere
    assert not gate.held and not sock.poll(0)
    nxt, _ = _convert(_series(user={"scan": USER_SCAN}, series_id=2, series_unique_id="01NEXT"), BridgeConfig())
    gate.put(nxt[:1])
    assert _next(sock).scan_id == nxt[0].scan_id and gate.pending is not None


def test_a_series_named_like_another_senders_scan_is_refused_not_sent_into_it(
        gate_rig: tuple, caplog: pytest.LogCaptureFixture) -> None:
    """Two bridges named a series identically at the same moment: the daemon took the other
    one's scan_start and refused this one's (unique_scan), and its receipt said so
    (starts_refused, start_time_s: the other sender's stamp). The gate read only `state`
    ("acquiring": accepted) and sent the whole series into the other bridge's scan, where
    the daemon filed its frames (of one index, the first to arrive). It reads those fields as
    the SDK does now: the series is refused by name, counted, and none of its frames sent."""
    gate, control, _clock, sock, out, stats = gate_rig
    gate.put(out[:1])
    start = _next(sock)
    # the other sender's start was read, this one's not yet: waited for, nothing sent
    control.state, control.extra = "acquiring", {"starts_refused": 0, "start_time_s": start.time_s - 0.25}
    gate.put(out[1:])
    assert gate.busy and not sock.poll(0)
    control.extra = {"starts_refused": 1, "start_time_s": start.time_s - 0.25}  # ... then refused
    with caplog.at_level(logging.ERROR):
        gate.put([])
    assert not sock.poll(200), "a frame of the refused series was sent into the other sender's scan"
    assert not gate.busy and gate.held_bytes == 0
    assert stats.series_refused == 1 and stats.series_errors == 1 and stats.series_lost == 0
    assert any(start.scan_id in r.getMessage() and "another sender" in r.getMessage() for r in caplog.records)


def test_the_gates_own_scan_is_delivered_when_a_second_start_of_its_id_was_refused(
        gate_rig: tuple, caplog: pytest.LogCaptureFixture) -> None:
    """The other side of the collision: the daemon holds this bridge's scan (its start_time_s is
    this start's stamp) and refused another sender's start. The series is delivered, with a
    warning that another sender uses the id."""
    gate, control, _clock, sock, out, stats = gate_rig
    gate.put(out[:1])
    start = _next(sock)
    control.state, control.extra = "acquiring", {"starts_refused": 1, "start_time_s": start.time_s}
    with caplog.at_level(logging.WARNING):
        gate.put(out[1:])
    rest = []
    while not (rest and isinstance(rest[-1], ScanEnd)):
        rest.append(_next(sock))
    assert [type(m) for m in rest] == [type(m) for m in out[1:]]
    assert not gate.busy and stats.series_refused == 0
    assert any("another sender uses the id" in r.getMessage() for r in caplog.records)


def test_frames_sent_counts_what_the_producer_took_not_what_was_converted() -> None:
    """The bridge converts what the detector sent in a burst, then sends it: a daemon that
    stopped reading left the bridge's summary saying all the converted frames were sent (CI,
    a loaded host: "frames_sent=48" of a series the daemon got 4 of)."""
    from cryoptycho.protocols.dectris.bridge import BridgeStats, dispatch
    from cryoptycho.protocols.errors import ProducerTimeout

    class Stalled:
        """A producer whose daemon takes two frame messages, then nothing."""

        scan = "s"
        taken = 0

        def send_frames(self, data: Any, indices: Any, positions: Any) -> None:
            if self.taken == 2:
                raise ProducerTimeout("the daemon took no message for 0.5 s")
            self.taken += 1

    messages = [Frames("s", np.arange(3 * k, 3 * k + 3, dtype=np.uint32), np.zeros((3, 4, 4), np.uint16), None)
                for k in range(5)]
    stats = BridgeStats()
    with pytest.raises(ProducerTimeout):
        dispatch(Stalled(), messages, None, stats)  # type: ignore[arg-type]
    assert stats.frames_sent == 6


def test_a_series_replaced_before_its_end_reaches_a_daemons_spool_as_the_detector_sent_it(tmp_path: Any) -> None:
    """End to end: a simulated detector sends 40 of a series' 48 images, then starts another
    series; the bridge carries both into a real daemon. The first scan is aborted with its 40
    images in the spool, equal to the detector's frames (bin 1, no crop: the frames as sent).
    ``flush_interval_s`` is long, so the 40 images are still the converter's partial batch when
    the next start comes (the point of interest, held without any timing): until this they were
    dropped, and the aborted scan held none of them."""
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import read_spool, spool_path

    cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", publish="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0",
                        metrics_enabled=False, spool_dir=tmp_path / "spool", results_dir=tmp_path / "results",
                        resolution_interval_s=0, drain_timeout_s=0)
    bg = BackgroundService(cfg)
    frames = _frames(48, size=32, seed=31)

    def user(scan_id: str, n: int) -> dict:
        return {"scan": {"kind": "raster", "shape": [1, n], "step_m": [STEP, STEP]}, "scan_id": scan_id}

    first = list(v2_messages(_series(frames, user=user("cut", 48))))
    second = list(v2_messages(_series(_frames(24, size=32, seed=32), user=user("next", 24), series_id=2,
                                      series_unique_id="01SECOND")))
    try:
        ingest, control = bg.service.endpoints["ingest"], bg.service.endpoints["control"]
        with SimSender(2) as sender:
            stop = threading.Event()
            result: dict[str, Any] = {}
            config = BridgeConfig(detector_pixel_angle_rad=1e-3, energy_eV=300e3, flush_interval_s=3600)
            runner = threading.Thread(target=lambda: result.update(stats=run_bridge(
                sender.url, ingest, config, stop, max_series=1, control=control)), daemon=True)
            runner.start()
            timer = threading.Timer(300.0, stop.set)  # a safety net, not a timing assertion
            timer.start()
            try:
                for m in first[:1 + 40] + second:
                    sender.send_raw(m)
                runner.join(120)
            finally:
                timer.cancel()
                stop.set()
        assert not runner.is_alive()
        scans = bg.service.scans

        def settled(scan_id: str) -> Any:
            s = scans.sessions.get(scan_id)
            return s if s is not None and (s.ended or s.state.value == "aborted") else None

        cut = _wait_for(lambda: settled("cut-series1"), "the cut scan to be aborted")
        nxt = _wait_for(lambda: settled("next-series2"), "the next scan to end")
        scans.flush_disk()
        assert cut.ledger.as_dict()["received"] == 40
        assert cut.state.value == "aborted" and "40 of its 48 images held" in (cut.error or "")
        assert nxt.ledger.as_dict()["received"] == 24
        path = spool_path(cfg.spool_dir, "cut-series1")
        bg.stop()
        spooled = read_spool(path)
        order = np.argsort(spooled.indices)
        assert spooled.indices[order].tolist() == list(range(40))
        np.testing.assert_array_equal(spooled.frames[order], frames[:40])
    finally:
        if bg.thread.is_alive():
            bg.stop()


def _wait_for(predicate: Any, what: str, timeout: float = 120.0) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
