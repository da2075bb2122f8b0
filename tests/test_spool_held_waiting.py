"""A scan that ended while it waited for a worker (its spool closed, "parked") meets another
program holding that spool open for writing when its turn comes — an operator's
``h5py.File(spool, "r+")``, a real second process (HDF5's locks are between processes). Before,
the worker's re-open of the spool was refused and the scan failed, every frame on disk. Now it
waits, said once (log and an ``error`` event, rule ``spool_in_use``), and starts once that program
lets go; the result holds every frame."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import pytest
from spool_support import gate_finish, held_open, park_behind, scan_ended, scan_state


@pytest.mark.parametrize("taken_after_the_look", [False, True], ids=["held-at-its-turn", "taken-after-admission"])
def test_a_waiting_scans_spool_held_for_writing_delays_the_scan_and_fails_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        taken_after_the_look: bool) -> None:
    """``taken_after_the_look``: the program takes the file after admission looked (the look
    is made to see no holder): the worker's re-open on the spool thread meets it, and is asked
    again until that program lets go."""
    import cryoptycho.daemon.scans as scans_module
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import loopback_config, synthetic_scan, wait_for

    # a's finish waits until the holder has the spool of b: b's turn comes after that, whatever the load
    go = gate_finish(monkeypatch, "a")  # b ends while a runs: it waits parked
    if taken_after_the_look:
        # (admission's look takes a shared lock that keeps a writer out until the re-open: only
        # where the file system has no flock does a writer get in between; as there, it sees none)
        monkeypatch.setattr(scans_module, "hold_against_writers", lambda path: None)
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2, max_concurrent_scans=1)
    spool = cfg.spool_dir / "b.spool.h5"
    bg = BackgroundService(cfg)
    svc = bg.service

    def waits() -> bool:
        return any("scan 'b' waits" in r.getMessage() for r in caplog.records)

    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p):
            park_behind(p, svc, scan)  # b ends while a runs: its spool closed, waiting
            with held_open(spool, "r+"):
                go.set()
                # a's end makes b's turn: before, b failed here (its spool's re-open refused)
                assert scan_ended(ctl, "a")["state"] == "finished"
                wait_for(lambda: waits() or scan_state(ctl, "b") == "failed", 60, "b's turn")
                assert scan_state(ctl, "b") != "failed", next(s for s in ctl.list_scans() if s["scan_id"] == "b")
                assert waits()
            done: dict[str, Any] = scan_ended(ctl, "b")  # the holder let go: b starts
            assert done["state"] == "finished", done
    finally:
        go.set()
        bg.stop()
    with h5py.File(cfg.results_dir / "b.h5", "r") as f:
        assert int(f["raw/entry_1/data_1"].attrs["count"]) == len(scan.frames)
    said = [r.getMessage() for r in caplog.records if "scan 'b' waits" in r.getMessage()]
    assert len(said) == 1 and str(spool) in said[0] and "open for writing in another program" in said[0], said


def test_a_scan_waiting_for_its_held_spool_at_a_stop_is_finished_by_the_next_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The daemon stops while the scan waits for the other program: it stays ``ended`` in the
    spool with its journal, and the next start (the holder gone) reconstructs it whole."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import journal_path
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
                bg.stop()
    finally:
        go.set()
        bg.stop()
    assert spool.exists() and journal_path(spool).exists()
    bg = BackgroundService(cfg)
    try:
        with ControlClient(bg.service.endpoints["control"], timeout_s=30) as ctl:
            assert scan_ended(ctl, "b")["state"] == "finished"
    finally:
        bg.stop()
    with h5py.File(cfg.results_dir / "b.h5", "r") as f:
        assert int(f["raw/entry_1/data_1"].attrs["count"]) == len(scan.frames)
    assert not spool.exists()
