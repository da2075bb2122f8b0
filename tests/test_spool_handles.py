"""A spool step that fails must not leave the spool's file open in the daemon (a descriptor and
HDF5's lock for as long as it runs: years), nor a stop report that misnames what became of it."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.producer import Producer
from daemon_support import synthetic_scan, wait_for

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(n_side=8, m=32)


def _held() -> set[str]:
    """The files this process has open."""
    out = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            out.add(os.readlink(fd))
        except OSError:  # closed meanwhile
            pass
    return out


def _service(tmp_path: Path):
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.service import BackgroundService

    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r",
                        resolution_interval_s=0)
    cfg.options.iterations = 3
    return BackgroundService(cfg)


def test_a_scan_start_that_meets_an_internal_error_leaves_no_spool_open(tmp_path, monkeypatch, scan):
    """Its spool is made before the scan is registered; an unexpected error in between (not a
    refusal) left the file open, and on disk for the next start to "recover"."""
    from cryoptycho.daemon.scans import ScanManager

    real = ScanManager.admission

    def admission(self, spec, own_spool=False):
        if own_spool and spec.scan_id == "broken":
            raise RuntimeError("admission bug (test)")
        return real(self, spec, own_spool)

    monkeypatch.setattr(ScanManager, "admission", admission)
    bg = _service(tmp_path)
    svc = bg.service
    spool = tmp_path / "s" / "broken.spool.h5"
    try:
        with Producer(svc.endpoints["ingest"], control=svc.endpoints["control"], send_timeout_s=30) as p:
            p.start_scan(**scan.start_fields("broken"))
            wait_for(lambda: svc.metrics.internal_errors.labels(where="ingest")._value.get() >= 1, 60,
                     "the start's internal error")
            p.scan = None
        assert not spool.exists() and not spool.with_name("broken.spool.journal").exists()
        assert str(spool) not in _held()
        with ControlClient(svc.endpoints["control"], timeout_s=30) as ctl:
            assert ctl.ping()["pong"] is True
    finally:
        bg.stop()


def test_an_abort_whose_status_cannot_be_written_still_closes_the_spool_and_the_stop_says_so(
        tmp_path, monkeypatch, caplog, scan):
    """The abort's close was skipped when its status write failed: the file stayed open, and the
    stop called it a spool "this daemon could not recover", though its journal keeps every frame
    and the next start rebuilds it. (The mark of the aborted scan's file after its worker exits
    fails too: marked, its spool is aborted and its journal goes, test_qa_second_wave.)"""
    from cryoptycho.daemon.scans import ScanManager
    from cryoptycho.daemon.storage.spool import SpoolWriter, read_spool

    real = SpoolWriter.set_status

    def set_status(self, status):
        if status == "aborted":
            raise OSError(errno.EIO, "Input/output error (test)")
        return real(self, status)

    def mark(self, scan_id, status):
        raise OSError(errno.EIO, "Input/output error (test)")

    monkeypatch.setattr(SpoolWriter, "set_status", set_status)
    monkeypatch.setattr(ScanManager, "_mark_spool", mark)
    bg = _service(tmp_path)
    svc = bg.service
    spool = tmp_path / "s" / "cut.spool.h5"
    try:
        with (Producer(svc.endpoints["ingest"], control=svc.endpoints["control"], send_timeout_s=30) as p,
              ControlClient(svc.endpoints["control"], timeout_s=30) as ctl):
            p.start_scan(**scan.start_fields("cut"))
            p.send_frames(scan.frames[:20])
            assert p.flush().acknowledged == 20
            ctl.cancel("cut", "test cancels")
            wait_for(lambda: next(s for s in ctl.list_scans() if s["scan_id"] == "cut")["state"] == "aborted",
                     120, "the scan to abort")
            p.scan = None
        svc.scans.flush_disk()
        wait_for(lambda: str(spool) not in _held(), 30, "the spool file to be closed")
    finally:
        with caplog.at_level(logging.WARNING, logger="cryoptycho"):
            bg.stop()
    said = [r.getMessage() for r in caplog.records if "cut.spool.h5" in r.getMessage()]
    assert not [m for m in said if "could not recover" in m], said
    assert [m for m in said if "with their journals, which keep their frames" in m
            and "the next start rebuilds and recovers them" in m], said
    assert sorted(read_spool(spool).indices) == list(range(20))


def test_a_finish_scan_met_by_the_stop_is_answered_even_when_its_spool_cannot_be_closed(
        tmp_path, monkeypatch, caplog, scan):
    """finish_scan re-opens a stopped scan's spool; a stop that comes meanwhile closes it again
    and refuses the request (service_stopping). A failure of that close went unanswered: the
    client waited out its timeout. The stop is simulated by the manager's flag, set as the spool
    thread re-opens the file (deterministic), and the close fails once."""
    from cryoptycho.daemon.scans import ScanManager
    from cryoptycho.daemon.storage.spool import SpoolWriter
    from cryoptycho.protocols.control import ControlError

    real_reopen, real_close = ScanManager._reopen_spool, SpoolWriter.close
    failed = []

    def reopen(self, scan_id):
        opened = real_reopen(self, scan_id)
        opened[2].fails_once = True  # the re-opened writer's close fails
        self.stopping = True  # (read by the manager thread once this is handed back)
        return opened

    def close(self, held=None, peak=None):
        if getattr(self, "fails_once", False):
            self.fails_once = False
            failed.append(self.path)
            real_close(self, held, peak)  # (the file let go of, as by a close that fails: SpoolWriter.close)
            raise OSError(errno.EIO, "Input/output error (test)")
        return real_close(self, held, peak)

    monkeypatch.setattr(ScanManager, "_reopen_spool", reopen)
    monkeypatch.setattr(SpoolWriter, "close", close)
    bg = _service(tmp_path)
    svc = bg.service
    spool = tmp_path / "s" / "again.spool.h5"
    try:
        with (Producer(svc.endpoints["ingest"], control=svc.endpoints["control"], send_timeout_s=30) as p,
              ControlClient(svc.endpoints["control"], timeout_s=60) as ctl):
            p.start_scan(**scan.start_fields("again"))
            p.send_frames(scan.frames[:20])
            assert p.flush().acknowledged == 20
            ctl.cancel("again", "test cancels")
            wait_for(lambda: next(s for s in ctl.list_scans() if s["scan_id"] == "again")["state"] == "aborted",
                     120, "the scan to abort")
            p.scan = None
            # one try: a request sent again after the timeout was answered by the second try
            with (ControlClient(svc.endpoints["control"], timeout_s=60, retries=1) as once,
                  pytest.raises(ControlError, match="shutting down") as info):
                once.call("finish_scan", scan_id="again")
            assert info.value.reply.result["rule"] == "service_stopping", info.value.reply
            assert "Input/output error (test)" not in str(info.value)
            assert "its 20 frames are kept in its journal" in ctl.call("status")["unclosed_spools"]["again"]
        assert failed == [spool] and str(spool) not in _held()
    finally:
        bg.stop()
