"""The live browser viewer: image encoding, latest-only fan-out, snapshot-then-updates over a
real WebSocket against a fake daemon (real PUB and ROUTER sockets), the access token."""

from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest
import zmq
from cryoptycho.daemon.web import images
from cryoptycho.daemon.web.hub import ClientSlot, Hub
from cryoptycho.daemon.web.server import create_app
from cryoptycho.protocols.control import handle
from cryoptycho.protocols.messages import Metrics, Preview, Result, ScanEvent
from cryoptycho.protocols.topics import encode_event
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect


def test_encode_roundtrip_and_downsampling():
    rng = np.random.default_rng(0)
    img = rng.uniform(-0.3, 0.5, (600, 300))
    enc = images.encode(img, max_side=256, value_range=(-0.3, 0.5))
    assert enc.scale == 3 and enc.shape == (200, 100)
    back = images.decode(enc)
    block = img.reshape(200, 3, 100, 3).mean(axis=(1, 3))
    # 8-bit over a 0.8 rad range: half a quantum is 0.8 / 255 / 2
    assert np.max(np.abs(back - block)) <= 0.8 / 255 / 2 + 1e-9
    assert images.encode(np.full((8, 8), np.nan)).png  # all-NaN image still encodes


def test_specimen_phase_removes_ice_phase():
    obj = np.exp(1j * (1.3 + np.pad(np.full((4, 4), 0.2), 10)))
    phase = images.specimen_phase(obj)
    assert abs(float(np.median(phase))) < 1e-6
    assert phase.max() == pytest.approx(0.2, abs=1e-5)


def test_slot_keeps_only_newest_preview_but_every_event():
    import asyncio

    async def run():
        slot = ClientSlot()
        for i in range(10):
            slot.put({"kind": "preview", "scan_id": "a", "iteration": i})
        slot.put({"kind": "preview", "scan_id": "b", "iteration": 0})
        slot.put({"kind": "scan", "scan_id": "a", "state": "acquiring"})
        slot.put({"kind": "scan", "scan_id": "a", "state": "refining"})
        return slot, await slot.take()

    slot, got = asyncio.run(run())
    assert [m["state"] for m in got if m["kind"] == "scan"] == ["acquiring", "refining"]
    previews = {m["scan_id"]: m["iteration"] for m in got if m["kind"] == "preview"}
    assert previews == {"a": 9, "b": 0}
    assert slot.skipped == 9


def _preview(scan_id="s1", iteration=3, size=40):
    yy, xx = np.mgrid[:size, :size]
    phase = (0.3 * np.exp(-((yy - 20) ** 2 + (xx - 20) ** 2) / 50.0)).astype(np.float32)
    probe = np.exp(1j * np.linspace(0, 1, 16 * 16)).reshape(16, 16).astype(np.complex64)
    return Preview(scan_id, iteration, 100, 2e-10, (0.0, 0.0), phase, probe,
                   np.ones_like(phase), np.ones_like(phase))


def test_hub_folds_events_and_only_serves_announced_files(tmp_path):
    hub = Hub("tcp://127.0.0.1:1", "tcp://127.0.0.1:1")
    hub.apply(ScanEvent("s1", "acquiring", info={"expected_frames": 100}))
    hub.apply(Metrics("s1", frames_received=50, frames_used=40, iteration=7, loss=2.5, state="acquiring"))
    hub.apply(_preview())
    out = tmp_path / "s1.h5"
    out.write_bytes(b"result")
    obj = np.exp(1j * _preview().object_phase).astype(np.complex64)
    hub.apply(Result("s1", 20, 2e-10, (0.0, 0.0), obj, _preview().probe, np.zeros((3, 2)),
                     files={"hdf5": str(out)}))
    kinds = [m["kind"] for m in hub.state_messages()]
    assert kinds == ["scan", "metrics", "preview"]
    state = hub.state_messages()
    assert state[0]["state"] == "finished" and state[0]["files"] == ["hdf5"]
    assert [list(p) for p in state[1]["loss_history"]] == [[7, 2.5, 40]]  # iteration, loss, frames
    assert state[1]["state"] == "finished", "a late joiner's metrics must not carry an older state"
    assert state[2]["final"] is True
    assert hub.file_for("s1", "hdf5") == out
    assert hub.file_for("s1", "../../etc/passwd") is None
    assert hub.file_for("nope", "hdf5") is None


@pytest.fixture
def fake_daemon():
    """Real PUB and ROUTER sockets on random loopback ports; the ROUTER answers list_scans and
    snapshot like the daemon's control table."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    router = ctx.socket(zmq.ROUTER)
    ctl_port = router.bind_to_random_port("tcp://127.0.0.1")
    snap = _preview("late", 11)
    table = {
        "list_scans": lambda: {"scans": [{"scan_id": "late", "state": "acquiring", "expected_frames": 64}]},
        "snapshot": lambda scan_id: {
            "scan": {"scan_id": scan_id},
            "object": np.exp(1j * snap.object_phase).astype(np.complex64),
            "probe": snap.probe,
            "coverage": snap.coverage,
            "iteration": 11,
            "pixel_size_m": 2e-10,
            "origin_m": [0.0, 0.0],
        },
    }
    stop = threading.Event()

    def serve():
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                router.send_multipart(handle(router.recv_multipart(copy=False), table))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield pub, f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{ctl_port}"
    stop.set()
    thread.join(2)
    pub.close(0)
    router.close(0)
    ctx.term()


def _receive_until(ws, predicate, limit=50):
    for _ in range(limit):
        msg = ws.receive_json()
        if predicate(msg):
            return msg
    raise AssertionError("expected message never arrived")


def test_browser_gets_snapshot_then_live_updates(fake_daemon):
    pub, pub_ep, ctl_ep = fake_daemon
    app = create_app(Hub(pub_ep, ctl_ep), token="s3cret")
    with TestClient(app) as client:
        assert client.get("/").status_code == 401
        assert client.get("/?token=s3cret").status_code == 200
        assert "cryoptycho" in client.get("/?token=s3cret").text
        assert client.get("/static/app.js").status_code == 200
        assert client.get("/healthz").json()["ok"] is True
        with client.websocket_connect("/ws?token=s3cret") as ws:
            hello = ws.receive_json()
            assert hello == {"kind": "hello", "control": "ok"}
            late = _receive_until(ws, lambda m: m["kind"] == "preview")
            assert late["scan_id"] == "late" and late["iteration"] == 11
            assert late["phase"]["png"].startswith("data:image/png;base64,")
            # PUB drops messages until the viewer's SUB has joined: publish until the hub saw one
            deadline, attempt = time.monotonic() + 120, 0
            while True:
                pub.send_multipart(encode_event(Metrics("live", 10, 8, iteration=attempt, loss=1.0)),
                                   copy=False)
                pub.send_multipart(encode_event(_preview("live", attempt)), copy=False)
                state = client.get("/api/state?token=s3cret").json()
                if any(m.get("scan_id") == "live" and m["kind"] == "preview" for m in state):
                    break
                assert time.monotonic() < deadline, "the hub never received what was published"
                attempt += 1
                time.sleep(0.05)
            got = _receive_until(ws, lambda m: m["kind"] == "preview" and m["scan_id"] == "live")
            assert got["pixel_size_m"] == pytest.approx(2e-10)


def test_websocket_without_token_is_refused(fake_daemon):
    _, pub_ep, ctl_ep = fake_daemon
    app = create_app(Hub(pub_ep, ctl_ep), token="s3cret")
    with TestClient(app) as client, pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws") as ws:
        ws.receive_json()


def test_unreachable_daemon_is_reported_not_fatal():
    app = create_app(Hub("tcp://127.0.0.1:9", "tcp://127.0.0.1:9", control_timeout_s=0.2))
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        hello = ws.receive_json()
        assert hello["kind"] == "hello" and "unavailable" in hello["control"]


def _control(table):
    """A ROUTER on a random loopback port answering ``table`` like the daemon's control socket."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve():
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                router.send_multipart(handle(router.recv_multipart(copy=False), table))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close():
        stop.set()
        thread.join(2)
        router.close(0)
        ctx.term()

    return f"tcp://127.0.0.1:{port}", close


def test_viewer_opened_after_the_scan_shows_its_result_file(tmp_path):
    """Nothing was published while this viewer ran: the finished scan's images come from the
    result file its summary names, its figures from the summary, and the file is downloadable."""
    from cryoptycho.daemon.storage.result import write_result
    from cryoptycho.gpu.geometry import ScanGeometry
    from cryoptycho.gpu.state import ReconState

    phase = _preview().object_phase
    state = ReconState(object=np.exp(1j * phase).astype(np.complex64), probe=_preview().probe,
                       geometry=ScanGeometry(2e-10, (0.0, 0.0), phase.shape, (16, 16)),
                       iteration=30, energy=300e3)
    path = write_result(tmp_path / "done.h5", state)
    summaries = [
        {"scan_id": "done", "state": "finished", "result_path": str(path), "iteration": 30,
         "frames": {"received": 64, "duplicates": 0}, "frames_used": 64, "loss": 12.5,
         "resolution_m": float("inf"), "expected_frames": 64},
        {"scan_id": "elsewhere", "state": "finished", "result_path": str(tmp_path / "gone.h5")},
    ]
    ctl, close = _control({"list_scans": lambda: {"scans": summaries}})
    try:
        app = create_app(Hub("tcp://127.0.0.1:9", ctl))
        with TestClient(app) as client, client.websocket_connect("/ws") as ws:
            assert ws.receive_json() == {"kind": "hello", "control": "ok"}
            final = _receive_until(ws, lambda m: m["kind"] == "preview" and m["scan_id"] == "done")
            assert final["final"] and final["iteration"] == 30
            assert final["pixel_size_m"] == pytest.approx(2e-10)
            enc = final["phase"]
            png = base64.b64decode(enc["png"].split(",", 1)[1])
            back = images.decode(images.EncodedImage(png, *enc["range"], tuple(enc["shape"]), enc["scale"]))
            truth = images.specimen_phase(state.object)
            assert np.corrcoef(back.ravel(), truth.ravel())[0, 1] > 0.99  # the file's image, not a blank
            state_now = client.get("/api/state").json()  # also proves the state is valid JSON (no ∞)
            metrics = next(m for m in state_now if m["kind"] == "metrics" and m["scan_id"] == "done")
            assert metrics["resolution_m"] is None and metrics["resolution_note"] == "not resolved"
            assert (metrics["frames_received"], metrics["loss"]) == (64, 12.5)
            assert client.get("/files/done/result").content == path.read_bytes()
            missing = next(m for m in state_now if m["kind"] == "scan" and m["scan_id"] == "elsewhere")
            assert "not readable here" in missing["reason"] and "gone.h5" in missing["reason"]
    finally:
        close()


def test_unresolved_half_set_estimate_reaches_the_page_in_words():
    """A running scan whose half-set FRC resolved nothing (+∞ in the daemon's summary; the wire
    carries finite values only) is marked "not resolved", and a later metrics message without an
    estimate keeps the note."""
    summaries = [{"scan_id": "run", "state": "acquiring", "resolution_m": float("inf")}]
    ctl, close = _control({"list_scans": lambda: {"scans": summaries}})
    try:
        hub = Hub("tcp://127.0.0.1:9", ctl)
        hub.apply(Metrics("run", 10, 8, iteration=3, loss=1.0, state="acquiring"))
        hub.poll_once()
        assert hub.scans["run"].metrics["resolution_note"] == "not resolved"
        hub.apply(Metrics("run", 20, 16, iteration=4, loss=1.0, state="acquiring"))
        assert hub.scans["run"].metrics["resolution_note"] == "not resolved"
        hub.apply(Metrics("run", 30, 24, iteration=5, loss=1.0, resolution_m=9e-10, state="acquiring"))
        assert hub.scans["run"].metrics["resolution_note"] is None
        assert hub.scans["run"].metrics["resolution_m"] == 9e-10
    finally:
        close()


def test_worker_records_an_unresolved_estimate_but_keeps_it_off_the_gauge():
    from types import SimpleNamespace

    from cryoptycho.daemon.worker import ScanWorker

    figures, gauge = {}, []
    fake = SimpleNamespace(metrics=SimpleNamespace(resolution=SimpleNamespace(set=gauge.append)),
                           session=SimpleNamespace(update_figures=lambda **kw: figures.update(kw)))
    ScanWorker._resolution(fake, SimpleNamespace(estimate=lambda: float("inf")))
    assert figures == {"resolution_m": float("inf")} and gauge == []
    ScanWorker._resolution(fake, SimpleNamespace(estimate=lambda: 4e-10))
    assert figures == {"resolution_m": 4e-10} and gauge == [4e-10]


def test_the_daemon_publishes_a_per_frame_loss_that_does_not_grow_with_the_frames(tmp_path):
    """The figure the viewer plots, from the real daemon: as the frames used grow eightfold the
    loss stays within a factor 2 (a sum over the frames would grow eightfold)."""
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import start_daemon, synthetic_scan, wait_for

    scan = synthetic_scan(n_side=16)
    n, chunk = len(scan.frames), len(scan.frames) // 8
    daemon = start_daemon(tmp_path, "--set", "options.iterations=2", "--set", "refine_time_budget_s=2")
    points = []
    try:
        with ControlClient(daemon.control, timeout_s=30) as ctl, \
                Producer(daemon.ingest, control=daemon.control) as producer:
            def summary():
                return next((s for s in ctl.list_scans() if s["scan_id"] == "loss"), None)

            producer.start_scan(**scan.start_fields("loss"))
            for i in range(0, n - chunk, chunk):  # the last chunk is held back: still acquiring
                producer.send_frames(scan.frames[i:i + chunk])
                got = wait_for(lambda i=i: (s := summary()) and (s.get("frames_used") or 0) >= i + chunk
                               and s.get("loss") is not None and s, 60, "the frames folded in", daemon)
                points.append((got["frames_used"], got["loss"]))
            producer.send_frames(scan.frames[n - chunk:])
            producer.end_scan()
    finally:
        daemon.stop()
    assert points[-1][0] >= 7 * points[0][0], points
    losses = [loss for _, loss in points]
    assert max(losses) < 2 * min(losses), points


def test_a_script_reads_a_finished_scan_from_a_viewer_no_browser_opened(tmp_path):
    """/api/state and /files of a viewer started after the scan ended were empty and 404 until
    a browser connected (only the WebSocket caught up with the daemon)."""
    from cryoptycho.daemon.storage.result import write_result
    from cryoptycho.gpu.geometry import ScanGeometry
    from cryoptycho.gpu.state import ReconState

    phase = _preview().object_phase
    state = ReconState(object=np.exp(1j * phase).astype(np.complex64), probe=_preview().probe,
                       geometry=ScanGeometry(2e-10, (0.0, 0.0), phase.shape, (16, 16)),
                       iteration=30, energy=300e3)
    path = write_result(tmp_path / "early.h5", state)
    summaries = [{"scan_id": "early", "state": "finished", "result_path": str(path), "iteration": 30}]
    ctl, close = _control({"list_scans": lambda: {"scans": summaries}})
    try:
        with TestClient(create_app(Hub("tcp://127.0.0.1:9", ctl))) as client:
            assert client.get("/files/early/result").content == path.read_bytes()
            assert any(m["scan_id"] == "early" and m["kind"] == "scan" for m in client.get("/api/state").json())
    finally:
        close()


@pytest.mark.subprocess
def test_the_viewer_stops_on_sigterm_while_a_page_is_open(fake_daemon):
    """`cryoptycho view` exits by itself on SIGTERM while a page's WebSocket is open: the
    page's handler waits for the next preview and never returns, and the viewer waited for it
    for ever (callers killed it: viewer_server after 10 s)."""
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    import websockets.sync.client
    from daemon_support import wait_for

    _, pub_ep, ctl_ep = fake_daemon
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cryoptycho.daemon.cli", "view", "--publish", pub_ep,
                             "--control", ctl_ep, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            assert proc.poll() is None, f"the viewer exited (rc {proc.returncode})"
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
            except OSError:
                return False

        wait_for(up, 120, "the viewer to answer")
        with websockets.sync.client.connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as page:
            hello = json.loads(page.recv(timeout=60))
            assert hello["kind"] == "hello", hello
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(60)
            except subprocess.TimeoutExpired:
                raise AssertionError("the viewer ignored SIGTERM for 60 s with a page open") from None
        assert rc in (0, -signal.SIGTERM), rc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
