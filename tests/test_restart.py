"""Stopping, restarting and downgrading the daemon as a facility does: through the console script.

What the operator is told when the daemon stops with scans unfinished, that a closed terminal
(SIGHUP) drains like SIGTERM instead of killing the daemon mid-write, and that a spool file
written by a newer cryoptycho (a downgrade after an upgrade) is refused by name and kept, not
read by rules it may no longer follow.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.producer import Producer
from daemon_support import start_daemon, synthetic_scan, wait_for

pytestmark = pytest.mark.subprocess

FAST = ("--set", "options.iterations=3", "--set", "refine_time_budget_s=5", "--set", "resolution_interval_s=0")


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(n_side=8, m=32)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_a_stop_drains_and_names_the_scans_kept_for_the_next_start(tmp_path, scan, sig):
    from cryoptycho.daemon.storage.spool import read_spool

    daemon = start_daemon(tmp_path, *FAST)
    try:
        with ControlClient(daemon.control, timeout_s=10) as ctl, Producer(daemon.ingest, control=daemon.control) as p:
            p.start_scan(**scan.start_fields("mid-flight"))
            p.send_frames(scan.frames[:40])
            p.flush()  # 40 frames acknowledged: they must survive the stop
            wait_for(lambda: ctl.status()["scans"].get("mid-flight", {}).get("state") == "acquiring", 30,
                     "the scan to acquire", daemon)
            assert daemon.stop(sig) == 0, daemon.log()
            p.scan = None  # the daemon is gone: no abort at close
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    log = daemon.log()
    assert f"draining ({sig.name})" in log
    assert "1 unfinished scans kept in the spool for the next start to finish: mid-flight (open, 40 frames)" in log
    spooled = read_spool(tmp_path / "spool" / "mid-flight.spool.h5")
    assert spooled.status == "open" and sorted(spooled.indices) == list(range(40))


def _spool(spool_dir, scan, scan_id: str, n: int, version: int | None = None):
    from cryoptycho.daemon.scan import spec_from_scan_start
    from cryoptycho.daemon.storage.spool import SpoolWriter
    from cryoptycho.protocols.messages import ScanStart

    writer = SpoolWriter.create(spool_dir, spec_from_scan_start(ScanStart(**scan.start_fields(scan_id))))
    writer.append(scan.frames[:n], np.arange(n), scan.positions[:n])
    writer.set_status("ended")
    path = writer.path
    writer.close()
    if version is not None:
        with h5py.File(path, "r+") as f:
            f.attrs["format_version"] = version
    return path


def test_a_spool_from_a_newer_cryoptycho_is_refused_by_name_and_kept(tmp_path, scan):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    _spool(spool_dir, scan, "today", len(scan.frames))
    newer = _spool(spool_dir, scan, "from-the-future", 20, version=3)
    before = newer.read_bytes()

    out = subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", "reconstruct", str(newer),
                          "-o", str(tmp_path / "x.h5"), "-n", "1"], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "format_version 3 was written by a newer cryoptycho" in out.stderr, out.stderr

    daemon = start_daemon(tmp_path, *FAST)
    try:
        with ControlClient(daemon.control, timeout_s=10) as ctl:
            wait_for(lambda: {s["scan_id"]: s["state"] for s in ctl.list_scans()}.get("today") == "finished", 90,
                     "the spool of this version to be recovered and finished", daemon)
            assert "from-the-future" not in {s["scan_id"] for s in ctl.list_scans()}
        wait_for(lambda: "format_version 3 was written by a newer cryoptycho" in daemon.log(), 30,
                 "the newer spool to be named in the log", daemon)
        assert daemon.stop() == 0
        # the stop says so too: the operator learns the file still waits for a newer daemon
        said = [line for line in daemon.log_lines if "could not recover stay in" in line]
        assert len(said) == 1 and "1 unfinished spool files" in said[0] and "from-the-future.spool.h5" in said[0]
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    assert newer.read_bytes() == before, "the newer spool file was changed"


def test_a_scan_id_used_before_a_restart_cannot_overwrite_its_result(tmp_path, scan):
    """The daemon forgets its scans at a restart (and after 256 scans), but their result files
    stay: a new scan under an old id (acquisition software that numbers from 1 every session,
    a dataset replayed twice) is refused by name instead of overwriting the earlier result."""
    def send(d, frames) -> None:
        with Producer(d.ingest, control=d.control, send_timeout_s=60) as p:
            p.start_scan(**scan.start_fields("scan-0001"))
            p.send_frames(frames)
            p.end_scan()

    daemon = start_daemon(tmp_path, *FAST)
    try:
        send(daemon, scan.frames)
        with ControlClient(daemon.control, timeout_s=10) as ctl:
            result = wait_for(lambda: next((s["result_path"] for s in ctl.list_scans() if s["state"] == "finished"),
                                           None), 90, "the first scan's result", daemon)
        assert daemon.stop() == 0
        first = Path(result).read_bytes()

        daemon = start_daemon(tmp_path, *FAST)
        # the receipt asked before the start says so: refused before a frame is sent
        with pytest.raises(ValueError, match=r"would refuse scan 'scan-0001'.*scan-0001\.h5.*another id"):
            send(daemon, scan.frames[:30])
        # a sender that does not ask first is refused by the daemon itself
        with Producer(daemon.ingest, control=daemon.control, confirm=False) as p:
            p.start_scan(**scan.start_fields("scan-0001"))
            p.send_frames(scan.frames[:30])
            p.end_scan()
        with ControlClient(daemon.control, timeout_s=10) as ctl:
            refused = wait_for(lambda: (r := ctl.receipt("scan-0001"))["state"] == "refused" and r, 90,
                               "the daemon to refuse the start", daemon)
        assert "scan-0001.h5" in refused["error"] and "unique_scan_id" in refused["error"], refused
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    assert Path(result).read_bytes() == first, "the earlier result was overwritten"


def test_a_metrics_port_in_use_stops_the_start_with_its_name(tmp_path):
    """A second daemon on a host left at the first one's metrics port: a clear error, not a
    traceback from the HTTP server."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "cryoptycho.daemon.cli", "serve", "--ingest", "tcp://127.0.0.1:*",
             "--publish", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*", "--metrics-port", str(port),
             "--spool-dir", str(tmp_path / "s"), "--results-dir", str(tmp_path / "r")],
            check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in out.stderr and "metrics_port" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
