"""The daemon as a facility operates it for years: instances, restarts, shared disks."""

from __future__ import annotations

import pytest
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.producer import Producer
from daemon_support import start_daemon, synthetic_scan, wait_for

pytestmark = pytest.mark.subprocess

FAST = ("--set", "options.iterations=2", "--set", "refine_time_budget_s=5", "--set", "resolution_interval_s=0")


def test_a_second_daemon_on_the_same_spool_directory_is_refused_and_the_first_keeps_its_scan(tmp_path):
    """Two instances given one spool directory (a copied systemd environment file, two compose
    projects on one volume): the second started, took the first one's open scan for a scan
    left by a crash, rebuilt its spool from the journal and renamed the copy over the file the
    first was writing (whose later frames then went to a file no longer in the directory), and
    ran it as its own. The second now refuses to start, naming the directory and the holder."""
    scan = synthetic_scan(n_side=4, m=16, step_px=3)
    first = start_daemon(tmp_path, *FAST)
    second = None
    try:
        with Producer(first.ingest, control=first.control, send_timeout_s=60) as producer, ControlClient(first.control, timeout_s=30) as ctl:
            producer.start_scan(**scan.start_fields("shared-1"))
            producer.send_frames(scan.frames[:8])
            producer.flush()
            spool = tmp_path / "spool" / "shared-1.spool.h5"
            inode = spool.stat().st_ino
            other = tmp_path / "other"
            other.mkdir()
            try:
                second = start_daemon(other, "--spool-dir", str(tmp_path / "spool"), *FAST)
            except AssertionError as exc:  # exited before its ready line: what it must do
                said = str(exc)
            else:
                said = "started: " + second.log()
            assert "rc 1" in said and "spool_dir" in said and "in use" in said and f"pid {first.proc.pid}" in said, said
            assert "Traceback" not in said, said
            assert spool.stat().st_ino == inode  # the first daemon's spool file was left alone
            producer.send_frames(scan.frames[8:])
            receipt = producer.end_scan()
            assert receipt.acknowledged == len(scan.frames)
            wait_for(lambda: ctl.call("receipt", scan_id="shared-1")["state"] == "finished", 120,
                     "the first daemon's scan to finish", first)
        assert first.stop() == 0
        # once the first has stopped, the directory is free for the next daemon
        second = start_daemon(other, "--spool-dir", str(tmp_path / "spool"), *FAST)
        assert second.stop() == 0
    finally:
        for daemon in (first, second):
            if daemon is not None and daemon.proc.poll() is None:
                daemon.proc.kill()
