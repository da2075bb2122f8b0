"""Defects found by the randomized kill -9 campaign (tests/measure/kill_campaign.py), each at a
deterministic kill point: a daemon killed at a moment of a scan's life leaves a spool directory
the next start recovers whole."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from cryoptycho.daemon.config import ServiceConfig
from cryoptycho.daemon.service import BackgroundService

#: a child that creates a spool and is SIGKILLed while HDF5 writes the new file (after its
#: first groups reached the disk), as a daemon killed just after a scan_start arrived
_KILLED_IN_CREATE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from pathlib import Path
    from cryoptycho.daemon.scan import ScanSpec
    from cryoptycho.daemon.storage import spool

    real = spool.NxcxiEntry.create

    def dies(f, **kwargs):
        real(f, **kwargs)
        f.flush()  # part of the new file on disk, as HDF5 evicts metadata while it writes
        os.kill(os.getpid(), signal.SIGKILL)

    spool.NxcxiEntry.create = dies
    spec = ScanSpec(scan_id="born", frame_shape=(16, 16), frame_dtype="uint16", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((16, 16), np.complex64), expected_frames=4)
    spool.SpoolWriter.create(Path(sys.argv[1]), spec)
""")


def test_a_daemon_killed_while_it_creates_a_spool_leaves_nothing_the_next_start_cannot_recover(tmp_path: Path) -> None:
    """Killed inside the creation of a scan's spool file (before any frame, so nothing was
    acknowledged): the half-written HDF5 file lay under the spool's own name, unreadable ("bad
    object header version number"); every later start logged "cannot recover spool" and kept it
    for ever, and the spool directory never emptied. Now it is written under a hidden name until
    it is whole, and a start deletes such a leftover."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    child = subprocess.run([sys.executable, "-c", _KILLED_IN_CREATE, str(spool_dir)], capture_output=True, text=True,
                           check=False)
    assert child.returncode == -9, child.stderr  # killed where intended, not failed earlier
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=spool_dir, results_dir=tmp_path / "results",
                        resolution_interval_s=0)
    bg = BackgroundService(cfg)
    try:
        assert bg.service.scans.unrecovered == set()
    finally:
        bg.stop()
    assert [p.name for p in spool_dir.iterdir() if not p.name.endswith(".lock")] == []


def test_a_spool_created_whole_is_where_it_was_before(tmp_path: Path) -> None:
    """The hidden name is only while the file is written: a created spool is at the scan's
    spool path, with its journal, and no hidden file stays."""
    from cryoptycho.daemon.scan import ScanSpec
    from cryoptycho.daemon.storage.spool import SpoolWriter, spool_path

    spec = ScanSpec(scan_id="whole", frame_shape=(16, 16), frame_dtype="uint16", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((16, 16), np.complex64), expected_frames=4)
    w = SpoolWriter.create(tmp_path, spec)
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole.spool.h5", "whole.spool.journal"]
    assert spool_path(tmp_path, "whole").exists()


#: opens a spool as soon as it can, with h5py's defaults (a shared file lock), and holds it
_READER = textwrap.dedent("""
    import sys, time
    import h5py
    print("ready", flush=True)
    for _ in range(20000):
        try:
            f = h5py.File(sys.argv[1], "r")
            break
        except OSError:  # (BlockingIOError: the daemon writes it) or not there yet
            time.sleep(0.002)
    else:
        sys.exit("never opened")
    print("open", flush=True)
    time.sleep(600)
""")


def test_a_reader_holding_an_ended_scans_spool_open_does_not_fail_the_scan(tmp_path: Path) -> None:
    """A program reading the spool of an ended scan with h5py's defaults (a shared HDF5 file
    lock) while the daemon finished it: the result files were written, then marking the spool
    "finished" could not lock the file and the scan failed — a result on disk for a scan the
    daemon called failed, its spool kept. (The campaign's own checker was such a reader.)"""
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import synthetic_scan, wait_for

    scan = synthetic_scan(n_side=6, m=32)
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=tmp_path / "spool", results_dir=tmp_path / "results",
                        resolution_interval_s=0, refine_time_budget_s=4)
    bg = BackgroundService(cfg)
    svc = bg.service
    reader = None
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p):
            p.start_scan(**scan.start_fields("read", options={"iterations": 100_000}))  # refines for its budget
            p.send_frames(scan.frames)
            p.flush()  # the spool is open: the daemon holds it, the reader waits for its close
            path = tmp_path / "spool" / "read.spool.h5"
            # another process (HDF5's locks are between processes), polling before the scan's
            # end, so that it holds the file from the spool's close on, while the scan refines
            reader = subprocess.Popen([sys.executable, "-c", _READER, str(path)], stdout=subprocess.PIPE, text=True)
            assert reader.stdout.readline().strip() == "ready"
            p.end_scan()
            assert reader.stdout.readline().strip() == "open", "the spool was never readable before the scan ended"
            info = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "read"
                                          and s["state"] in ("finished", "failed", "aborted")), None),
                            120, "the scan to end")
            assert info["state"] == "finished", info
    finally:
        if reader is not None:
            reader.kill()
            reader.wait(10)
        bg.stop()
