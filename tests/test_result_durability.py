"""A scan's spool is the only other copy of its frames: the daemon deletes it once the result
holds them. Before, the result was written (renamed into place) and the spool unlinked at once,
neither fsynced: a power loss before the page cache reached the disk could keep the unlink and
lose the result's data (or its rename) — the scan gone. Now the result's data is fsynced before
its rename, its directory after, and only then is the spool deleted (its directory fsynced
after that) — at a finish, and when a raw copy that waited for another program completes.

The order is read from the system calls themselves (``os.fsync``, ``os.replace``, ``os.unlink``
spied on, each fsync named by its descriptor's path), not from the daemon's own account."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from test_raw_copy_pending import _hold_at_finish, _released, _stream

Event = tuple[str, str, str]  # (call, path, second path of a rename or "")


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[Event]:
    """Every fsync (by the path of its descriptor), rename and unlink of this process, in order."""
    events: list[Event] = []
    lock = threading.Lock()
    fsync, replace, unlink = os.fsync, os.replace, os.unlink

    def note(*event: str) -> None:
        with lock:
            events.append(event)  # type: ignore[arg-type]

    def spy_fsync(fd: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        note("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")), "")
        fsync(fd)

    def spy_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        replace(src, dst, *args, **kwargs)
        note("replace", os.path.realpath(src), os.path.realpath(dst))

    def spy_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        unlink(path, *args, **kwargs)
        note("unlink", os.path.realpath(path), "")

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(os, "unlink", spy_unlink)
    return events


def _check_order(events: list[Event], result: Path, spool: Path) -> None:
    """The spool's deletion came after the last rename of its result, whose data was fsynced
    before that rename and whose directory after it; the deletion itself was fsynced after."""
    result, spool = Path(os.path.realpath(result)), Path(os.path.realpath(spool))
    gone = [i for i, e in enumerate(events) if e[:2] == ("unlink", str(spool))]
    assert len(gone) == 1, [e for e in events if str(spool) in e[1]]
    u = gone[0]
    renamed = [i for i, e in enumerate(events[:u]) if e[0] == "replace" and e[2] == str(result)]
    assert renamed, f"no rename to {result} before the spool was deleted: {events[:u]}"
    r = renamed[-1]
    part = events[r][1]
    # the data of the file renamed to the result, on disk before the rename
    assert ("fsync", part, "") in events[:r], (part, events[:r])
    # the rename on disk (its directory fsynced) before the spool went
    assert ("fsync", str(result.parent), "") in events[r + 1:u], events[r + 1:u]
    # and the spool's deletion on disk too (its directory fsynced after the unlink)
    assert ("fsync", str(spool.parent), "") in events[u + 1:], events[u + 1:]


def test_a_finished_scans_spool_is_deleted_only_after_its_result_is_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryoptycho.daemon.service import BackgroundService
    from daemon_support import loopback_config, synthetic_scan

    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2)  # spool_fsync off, its default
    events = _spy(monkeypatch)
    bg = BackgroundService(cfg)
    try:
        assert _stream(bg.service, scan, "durable")["state"] == "finished"
    finally:
        bg.stop()
    _check_order(list(events), cfg.results_dir / "durable.h5", cfg.spool_dir / "durable.spool.h5")


def test_a_spool_whose_raw_copy_waited_is_deleted_only_after_the_copied_result_is_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.rawcopy import pending_marker
    from daemon_support import loopback_config, synthetic_scan, wait_for

    held: list[Any] = []
    _hold_at_finish(monkeypatch, held)  # another process holds the spool "r+" at the finish
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2)
    spool, result = cfg.spool_dir / "late.spool.h5", cfg.results_dir / "late.h5"
    events = _spy(monkeypatch)
    bg = BackgroundService(cfg)
    try:
        with _released(held):
            assert _stream(bg.service, scan, "late")["state"] == "finished"
            assert spool.exists() and pending_marker(spool).exists()
        # the holder let go: the copy rewrites the result (a hidden copy renamed over it)
        wait_for(lambda: not pending_marker(spool).exists(), 60, "the pending raw copy")
    finally:
        bg.stop()
    got = list(events)
    _check_order(got, result, spool)
    # the rename checked is the copy's, not the finish's (which came before the holder let go)
    assert sum(1 for e in got if e[0] == "replace" and e[2] == os.path.realpath(result)) == 2
