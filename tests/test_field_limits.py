"""Field-tester defects: oversized messages held in the daemon's memory, and a detector source
URL without a host that failed only after the daemon said it was ready."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import ControlError, ControlTimeout, ProtocolError
from cryoptycho.protocols.limits import Limits, control_max_part_bytes
from cryoptycho.protocols.messages import ProbeModelSpec
from cryoptycho.protocols.producer import Producer
from cryoptycho.protocols.sources import source_schemes
from daemon_support import Daemon, start_daemon, synthetic_scan, wait_for
from zmq.utils.monitor import recv_monitor_message

MiB = 1 << 20


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``cryoptycho serve`` (the console script) with loopback ports and ``args``."""
    cmd = [sys.executable, "-m", "cryoptycho.daemon.cli", "serve", "--ingest", "tcp://127.0.0.1:*",
           "--publish", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*", "--metrics-port", "0",
           "--spool-dir", str(tmp_path / "spool"), "--results-dir", str(tmp_path / "results"),
           "--log-format", "json", *args]
    # a daemon that started despite the bad URL is killed by the timeout, and the test fails
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize(("scheme", "rest", "said"), [
    *((scheme, "", "names no host") for scheme in source_schemes()),  # the field report: every scheme
    ("dectris2", ":31001", "names no host"),
    ("dectris1", "detector:99999", "bad port"),
])
def test_serve_refuses_an_incomplete_source_url_before_it_starts(tmp_path: Path, scheme: str, rest: str,
                                                                 said: str) -> None:
    url = f"{scheme}://{rest}"
    done = _serve(tmp_path, "--source", url)
    assert done.returncode == 1, done.stderr
    assert f"source {url!r}" in done.stderr and said in done.stderr, done.stderr
    assert f"{scheme}://HOST[:PORT]" in done.stderr
    # refused before anything started: no ready line, no "service ready" in the log
    assert "service ready" not in done.stderr and '"event": "ready"' not in done.stdout


def test_serve_refuses_a_source_url_without_slashes(tmp_path: Path) -> None:
    done = _serve(tmp_path, "--source", "dectris2:detector")
    assert done.returncode == 1
    assert "source 'dectris2:detector'" in done.stderr and "'//' is missing" in done.stderr
    assert "service ready" not in done.stderr


# -- oversized messages ---------------------------------------------------------------------------

def _peak_rss(daemon: Daemon) -> int:
    """The daemon's peak resident set so far (VmHWM), bytes: a message received whole raises it
    by its size even when it is freed at once."""
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


def _send_and_see_cut_off(kind: int, endpoint: str, parts: list[bytes]) -> None:
    """Send ``parts`` from a fresh socket and return once the peer has dropped the connection
    (the socket monitor's DISCONNECTED: nothing else ends a healthy connection here)."""
    sock = zmq.Context.instance().socket(kind)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(endpoint)
        sock.send_multipart(parts, copy=False)
        assert monitor.poll(60_000), f"{endpoint} did not disconnect a sender of a {len(parts[-1])}-byte part"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("limits"))
    yield d
    assert d.stop() == 0, d.log()


def test_a_64_mb_control_message_is_cut_off_before_it_is_held(daemon: Daemon) -> None:
    before = _peak_rss(daemon)
    _send_and_see_cut_off(zmq.DEALER, daemon.control, [b"", b"\0" * (64 * MiB)])
    with ControlClient(daemon.control, timeout_s=30) as client:
        assert client.ping()["pong"] is True
    grown = _peak_rss(daemon) - before
    # received whole, the 64 MiB would have raised the peak by at least that much
    assert grown < 16 * MiB, f"the daemon's peak RSS grew by {grown / MiB:.1f} MiB"


def test_the_largest_control_requests_are_still_answered(daemon: Daemon) -> None:
    with ControlClient(daemon.control, timeout_s=30) as client:
        # the largest request the SDK makes: set_options with every option (today's defaults)
        every = ReconOptions().to_dict()
        assert client.set_options(None, every)["options"] == every
        # a request's header is capped by max_header_bytes: one just under it is served...
        reason = "r" * (Limits().max_header_bytes - 4096)
        with pytest.raises(ControlError, match="unknown scan") as refused:
            client.cancel("no-such-scan", reason)
        assert refused.value.reply.result["rule"] == "known_scan"
        # ...and one over it is still answered with the rule it broke (the socket's headroom)
        with pytest.raises(ControlError) as too_big:
            client.cancel("no-such-scan", "r" * (Limits().max_header_bytes + MiB // 2))
        assert too_big.value.reply.result["rule"] == "max_header_bytes"


def test_a_client_cut_off_for_a_large_part_is_told_the_limit(daemon: Daemon) -> None:
    cap = control_max_part_bytes(Limits())
    with ControlClient(daemon.control, timeout_s=2, retries=1) as client, pytest.raises(
            ControlTimeout, match=rf"exceeds {cap} bytes, its control_max_part_bytes"):
        client.cancel("no-such-scan", "r" * (cap + 1))
    with ControlClient(daemon.control, timeout_s=30) as client:
        assert client.ping()["pong"] is True


def test_an_oversized_frames_message_cuts_off_its_sender_and_the_daemon_serves_others(tmp_path: Path) -> None:
    limit = 1 * MiB
    daemon = start_daemon(tmp_path, "--limit", f"max_message_bytes={limit}", "--set", "options.iterations=1")
    try:
        # a sender of a part over the daemon's limit (a producer that does not ask, a bare PUSH)
        # is disconnected as the part's length arrives
        _send_and_see_cut_off(zmq.PUSH, daemon.ingest, [b"\0" * (limit + 4 * MiB)])
        # the SDK's producer learns the limit from the daemon before the scan: it has its own,
        # larger, limits and would send 2 MiB messages (256 frames of 8 KiB), and sizes them below
        scan = synthetic_scan(n_side=16, m=64)
        with Producer(daemon.ingest, control=daemon.control) as producer:
            producer.start_scan(**scan.start_fields("under-the-limit"))
            assert producer.daemon_max_message_bytes == limit
            producer.send_frames(scan.frames)
            receipt = producer.end_scan(timeout_s=120)
        assert receipt.acknowledged == len(scan.frames)
        # a message that cannot be sized below it (one frame is larger) is refused by name
        m = 768  # 768² uint16: 1.1 MiB
        with Producer(daemon.ingest, control=daemon.control) as producer:
            producer.start_scan(scan_id="one-big-frame", energy_eV=300e3, frame_shape=(m, m),
                                frame_dtype="uint16", expected_frames=1, pixel_size_m=1e-10,
                                probe_model=ProbeModelSpec(), positions_m=np.zeros((1, 2)))
            with pytest.raises(ProtocolError, match=rf"exceed the daemon's max_message_bytes of {limit}"):
                producer.send_frames(np.zeros((1, m, m), np.uint16))
            assert producer.frames_given == 0
            producer.abort("test: the frame cannot be sent")
        with ControlClient(daemon.control, timeout_s=30) as client:
            wait_for(lambda: client.receipt("one-big-frame")["state"] == "aborted", 60,
                     "the abort of the refused scan", daemon)
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_the_broker_cuts_off_oversized_parts_too() -> None:
    from cryoptycho.daemon.broker import Broker, BrokerOptions

    limits = Limits(max_message_bytes=1 * MiB)
    broker = Broker(BrokerOptions(ingest="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*", limits=limits)).start()
    try:
        assert broker.control_endpoint is not None and broker.ingest_endpoint is not None
        _send_and_see_cut_off(zmq.DEALER, broker.control_endpoint, [b"", b"\0" * (8 * MiB)])
        _send_and_see_cut_off(zmq.PUSH, broker.ingest_endpoint, [b"\0" * (2 * MiB)])
        with ControlClient(broker.control_endpoint, timeout_s=30) as client:
            assert client.ping()["pong"] is True
        assert broker.status()["counters"]["messages"] == 0  # neither reached the broker's loop
    finally:
        broker.stop()


def test_an_operator_can_raise_the_control_part_limit(tmp_path: Path) -> None:
    # a 4 MiB part is over the default limit (2 MiB): cut off there, answered once the limit is raised
    daemon = start_daemon(tmp_path, "--set", f"control_max_part_bytes={8 * MiB}", "--set",
                          "control_queue_messages=4")
    try:
        with ControlClient(daemon.control, timeout_s=30) as client, pytest.raises(ControlError) as too_big:
            client.cancel("no-such-scan", "r" * (4 * MiB))
        assert too_big.value.reply.result["rule"] == "max_header_bytes"
    finally:
        assert daemon.stop() == 0, daemon.log()
