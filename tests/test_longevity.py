"""A daemon that runs for months: what an ended scan leaves behind must not grow with the scans.

The facility's drill (a wheel install, 300 scans through ``cryoptycho serve``: finished,
cancelled, aborted by the producer, refused, senders killed mid-scan) found that every ended scan
kept its worker, and with it the engine's frame store: every frame of the last 256 scans stayed
in memory (on the GPU, in device memory), unseen by the memory budget, which counts running
scans only. These tests push scans of every fate through the service in-process and bound what
is left once they have ended: no worker or engine, a bounded history, a bounded number of
previews, no new file descriptors, threads or Prometheus series per scan.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from cryoptycho.daemon import scans as scans_module
from cryoptycho.daemon.config import ServiceConfig
from cryoptycho.daemon.service import BackgroundService
from cryoptycho.daemon.worker import ScanWorker
from cryoptycho.gpu.backend import cupy_available, free_device_bytes, get_xp
from cryoptycho.gpu.stream import StreamingReconstructor
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import DeliveryError
from cryoptycho.protocols.producer import Producer
from daemon_support import synthetic_scan, wait_for

FATES = ("finished", "cancelled", "aborted", "refused", "vanished")
HISTORY = 6


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _series(service) -> set[tuple[str, tuple]]:
    return {(s.name, tuple(sorted(s.labels.items())))
            for family in service.metrics.registry.collect() for s in family.samples}


def _engines_alive() -> list[object]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) in (ScanWorker, StreamingReconstructor)]


class _Drill:
    """Scans of every fate, one after another, through a service running in this process."""

    def __init__(self, service, frames: np.ndarray, fields) -> None:
        self.endpoints = service.endpoints
        self.frames, self.fields = frames, fields
        self.ctl = ControlClient(self.endpoints["control"], timeout_s=10)
        self.sent = 0

    def run(self, n: int) -> None:
        for _ in range(n):
            sid, fate = f"drill-{self.sent:03d}", FATES[self.sent % len(FATES)]
            self.sent += 1
            getattr(self, fate)(sid)
        wait_for(self._settled, 120, f"{self.sent} scans to end")

    def _settled(self) -> bool:
        status = self.ctl.status()
        return not status["running"] and not status["waiting"] and not status["scans"]

    def _producer(self) -> Producer:
        return Producer(self.endpoints["ingest"], control=self.endpoints["control"], send_timeout_s=60)

    def finished(self, sid: str) -> None:
        with self._producer() as p:
            p.start_scan(**self.fields(sid))
            p.send_frames(self.frames)
            p.end_scan()
        wait_for(lambda: self._state(sid) == "finished", 60, f"{sid} to finish")

    def cancelled(self, sid: str) -> None:
        with self._producer() as p:
            p.start_scan(**self.fields(sid))
            p.send_frames(self.frames[:20])
            p.flush()
            # its engine exists and has published a preview when the cancel arrives
            wait_for(lambda: "object" in self.ctl.snapshot(sid), 60, f"{sid}'s first preview")
            self.ctl.cancel(sid, "drill")
            p.end_scan()  # every frame it was given is held (in the spool): delivered
        wait_for(lambda: self._state(sid) == "aborted", 60, f"{sid} to abort")

    def aborted(self, sid: str) -> None:
        with pytest.raises(RuntimeError), self._producer() as p:
            p.start_scan(**self.fields(sid))
            p.send_frames(self.frames[:20])
            p.flush()
            raise RuntimeError("the acquisition software gives up: the producer sends abort")
        wait_for(lambda: self._state(sid) == "aborted", 60, f"{sid} to abort")

    def refused(self, sid: str) -> None:
        with self._producer() as p:
            p.start_scan(**self.fields(sid, options={"no_such_option": 1}))
            with pytest.raises(DeliveryError, match="no_such_option"):
                p.end_scan()

    def vanished(self, sid: str) -> None:
        """The sender stops mid-scan without scan_end (a crash); the operator reconstructs what
        arrived with control `finish_scan` (no acquisition timeout: its clock would race the
        other fates' steps on a loaded host)."""
        p = self._producer()
        p.start_scan(**self.fields(sid))
        p.send_frames(self.frames[:20])
        p.flush()
        p.close()  # no exception: no abort is sent, as a killed process would send none
        self.ctl.call("finish_scan", scan_id=sid)
        wait_for(lambda: self._state(sid) == "finished", 60, f"{sid} to finish with what it received")

    def _state(self, sid: str) -> str | None:
        return next((s["state"] for s in self.ctl.list_scans() if s["scan_id"] == sid), None)


@pytest.fixture
def drill(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(scans_module, "HISTORY", HISTORY)
    scan = synthetic_scan(n_side=6, m=32)
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=tmp_path / "spool", results_dir=tmp_path / "results",
                        refine_time_budget_s=1, resolution_interval_s=0.2,
                        output_formats=("h5",), options={"iterations": 2})
    bg = BackgroundService(cfg)
    d = _Drill(bg.service, scan.frames, scan.start_fields)
    try:
        yield bg.service, d
    finally:
        d.ctl.close()
        bg.stop()


def test_ended_scans_leave_nothing_that_grows(drill):
    service, d = drill
    d.run(5)  # every fate once: whatever is made once (pools, label values) exists from here on
    assert _engines_alive() == [], "an ended scan's worker or engine (its frames) is still in memory"
    fds, threads, series = _fds(), threading.active_count(), _series(service)
    d.run(10)
    assert _engines_alive() == [], "an ended scan's worker or engine (its frames) is still in memory"
    manager = service.scans
    assert len(manager.sessions) <= HISTORY and len(manager.refused) <= HISTORY
    # the manager drops a forgotten scan's declaration at its next housekeeping pass
    wait_for(lambda: set(dict(service._declared)) <= set(dict(manager.sessions)), 30,
             "forgotten scans' declarations to be dropped")
    previews = [s for s in manager.sessions.values() if "last_preview" in s.figures]
    assert len(previews) <= scans_module.FINAL_PREVIEWS
    # connections of the 10 producers and control clients close in ZeroMQ's I/O thread: wait
    wait_for(lambda: _fds() <= fds + 2, 30, f"file descriptors back to {fds} (now {_fds()})")
    wait_for(lambda: threading.active_count() <= threads, 30,
             f"threads back to {threads} (now {[t.name for t in threading.enumerate()]})")
    new = _series(service) - series
    assert not any("drill-" in str(labels) for _, labels in new), f"a series per scan id: {new}"
    assert len(new) <= 2, f"Prometheus series grew with the scans: {sorted(new)}"


def test_only_the_newest_ended_scans_keep_their_preview(drill, monkeypatch):
    """The control `snapshot` of a recent ended scan still has its images; older ones answer
    with their summary (their preview would hold the whole canvas for as long as the history)."""
    _, d = drill
    monkeypatch.setattr(scans_module, "FINAL_PREVIEWS", 1)
    d.run(1)  # finished
    d.run(1)  # cancelled after its first frames
    first, second = "drill-000", "drill-001"
    assert "object" in d.ctl.snapshot(second)
    snap = d.ctl.snapshot(first)
    assert "object" not in snap and snap["scan"]["state"] == "finished" and snap["scan"]["result_path"]


@pytest.mark.subprocess
def test_the_daemon_reports_the_free_disk_space_its_alert_watches(tmp_path: Path):
    """Spool files of aborted and failed scans stay until an operator deletes them, so a
    long-running daemon's disk fills; `CryoptychoDiskLow` (deploy/prometheus/alerts.yml) warns
    on this gauge before scans are refused at disk_reserve_bytes."""
    import shutil

    from daemon_support import metrics_of, start_daemon

    daemon = start_daemon(tmp_path)
    try:
        m = wait_for(lambda: (m := metrics_of(daemon)).get("cryoptycho_disk_free_bytes{dir=results}") and m, 30,
                     "the disk gauge", daemon)
        for d in ("spool", "results"):
            usage = shutil.disk_usage(tmp_path / d)
            assert 0 < m[f"cryoptycho_disk_free_bytes{{dir={d}}}"] <= usage.total
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="CuPy with a CUDA device is not available")
def test_device_memory_an_ended_scan_freed_counts_as_free_again():
    """Without device_memory_budget_bytes a CuPy scan is admitted against the free device
    memory. Freed arrays stay in CuPy's memory pool (reused, but never handed back to the
    driver), so the driver's own figure would count every ended scan's engine as used for good
    and refuse scans that fit."""
    cp = get_xp("cupy")
    before = free_device_bytes(cp)
    block = cp.ones(64 << 20, dtype=cp.uint8)  # 64 MiB, like a small scan's frame store
    during = free_device_bytes(cp)
    del block
    after = free_device_bytes(cp)
    assert during <= before - (60 << 20)
    assert after >= before - (4 << 20), f"{(before - after) >> 20} MiB of freed arrays still count as used"


def test_every_ended_scan_is_logged_once_with_its_outcome(drill, caplog):
    """The journal is the record of what became of a scan after `list_scans` forgot it (256
    scans, or a restart): one line per ended scan, with its outcome and where its data is."""
    _, d = drill
    caplog.set_level(logging.INFO, logger="cryoptycho.scans")
    d.run(len(FATES))
    ends = {}
    for r in caplog.records:
        if getattr(r, "outcome", None) is not None:
            assert r.scan_id not in ends, f"{r.scan_id} logged twice"
            ends[r.scan_id] = r
    assert {sid: r.outcome for sid, r in ends.items()} == {
        "drill-000": "finished", "drill-001": "aborted", "drill-002": "aborted", "drill-004": "finished"}
    assert "drill-000.h5" in ends["drill-000"].getMessage() and ends["drill-000"].frames == 36
    assert "drill-004.h5" in ends["drill-004"].getMessage() and ends["drill-004"].frames == 20
    assert "drill" in ends["drill-001"].getMessage()  # the cancel's reason
    assert "RuntimeError" in ends["drill-002"].getMessage()  # the producer's abort reason
    for sid in ("drill-001", "drill-002"):
        assert f"{sid}.spool.h5" in ends[sid].getMessage() and ends[sid].frames == 20


def test_the_history_keeps_a_final_scan_whose_worker_has_not_exited(tmp_path: Path, monkeypatch):
    """With the history full, the oldest final scan is forgotten; one made final by its worker
    (aborted, failed) before the worker exits is still running, and forgetting it made
    ``reserved()`` (asked at every admission) raise KeyError on the manager thread."""
    import numpy as np
    from cryoptycho.daemon.metrics import ServiceMetrics
    from cryoptycho.daemon.publisher import Outbox
    from cryoptycho.daemon.scan import ScanSpec
    from cryoptycho.daemon.scans import ScanManager
    from cryoptycho.daemon.session import Session, State

    monkeypatch.setattr(scans_module, "HISTORY", 2)
    manager = ScanManager(ServiceConfig(spool_dir=tmp_path / "s", results_dir=tmp_path / "r"),
                          ServiceMetrics(), Outbox())

    def session(scan_id: str) -> Session:
        spec = ScanSpec(scan_id=scan_id, frame_shape=(16, 16), frame_dtype="uint16", pixel_size_m=1e-10,
                        energy_eV=300e3, probe=np.ones((16, 16), np.complex64), expected_frames=None)
        s = Session(spec, {"host": 1000})
        manager.sessions[scan_id] = s
        return s

    stopping = session("stopping")  # aborted by its worker, which has not exited yet
    assert stopping.transition(State.ABORTED, error="cancelled")
    manager.running["stopping"] = object()  # type: ignore[assignment]
    for sid in ("done-1", "done-2"):
        assert session(sid).transition(State.ABORTED, error="cancelled")
    manager._trim_history()
    assert "stopping" in manager.sessions and len(manager.sessions) == 2
    assert manager.reserved()["host"] == 1000
