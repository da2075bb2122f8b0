"""What a facility meets after months of running a regular install: clients that hold
connections open without finishing a request, scanners, viewers left open, signals from the
operator and the init system. Field-QA round 4; every test runs the real daemon (and viewer) as
subprocesses."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cryoptycho.daemon.bench.view import viewer_server
from daemon_support import cli_command, start_daemon, start_dectris_sim, wait_for

pytestmark = pytest.mark.subprocess


def _hung_up(sock: socket.socket) -> bool:
    """True once the peer closed the non-blocking ``sock``."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False


def test_the_viewer_hangs_up_on_clients_that_never_finish_a_request(tmp_path):
    """uvicorn closes an idle keep-alive connection but waited for ever for a request's headers:
    every connection that sent half a request (slowloris), or nothing at all (a port scanner, a
    proxy's pre-opened socket), held one of the viewer's file descriptors for good. With the
    usual limit of 1,024 (a container's or a systemd unit's soft limit) they ran out and no
    browser could open the page until the holder let go. Such connections are now closed; a
    browser's page (its WebSocket) and requests meanwhile are served."""
    import websockets.sync.client

    daemon = start_daemon(tmp_path)
    socks: list[socket.socket] = []
    # the viewer's header deadline scaled down 5x (2 s, not 10 s): the same hang-up, waited for in
    # a fifth of the time
    cli = cli_command({"cryoptycho.daemon.web.server.REQUEST_HEADER_TIMEOUT_S": 2.0})
    try:
        with viewer_server(daemon.publish, daemon.control, cli=cli) as url:
            port = int(url.rsplit(":", 1)[1].strip("/"))
            with websockets.sync.client.connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as page:
                assert '"hello"' in page.recv(timeout=60)
                for i in range(30):
                    s = socket.create_connection(("127.0.0.1", port), timeout=60)
                    if i % 3 == 0:
                        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
                    elif i % 3 == 1:  # a whole request, then half of the next one on the same connection
                        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                        assert s.recv(4096).startswith(b"HTTP/1.1 200")
                        s.sendall(b"GET /api/state HTTP/1.1\r\n")
                    s.setblocking(False)
                    socks.append(s)  # i % 3 == 2: connects and sends nothing
                assert urllib.request.urlopen(url + "healthz", timeout=30).status == 200
                open_ = set(range(len(socks)))

                def all_hung_up() -> bool:
                    open_.difference_update([i for i in open_ if _hung_up(socks[i])])
                    return not open_

                wait_for(all_hung_up, 60, "the viewer to hang up on the 30 connections")
                assert page.ping().wait(30), "the page's WebSocket was closed with them"
            assert urllib.request.urlopen(url + "api/state", timeout=30).status == 200
    finally:
        for s in socks:
            s.close()
        assert daemon.stop() == 0, daemon.log()


def _serve(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`cryoptycho serve` with ``args`` on free ports, run until it exits by itself."""
    return subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", "serve", "--ingest", "tcp://127.0.0.1:*",
                           "--publish", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*", "--metrics-port", "0",
                           *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_a_config_file_that_is_not_utf8_is_named_without_a_traceback(tmp_path):
    """A site config edited on a Windows desktop carries a Latin-1 comment ("Ångström"): TOML
    is UTF-8, and `serve` ended in a UnicodeDecodeError traceback from tomllib instead of
    naming the file and what to do."""
    config = tmp_path / "site.toml"
    config.write_bytes("# camera length in \u00c5ngstr\u00f6m\npreview_hz = 4\n".encode("latin-1"))
    done = _serve("--config", str(config), cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert str(config) in done.stderr and "UTF-8" in done.stderr, done.stderr


def test_a_config_path_that_cannot_be_read_is_named(tmp_path):
    """load_config (a Python embedding of the service, without click's checks) given a
    path it cannot read — a directory here; as the unit's User=, a root-owned 0600 file — raised
    the bare OSError; it names the file now."""
    from cryoptycho.daemon.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"cannot read config file {tmp_path}"):
        load_config(tmp_path)


def test_a_viewer_left_open_keeps_the_images_of_only_its_newest_ended_scans(tmp_path):
    """The viewer kept every scan it had seen with its final images: a viewer open for months
    (compose's viewer profile) grew with every scan, and every newly opened page first
    downloaded all of them (measured: /api/state 0.5 MB after 50 tiny scans, 2.0 MB after 200,
    linear). Like the daemon, it keeps the images of only its newest ended scans; every scan
    it remembers stays listed with its result files."""
    import json

    import websockets.sync.client
    from cryoptycho.daemon.web.hub import ENDED_PREVIEWS_KEPT
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import publish_probe_until, synthetic_scan

    scan = synthetic_scan(n_side=5, m=32)
    daemon = start_daemon(tmp_path, "--set", "options.iterations=2", "--set", "refine_time_budget_s=0.5",
                          "--set", "output_formats=[\"h5\"]")
    ids = [f"night-{i:02d}" for i in range(ENDED_PREVIEWS_KEPT + 4)]
    try:
        with viewer_server(daemon.publish, daemon.control) as url, \
                ControlClient(daemon.control, timeout_s=30) as ctl:
            port = int(url.rsplit(":", 1)[1].strip("/"))
            with websockets.sync.client.connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as page:

                def hub_got_an_event() -> bool:  # the viewer's subscription is live: no Result missed
                    try:
                        return '"error"' in page.recv(timeout=0.05)
                    except TimeoutError:
                        return False

                publish_probe_until(daemon, hub_got_an_event, "the viewer to receive the daemon's events")
            for sid in ids:
                with Producer(daemon.ingest, control=daemon.control) as producer:
                    producer.start_scan(**scan.start_fields(sid))
                    producer.send_frames(scan.frames)
                    producer.end_scan()
                wait_for(lambda sid=sid: any(s["scan_id"] == sid and s["state"] == "finished"
                                             for s in ctl.list_scans()), 120, f"{sid} to finish", daemon)

            def state() -> list[dict]:
                return json.loads(urllib.request.urlopen(url + "api/state", timeout=30).read())

            def every_result_seen() -> bool:  # the viewer folds the published results on its own thread
                scans = [m for m in state() if m["kind"] == "scan"]
                return len(scans) == len(ids) and all(m["files"] for m in scans)

            wait_for(every_result_seen, 60, "the viewer to hold every scan's result", daemon)
            messages = state()
            assert [m["scan_id"] for m in messages if m["kind"] == "scan"] == ids
            imaged = [m["scan_id"] for m in messages if m["kind"] == "preview"]
            assert imaged == ids[-ENDED_PREVIEWS_KEPT:]
            assert all(m["final"] for m in messages if m["kind"] == "preview")
            first = next(m for m in messages if m["kind"] == "scan")  # its images are gone, not its files
            for kind in first["files"]:
                assert urllib.request.urlopen(url + f"files/{first['scan_id']}/{kind}", timeout=30).status == 200
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_the_viewer_forgets_the_oldest_ended_scans_beyond_what_the_daemon_lists():
    """The viewer's memory of ended scans is bounded like the daemon's history; running scans
    are never forgotten, however many scans ended since they started."""
    import numpy as np
    from cryoptycho.daemon.web.hub import ENDED_PREVIEWS_KEPT, ENDED_SCANS_KEPT, Hub
    from cryoptycho.protocols.messages import Result, ScanEvent

    hub = Hub("tcp://127.0.0.1:9", "tcp://127.0.0.1:9")
    hub.apply(ScanEvent("long-running", "acquiring"))
    obj = np.ones((24, 24), np.complex64)
    probe = np.ones((8, 8), np.complex64)
    n = ENDED_SCANS_KEPT + 40
    for i in range(n):
        sid = f"s{i:04d}"
        hub.apply(ScanEvent(sid, "acquiring"))
        hub.apply(Result(sid, 2, 1e-10, (0.0, 0.0), obj, probe, np.zeros((1, 2)), files={"h5": f"/r/{sid}.h5"}))
        hub.apply(ScanEvent(sid, "finished"))
    kept = [sid for sid in hub.scans if sid != "long-running"]
    assert kept == [f"s{i:04d}" for i in range(n - ENDED_SCANS_KEPT, n)]
    assert "long-running" in hub.scans
    assert [sid for sid, v in hub.scans.items() if v.preview is not None] == kept[-ENDED_PREVIEWS_KEPT:]
    assert hub.file_for(kept[0], "h5") is not None


def test_a_misspelt_broker_environment_variable_is_named_at_start(tmp_path):
    """`serve` names a CRYOPTYCHO_* variable that sets nothing; the broker (whose systemd unit
    takes its daemons from CRYOPTYCHO_BROKER_BACKENDS in broker.env) ignored a misspelt one in
    silence: CRYOPTYCHO_BROKER_BACKEND started it with no daemon, waiting for registrations
    that never come, and every scan sent to it waited."""
    import os
    import signal

    env = {**os.environ, "CRYOPTYCHO_BROKER_BACKEND": "tcp://127.0.0.1:5600,control=tcp://127.0.0.1:5602",
           "CRYOPTYCHO_BROKER_HOLD_BYTES": "100000000"}
    proc = subprocess.Popen([sys.executable, "-m", "cryoptycho.daemon.cli", "broker", "--ingest", "tcp://127.0.0.1:*",
                             "--control", "tcp://127.0.0.1:*"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # up to the line saying it routes: the check comes before it
            lines.append(line)
            if "broker ingest" in line:
                break
        log = "".join(lines)
        assert "CRYOPTYCHO_BROKER_BACKEND " in log and "ignored" in log, log
        assert "CRYOPTYCHO_BROKER_HOLD_BYTES" not in log, log  # a variable it does take
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_watch_left_open_keeps_bars_for_running_and_the_newest_ended_scans_only():
    """`cryoptycho watch` on a control-room terminal added a progress bar per scan and never
    removed one; rich renders every bar at each refresh (10 Hz), so the cost grew with every
    scan (measured: one refresh 63 ms with 10 bars, 470 ms with 300, 1.1 s with 1,000 on the
    loaded 2-core box: a whole core, beside the daemon). Ended scans' bars beyond the newest
    ENDED_BARS now go, also those seeded from the daemon's history; running scans keep theirs."""
    import io

    from cryoptycho.daemon.commands.watch import ENDED_BARS, Board
    from cryoptycho.protocols.messages import Metrics, ScanEvent
    from rich.console import Console
    from rich.progress import Progress, TextColumn

    progress = Progress(TextColumn("{task.description}"), TextColumn("{task.fields[info]}"),
                        console=Console(file=io.StringIO(), force_terminal=True))
    board = Board(progress, None)
    board.seed([{"scan_id": f"old-{i}", "state": "finished", "expected_frames": 4} for i in range(40)]
               + [{"scan_id": "still-open", "state": "acquiring", "expected_frames": 4}])
    for i in range(300):
        sid = f"night-{i:03d}"
        board.on_event(ScanEvent(sid, "acquiring", info={"expected_frames": 4}))
        board.on_event(Metrics(sid, frames_received=4, frames_used=4, iteration=1, loss=1.0, state="acquiring"))
        board.on_event(ScanEvent(sid, ("finished", "failed", "aborted")[i % 3]))
    shown = [task.description for task in progress.tasks]
    assert shown == ["still-open", *[f"night-{i:03d}" for i in range(300 - ENDED_BARS, 300)]]


def test_dectris_sim_delivers_every_series_to_a_slower_receiver_before_it_exits():
    """`dectris-sim --series N` queued every series ahead of a receiver slower than itself
    (SNDHWM 100,000 messages), said "sent" for each, and exited 2 s after the last: the queued
    rest was dropped. Against the daemon, 150 series sent made 12 scans — a facility's
    acceptance run would report 138 series lost by the daemon. It now waits until the
    receiver has taken every message."""
    import zmq

    series, images = 12, 16
    sim = subprocess.Popen([sys.executable, "-m", "cryoptycho.daemon.cli", "dectris-sim", "--port", "0",
                            "--series", str(series), "--frames", str(images), "--size", "256",
                            "--compression", "none"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    try:
        assert sim.stdout is not None
        line = sim.stdout.readline()
        pull.setsockopt(zmq.RCVHWM, 1)
        pull.setsockopt(zmq.RCVBUF, 65536)
        pull.connect(line[line.index("tcp://"):].split()[0])
        received = 0
        while True:  # a receiver slower than the sender: one message at a time, 20 ms each
            if not pull.poll(1000):
                if sim.poll() is not None:
                    break  # the sender is gone and nothing more arrives
                continue
            pull.recv_multipart()
            received += 1
            time.sleep(0.02)  # the pace of a busy receiver (no event is awaited here)
        assert sim.wait(60) == 0
        assert received == series * (images + 2), f"{received} of {series * (images + 2)} messages"
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait(10)
        pull.close(linger=0)
        ctx.term()


def test_detector_series_arriving_faster_than_reconstruction_are_queued_not_refused(tmp_path):
    """A detector streams series back to back (a tilt series, a montage of small areas) faster
    than the daemon reconstructs them. Beyond max_concurrent_scans + max_queued_scans, each
    further series was refused as if a producer of our protocol could send it again — a
    detector cannot: every frame of it was dropped ("unknown_scan"; 150 unpaced series with
    the defaults made 15 scans and 85 refusals). A detector's series now waits in the spool
    however many are queued, and each is reconstructed in turn."""
    from daemon_support import metrics_of

    series = 5
    sim, url = start_dectris_sim("--series", str(series), "--frames", "36", "--size", "32",
                                 stderr=subprocess.DEVNULL)
    daemon = None
    try:
        daemon = start_daemon(tmp_path, "--source", url, "--set", "options.iterations=2",
                              "--set", "refine_time_budget_s=0.5", "--set", "max_concurrent_scans=1",
                              "--set", "max_queued_scans=1", "--set", "output_formats=[\"h5\"]")

        def outcomes() -> dict[str, float]:
            m = metrics_of(daemon)
            return {o: m.get(f"cryoptycho_scans_total{{outcome={o}}}", 0) for o in ("finished", "refused", "failed")}

        wait_for(lambda: sum(outcomes().values()) >= series, 240, f"{series} series to end", daemon)
        assert outcomes() == {"finished": series, "refused": 0, "failed": 0}, daemon.log()
        assert metrics_of(daemon).get("cryoptycho_frames_dropped_total{reason=unknown_scan}", 0) == 0
        assert sim.wait(60) == 0
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait(10)
        if daemon is not None:
            assert daemon.stop() == 0, daemon.log()


def test_a_second_ctrl_c_cuts_the_drain_short_and_keeps_the_scan(tmp_path):
    """Ctrl-C drains: a scan past scan_end may finish for drain_timeout_s. A second Ctrl-C (an
    operator who does not want to wait) did nothing until that timeout ran out; it now stops
    the refining scan at once, kept in the spool like any interrupted scan, and the next start
    finishes it. Two signals at once (one stop, forwarded twice) are not a second Ctrl-C."""
    import signal

    from cryoptycho.daemon.service import SECOND_SIGNAL_AFTER_S
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import synthetic_scan

    # low counts and a sparse prior denoising every iteration: a refinement of minutes
    scan = synthetic_scan(n_side=6, m=32, counts=20)
    slow = ("--set", "options.iterations=1000000", "--set", "options.prior=sparse", "--set", "options.denoise_every=1",
            "--set", "refine_time_budget_s=600", "--set", "drain_timeout_s=600")
    daemon = start_daemon(tmp_path, *slow)
    with ControlClient(daemon.control, timeout_s=30) as ctl:
        with Producer(daemon.ingest, control=daemon.control) as producer:
            producer.start_scan(**scan.start_fields("long-refine"))
            producer.send_frames(scan.frames)
            producer.end_scan()
        wait_for(lambda: any(s["state"] == "refining" for s in ctl.list_scans()), 120, "the scan to refine", daemon)
    # one Ctrl-C as a wrapper forwards it (`timeout`, a shell's trap, tini -g: the terminal's
    # SIGINT and the wrapper's copy) or systemd's SendSIGHUP=yes sends it: two signals at once,
    # which cut the drain as a second Ctrl-C did; now taken as one stop (SECOND_SIGNAL_AFTER_S)
    daemon.proc.send_signal(signal.SIGINT)
    daemon.proc.send_signal(signal.SIGTERM)
    # (either may be handled first: the kernel hands them to any of the daemon's threads, and
    # CI once saw SIGTERM's drain, then SIGINT taken as its copy)
    wait_for(lambda: "draining (SIGINT)" in daemon.log() or "draining (SIGTERM)" in daemon.log(), 60,
             "the drain to begin", daemon)
    wait_for(lambda: "taken as the same stop" in daemon.log(), 60, "the copy to be logged", daemon)
    time.sleep(SECOND_SIGNAL_AFTER_S + 0.2)  # (by the daemon's clock too: the drain began after the first)
    assert daemon.proc.poll() is None and "stop requested again" not in daemon.log(), daemon.log()
    assert daemon.stop(signal.SIGINT, timeout=60) == 0, daemon.log()  # before: 600 s
    assert "stop requested again" in daemon.log(), daemon.log()
    assert "long-refine (ended" in daemon.log(), daemon.log()  # kept in the spool, past its scan_end
    again = start_daemon(tmp_path, "--set", "options.iterations=2", "--set", "refine_time_budget_s=1")
    try:
        with ControlClient(again.control, timeout_s=30) as ctl:
            wait_for(lambda: any(s["scan_id"] == "long-refine" and s["state"] == "finished"
                                 for s in ctl.list_scans()), 120, "the kept scan to finish after the restart", again)
    finally:
        assert again.stop() == 0, again.log()


def _spool_fds(pid: int, spool_dir: Path) -> list[str]:
    """The spool files (HDF5, journal) of detector series that process ``pid`` holds open."""
    out = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = str(fd.readlink())
        except FileNotFoundError:  # closed while listed
            continue
        if target.startswith(str(spool_dir / "dectris-")) and ".spool." in target:
            out.append(target)
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts file descriptors in /proc")
def test_queued_detector_series_hold_no_file_descriptors(tmp_path):
    """Each detector series waiting in the queue kept its spool file and journal open: two file
    descriptors per queued series, so some 500 waiting series reached a 1,024 fd limit (and every
    spool after failed). An ended series waiting for a worker now has its spool closed; its
    worker re-opens it, and every series still finishes with all its frames."""
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import synthetic_scan

    series, frames = 12, 16
    with socket.socket() as probe:  # the detector's port, bound by the simulator once a scan holds the slot
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = start_daemon(tmp_path, "--source", f"dectris2://127.0.0.1:{port}", "--set", "options.iterations=2",
                          "--set", "refine_time_budget_s=0.5", "--set", "max_concurrent_scans=1",
                          "--set", "max_queued_scans=1", "--set", "output_formats=[\"h5\"]")
    sim = None
    try:
        with ControlClient(daemon.control, timeout_s=30) as ctl, \
                Producer(daemon.ingest, control=daemon.control) as holder:
            holder.start_scan(**synthetic_scan(n_side=4, m=32).start_fields("holder"))  # the only slot, no end
            wait_for(lambda: ctl.status()["running"] == ["holder"], 120, "the holder scan to run", daemon)
            sim, _ = start_dectris_sim("--port", str(port), "--series", str(series), "--frames", str(frames),
                                       "--size", "32")

            def all_queued() -> bool:
                status = ctl.status()
                return (len(status["waiting"]) == series
                        and all(status["scans"][sid]["ended"] for sid in status["waiting"]))

            wait_for(all_queued, 240, f"{series} ended series to wait for a worker", daemon)
            spool_dir = (tmp_path / "spool").resolve()
            open_now: list[str] = []

            def closed() -> bool:  # their closes run on the spool-close thread
                open_now[:] = _spool_fds(daemon.proc.pid, spool_dir)
                return not open_now

            try:
                wait_for(closed, 60, "the queued series' spool files to be closed")
            except AssertionError:
                raise AssertionError(f"{len(open_now)} spool files open while {series} series wait: "
                                     f"{sorted(open_now)[:4]}…") from None
            # a queued series' options are still kept with its spool (opened for it, closed again)
            first = ctl.status()["waiting"][0]
            assert ctl.set_options(first, {"iterations": 3})["queued"] is True
            assert _spool_fds(daemon.proc.pid, spool_dir) == []
            ctl.cancel("holder", "the queued series' turn")

            def finished() -> list[dict]:
                done = ctl.list_scans("finished")
                return done if len(done) == series else []

            done = wait_for(finished, 240, f"the {series} series to finish", daemon)
            assert sorted(s["frames"]["received"] for s in done) == [frames] * series, done
            assert not ctl.list_scans("failed"), ctl.list_scans("failed")
    finally:
        if sim is not None and sim.poll() is None:
            sim.kill()
            sim.wait(10)
        assert daemon.stop() == 0, daemon.log()


def test_watch_does_not_bring_back_the_bar_of_an_ended_scan_on_a_late_event():
    """A late event of a scan whose bar was dropped (a metrics or result published after its
    end, a repeated end) made it a new bar, which nothing ended again: it stayed for ever, and
    with it the cost of rendering it. Late events now change no bar (a result is still counted);
    a scan re-opened by `finish_scan` (announced again) gets its bar back."""
    import io

    import numpy as np
    from cryoptycho.daemon.commands.watch import ENDED_BARS, Board
    from cryoptycho.protocols.messages import Metrics, Result, ScanEvent
    from rich.console import Console
    from rich.progress import Progress, TextColumn

    progress = Progress(TextColumn("{task.description}"), TextColumn("{task.fields[info]}"),
                        console=Console(file=io.StringIO(), force_terminal=True))
    board = Board(progress, None)
    for i in range(ENDED_BARS + 5):
        sid = f"scan-{i:02d}"
        board.on_event(ScanEvent(sid, "acquiring", info={"expected_frames": 4}))
        board.on_event(ScanEvent(sid, "finished"))
    newest = [f"scan-{i:02d}" for i in range(5, ENDED_BARS + 5)]
    assert [t.description for t in progress.tasks] == newest
    for sid in ("scan-00", "scan-01", "scan-02"):  # dropped: their late events come in
        board.on_event(Metrics(sid, frames_received=4, frames_used=4, iteration=9, loss=1.0, state="refining"))
        board.on_event(Result(sid, iterations=9, pixel_size_m=1e-10, origin_m=(0.0, 0.0),
                              object=np.ones((4, 4), np.complex64), probe=np.ones((2, 2), np.complex64),
                              positions_m=np.zeros((4, 2))))
        board.on_event(ScanEvent(sid, "finished"))
    assert [t.description for t in progress.tasks] == newest  # before: scan-00 … 02 came back, for good
    assert board.results == 3
    board.on_event(ScanEvent("scan-00", "accepted", info={"reopened": True, "expected_frames": 4}))
    assert [t.description for t in progress.tasks] == [*newest, "scan-00"]


def test_an_operators_first_ctrl_c_after_a_stop_the_daemon_asked_for_is_a_first(tmp_path):
    """A failed detector source stops the daemon (request_stop without a signal); an operator's
    Ctrl-C a while later was taken as a second press and cut the drain (and one within the
    copy window was logged as a forwarded copy of a stop no signal made)."""
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.service import SECOND_SIGNAL_AFTER_S, BackgroundService

    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r")
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        svc.request_stop("detector source failed")
        time.sleep(SECOND_SIGNAL_AFTER_S + 0.2)
        svc.request_stop("SIGINT", again_hurries=True)  # the operator's first press
        assert not svc._hurry.is_set()
        time.sleep(SECOND_SIGNAL_AFTER_S + 0.2)
        svc.request_stop("SIGINT", again_hurries=True)  # and the second
        assert svc._hurry.is_set()
    finally:
        bg.stop()
