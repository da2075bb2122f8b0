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
