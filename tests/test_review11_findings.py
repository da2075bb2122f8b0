"""Defects a review of this session's merges found (helper review11), each proved by a test that
failed on the merged code: a receipt of an id no file can hold, a failure to retire a copied spool
lost on the raw-copy thread, raw copies on the closer thread, a raw-pending result said to be "not
written by the daemon", a result held for writing during a raw copy."""

from __future__ import annotations

import logging
import threading
import types
from pathlib import Path
from typing import Any

import pytest


def _manager(tmp_path: Path, **settings: Any) -> Any:
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.metrics import ServiceMetrics
    from cryoptycho.daemon.publisher import Outbox
    from cryoptycho.daemon.scans import ScanManager

    cfg = ServiceConfig(spool_dir=tmp_path / "s", results_dir=tmp_path / "r", **settings)
    cfg.spool_dir.mkdir(parents=True, exist_ok=True)
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    return ScanManager(cfg, ServiceMetrics(), Outbox())


@pytest.mark.parametrize("scan_id", ["a/b", "../results/x", "é"])
def test_receipt_of_an_id_the_protocol_refuses_is_no_internal_error(tmp_path: Path, scan_id: str) -> None:
    """PROTOCOL.md § 6: ``receipt`` answers ``state: "unknown"`` for a scan the daemon has not read.
    The new ``taken`` field is computed from the id's file names, and an id no scan may have
    (a raw control client, another language's SDK) raised out of the handler."""
    from cryoptycho.daemon.handlers import build_table
    from cryoptycho.protocols.control import Request, dispatch
    from cryoptycho.protocols.limits import Limits

    manager = _manager(tmp_path)
    try:
        service = types.SimpleNamespace(scans=manager, limits=Limits(), metrics=manager.metrics, config=manager.config)
        reply = dispatch(build_table(service), Request(method="receipt", params={"scan_id": scan_id}))
    finally:
        manager.close()
    assert (reply.result or {}).get("rule") != "internal_error", reply
    if reply.success:
        assert reply.result["state"] == "unknown" and reply.result["taken"] is None, reply


def test_a_failure_retiring_a_copied_spool_is_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The frames reached the result (complete_raw_copy True); retiring the spool then fails (an
    I/O error on the spool directory). Every background thread surfaces its exceptions."""
    from cryoptycho.daemon import scans
    from daemon_support import wait_for

    manager = _manager(tmp_path)
    spool, result = manager.config.spool_dir / "x.spool.h5", manager.config.results_dir / "x.h5"
    spool.write_bytes(b"")

    def broken(*_: Any, **__: Any) -> None:
        raise OSError(5, "Input/output error", str(spool))

    monkeypatch.setattr(scans, "complete_raw_copy", lambda *_, **__: True)
    monkeypatch.setattr(scans, "discard_journal", broken)
    with manager._raw_lock:
        manager._raw_pending["x"] = (spool, result)
    try:
        with caplog.at_level(logging.INFO):
            manager.retry_raw_copies()
            wait_for(lambda: not manager._raw_retrying, 60, "the raw-copy pass to end")
    finally:
        manager.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("x.spool.h5" in m and "Input/output error" in m for m in errors), [r.getMessage() for r in caplog.records]


def test_a_pending_raw_copy_does_not_occupy_the_closer_thread(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """after_disk's docstring: a producer confirming delivery waits for its own scan's close only,
    "not for every close before it: another scan's close may take minutes". A raw copy reads the
    whole spool and rewrites the result; queued on the closer, it is such a wait for every scan
    that ends meanwhile."""
    from cryoptycho.daemon import scans
    from daemon_support import wait_for

    threads: list[str] = []
    monkeypatch.setattr(scans, "complete_raw_copy",
                        lambda *_, **__: threads.append(threading.current_thread().name) or False)
    manager = _manager(tmp_path)
    spool, result = manager.config.spool_dir / "y.spool.h5", manager.config.results_dir / "y.h5"
    with manager._raw_lock:
        manager._raw_pending["y"] = (spool, result)
    try:
        manager.retry_raw_copies()
        wait_for(lambda: threads, 60, "the pending raw copy to be tried")
    finally:
        manager.close()
    assert not threads[0].startswith("spool-close"), threads


def test_reading_the_frames_of_a_raw_pending_result_names_its_spool(tmp_path: Path) -> None:
    """`replay`, `reconstruct` and `batch` read a daemon result's frames from /raw (open_recorded).
    Until the raw copy is done, the result's ``/extra`` attr ``raw_pending`` names the spool that
    holds them (FORMATS.md, "Result file")."""
    from cryoptycho.daemon.storage.open import open_recorded
    from cryoptycho.daemon.storage.result import write_result
    from cryoptycho.gpu.data import PtychoData
    from cryoptycho.gpu.options import ReconOptions
    from cryoptycho.gpu.reconstruct import reconstruct
    from daemon_support import synthetic_scan

    scan = synthetic_scan(n_side=3, m=16, step_px=3)
    state = reconstruct(PtychoData(frames=scan.frames, positions=scan.positions, energy=300e3, pixel_size=1e-10,
                                   probe=scan.probe), ReconOptions(iterations=1, refine_probe=False))
    spool = tmp_path / "s" / "held.spool.h5"
    path = write_result(tmp_path / "held.h5", state, extra={"scan_id": "held", "raw_pending": str(spool)})
    with pytest.raises(ValueError) as info:
        open_recorded(path)
    said = str(info.value)
    assert "not written by the daemon" not in said and str(spool) in said, said


def test_a_result_held_for_writing_during_a_raw_copy_is_tried_again(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool was held at the finish; when it is let go, the result is the file held (an
    operator looking at it in HDFView read/write). That is as passing as the spool's hold was."""
    import h5py
    from cryoptycho.daemon import scans
    from cryoptycho.daemon.storage.result import write_result
    from cryoptycho.gpu.data import PtychoData
    from cryoptycho.gpu.options import ReconOptions
    from cryoptycho.gpu.reconstruct import reconstruct
    from daemon_support import synthetic_scan, wait_for
    from spool_support import held_open, small_spool

    manager = _manager(tmp_path)
    spool = small_spool(manager.config.spool_dir, "r1", "ended")
    scan = synthetic_scan(n_side=3, m=16, step_px=3)
    state = reconstruct(PtychoData(frames=scan.frames, positions=scan.positions, energy=300e3, pixel_size=1e-10,
                                   probe=scan.probe), ReconOptions(iterations=1, refine_probe=False))
    result = write_result(manager.config.results_dir / "r1.h5", state,
                          extra={"scan_id": "r1", "raw_pending": str(spool)})
    monkeypatch.setattr(scans, "RAW_RETRY_S", 0.0)
    with manager._raw_lock:
        manager._raw_pending["r1"] = (spool, result)
    try:
        with held_open(result, "r+"):
            # the pass runs on the raw-copy thread (flush_disk does not wait for it): waited for
            # while the result is held, or it may run after the hold (then this tests nothing), or
            # still be running at the call below (which then starts no second pass)
            manager.retry_raw_copies()
            wait_for(lambda: not manager._raw_retrying, 60, "the raw-copy pass during the hold to end")
            assert "r1" in manager.raw_pending() and manager.raw_failure("r1") is None
        with h5py.File(result, "r") as f:
            assert "raw" not in f
        manager.retry_raw_copies()
        wait_for(lambda: not manager._raw_retrying, 60, "the raw-copy pass after the hold to end")
    finally:
        manager.close()
    with h5py.File(result, "r") as f:
        assert "raw" in f
