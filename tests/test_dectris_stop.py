"""The daemon stopped in the middle of a DECTRIS series (``serve --source dectris2://…``): the
images its source holds — received, being decoded, not delivered yet — reach the spool before
the source's sink closes, and the scan stays open for the next start (daemon/SERVICE.md,
"DECTRIS source at a stop"). In process (the service and the source as ``serve`` wires them),
a decoding job held at a gate standing for a slow or hung worker."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from cryoptycho.daemon.commands import serve
from cryoptycho.daemon.config import ServiceConfig
from cryoptycho.daemon.service import BackgroundService
from cryoptycho.daemon.storage.spool import DATA, read_detector_frames
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.dectris import source as dectris_source
from cryoptycho.protocols.dectris.sim import SimSender, SimSeries, v2_messages
from daemon_support import wait_for

CHANNEL = "threshold_1"
SIDE = 64
#: scattering angle of one detector pixel: the binned 32×32 frames sample the default probe
ANGLE = 5e-4
SCAN = "stopped-in-series1"  #: the scan of the series (user_data names "stopped-in")


def _frames(n: int, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[:SIDE, :SIDE] - SIDE // 2
    lam = np.where(yy**2 + xx**2 <= (SIDE / 5) ** 2, 3.0, 0.05)
    return np.random.default_rng(seed).poisson(lam, (n, SIDE, SIDE)).astype(np.uint16)


def _series(frames: np.ndarray, scan_id: str) -> list[bytes]:
    user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [1, len(frames)], "step_m": [2e-10, 2e-10]},
                           "detector_pixel_angle_rad": ANGLE, "scan_id": scan_id}}
    return list(v2_messages(SimSeries(frames, compression="bslz4", user_data=user)))


def _config(tmp_path: Path, **kw: Any) -> ServiceConfig:
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", publish="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0",
                        metrics_enabled=False, spool_dir=tmp_path / "spool", results_dir=tmp_path / "results",
                        resolution_interval_s=0, drain_timeout_s=0,
                        dectris={"channel": CHANNEL, "crop": SIDE, "bin": 2, "energy_eV": 300e3}, **kw)
    cfg.options = cfg.options.model_copy(update={"parallax": False, "iterations": 1})
    return cfg


class _Gate:
    """Decoding jobs submitted once :attr:`hold` is set wait for :attr:`release` (a slow or hung
    worker); :attr:`entered` is set when the first of them is held."""

    def __init__(self, monkeypatch: Any) -> None:
        self.hold, self.entered, self.release = threading.Event(), threading.Event(), threading.Event()
        real = dectris_source.decode_job

        def job(*args: Any, **kw: Any) -> Any:
            if self.hold.is_set():
                self.entered.set()
                assert self.release.wait(120), "the held decoding job was never let go of"
            return real(*args, **kw)

        monkeypatch.setattr(dectris_source, "decode_job", job)


class _Reads:
    """The source's reads of its socket paused while a burst is sent (:meth:`paused`): the burst
    is in the socket before the next read, so its images are one decoding job however slowly a
    loaded host runs the sending thread (a job is cut at each read that finds the socket empty
    for 50 ms, or 50 ms after its first images were held back for alignment)."""

    def __init__(self, monkeypatch: Any) -> None:
        from cryoptycho.protocols.dectris.receiver import DectrisReceiver

        self.open, self.parked = threading.Event(), threading.Event()
        self.open.set()
        real = DectrisReceiver.drain_split

        def drain(receiver: Any, *args: Any, **kw: Any) -> Any:
            if not self.open.is_set():
                self.parked.set()
                assert self.open.wait(120), "the source's reads were never let go on"
            return real(receiver, *args, **kw)

        monkeypatch.setattr(DectrisReceiver, "drain_split", drain)

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.parked.clear()
        self.open.clear()
        try:
            assert self.parked.wait(120), "the source did not come back to read its socket"
            yield
        finally:
            self.open.set()


@pytest.fixture
def sender() -> Iterator[SimSender]:
    with SimSender(2) as s:
        yield s


def _stop_in_a_held_job(tmp_path: Path, sender: SimSender, gate: _Gate, reads: _Reads, frames: np.ndarray,
                        release_at_stop: bool) -> tuple[BackgroundService, threading.Thread]:
    """A daemon with its DECTRIS source (as ``serve`` starts it) takes the first 8 images of a
    series of 24 into the spool; the next 8 are held in a decoding job when the daemon is stopped.
    ``release_at_stop``: the job is let go of once the stop reached the source (its stop event
    set) or closed the source's sink (before the fix, at once), else never (a hung worker)."""
    bg = BackgroundService(_config(tmp_path, source=sender.url))
    source_stop = threading.Event()
    thread = serve._start_source(bg.service.config, source_stop, bg.service)
    messages = _series(frames, "stopped-in")  # start, its images, end
    for m in messages[:1 + 8]:
        sender.send_raw(m)
    wait_for(lambda: (s := bg.service.scans.sessions.get(SCAN)) is not None and s.ledger.received == 8, 120,
             "the first 8 images in the spool")
    gate.hold.set()
    with reads.paused():  # (the 8 in one job: the one held)
        for m in messages[1 + 8:1 + 16]:  # (not the end: the series is open at the stop)
            sender.send_raw(m)
    assert gate.entered.wait(120), "no decoding job was held"
    bg.service.request_stop("test")
    if release_at_stop:
        wait_for(lambda: source_stop.is_set() or bg.service.direct._closed, 60, "the stop to reach the source")
        gate.release.set()
    bg.stop()
    return bg, thread


def _recovered(tmp_path: Path) -> tuple[BackgroundService, dict]:
    """The restarted daemon (no source): the scan is recovered open and, no image coming,
    aborted with its frames kept, as any recovered scan whose sender does not come back."""
    bg = BackgroundService(_config(tmp_path, recover_wait_s=0))
    with ControlClient(bg.service.endpoints["control"], timeout_s=30) as ctl:
        scan = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == SCAN
                                      and s["state"] == "aborted"), None), 120, "the recovered scan to stop")
    return bg, scan


def test_images_being_decoded_at_the_daemons_stop_reach_the_spool_and_finish_scan_reconstructs_them(
        tmp_path, sender, monkeypatch) -> None:
    """16 images of a series of 24 were sent, the last 8 in a decoding job when the daemon
    stopped: the stop closed the source's sink first, and the job's frames, delivered after, were
    lost (8 of the 16 in the spool). Now the stop takes them first: all 16 are in the spool, the
    scan is left open (not aborted), the restarted daemon recovers it with 16 frames, and
    finish_scan reconstructs them."""
    gate = _Gate(monkeypatch)
    frames = _frames(24, seed=3)
    bg, thread = _stop_in_a_held_job(tmp_path, sender, gate, _Reads(monkeypatch), frames, release_at_stop=True)
    session = bg.service.scans.sessions[SCAN]
    assert session.ledger.received == 16, session.ledger.received
    assert not thread.is_alive()  # (the drain waited for the source)
    assert not session.state.final, session.state  # left open: the next start resumes or recovers it

    bg, scan = _recovered(tmp_path)
    try:
        assert scan["recovered"] is True and scan["frames"]["received"] == 16, scan
        with ControlClient(bg.service.endpoints["control"], timeout_s=30) as ctl:
            ctl.finish_scan(SCAN)
            done = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == SCAN
                                          and s["state"] in ("finished", "failed")), None), 120, "finish_scan")
        assert done["state"] == "finished" and done["frames"]["received"] == 16, done
    finally:
        bg.stop()
    with h5py.File(done["result_path"], "r") as f:
        index = f["raw"][DATA]["frame_index"][()]
        detector = read_detector_frames(f["raw"])
    assert sorted(index.tolist()) == list(range(16))
    assert detector is not None and detector.tobytes() == frames[index].tobytes()


def test_a_hung_decoding_job_at_the_stop_is_dropped_by_name_and_the_stop_ends(
        tmp_path, sender, monkeypatch, caplog) -> None:
    """A decoding job that never ends (a hung worker) cannot hold the stop: after STOP_JOBS_S the
    source drops it, names the images and the scan in the log and an error event (rule
    dectris_images_lost), and returns; the images before it are kept."""
    monkeypatch.setattr(dectris_source, "STOP_JOBS_S", 0.5, raising=False)  # (absent before the fix)
    gate = _Gate(monkeypatch)
    events: list[Any] = []
    publish = BackgroundService.__init__

    def record_errors(self: BackgroundService, config: ServiceConfig) -> None:
        publish(self, config)
        real = self.service.publish_error
        self.service.publish_error = lambda event: (events.append(event), real(event))[1]  # type: ignore[method-assign]

    monkeypatch.setattr(BackgroundService, "__init__", record_errors)
    caplog.set_level(logging.ERROR, logger="cryoptycho.protocols.dectris.source")
    try:
        bg, thread = _stop_in_a_held_job(tmp_path, sender, gate, _Reads(monkeypatch), _frames(24, seed=5),
                                         release_at_stop=False)
        assert not thread.is_alive()
        assert bg.service.scans.sessions[SCAN].ledger.received == 8
        assert f"8 images in a decoding job not done 0.5 s after the stop (a hung decoding worker) are dropped" \
               f", not spooled; scan {SCAN} keeps the images before them" in caplog.text, caplog.text
        lost = [e for e in events if e.rule == "dectris_images_lost"]
        assert len(lost) == 1 and lost[0].scan_id == SCAN and lost[0].field == "dectris.decoding", events
    finally:
        gate.release.set()  # (the hung job's thread ends)


class _StoppingRecorder:
    """A sink of a daemon that is stopping (FrameSink.stopping): it keeps what the source delivers."""

    stopping = True

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def put(self, msg: Any) -> None:
        self.messages.append(msg)

    def image_ids(self, scan_id: str) -> list[int]:
        from cryoptycho.protocols.sources import DetectorFrames
        return [int(i) for m in self.messages if isinstance(m, DetectorFrames) and m.frames.scan_id == scan_id
                for i in m.frames.indices]


def test_a_hung_job_ahead_of_the_next_series_start_does_not_hold_the_stop(monkeypatch, caplog) -> None:
    """A decoding job hangs (a hung worker) and the detector goes on: the next series' first
    image goes alone and the source waits for every job before it, the hung one too. That wait
    did not look at the stop: the daemon's drain gave up after SOURCES_STOP_S and the source's
    thread stayed blocked. Now a stopping source drops the hung job after STOP_JOBS_S there too,
    naming its images, and delivers what came after it."""
    from cryoptycho.protocols.dectris.bridge import BridgeConfig
    from cryoptycho.protocols.dectris.receiver import DectrisReceiver
    from cryoptycho.protocols.dectris.schema import SeriesStart
    from cryoptycho.protocols.dectris.source import DectrisSource

    monkeypatch.setattr(dectris_source, "STOP_JOBS_S", 0.5, raising=False)
    hold, entered, release = threading.Event(), threading.Event(), threading.Event()
    real = dectris_source.decode_job

    def job(*args: Any, **kw: Any) -> Any:  # the first job submitted once ``hold`` is set hangs
        if hold.is_set() and not entered.is_set():
            entered.set()
            assert release.wait(120), "the held decoding job was never let go of"
        return real(*args, **kw)

    monkeypatch.setattr(dectris_source, "decode_job", job)
    reads = _Reads(monkeypatch)
    starts = [0]
    second_start = threading.Event()
    drain = DectrisReceiver.drain_split

    def counting(self: Any, *args: Any, **kw: Any) -> Any:
        out = drain(self, *args, **kw)
        starts[0] += sum(isinstance(m, SeriesStart) for m in out)
        if starts[0] >= 2:
            second_start.set()
        return out

    monkeypatch.setattr(DectrisReceiver, "drain_split", counting)
    first = _series(_frames(24, seed=7), "hung-ahead")
    second = _series(_frames(8, seed=8), "after-hung")
    sink = _StoppingRecorder()
    stop = threading.Event()
    out: list[Any] = []
    caplog.set_level(logging.ERROR, logger="cryoptycho.protocols.dectris.source")
    with SimSender(2) as sender:
        source = DectrisSource(sender.url, BridgeConfig(channel=CHANNEL, crop=SIDE, bin=2, energy_eV=300e3),
                               workers=2)
        runner = threading.Thread(target=lambda: out.append(source.run(sink, stop)), daemon=True)
        runner.start()
        try:
            assert source.ready.wait(120), "the source did not start"
            for m in first[:1 + 8]:
                sender.send_raw(m)
            wait_for(lambda: len(sink.image_ids("hung-ahead-series1")) == 8, 120, "the first 8 images delivered")
            hold.set()
            with reads.paused():  # (the 8 in one job: the one that hangs)
                for m in first[1 + 8:1 + 16]:
                    sender.send_raw(m)
            assert entered.wait(120), "no decoding job was held"
            for m in [first[-1], *second[:2]]:  # the end, the next series' start and its first image
                sender.send_raw(m)
            assert second_start.wait(120), "the next series' start was not received"
            stop.set()
            runner.join(60)  # (STOP_JOBS_S is 0.5 s here)
            assert not runner.is_alive(), "the source's stop waited for the hung decoding job"
        finally:
            stop.set()
            release.set()
            runner.join(120)
    assert out[0].extra["images_lost_at_stop"] == 8, out[0].extra
    assert "8 images in a decoding job not done 0.5 s after the stop" in caplog.text, caplog.text
    assert sink.image_ids("after-hung-series1") == [0], sink.messages  # (the job after the hung one)


def test_no_retry_of_worker_processes_once_the_stop_is_set(monkeypatch) -> None:
    """After a fallback to threads, worker processes are tried again at a series start; not at a
    stop: a start drained in the same read that the stop came during was tried all the same (the
    check read ``stopping``, set only after the loop), spawning processes (seconds; up to the
    pool's 120 s start timeout) that the stop closes at once, within the daemon's SOURCES_STOP_S."""
    from cryoptycho.protocols.dectris.bridge import BridgeConfig
    from cryoptycho.protocols.dectris.receiver import DectrisReceiver
    from cryoptycho.protocols.dectris.schema import SeriesStart
    from cryoptycho.protocols.dectris.source import DecodePool, DectrisSource

    stop = threading.Event()
    tries: list[bool] = []  #: per try of worker processes, whether the stop was set
    monkeypatch.setattr(DecodePool, "retry_due", lambda self: True)
    monkeypatch.setattr(DecodePool, "retry_processes", lambda self: tries.append(stop.is_set()) or False)
    starts = [0]
    drain = DectrisReceiver.drain_split

    def stop_with_the_second_start(self: Any, *args: Any, **kw: Any) -> Any:
        out = drain(self, *args, **kw)
        starts[0] += sum(isinstance(m, SeriesStart) for m in out)
        if starts[0] >= 2 and not stop.is_set():
            # the second series' first image in this read too: sent just after its start, it
            # could come after the stop's last read (50 ms) on a loaded host, and the test's
            # send of it then blocked for ever, the source's socket closed
            deadline = time.monotonic() + 120
            while not isinstance(out[-1], bytes) and time.monotonic() < deadline:
                out += drain(self, *args, **kw)
            stop.set()  # (the daemon's stop came while this read was under way)
        return out

    monkeypatch.setattr(DectrisReceiver, "drain_split", stop_with_the_second_start)
    sink = _StoppingRecorder()
    out: list[Any] = []
    with SimSender(2) as sender:
        source = DectrisSource(sender.url, BridgeConfig(channel=CHANNEL, crop=SIDE, bin=2, energy_eV=300e3),
                               workers=1)
        runner = threading.Thread(target=lambda: out.append(source.run(sink, stop)), daemon=True)
        runner.start()
        try:
            assert source.ready.wait(120), "the source did not start"
            for m in _series(_frames(4, seed=9), "first"):
                sender.send_raw(m)
            wait_for(lambda: tries, 120, "the try at the first series' start")
            for m in _series(_frames(4, seed=10), "second")[:2]:
                sender.send_raw(m)
            runner.join(120)
        finally:
            stop.set()
            runner.join(120)
    assert out, "the source did not return"
    assert tries == [False], tries  # (the first series' start; none with the stop set)
    assert sink.image_ids("second-series1") == [0]  # (the stop's drain still took the second series)
