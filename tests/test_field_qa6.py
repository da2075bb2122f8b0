"""Field QA round 6: a facility adopting the service — its configuration file as SERVICE.md
describes it, and clients of the daemon that misbehave."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from daemon_support import start_daemon


def _serve(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`cryoptycho serve` with ``args`` on free ports, run until it exits by itself."""
    return subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", "serve", "--ingest", "tcp://127.0.0.1:*",
                           "--publish", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*", "--metrics-port", "0",
                           "--spool-dir", str(cwd / "spool"), "--results-dir", str(cwd / "results"),
                           *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("text, key", [("options = 3\n", "options"), ('limits = "none"\n', "limits")])
def test_a_table_given_a_plain_value_in_the_config_file_is_named(tmp_path, text, key):
    """`options = 3` (a table key given a value: a site file written from the flat key list)
    ended `serve` in an AttributeError traceback from the merge of file and environment."""
    config = tmp_path / "site.toml"
    config.write_text(text)
    done = _serve("--config", str(config), cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert f"'{key}' must be a table" in done.stderr and str(config) in done.stderr, done.stderr


def test_a_table_given_a_plain_value_with_set_is_named(tmp_path):
    done = _serve("--set", "options=3", cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert "command line: 'options' must be a table" in done.stderr, done.stderr


def test_a_cryoptycho_table_beside_an_options_table_is_the_documented_layout(tmp_path, monkeypatch):
    """SERVICE.md: the file holds the keys "at top level (or under [cryoptycho]), reconstruction
    defaults under [options]". Written that way — [cryoptycho] then [options] — `serve` refused
    to start: "unknown key 'cryoptycho'". The keys of both apply, under the file's precedence."""
    from cryoptycho.daemon.config import ConfigError, load_config

    config = tmp_path / "site.toml"
    config.write_text("[cryoptycho]\npreview_hz = 2.0\nmax_queued_scans = 3\n\n[options]\niterations = 7\n")
    monkeypatch.setenv("CRYOPTYCHO_PREVIEW_HZ", "4.0")  # the file beats the environment
    monkeypatch.setenv("CRYOPTYCHO_OPTIONS__ITERATIONS", "9")
    settings = load_config(config, {"max_queued_scans": 5})  # and the command line beats the file
    assert (settings.preview_hz, settings.options.iterations, settings.max_queued_scans) == (2.0, 7, 5)

    daemon = start_daemon(tmp_path, "--config", str(config))
    assert daemon.stop() == 0, daemon.log()

    config.write_text("[cryoptycho]\npreview_hz = 2.0\n[cryoptycho.options]\niterations = 7\n[options]\niterations = 8\n")
    with pytest.raises(ConfigError, match="'options' given both under \\[cryoptycho\\] and outside it"):
        load_config(config)


def test_a_reader_holding_a_waiting_scans_spool_does_not_fail_the_scan(tmp_path):
    """A scan delivered whole while another holds the only slot waits with its spool closed. An
    operator's `h5ls`/HDFView, or a pipeline peeking at the spool directory, holding that file
    open (HDF5 takes a shared lock for a reader's whole open) made the daemon's re-open fail
    with EAGAIN when the slot freed: the scan failed, every frame acknowledged, no result."""
    import h5py
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import synthetic_scan, wait_for

    daemon = start_daemon(tmp_path, "--max-concurrent-scans", "1", "--set", "options.iterations=2",
                          "--set", "refine_time_budget_s=5")
    scan = synthetic_scan(n_side=8, m=32)
    control = ControlClient(daemon.control)
    reader = None

    def state(scan_id: str) -> str:
        return next((s["state"] for s in control.list_scans() if s["scan_id"] == scan_id), "")

    def open_spool() -> h5py.File | None:
        try:  # refused (EAGAIN) until the daemon has closed the waiting scan's spool
            return h5py.File(tmp_path / "spool" / "waiting.spool.h5", "r")
        except BlockingIOError:
            return None

    try:
        with Producer(daemon.ingest, control=daemon.control) as holder:
            holder.start_scan(**scan.start_fields("holder"))
            holder.send_frames(scan.frames[:10])
            wait_for(lambda: state("holder") == "acquiring", 60, "the first scan to take the slot", daemon)
            with Producer(daemon.ingest, control=daemon.control) as producer:
                producer.start_scan(**scan.start_fields("waiting"))
                producer.send_frames(scan.frames)
                receipt = producer.end_scan()
            assert (receipt.acknowledged, receipt.state) == (len(scan.frames), "announced"), receipt
            reader = wait_for(open_spool, 60, "a reader to open the waiting scan's spool", daemon)
            control.cancel("holder", "the slot is wanted")
            wait_for(lambda: state("waiting") in ("finished", "failed", "aborted"), 120,
                     "the waiting scan to end", daemon)
        summary = next(s for s in control.list_scans() if s["scan_id"] == "waiting")
        assert summary["state"] == "finished", summary
        assert summary["frames"]["received"] == len(scan.frames)
        assert Path(summary["result_path"]).is_file()
        assert "opened for writing without HDF5's file lock" in daemon.log()
    finally:
        if reader is not None:
            reader.close()
        control.close()
        assert daemon.stop() == 0, daemon.log()


def test_a_producer_streaming_frames_nobody_takes_does_not_flood_the_log(tmp_path):
    """A third-party sender that streams on after its scan was refused (or before its
    scan_start, or to a daemon restarted without it) has every frames message rejected. Each
    was logged as a warning of its own: 500 messages, 500 lines — at detector rates millions a
    day, and journald's rate limit then drops the daemon's other lines with them. Now the first
    is logged in full and the rest as their number; every one is still counted."""
    import re

    import numpy as np
    import zmq
    from cryoptycho.protocols.messages import Frames, encode
    from daemon_support import metrics_of, wait_for

    sent = 500
    daemon = start_daemon(tmp_path)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(daemon.ingest)
    try:
        frame = np.zeros((1, 32, 32), np.uint16)
        for i in range(sent):
            push.send_multipart(encode(Frames("ghost", np.array([i], np.uint32), frame, None, "none", 0.0)))
        wait_for(lambda: metrics_of(daemon).get("cryoptycho_messages_rejected_total{rule=known_scan}", 0) >= sent,
                 120, "the daemon to reject every message", daemon)
    finally:
        push.close(linger=0)
        assert daemon.stop() == 0, daemon.log()
    lines = [line for line in daemon.log_lines if "rejected message" in line]
    assert lines and "ghost" in lines[0], daemon.log()
    repeats = [int(m.group(1)) for line in lines for m in [re.search(r"rejected message: (\d+) more like it", line)] if m]
    assert len(lines) - len(repeats) + sum(repeats) == sent, lines  # each one accounted for in the log
    assert len(lines) <= 10, lines


def _established_to(port: int) -> int:
    """TCP connections in state ESTABLISHED whose local port is ``port`` (the daemon's side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the connection table of Linux")
def test_a_subscriber_that_stops_answering_is_disconnected_and_its_queue_freed(tmp_path):
    """A `watch` suspended with Ctrl-Z (or a subscriber whose host went away without closing
    its connection) stays connected for ever: the daemon kept the last 64 messages for it —
    previews of the whole canvas, 180 MB for a 660 × 660 canvas, gigabytes for 2k × 2k — for
    as long as it stayed stopped. The publish socket now heartbeats its subscribers and drops
    one that does not answer; a subscriber that comes back reconnects by itself."""
    import signal

    from daemon_support import wait_for

    # the heartbeats scaled down 5x (a 2 s timeout, not 10 s): the drop is the same mechanism,
    # waited for in a fifth of the time
    daemon = start_daemon(tmp_path, scaled={"cryoptycho.daemon.service.PUB_HEARTBEAT_IVL_MS": 400,
                                            "cryoptycho.daemon.service.PUB_HEARTBEAT_TIMEOUT_MS": 2000})
    port = int(daemon.publish.rsplit(":", 1)[1])
    code = ("import sys, zmq\n"
            "s = zmq.Context().socket(zmq.SUB); s.setsockopt(zmq.SUBSCRIBE, b''); s.connect(sys.argv[1])\n"
            "while True: s.recv_multipart()\n")
    subscriber = subprocess.Popen([sys.executable, "-c", code, daemon.publish])
    try:
        wait_for(lambda: _established_to(port) == 1, 60, "the subscriber to connect", daemon)
        subscriber.send_signal(signal.SIGSTOP)
        wait_for(lambda: _established_to(port) == 0, 90, "the daemon to drop the stopped subscriber", daemon)
        subscriber.send_signal(signal.SIGCONT)
        wait_for(lambda: _established_to(port) == 1, 60, "the subscriber to reconnect once resumed", daemon)
    finally:
        subscriber.kill()
        subscriber.wait(30)
        assert daemon.stop() == 0, daemon.log()


def test_a_backend_this_host_cannot_use_stops_the_start_naming_the_key(tmp_path):
    """`serve --backend cupy` (a GPU site's configuration) on a host without CuPy or without a
    visible GPU printed its ready line, refused every scan that did not override the backend,
    and logged an internal-error traceback from its GPU memory gauge twice a second."""
    from cryoptycho.gpu.backend import cupy_available

    if cupy_available():
        pytest.skip("CuPy and a GPU are usable here")
    done = _serve("--backend", "cupy", cwd=tmp_path)
    assert done.returncode != 0
    assert '"ready"' not in done.stdout, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    assert "options.backend = 'cupy' cannot be used on this host" in done.stderr, done.stderr


@pytest.mark.parametrize("broken", ["missing", "not_a_key"])
def test_a_curve_key_directory_that_cannot_be_used_is_named_without_a_traceback(tmp_path, broken):
    keys = tmp_path / "keys"
    if broken == "not_a_key":
        (keys / "clients").mkdir(parents=True)
        (keys / "server.key_secret").write_text("not a key\n")
    done = _serve("--set", f"curve_keys_dir={keys}", cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert f"Error: curve_keys_dir {keys}:" in done.stderr, done.stderr
