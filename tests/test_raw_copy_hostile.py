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
        bg.service.scans.retry_raw_copies()
        bg.service.scans.flush_disk()
        from daemon_support import wait_for

        wait_for(lambda: not bg.service.scans.raw_pending(), 60, "the pass over the pending copies")
    finally:
        bg.stop()
    assert spool_a.exists() and marker.exists()
    with h5py.File(cfg.results_dir / "a.h5", "r") as f:
        assert "raw" not in f
    assert _raw_count(cfg.results_dir / "b.h5") == frames_b
    said = [r.getMessage() for r in caplog.records if "a.spool.h5" in r.getMessage() and r.levelname == "ERROR"]
    assert said and "b.h5" in said[-1] and "'a'" in said[-1], said
