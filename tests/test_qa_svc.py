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
