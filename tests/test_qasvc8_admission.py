"""Hostile QA of svc8's look at a parked scan's spool at admission (``held_for_writing``).

A scan that ended while it waited for a worker (its spool closed, "parked") has its spool looked
at when its turn comes: does another program hold it for writing? That look opened the file. Where
the file could not be opened at all — removed by hand (``rm *.spool.h5`` while scans wait), or
unreadable — the ``open`` raised out of ``admit``, at every housekeeping pass and at every other
scan's ``scan_end`` and ``scan_start`` (both admit): the queue behind it never moved again, and the
scans whose end or start came meanwhile failed as ingest faults. The look is a question about a
lock: a file that cannot be opened is not held, and the worker's re-open says what is wrong with
it, failing that one scan (as before svc8)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from spool_support import gate_finish, park_behind, scan_ended


def test_a_parked_scans_removed_spool_fails_that_scan_and_the_queue_moves_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import loopback_config, synthetic_scan

    go = gate_finish(monkeypatch, "a")  # b ends while a runs: it waits parked
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2, max_concurrent_scans=1)
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p):
            park_behind(p, svc, scan)  # b ends while a runs: its spool closed, waiting
            (cfg.spool_dir / "b.spool.h5").unlink()  # an operator's rm
            go.set()
            assert scan_ended(ctl, "a")["state"] == "finished"
            # b's turn: before, admit raised FileNotFoundError here, at every pass, and b waited for ever
            b = scan_ended(ctl, "b")
            assert b["state"] == "failed", b
            # and a scan queued after it runs to its end (before, its scan_end's admit raised: it failed)
            p.start_scan(**scan.start_fields("c"))
            p.send_frames(scan.frames)
            p.end_scan()
            c = scan_ended(ctl, "c")
            assert c["state"] == "finished", c
    finally:
        go.set()
        bg.stop()
    assert (cfg.results_dir / "c.h5").exists()


def test_a_writer_cannot_take_an_admitted_scans_spool_before_its_reopen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Admission looked at the parked spool (no writer) and started the scan; its re-open runs
    later, on the spool thread, behind other scans' appends. A program that opened the file for
    writing in between was let in: the started scan then waited for it, keeping its worker slot
    — with ``max_concurrent_scans = 1`` every other scan waited too, for as long as an operator
    kept HDFView open — while the daemon said that the scans queued behind it started meanwhile.
    Now admission's look keeps its shared lock until the re-open, which is made under it: the
    writer is refused (as beside any spool the daemon has open), and no reader is named."""
    from cryoptycho.daemon.scans import ScanManager
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import loopback_config, synthetic_scan
    from spool_support import try_open

    go, admitted, reopen = threading.Event(), threading.Event(), threading.Event()
    finish, unpark = ScanManager.finish_result, ScanManager._unpark

    def finish_gated(self: ScanManager, session: Any, state: Any) -> dict[str, str]:
        if session.scan_id == "a":
            assert go.wait(120)
        return finish(self, session, state)

    def unpark_gated(self: ScanManager, scan_id: str, parked: Any) -> Any:
        if scan_id == "b":  # the spool thread's re-open of b, held back: the window after admission
            admitted.set()
            assert reopen.wait(120)
        return unpark(self, scan_id, parked)

    monkeypatch.setattr(ScanManager, "finish_result", finish_gated)
    monkeypatch.setattr(ScanManager, "_unpark", unpark_gated)
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2, max_concurrent_scans=1)
    spool = cfg.spool_dir / "b.spool.h5"
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p):
            park_behind(p, svc, scan)  # b ends while a runs: its spool closed, waiting
            go.set()
            assert scan_ended(ctl, "a")["state"] == "finished"
            assert admitted.wait(120)  # b started, its re-open not made yet
            # before: "open" — and b, started, then waited for that program, keeping the only slot
            assert try_open(spool, "r+") == "refused"
            assert try_open(spool, "r") == "open"  # readers are let in, as beside any closed spool
            reopen.set()
            b = scan_ended(ctl, "b")
            assert b["state"] == "finished", b
    finally:
        go.set()
        reopen.set()
        bg.stop()
    assert not [r.getMessage() for r in caplog.records if "another process has" in r.getMessage()]
    assert not [r.getMessage() for r in caplog.records if "waits: its spool" in r.getMessage()]


def test_two_held_parked_scans_start_in_the_order_let_go_of_and_a_free_one_goes_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """b and c parked, each spool held ``"r+"`` by another process, d free behind them (one
    slot): d runs meanwhile; c, let go of first, starts; b, let go of after, too — every held
    scan starts once released, none is starved, each wait said once."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import loopback_config, synthetic_scan, wait_for
    from spool_support import held_open, scan_state

    go = gate_finish(monkeypatch, "a")  # b ends while a runs: it waits parked
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2, max_concurrent_scans=1)
    bg = BackgroundService(cfg)
    svc = bg.service

    def waits(scan_id: str) -> int:
        return sum(f"scan '{scan_id}' waits" in r.getMessage() for r in caplog.records)

    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p):
            for scan_id in ("a", "b", "c", "d"):
                p.start_scan(**scan.start_fields(scan_id))
                p.send_frames(scan.frames)
                p.end_scan()
            wait_for(lambda: all((closed := svc.scans._parked.get(s)) is not None and closed.is_set()
                                 for s in "bcd"), 60, "b, c and d to wait with their spools closed")
            with held_open(cfg.spool_dir / "b.spool.h5", "r+"):
                with held_open(cfg.spool_dir / "c.spool.h5", "r+"):
                    go.set()
                    assert scan_ended(ctl, "d")["state"] == "finished"  # passed b and c
                    assert waits("b") == 1 and waits("c") == 1
                    assert scan_state(ctl, "b") == scan_state(ctl, "c") == "announced"  # (no worker yet)
                assert scan_ended(ctl, "c")["state"] == "finished"
                assert scan_state(ctl, "b") == "announced"
            assert scan_ended(ctl, "b")["state"] == "finished"
    finally:
        go.set()
        bg.stop()
    assert waits("b") == 1 and waits("c") == 1
