"""The DECTRIS detector as a direct source of the daemon: frames decoded once, binned once,
spooled with the detector's own chunks, validated like the ingest socket, never fatal."""

from __future__ import annotations

import contextlib
import logging
import re
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import pytest
import zmq
from cryoptycho.daemon.config import ServiceConfig
from cryoptycho.daemon.service import BackgroundService
from cryoptycho.daemon.storage.spool import DATA, DERIVED, DETECTOR_FRAMES
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.protocols import compression, sources
from cryoptycho.protocols.dectris.binning import FrameReducer
from cryoptycho.protocols.dectris.bridge import BridgeConfig
from cryoptycho.protocols.dectris.codec import bslz4_compress
from cryoptycho.protocols.dectris.sim import SimSender, SimSeries, v1_messages, v2_messages
from cryoptycho.protocols.dectris.source import DectrisSource, spool_chunk
from cryoptycho.protocols.sources import (
    Source,
    open_source,
    register_source,
    source_class,
    source_schemes,
)
from protocol_helpers import run_dectris_source

CHANNEL = "threshold_1"
SIDE = 64
#: scattering angle of one detector pixel: the binned 32×32 frames sample the default probe
ANGLE = 5e-4


def _frames(n: int, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[:SIDE, :SIDE] - SIDE // 2
    lam = np.where(yy**2 + xx**2 <= (SIDE / 5) ** 2, 3.0, 0.05)
    return np.random.default_rng(seed).poisson(lam, (n, SIDE, SIDE)).astype(np.uint16)


def _series(frames: np.ndarray, scan_id: str, **kw: Any) -> list[bytes]:
    user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [1, len(frames)], "step_m": [2e-10, 2e-10]},
                           "detector_pixel_angle_rad": ANGLE, "scan_id": scan_id}}
    return list(v2_messages(SimSeries(frames, compression="bslz4", user_data=user, **kw)))


def _payload(raw: bytes) -> bytes:
    import cbor2

    return cbor2.loads(raw[3:])["data"][CHANNEL].value[1].value.value[2]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[BackgroundService]:
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", publish="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0",
                        metrics_enabled=False, spool_dir=tmp_path / "spool", results_dir=tmp_path / "results",
                        resolution_interval_s=0, drain_timeout_s=0)
    bg = BackgroundService(cfg)
    yield bg
    if bg.thread.is_alive():
        bg.stop()


def _run(service: BackgroundService, messages: list[Any], workers: int = 2, version: int = 2,
         on_notice: Any = None, processes: bool = False, url_version: int | None = None, **cfg: Any) -> Any:
    """Push ``messages`` from a simulated detector through a DectrisSource into ``service``
    (decoding threads unless ``processes``: most tests look at what the threads did);
    ``url_version``: the source URL names that Stream version instead of the sender's."""
    cfg.setdefault("channel", CHANNEL)
    return run_dectris_source(service.service.direct, messages, BridgeConfig(crop=SIDE, bin=2, energy_eV=300e3, **cfg),
                              version=version, url_version=url_version, workers=workers, batch=16,
                              on_notice=on_notice, processes=processes)


def _wait(predicate: Any, what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _ended(service: BackgroundService, scan_id: str) -> Any:
    """The scan's session once it ended and its frames are on disk (a frame counts as received
    only after the spool thread wrote it, which may be just after the scan's end was read)."""
    def check() -> Any:
        s = service.service.scans.sessions.get(scan_id)
        return s if s is not None and s.ended else None
    session = _wait(check, f"scan {scan_id} to end")
    service.service.scans.flush_disk()
    return session


def _record_closes(service: BackgroundService, monkeypatch: Any) -> list[tuple[str, dict[str, int]]]:
    """Record each spool close's file name and derived rows; one iteration, no parallax fit."""
    from cryoptycho.daemon.storage.spool import SpoolWriter

    closed: list[tuple[str, dict[str, int]]] = []
    real_close = SpoolWriter.close

    def close(self: SpoolWriter, held: Any = None, peak: Any = None) -> None:
        real_close(self, held, peak)
        closed.append((self.path.name, self.derived_rows.copy()))

    monkeypatch.setattr(SpoolWriter, "close", close)
    config = service.service.config
    config.options = config.options.model_copy(update={"parallax": False, "iterations": 1})
    return closed


def _stream_past_a_held_close(service: BackgroundService, messages: list[bytes], asked: threading.Event,
                              gate: threading.Event, closed: list[tuple[str, dict[str, int]]], held: str,
                              asked_what: str, next_what: str) -> None:
    """Send two series through a DECTRIS source; once the first's close is held at its gate,
    the next series ("next-series2", 24 frames) must be on disk while the close still waits."""
    with SimSender(2) as sender:
        source = DectrisSource(sender.url, BridgeConfig(channel=CHANNEL, crop=SIDE, bin=2, energy_eV=300e3),
                               workers=2, batch=16)
        stop = threading.Event()
        runner = threading.Thread(target=lambda: source.run(service.service.direct, stop, max_series=2),
                                  daemon=True)
        runner.start()
        try:
            _wait(source.ready.is_set, "the source's workers to start")
            for m in messages:
                sender.send_raw(m)
            _wait(asked.is_set, asked_what)

            def next_received() -> bool:
                s = service.service.scans.sessions.get("next-series2")
                return s is not None and s.ledger.received == 24
            _wait(next_received, next_what)
            assert not [name for name, _ in closed if name.startswith(held)]  # (still waiting)
        finally:
            gate.set()
            stop.set()
            runner.join(60)


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("saturation_value, binned", [(None, np.uint32), (16383, np.uint16)])
def test_a_scans_binned_frames_are_spooled_at_its_end_from_the_frames_its_engine_holds(
        service, monkeypatch, saturation_value: int | None, binned: type, narrow: bool) -> None:
    """At the scan's end its binned frames are written to the spool from the worker's frame
    store (not decoded and binned again from the detector frames): the same counts as derived
    from the detector frames, as uint8 (the engine's largest count: ScanWorker.held_peak),
    whether binned as uint32 or (a detector that declares a saturation value ≤ 16,383) uint16,
    and whether the store held them in their own dtype or (``narrow``: a store in a mapping of
    its own, which 100 frames of 96×96 are not by default) as uint8."""
    from cryoptycho.daemon import worker as worker_module
    from cryoptycho.daemon.storage.spool import SpoolWriter, derive_rows, load_derivation
    from cryoptycho.gpu import framestore

    # the spool thread waits for the worker to take in the scan's frames however busy the box
    monkeypatch.setattr(worker_module, "HELD_FRAMES_WAIT_S", 300.0)
    monkeypatch.setattr(framestore, "_MAP_BYTES", 1 if narrow else framestore._MAP_BYTES)
    held_dtypes: list[np.dtype] = []
    real_held = worker_module.ScanWorker.held_frames

    def held_frames(self: Any, start: int, stop: int) -> Any:
        rows = real_held(self, start, stop)
        if rows is not None:
            held_dtypes.append(rows.rows.dtype)
        return rows

    monkeypatch.setattr(worker_module.ScanWorker, "held_frames", held_frames)
    closed: list[tuple[Any, bytes, bytes]] = []
    real_close = SpoolWriter.close

    def close(self: SpoolWriter, held: Any = None, peak: Any = None) -> None:
        real_close(self, held, peak)
        with h5py.File(self.path, "r") as f:  # before the worker may delete it
            reducer, _ = load_derivation(f)
            n = int(f[DATA].attrs["count"])
            closed.append((self.derived_rows.copy(), f[DATA]["data"][:], derive_rows(f, reducer, 0, n)))

    # every batch reaches the engine with the reducer's peak, never below its largest count
    from cryoptycho.gpu.stream import StreamingReconstructor
    given: list[tuple[int | None, int]] = []
    real_add = StreamingReconstructor.add_frames

    def add_frames(self: Any, frames: Any, positions_m: Any, indices: Any = None, peak: Any = None) -> None:
        given.append((peak, int(frames.max())))
        real_add(self, frames, positions_m, indices, peak)

    monkeypatch.setattr(StreamingReconstructor, "add_frames", add_frames)

    monkeypatch.setattr(SpoolWriter, "close", close)
    config = service.service.config  # (a short refinement: the daemon stops sooner)
    config.options = config.options.model_copy(update={"parallax": False, "iterations": 1})
    frames = _frames(100, seed=4)
    _, stats = _run(service, _series(frames, "held", saturation_value=saturation_value))
    assert stats.frames_sent == 100
    _wait(lambda: closed, "the scan's spool to close")
    rows, written, derived = closed[0]
    assert rows == {"frame_store": 100}  # a whole chunk of 64 rows and a part-full one
    # stored in the smallest dtype that holds the largest count, which the engine measured
    assert derived.dtype == binned and 0 < derived.max() <= 255 and written.dtype == np.uint8
    np.testing.assert_array_equal(written, derived)
    assert held_dtypes and set(held_dtypes) == {np.dtype(np.uint8) if narrow else np.dtype(binned)}
    assert given and all(peak is not None and true <= peak <= 255 for peak, true in given)


def test_an_aborted_scans_binned_frames_are_spooled_from_the_frames_its_worker_held(service, monkeypatch) -> None:
    """A scan aborted (its source stopped before the series' end) while its worker holds its
    frames: the spool's close takes the binned rows from the worker's frame store, as at a
    scan's end (ScanManager._hand_over), in the dtype of their largest count: the same counts
    as derived from the detector frames; and the worker lets go of them after the close."""
    from cryoptycho.daemon import worker as worker_module
    from cryoptycho.daemon.storage.spool import SpoolWriter, derive_rows, load_derivation

    monkeypatch.setattr(worker_module, "HELD_FRAMES_WAIT_S", 300.0)
    closed: list[tuple[Any, bytes, bytes, str]] = []
    real_close = SpoolWriter.close

    def close(self: SpoolWriter, held: Any = None, peak: Any = None) -> None:
        real_close(self, held, peak)
        with h5py.File(self.path, "r") as f:
            reducer, _ = load_derivation(f)
            n = int(f[DATA].attrs["count"])
            closed.append((self.derived_rows.copy(), f[DATA]["data"][:], derive_rows(f, reducer, 0, n),
                           str(f.attrs["status"])))

    monkeypatch.setattr(SpoolWriter, "close", close)
    config = service.service.config
    config.options = config.options.model_copy(update={"parallax": False, "iterations": 1})
    frames = _frames(100, seed=5)
    scans = service.service.scans
    with SimSender(2) as sender:
        source = DectrisSource(sender.url, BridgeConfig(channel=CHANNEL, crop=SIDE, bin=2, energy_eV=300e3),
                               workers=2, batch=16)
        stop = threading.Event()
        runner = threading.Thread(target=lambda: source.run(service.service.direct, stop), daemon=True)
        runner.start()
        try:
            _wait(source.ready.is_set, "the source's workers to start")
            for m in _series(frames, "aborted")[:-1]:  # no series end
                sender.send_raw(m)

            def held() -> Any:  # every frame spooled and in the worker's frame store
                session = next(iter(scans.sessions.values()), None)  # (its id: the series' appended)
                worker = None if session is None else scans.running.get(session.scan_id)
                if session is None or worker is None or session.ledger.received < 100:
                    return None
                return worker if worker.queued_frames == 0 else None
            worker = _wait(held, "the worker to hold the scan's frames", timeout=60)
        finally:
            stop.set()  # the source aborts the open scan
            runner.join(60)
    _wait(lambda: closed, "the aborted scan's spool to close")
    rows, written, derived, status = closed[0]
    assert status == "aborted"
    assert rows == {"frame_store": 100}
    assert derived.dtype == np.uint32 and 0 < derived.max() <= 255 and written.dtype == np.uint8
    np.testing.assert_array_equal(written, derived)
    _wait(lambda: worker._held is None, "the worker to let go of the frames it kept for the close")


def test_a_scans_end_waiting_for_its_worker_does_not_hold_up_the_next_series(service, monkeypatch) -> None:
    """At a scan's end its spool writes the binned rows from the worker's frame store, which
    waits for a worker that is behind (up to 5 s). That wait ran on the single spool thread:
    the next series' frames waited behind it, not received. Here the worker's frames are held
    back (a gate) until the next scan has every frame on disk; the first scan is then closed
    from its worker's frames and finishes."""
    from cryoptycho.daemon.worker import ScanWorker

    gate, asked = threading.Event(), threading.Event()
    real_held = ScanWorker.held_frames

    def gated(self: ScanWorker, start: int, stop: int) -> Any:
        asked.set()
        assert gate.wait(300), "the gate was never opened"
        return real_held(self, start, stop)

    monkeypatch.setattr(ScanWorker, "held_frames", gated)
    closed = _record_closes(service, monkeypatch)
    messages = [*_series(_frames(40, seed=11), "gated"), *_series(_frames(24, seed=12), "next", series_id=2,
                                                                  series_unique_id="S2")]
    _stream_past_a_held_close(service, messages, asked, gate, closed, "gated",
                              "the first scan's end to ask its worker for its frames",
                              "the next series' frames on disk while the first scan's close waits")
    session = _ended(service, "gated-series1")
    _wait(lambda: session.state.value == "finished", "the first scan's result")
    assert [rows for name, rows in closed if name.startswith("gated")] == [{"frame_store": 40}]


def test_an_aborted_scans_close_does_not_hold_up_the_next_series(service, monkeypatch) -> None:
    """A series replaced by the next before its end aborts its scan, whose spool is closed with
    its binned rows derived from its detector frames (or taken from its worker's frames). That close ran on the spool thread (the
    normal end's runs on the spool-close thread): the next series' frames waited behind it, not
    received. Here the aborted scan's derivation is held back (a gate) until the next scan has
    every frame on disk; the aborted spool then closes with every row derived."""
    from cryoptycho.daemon.storage.spool import SpoolWriter

    gate, asked = threading.Event(), threading.Event()
    real_derive = SpoolWriter._write_derived

    def gated(self: SpoolWriter, held: Any = None, peak: Any = None) -> None:
        if self.path.name.startswith("cut"):
            asked.set()
            assert gate.wait(300), "the gate was never opened"
        real_derive(self, held, peak)

    monkeypatch.setattr(SpoolWriter, "_write_derived", gated)
    closed = _record_closes(service, monkeypatch)
    cut = _series(_frames(40, seed=13), "cut")[:1 + 20]  # its start and 20 of its 40 images, no end
    messages = [*cut, *_series(_frames(24, seed=14), "next", series_id=2, series_unique_id="S2")]
    _stream_past_a_held_close(service, messages, asked, gate, closed, "cut",
                              "the aborted scan's close to derive its binned rows",
                              "the next series' frames on disk while the aborted scan's close waits")
    aborted = service.service.scans.sessions["cut-series1"]
    _wait(lambda: aborted.state.value == "aborted", "the cut scan to be aborted")
    service.service.scans.flush_disk()
    # every row written once: derived from its detector frames, or, those its worker took in
    # before the abort (timing), from its frame store
    (rows,) = [rows for name, rows in closed if name.startswith("cut")]
    assert sum(rows.values()) == 20 and set(rows) <= {"detector_frames", "frame_store"}
    spool = Path(service.service.config.spool_dir) / "cut-series1.spool.h5"
    assert not spool.with_name("cut-series1.spool.journal").exists()  # closed, its status final
    with h5py.File(spool) as f:
        assert f.attrs["status"] == "aborted" and int(f[DATA].attrs["count"]) == 20
        assert "pending_rows" not in f[DATA][DERIVED].attrs
    _wait(lambda: service.service.scans.sessions["next-series2"].state.value == "finished", "the next scan's result")


@pytest.mark.parametrize("side", [32, 33, 2, 1])
def test_a_frame_stores_rows_are_read_back_in_detector_order(side: int) -> None:
    """What the worker hands the spool at a scan's end: the frame store's rows (FFT order) back
    as the frames it was given, for even sides (one copy) and odd ones (fftshift)."""
    from cryoptycho.daemon.worker import detector_order
    from cryoptycho.gpu.framestore import FrameStore

    frames = np.random.default_rng(side).integers(0, 2000, (5, side, side)).astype(np.uint32)
    store = FrameStore((side, side), frames.dtype, 8)
    store.append(frames, np.zeros((5, 2)))
    back = detector_order(store.frames[1:4])
    assert back.dtype == frames.dtype and back.tobytes() == frames[1:4].tobytes()


def test_frames_are_decoded_once_and_spooled_as_the_detector_sent_them(service, monkeypatch) -> None:
    calls = {"n": 0}
    real = compression.bslz4_decompress
    # without the optional dectris-compression package a batch decodes image by image through
    # bslz4_decompress: those calls are the batch's, counted once by counting_batch
    in_batch = threading.local()

    def counting(*args: Any, **kw: Any) -> np.ndarray:
        if not getattr(in_batch, "on", False):
            calls["n"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(compression, "bslz4_decompress", counting)
    from cryoptycho.protocols.dectris import source as source_module

    real_batch = source_module.bslz4_batch

    def counting_batch(payloads: list[bytes], *args: Any) -> np.ndarray:
        calls["n"] += len(payloads)  # several images in one codec call
        in_batch.on = True
        try:
            return real_batch(payloads, *args)
        finally:
            in_batch.on = False

    monkeypatch.setattr(source_module, "bslz4_batch", counting_batch)
    frames = _frames(40)
    messages = _series(frames, "direct-once")
    source, stats = _run(service, messages)
    assert stats.frames_sent == 40 and stats.decode_errors == 0
    assert source.decoder.decoded == 40
    # one decompression per image on the receive path, daemon included (the spool's binned
    # frames, derived from the detector frames when the scan ended, were read through HDF5's filter)
    assert calls["n"] == 40
    session = _ended(service, "direct-once-series1")
    assert session.ledger.as_dict()["received"] == 40
    # 40 frames of 64×64 never fill a chunk of 64: each is on disk in the tail when received
    chunks = service.service.metrics.registry.get_sample_value
    assert chunks("cryoptycho_spool_chunks_total", {"path": "detector_tail"}) == 40
    spool = service.service.config.spool_dir / "direct-once-series1.spool.h5"
    service.stop()  # the spool is read once the daemon has let go of it
    sent = [_payload(m) for m in messages[1:-1]]
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2)
    with h5py.File(spool, "r") as f:
        g = f[DATA]
        assert int(g.attrs["count"]) == 40
        idx = g["frame_index"][:]
        det = g[DETECTOR_FRAMES]
        rows = det.chunks[0]
        assert det.shape == (40, SIDE, SIDE) and rows == 64  # a 64×64 uint16 frame is one 8 KiB block
        mask, chunk = det.id.read_direct_chunk((0, 0, 0))
        zero = bslz4_compress(np.zeros((SIDE, SIDE), np.uint16))
        # the blocks the detector sent, byte for byte, one after another behind one header; the
        # scan's last chunk is part full: zero frames after its rows
        body = b"".join(sent[i][12:] for i in idx) + zero[12:] * (rows - 40)
        assert mask == 0 and chunk == struct.pack(">QI", rows * SIDE * SIDE * 2, 8192) + body
        np.testing.assert_array_equal(det[:], frames[idx])  # and readable through hdf5plugin
        np.testing.assert_array_equal(g["data"][:], reducer(frames[idx])[0])
        assert f["entry_1/instrument_1/detector_1/data"].shape == g["data"].shape


def test_a_zero_size_header_is_completed_for_the_hdf5_filter(tmp_path: Path) -> None:
    frame = _frames(1)[0]
    sent = bytearray(bslz4_compress(frame))
    sent[:8] = b"\0" * 8  # as LiberTEM's simulator writes
    chunk = spool_chunk(bytes(sent), frame.nbytes)
    assert struct.unpack_from(">Q", chunk)[0] == frame.nbytes and chunk[8:] == bytes(sent[8:])
    with h5py.File(tmp_path / "c.h5", "w") as f:
        ds = f.create_dataset("d", shape=(1, SIDE, SIDE), dtype=np.uint16, chunks=(1, SIDE, SIDE),
                              **hdf5plugin.Bitshuffle(cname="lz4"))
        ds.id.write_direct_chunk((0, 0, 0), chunk)
        np.testing.assert_array_equal(ds[0], frame)
    intact = bslz4_compress(frame)
    assert spool_chunk(intact, frame.nbytes) is intact  # a true header: the very same bytes


def test_bad_images_are_counted_and_the_rest_of_the_scan_arrives(service) -> None:
    frames = _frames(24, seed=1)
    messages = _series(frames, "direct-bad")
    images = messages[1:-1]
    corrupt = bytearray(images[5])
    cut = corrupt.index(_payload(images[5])) + 20
    corrupt[cut:cut + 40] = b"\xff" * 40  # inside the bslz4 blocks
    stream = [messages[0], *images[:5], bytes(corrupt), *images[6:], images[7], b"\xd9\xd9\xf7garbage",
              messages[-1]]
    _, stats = _run(service, stream)
    assert stats.decode_errors == 2  # the corrupt image and the garbage message
    assert stats.rejected_images == {"duplicate": 1}
    assert stats.frames_sent == 23
    session = _ended(service, "direct-bad-series1")
    assert session.ledger.as_dict()["received"] == 23
    assert service.thread.is_alive() and service.error is None


def test_the_daemon_validates_what_a_source_delivers(service) -> None:
    # a series whose probe its binned sampling cannot hold: refused by the daemon, which lives on
    frames = _frames(8)
    user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [1, 8], "step_m": [2e-10, 2e-10]},
                           "detector_pixel_angle_rad": 1e-5, "scan_id": "direct-refused"}}
    messages = list(v2_messages(SimSeries(frames, compression="bslz4", user_data=user)))
    _, stats = _run(service, messages)
    assert stats.frames_sent == 8  # the source delivered; the daemon refused
    rejected = service.service.metrics.messages_rejected

    def rejections() -> float:
        return sum(x.value for m in rejected.collect() for x in m.samples if x.name.endswith("_total"))

    _wait(lambda: rejections() >= 2, "the scan start and its frames to be rejected")  # start + frames
    assert "direct-refused-series1" not in service.service.scans.sessions
    # the next series is taken
    frames = _frames(8, seed=3)
    _run(service, _series(frames, "direct-after"))
    assert _ended(service, "direct-after-series1").ledger.as_dict()["received"] == 8
    assert service.error is None


def test_threads_and_processes_one_or_two_give_the_same_frames(tmp_path: Path) -> None:
    frames = _frames(48, seed=2)
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2)
    for processes in (False, True):
        for workers in (1, 2):
            name = f"{'p' if processes else 't'}{workers}"
            cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", publish="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0",
                                metrics_enabled=False, spool_dir=tmp_path / f"s{name}",
                                results_dir=tmp_path / f"r{name}", resolution_interval_s=0, drain_timeout_s=0,
                                keep_spool=True,  # read after the scan, which may finish first
                                # the spooled frames are compared, not the image: a short
                                # reconstruction (no parallax fit, one refinement iteration)
                                options=ReconOptions(parallax=False, iterations=1))
            bg = BackgroundService(cfg)
            try:
                _, stats = _run(bg, _series(frames, "workers"), workers=workers, processes=processes)
                _ended(bg, "workers-series1")
            finally:
                bg.stop()
            assert stats.frames_sent == 48 and stats.extra["processes"] is processes
            assert (stats.extra["process_cpu_s"] > 0) is processes  # the processes did the decoding
            with h5py.File(cfg.spool_dir / "workers-series1.spool.h5", "r") as f:
                g = f[DATA]
                order = np.argsort(g["frame_index"][:])
                # not compressed by the workers: derived from the detector frames, written at the end
                assert g["data"].chunks[0] > 1 and "pending_rows" not in g[DERIVED].attrs
                np.testing.assert_array_equal(g["data"][:][order], reducer(frames)[0], err_msg=name)
                np.testing.assert_array_equal(g[DETECTOR_FRAMES][:][order], frames, err_msg=name)


def test_worker_processes_frames_are_lent_as_views_of_their_slot_until_let_go_of() -> None:
    """A worker process's binned frames are handed on as a view of its shared-memory slot (no
    copy), and the slot serves no other job while anything references them — the frames
    themselves, a part of them, or a view of a view (a frame store that has not copied them
    yet, a spool message): later jobs, more than there are slots, never overwrite them. Past
    ``lend_max`` lent slots the frames are copied out instead, so that held frames never stop
    the decoding; let go of, every slot is free again."""
    from cryoptycho.protocols.dectris.source import DecodePool

    frames = _frames(32, seed=7)
    images = _series(frames, "lent")[1:-1]
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2)
    expect = reducer(frames)[0]
    pool = DecodePool(1, processes=True, lend_max=2)
    try:
        def job(lo: int) -> np.ndarray:
            batch = pool.result(pool.submit(images[lo:lo + 8], CHANNEL, reducer, True))
            assert batch.counts is not None and not batch.in_slot
            return batch.counts

        def in_a_slot(counts: np.ndarray) -> bool:
            return any(np.shares_memory(counts, a) for a in pool._slot_arrays)

        held = job(0)
        assert in_a_slot(held) and pool.lent == 1  # a view of its slot, not a copy
        part = held[2:5][:, ::2]  # a view of a view keeps the slot as well
        # so do the buffer protocol's exports, which are no NumPy view of the slot's array: an
        # array over a memoryview of the frames, and a zero-copy ZeroMQ frame of one of them
        # (a send still queued) hold the exporting view through the buffer they took
        exported = np.frombuffer(memoryview(held[5:7]).cast("B"), np.uint8)
        sent = zmq.Frame(held[7], copy=False)
        del held
        for i in range(3 * pool.slots):  # jobs come and go (each let go of at once): the slots turn over
            lo = 8 * (1 + i % 3)
            np.testing.assert_array_equal(job(lo), expect[lo:lo + 8])
            np.testing.assert_array_equal(part, expect[2:5][:, ::2])  # never overwritten while held
            assert exported.tobytes() == expect[5:7].tobytes() and sent.bytes == expect[7].tobytes()
        del exported, sent
        second = job(8)
        assert in_a_slot(second) and pool.lent == 2  # the last lent slot
        third = job(16)  # none left to lend: copied out, its slot free at once
        assert not in_a_slot(third) and any(np.shares_memory(third, b) for b in pool._out)
        for counts, rows in ((part, np.s_[2:5]), (second, np.s_[8:16]), (third, np.s_[16:24])):
            np.testing.assert_array_equal(counts, expect[rows][:, ::2] if counts is part else expect[rows])
        del part, second, third
        # let go of: all free again (waited for: pyzmq lets go of a zero-copy frame's buffer on
        # its own thread, a moment after the frame is deleted; measured, 27 of 2,000 frames were
        # still held right after the del, and this assertion failed once under load)
        _wait(lambda: pool.free_slots() == pool.slots and pool.lent == 0, "every slot free again")
        again = job(24)
        assert in_a_slot(again)
        np.testing.assert_array_equal(again, expect[24:])
    finally:
        pool.close()
    # the mapping outlives the pool for frames still held (a close taking a cancelled scan's frames)
    np.testing.assert_array_equal(again, expect[24:])


def test_a_finished_jobs_frames_survive_a_worker_restart_before_they_are_taken() -> None:
    """A job that finished before a worker process died (killed while idle: the OOM killer, an
    operator) keeps its slot until its result is taken: the restart's new workers never write
    the next job's frames over it. Before, the restart freed every slot, the next job got the
    finished one's (the last one freed, LIFO) and the finished job's frames, taken after it,
    were the next job's: wrong frames in a scan that goes on, with no error anywhere."""
    import os
    import signal

    from cryoptycho.protocols.dectris.source import DecodePool

    frames = _frames(16, seed=11)
    images = _series(frames, "restart")[1:-1]
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2)
    expect = reducer(frames)[0]
    pool = DecodePool(1, processes=True)
    try:
        finished = pool.submit(images[:8], CHANNEL, reducer, True)
        _wait(finished.done, "the first job to finish")
        for pid in pool.pids():
            os.kill(pid, signal.SIGKILL)
        _wait(lambda: getattr(pool._pool, "_broken", False), "the pool to see its worker die")
        after = pool.submit(images[8:], CHANNEL, reducer, True)  # new workers first, then the job
        assert pool.generation == 1
        _wait(after.done, "the job of the new workers to finish")
        np.testing.assert_array_equal(pool.result(finished).counts, expect[:8])
        np.testing.assert_array_equal(pool.result(after).counts, expect[8:])
    finally:
        pool.close()


def test_a_restart_ends_every_worker_of_the_broken_pool_a_stopped_one_too() -> None:
    """New workers start only once every worker of the broken pool is gone — a worker still
    running a job of it would write that job's frames into a slot its failure freed, under a
    later job's — and a stopped worker (a debugger's, SIGSTOP) neither survives the restart nor
    holds it up: the pool's own SIGTERM does not end a stopped process."""
    import os
    import signal
    import threading

    from cryoptycho.protocols.dectris.source import DecodePool

    frames = _frames(8, seed=12)
    images = _series(frames, "stopped")[1:-1]
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2)
    pool = DecodePool(2, processes=True)
    old = pool.pids()
    reaped = False
    try:
        os.kill(old[0], signal.SIGSTOP)
        os.kill(old[1], signal.SIGKILL)
        _wait(lambda: getattr(pool._pool, "_broken", False), "the pool to see its worker die")
        done: list[Any] = []
        restart = threading.Thread(target=lambda: done.append(pool.restart(0)), daemon=True)
        restart.start()
        restart.join(120)  # (a hang guard: the restart returns at once when it works)
        assert done == [True], "the restart waited on the stopped worker"

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False  # (its parent waited for it: no zombie either)

        assert all(gone(pid) for pid in old), "a worker of the broken pool outlived the restart"
        reaped = True  # (their pids are free: one may be another process's by the finally)
        batch = pool.result(pool.submit(images, CHANNEL, reducer, True))  # the new workers decode
        np.testing.assert_array_equal(batch.counts, reducer(frames)[0])
    finally:
        for pid in () if reaped else old:  # (the stopped one, were it left)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pool.close()


def _no_processes(monkeypatch: Any) -> None:
    """Worker processes cannot be started from now on: the executor's semaphores find no room
    in /dev/shm (what a full /dev/shm gives; EMFILE or a failed spawn raise alike)."""
    import errno
    import os

    from cryoptycho.protocols.dectris import source as source_module

    def full(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(source_module, "ProcessPoolExecutor", full)


def test_workers_that_cannot_be_restarted_give_way_to_threads_and_say_so(monkeypatch, caplog) -> None:
    """A restart whose new worker processes cannot start (ENOSPC for their semaphores in a
    full /dev/shm, EMFILE, a failed spawn) raised out of the pool's submit and stopped the
    DECTRIS source: the daemon no longer took any series. The pool now decodes on threads
    instead, says why (log, listener), and a job that finished before the worker died keeps
    its frames; a pool that cannot start its processes at all starts on threads likewise."""
    import os
    import signal

    from cryoptycho.protocols.dectris.source import DecodePool

    frames = _frames(16, seed=14)
    images = _series(frames, "fallback")[1:-1]
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2)
    expect = reducer(frames)[0]
    said: list[str] = []
    pool = DecodePool(1, processes=True)
    pool.on_degraded = said.append
    try:
        finished = pool.submit(images[:8], CHANNEL, reducer, True)
        _wait(finished.done, "the first job to finish")
        _no_processes(monkeypatch)
        for pid in pool.pids():
            os.kill(pid, signal.SIGKILL)
        _wait(lambda: getattr(pool._pool, "_broken", False), "the pool to see its worker die")
        with caplog.at_level(logging.ERROR, logger="cryoptycho.protocols.dectris.source"):
            after = pool.submit(images[8:], CHANNEL, reducer, True)  # restart fails: threads
        assert not pool.processes and pool.pids() == []
        assert len(said) == 1 and "No space left on device" in said[0] and "threads" in said[0]
        assert pool.fallback == said[0] and said[0] in caplog.text
        np.testing.assert_array_equal(pool.result(finished).counts, expect[:8])  # kept
        np.testing.assert_array_equal(pool.result(after).counts, expect[8:])
    finally:
        pool.close()
    fresh = DecodePool(1, processes=True, on_degraded=said.append)  # (still no processes to be had)
    try:
        assert fresh.fallback is not None and len(said) == 2
        np.testing.assert_array_equal(fresh.result(fresh.submit(images, CHANNEL, reducer, True)).counts, expect)
    finally:
        fresh.close()


def test_a_close_kills_a_stopped_worker_and_returns(caplog) -> None:
    """The pool's close waited for its worker processes: a stopped (SIGSTOP) or hung worker
    held the DECTRIS source's stop, and with it the daemon's, for ever (systemd killed the
    daemon after its timeout). The close now waits a bounded time, kills the worker (naming
    its pid), unlinks the shared memory all the same, and frames lent out stay valid."""
    import os
    import signal
    import threading

    from cryoptycho.protocols.dectris.source import DecodePool

    frames = _frames(8, seed=15)
    images = _series(frames, "close")[1:-1]
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2)
    pool = DecodePool(2, processes=True)
    pids = pool.pids()
    lent = pool.result(pool.submit(images, CHANNEL, reducer, True)).counts
    assert pool.lent == 1
    name = pool._shm.name  # type: ignore[union-attr]
    try:
        os.kill(pids[0], signal.SIGSTOP)
        done: list[Any] = []
        with caplog.at_level(logging.WARNING, logger="cryoptycho.protocols.dectris.source"):
            closing = threading.Thread(target=lambda: done.append(pool.close(wait_s=2)), daemon=True)
            closing.start()
            closing.join(120)  # (a hang guard: the close's own wait is 10 s)
        assert done, "the close waited on the stopped worker"
        # (the other worker may be killed too: the stopped one may hold the queue's read lock)
        assert pids[0] in done[0] and f"worker process {pids[0]} did not end" in caplog.text

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False  # (a zombie too: its parent did not reap it)

        # (a worker that ended by itself within the wait is reaped by the pool's own thread,
        # which may come a moment after the close returns on a busy machine)
        _wait(lambda: all(gone(pid) for pid in pids), "every worker to be gone and reaped", 60)
        assert not os.path.exists(f"/dev/shm/{name}")  # unlinked all the same
        np.testing.assert_array_equal(lent, reducer(frames)[0])  # the lent frames outlive the pool
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_lent_slots_are_dropped_where_the_shared_memory_cannot_hold_them(monkeypatch, caplog) -> None:
    """The lent slots double the pool's shared memory, a file of /dev/shm (a tmpfs: 64 MB in a
    container by default) whose pages are taken only when first written: past its room, a
    worker process writing a job's frames dies of SIGBUS, its scan fails, and so does every
    scan after it (seen with /dev/shm mounted at 200 kB: 4 slots fit, the merged pool's 8 did
    not). The pool reserves its pages when it makes the block; where the lent slots do not fit
    (here: an ENOSPC for more than the in-flight slots' bytes), it lends none, copies every
    job's frames out as before lending, and says so."""
    import errno
    import os

    from cryoptycho.protocols.dectris.source import DecodePool

    frames = _frames(16, seed=13)
    images = _series(frames, "shm")[1:-1]
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2)
    expect = reducer(frames)[0]
    job_bytes = 8 * reducer.frame_side ** 2 * reducer.out_dtype.itemsize
    pool = DecodePool(1, processes=True)
    in_flight = 2 * 1 + 2  # the slots for the jobs in flight of one worker
    room = in_flight * job_bytes  # /dev/shm's room: the in-flight slots, not the lent ones
    real = getattr(os, "posix_fallocate", None)
    reserved: list[int] = []

    def fallocate(fd: int, offset: int, size: int) -> None:
        if size > room:
            raise OSError(errno.ENOSPC, "No space left on device")
        reserved.append(size)
        if real is not None:
            real(fd, offset, size)

    monkeypatch.setattr(os, "posix_fallocate", fallocate, raising=False)
    try:
        with caplog.at_level(logging.WARNING, logger="cryoptycho.protocols.dectris.source"):
            held = [pool.result(pool.submit(images[lo:lo + 8], CHANNEL, reducer, True)).counts for lo in (0, 8)]
        assert reserved == [room]  # the block made again for the in-flight slots alone, reserved
        assert pool.lend_max == 0 and pool.slots == in_flight and pool.lent == 0
        assert not any(np.shares_memory(h, a) for h in held for a in pool._slot_arrays)  # copied out
        np.testing.assert_array_equal(np.concatenate(held), expect)
        assert "the 4 lent slots dropped" in caplog.text and "/dev/shm" in caplog.text
    finally:
        pool.close()


def test_lent_slots_dropped_for_a_shortage_are_tried_again_when_the_slots_grow(monkeypatch, caplog) -> None:
    """Lent slots dropped because /dev/shm was short were dropped for good: the pool never
    lent again, though the room came back. They are tried again whenever the slots grow."""
    import errno
    import os

    from cryoptycho.protocols.dectris.source import DecodePool

    frames = _frames(24, seed=18)
    images = _series(frames, "relend")[1:-1]
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2)
    expect = reducer(frames)[0]
    job_bytes = 8 * reducer.frame_side ** 2 * reducer.out_dtype.itemsize
    pool = DecodePool(1, processes=True)
    room = [(2 * 1 + 2) * job_bytes]  # the in-flight slots of 8 frames fit, not the lent ones
    real = getattr(os, "posix_fallocate", None)

    def fallocate(fd: int, offset: int, size: int) -> None:
        if size > room[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        if real is not None:
            real(fd, offset, size)

    monkeypatch.setattr(os, "posix_fallocate", fallocate, raising=False)
    try:
        with caplog.at_level(logging.WARNING, logger="cryoptycho.protocols.dectris.source"):
            small = pool.result(pool.submit(images[:8], CHANNEL, reducer, True)).counts
        assert pool.lend_max == 0 and pool.lent == 0 and "lent slots dropped" in caplog.text
        room[0] = 1 << 40  # room again
        big = pool.result(pool.submit(images[8:], CHANNEL, reducer, True)).counts  # 16 frames: larger slots
        assert pool.lend_max == 4 and pool.slots == 8 and pool.lent == 1
        assert any(np.shares_memory(big, a) for a in pool._slot_arrays)  # lent again
        np.testing.assert_array_equal(np.concatenate([small, big]), expect)
    finally:
        pool.close()


def test_slots_that_cannot_be_made_leave_the_frames_to_come_back_through_the_pipes(monkeypatch, caplog) -> None:
    """A shared-memory block that cannot be made (EMFILE from shm_open: no file descriptors
    left, or a full /dev/shm) raised out of the pool's submit and stopped the DECTRIS source.
    The job's binned frames now come back through the worker processes' pipes instead (as
    without slots), said once, and jobs that size do not try again."""
    import errno
    import os
    from multiprocessing import shared_memory

    from cryoptycho.protocols.dectris.source import DecodePool

    frames = _frames(16, seed=19)
    images = _series(frames, "no-block")[1:-1]
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2)
    expect = reducer(frames)[0]
    pool = DecodePool(1, processes=True)
    tries: list[int] = []

    def no_block(*args: Any, **kw: Any) -> Any:
        tries.append(1)
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(shared_memory, "SharedMemory", no_block)
    try:
        with caplog.at_level(logging.ERROR, logger="cryoptycho.protocols.dectris.source"):
            got = [pool.result(pool.submit(images[lo:lo + 8], CHANNEL, reducer, True)).counts for lo in (0, 8)]
        np.testing.assert_array_equal(np.concatenate(got), expect)
        assert tries == [1] and "Too many open files" in caplog.text and pool._shm is None
        assert not pool.needs_grow(8, reducer)  # (the source waits for every job before a growth)
    finally:
        pool.close()


def test_worker_processes_frames_are_copied_into_arrays_no_one_holds() -> None:
    """The copy out of a worker process's shared-memory slot (no slot left to lend, here none
    at all) goes into a kept array only once nothing references that array: frames still held
    (by a frame store that has not copied them yet, say) are never overwritten by a later
    job's."""
    from cryoptycho.protocols.dectris.source import DecodePool

    frames = _frames(24, seed=5)
    images = _series(frames, "copy-out")[1:-1]
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2)
    expect = reducer(frames)[0]
    pool = DecodePool(1, processes=True, lend_max=0)
    try:
        def job(lo: int) -> np.ndarray:
            batch = pool.result(pool.submit(images[lo:lo + 8], CHANNEL, reducer, True))
            assert batch.counts is not None and not batch.in_slot
            return batch.counts

        held = job(0)  # kept, as a frame store's inbox keeps frames
        second = job(8)
        assert not np.shares_memory(held, second)
        np.testing.assert_array_equal(held, expect[:8])  # untouched by the second job's copy
        np.testing.assert_array_equal(second, expect[8:16])
        kept = [b.ctypes.data for b in pool._out if np.shares_memory(b, held)]  # no reference kept
        assert len(kept) == 1
        del held  # its frames are taken: the array is free again
        third = job(16)
        assert third.ctypes.data == kept[0]  # reused, not a fresh array
        np.testing.assert_array_equal(third, expect[16:])
        np.testing.assert_array_equal(second, expect[8:16])  # still held: still its own frames
    finally:
        pool.close()


def test_failed_jobs_and_a_cancelled_scans_held_frames_leak_no_pooled_array() -> None:
    """DecodePool._copy_out hands kept arrays out again by their reference count. Neither a job
    that raises (a bug's path: nothing is copied out, its slot comes back), nor a batch with an
    undecodable image, nor a cancelled scan's frames held past the next jobs (a spool close
    taking them, or a failed converter's traceback holding its batch) may keep an array from
    coming back once let go of, or grow the kept arrays past 2 × slots: counted, and the
    memory numpy allocates measured with tracemalloc."""
    import tracemalloc

    from cryoptycho.protocols.dectris.source import DecodePool

    frames = _frames(16, seed=6)
    images = _series(frames, "leak")[1:-1]
    halves = [(images[:8], slice(0, 8)), (images[8:], slice(8, 16))]  # different frames: an overwrite shows
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2)
    expect = reducer(frames)[0]
    pool = DecodePool(1, processes=True, lend_max=0)  # (the copy path: lent slots are the test above's)
    tracemalloc.start()
    try:
        def job(items: list[Any]) -> Any:
            return pool.result(pool.submit(items, CHANNEL, reducer, True))

        def convert(batch: Any) -> None:
            assert batch.counts is not None
            raise ValueError("a converter that fails with the batch in hand")

        job(images[:8])  # the slots' shared memory and the first kept array
        kept = {b.ctypes.data for b in pool._out}
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(6):
            with pytest.raises(AttributeError):  # an item no job can take: the job raises
                job([42])
            bad = job([b"not a detector image", *images[1:8]])
            assert len(bad.errors) == 1 and bad.counts is not None
            np.testing.assert_array_equal(bad.counts, expect[1:8])
            # a cancelled scan: its frames held while 3 × slots more jobs come and go
            held = [(job(halves[i % 2][0]).counts, halves[i % 2][1]) for i in range(3 * pool.slots)]
            try:
                convert(bad)
            except ValueError as exc:
                failure = exc  # (its traceback holds the converter's frame, and the batch with it)
            for counts, rows in held:
                np.testing.assert_array_equal(counts, expect[rows])  # none overwritten while held
            np.testing.assert_array_equal(bad.counts, expect[1:8])
            assert len(pool._out) <= 2 * pool.slots
            del held, bad, failure, counts, rows  # the close took them; the failure was reported
            assert len(pool._free) == pool.slots  # every slot back, the failed job's too
            again = job(images[:8])
            assert again.counts.ctypes.data in {b.ctypes.data for b in pool._out}  # reused, not new
            del again
        assert {b.ctypes.data for b in pool._out} >= kept
        grown = tracemalloc.get_traced_memory()[0] - base
        # only the kept arrays (at most 2 × slots, each one slot long) may have stayed
        assert grown <= 2 * pool.slots * pool._slot_bytes + (1 << 20), grown
    finally:
        tracemalloc.stop()
        pool.close()


def test_sources_are_found_by_url_scheme() -> None:
    assert {"dectris", "dectris1", "dectris2"} <= set(source_schemes())
    src = open_source("dectris1://detector.example:9999", {"bin": 2}, workers=3)
    assert isinstance(src, DectrisSource) and src.version == 1 and src.workers == 3
    assert src.endpoint == "tcp://detector.example:9999" and src.config.bin == 2
    with pytest.raises(ValueError, match=r"unknown scheme merlin://; known: .*dectris2://"):
        source_class("merlin://host:6341")

    class Merlin(Source):
        schemes = ("merlin",)

        def __init__(self, url: str, config: Any = None, *, workers: int = 2) -> None:
            self.url = url

        def run(self, sink: Any, stop: threading.Event) -> Any:
            return None

    register_source("merlin", Merlin)
    try:
        assert isinstance(open_source("merlin://host:6341"), Merlin)
    finally:
        sources._registry.pop("merlin")


def test_stream_v1_images_arrive_and_their_detector_frames_are_kept(service) -> None:
    frames = _frames(20, seed=4)
    user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [1, 20], "step_m": [2e-10, 2e-10]},
                           "detector_pixel_angle_rad": ANGLE, "scan_id": "direct-v1"}}
    messages = list(v1_messages(SimSeries(frames, compression="bslz4", user_data=user)))
    # kept once reconstructed: a fast host finished the scan, and deleted its spool, before
    # the stop below (only the default refinement's length kept the file here till then)
    service.service.config.keep_spool = True
    source, stats = _run(service, messages, version=1, channel=None)  # V1 has one, unnamed
    assert stats.frames_sent == 20 and source.decoder.decoded == 20
    _ended(service, "direct-v1-series1")
    spool = service.service.config.spool_dir / "direct-v1-series1.spool.h5"
    service.stop()
    with h5py.File(spool, "r") as f:
        idx = f[DATA]["frame_index"][:]
        np.testing.assert_array_equal(f[DATA][DETECTOR_FRAMES][:], frames[idx])


def test_batch_binning_matches_the_reducer_and_flags_saturated_frames() -> None:
    frames = _frames(5, seed=5)
    frames[3, 30, 31] = 65535  # over the saturation threshold, inside the window
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=48, bin=2)
    counts, saturated = reducer.reduce_batch(frames)
    expected, valid = reducer(frames)
    np.testing.assert_array_equal(counts, expected)
    assert saturated.tolist() == [False, False, False, True, False]
    assert valid[3].sum() == reducer.static_valid.sum() - 1  # one bin lost to the saturated pixel
    quiet, none_saturated = reducer.reduce_batch(frames[:3])
    np.testing.assert_array_equal(quiet, expected[:3])
    assert not none_saturated.any()


def test_serve_names_the_known_schemes_for_an_unknown_source(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from cryoptycho.daemon.cli import main

    result = CliRunner().invoke(main, [
        "serve", "--source", "merlin://detector:6341", "--ingest", "tcp://127.0.0.1:*",
        "--publish", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*", "--metrics-port", "0",
        "--spool-dir", str(tmp_path / "spool"), "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 1
    assert "unknown scheme merlin://" in result.output and "dectris2://" in result.output


def test_an_undecodable_detector_message_is_reported_not_only_logged(service) -> None:
    """A message that cannot be decoded at all (corrupt CBOR) reaches the daemon's notice
    listener (which counts and publishes it); the series around it still becomes a scan."""
    notices: list[Any] = []
    frames = _frames(8, seed=5)
    messages = _series(frames, "after-garbage")
    messages.insert(0, b"\xd9\xd9\xf7\xff\x00garbage")  # CBOR self-describe tag, then nonsense
    _, stats = _run(service, messages, workers=1, on_notice=notices.append)
    assert [n.outcome for n in notices] == ["undecodable"], notices
    assert notices[0].rule == "dectris_message_undecodable"
    assert stats.frames_sent == 8
    assert _ended(service, "after-garbage-series1").ledger.as_dict()["received"] == 8


@pytest.mark.parametrize("sent", [1, 2])
def test_a_detector_on_the_wrong_stream_version_url_is_named_once_and_counted(service, caplog, sent) -> None:
    """A detector sending Stream V1 to a ``dectris2://`` source (and V2 to ``dectris1://``):
    every one of its messages fails, at detector rate. The first is logged as an error naming
    the URL to use, the rest are counted (the metric, and a bounded number of summary lines
    with their number), and a series of the right version that follows arrives whole."""
    from cryoptycho.daemon.commands.serve import dectris_notice_handler

    wrong_frames = _frames(150, seed=7)
    wrong = (list(v1_messages(SimSeries(wrong_frames, compression="bslz4"))) if sent == 1
             else _series(wrong_frames, "wrong-version"))
    right_frames = _frames(12, seed=8)
    if sent == 1:  # the URL names V2: the right series is V2
        right, scan_id, channel = _series(right_frames, "right-version"), "right-version-series1", CHANNEL
    else:
        user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [1, 12], "step_m": [2e-10, 2e-10]},
                               "detector_pixel_angle_rad": ANGLE, "scan_id": "right-v1"}}
        right = list(v1_messages(SimSeries(right_frames, compression="bslz4", user_data=user)))
        scan_id, channel = "right-v1-series1", None
    handle = dectris_notice_handler(service.service)
    started = time.monotonic()
    with caplog.at_level("ERROR", logger="cryoptycho.protocols.dectris"):
        _, stats = _run(service, wrong + right, workers=1, version=sent, url_version=3 - sent,
                        on_notice=handle, channel=channel)
    elapsed = time.monotonic() - started
    assert _ended(service, scan_id).ledger.as_dict()["received"] == 12
    assert stats.frames_sent == 12
    metric = service.service.metrics.registry.get_sample_value(
        "cryoptycho_dectris_messages_undecodable_total", {"field": "stream_version"})
    assert metric == len(wrong)  # every one counted, none lost to the log limit
    lines = [r.getMessage() for r in caplog.records if f"Stream V{sent}" in r.getMessage()]
    assert lines and f"use the source url dectris{sent}://127.0.0.1:" in lines[0].lower(), lines
    assert f"not dectris{3 - sent}://" in lines[0]
    # one line, then at most one with the count per 30 s window (and one at the source's end)
    assert len(lines) <= 2 + elapsed // 30, lines
    repeats = [int(m.group(1)) for line in lines[1:] if (m := re.search(r": (\d+) more like it", line))]
    assert 1 + sum(repeats) == len(wrong), lines


def test_a_batch_decodes_to_the_frames_of_per_frame_decoding() -> None:
    """One decoding job over a batch (binned SUB_BATCH frames at a time, with a corrupt image
    and a foreign payload among them) gives each frame exactly what decoding it alone gives."""
    from cryoptycho.protocols.dectris.decode import decode_v2
    from cryoptycho.protocols.dectris.source import SUB_BATCH, decode_job

    frames = _frames(2 * SUB_BATCH + 5, seed=7)
    frames[9, 20, 20] = 65535  # a saturated pixel in the window
    images = _series(frames, "batch")[1:-1]
    corrupt = bytearray(images[4])
    cut = corrupt.index(_payload(images[4])) + 20
    corrupt[cut:cut + 40] = b"\xff" * 40
    images[4] = bytes(corrupt)
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2, saturation_value=60000)
    batch = decode_job(images, CHANNEL, reducer)
    good = [i for i in range(len(frames)) if i != 4]
    assert len(batch.errors) == 1 and batch.decoded == len(good)
    assert batch.image_ids.tolist() == good and batch.series_ids.tolist() == [1] * len(good)
    for row, i in enumerate(good):
        alone = decode_v2(images[i], (CHANNEL,)).data[CHANNEL]
        counts, saturated = reducer.reduce_frame(alone)
        np.testing.assert_array_equal(batch.counts[row], counts)
        assert batch.saturated[row] == saturated == (i == 9)
        assert batch.raw[row] == _payload(images[i])  # the detector's chunk, as it came
    # without a reducer (a series' first frame) the detector frames come back as they are
    unbinned = decode_job(images[:3], CHANNEL, None)
    np.testing.assert_array_equal(unbinned.frames, frames[:3])
    # not decoding at all (images no scan takes): their ids only
    ids_only = decode_job(images[:3], CHANNEL, reducer, decode=False)
    assert ids_only.image_ids.tolist() == [0, 1, 2] and ids_only.decoded == 0 and ids_only.counts is None


class _Recorder:
    """A sink that keeps what the source delivers; its first put (the scan's start) waits for
    ``go``, so that the detector can get ahead of the source first."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.go = threading.Event()

    def put(self, msg: Any) -> None:
        if not self.messages:
            assert self.go.wait(120), "the detector never got ahead"
        self.messages.append(msg)

    def frames(self) -> list[int]:
        return [len(m.frames.indices) for m in self.messages if isinstance(m, sources.DetectorFrames)]


@contextlib.contextmanager
def _recorded_source(sink: _Recorder) -> Iterator[tuple[SimSender, list[Any]]]:
    """A DectrisSource (default batch, two threads) from a simulated detector into ``sink``,
    running in a thread: yields (the detector, a list that holds the source's stats once its
    one series ended and the block is left)."""
    with SimSender(2) as sender:
        source = DectrisSource(sender.url, BridgeConfig(crop=SIDE, bin=2, energy_eV=300e3, channel=CHANNEL),
                               workers=2)
        stop = threading.Event()
        timer = threading.Timer(300.0, stop.set)  # a safety net, not a timing assertion
        timer.start()
        out: list[Any] = []
        runner = threading.Thread(target=lambda: out.append(source.run(sink, stop, max_series=1)))
        runner.start()
        try:
            assert source.ready.wait(120), "the source did not start"
            yield sender, out
            runner.join(120)
        finally:
            stop.set()
            timer.cancel()
            runner.join(120)
        assert out, "the source did not return"


def test_frames_leave_in_whole_spool_chunks_while_the_detector_is_ahead() -> None:
    """With the detector ahead of the source, the frames messages end a series' frames on
    multiples of ALIGN (whole chunks of the spool), after the series' first frame, which goes
    alone; none is lost, and the end flushes the rest."""
    from cryoptycho.protocols.dectris.source import ALIGN

    n = 5 * ALIGN + 37
    frames = _frames(n, seed=11)
    messages = _series(frames, "aligned")
    sink = _Recorder()
    with _recorded_source(sink) as (sender, out):
        for m in messages:  # all queued before the source takes its first frames
            sender.send_raw(m)
        sink.go.set()
    stats = out[0]
    sizes = sink.frames()
    assert stats.frames_sent == n and sum(sizes) == n
    ends = np.cumsum(sizes)
    assert sizes[0] == 1 and all(e % ALIGN == 0 for e in ends[1:-1]), sizes
    ids = np.concatenate([m.frames.indices for m in sink.messages if isinstance(m, sources.DetectorFrames)])
    assert ids.tolist() == list(range(n))


def test_a_slow_stream_is_not_held_back_for_alignment() -> None:
    """Images that trickle in (the socket drained empty) leave at once, whatever their count:
    alignment only holds back images while more are waiting."""
    frames = _frames(7, seed=12)
    messages = _series(frames, "trickle")
    sink = _Recorder()
    sink.go.set()
    with _recorded_source(sink) as (sender, out):
        for m in messages[:4]:  # the start and three images; the rest, and the end, later
            sender.send_raw(m)
        _wait(lambda: sum(sink.frames()) == 3, "the first three frames without the series' end")
        for m in messages[4:]:
            sender.send_raw(m)
    assert out[0].frames_sent == 7 and sum(sink.frames()) == 7


def test_images_held_back_for_alignment_are_delivered_when_the_source_stops(monkeypatch) -> None:
    """A source stopped while it holds images back (short of alignment, images still coming)
    decodes and delivers them before it aborts the scan: nothing it took is dropped."""
    from cryoptycho.protocols.dectris import source as source_module
    from cryoptycho.protocols.dectris.receiver import DectrisReceiver
    from cryoptycho.protocols.messages import Abort

    monkeypatch.setattr(source_module, "DRAIN_PARTS", 40)  # at most the start and 39 images a drain
    sent = threading.Event()
    drain = DectrisReceiver.drain_split

    def after_sending(self: Any, *args: Any, **kw: Any) -> Any:
        assert sent.wait(120), "the detector did not send"
        return drain(self, *args, **kw)

    monkeypatch.setattr(DectrisReceiver, "drain_split", after_sending)
    messages = _series(_frames(100, seed=13), "held")[:-1]
    stop = threading.Event()

    class StopAtStart(_Recorder):
        def put(self, msg: Any) -> None:
            super().put(msg)
            stop.set()  # from the scan's start on: the source stops after this drain

    sink = StopAtStart()
    sink.go.set()
    out: list[Any] = []
    with SimSender(2) as sender:
        # images short of alignment wait up to the flush interval: here, longer than the test
        source = DectrisSource(sender.url, BridgeConfig(crop=SIDE, bin=2, energy_eV=300e3, channel=CHANNEL,
                                                        flush_interval_s=60), workers=1)
        runner = threading.Thread(target=lambda: out.append(source.run(sink, stop)))
        runner.start()
        try:
            assert source.ready.wait(120), "the source did not start"
            for m in messages:
                sender.send_raw(m)
            sent.set()
            runner.join(120)
        finally:
            stop.set()
            sent.set()
            runner.join(120)
    assert out, "the source did not return"
    taken = out[0].extra["frames_decoded"]
    # the first drain's images: the series' first, alone, then the rest, held back at the stop
    assert taken > 1 and sum(sink.frames()) == taken
    assert isinstance(sink.messages[-1], Abort)


def test_batch_acceptance_matches_one_image_at_a_time() -> None:
    from cryoptycho.protocols.dectris.receiver import SeriesTracker
    from cryoptycho.protocols.dectris.schema import Image, SeriesEnd, SeriesStart

    rng = np.random.default_rng(3)
    # (number of images, the scan's positions, images past them kept)
    for number, positions, keep_past in ((40, None, False), (None, None, False), (40, 30, False),
                                         (40, 30, True), (None, 30, False), (None, 30, True)):
        start = SeriesStart(version=2, series_id=7, series_unique_id="u7", number_of_images=number)
        one, batched = SeriesTracker(), SeriesTracker()
        one.begin(start)
        batched.begin(start)
        if positions is not None:
            one.expect(positions, keep_past)
            batched.expect(positions, keep_past)
        for _ in range(5):
            ids = rng.integers(-2, 45, 30)  # duplicates, negative and out-of-range ids
            series = np.where(rng.random(30) < 0.1, 8, 7)
            unique = ["u7" if rng.random() < 0.9 else "other" for _ in range(30)]
            expected = [one.accept(Image(2, int(s), u, int(i), {})) for s, u, i in zip(series, unique, ids)]
            assert batched.accept_batch(series, unique, ids).tolist() == expected
        # every rule was exercised (negative ids are out of range with or without a count)
        rules = {"duplicate", "unknown_series", "image_id_range"} | (
            {"no_position"} if positions is not None and not keep_past else set())
        assert batched.rejected == one.rejected and set(batched.rejected) == rules, (number, positions)
        end = SeriesEnd(2, 7, "u7")
        a, b = one.end(end), batched.end(end)
        assert (a.received, a.missing_image_ids) == (b.received, b.missing_image_ids)
    fresh = SeriesTracker()
    assert fresh.accept_batch(np.array([1, 1]), [None, None], np.array([0, 1])).tolist() == [False, False]
    assert fresh.rejected == {"no_start": 2}


def _stream(service: BackgroundService, series: list[list[bytes]], *, processes: bool,
            between: Any = None, on_notice: Any = None) -> tuple[DectrisSource, Any]:
    """Push ``series`` (lists of messages) through one source run; ``between(source, sender,
    rest)`` runs once the first series' first frames are spooled, and sends the rest of its
    images itself."""
    with SimSender(2) as sender:
        source = DectrisSource(sender.url, BridgeConfig(channel=CHANNEL, crop=SIDE, bin=2, energy_eV=300e3),
                               workers=2, batch=8, processes=processes, on_notice=on_notice)
        stop = threading.Event()
        result: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: result.update(stats=source.run(
            service.service.direct, stop, max_series=len(series))), daemon=True)
        runner.start()
        timer = threading.Timer(300.0, stop.set)  # a safety net, not a timing assertion
        timer.start()
        try:
            _wait(source.ready.is_set, "the source's workers to start")
            first = series[0]
            for m in first[:17]:
                sender.send_raw(m)
            scans = service.service.scans

            def spooled() -> bool:
                s = next(iter(scans.sessions.values()), None)
                return s is not None and s.ledger.received > 0
            _wait(spooled, "the first frames to be spooled")
            rest = first[17:-1]
            if between is not None:
                between(source, sender, rest)  # it sends them
                rest = []
            for m in rest + first[-1:] + [m for s in series[1:] for m in s]:
                sender.send_raw(m)
            runner.join(60)
        finally:
            timer.cancel()
            stop.set()
    assert not runner.is_alive()
    return source, result["stats"]


def _aborted(service: BackgroundService, scan_id: str) -> Any:
    def check() -> Any:
        s = service.service.scans.sessions.get(scan_id)
        return s if s is not None and s.state.value == "aborted" else None
    return _wait(check, f"scan {scan_id} to be aborted")


def test_a_dead_worker_process_loses_no_image_and_the_next_scan_is_taken(service) -> None:
    """Worker processes killed with jobs of a series in their hands: the pool breaks, every job
    in flight fails with it, and each is run once more by new workers in its turn — the scan
    ends whole, every image in the spool. Until this the scan was aborted ("the frames it held
    are lost") and every image in flight, and every later image of the series, dropped."""
    import os
    import signal

    killed: list[int] = []

    def kill_the_workers(source: DectrisSource, sender: SimSender, rest: list[bytes]) -> None:
        # the workers are stopped first, so that jobs of the scan are in their hands when they die
        # (after the jobs they ran already are taken back: a finished job survives the kill)
        assert source.pool is not None
        _wait(lambda: source.pool.outstanding == 0, "the first jobs to be taken back")
        pids = source.pool.pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        for m in rest:
            sender.send_raw(m)
        _wait(lambda: source.pool.outstanding > 0, "jobs in the stopped workers' hands")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        killed.extend(pids)
        # the lost jobs are reported (and new workers started) before the next series comes
        _wait(lambda: source.pool.outstanding == 0 and source.pool.generation == 1, "the lost jobs to be run again")

    first, second = _series(_frames(40, seed=8), "crash"), _series(_frames(24, seed=9), "after-crash")
    _, stats = _stream(service, [first, second], processes=True, between=kill_the_workers)
    assert killed
    session = _wait(lambda: (s := service.service.scans.sessions.get("crash-series1")) is not None
                    and (s.ended or s.state.value == "aborted") and s, "the crashed series' scan to end")
    service.service.scans.flush_disk()
    assert session.state.value != "aborted", session.error
    assert session.ledger.as_dict()["received"] == 40
    assert stats.series_errors == 0 and stats.extra["jobs_retried"] >= 1
    after = _ended(service, "after-crash-series1")  # new workers took the next series whole
    assert after.ledger.as_dict()["received"] == 24
    assert service.thread.is_alive() and service.error is None
    spool = service.service.config.spool_dir / "crash-series1.spool.h5"
    service.stop()  # the spool is read once the daemon has let go of it
    sent = [_payload(m) for m in first[1:-1]]
    with h5py.File(spool, "r") as f:
        idx = f[DATA]["frame_index"][:]
        assert sorted(idx.tolist()) == list(range(40))
        det = f[DATA][DETECTOR_FRAMES]
        mask, chunk = det.id.read_direct_chunk((0, 0, 0))
        rows = det.chunks[0]
        zero = bslz4_compress(np.zeros((SIDE, SIDE), np.uint16))
        # the blocks the detector sent, byte for byte, in the order the spool holds them
        body = b"".join(sent[i][12:] for i in idx) + zero[12:] * (rows - 40)
        assert mask == 0 and chunk == struct.pack(">QI", rows * SIDE * SIDE * 2, 8192) + body


def test_a_failed_restart_keeps_its_scan_whole_and_the_next_scan_is_decoded_on_threads(service, monkeypatch) -> None:
    """Workers that die and cannot be replaced (no room in /dev/shm for the new pool's
    semaphores) stopped the DECTRIS source with the OSError: the series in progress was left
    open and no later series was taken. Now the jobs lost with the dead workers run again on
    the threads the pool falls back to, so the scan in progress ends whole; a ``degraded``
    notice goes out (an ``error`` event and a count, in the daemon), and the next series is
    decoded whole on threads."""
    import os
    import signal

    from cryoptycho.daemon.commands.serve import dectris_notice_handler

    notices: list[Any] = []
    kept: list[int] = []  # frames spooled before the workers died
    handle = dectris_notice_handler(service.service)  # (the daemon's: counted, published)

    def on_notice(notice: Any) -> None:
        notices.append(notice)
        handle(notice)

    def kill_the_workers(source: DectrisSource, sender: SimSender, rest: list[bytes]) -> None:
        assert source.pool is not None
        _wait(lambda: source.pool.outstanding == 0, "the first jobs to be taken back")
        pids = source.pool.pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        for m in rest:
            sender.send_raw(m)
        _wait(lambda: source.pool.outstanding > 0, "jobs in the stopped workers' hands")
        service.service.scans.flush_disk()
        kept.append(service.service.scans.sessions["no-shm-series1"].ledger.received)
        _no_processes(monkeypatch)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        # (before the fix the source's thread ended here with the OSError, and took no more series)
        _wait(lambda: source.pool.outstanding == 0, "the lost jobs to fail")

    first, second = _series(_frames(40, seed=16), "no-shm"), _series(_frames(24, seed=17), "on-threads")
    _, stats = _stream(service, [first, second], processes=True, between=kill_the_workers,
                       on_notice=on_notice)
    assert stats.series_errors == 0 and stats.extra["decoding_fallback"] is not None
    assert stats.extra["jobs_retried"] >= 1  # the dead workers' jobs, run again on threads
    session = _ended(service, "no-shm-series1")
    assert kept[0] > 0 and session.ledger.as_dict()["received"] == 40  # nothing lost
    degraded = [n for n in notices if n.outcome == "degraded"]
    assert len(degraded) == 1 and degraded[0].rule == "dectris_decoding_degraded"
    assert "No space left on device" in degraded[0].message
    assert service.service.metrics.registry.get_sample_value("cryoptycho_dectris_decoding_degraded_total") == 1
    after = _ended(service, "on-threads-series1")  # decoded on threads, whole
    assert after.ledger.as_dict()["received"] == 24
    assert service.thread.is_alive() and service.error is None


def test_the_decoding_returns_to_processes_at_a_later_series_start(service, monkeypatch) -> None:
    """Worker processes that could not start (a full /dev/shm) left the source decoding on
    threads for the rest of the daemon's life, its degraded alert on for ever. Now they are
    tried again at series starts (with backoff): here the try at the first series start still
    fails, the one at the second succeeds; the second series is decoded in worker processes, a
    ``restored`` notice goes out and the fallback gauge is 0 again."""
    from cryoptycho.daemon.commands.serve import dectris_notice_handler
    from cryoptycho.protocols.dectris import source as source_module

    real = source_module.ProcessPoolExecutor
    monkeypatch.setattr(source_module, "RETRY_PROCESSES_S", 0.0)  # (due at each series start)
    notices: list[Any] = []
    handle = dectris_notice_handler(service.service)
    gauge = []

    def on_notice(notice: Any) -> None:
        notices.append(notice)
        handle(notice)
        gauge.append(service.service.metrics.registry.get_sample_value("cryoptycho_dectris_decoding_fallback"))

    def processes_again(source: DectrisSource, sender: SimSender, rest: list[bytes]) -> None:
        assert source.pool is not None and not source.pool.processes  # (the first series' try failed)
        monkeypatch.setattr(source_module, "ProcessPoolExecutor", real)  # /dev/shm has room again
        for m in rest:
            sender.send_raw(m)

    _no_processes(monkeypatch)
    first, second = _series(_frames(24, seed=18), "on-threads"), _series(_frames(24, seed=19), "in-processes")
    source, stats = _stream(service, [first, second], processes=True, between=processes_again,
                            on_notice=on_notice)
    assert [(n.outcome, n.rule) for n in notices if n.field == "worker_processes"] == [
        ("degraded", "dectris_decoding_degraded"), ("restored", "dectris_decoding_restored")], notices
    assert gauge[-1] == 0 and 1 in gauge
    assert service.service.metrics.registry.get_sample_value("cryoptycho_dectris_decoding_degraded_total") == 1
    # (the second series', unrounded: the stats' figure has 3 decimals and was 0.002-0.003 s here)
    assert stats.extra["decoding_fallback"] is None and source.process_cpu_s > 0
    assert _ended(service, "on-threads-series1").ledger.as_dict()["received"] == 24
    assert _ended(service, "in-processes-series1").ledger.as_dict()["received"] == 24
    assert service.thread.is_alive() and service.error is None


def test_worker_processes_are_tried_again_with_a_growing_wait(monkeypatch, caplog) -> None:
    """After a fallback to threads, a try of worker processes is due only after its wait, which
    doubles after each failed try; once they start, the fallback is over and its listener told."""
    from cryoptycho.protocols.dectris import source as source_module
    from cryoptycho.protocols.dectris.source import DecodePool

    real = source_module.ProcessPoolExecutor
    monkeypatch.setattr(source_module, "RETRY_PROCESSES_S", 0.5)
    _no_processes(monkeypatch)
    frames = _frames(8, seed=20)
    images = _series(frames, "retry")[1:-1]
    reducer = FrameReducer.build((SIDE, SIDE), np.uint16, crop=SIDE, bin=2)
    restored: list[str] = []
    pool = DecodePool(1, processes=True, on_restored=restored.append)
    try:
        assert pool.fallback is not None and "tried again at a series start 0.5 s" in pool.fallback
        _wait(pool.retry_due, "the first try to be due")
        with caplog.at_level(logging.WARNING, logger="cryoptycho.protocols.dectris.source"):
            assert pool.retry_processes() is False  # (still no room)
        assert "tried again in 1 s or more" in caplog.text and not pool.processes
        monkeypatch.setattr(source_module, "ProcessPoolExecutor", real)
        _wait(pool.retry_due, "the second try to be due")
        assert pool.retry_processes() is True
        assert pool.processes and pool.pids() and pool.fallback is None and not pool.retry_due()
        assert len(restored) == 1 and "started again" in restored[0] and "No space left" in restored[0]
        np.testing.assert_array_equal(pool.result(pool.submit(images, CHANNEL, reducer, True)).counts,
                                      reducer(frames)[0])
        assert pool.process_cpu_s > 0
    finally:
        pool.close()


def test_a_failing_decoding_job_fails_its_scan_not_the_source(service, monkeypatch) -> None:
    from cryoptycho.protocols.dectris import source as source_module

    real = source_module.decode_job
    calls = {"n": 0}

    def failing(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:  # a job of the first series, after its first frames
            raise RuntimeError("a bug in a decoding job")
        return real(*args, **kw)

    monkeypatch.setattr(source_module, "decode_job", failing)
    first, second = _series(_frames(40, seed=10), "job-bug"), _series(_frames(24, seed=11), "after-bug")
    _, stats = _stream(service, [first, second], processes=False)
    assert stats.series_errors == 1
    session = _aborted(service, "job-bug-series1")
    assert "RuntimeError: a bug in a decoding job" in (session.error or "")
    assert _ended(service, "after-bug-series1").ledger.as_dict()["received"] == 24
    assert service.thread.is_alive() and service.error is None


def test_a_failing_decoding_job_keeps_the_series_other_images_in_its_aborted_scan(service, monkeypatch) -> None:
    """A job of the first series raises while the next job of that series is in flight: the
    scan fails with the reason once its series is over, and every image of its other jobs —
    in flight at the failure, or sent after it — reaches the spool first; the reason counts
    the images lost with the failed job. Until this the scan was aborted at the failure and
    the converter, left without a scan, dropped every later image of the series."""
    from cryoptycho.protocols.dectris import source as source_module

    real = source_module.decode_job
    calls = {"n": 0}
    lock = threading.Lock()
    next_started = threading.Event()
    lost: list[bytes] = []

    def failing(items: list[Any], *args: Any, **kw: Any) -> Any:
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 3:
            next_started.set()
        if n == 2:  # the first job after the series' first image (alone, it builds the reducer)
            # held until the next job of its series is in the other worker's hands: in flight
            assert next_started.wait(120), "the next job never started"
            lost.extend(items)
            raise RuntimeError("a bug in a decoding job")
        return real(items, *args, **kw)

    monkeypatch.setattr(source_module, "decode_job", failing)
    frames = _frames(40, seed=15)
    first, second = _series(frames, "job-bug-kept"), _series(_frames(24, seed=16), "after-bug-kept")
    _, stats = _stream(service, [first, second], processes=False)
    assert stats.series_errors == 1 and lost
    session = _aborted(service, "job-bug-kept-series1")
    assert _ended(service, "after-bug-kept-series1").ledger.as_dict()["received"] == 24
    service.service.scans.flush_disk()
    assert session.ledger.as_dict()["received"] == 40 - len(lost)
    assert f"RuntimeError: a bug in a decoding job; {len(lost)} images of the failed jobs are lost" in session.error
    assert f"{40 - len(lost)} of its 40 images held" in session.error
    failed_ids = {first.index(m) - 1 for m in lost}
    spool = service.service.config.spool_dir / "job-bug-kept-series1.spool.h5"
    service.stop()  # the spool is read once the daemon has let go of it
    with h5py.File(spool, "r") as f:
        idx = f[DATA]["frame_index"][:]
        assert sorted(idx.tolist()) == sorted(set(range(40)) - failed_ids)
        # the detector's payloads, byte for byte, in the rows of the images kept
        det = f[DATA][DETECTOR_FRAMES]
        assert det.shape[0] == 40 - len(lost)


@pytest.mark.parametrize("processes", [False, True])
def test_a_series_whose_header_was_corrected_arrives_whole(service, processes: bool) -> None:
    """A header value set aside (a beam centre of (0, 0)) makes the converter's series start a
    corrected copy of the detector's: the workers must still bin the series' frames."""
    frames = _frames(40, seed=12)
    messages = _series(frames, "corrected", beam_center_px=(0.0, 0.0))
    _, stats = _run(service, messages, processes=processes)
    assert stats.frames_sent == 40 and stats.extra["converter"]["skipped_images"] == 0
    assert _ended(service, "corrected-series1").ledger.as_dict()["received"] == 40


def test_serve_decodes_in_worker_processes_when_configured(tmp_path: Path) -> None:
    """The console script with ``[dectris] worker_processes = true``: a detector's scan arrives
    whole through worker processes (spawned by the daemon) and finishes."""
    from cryoptycho.protocols.control import ControlClient
    from daemon_support import start_daemon, start_dectris_sim, wait_for

    sim, url = start_dectris_sim("--frames", "64", "--size", "32", "--rate", "400")
    try:
        daemon = start_daemon(tmp_path, "--source", url, "--set", "dectris.worker_processes=true",
                              "--set", "options.iterations=3", "--set", "resolution_interval_s=0")
        try:
            with ControlClient(daemon.control) as ctl:
                scans = wait_for(lambda: [s for s in ctl.list_scans() if s["state"] == "finished"], 90,
                                 "the detector's scan to finish", daemon)
            assert scans[0]["frames"]["received"] == 64
            assert len(_spawned_children(daemon.proc.pid)) == 2  # the decoding workers (source_workers)
        finally:
            assert daemon.stop() == 0, daemon.log()
        assert "worker process died" not in daemon.log()
        # the result's raw frames: the binned ones written when the scan ended (derived from the
        # detector frames until then), as any HDF5 reader reads them
        from cryoptycho.daemon.storage.spool import load_derivation

        with h5py.File(scans[0]["result_path"], "r") as f:
            reducer, pending = load_derivation(f["raw"])
            g = f["raw"][DATA]
            binned, detector = g["data"][:], g[DETECTOR_FRAMES][:]
        assert reducer is not None and pending == [] and len(binned) == 64
        # the same counts, stored in the smallest dtype that holds the largest (FORMATS.md)
        want = reducer.reduce_batch(detector)[0]
        assert binned.dtype == np.uint8 and 0 < want.max() <= 255, (binned.dtype, want.dtype, want.max())
        np.testing.assert_array_equal(binned, want)
    finally:
        sim.kill()
        sim.wait(10)


def test_serve_stops_though_a_decoding_worker_is_stopped(tmp_path: Path) -> None:
    """A stopped (SIGSTOP: a debugger) or hung decoding worker process held the daemon's stop
    for ever — its source's close waited for the worker, and so did the interpreter's exit —
    until systemd killed the daemon. The stop now ends: the worker is killed, by pid, in the log."""
    import os
    import signal
    import socket

    from daemon_support import start_daemon, wait_for

    with socket.socket() as s:  # a port nothing listens on: the source waits for its detector
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the close's wait for its workers scaled down 5x (2 s, not 10 s): the same kill, waited for
    # in a fifth of the time
    daemon = start_daemon(tmp_path, "--source", f"dectris2://127.0.0.1:{port}",
                          "--set", "dectris.worker_processes=true",
                          scaled={"cryoptycho.protocols.dectris.source.CLOSE_WAIT_S": 2.0})
    workers: list[int] = []
    try:
        wait_for(lambda: "worker processes ready" in daemon.log(), 90, "the decoding workers to start", daemon)
        workers = _spawned_children(daemon.proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGSTOP)
        assert daemon.stop() == 0, daemon.log()  # (its own timeout: 120 s, then a failure)
        assert f"worker process {workers[0]} did not end" in daemon.log()
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)


def _spawned_children(pid: int) -> list[int]:
    """Processes that ``pid`` started with multiprocessing's spawn (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # it ended meanwhile
        if ppid == pid and b"spawn_main" in cmdline:
            out.append(int(entry.name))
    return out


def test_serve_names_a_v1_detector_on_a_v2_url_once_and_takes_the_next_v2_series(tmp_path: Path) -> None:
    """The console script: ``serve --source dectris2://…`` while a Stream V1 detector sends.
    Its log gets one error naming ``dectris1://`` and one line with the number of the rest
    (not a line per message), the metric counts every one, the daemon stays up, and a V2
    series sent to the same port afterwards arrives whole."""
    import socket
    import subprocess
    import sys

    from cryoptycho.protocols.control import ControlClient
    from daemon_support import metrics_of, start_daemon, wait_for

    with socket.socket() as s:  # a free port for both simulators (they bind, the daemon connects)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def sim(version: int, frames: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "cryoptycho.daemon.cli", "dectris-sim", "--version", str(version),
             "--port", str(port), "--frames", str(frames), "--size", "32"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    started = time.monotonic()
    daemon = start_daemon(tmp_path, "--source", f"dectris2://127.0.0.1:{port}",
                          "--set", "options.iterations=3", "--set", "resolution_interval_s=0")
    key = "cryoptycho_dectris_messages_undecodable_total{field=stream_version}"
    try:
        v1 = sim(1, 100)  # a header, 100 images and an end: 102 messages
        try:
            wait_for(lambda: metrics_of(daemon).get(key) == 102, 120, "102 wrong-version messages counted", daemon)
            assert v1.wait(120) == 0, v1.stdout.read()
        finally:
            v1.kill()
            v1.wait(10)
        v2 = sim(2, 64)
        try:
            with ControlClient(daemon.control) as ctl:
                scans = wait_for(lambda: [s for s in ctl.list_scans() if s["state"] == "finished"], 90,
                                 "the V2 series' scan to finish", daemon)
            assert scans[0]["frames"]["received"] == 64
        finally:
            v2.kill()
            v2.wait(10)
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0, daemon.log()
    elapsed = time.monotonic() - started
    lines = [line for line in daemon.log_lines if "arrived on a Stream V2 socket" in line]
    assert lines and "dectris1://127.0.0.1:" in lines[0], daemon.log()
    assert len(lines) <= 2 + elapsed // 30, lines  # one, then one with the count per 30 s and at the end
    repeats = [int(m.group(1)) for line in lines[1:] if (m := re.search(r": (\d+) more like it", line))]
    assert 1 + sum(repeats) == 102, lines


def test_a_series_after_a_restart_of_detector_and_daemon_gets_a_name_of_its_own(tmp_path: Path) -> None:
    """The console script. A detector and the daemon both restart: the detector's series
    counter starts again and names its next series as before. The daemon refuses a scan id
    whose result exists (it would be overwritten), so a series under the old name was refused
    and its frames lost. The source now asks the daemon which names are taken and picks a
    free one: both scans finish, each with its own result, the first one untouched."""
    from cryoptycho.protocols.control import ControlClient
    from daemon_support import start_daemon, start_dectris_sim, wait_for

    def one_series() -> dict:
        sim, url = start_dectris_sim("--frames", "16", "--size", "32", "--rate", "400")
        try:
            daemon = start_daemon(tmp_path, "--source", url, "--set", "options.iterations=2",
                                  "--set", "resolution_interval_s=0")
            try:
                with ControlClient(daemon.control) as ctl:
                    done = wait_for(lambda: [s for s in ctl.list_scans() if s["state"] in
                                             ("finished", "failed", "aborted")], 90,
                                    "the detector's scan to end", daemon)
            finally:
                assert daemon.stop() == 0, daemon.log()
            assert "unique_scan_id" not in daemon.log()
        finally:
            sim.kill()
            sim.wait(10)
        assert len(done) == 1 and done[0]["state"] == "finished", done
        assert done[0]["frames"]["received"] == 16, done
        return done[0]

    first = one_series()
    first_bytes = Path(first["result_path"]).read_bytes()
    second = one_series()
    assert second["scan_id"] != first["scan_id"]
    assert second["scan_id"].startswith(first["scan_id"]), (first["scan_id"], second["scan_id"])
    assert Path(second["result_path"]).exists() and Path(second["result_path"]) != Path(first["result_path"])
    assert Path(first["result_path"]).read_bytes() == first_bytes


def test_images_past_the_scans_positions_that_find_no_disk_space_do_not_fail_the_scan(
        service, monkeypatch, caplog) -> None:
    """A detector left running past its scan's positions: the images it takes past them are kept
    in the spool while there is room; when the disk is full they are not (logged), and the
    scan, whose own frames are on disk, is still reconstructed."""
    import errno

    from cryoptycho.daemon.storage.spool import SpoolWriter

    def full(self: SpoolWriter, image_ids: Any, raw: Any) -> int:
        raise OSError(errno.ENOSPC, "no space for the spool file (test)")

    monkeypatch.setattr(SpoolWriter, "append_unpositioned", full)
    config = service.service.config
    config.options = config.options.model_copy(update={"parallax": False, "iterations": 1})
    frames = _frames(24, seed=13)
    user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [1, 16], "step_m": [2e-10, 2e-10]},
                           "detector_pixel_angle_rad": ANGLE, "scan_id": "full-disk"}}
    with caplog.at_level(logging.ERROR):
        _, stats = _run(service, list(v2_messages(SimSeries(frames, compression="bslz4", user_data=user))))
        session = _ended(service, "full-disk-series1")
        _wait(lambda: session.state.value in ("finished", "failed"), "the scan's result")
    assert stats.frames_sent == 16
    assert session.state.value == "finished", session.error
    assert session.ledger.as_dict()["received"] == 16
    assert "8 detector images without a position (ids [16, 17, 18, 19, 20, 21, 22, 23] …) not kept" in caplog.text


@pytest.mark.parametrize("stream", ["v1-header-none", "v2"])
def test_images_past_the_positions_are_kept_once_and_duplicates_counted_alike_on_every_path(
        service, stream: str) -> None:
    """24 images, 16 positions; images 18 and 19 (past the positions) and 3 come twice. The
    duplicate check of images past the positions differed by path: a V2 series (which gives
    its number of images) had them refused by the source's tracker and not counted as the
    scan's duplicates, a V1 ``header_detail none`` series passed them to the spool, which kept
    them once and counted them. One rule now: every path keeps each once and counts the two as
    the scan's duplicates (the spool's kept ids survive a restart; test_field_dectris)."""
    from cryoptycho.daemon.storage.spool import UNPOSITIONED, UNPOSITIONED_IDS

    frames = _frames(24, seed=11)
    user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [1, 16], "step_m": [2e-10, 2e-10]},
                           "detector_pixel_angle_rad": ANGLE, "scan_id": f"past-{stream}"}}
    if stream == "v2":
        messages = list(v2_messages(SimSeries(frames, compression="bslz4", user_data=user)))
        version, channel = 2, CHANNEL
    else:
        messages = list(v1_messages(SimSeries(frames, compression="bslz4", user_data=user, header_detail="none")))
        version, channel = 1, None
    images = messages[1:-1]
    assert len(images) == 24
    resent = [images[3], images[18], images[19]]
    _, stats = _run(service, [messages[0], *images, *resent, messages[-1]], version=version, channel=channel)
    assert stats.rejected_images == {"duplicate": 1}  # image 3: positioned, the tracker's
    scan_id = f"past-{stream}-series1"
    session = _ended(service, scan_id)

    def result() -> Any:  # (written once the spool closed: after every write of the scan)
        return session.result_path if session.state.value == "finished" else None
    path = _wait(result, f"scan {scan_id}'s result")
    assert session.ledger.as_dict()["received"] == 16
    assert session.ledger.as_dict()["duplicates"] == 2  # 18 and 19, by the spool
    with h5py.File(path, "r") as f:
        g = f["raw"][DATA]
        ids, kept = g[UNPOSITIONED_IDS][()], g[UNPOSITIONED][()]
    assert ids.tolist() == list(range(16, 24))
    assert kept.tobytes() == frames[16:].tobytes()


def test_a_resumed_series_takes_the_images_past_its_positions_as_before_the_restart() -> None:
    """After a restart a V1 ``header_detail none`` series (no number of images) resumed with its
    scan's positions as its number of images: the images past them were refused as out of range
    (``image_id_range``), so lost, where before the restart they were kept. A resumed series now
    has the same rule as the series before it, with or without a number of images."""
    from cryoptycho.protocols.dectris.schema import Image, SeriesStart
    from cryoptycho.protocols.dectris.source import DirectConverter, decode_job
    from cryoptycho.protocols.sources import DetectorFrames, RecoveredScan, UnpositionedFrames

    frames = _frames(12, seed=12)
    user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [1, 8], "step_m": [2e-10, 2e-10]},
                           "detector_pixel_angle_rad": ANGLE, "scan_id": "resumed"}}
    config = BridgeConfig(crop=SIDE, bin=2, energy_eV=300e3, channel=CHANNEL)
    for images in (None, 12):  # V1 header_detail none; a start that gives its number of images
        start = SeriesStart(version=1, series_id=5, series_unique_id=None, channels=(CHANNEL,),
                            image_shape=(SIDE, SIDE), number_of_images=images, user_data=user)

        def batch(conv: DirectConverter, ids: list[int]) -> list[Any]:
            items = [Image(1, 5, None, i, {CHANNEL: frames[i]}) for i in ids]
            reducer = conv.plan.reducer if conv.plan is not None else None
            return conv.feed_batch(decode_job(items, CHANNEL, reducer))

        before = DirectConverter(config)
        before.feed(start)
        out = batch(before, [0]) + batch(before, [1, 2, 3, 8, 9])  # (the first image builds the reducer)
        scan = out[0]
        assert [int(i) for m in out if isinstance(m, UnpositionedFrames) for i in m.image_ids] == [8, 9]
        after = DirectConverter(config)  # the restarted daemon's: no start comes
        after.resume([RecoveredScan(scan, np.arange(4), before.plan.reducer)], version=1)
        out = batch(after, [2, 4, 5, 6, 7, 9, 10, 11])
        assert sorted(int(i) for m in out if isinstance(m, DetectorFrames) for i in m.frames.indices) == [4, 5, 6, 7]
        # images past the positions: handed on each time, the spool keeps each once (image 9)
        assert [int(i) for m in out if isinstance(m, UnpositionedFrames) for i in m.image_ids] == [9, 10, 11]
        assert after.rejected == {"duplicate": 1}, images  # image 2, positioned, held before the restart


def test_a_replaced_series_keeps_its_images_waiting_for_positions_as_unpositioned_frames() -> None:
    """The daemon's source, positions on the side channel: 6 images arrived, positions for 2
    of them; then the detector starts another series. The 4 images still waiting for their
    positions are kept (the spool's unpositioned frames, the detector's bytes as they came) and
    the abort counts all 6. Until this they were dropped with the abort."""
    from cryoptycho.protocols.dectris.decode import decode_v2
    from cryoptycho.protocols.dectris.source import DirectConverter, decode_job
    from cryoptycho.protocols.messages import Abort
    from cryoptycho.protocols.sources import UnpositionedFrames

    def series(frames: np.ndarray, **kw: Any) -> list[bytes]:
        return list(v2_messages(SimSeries(frames, compression="bslz4", **kw)))  # no scan: the side channel's

    first = series(_frames(10, seed=17))
    second = series(_frames(4, seed=18), series_id=2, series_unique_id="S2")
    conv = DirectConverter(BridgeConfig(channel=CHANNEL, crop=SIDE, bin=2, energy_eV=300e3,
                                        detector_pixel_angle_rad=ANGLE, position_wait_s=0), side_channel=True)
    out: list[Any] = list(conv.feed(decode_v2(first[0])))
    for raw in first[1:1 + 6]:  # one image a job, unbinned: the converter bins them
        out += conv.feed_batch(decode_job([raw], CHANNEL, None, True))
    assert conv.plan is not None and conv.plan.streamed and len(conv.plan.waiting) == 6
    out += conv.add_positions(None, np.array([0, 1], np.uint32), np.zeros((2, 2)))
    out += conv.flush()
    out += conv.feed(decode_v2(second[0]))
    kept = [m for m in out if isinstance(m, UnpositionedFrames)]
    assert len(kept) == 1 and kept[0].image_ids.tolist() == [2, 3, 4, 5]
    assert kept[0].raw.chunks == [_payload(raw) for raw in first[3:7]]  # as the detector sent them
    (abort,) = [m for m in out if isinstance(m, Abort)]
    assert out.index(abort) > out.index(kept[0])
    assert "replaced by series 2" in abort.reason and "6 of its 10 images held" in abort.reason
