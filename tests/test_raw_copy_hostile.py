"""Second-wave QA of the deferred raw copy (storage/rawcopy.py): markers that do not say what
the daemon wrote, and a copy that takes long."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import pytest
from cryoptycho.daemon.scans import ScanManager
from cryoptycho.daemon.storage.rawcopy import pending_marker
from cryoptycho.daemon.storage.spool import spool_path
from spool_support import held_open
from test_raw_copy_pending import _raw_count, _released, _stream


def _tried(caplog: pytest.LogCaptureFixture, marker: Path) -> bool:
    """A pass of the pending copies has tried this marker's: its failure logged, or its spool retired."""
    return not marker.exists() or any("cannot copy the raw frames" in r.getMessage() for r in caplog.records)


def _hold_finish_of(monkeypatch: pytest.MonkeyPatch, held: list[Any], scan_ids: set[str]) -> None:
    """finish_result of the scans ``scan_ids`` runs with their spool held for writing by another
    process until the test lets go (test_raw_copy_pending._hold_at_finish, for some scans only)."""
    finish = ScanManager.finish_result

    def finish_held(self: ScanManager, session: Any, state: Any) -> dict[str, str]:
        if session.scan_id in scan_ids:
            hold = held_open(spool_path(self.config.spool_dir, session.scan_id), "r+")
            hold.__enter__()
            held.append(hold)
        return finish(self, session, state)

    monkeypatch.setattr(ScanManager, "finish_result", finish_held)


@pytest.mark.parametrize("keep_spool", [False, True])
def test_a_marker_naming_another_scans_result_does_not_retire_the_spool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, keep_spool: bool) -> None:
    """A raw-pending marker edited by hand (or copied beside another spool) names the result of
    another scan, one that holds its own /raw: before, the copy took that /raw for its own
    (“copied by an earlier pass”) and deleted the spool, the only copy of the scan's frames."""
    from cryoptycho.daemon.service import BackgroundService
    from daemon_support import loopback_config, synthetic_scan

    held: list[Any] = []
    _hold_finish_of(monkeypatch, held, {"a"})
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2, keep_spool=keep_spool)
    spool_a = cfg.spool_dir / "a.spool.h5"
    with _released(held):
        bg = BackgroundService(cfg)
        try:
            assert _stream(bg.service, scan, "a")["state"] == "finished"
            assert _stream(bg.service, scan, "b")["state"] == "finished"
        finally:
            bg.stop()
    marker = pending_marker(spool_a)
    got = json.loads(marker.read_text())
    got["result"] = str((cfg.results_dir / "b.h5").absolute())
    marker.write_text(json.dumps(got))
    frames_b = _raw_count(cfg.results_dir / "b.h5")
    monkeypatch.undo()
    bg = BackgroundService(cfg)
    try:
        from daemon_support import wait_for

        wait_for(lambda: _tried(caplog, marker), 60, "the pass over the pending copies")
    finally:
        bg.stop()
    assert spool_a.exists() and marker.exists()
    with h5py.File(cfg.results_dir / "a.h5", "r") as f:
        assert "raw" not in f
    assert _raw_count(cfg.results_dir / "b.h5") == frames_b
    said = [r.getMessage() for r in caplog.records if "a.spool.h5" in r.getMessage() and r.levelname == "ERROR"]
    assert said and "b.h5" in said[-1] and "'a'" in said[-1], said


def test_a_long_deferred_raw_copy_does_not_hold_up_another_scans_finish(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deferred copy of a large scan's frames (a detector scan's spool: gigabytes, a minute
    or more) ran on the single spool-close thread: every other scan's spool close, the finish
    that waits for it and the receipts that wait for it (a producer confirming delivery) queued
    behind it. Here the copy is held until scan "b" has finished."""
    import threading

    import cryoptycho.daemon.scans as scans_module
    from cryoptycho.daemon.service import BackgroundService
    from daemon_support import loopback_config, synthetic_scan, wait_for

    copying, go_on = threading.Event(), threading.Event()
    complete = scans_module.complete_raw_copy

    def slow_copy(*args: Any, **kwargs: Any) -> bool:
        copying.set()
        assert go_on.wait(300), "the test never let the copy go on"
        return complete(*args, **kwargs)

    monkeypatch.setattr(scans_module, "complete_raw_copy", slow_copy)
    held: list[Any] = []
    _hold_finish_of(monkeypatch, held, {"a"})
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2)
    bg = BackgroundService(cfg)
    try:
        with _released(held):
            assert _stream(bg.service, scan, "a")["state"] == "finished"
        wait_for(copying.is_set, 60, "the deferred copy of scan a's frames to begin")
        try:
            done = _stream(bg.service, scan, "b")  # before: waited for the copy (its close behind it)
            assert done["state"] == "finished", done
            assert not go_on.is_set() and pending_marker(cfg.spool_dir / "a.spool.h5").exists()
        finally:
            go_on.set()
        wait_for(lambda: not pending_marker(cfg.spool_dir / "a.spool.h5").exists(), 60, "the copy to end")
        assert _raw_count(cfg.results_dir / "a.h5") == len(scan.frames)
    finally:
        go_on.set()
        bg.stop()


def test_a_result_held_for_writing_when_the_spool_is_let_go_delays_the_copy_only_until_it_is_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool's holder lets go while someone holds the *result* open for writing (a notebook
    annotating it: HDF5's exclusive lock). Before, that pass's refused open of the result was
    taken for a failed copy: logged as an error and not tried again until the daemon's next start
    (weeks, on a beamline), the result lacking its frames meanwhile. Now it waits as for the spool."""
    import cryoptycho.daemon.scans as scans_module
    from cryoptycho.daemon.service import BackgroundService
    from daemon_support import loopback_config, synthetic_scan, wait_for

    tries: list[Any] = []
    complete = scans_module.complete_raw_copy

    def counted(*args: Any, **kwargs: Any) -> bool:
        try:
            got = complete(*args, **kwargs)
        except Exception as exc:
            tries.append(exc)
            raise
        tries.append(got)
        return got

    monkeypatch.setattr(scans_module, "complete_raw_copy", counted)
    held: list[Any] = []
    _hold_finish_of(monkeypatch, held, {"a"})
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2)
    result, spool = cfg.results_dir / "a.h5", cfg.spool_dir / "a.spool.h5"
    bg = BackgroundService(cfg)
    try:
        with _released(held):
            assert _stream(bg.service, scan, "a")["state"] == "finished"
            with held_open(result, "r+"):
                held.pop().__exit__(None, None, None)  # the spool's holder lets go
                n = len(tries)
                wait_for(lambda: len(tries) > n + 1, 60, "two passes while the result is held")
                assert spool.exists() and pending_marker(spool).exists()
        wait_for(lambda: not pending_marker(spool).exists(), 60, "the copy once the result is let go")
        assert _raw_count(result) == len(scan.frames)
        assert not spool.exists()
    finally:
        bg.stop()


def test_a_copy_of_the_directories_with_a_pending_copy_leaves_the_originals_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The spool and results directories copied elsewhere (a backup restored, a migration) while a
    raw copy is pending: the copy's marker names the original result, which waits for the
    original spool. Before, a daemon started on the copy wrote the copy's frames into the
    original result and deleted the copy's spool (its result left without frames); now it
    refuses by name and keeps both, and the original's own start still completes its copy."""
    import shutil

    from cryoptycho.daemon.service import BackgroundService
    from daemon_support import loopback_config, synthetic_scan, wait_for

    held: list[Any] = []
    _hold_finish_of(monkeypatch, held, {"a"})
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path / "orig", refine_time_budget_s=2)
    with _released(held):
        bg = BackgroundService(cfg)
        try:
            assert _stream(bg.service, scan, "a")["state"] == "finished"
        finally:
            bg.stop()
    monkeypatch.undo()
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    copy = loopback_config(tmp_path / "copy", refine_time_budget_s=2)
    bg = BackgroundService(copy)
    try:
        wait_for(lambda: _tried(caplog, pending_marker(copy.spool_dir / "a.spool.h5")), 60,
                 "the pass over the pending copies")
    finally:
        bg.stop()
    for where in (cfg, copy):
        with h5py.File(where.results_dir / "a.h5", "r") as f:
            assert "raw" not in f
        assert pending_marker(where.spool_dir / "a.spool.h5").exists()
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "copy of the spool" in r.getMessage()]
    assert said and str(copy.spool_dir / "a.spool.h5") in said[0], said
    bg = BackgroundService(cfg)
    try:
        wait_for(lambda: not pending_marker(cfg.spool_dir / "a.spool.h5").exists(), 60, "the original's copy")
    finally:
        bg.stop()
    assert _raw_count(cfg.results_dir / "a.h5") == len(scan.frames)


def test_a_raw_copy_that_finds_the_disk_full_is_tried_again_once_there_is_room(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The holder lets go while the results disk is full (the copy would go below
    disk_reserve_bytes): before, that copy was given up until the daemon's next start, though
    the operator freed the disk minutes later. Now it is tried again (every RAW_FAILED_RETRY_S),
    the failure logged once, not at every try."""
    import cryoptycho.daemon.scans as scans_module
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage import rawcopy
    from daemon_support import loopback_config, synthetic_scan, wait_for

    monkeypatch.setattr(scans_module, "RAW_FAILED_RETRY_S", 0.2, raising=False)  # (absent before)
    monkeypatch.setattr(scans_module, "RAW_RETRY_S", 0.2)
    full = [True]
    require = rawcopy.require_free_space

    def free_space(directory: Any, nbytes: int, reserve_bytes: int, what: str) -> None:
        # the results disk full (what a full disk's statvfs says): the finish's result was written
        # before; the free bytes the message gives differ at every try, as on a busy disk
        full.append(False)
        require(directory, nbytes, 2**62 + len(full) * 2**20 if full[0] and "raw frames" in what else reserve_bytes,
                what)

    monkeypatch.setattr(rawcopy, "require_free_space", free_space)
    tries: list[Any] = []
    complete = scans_module.complete_raw_copy

    def counted(*args: Any, **kwargs: Any) -> bool:
        try:
            tries.append(complete(*args, **kwargs))
        except OSError as exc:
            tries.append(exc)
            raise
        return tries[-1]

    monkeypatch.setattr(scans_module, "complete_raw_copy", counted)
    held: list[Any] = []
    _hold_finish_of(monkeypatch, held, {"a"})
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2)
    spool = cfg.spool_dir / "a.spool.h5"
    bg = BackgroundService(cfg)
    try:
        with _released(held):
            assert _stream(bg.service, scan, "a")["state"] == "finished"
        wait_for(lambda: sum(isinstance(t, OSError) for t in tries) >= 3, 60, "three tries on the full disk")
        assert spool.exists() and pending_marker(spool).exists()
        full[0] = False  # the operator freed the disk
        wait_for(lambda: not pending_marker(spool).exists(), 60, "the copy once there is room")
        assert _raw_count(cfg.results_dir / "a.h5") == len(scan.frames)
    finally:
        bg.stop()
    said = [r.getMessage() for r in caplog.records if "cannot copy the raw frames" in r.getMessage()]
    assert len(said) == 1 and "no space for the raw frames of a.h5" in said[0], said


@pytest.mark.parametrize("text", ["", "{\"scan_id\": \"a\"", "[1, 2]"])
def test_a_damaged_marker_is_named_with_its_spool_and_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, text: str) -> None:
    """A marker emptied, cut short or overwritten: it still keeps its spool from recovery, and
    nothing copies the frames. Before, the log said only "not a raw-pending marker …; it is left
    as it is", nothing of the spool it holds back or how to release it."""
    from cryoptycho.daemon.service import BackgroundService
    from daemon_support import loopback_config, synthetic_scan

    held: list[Any] = []
    _hold_finish_of(monkeypatch, held, {"a"})
    cfg = loopback_config(tmp_path, refine_time_budget_s=2)
    with _released(held):
        bg = BackgroundService(cfg)
        try:
            assert _stream(bg.service, synthetic_scan(n_side=4, m=32), "a")["state"] == "finished"
        finally:
            bg.stop()
    monkeypatch.undo()
    marker = pending_marker(cfg.spool_dir / "a.spool.h5")
    marker.write_text(text)
    caplog.clear()
    bg = BackgroundService(cfg)
    try:
        assert "a" not in bg.service.scans.sessions and not bg.service.scans.raw_pending()
    finally:
        bg.stop()
    said = [r.getMessage() for r in caplog.records if str(marker) in r.getMessage() and r.levelname == "ERROR"]
    assert said and "a.spool.h5: neither recovered nor copied" in said[0] and "or remove it" in said[0], said
    assert marker.read_text() == text and (cfg.spool_dir / "a.spool.h5").exists()


def test_a_marker_left_by_a_removed_spool_does_not_keep_a_new_scan_of_its_id_from_recovery(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator removes a pending scan's spool and result while the daemon runs (``rm
    *.spool.h5`` leaves the markers); once the daemon no longer lists that scan its id is free,
    and a new scan takes it. Before, the old marker stayed beside the new scan's spool: stopped
    before its end, that scan was not recovered at the next start (taken for the old scan's
    frames, waiting for a result that is gone)."""
    import cryoptycho.daemon.scans as scans_module
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.producer import Producer
    from daemon_support import loopback_config, synthetic_scan, wait_for

    monkeypatch.setattr(scans_module, "HISTORY", 1)  # (256 scans later)
    held: list[Any] = []
    _hold_finish_of(monkeypatch, held, {"a"})
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2)
    spool = cfg.spool_dir / "a.spool.h5"
    bg = BackgroundService(cfg)
    try:
        with _released(held):
            assert _stream(bg.service, scan, "a")["state"] == "finished"
            for old in (spool, *cfg.results_dir.glob("a.*")):
                old.unlink()  # the operator's clean-up
        assert _stream(bg.service, scan, "b")["state"] == "finished"
        # (the ingest's declarations follow the history at the next housekeeping)
        wait_for(lambda: "a" not in bg.service.scans.sessions and "a" not in bg.service._declared, 60,
                 "scan a to leave the history")
        with Producer(bg.service.endpoints["ingest"], control=bg.service.endpoints["control"]) as p:
            p.start_scan(**scan.start_fields("a"))
            p.send_frames(scan.frames[:5])
            p.flush()  # held by the daemon; the scan stays open at the stop
    finally:
        bg.stop()
    assert spool.exists()
    monkeypatch.undo()
    bg = BackgroundService(cfg)
    try:
        session = bg.service.scans.sessions.get("a")
        assert session is not None and session.recovered, "the new scan a was not recovered"
        assert not pending_marker(spool).exists()
    finally:
        bg.stop()


def test_a_raw_copy_pending_event_is_clipped_as_every_error_event_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The raw_copy_pending event quotes the spool's and the result's paths: long directories
    made it 3,000+ characters, past the 2,048 that publish_error clips every error event to (it
    was posted to the outbox directly, past the clip). Read from what the publisher encodes."""
    import cryoptycho.daemon.service as service_module
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.messages import ErrorEvent
    from daemon_support import loopback_config, synthetic_scan

    sent: list[ErrorEvent] = []
    encode = service_module.encode_event

    def spy(message: Any) -> Any:
        if isinstance(message, ErrorEvent):
            sent.append(message)
        return encode(message)

    monkeypatch.setattr(service_module, "encode_event", spy)
    held: list[Any] = []
    _hold_finish_of(monkeypatch, held, {"long"})
    deep = Path(tmp_path, *["d" * 200] * 6)  # 1,200+ characters each (a path's own limit is 4,096)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2, spool_dir=deep / "s", results_dir=deep / "r")
    bg = BackgroundService(cfg)
    try:
        with _released(held):
            assert _stream(bg.service, synthetic_scan(n_side=4, m=32), "long")["state"] == "finished"
    finally:
        bg.stop()  # (the outbox is flushed before the stop returns)
    pending = [e for e in sent if e.rule == "raw_copy_pending"]
    assert len(pending) == 1, [(e.rule, len(e.message)) for e in sent]
    assert len(pending[0].message) <= 2048, len(pending[0].message)
    assert pending[0].message.endswith("…") and pending[0].scan_id == "long"
