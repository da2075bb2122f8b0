"""The daemon as a facility operates it for years: instances, restarts, shared disks."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import numpy as np
import pytest
import zmq
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
            cmd = [sys.executable, "-m", "cryoptycho.daemon.cli", "serve", "--ingest", "tcp://127.0.0.1:*",
                   "--publish", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*", "--metrics-port", "0",
                   "--spool-dir", str(tmp_path / "spool"), "--results-dir", str(other / "results"), *FAST]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                _, said = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail("the second daemon started on the first one's spool directory: "
                            + proc.communicate()[1])
            assert proc.returncode == 1, said
            assert "spool_dir" in said and "in use" in said and f"pid {first.proc.pid}" in said, said
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


def test_a_scan_open_across_a_restart_with_tighter_limits_takes_the_rest_of_its_frames(tmp_path):
    """The operator restarts the daemon with tighter limits (a smaller max_frame_side, fewer
    frame dtypes) while a scan is open: the scan is recovered as declared, but every frame
    its producer sent after the restart was refused by the new limits (data/max_frame_side),
    and the scan ended with the frames of before the restart. A scan accepted under the
    limits of its start takes its frames as it declared them; new scans meet the new limits."""
    import signal

    scan = synthetic_scan(n_side=4, m=32, step_px=3)
    first = start_daemon(tmp_path, *FAST)
    second = None
    try:
        with Producer(first.ingest, control=first.control, send_timeout_s=60) as producer:
            producer.start_scan(**scan.start_fields("across"))
            producer.send_frames(scan.frames[:8])
            assert producer.flush().acknowledged == 8
            first.stop(signal.SIGKILL)
            producer.scan = None
        second = start_daemon(tmp_path, *FAST, "--set", "recover_wait_s=120", "--limit", "max_frame_side=16",
                              "--limit", 'frame_dtypes=["uint8"]')
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 5000)
        try:
            with ControlClient(second.control, timeout_s=30) as ctl:
                wait_for(lambda: ctl.call("receipt", scan_id="across")["frames"]["received"] == 8, 120,
                         "the recovered scan", second)
                # the producer goes on where it was (a new connection: PROTOCOL.md § 4.2 frames)
                push.connect(second.ingest)
                rest = np.ascontiguousarray(scan.frames[8:])
                header = {"protocol": "cryoptycho", "version": 1, "type": "frames", "scan_id": "across",
                          "arrays": [{"name": "indices", "dtype": "uint32", "shape": [len(rest)]},
                                     {"name": "data", "dtype": "uint16", "shape": list(rest.shape)}]}
                push.send_multipart([msgpack.packb(header), np.arange(8, len(scan.frames), dtype=np.uint32).tobytes(),
                                     rest.tobytes()])
                receipt = wait_for(lambda: (r := ctl.call("receipt", scan_id="across"))["frames"]["received"]
                                   == len(scan.frames) or r["refused"]["frames"] and r, 120,
                                   "the rest of the frames", second)
                assert receipt is True, receipt
                # a new scan meets the limits in force
                start = {"protocol": "cryoptycho", "version": 1, "type": "scan_start", "scan_id": "new-large",
                         "energy_eV": 300e3, "pixel_size_m": 1e-10, "frame_shape": [32, 32], "frame_dtype": "uint8",
                         "expected_frames": 4, "probe_model": {},
                         "scan": {"kind": "raster", "shape": [2, 2], "step_m": [2e-10, 2e-10]}}
                push.send_multipart([msgpack.packb(start)])
                refused = wait_for(lambda: (r := ctl.call("receipt", scan_id="new-large"))["state"] != "unknown" and r,
                                   120, "the verdict on a new scan", second)
                assert refused["state"] == "refused" and "max_frame_side" in refused["error"], refused
        finally:
            push.close()
        assert second.stop() == 0
    finally:
        for daemon in (first, second):
            if daemon is not None and daemon.proc.poll() is None:
                daemon.proc.kill()


def test_a_spool_directory_on_a_file_system_without_locks_still_starts(tmp_path, monkeypatch, caplog):
    """Some network mounts refuse flock (ENOLCK): that is not another daemon, and the start
    goes on with a warning instead of failing as if the directory were in use."""
    import errno
    import fcntl
    import logging

    from cryoptycho.daemon.commands.serve import _lock_spool_dir

    def no_locks(*_args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="cryoptycho.serve"):
        handle = _lock_spool_dir(tmp_path)
    handle.close()
    assert "cannot lock spool_dir" in caplog.text and "No locks available" in caplog.text, caplog.text
