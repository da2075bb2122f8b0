"""Second-wave QA of svc6 (empty spools deleted at a scan's end and at start; bounded control
replies) and of 58e70d7 (a receipt of a stopped scan answered once its spool is closed): each
test here failed on the code it names before its fix."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.storage.spool import (
    DATA,
    UNPOSITIONED,
    SpoolWriter,
    remove_if_empty,
    spool_path,
)
from cryoptycho.protocols.compression import bslz4_compress
from cryoptycho.protocols.sources import RawChunks, UnpositionedFrames
from daemon_support import loopback_config, wait_for
from test_fuzz_daemon import Gate, _answer, _ask, gated_service

DET = 32  # detector frames of the tests' unpositioned images: DET × DET uint16


def _spec(scan_id: str) -> ScanSpec:
    return ScanSpec(scan_id=scan_id, frame_shape=(16, 16), frame_dtype="uint16", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((16, 16), np.complex64), expected_frames=4)


def _raw(ids: list[int]) -> RawChunks:
    frames = [np.full((DET, DET), i, np.uint16) for i in ids]
    return RawChunks((DET, DET), np.dtype(np.uint16), [bslz4_compress(f) for f in frames])


def _unpositioned(path: Path) -> int:
    with h5py.File(path, "r", locking=False) as f:
        ds = f[DATA].get(UNPOSITIONED)
        return 0 if ds is None else int(ds.shape[0])


def _on_manager(svc: Any, fn: Any) -> Any:
    """Run ``fn()`` on the daemon's manager thread (after every spool operation asked for so
    far), and return its result here."""
    out: dict[str, Any] = {}
    ran = threading.Event()

    def call(_r: Any, _e: Any) -> None:
        try:
            out["value"] = fn()
        finally:
            ran.set()

    svc.scans.after_disk(lambda: None, call)
    assert ran.wait(60), "the manager thread never ran it"
    return out.get("value")


def _settled(svc: Any, scan_id: str) -> bool:
    """Whether the manager has settled the stopped scan (its worker gone, the spool operations of
    its end asked for): read on the manager thread, where reap pops and settles in one step."""
    return _on_manager(svc, lambda: svc.scans.sessions[scan_id].state.final and scan_id not in svc.scans.running)


# -- 1. an aborted scan's spool that holds detector frames without a position is not deleted ---------

def test_a_spool_holding_only_unpositioned_detector_frames_is_not_removed_as_empty(tmp_path: Path) -> None:
    """A scan's spool keeps the detector images it has no position for (UNPOSITIONED: "kept,
    not reconstructed"); its count of positioned frames may be 0 when it fails or is aborted
    (those images came first, or its positioned frames were refused). svc6's check "count 0:
    nothing in it" deleted the file with those images, at the scan's end and at every start."""
    spool_dir = tmp_path / "spool"
    w = SpoolWriter.create(spool_dir, _spec("past"))
    assert w.append_unpositioned(np.array([4, 5]), _raw([4, 5])) == 2
    w.set_status("aborted")
    w.close()
    assert remove_if_empty(w.path) is None  # before: "aborted", and the file deleted
    assert _unpositioned(w.path) == 2

    from cryoptycho.daemon.service import BackgroundService

    BackgroundService(loopback_config(tmp_path, spool_dir=spool_dir)).stop()  # a start's clean-up
    assert _unpositioned(w.path) == 2


def test_a_cancelled_scan_with_unpositioned_detector_frames_keeps_its_spool(tmp_path: Path) -> None:
    """The same through the daemon: detector images past the scan's positions are kept in its
    spool (as the DECTRIS source sends them, UnpositionedFrames), then the scan is cancelled
    before any positioned frame: its spool, which holds them, stays."""
    with gated_service(tmp_path, resolution_interval_s=0) as d:
        svc, ctl = d.svc, d.ctl
        with d.producer() as producer:
            producer.start_scan(scan_id="past", **d.start_fields(4))
            producer.flush()  # the daemon has read the scan_start
            _on_manager(svc, lambda: svc._unpositioned(UnpositionedFrames("past", np.array([4, 5]), _raw([4, 5]))))
            ctl.cancel("past", "wrong square")
            producer.scan = None  # cancelled: it never ends
        wait_for(lambda: _settled(svc, "past"), 60, "the cancelled scan to be settled")
        svc.scans.flush_disk()  # its close, and the removal of an empty spool, are over
        path = spool_path(svc.config.spool_dir, "past")
        assert path.exists(), "the spool holding the scan's detector frames was deleted"
        assert _unpositioned(path) == 2


# -- 2. a receipt of a stopped scan waits for that scan's close, not for every other scan's ------------

def test_a_receipt_of_a_stopped_scan_is_not_held_up_by_another_scans_close(tmp_path: Path, monkeypatch) -> None:
    """58e70d7 answered a receipt of a stopped (or finished) scan only once the closer thread
    had done everything asked of it before, the closes of every other scan included: a large
    detector scan's close (its binned rows written, seconds to minutes) held up the receipts a
    producer polls to confirm delivery of a scan stopped long before (its client gives up after
    2 s a try, then DeliveryTimeout). The close of another scan is held by a gate: the receipt of
    the scan closed before answers, and the receipt of the held one waits for its close."""
    gate = Gate(closed=False)
    gate.hold(monkeypatch, SpoolWriter, "close")
    with gated_service(tmp_path, gate, resolution_interval_s=0) as d:
        svc, ctl = d.svc, d.ctl
        for scan_id in ("done", "slow"):
            with d.producer() as producer:
                producer.start_scan(scan_id=scan_id, **d.start_fields(8))
                producer.send_frames(np.ones((2, 16, 16), np.uint16))
                assert producer.flush().acknowledged == 2
                if scan_id == "slow":
                    gate.close()  # "done" is closed (below): from here the closer is held at "slow"'s
                ctl.cancel(scan_id, "operator stop")
                producer.scan = None
            wait_for(lambda: _settled(svc, scan_id), 60, f"{scan_id} to be settled")  # noqa: B023
            if scan_id == "done":
                svc.scans.flush_disk()
        assert gate.entered.wait(60), "the closer never took the close of 'slow'"

        slow = d.dealer()
        _ask(slow, "receipt", scan_id="slow")
        wait_for(lambda: d.pending() == 1, 60, "the receipt of 'slow' to be read and held")
        done = d.dealer()
        _ask(done, "receipt", scan_id="done")
        answer = _answer(done)  # before: no answer until the close of "slow" was over
        assert answer["state"] == "aborted" and answer["frames"]["received"] == 2, answer
        assert d.pending() == 1  # "slow"'s own receipt still waits for its close (58e70d7)
        gate.open()
        answer = _answer(slow)
        assert answer["state"] == "aborted" and answer["frames"]["received"] == 2, answer


def test_a_receipt_of_a_stopped_scan_asked_as_the_daemon_stops_is_answered(tmp_path: Path, monkeypatch) -> None:
    """A receipt of a stopped scan is answered in two steps on the spool thread (the count,
    then, the scan being stopped, once more after its close). Asked while the spool thread is
    busy and the daemon stops (SIGTERM mid-poll: a producer confirms delivery every few ms),
    its first step ran as the spool thread was shut down, and its second one could not be
    submitted: "internal error after a spool operation" (RuntimeError: cannot schedule new
    futures after shutdown) in the log and the internal-errors metric, and the request never
    answered. The spool thread is held by a gate until the stop closes the scan manager."""
    from cryoptycho.daemon.scans import ScanManager
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient
    from test_fuzz_daemon import Served

    gate = Gate(closed=False)
    gate.hold(monkeypatch, SpoolWriter, "append_many")
    close = ScanManager.close

    def opened_then_closed(self: ScanManager) -> None:  # the stop has read every request by now
        gate.open()
        close(self)

    monkeypatch.setattr(ScanManager, "close", opened_then_closed)
    bg = BackgroundService(loopback_config(tmp_path))
    d = Served(bg.service, ControlClient(bg.service.endpoints["control"], timeout_s=30, retries=1))
    svc = d.svc
    try:
        with d.producer() as producer:
            producer.start_scan(scan_id="stopped", **d.start_fields(8))
            producer.send_frames(np.ones((2, 16, 16), np.uint16))
            assert producer.flush().acknowledged == 2
            d.ctl.cancel("stopped", "operator stop")
            producer.scan = None
        wait_for(lambda: _settled(svc, "stopped"), 60, "the cancelled scan to be settled")
        gate.close()
        with d.producer() as producer:
            producer.start_scan(scan_id="busy", **d.start_fields(8))
            producer.send_frames(np.ones((2, 16, 16), np.uint16))
            assert gate.entered.wait(60), "the spool thread never took the frames"
            asker = d.dealer()
            _ask(asker, "receipt", scan_id="stopped")
            wait_for(lambda: d.pending() == 1, 60, "the receipt to be read and held")
            producer.scan = None  # interrupted by the stop: recovered at the next start
            bg.stop()
    finally:
        gate.open()
        for sock in d._dealers:
            sock.close()
        if d._ctx is not None:
            d._ctx.term()
        d.ctl.close()
        if bg.thread.is_alive():
            bg.stop()
    assert svc.metrics.internal_errors.labels(where="housekeeping")._value.get() == 0
    assert not svc._replies, "the receipt was never answered"


# -- 3. the failure that replaces a reply too large for the client fits the client's limit itself -----

@pytest.mark.parametrize("limit", [256, 300, 400, 1 << 20])
def test_the_failure_answering_a_reply_too_large_fits_max_header_bytes_itself(limit: int) -> None:
    """f5b5ee2 answers a reply whose header exceeds max_header_bytes (>= 256, a daemon setting)
    with a failure naming the method and sizes: for a 64-character method name (the longest
    a request carries) it was 311 bytes, refused by a client at 256 too. The failure for any
    limit fits it, and a client with that limit reads it (success false, rule named)."""
    from cryoptycho.protocols.control import encode_reply
    from cryoptycho.protocols.limits import Limits
    from cryoptycho.protocols.messages import Reply, decode

    limits = Limits(max_header_bytes=limit)
    for method in ("status", "m" * 64):
        big = Reply(True, "ok", {"scans": "x" * (limit + 1)}, time_s=time.time())
        parts = encode_reply(big, method, limits)
        assert len(bytes(parts[0])) <= limit
        reply = decode([bytes(p) for p in parts], limits)
        assert not reply.success and reply.result["rule"] == "max_header_bytes", reply
        if limit == 1 << 20:  # a limit with room: the message whole, method and sizes named
            assert method in reply.msg and "bytes, more than the" in reply.msg


def test_status_and_list_scans_lists_shrink_with_a_lower_max_header_bytes(tmp_path: Path) -> None:
    """The byte budgets of status's and list_scans' lists were fixed for a 1 MiB header (448 +
    64 + 128 kB, 640 kB): a daemon with ``limits.max_header_bytes`` set lower (64 KiB here)
    answered a status with 5000 unclosed spools, and a list_scans of 300 aborted scans with
    4096-character reasons, as max_header_bytes failures — the status the DECTRIS bridge polls
    for room. They are listed in part, with their totals, as at 1 MiB."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.session import Session, State
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.limits import Limits

    limit = 64 * 1024
    bg = BackgroundService(loopback_config(tmp_path, limits=Limits(max_header_bytes=limit)))
    svc = bg.service
    aborted = [f"aborted-{i:03d}" for i in range(300)]
    unclosed = [f"failed-{i:05d}" for i in range(5000)]

    def inject() -> None:
        for scan_id in aborted:
            session = Session(_spec(scan_id), {"host": 0, "device": 0})
            session.transition(State.ABORTED, error="r" * 4096)
            session.end_reason = "r" * 4096
            svc.scans.sessions[scan_id] = session
        for scan_id in unclosed:
            svc.scans.unclosed[scan_id] = f"its 65536 frames are kept in its journal /var/spool/{scan_id}" * 8

    def drop() -> None:  # let the test's scans go before the service stops
        for scan_id in aborted:
            svc.scans.sessions.pop(scan_id)
        svc.scans.unclosed.clear()

    try:
        _on_manager(svc, inject)
        with ControlClient(svc.endpoints["control"], timeout_s=30, limits=Limits(max_header_bytes=limit)) as ctl:
            status = ctl.status()  # before: ControlError, rule max_header_bytes
            assert status["unclosed_spools_total"] == len(unclosed)
            newest = list(status["unclosed_spools"])
            assert 0 < len(newest) < len(unclosed) and newest[-1] == unclosed[-1]
            listed = ctl.call("list_scans")
            assert listed["total"] == len(aborted) and 0 < len(listed["scans"]) < len(aborted)
            assert listed["scans"][-1]["scan_id"] == aborted[-1]
        _on_manager(svc, drop)
    finally:
        bg.stop()
