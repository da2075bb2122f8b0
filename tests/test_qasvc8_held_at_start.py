"""A start finds an unfinished scan's spool held open for writing by another program (an
operator's ``h5py.File(spool, "r+")`` left open over a restart). Before, it said "cannot recover
spool" and left the scan to the next start: every frame on disk, no result until someone
restarted the daemon. Now it says that it waits for that program (log and an ``error`` event,
rule ``spool_in_use``) and recovers the scan during the run once the program lets go."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
from spool_support import gate_finish, held_open, park_behind, scan_ended


def test_a_spool_held_for_writing_at_a_start_is_recovered_once_let_go_of(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import loopback_config, synthetic_scan, wait_for

    go = gate_finish(monkeypatch, "a")  # b ends while a runs: it waits parked
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2, max_concurrent_scans=1)
    spool = cfg.spool_dir / "b.spool.h5"
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p):
            park_behind(p, svc, scan)  # b ends while a runs: its spool closed, waiting
            with held_open(spool, "r+"):
                go.set()
                assert scan_ended(ctl, "a")["state"] == "finished"
                wait_for(lambda: any("scan 'b' waits" in r.getMessage() for r in caplog.records), 60, "b to wait")
                bg.stop()  # b stays ended in the spool
                caplog.clear()
                bg = BackgroundService(cfg)  # the program still holds b's spool
                svc = bg.service
                with ControlClient(svc.endpoints["control"], timeout_s=30) as ctl2:
                    assert "b" not in {s["scan_id"] for s in ctl2.list_scans()}
                    assert any(str(spool) in r.getMessage() and "open for writing in another program" in r.getMessage()
                               for r in caplog.records), [r.getMessage() for r in caplog.records]
            # the program let go: before, b stayed in the spool until the next start
            with ControlClient(svc.endpoints["control"], timeout_s=30) as ctl2:
                done = scan_ended(ctl2, "b")
                assert done["state"] == "finished", done
    finally:
        go.set()
        bg.stop()
    with h5py.File(cfg.results_dir / "b.h5", "r") as f:
        assert int(f["raw/entry_1/data_1"].attrs["count"]) == len(scan.frames)
    assert not spool.exists()


def test_the_real_daemon_stopped_while_a_held_spool_waits_then_recovers_it(tmp_path: Path) -> None:
    """`cryoptycho serve` (a subprocess) starts beside an ended spool another process holds
    open ``"r+"``; SIGTERM while it waits: a clean exit, the spool left as it was and named in
    the stop's report; the next start, the holder gone, finishes the scan."""
    from cryoptycho.protocols.control import ControlClient
    from daemon_support import start_daemon, wait_for
    from spool_support import small_spool

    (tmp_path / "spool").mkdir()
    spool = small_spool(tmp_path / "spool", "held", "ended")
    args = ("--set", "options.iterations=2", "--set", "refine_time_budget_s=2")
    with held_open(spool, "r+"):
        daemon = start_daemon(tmp_path, *args)
        try:
            wait_for(lambda: "open for writing in another program" in daemon.log(), 60, "the wait to be said", daemon)
        finally:
            assert daemon.stop() == 0, daemon.log()
        assert "held.spool.h5" in daemon.log().split("open for writing in another program", 1)[1], daemon.log()
    assert spool.exists()
    daemon = start_daemon(tmp_path, *args)
    try:
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            done = scan_ended(ctl, "held")
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert done["state"] == "finished", done
    assert not spool.exists()
