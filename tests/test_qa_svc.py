"""Second-wave QA of the svcfix merge (534cad2): set_options kept with a running scan's spool,
bounded control replies, the idle malloc_trim, the stop-signal rule."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.storage import journal as journal_module
from cryoptycho.daemon.storage.journal import journal_path, scan_records
from cryoptycho.daemon.storage.spool import SpoolWriter, read_spool, repair_spool

SIDE = 32


def _spool(tmp_path: Path, fsync: bool) -> SpoolWriter:
    spec = ScanSpec(scan_id="torn", frame_shape=(SIDE, SIDE), frame_dtype="uint32", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((SIDE, SIDE), np.complex64), expected_frames=None)
    return SpoolWriter.create(tmp_path, spec, fsync=fsync)


def _append(w: SpoolWriter, k: int, n: int) -> None:
    frames = (np.arange(n * SIDE * SIDE, dtype=np.uint32).reshape(n, SIDE, SIDE) + k) % 7
    w.append(frames, np.arange(k, k + n), np.zeros((n, 2)))


@pytest.mark.parametrize("fault", ["write_cut_short", "fsync_fails"])
def test_frames_appended_after_a_failed_options_record_are_recovered(tmp_path, monkeypatch, fault):
    """set_options on a scan that goes on receiving (running, or waiting and still acquiring)
    answers a disk fault as "not kept" (rule kept_with_scan) and the scan goes on. The failed
    options record could leave bytes in the journal (ENOSPC or EDQUOT part way through it; a
    failed fsync of a whole one): the frames appended after it, acknowledged, were behind a
    record a reader stops at — the spool's close failed ("its journal cannot be read back") and
    its rebuild from the journal dropped them. A whole record whose fsync failed stayed, and
    the restart ran the scan with the options the answer had said were not kept."""
    w = _spool(tmp_path / "s", fsync=fault == "fsync_fails")
    _append(w, 0, 8)
    real_writev, real_fsync = os.writev, os.fsync

    def cut_short(fd, views):  # part of the record reaches the file, then the disk is full
        real_writev(fd, [bytes(views[0])[:5]])
        raise OSError(errno.ENOSPC, "No space left on device (test)")

    def fsync_fails(fd):
        raise OSError(errno.EIO, "Input/output error (test)")

    if fault == "write_cut_short":
        monkeypatch.setattr(journal_module.os, "writev", cut_short)
    else:
        monkeypatch.setattr(journal_module.os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="test"):
        w.set_options({"seed": 1})
    monkeypatch.setattr(journal_module.os, "writev", real_writev)
    monkeypatch.setattr(journal_module.os, "fsync", real_fsync)
    _append(w, 8, 8)  # acknowledged: the scan goes on after the answer "not kept"

    # a kill now: the copy of both files is what the next start finds
    killed = tmp_path / "killed"
    killed.mkdir()
    for p in (w.path, journal_path(w.path)):
        shutil.copy(p, killed / p.name)
    assert scan_records(journal_path(killed / w.path.name)).why is None
    repair_spool(killed / w.path.name)
    recovered = read_spool(killed / w.path.name, frames=False)
    assert sorted(recovered.indices.tolist()) == list(range(16))
    # answered "not kept: a restart recovers it with its earlier options", and so it does
    assert "seed" not in recovered.spec.options, recovered.spec.options

    w.close()  # the daemon's own close of the spool (journal-only appends brought into the file)
    assert sorted(read_spool(w.path, frames=False).indices.tolist()) == list(range(16))


def _config(tmp_path: Path, **extra):
    from cryoptycho.daemon.config import ServiceConfig

    return ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                         metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r",
                         resolution_interval_s=0, **extra)


def test_options_a_running_scan_is_given_must_fit_the_budget_its_restart_is_checked_against(tmp_path):
    """set_options on a running scan is kept with its spool, and a restart recovers the scan
    with them — checked against the memory budget there, as at scan_start. Nothing checked them
    when they were set: a running scan of 10⁵ frames told to take mini-batches of 65536 (≈8.2 GiB) was answered
    ok, and the next start refused to recover it ("cannot recover spool …: memory_budget"),
    leaving its acknowledged frames unreconstructed. Refused now as a waiting scan's are."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient, ControlError
    from cryoptycho.protocols.producer import Producer
    from daemon_support import synthetic_scan, wait_for

    scan = synthetic_scan(n_side=6, m=32)
    n = len(scan.frames)
    bg = BackgroundService(_config(tmp_path))
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as one):
            # a long scan, of which the first frames are in: ≈0.2 GiB of the 8 GiB budget
            one.start_scan(**scan.start_fields("long", expected_frames=100_000, positions_m=None))
            one.send_frames(scan.frames[: n // 2], indices=range(n // 2), positions_m=scan.positions[: n // 2])
            wait_for(lambda: ctl.status()["running"] == ["long"], 120, "the scan to run")
            wait_for(lambda: ctl.receipt("long")["frames"]["received"] == n // 2, 120, "its frames spooled")
            reserved = ctl.status()["memory_reserved_bytes"]["host"]
            with pytest.raises(ControlError) as info:
                ctl.set_options("long", {"stream": {"batch_size": 65536}})  # ≈8.2 GiB
            result = info.value.reply.result
            assert (result["field"], result["rule"]) == ("params.options", "memory_budget"), info.value.reply
            assert ctl.status()["memory_reserved_bytes"]["host"] == reserved  # nothing changed
            # a change that fits is taken (and kept with the spool, as before)
            assert ctl.set_options("long", {"seed": 7})["options"]["seed"] == 7
            one.scan = None  # stopped with the daemon: kept in the spool for the next start
    finally:
        bg.stop()

    bg = BackgroundService(_config(tmp_path, recover_wait_s=0.5))
    svc = bg.service
    try:
        assert not svc.scans.unrecovered, svc.scans.unrecovered
        with ControlClient(svc.endpoints["control"], timeout_s=30) as ctl:
            assert "long" in {s["scan_id"] for s in ctl.list_scans()}
    finally:
        bg.stop()


def test_memory_held_for_messages_no_scan_was_live_for_is_given_back_when_idle(tmp_path, monkeypatch):
    """The idle malloc_trim followed the scans seen live at a housekeeping turn (every 0.5 s):
    messages no live scan stood for — a refused scan's frames (a producer that sends on
    without reading the refusal), a scan over between two turns — were read into memory the
    daemon keeps (keep_message_memory), and were never given back: the daemon started
    "released", and nothing marked it busy again."""
    from cryoptycho.daemon import service as service_module
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.producer import Producer
    from daemon_support import synthetic_scan, wait_for

    trims: list[float] = []
    monkeypatch.setattr(service_module, "release_free_memory", lambda: trims.append(1.0) or True)
    scan = synthetic_scan(n_side=8, m=64)
    # every scan is refused (memory budget) before it is registered: no session is ever live
    bg = BackgroundService(_config(tmp_path, release_memory_idle_s=0.5, host_memory_budget_bytes=1 << 20))
    svc = bg.service
    try:
        if not svc._memory_kept:
            pytest.skip("not glibc: the daemon keeps no message memory")
        with Producer(svc.endpoints["ingest"], confirm=False) as one:
            one.start_scan(**scan.start_fields("refused"))
            one.send_frames(scan.frames)  # read, refused by name (unknown_scan), and freed
            one.scan = None
        dropped = svc.metrics.frames_dropped.labels(reason="unknown_scan")
        wait_for(lambda: dropped._value.get() == len(scan.frames), 60, "the refused frames to be read")
        wait_for(lambda: trims, 30, "the memory the refused messages took to be given back")
    finally:
        bg.stop()


def test_list_scans_stays_readable_when_every_remembered_scan_was_aborted_with_a_traceback(tmp_path):
    """The bound of list_scans counted summaries, not bytes: a producer's abort reason (up to
    4096 characters: a traceback, often) is kept twice in its scan's summary (end_reason,
    error), and the 256 ended scans the daemon remembers made a 2.1 MB reply that no client
    (watch, the viewer) could read (max_header_bytes 1 MiB). A control `cancel` took a reason
    of any length (up to the request's 2 MiB part limit), which one summary alone outgrew."""
    import threading
    from dataclasses import replace

    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.session import Session, State
    from cryoptycho.protocols.control import ControlClient, ControlError
    from cryoptycho.protocols.producer import Producer
    from daemon_support import synthetic_scan, wait_for

    scan = synthetic_scan(n_side=4, m=32)
    traceback = "Traceback (most recent call last):\n" + "  File \"acquire.py\", line 12, in step\n" * 200
    bg = BackgroundService(_config(tmp_path))
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as one):
            one.start_scan(**scan.start_fields("aborted-000"))
            one.abort(traceback)
            wait_for(lambda: ctl.receipt("aborted-000")["state"] == "aborted", 60, "the scan to be aborted")
            first = svc.scans.sessions["aborted-000"]
            assert len(first.error) >= 4000 and len(first.end_reason) >= 4000
            injected = threading.Event()

            def inject(_r, _e) -> None:  # on the manager thread: 255 more scans aborted alike
                for i in range(1, 256):
                    s = Session(replace(first.spec, scan_id=f"aborted-{i:03d}"), {"host": 0})
                    s.transition(State.ABORTED, error=first.error)
                    s.end_reason = first.end_reason
                    svc.scans.sessions[s.scan_id] = s
                injected.set()

            svc.scans.after_disk(lambda: None, inject)
            assert injected.wait(60)
            listed = ctl.call("list_scans")  # before: "header: 2150397 bytes exceed the limit"
            ids = [s["scan_id"] for s in listed["scans"]]
            assert listed["total"] == 256 and 0 < len(ids) < 256
            assert ids == [f"aborted-{i:03d}" for i in range(256 - len(ids), 256)]  # the newest, in order
            assert listed["scans"][-1]["error"] == first.error  # whole, not cut

            one.start_scan(**scan.start_fields("cancelled"))
            wait_for(lambda: ctl.receipt("cancelled")["state"] != "unknown", 60, "the scan to start")
            with pytest.raises(ControlError) as info:
                ctl.cancel("cancelled", "x" * 600_000)
            result = info.value.reply.result
            assert (result["field"], result["rule"]) == ("params.reason", "string_too_long"), info.value.reply
            with pytest.raises(ControlError) as info:
                ctl.call("cancel", scan_id="cancelled", reason=["not", "text"])
            assert info.value.reply.result["rule"] == "string_type", info.value.reply
            assert ctl.cancel("cancelled", traceback[:4096])["scan_id"] == "cancelled"
            one.scan = None
    finally:
        bg.stop()
