"""A scan that finishes while another program holds its spool open for writing (an operator's
``h5py.File(spool, "r+")``: HDF5's exclusive lock). Before, the result's raw copy could not read
the spool and the whole scan failed after its reconstruction. Now the result is written without
``/raw`` (``/extra`` attr ``raw_pending`` names the spool), the spool is kept with every frame, and
the frames are copied into the result once that program lets go: by the running daemon, or by
the next start (storage/rawcopy.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from cryoptycho.daemon.scans import ScanManager
from cryoptycho.daemon.storage.rawcopy import pending_marker
from cryoptycho.daemon.storage.spool import journal_path, read_spool
from spool_support import held_open


def _hold_at_finish(monkeypatch: pytest.MonkeyPatch, held: list[Any]) -> None:
    """finish_result runs with the scan's spool held for writing by another process; the hold
    lasts until the test lets go (``held[0].__exit__``)."""
    finish = ScanManager.finish_result

    def finish_held(self: ScanManager, session: Any, state: Any) -> dict[str, str]:
        from cryoptycho.daemon.storage.spool import spool_path

        hold = held_open(spool_path(self.config.spool_dir, session.scan_id), "r+")
        hold.__enter__()
        held.append(hold)
        return finish(self, session, state)

    monkeypatch.setattr(ScanManager, "finish_result", finish_held)


@contextmanager
def _released(held: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        while held:
            held.pop().__exit__(None, None, None)


def _stream(svc: Any, scan: Any, scan_id: str) -> dict[str, Any]:
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import wait_for

    with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
          Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p):
        p.start_scan(**scan.start_fields(scan_id))
        p.send_frames(scan.frames)
        p.end_scan()
        return wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == scan_id
                                      and s["state"] in ("finished", "failed")), None), 120, "the scan to end")


def _raw_count(result: Path) -> int:
    with h5py.File(result, "r") as f:
        return int(f["raw/entry_1/data_1"].attrs["count"])


def test_a_scan_finishing_while_its_spool_is_held_for_writing_is_written_and_gets_its_frames_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from cryoptycho.daemon.service import BackgroundService
    from daemon_support import loopback_config, synthetic_scan, wait_for

    held: list[Any] = []
    _hold_at_finish(monkeypatch, held)
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2)
    bg = BackgroundService(cfg)
    spool = cfg.spool_dir / "held.spool.h5"
    result = cfg.results_dir / "held.h5"
    try:
        with _released(held):
            done = _stream(bg.service, scan, "held")
            # before: failed ("unable to lock file"), its reconstruction lost
            assert done["state"] == "finished", done
            with h5py.File(result, "r") as f:
                assert "raw" not in f and f["extra"].attrs["raw_pending"] == str(spool.absolute())
                assert f["object"].shape[0] > 0
            assert spool.exists() and pending_marker(spool).exists()
            warned = [r.getMessage() for r in caplog.records if "written without its raw frames" in r.getMessage()]
            assert warned and str(spool.absolute()) in warned[0], warned
        # the holder closed the spool: the running daemon copies the frames and retires the spool
        wait_for(lambda: not pending_marker(spool).exists(), 60, "the pending raw copy")
        assert _raw_count(result) == len(scan.frames)
        with h5py.File(result, "r") as f:
            assert "raw_pending" not in f["extra"].attrs
            assert f["raw/entry_1/data_1/data"].shape[0] >= len(scan.frames)
            np.testing.assert_array_equal(np.sort(f["probe_position_indexes"][()]), np.arange(len(scan.frames)))
        assert not spool.exists()  # keep_spool off: retired as at a finish
    finally:
        bg.stop()


def test_a_raw_copy_still_pending_at_the_stop_is_done_by_the_next_start_without_reconstructing_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from cryoptycho.daemon.service import BackgroundService
    from daemon_support import loopback_config, synthetic_scan, wait_for

    held: list[Any] = []
    _hold_at_finish(monkeypatch, held)
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2, keep_spool=True)
    spool = cfg.spool_dir / "later.spool.h5"
    result = cfg.results_dir / "later.h5"
    with _released(held):
        bg = BackgroundService(cfg)
        try:
            assert _stream(bg.service, scan, "later")["state"] == "finished"
        finally:
            bg.stop()
        stopped = [r.getMessage() for r in caplog.records if "the next start copies them" in r.getMessage()]
        assert stopped and "later.spool.h5" in stopped[0], stopped
        # the journal stays beside the held spool, a second copy of its frames, until the copy
        assert journal_path(spool).exists() and pending_marker(spool).exists()
        with h5py.File(result, "r") as f:
            written = f.attrs["created_utc"], f["object"][()]
    monkeypatch.undo()
    bg = BackgroundService(cfg)
    try:
        wait_for(lambda: not pending_marker(spool).exists(), 60, "the pending raw copy at the start")
        assert _raw_count(result) == len(scan.frames)
        assert "later" not in {s.scan_id for s in bg.service.scans.sessions.values()}  # not recovered as a scan
        with h5py.File(result, "r") as f:
            assert f.attrs["created_utc"] == written[0]
            np.testing.assert_array_equal(f["object"][()], written[1])
        got = read_spool(spool)  # keep_spool: kept, marked finished
        assert got.status == "finished" and len(got.indices) == len(scan.frames)
        assert not journal_path(spool).exists()  # (the copy done, the file holds all of it)
    finally:
        bg.stop()


def test_status_lists_a_result_waiting_for_its_raw_frames_until_the_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``status`` names each result that lacks its raw frames and the spool that holds them (the
    spool directory's only explanation was the hidden marker file); gone once they are copied."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient
    from daemon_support import loopback_config, synthetic_scan, wait_for

    held: list[Any] = []
    _hold_at_finish(monkeypatch, held)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2)
    spool, result = cfg.spool_dir / "st.spool.h5", cfg.results_dir / "st.h5"
    bg = BackgroundService(cfg)
    try:
        with ControlClient(bg.service.endpoints["control"], timeout_s=30) as ctl:
            with _released(held):
                assert _stream(bg.service, synthetic_scan(n_side=4, m=32), "st")["state"] == "finished"
                status = ctl.call("status")
                assert status["raw_pending_total"] == 1, status
                assert status["raw_pending"] == {"st": {"spool": str(spool.absolute()), "result": str(result.absolute()),
                                                        "last_failure": None}}, status["raw_pending"]
            wait_for(lambda: not pending_marker(spool).exists(), 60, "the pending raw copy")
            status = ctl.call("status")
            assert status["raw_pending"] == {} and status["raw_pending_total"] == 0, status
    finally:
        bg.stop()
