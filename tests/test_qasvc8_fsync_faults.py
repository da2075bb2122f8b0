"""Hostile QA of svc8's fsyncs around a scan's finish (``replace_durably``, ``_delete_spool_file``).

svc8 made the result's fsync, its directory's, and the spool directory's after the spool's
deletion unconditional (``spool_fsync`` off, the default, fsynced no directory before). Some file
systems refuse ``fsync`` on a directory's descriptor with EINVAL (FUSE file systems, CIFS/SMB and
some NFS set-ups of beamline storage): on them every scan failed after its reconstruction, the result
written and — for the spool directory's — the spool already deleted. A directory whose file system
cannot sync it gives no ordering to wait for: that fsync is skipped (said once). A file's fsync, and
an I/O error on a directory's, still fail the write."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import h5py
import pytest


def _refuse_dir_fsync(monkeypatch: pytest.MonkeyPatch, err: int) -> list[str]:
    """os.fsync of a directory's descriptor raises OSError(err), as such a file system answers."""
    refused: list[str] = []
    fsync = os.fsync

    def dir_fsync_refused(fd: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            refused.append(os.readlink(f"/proc/self/fd/{fd}"))
            raise OSError(err, os.strerror(err))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", dir_fsync_refused)
    return refused


def test_a_scan_finishes_where_the_file_system_refuses_directory_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import loopback_config, synthetic_scan
    from spool_support import scan_ended

    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2)
    refused = _refuse_dir_fsync(monkeypatch, errno.EINVAL)
    bg = BackgroundService(cfg)
    try:
        with (ControlClient(bg.service.endpoints["control"], timeout_s=30) as ctl,
              Producer(bg.service.endpoints["ingest"], control=bg.service.endpoints["control"]) as p):
            p.start_scan(**scan.start_fields("s"))
            p.send_frames(scan.frames)
            p.end_scan()
            done = scan_ended(ctl, "s")
    finally:
        bg.stop()
    # before: failed ("OSError: [Errno 22] …"), its result written, its spool deleted
    assert done["state"] == "finished", done
    assert refused, "no directory fsync was asked for: the test does not test the finish"
    with h5py.File(cfg.results_dir / "s.h5", "r") as f:
        assert int(f["raw/entry_1/data_1"].attrs["count"]) == len(scan.frames)
    assert not (cfg.spool_dir / "s.spool.h5").exists()
    said = [r.getMessage() for r in caplog.records if "does not sync directories" in r.getMessage()]
    assert said and len(said) == len(set(said)), said  # said, once per directory


def test_an_io_error_on_a_directory_fsync_still_fails_the_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO is not 'unsupported': the rename may not be on disk, and the caller must know."""
    from cryoptycho.daemon.storage.whole import replace_durably

    part, path = tmp_path / ".r.h5.part", tmp_path / "r.h5"
    part.write_bytes(b"x")
    _refuse_dir_fsync(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as info:
        replace_durably(part, path)
    assert info.value.errno == errno.EIO


def test_a_result_whose_fsync_fails_leaves_no_hidden_part_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The result's own fsync failing (EIO, a full thin-provisioned volume's ENOSPC): the write
    fails, the scan with it (its spool kept), and no hidden ``.S.h5.part`` is left in the results
    directory (FORMATS.md: a failing write never leaves one; before, this one stayed, a result's size)."""
    from cryoptycho.daemon.storage.whole import replace_durably

    part, path = tmp_path / ".r.h5.part", tmp_path / "r.h5"
    part.write_bytes(b"x" * 4096)
    fsync = os.fsync

    def file_fsync_fails(fd: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", file_fsync_fails)
    with pytest.raises(OSError):
        replace_durably(part, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_io_error_syncing_the_spool_directory_after_the_deletion_does_not_fail_a_finished_scan(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The spool directory's fsync after the spool's deletion fails (EIO): the result is on disk
    (fsynced, with its directory) and the spool already gone. Before, the scan failed then, its
    error saying its frames were kept in a spool that no longer existed; now it finishes, the
    failed fsync logged (a power loss may bring the deleted spool back, nothing is lost)."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import loopback_config, synthetic_scan
    from spool_support import scan_ended

    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2)
    spool_dir = os.path.realpath(cfg.spool_dir)
    assert spool_dir != os.path.realpath(cfg.results_dir)
    fsync, failed = os.fsync, []

    def spool_dir_fsync_fails(fd: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        if os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")) == spool_dir and not os.path.exists(
                os.path.join(spool_dir, "s.spool.h5")):
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spool_dir_fsync_fails)
    bg = BackgroundService(cfg)
    try:
        with (ControlClient(bg.service.endpoints["control"], timeout_s=30) as ctl,
              Producer(bg.service.endpoints["ingest"], control=bg.service.endpoints["control"]) as p):
            p.start_scan(**scan.start_fields("s"))
            p.send_frames(scan.frames)
            p.end_scan()
            done = scan_ended(ctl, "s")
    finally:
        bg.stop()
    assert failed, "the spool directory was not fsynced after the deletion: the test does not test it"
    assert done["state"] == "finished", done
    with h5py.File(cfg.results_dir / "s.h5", "r") as f:
        assert int(f["raw/entry_1/data_1"].attrs["count"]) == len(scan.frames)
    assert any("s.spool.h5" in r.getMessage() and "Input/output error" in r.getMessage()
               for r in caplog.records if r.levelname == "ERROR"), [r.getMessage() for r in caplog.records]
