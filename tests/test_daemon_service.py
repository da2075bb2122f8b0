"""The real daemon as a subprocess on loopback: streaming, concurrency, bad input, metrics, drain."""

from __future__ import annotations

import signal
import time
import urllib.request

import h5py
import numpy as np
import pytest
from daemon_support import Scan, start_daemon, synthetic_scan, wait_for
from prometheus_client.parser import text_string_to_metric_families

from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import ControlError
from cryoptycho.protocols.messages import ErrorEvent, Frames, Preview, Result, ScanEvent, encode
from cryoptycho.protocols.producer import Producer
from cryoptycho.protocols.subscriber import Subscriber

pytestmark = pytest.mark.subprocess

FAST = ("--set", "options.iterations=15", "--set", "refine_time_budget_s=20", "--set", "preview_hz=10",
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


def metrics_of(daemon) -> dict[str, float]:
    text = urllib.request.urlopen(daemon.metrics_url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def finished(scan_id: str):
    return lambda ev: isinstance(ev, ScanEvent) and ev.scan_id == scan_id and ev.event in ("finished", "failed")


def test_streamed_scan_previews_result_and_metrics(daemon, scan):
    sub = Subscriber(daemon.publish, latest_only=False)
    time.sleep(0.3)  # SUB connects asynchronously: a slow joiner would miss the first events
    with Producer(daemon.ingest) as producer:
        producer.start_scan(**scan.start_fields("one"))
        for lo in range(0, len(scan.frames), 16):
            producer.send_frames(scan.frames[lo : lo + 16])
            time.sleep(0.02)  # a microscope's pace: previews must come while acquiring
        producer.end_scan()
    events = collect(sub, finished("one"))
    sub.close()
    kinds = [(type(e).__name__, getattr(e, "event", "")) for e in events]
    assert ("ScanEvent", "finished") in kinds, daemon.log()
    ended_at = kinds.index(("ScanEvent", "ended"))
    assert any(k == ("Preview", "") for k in kinds[:ended_at]), "no preview while acquiring"
    result = next(e for e in events if isinstance(e, Result))
    err, flat = scan.score(result.object, result.origin_m)
    assert err < 0.7 * flat, f"NRMSE {err:.4f} vs flat-object {flat:.4f}"

    # the result file holds the reconstruction and the raw frames (NXcxi part from the spool)
    path = result.files["result"]
    with h5py.File(path) as f:
        raw = f["raw/entry_1/data_1/data"]
        assert raw.shape == scan.frames.shape
        np.testing.assert_array_equal(np.sort(f["raw/entry_1/data_1/frame_index"][()]), np.arange(len(scan.frames)))
        assert f["object"].shape == result.object.shape
    assert (daemon.workdir / "results" / "one.png").exists()
    assert (daemon.workdir / "results" / "one.mrc").exists()
    assert not list((daemon.workdir / "spool").glob("*.h5")), "a finished scan's spool is retired"

    m = metrics_of(daemon)
    assert m["cryoptycho_frames_received_total"] == len(scan.frames)
    assert m["cryoptycho_scans_total{outcome=finished}"] == 1
    assert m["cryoptycho_frame_to_preview_latency_seconds_count"] >= len(scan.frames)
    assert m["cryoptycho_iterations_total"] > 0
    assert m["cryoptycho_update_duration_seconds_count"] > 0
    assert m["cryoptycho_last_frame_timestamp_seconds"] > 0


def test_control_methods(daemon, scan):
    with ControlClient(daemon.control, timeout_s=5) as ctl:
        assert ctl.ping()["pong"] is True
        with pytest.raises(ControlError, match="unknown scan"):
            ctl.snapshot("nope")
        with pytest.raises(ControlError, match="unknown method"):
            ctl.call("reboot")
        with Producer(daemon.ingest) as producer:
            producer.start_scan(**scan.start_fields("ctl"))
            producer.send_frames(scan.frames[:128])
            wait_for(lambda: "object" in ctl.snapshot("ctl"), 30, "a snapshot with images", daemon)
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
            wait_for(lambda: ctl.list_scans()[0]["state"] == "aborted", 30, "the scan to abort", daemon)
            producer.abort("cancelled by the operator")  # a late abort is harmless
        m = metrics_of(daemon)
        assert m["cryoptycho_control_requests_total{method=cancel,success=true}"] == 1
        assert m["cryoptycho_scans_total{outcome=aborted}"] == 1
