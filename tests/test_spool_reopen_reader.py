"""Re-opening a stopped scan's spool (control `finish_scan`, SpoolWriter.reopen) while another
program holds the file open with h5py's defaults (HDF5's shared file lock). Before: `finish_scan`
answered "internal error: BlockingIOError … unable to lock file", and the attempt left a journal
beside the aborted scan's spool. The daemon is the spool's only writer: it opens the file without
the lock then (spool.open_for_writing); a re-open that fails for another reason leaves the
journal as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryoptycho.daemon.storage.spool import SpoolWriter, journal_path, read_spool
from spool_support import aborted_scan_on_a_daemon, held_open, scan_ended, small_spool


@pytest.mark.parametrize("status", ["aborted", "open"])
def test_reopen_of_a_spool_another_program_holds_appends_all_the_same(tmp_path: Path, status: str) -> None:
    """aborted: closed with a final status, no journal (finish_scan's case); open: closed with
    its journal ending "closed" (a scan recovered at a start)."""
    path = small_spool(tmp_path, "held", status)
    with held_open(path):
        w = SpoolWriter.reopen(path)
        w.append(np.full((1, 16, 16), 9, np.uint16), np.array([5]), np.zeros((1, 2)))
        w.close()
    got = read_spool(path)
    np.testing.assert_array_equal(got.indices, np.arange(6))
    assert (got.frames[:5] == 7).all() and (got.frames[5] == 9).all()


@pytest.mark.parametrize("status", ["aborted", "open"])
@pytest.mark.parametrize("fails", ["open", "setup"])
def test_a_reopen_that_fails_leaves_the_journal_as_it_was(tmp_path: Path, status: str, fails: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``setup``: the file opened for writing, then the writer's set-up failed: the file may
    have changed, so its journal stays (the next open rebuilds from it); nothing is lost."""
    from cryoptycho.daemon.storage import spool as spool_module

    path = small_spool(tmp_path, "broken", status)
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
    with aborted_scan_on_a_daemon(tmp_path) as (ctl, path):
        with held_open(path):
            assert ctl.finish_scan("held")["scan_id"] == "held"
        info = scan_ended(ctl, "held")
        assert info["state"] == "finished" and info["frames"]["received"] == 10, info
