"""The daemon's Prometheus endpoint and the viewer against hostile HTTP clients: what a facility
network (scanners, stuck scrapers, slowloris) sends. The daemon must go on serving."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from daemon_support import start_daemon, wait_for

pytestmark = pytest.mark.subprocess


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Threads:")))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts the daemon's threads through /proc")
def test_silent_metrics_clients_are_cut_off_and_do_not_pile_up_threads(tmp_path):
    """prometheus_client serves each connection on a thread of the daemon and never timed one
    out: 30 clients that sent half a request held 30 threads for as long as they liked (a
    slowloris with thousands would exhaust a container's pids limit, and the daemon could not
    start a scan's worker). Idle connections are now closed; scrapes go on meanwhile."""
    # the idle limit scaled down 5x (1 s, not 5 s): the same hang-up, waited for in a fifth of the time
    daemon = start_daemon(tmp_path, scaled={"cryoptycho.daemon.service.METRICS_CLIENT_TIMEOUT_S": 1.0})
    socks: list[socket.socket] = []
    try:
        port = daemon.ready["metrics_port"]
        before = _threads(daemon.proc.pid)
        for _ in range(30):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            socks.append(s)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b"cryoptycho_up 1.0" in body  # served beside the silent ones
        for s in socks:  # the server hangs up on each (before: recv timed out after 30 s)
            try:
                answer = s.recv(100)
            except ConnectionResetError:  # a hang-up too
                answer = b""
            assert answer == b""
        wait_for(lambda: _threads(daemon.proc.pid) <= before + 5, 30, "the connection threads to end", daemon)
        assert daemon.proc.poll() is None
        assert "Traceback" not in daemon.log(), daemon.log()
    finally:
        for s in socks:
            s.close()
        assert daemon.stop() == 0, daemon.log()
