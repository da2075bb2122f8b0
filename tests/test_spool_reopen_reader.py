"""Re-opening a stopped scan's spool (control `finish_scan`, SpoolWriter.reopen) while another
program holds the file open with h5py's defaults (HDF5's shared file lock). Before: `finish_scan`
answered "internal error: BlockingIOError … unable to lock file", and the attempt left a journal
beside the aborted scan's spool. The daemon is the spool's only writer: it opens the file without
the lock then (spool.open_for_writing); a re-open that fails for another reason leaves the
journal as it was."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.storage.spool import SpoolWriter, journal_path, read_spool

#: holds the file open (h5py's defaults: a shared lock for "r", exclusive for "r+") until a
#: line on stdin
_READER = textwrap.dedent("""
    import sys, h5py
    f = h5py.File(sys.argv[1], sys.argv[2])
    print("open", flush=True)
    sys.stdin.readline()
""")


@contextmanager
def held_open(path: Path, mode: str = "r") -> Iterator[None]:
    """Another process (HDF5's locks are between processes) holding ``path`` open."""
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(path), mode], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "open"
        yield
    finally:
        if reader.stdin is not None:
            reader.stdin.close()  # its readline returns: it closes the file and exits
        assert reader.wait(30) == 0


def _spool(spool_dir: Path, scan_id: str, status: str) -> Path:
    spec = ScanSpec(scan_id=scan_id, frame_shape=(16, 16), frame_dtype="uint16", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((16, 16), np.complex64), expected_frames=8)
    w = SpoolWriter.create(spool_dir, spec)
    w.append(np.full((5, 16, 16), 7, np.uint16), np.arange(5), np.zeros((5, 2)))
    if status != "open":
        w.set_status(status)
    w.close()
    return w.path


@pytest.mark.parametrize("status", ["aborted", "open"])
def test_reopen_of_a_spool_another_program_holds_appends_all_the_same(tmp_path: Path, status: str) -> None:
    """aborted: closed with a final status, no journal (finish_scan's case); open: closed with
    its journal ending "closed" (a scan recovered at a start)."""
    path = _spool(tmp_path, "held", status)
    with held_open(path):
        w = SpoolWriter.reopen(path)
        w.append(np.full((1, 16, 16), 9, np.uint16), np.array([5]), np.zeros((1, 2)))
        w.close()
    got = read_spool(path)
    np.testing.assert_array_equal(got.indices, np.arange(6))
    assert (got.frames[:5] == 7).all() and (got.frames[5] == 9).all()


@pytest.mark.parametrize("status", ["aborted", "open"])
def test_a_spool_another_program_holds_for_writing_is_not_written_beside_it(tmp_path: Path, status: str) -> None:
    """Two writers of one HDF5 file damage it, and a closed scan's journal is gone: the daemon
    refuses (SpoolInUse; finish_scan's rule spool_in_use) and changes nothing (review: it
    opened without the lock beside an h5py "r+")."""
    from cryoptycho.daemon.storage.spool import SpoolInUse

    path = _spool(tmp_path, "written", status)
    jpath = journal_path(path)
    journal_before = jpath.read_bytes() if jpath.exists() else None
    with held_open(path, "r+"):
        with pytest.raises(SpoolInUse, match="open for writing in another program"):
            SpoolWriter.reopen(path)
        assert (jpath.read_bytes() if jpath.exists() else None) == journal_before
    SpoolWriter.reopen(path).close()  # that writer is gone: re-opened as ever
    np.testing.assert_array_equal(read_spool(path).indices, np.arange(5))


@pytest.mark.parametrize("status", ["aborted", "open"])
@pytest.mark.parametrize("fails", ["open", "setup"])
def test_a_reopen_that_fails_leaves_the_journal_as_it_was(tmp_path: Path, status: str, fails: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``setup``: the file opened for writing, then the writer's set-up failed: the file may
    have changed, so its journal stays (the next open rebuilds from it); nothing is lost."""
    from cryoptycho.daemon.storage import spool as spool_module

    path = _spool(tmp_path, "broken", status)
    jpath = journal_path(path)
    journal_before = jpath.read_bytes() if jpath.exists() else None

    def refuse(*args: object) -> None:
        raise OSError(5, "Input/output error", str(path))

    if fails == "open":
        monkeypatch.setattr(spool_module, "open_for_writing", refuse)
    else:
        monkeypatch.setattr(SpoolWriter, "_truncate", refuse)
    with pytest.raises(OSError, match="Input/output error"):
        SpoolWriter.reopen(path)
    if fails == "open":
        assert (jpath.read_bytes() if jpath.exists() else None) == journal_before
    else:
        assert jpath.exists()
        np.testing.assert_array_equal(read_spool(path).indices, np.arange(5))
    monkeypatch.undo()
    w = SpoolWriter.reopen(path)  # the disk is back: re-opened as ever
    w.close()
    np.testing.assert_array_equal(read_spool(path).indices, np.arange(5))


def test_finish_scan_while_an_operator_reads_the_spool_works(tmp_path: Path) -> None:
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import loopback_config, synthetic_scan, wait_for

    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2)
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p):
            p.start_scan(**scan.start_fields("held"))
            p.send_frames(scan.frames[:10])
            p.flush()
            ctl.cancel("held", reason="stage drift")

            def state() -> str:
                return next(s for s in ctl.list_scans() if s["scan_id"] == "held")["state"]

            wait_for(lambda: state() == "aborted", 60, "the scan to be aborted")
            path = cfg.spool_dir / "held.spool.h5"
            # its close (closer thread) deletes the journal last: the file is whole then
            wait_for(lambda: not journal_path(path).exists(), 60, "the aborted scan's spool to be closed")
            with held_open(path):
                assert ctl.finish_scan("held")["scan_id"] == "held"
            info = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "held"
                                          and s["state"] in ("finished", "failed")), None), 120, "the scan to end")
            assert info["state"] == "finished" and info["frames"]["received"] == 10, info
    finally:
        bg.stop()
