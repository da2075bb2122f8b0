"""A reader of an open scan's spool, through the console script, while the daemon that writes
it runs (FORMATS.md: readers of a spool whose journal is not closed read what the journal holds,
from a copy). The daemon holds the spool file open for writing, so HDF5's file lock refused the
reader's first look at the file: `cryoptycho reconstruct` of an open spool failed with
"not an HDF5 file (... unable to lock file ...)"."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
from cryoptycho.protocols.producer import Producer
from daemon_support import start_daemon, synthetic_scan


def test_reconstruct_reads_the_spool_of_a_scan_the_running_daemon_holds_open(tmp_path):
    scan = synthetic_scan(n_side=6, m=32)
    daemon = start_daemon(tmp_path, "--set", "resolution_interval_s=0")
    try:
        with Producer(daemon.ingest, control=daemon.control, send_timeout_s=30) as producer:
            producer.start_scan(**scan.start_fields("growing"))
            producer.send_frames(scan.frames[:20])
            assert producer.flush().acknowledged == 20
            out = tmp_path / "read.h5"
            run = subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", "reconstruct",
                                  str(tmp_path / "spool" / "growing.spool.h5"), "-o", str(out), "-n", "1",
                                  "--formats", "h5"], check=False, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stdout + run.stderr
            with h5py.File(out) as f:
                assert f.attrs["frames_used"] == 20
                np.testing.assert_array_equal(np.sort(f["probe_position_indexes"][()]), np.arange(20))
            producer.send_frames(scan.frames[20:])  # the scan goes on, its spool untouched by the read
            assert producer.end_scan().acknowledged == len(scan.frames)
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
