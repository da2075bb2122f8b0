"""Open-file exhaustion (field QA fieldqa9): under `ulimit -n 32` libzmq aborted the daemon
(SIGABRT, "Too many open files (src/epoll.cpp:38)") after a scan; under `ulimit -n 40` a DECTRIS
series' spool could not be opened (EMFILE), an "internal error", and the series was lost. serve
raises its soft limit to the hard one, logs the figure, and refuses to start below the floor one
daemon needs; a spool that cannot be opened for want of descriptors is a named refusal."""

from __future__ import annotations

import errno
import json
import resource
import subprocess
import sys

import pytest
from daemon_support import start_daemon, synthetic_scan

LOW = 40  #: what field QA ran the daemon under (soft = hard: nothing to raise)


def _max_open_files(pid: int) -> tuple[int, int]:
    """(soft, hard) "Max open files" of a running process, as the kernel reports them."""
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no 'Max open files' in /proc/<pid>/limits")


def _under_limit(soft: int, hard: int) -> tuple[str, ...]:
    """A command prefix that runs the rest under RLIMIT_NOFILE (soft, hard), as `ulimit -n` or
    systemd's LimitNOFILE= would (a preexec_fn is unsafe in a test process with threads)."""
    code = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
            f"({soft}, {hard})); os.execv(sys.argv[1], sys.argv[1:])")
    return (sys.executable, "-c", code)


def test_serve_refuses_to_start_below_the_open_file_floor_naming_it(tmp_path) -> None:
    # soft = hard = LOW, as `ulimit -n 40` sets them: nothing to raise
    proc = subprocess.Popen(
        [*_under_limit(LOW, LOW), sys.executable, "-m", "cryoptycho.daemon.cli", "serve",
         "--ingest", "tcp://127.0.0.1:*", "--publish", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
         "--metrics-port", "0", "--spool-dir", str(tmp_path / "spool"), "--results-dir", str(tmp_path / "results")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # the ready line of a daemon that started, or "" at exit
        if first:
            proc.kill()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not first, f"the daemon started under an open-file limit of {LOW}: {first}"
    assert proc.returncode != 0
    text = " ".join(err.split())
    assert f"open-file limit (RLIMIT_NOFILE) is {LOW} (hard limit {LOW})" in text, err
    assert "LimitNOFILE=" in text and "ulimit -n" in text and "max_concurrent_scans 2" in text, err
    assert "Traceback" not in err, err


def test_the_floor_counts_every_scan_the_daemon_may_hold() -> None:
    from cryoptycho.daemon.config import load_config
    from cryoptycho.daemon.openfiles import floor

    base = load_config(None, {})
    more = load_config(None, {"max_concurrent_scans": 4, "max_queued_scans": 100})
    # four descriptors per scan held: spool, journal, result and its temporary file
    assert floor(more) - floor(base) == 4 * ((4 + 100) - (2 + 8))
    # and the daemon's own files with a detector's connection are more than field QA's 40
    assert floor(base) > LOW


def test_serve_raises_the_soft_open_file_limit_to_the_hard_one_and_logs_it(tmp_path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if hard < 1024:
        pytest.skip(f"the hard open-file limit here ({hard}) is below what the daemon is raised to in this test")
    soft = 64
    daemon = start_daemon(tmp_path, prefix=_under_limit(soft, hard))
    try:
        assert _max_open_files(daemon.proc.pid) == (hard, hard)
    finally:
        assert daemon.stop() == 0, daemon.log()
    said = [json.loads(line)["msg"] for line in daemon.log_lines if "RLIMIT_NOFILE" in line]
    assert said == [f"open-file limit (RLIMIT_NOFILE) raised from {soft} to {hard}, the hard limit"], daemon.log()


def test_a_spool_that_cannot_be_opened_for_want_of_descriptors_is_a_named_refusal(tmp_path, monkeypatch) -> None:
    """EMFILE opening a spool at scan start was "internal error on an ingest message": now the
    scan is refused by rule ``open_files``, naming the errno and the spool's path, and the
    daemon goes on answering."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import SpoolWriter
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.errors import DeliveryError
    from cryoptycho.protocols.producer import Producer
    from daemon_support import loopback_config

    real = SpoolWriter.create

    def out_of_descriptors(directory, spec, *args, **kwargs):
        if spec.scan_id == "nofd":  # what h5py raises: errno 24 with HDF5's words
            raise OSError(errno.EMFILE, "Unable to synchronously create file (unable to open file: "
                                        "errno = 24, error message = 'Too many open files')")
        return real(directory, spec, *args, **kwargs)

    monkeypatch.setattr(SpoolWriter, "create", staticmethod(out_of_descriptors))
    scan = synthetic_scan(n_side=4, m=32)
    bg = BackgroundService(loopback_config(tmp_path, resolution_interval_s=0))
    svc = bg.service
    try:
        with Producer(svc.endpoints["ingest"], control=svc.endpoints["control"], send_timeout_s=30) as p:
            p.start_scan(**scan.start_fields("nofd"))
            p.send_frames(scan.frames)
            with pytest.raises(DeliveryError) as info:
                p.end_scan()
            p.scan = None
        text = str(info.value)
        assert "open_files" in text and "EMFILE" in text and "nofd.spool.h5" in text, text
        assert "internal" not in text, text
        with ControlClient(svc.endpoints["control"], timeout_s=30) as ctl:
            receipt = ctl.call("receipt", scan_id="nofd")
            assert receipt["state"] == "refused" and "open_files" in str(receipt), receipt
        assert svc.metrics.internal_errors.labels(where="ingest")._value.get() == 0
    finally:
        bg.stop()


def test_the_deployed_units_and_compose_file_give_the_daemon_more_than_its_floor() -> None:
    """A unit without LimitNOFILE= runs under the host's default soft 1,024 (raised by serve) or,
    on older systemd, soft = hard = 4,096 or less: the figure is in the units, above the floor."""
    from pathlib import Path

    import yaml
    from cryoptycho.daemon.config import load_config
    from cryoptycho.daemon.openfiles import floor

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    need = floor(load_config(None, {}))
    for unit in ("cryoptycho@.service", "cryoptycho-broker.service"):
        lines = [line for line in (deploy / "systemd" / unit).read_text().splitlines()
                 if line.startswith("LimitNOFILE=")]
        assert len(lines) == 1 and int(lines[0].split("=", 1)[1]) >= need, (unit, lines)
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    assert compose["services"]["cryoptycho"]["ulimits"]["nofile"] >= need
