"""The real daemon as a subprocess on loopback: streaming, concurrency, bad input, metrics, drain."""

from __future__ import annotations

import os
import signal
import time

import h5py
import numpy as np
import pytest
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import ControlError, DeliveryError
from cryoptycho.protocols.messages import ErrorEvent, Frames, Preview, Result, ScanEvent, encode
from cryoptycho.protocols.producer import Producer
from cryoptycho.protocols.subscriber import Subscriber
from daemon_support import Scan, metrics_of, start_daemon, synthetic_scan, wait_for, wait_subscribed

pytestmark = pytest.mark.subprocess

ITERATIONS = 15
FAST = ("--set", f"options.iterations={ITERATIONS}", "--set", "refine_time_budget_s=20", "--set", "preview_hz=10",
        "--set", "resolution_interval_s=2")


@pytest.fixture(scope="module")
def scan() -> Scan:
    return synthetic_scan()


@pytest.fixture
def daemon(tmp_path):
    d = start_daemon(tmp_path, *FAST)
    yield d
    d.stop(signal.SIGKILL if d.proc.poll() is None else signal.SIGTERM)


def collect(sub: Subscriber, until, timeout: float = 90.0) -> list:
    """Events until ``until(event)`` is true (inclusive)."""
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = sub.recv(timeout_s=0.5)
        if ev is None:
            continue
        events.append(ev)
        if until(ev):
            return events
    raise AssertionError(f"no terminal event within {timeout} s; got {[type(e).__name__ for e in events]}")


def metrics_when(daemon, key: str, value: float) -> dict[str, float]:
    """The metrics once ``key`` reaches ``value`` (outcomes are counted when the manager reaps
    the scan's worker, just after the scan's final event is published)."""

    def reached() -> dict[str, float] | None:
        m = metrics_of(daemon)
        return m if m.get(key) == value else None

    return wait_for(reached, 60, f"{key} == {value}", daemon)


def finished(scan_id: str):
    return lambda ev: isinstance(ev, ScanEvent) and ev.scan_id == scan_id and ev.event in ("finished", "failed")


def test_streamed_scan_previews_result_and_metrics(daemon, scan):
    sub = Subscriber(daemon.publish, latest_only=False)
    wait_subscribed(daemon, sub)  # SUB connects asynchronously: a slow joiner would miss the first events
    with Producer(daemon.ingest, control=daemon.control) as producer:
        producer.start_scan(**scan.start_fields("one"))
        half = len(scan.frames) // 2
        for lo in range(0, half, 16):
            producer.send_frames(scan.frames[lo : lo + 16])
        # the scan is still acquiring: a preview of the first half must come before the rest
        early = collect(sub, lambda ev: isinstance(ev, Preview), timeout=30)
        assert early[-1].frames_used > 0 and early[-1].object_phase.ndim == 2
        for lo in range(half, len(scan.frames), 16):
            producer.send_frames(scan.frames[lo : lo + 16])
        producer.end_scan()
    events = early + collect(sub, finished("one"))
    sub.close()
    kinds = [(type(e).__name__, getattr(e, "event", "")) for e in events]
    assert ("ScanEvent", "finished") in kinds, daemon.log()
    assert kinds.index(("Preview", "")) < kinds.index(("ScanEvent", "ended"))
    result = next(e for e in events if isinstance(e, Result))
    scan.check_live(result.object, result.origin_m, ITERATIONS)

    # the result file holds the reconstruction and the raw frames (NXcxi part from the spool)
    path = result.files["result"]
    with h5py.File(path) as f:
        raw = f["raw/entry_1/data_1/data"]
        assert raw.shape == scan.frames.shape
        np.testing.assert_array_equal(np.sort(f["raw/entry_1/data_1/frame_index"][()]), np.arange(len(scan.frames)))
        assert f["object"].shape == result.object.shape
    # one naming scheme (storage/outputs.py), every file written listed in the result's files
    assert {k: os.path.basename(p) for k, p in result.files.items()} == {
        "result": "one.h5", "phase_mrc": "one.phase.mrc", "phase_png": "one.phase.png"}
    assert all(os.path.isfile(daemon.workdir / "results" / os.path.basename(p)) for p in result.files.values())
    assert not list((daemon.workdir / "spool").glob("*.h5")), "a finished scan's spool is retired"

    m = metrics_when(daemon, "cryoptycho_scans_total{outcome=finished}", 1)
    assert m["cryoptycho_frames_received_total"] == len(scan.frames)
    assert m["cryoptycho_frames_used_total"] == len(scan.frames)
    assert m["cryoptycho_frame_to_preview_latency_seconds_count"] >= len(scan.frames)
    assert m["cryoptycho_iterations_total"] > 0
    assert m["cryoptycho_update_duration_seconds_count"] > 0
    assert m["cryoptycho_last_frame_timestamp_seconds"] > 0


def test_control_methods(daemon, scan):
    with ControlClient(daemon.control, timeout_s=30) as ctl:
        assert ctl.ping()["pong"] is True
        with pytest.raises(ControlError, match="unknown scan"):
            ctl.snapshot("nope")
        with pytest.raises(ControlError, match="unknown method"):
            ctl.call("reboot")
        with Producer(daemon.ingest, control=daemon.control) as producer:
            producer.start_scan(**scan.start_fields("ctl"))
            producer.send_frames(scan.frames[:128])
            # ingest (PUSH) carries no acknowledgement: the control socket may be served first
            wait_for(lambda: any(s["scan_id"] == "ctl" for s in ctl.list_scans()), 120, "the scan to register", daemon)
            wait_for(lambda: "object" in ctl.snapshot("ctl"), 120, "a snapshot with images", daemon)
            snap = ctl.snapshot("ctl")
            assert snap["object"].ndim == 2 and snap["probe"].shape == (32, 32)
            assert snap["scan"]["state"] == "acquiring"
            assert ctl.set_options("ctl", {"stream": {"batch_size": 32}})["options"]["stream"]["batch_size"] == 32
            with pytest.raises(ControlError, match="backend"):
                ctl.set_options("ctl", {"backend": "cupy"})
            with pytest.raises(ControlError, match="batch_size"):
                ctl.set_options("ctl", {"stream": {"batch_size": 0}})
            status = ctl.status()
            assert status["running"] == ["ctl"]
            assert [s["scan_id"] for s in ctl.list_scans()] == ["ctl"]
            ctl.cancel("ctl", "test cancels")
            wait_for(lambda: ctl.list_scans()[0]["state"] == "aborted", 120, "the scan to abort", daemon)
            producer.abort("cancelled by the operator")  # a late abort is harmless
        # the manager counts the outcome when it reaps the worker, just after the state change
        m = metrics_when(daemon, "cryoptycho_scans_total{outcome=aborted}", 1)
        assert m["cryoptycho_control_requests_total{method=cancel,success=true}"] == 1
        assert m["cryoptycho_control_requests_total{method=set_options,success=false}"] == 2


def test_set_options_changes_a_queued_scan_before_its_worker_starts(tmp_path, scan):
    """set_options on an accepted scan waiting for a worker was refused (running_scan): an
    operator could not change a scan's options before it ran. Its worker now starts with them."""
    d = start_daemon(tmp_path, *FAST, "--max-concurrent-scans", "1", "--set", "max_queued_scans=1")
    try:
        with (ControlClient(d.control, timeout_s=30) as ctl, Producer(d.ingest, control=d.control) as one,
              Producer(d.ingest, control=d.control) as two):
            one.start_scan(**scan.start_fields("first"))  # holds the only slot: no scan_end
            wait_for(lambda: ctl.status()["running"] == ["first"], 120, "the first scan to run", d)
            two.start_scan(**scan.start_fields("queued"))
            wait_for(lambda: ctl.status()["waiting"] == ["queued"], 120, "the second scan to queue", d)
            reply = ctl.set_options("queued", {"iterations": 7, "stream": {"batch_size": 16}})
            assert reply["queued"] is True and reply["scope"] == "queued"
            assert (reply["options"]["iterations"], reply["options"]["stream"]["batch_size"]) == (7, 16)
            # checked as at scan_start: a backend not installed here is refused now, changing nothing
            with pytest.raises(ControlError, match="backend") as info:
                ctl.set_options("queued", {"backend": "cupy"})
            assert "params.options.backend" in str(info.value.reply), info.value.reply
            # an invalid value is named as set_options names it for any scan (PROTOCOL.md §6:
            # the option's path, pydantic's type as rule); a queued scan's said recon_options
            for bad, field, rule in (({"iterations": -1}, "params.options.iterations", "greater_than_equal"),
                                     ({"alpha_h": float("inf")}, "params.options.alpha_h", "finite_number")):
                with pytest.raises(ControlError) as info:
                    ctl.set_options("queued", bad)
                assert (info.value.reply.result["field"], info.value.reply.result["rule"]) == (field, rule), \
                    info.value.reply
            ctl.cancel("first", "the queued scan's turn")
            wait_for(lambda: ctl.status()["running"] == ["queued"], 120, "the queued scan to start", d)
            # the running worker's options are those set while it waited (the reply shows them)
            running = ctl.set_options("queued", {"mu0": 0.05})["options"]
            assert (running["iterations"], running["stream"]["batch_size"], running["backend"]) == (7, 16, "numpy")
            ctl.cancel("queued", "test ends")
    finally:
        d.stop(signal.SIGKILL if d.proc.poll() is None else signal.SIGTERM)


def _send_bad_messages(endpoint: str, scan: Scan) -> set[str]:
    """Send one message per kind of mistake on a raw PUSH socket; returns the expected rules."""
    import zmq

    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint)
    good = encode(Frames("conc-a", np.arange(2, dtype=np.uint32), scan.frames[:2]))
    push.send_multipart([b"\x00garbage"])  # not msgpack
    push.send_multipart(encode(Frames("ghost", np.arange(2, dtype=np.uint32), scan.frames[:2])))
    push.send_multipart(encode(Frames("conc-a", np.arange(2, dtype=np.uint32), scan.frames[:2, :16, :16])))
    push.send_multipart(good[:1])  # header promises arrays that are missing
    with Producer(endpoint, confirm=False) as p:  # it sends scans the daemon refuses, on purpose
        p.start_scan(**scan.start_fields("bad-options", options={"iterations": -1}))
        p.scan = None
        p.start_scan(**scan.start_fields("too-big", expected_frames=10_000_000, positions_m=None))
        p.scan = None
        p.start_scan(**scan.start_fields("conc-a"))  # a second start of a live scan
        p.scan = None
    push.close(linger=2000)
    return {"known_scan", "recon_options", "memory_budget", "unique_scan"}


def test_concurrent_scans_bad_messages_and_a_stalled_subscriber(tmp_path, scan):
    import threading

    import zmq

    daemon = start_daemon(tmp_path, *FAST, "--set", "host_memory_budget_bytes=2000000000")
    try:
        sub = Subscriber(daemon.publish, latest_only=False)
        stalled = zmq.Context.instance().socket(zmq.SUB)  # connected, never reads
        stalled.rcvhwm = 1
        stalled.setsockopt(zmq.SUBSCRIBE, b"")
        stalled.connect(daemon.publish)
        wait_subscribed(daemon, sub)
        other = synthetic_scan(seed=1)
        # read all along: a subscriber that stops reading loses events (PUB drops at its HWM)
        events: list = []
        reading = threading.Event()
        reading.set()

        def read() -> None:
            while reading.is_set():
                ev = sub.recv(timeout_s=0.2)
                if ev is not None:
                    events.append(ev)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        halfway = {"conc-a": threading.Event(), "conc-b": threading.Event()}
        resume = threading.Event()

        raised: dict[str, BaseException] = {}

        def stream(scan_id: str, data: Scan) -> None:
            try:
                with Producer(daemon.ingest, control=daemon.control) as producer:
                    producer.start_scan(**data.start_fields(scan_id))
                    for lo in range(0, len(data.frames), 32):
                        if lo == 128:  # the bad messages arrive while both scans acquire
                            halfway[scan_id].set()
                            resume.wait(60)
                        producer.send_frames(data.frames[lo : lo + 32])
                        time.sleep(0.02)
                    producer.end_scan()
            except BaseException as exc:  # noqa: BLE001 - asserted on below: a thread's exception is otherwise only a warning
                raised[scan_id] = exc

        threads = [threading.Thread(target=stream, args=a, daemon=True) for a in (("conc-a", scan), ("conc-b", other))]
        for t in threads:
            t.start()
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            wait_for(lambda: all(e.is_set() for e in halfway.values())
                     and {"conc-a", "conc-b"} <= {s["scan_id"] for s in ctl.list_scans()}, 120,
                     "both scans to register", daemon)
        expected_rules = _send_bad_messages(daemon.ingest, scan)
        wait_for(lambda: expected_rules <= {e.rule for e in list(events) if isinstance(e, ErrorEvent)}, 120,
                 "an error event for every bad message", daemon)
        resume.set()
        for t in threads:
            t.join(60)
        # the second scan_start of "conc-a" (one of the bad messages) was refused while the daemon
        # held the scan: its sender is told at end_scan that the scan may hold another sender's frames
        assert set(raised) == {"conc-a"} and isinstance(raised["conc-a"], DeliveryError), raised
        assert "refused 1 more scan_start" in str(raised["conc-a"]), raised

        def finished_scans() -> set[str]:
            ends = [e for e in list(events) if isinstance(e, ScanEvent) and e.event in ("finished", "failed")]
            assert all(e.event == "finished" for e in ends), (ends, daemon.log())
            return {e.scan_id for e in ends}

        wait_for(lambda: finished_scans() == {"conc-a", "conc-b"}, 90, "both scans to finish", daemon)
        reading.clear()
        reader.join(5)
        rules = {e.rule for e in events if isinstance(e, ErrorEvent)}
        assert expected_rules <= rules, rules
        errors = [e for e in events if isinstance(e, ErrorEvent)]
        assert len(errors) >= 7 and all(e.field and e.rule and e.message for e in errors), errors
        assert {"data", "options.iterations", "expected_frames", "scan_id"} <= {e.field for e in errors}, errors
        results = {e.scan_id: e for e in events if isinstance(e, Result)}
        for scan_id, data in (("conc-a", scan), ("conc-b", other)):
            data.check_live(results[scan_id].object, results[scan_id].origin_m, ITERATIONS)
        m = metrics_of(daemon)
        assert m["cryoptycho_frames_received_total"] == 2 * len(scan.frames)
        assert m["cryoptycho_scans_total{outcome=refused}"] >= 2
        assert m["cryoptycho_frames_dropped_total{reason=unknown_scan}"] == 2  # the "ghost" message
        assert m["cryoptycho_frames_dropped_total{reason=invalid}"] == 2  # the 16×16 frames
        assert sum(v for k, v in m.items() if k.startswith("cryoptycho_messages_rejected_total")) >= 6
        stalled.close(linger=0)
        sub.close()
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_kill_9_then_recover_from_spool(tmp_path, scan):
    from cryoptycho.daemon.storage.spool import read_spool

    daemon = start_daemon(tmp_path, *FAST)
    with ControlClient(daemon.control, timeout_s=30) as ctl, Producer(daemon.ingest, control=daemon.control) as producer:
        producer.start_scan(**scan.start_fields("crash"))
        producer.send_frames(scan.frames[:160])
        received = wait_for(
            lambda: ctl.status()["scans"].get("crash", {}).get("frames", {}).get("received", 0) >= 160,
            120, "160 frames received", daemon)
        assert received
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        producer.scan = None
    spooled = read_spool(tmp_path / "spool" / "crash.spool.h5")
    assert spooled.status == "open"
    np.testing.assert_array_equal(np.sort(spooled.indices), np.arange(160))
    np.testing.assert_array_equal(spooled.frames[np.argsort(spooled.indices)], scan.frames[:160])

    # the restarted daemon finds the scan and waits briefly for its producer; none comes, and the
    # scan (160 of its frames) is aborted with them kept, as a live one whose sender went silent;
    # finish_scan reconstructs them
    daemon = start_daemon(tmp_path, *FAST, "--set", "recover_wait_s=1")
    try:
        sub = Subscriber(daemon.publish, latest_only=False)
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            stopped = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "crash"
                                             and s["state"] in ("finished", "aborted", "failed")), None),
                               90, "the recovered scan to stop", daemon)
            assert stopped["state"] == "aborted" and f"after 160 of {len(scan.frames)} frames" in stopped["error"], stopped
            ctl.finish_scan("crash")
            wait_for(lambda: any(s["scan_id"] == "crash" and s["state"] == "finished" for s in ctl.list_scans()),
                     90, "the recovered scan to finish", daemon)
            info = next(s for s in ctl.list_scans() if s["scan_id"] == "crash")
        assert info["recovered"] is True and info["frames"]["received"] == 160
        with h5py.File(info["result_path"]) as f:
            assert f["raw/entry_1/data_1/data"].shape[0] == 160
        sub.close()
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_sigterm_drains_and_keeps_open_scans_for_recovery(tmp_path, scan):
    from cryoptycho.daemon.storage.spool import read_spool

    daemon = start_daemon(tmp_path, *FAST)
    with ControlClient(daemon.control, timeout_s=30) as ctl, Producer(daemon.ingest, control=daemon.control) as producer:
        producer.start_scan(**scan.start_fields("drain"))
        producer.send_frames(scan.frames[:100])
        # acquiring, with every frame sent on disk: a drain stops reading ingest, and keeps what it read
        wait_for(lambda: (s := ctl.status()["scans"].get("drain", {})).get("state") == "acquiring"
                 and s["frames"]["received"] == 100, 120, "the scan to acquire its 100 frames", daemon)
        assert daemon.stop(signal.SIGTERM) == 0
        producer.scan = None
    assert "draining" in daemon.log()
    spooled = read_spool(tmp_path / "spool" / "drain.spool.h5")
    assert spooled.status == "open" and len(spooled.indices) == 100
