"""Position refinement through the real daemon: a scan whose options ask for it finishes with
refined positions in the result file and the received ones beside them."""

from __future__ import annotations

import json
import signal

import h5py
import numpy as np
import pytest
from cryoptycho.protocols.subscriber import Subscriber
from daemon_support import PIXEL_M, start_daemon, stream_for_result, synthetic_scan, wait_subscribed

pytestmark = pytest.mark.subprocess


def test_scan_with_refine_positions_saves_refined_and_nominal_positions(tmp_path) -> None:
    scan = synthetic_scan(n_side=10)
    daemon = start_daemon(tmp_path, "--set", "options.iterations=12", "--set", "refine_time_budget_s=30")
    try:
        sub = Subscriber(daemon.publish, latest_only=False)
        wait_subscribed(daemon, sub)  # SUB connects asynchronously: a slow joiner would miss the first events
        options = {"refine_positions": True, "position_start_iteration": 3, "position_every": 3}
        result = stream_for_result(daemon, sub, scan.start_fields("pos", options=options), scan.frames)
        sub.close()
        with h5py.File(result.files["result"]) as f:
            refined = np.stack([f["probe_position_y_m"][()], f["probe_position_x_m"][()]], 1)
            nominal = np.stack([f["nominal_probe_position_y_m"][()], f["nominal_probe_position_x_m"][()]], 1)
        # the received positions, in arrival order (compared as sets of coordinates)
        np.testing.assert_allclose(np.sort(nominal, axis=0), np.sort(scan.positions, axis=0), rtol=0, atol=1e-16)
        moved = np.abs(refined - nominal).max()
        assert 0 < moved < 1.0 * PIXEL_M, moved
    finally:
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM)


def test_scan_asking_for_the_offline_only_searches_is_told_the_live_engine_skips_them(tmp_path) -> None:
    """``scan_search``, ``aberration_search`` and ``parallax_scan`` run before an offline
    reconstruction only: a live scan that asks for them gets one warning naming them (in its worker's thread), and
    still finishes with its result."""
    scan = synthetic_scan(n_side=8)
    daemon = start_daemon(tmp_path, "--set", "options.iterations=3")
    try:
        sub = Subscriber(daemon.publish, latest_only=False)
        wait_subscribed(daemon, sub)
        options = {"scan_search": True, "aberration_search": True, "aberrations": ["C10"], "parallax_scan": True}
        result = stream_for_result(daemon, sub, scan.start_fields("search", options=options), scan.frames)
        sub.close()
        assert result.files["result"]
    finally:
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM)
    # read after the stop, which waits until the test has copied every line the daemon wrote
    records = [json.loads(ln) for ln in list(daemon.log_lines) if ln.startswith("{")]
    warned = [r for r in records if r["level"] == "WARNING" and "offline only" in r["msg"]]
    assert len(warned) == 1, daemon.log()
    assert all(name in warned[0]["msg"] for name in ("aberration_search", "scan_search", "parallax_scan"))
    assert warned[0]["thread"] == "worker-search"
