"""Leftovers QA found at the stop and start (helper svc10): the stop's report and the raw-copy
passes logged one line per item with no bound (5,000 pending raw copies with 3 kB paths: 146 MB of
log from one stop and its failed retries); the examination of a spool a start found held for
writing, once let go of, queued behind a raw copy (minutes for a detector's spool); and the stop
named such a spool among those it "could not recover" while it waited for its writer."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from spool_support import held_open, small_spool

#: pending raw copies of the flood: ten times the most a pass names one by one
N_PENDING = 200


def _long_result(results_dir: Path, i: int) -> Path:
    """A result path of ≈ 3 kB (nested directories: a component holds at most 255 bytes)."""
    return results_dir.joinpath(*[f"{i:04d}" + "d" * 250] * 12, f"r{i}.h5")


def test_a_stop_with_hundreds_of_failing_raw_copies_logs_a_bounded_report(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Markers of results that wait for their raw frames, whose copies fail (the spool is no HDF5
    file): the start, the retry pass and the stop each named every one, with its two paths (and
    the failure with its traceback). Now the first few are named and the rest counted."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.rawcopy import mark_pending
    from daemon_support import loopback_config, wait_for

    cfg = loopback_config(tmp_path)
    cfg.spool_dir.mkdir(parents=True)
    for i in range(N_PENDING):
        spool = cfg.spool_dir / f"p{i}.spool.h5"
        spool.write_bytes(b"not an HDF5 file")
        mark_pending(spool, f"p{i}", _long_result(cfg.results_dir, i))
    caplog.set_level(logging.INFO)
    bg = BackgroundService(cfg)
    try:
        scans = bg.service.scans
        wait_for(lambda: all(scans.raw_failure(f"p{i}") is not None for i in range(N_PENDING)), 120,
                 "every copy to have failed once")
    finally:
        bg.stop()
    records = [r for r in caplog.records if "raw" in r.getMessage()]
    text = sum(len(r.getMessage()) + len(r.exc_text or "") for r in records)
    # before: ≈ 3 lines of two 3 kB paths per pending copy (start, failed copy, stop): ≈ 4 MB
    assert text < 600_000, (text, len(records))
    from cryoptycho.daemon.logs import LOG_ITEMS_MAX

    assert len(records) < 3 * (LOG_ITEMS_MAX + 2), len(records)
    said = [r.getMessage() for r in records]
    # each count is said: at the start, in the failed pass, at the stop
    assert any(f"{N_PENDING - LOG_ITEMS_MAX} more results still lack their raw frames" in m for m in said), said
    assert any(f"{N_PENDING - LOG_ITEMS_MAX} more raw copies failed" in m for m in said), said
    stop = [m for m in said if m.startswith(f"{N_PENDING} results lack their raw frames")]
    # (the first named within the line's budget of characters: two of these 6 kB entries)
    more = re.search(r"… and (\d+) more$", stop[0]) if len(stop) == 1 else None
    assert more is not None and int(more[1]) >= N_PENDING - LOG_ITEMS_MAX, said


def _manager(tmp_path: Path) -> Any:
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.metrics import ServiceMetrics
    from cryoptycho.daemon.publisher import Outbox
    from cryoptycho.daemon.scans import ScanManager

    cfg = ServiceConfig(spool_dir=tmp_path / "s", results_dir=tmp_path / "r", refine_time_budget_s=2)
    return ScanManager(cfg, ServiceMetrics(), Outbox())


def test_a_held_spool_let_go_of_is_recovered_while_a_raw_copy_takes_long(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start finds a spool held for writing; a pending raw copy (a detector spool's: minutes)
    is under way when the holder lets go. Before, the spool's examination queued behind the
    copy on the raw-copy thread, its scan unrecovered until the copy was over."""
    from cryoptycho.daemon import scans
    from cryoptycho.daemon.storage.rawcopy import mark_pending
    from daemon_support import wait_for

    copying, release = threading.Event(), threading.Event()

    def long_copy(*_: Any, **__: Any) -> bool:
        copying.set()
        assert release.wait(120)
        return False

    monkeypatch.setattr(scans, "complete_raw_copy", long_copy)
    monkeypatch.setattr(scans, "RAW_RETRY_S", 0.0)
    (tmp_path / "s").mkdir()
    spool = small_spool(tmp_path / "s", "held", "ended")
    other = tmp_path / "s" / "copied.spool.h5"
    other.write_bytes(b"")
    mark_pending(other, "copied", tmp_path / "r" / "copied.h5")
    with held_open(spool, "r+"):
        manager = _manager(tmp_path)
        try:
            manager.load_raw_pending()
            assert manager.recover() == []  # held: waits for its writer
            manager.retry_raw_copies()
            assert copying.wait(60), "the raw copy did not start"
        except BaseException:
            release.set()
            manager.close()
            raise
    try:
        recovered: list[str] = []
        # (before: never, until the copy was let go of; the wait's limit fails the test)
        wait_for(lambda: recovered.extend(manager.retry_held_recoveries()) or recovered, 60,
                 "the scan of the spool let go of to be recovered while the copy goes on")
        assert recovered == ["held"] and not release.is_set()
    finally:
        release.set()
        manager.interrupt(ended_too=True)
        for worker in list(manager.running.values()):
            worker.thread.join(60)
        manager.close()


def test_the_stops_report_says_a_held_spool_waits_for_its_writer(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Stopped while a spool found held at the start still waits for the program that holds it:
    before, the report listed it among the spools this daemon "could not recover" (the reasons
    logged at the start), as if it had been refused; it waits for the writer to close it."""
    from cryoptycho.daemon.service import BackgroundService
    from daemon_support import loopback_config

    cfg = loopback_config(tmp_path)
    cfg.spool_dir.mkdir(parents=True)
    spool = small_spool(cfg.spool_dir, "held", "ended")
    with held_open(spool, "r+"):
        bg = BackgroundService(cfg)
        bg.stop()
    said = [r.getMessage() for r in caplog.records if "held.spool.h5" in r.getMessage()]
    assert not [m for m in said if "could not recover" in m], said
    report = [m for m in said if "unfinished spool files stay in" in m]
    assert len(report) == 1 and "open for writing in another program" in report[0], said
    assert "recovers them once it has" in report[0], report


def test_a_start_and_stop_beside_hundreds_of_unrecoverable_spools_log_bounded_lists(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Spool files a start cannot recover (not HDF5 here): a line each at the start, and the
    stop's report listed every name in one line. Now the first few, then a count."""
    from cryoptycho.daemon.service import BackgroundService
    from daemon_support import loopback_config

    cfg = loopback_config(tmp_path)
    cfg.spool_dir.mkdir(parents=True)
    names = [f"{i:04d}{'u' * 200}" for i in range(N_PENDING)]
    for name in names:
        (cfg.spool_dir / f"{name}.spool.h5").write_bytes(b"not an HDF5 file")
    caplog.set_level(logging.INFO)
    BackgroundService(cfg).stop()
    said = [r.getMessage() for r in caplog.records]
    each = [m for m in said if m.startswith("cannot recover spool")]
    assert 0 < len(each) < N_PENDING // 4, len(each)  # before: one per spool
    assert any(f"{N_PENDING - len(each)} more spools this daemon cannot recover" in m for m in said), said[-5:]
    stop = [m for m in said if "could not recover stay in" in m]
    assert len(stop) == 1 and sum(name in stop[0] for name in names) < N_PENDING // 4, stop
    more = re.search(r"… and (\d+) more$", stop[0])
    assert more is not None and int(more[1]) + sum(name in stop[0] for name in names) == N_PENDING, stop


def _errors(manager: Any) -> list[dict[str, Any]]:
    return [payload for topic, payload in manager.outbox.take() if topic == "error"]


def test_a_start_beside_hundreds_of_unrecoverable_spools_publishes_a_bounded_number_of_events(
        tmp_path: Path) -> None:
    """Each spool a start could not recover posted an error event of its own: 1,000 bad spools,
    1,000 events at once (subscribers' queues hold 64: most were dropped, unseen). Now the first
    LOG_ITEMS_MAX each have their own, as their log lines do, and one event names and counts the
    rest."""
    from cryoptycho.daemon.logs import LOG_ITEMS_MAX

    (tmp_path / "s").mkdir()
    names = [f"bad{i:04d}" for i in range(N_PENDING)]
    for name in names:
        (tmp_path / "s" / f"{name}.spool.h5").write_bytes(b"not an HDF5 file")
    manager = _manager(tmp_path)
    try:
        assert manager.recover() == []
        errors = _errors(manager)
    finally:
        manager.close()
    assert all(e["rule"] == "recoverable_spool" and e["field"] == "spool" for e in errors), errors[:2]
    assert len(errors) == LOG_ITEMS_MAX + 1, len(errors)  # before: N_PENDING
    each, summary = errors[:-1], errors[-1]["message"]
    assert all(e["message"].startswith(str(tmp_path / "s")) for e in each), each[:2]
    rest = N_PENDING - LOG_ITEMS_MAX
    assert summary.startswith(f"{rest} more spool files in {tmp_path / 's'} cannot be recovered"), summary
    named_here = [n for n in names if f"{n}.spool.h5" in summary]
    more = re.search(r"… and (\d+) more", summary)
    assert named_here and more is not None and len(named_here) + int(more[1]) == rest, summary
    # every spool accounted for: the ones with their own event are not named again
    assert not [n for n in named_here if any(n in e["message"] for e in each)]
    assert f"{rest} × " in summary and "tried again at every start" in summary, summary
    assert len(manager.unrecovered) == N_PENDING


_HOLD_ALL = """
import sys, h5py
files = [h5py.File(p, "r+") for p in sys.argv[1:]]
print("open", flush=True)
sys.stdin.readline()
for f in files:
    f.close()
"""


def test_a_start_beside_many_spools_held_for_writing_publishes_a_bounded_number_of_events(
        tmp_path: Path) -> None:
    """As above for the spools a start finds open for writing in another program (each waits for
    it): one event each for the first LOG_ITEMS_MAX, then one for the rest."""
    import subprocess
    import sys

    from cryoptycho.daemon.logs import LOG_ITEMS_MAX

    (tmp_path / "s").mkdir()
    held = LOG_ITEMS_MAX + 5
    spools = [small_spool(tmp_path / "s", f"held{i:02d}", "ended") for i in range(held)]
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_ALL, *map(str, spools)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        manager = _manager(tmp_path)
        try:
            assert manager.recover() == []
            errors = _errors(manager)
        finally:
            manager.close()
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        assert holder.wait(30) == 0
    assert all(e["rule"] == "spool_in_use" for e in errors), errors[:2]
    assert len(errors) == LOG_ITEMS_MAX + 1, len(errors)  # before: one per spool
    summary = errors[-1]["message"]
    assert summary.startswith(f"5 more spool files in {tmp_path / 's'} are open for writing"), summary
    assert sum(f"{p.name}" in summary for p in spools) == 5, summary
    assert "recovered once that program closes it" in summary, summary
