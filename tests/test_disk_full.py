"""A full disk: HDF5 corrupts a spool (every acknowledged frame unreadable) or crashes the daemon
(SIGSEGV closing a result file) when a write fails with ENOSPC. The daemon refuses such writes
first (``disk_reserve_bytes``); these tests make every disk "full" by asking for a reserve no disk
has, through the real daemon where that is how users meet it."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import DeliveryError
from cryoptycho.protocols.producer import Producer
from daemon_support import start_daemon, synthetic_scan, wait_for

NO_DISK_HAS = str(2**62)  # bytes: a reserve no file system can keep free
FAST = ("--set", "options.iterations=5", "--set", "refine_time_budget_s=10", "--set", "resolution_interval_s=0")


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(n_side=8, m=32)


def test_spool_append_that_would_fill_the_disk_is_refused_and_earlier_frames_stay_readable(tmp_path, scan):
    from cryoptycho.daemon.scan import spec_from_scan_start
    from cryoptycho.daemon.storage.spool import SpoolWriter, read_spool
    from cryoptycho.protocols.messages import ScanStart

    spec = spec_from_scan_start(ScanStart(**scan.start_fields("sp")))
    writer = SpoolWriter.create(tmp_path, spec)
    k = len(scan.frames)
    writer.append(scan.frames[:10], np.arange(10), scan.positions[:10])
    writer.reserve_bytes = shutil.disk_usage(tmp_path).free + 2**40  # the disk is now "full"
    with pytest.raises(OSError) as info:
        writer.append(scan.frames[10:20], np.arange(10, 20), scan.positions[10:20])
    assert info.value.errno == errno.ENOSPC and str(tmp_path) in str(info.value)
    assert "disk_reserve_bytes" in str(info.value)
    with pytest.raises(OSError):
        writer.append_many([(scan.frames[10:k], np.arange(10, k), scan.positions[10:k])])
    writer.set_status("failed")  # what the daemon does next: small metadata, within the reserve
    writer.close()
    kept = read_spool(tmp_path / "sp.spool.h5")
    assert kept.status == "failed"
    np.testing.assert_array_equal(kept.indices, np.arange(10))
    np.testing.assert_array_equal(kept.frames, scan.frames[:10])


def test_daemon_refuses_a_scan_whose_spool_disk_is_full_and_stays_up(tmp_path, scan):
    daemon = start_daemon(tmp_path, *FAST, "--set", f"disk_reserve_bytes={NO_DISK_HAS}")
    try:
        with Producer(daemon.ingest, control=daemon.control, send_timeout_s=30) as producer:
            producer.start_scan(**scan.start_fields("nospace"))
            producer.send_frames(scan.frames)
            with pytest.raises(DeliveryError) as info:
                producer.end_scan()
            producer.scan = None
        text = str(info.value)
        assert "disk_space" in text and "spool_dir" in text and str(tmp_path / "spool") in text, text
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            assert ctl.ping()["pong"] is True
            assert ctl.call("receipt", scan_id="nospace")["state"] == "refused"
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_result_on_a_full_disk_fails_the_scan_and_keeps_every_acknowledged_frame(tmp_path, scan):
    """kill -9 mid-scan, restart onto a full results disk: the recovered scan cannot write its
    result. It fails naming the directory (no crash, no half-written result file) and its spool
    keeps every frame the first daemon acknowledged, for replay or reconstruct."""
    from cryoptycho.daemon.storage.spool import read_spool

    daemon = start_daemon(tmp_path, *FAST)
    with Producer(daemon.ingest, control=daemon.control) as producer:
        producer.start_scan(**scan.start_fields("late"))
        producer.send_frames(scan.frames[:40])
        acknowledged = producer.flush().acknowledged
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        producer.scan = None
    assert acknowledged == 40

    daemon = start_daemon(tmp_path, *FAST, "--set", "recover_wait_s=0.5",
                          "--set", f"disk_reserve_bytes={NO_DISK_HAS}")
    try:
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            # no producer comes back: aborted with its 40 frames kept (not a partial "finished"),
            # and reconstructed on request, as an operator would
            wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "late"
                                   and s["state"] == "aborted"), None), 120, "the recovered scan to stop", daemon)
            ctl.finish_scan("late")
            info = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "late"
                                          and s["state"] in ("finished", "failed")), None),
                            120, "the recovered scan to end", daemon)
            assert info["state"] == "failed", info
            assert "no space for the result" in info["error"] and str(tmp_path / "results") in info["error"]
            assert ctl.ping()["pong"] is True
        assert not list((tmp_path / "results").glob("late*"))
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    kept = read_spool(tmp_path / "spool" / "late.spool.h5")
    assert kept.status == "failed"
    np.testing.assert_array_equal(np.sort(kept.indices), np.arange(40))
    with h5py.File(tmp_path / "spool" / "late.spool.h5") as f:
        assert f.attrs["status"] == "failed"


def test_a_spool_failure_mid_scan_is_the_reason_the_producer_is_given(tmp_path, monkeypatch, scan):
    """The producer's DeliveryError said "(announced: scan_end)" when the disk filled mid-scan:
    the receipt was answered before the spool failure was noted, and the SDK named the scan's
    end before its error."""
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import SpoolWriter

    calls = {"n": 0}
    real = SpoolWriter.append_many

    def fills_up(self, batches, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        return real(self, batches, *args, **kwargs)

    monkeypatch.setattr(SpoolWriter, "append_many", fills_up)
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r",
                        resolution_interval_s=0)
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        with Producer(svc.endpoints["ingest"], control=svc.endpoints["control"], send_timeout_s=30) as p:
            p.start_scan(**scan.start_fields("fills"))
            p.send_frames(scan.frames[:8])
            assert p.flush().acknowledged == 8
            p.send_frames(scan.frames[8:])
            with pytest.raises(DeliveryError) as info:
                p.end_scan()
            p.scan = None
        assert "No space left on device (test)" in str(info.value), str(info.value)
        assert info.value.acknowledged == 8
    finally:
        bg.stop()


def test_frames_a_full_disk_did_not_take_are_the_missing_ones_the_producer_is_told(tmp_path, monkeypatch, scan):
    """The disk filled at the second append: the sender heard "the daemon holds 8 of the 64
    frames …" and, as the frames it lacks, the indices never sent (here none: the list was left
    out), not the 56 frames whose spool write was refused; acquisition software resending what
    the receipt lists would resend nothing. The receipt's `missing` and `gaps` now count the
    frames whose write failed."""
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import SpoolWriter

    calls = {"n": 0}
    real = SpoolWriter.append_many

    def fills_up(self, batches, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # one append refused: the appends after it (if any) are taken again
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        return real(self, batches, *args, **kwargs)

    monkeypatch.setattr(SpoolWriter, "append_many", fills_up)
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r",
                        resolution_interval_s=0)
    bg = BackgroundService(cfg)
    svc = bg.service
    n = len(scan.frames)
    try:
        with Producer(svc.endpoints["ingest"], control=svc.endpoints["control"], send_timeout_s=30) as p:
            p.start_scan(**scan.start_fields("lost-to-disk"))
            p.send_frames(scan.frames[:8])
            assert p.flush().acknowledged == 8
            p.send_frames(scan.frames[8:])
            with pytest.raises(DeliveryError) as info:
                p.end_scan()
            p.scan = None
        receipt = info.value.receipt
        held = receipt["frames"]["received"]
        assert held < n and info.value.acknowledged == held, receipt
        # every frame not held is listed (up to 100) and counted as a gap
        assert receipt["frames"]["gaps"] == n - held, receipt
        assert len(receipt["missing"]) == min(100, n - held) and 8 in receipt["missing"], receipt
        assert "first missing indices [8, " in str(info.value), str(info.value)
        with ControlClient(svc.endpoints["control"], timeout_s=30) as ctl:
            assert ctl.receipt("lost-to-disk")["missing"] == receipt["missing"]
    finally:
        bg.stop()


def test_a_spool_close_that_finds_the_disk_full_fails_the_scan_and_keeps_its_journal(tmp_path, monkeypatch, scan):
    """A journal-only spool is brought up to its journal at the scan's end, on the closer
    thread. When that found the disk full while the worker already waited in finish_result,
    the worker went on: the result's /raw was copied from the file without the journal's
    frames (0 of 64), the journal was deleted and the scan reported finished — every frame lost.
    Now the scan fails with its journal kept, and control `finish_scan` (as its error says)
    rebuilds the spool from the journal and reconstructs all 64 frames."""
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.scans import ScanManager
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import SpoolWriter, read_spool

    finishing, full = threading.Event(), threading.Event()
    real_finish, real_materialise = ScanManager.finish_result, SpoolWriter._materialise

    def finish_result(self, session, state):
        finishing.set()
        return real_finish(self, session, state)

    def materialise(self):
        if threading.current_thread().name.startswith("spool-close") and not full.is_set():
            full.set()  # once: the disk has room again for finish_scan
            assert finishing.wait(120), "the worker never reached finish_result"
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        return real_materialise(self)

    monkeypatch.setattr(ScanManager, "finish_result", finish_result)
    monkeypatch.setattr(SpoolWriter, "_materialise", materialise)
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r",
                        resolution_interval_s=0)
    cfg.options.iterations = 3
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        with Producer(svc.endpoints["ingest"], control=svc.endpoints["control"], send_timeout_s=30) as p:
            p.start_scan(**scan.start_fields("closefull"))
            p.send_frames(scan.frames)
            assert p.end_scan().acknowledged == len(scan.frames)
        with ControlClient(svc.endpoints["control"], timeout_s=30) as ctl:
            info = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "closefull"
                                          and s["state"] in ("finished", "failed")), None),
                            120, "the scan to end")
            assert info["state"] == "failed", info
            assert "No space left on device (test)" in info["error"], info
            assert not list((tmp_path / "r").glob("closefull*"))
            kept = read_spool(tmp_path / "s" / "closefull.spool.h5")  # through its journal
            np.testing.assert_array_equal(np.sort(kept.indices), np.arange(len(scan.frames)))
            # as its error says: finish_scan rebuilds the file from the journal and reconstructs it
            assert "control `finish_scan` or the next start rebuilds" in info["error"], info
            assert ctl.call("finish_scan", scan_id="closefull")["frames"]["received"] == len(scan.frames)
            info = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "closefull"
                                          and s["state"] in ("finished", "failed")), None),
                            120, "the re-opened scan to end")
            assert info["state"] == "finished", info
    finally:
        bg.stop()
    with h5py.File(info["result_path"]) as f:
        np.testing.assert_array_equal(np.sort(f["raw/entry_1/data_1/frame_index"][()]), np.arange(len(scan.frames)))


#: installed in a daemon through PYTHONPATH: the disk is "full" for the spool's close (its
#: free-space check, which refuses before HDF5 writes, as a full disk does), and only for it
FULL_AT_CLOSE = '''
import errno, threading
import cryoptycho.daemon.storage.spool as spool
_real = spool.require_free_space
def _full_at_close(directory, nbytes, reserve_bytes, what):
    if threading.current_thread().name.startswith("spool-close"):
        raise OSError(errno.ENOSPC, f"No space left on device (test): {what}")
    return _real(directory, nbytes, reserve_bytes, what)
spool.require_free_space = _full_at_close
'''


def _files_held(pid: int) -> set[str]:
    """The files process ``pid`` has open (Linux /proc)."""
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            held.add(os.readlink(fd))
        except OSError:  # closed meanwhile
            pass
    return held


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_a_daemon_whose_spool_close_fails_lets_go_of_the_file_and_says_where_the_frames_are(tmp_path, scan):
    """After a failed close the spool's HDF5 file stayed open in the daemon (a descriptor and
    HDF5's lock for as long as it ran), and its stop said the scan's spool was one it "could not
    recover", though its journal keeps every frame and the next start rebuilds it: now the file
    is let go of, the scan's error, its log and the stop name the journal and what happens next,
    and the next start does it."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FULL_AT_CLOSE)
    path = os.pathsep.join([str(inject), *filter(None, [os.environ.get("PYTHONPATH")])])
    spool_file = tmp_path / "spool" / "unclosed.spool.h5"
    journal = tmp_path / "spool" / "unclosed.spool.journal"
    n = len(scan.frames)
    daemon = start_daemon(tmp_path, *FAST, prefix=("env", f"PYTHONPATH={path}"))
    try:
        with Producer(daemon.ingest, control=daemon.control, send_timeout_s=30) as producer:
            producer.start_scan(**scan.start_fields("unclosed"))
            producer.send_frames(scan.frames)
            assert producer.end_scan().acknowledged == n
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            info = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "unclosed"
                                          and s["state"] in ("finished", "failed")), None),
                            120, "the scan to end", daemon)
            assert info["state"] == "failed", info
            error = info["error"]
            assert "No space left on device (test)" in error, error
            assert f"its {n} frames are kept in its journal {journal}" in error, error
            assert f"the next start rebuilds {spool_file} from it and reconstructs the scan" in error, error
            # the summary turns failed as the worker ends; the manager lets go of it at its next turn
            def let_go() -> dict | None:
                status = ctl.call("status")
                return None if "unclosed" in status["scans"] or "unclosed" in status["running"] else status

            status = wait_for(let_go, 30, "the failed scan to leave the running ones", daemon)
            assert str(journal) in status["unclosed_spools"]["unclosed"], status
        wait_for(lambda: not {str(spool_file), str(journal)} & _files_held(daemon.proc.pid), 30,
                 "the daemon to let go of the spool file and its journal", daemon)
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    log = daemon.log()
    assert "could not recover" not in log, log
    said = [line for line in daemon.log_lines if "spool files could not be closed" in line]
    assert len(said) == 1 and "unclosed:" in said[0] and str(journal) in said[0], log
    assert journal.exists()

    daemon = start_daemon(tmp_path, *FAST)  # the disk has room again
    try:
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            info = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "unclosed"
                                          and s["state"] in ("finished", "failed")), None),
                            120, "the recovered scan to end", daemon)
            assert info["state"] == "finished", info
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    assert f"spool {spool_file.name} rebuilt from its journal" in daemon.log()
    with h5py.File(info["result_path"]) as f:
        np.testing.assert_array_equal(np.sort(f["raw/entry_1/data_1/frame_index"][()]), np.arange(n))
