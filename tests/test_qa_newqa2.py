"""Second-wave QA of this session's merged branches (ingest15, lowfreq, realprobe, fieldqa4):
one test per defect found, plus the attacks that held and are cheap enough to keep."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest


def test_a_lowfreq_boost_past_single_precision_is_refused_by_serve_naming_it() -> None:
    """A boost above float32's range (1e39) passed validation (≥ 1, finite), then the filter's
    float32 weight was inf and every scan failed at CG's first iteration with "objective
    became non-finite". It is refused up front now, naming the option; the bound itself keeps
    the weight finite."""
    from cryoptycho.gpu.cg import LowFrequencyPreconditioner
    from cryoptycho.gpu.options import ReconOptions
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lowfreq_boost"):
        ReconOptions(lowfreq_boost=1e39)
    top = ReconOptions(lowfreq_boost=1e6).lowfreq_boost
    weight = LowFrequencyPreconditioner(np.ones((16, 16), np.float32), 0.05, top).weight
    assert weight.dtype == np.float32 and np.isfinite(weight).all()

    # through the console script: serve stops before binding anything, naming the option
    proc = subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", "serve", "--set",
                           "options.lowfreq_boost=1e39"], check=False, capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    assert proc.returncode != 0
    assert "options.lowfreq_boost" in proc.stderr and "less than or equal" in proc.stderr, proc.stderr


def test_detector_series_queued_beyond_the_soft_open_file_limit_keep_their_spools(tmp_path) -> None:
    """Since fieldqa4 a detector's series wait uncapped, each with its spool's two files open.
    Under the usual soft limit of 1,024 open files (systemd's default, a login shell's) some
    500 series queued behind a long reconstruction ran out of descriptors: "Too many open
    files" failed the scans being closed and the spools being opened. serve raises its soft
    limit to the hard one (systemd: 524,288), as a server holding a file per queued job must.
    Here the daemon starts with a soft limit of 96 (under the machine's hard one), and 60
    series (120 spool files) queue behind the first."""
    import resource

    from cryoptycho.protocols.control import ControlClient
    from daemon_support import metrics_of, start_daemon, start_dectris_sim, wait_for

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 512:
        pytest.skip(f"the hard open-file limit here ({hard}) leaves no room above the soft one")
    series = 60
    # the daemon starts with a soft limit of 96 under this machine's hard one
    limit = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
             "(96, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); os.execv(sys.argv[1], sys.argv[1:])")
    sim, url = start_dectris_sim("--series", str(series), "--frames", "16", "--size", "32",
                                 stderr=subprocess.DEVNULL)
    daemon = None
    try:
        daemon = start_daemon(tmp_path, "--source", url, "--set", "options.iterations=1000000",
                              "--set", "refine_time_budget_s=600", "--set", "max_concurrent_scans=1",
                              "--set", "max_queued_scans=1", "--set", "drain_timeout_s=0",
                              "--set", "keep_spool=true",  # a scan that finishes keeps its spool too
                              prefix=(sys.executable, "-c", limit))
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            wait_for(lambda: len(ctl.list_scans()) >= series or "Too many open files" in daemon.log(), 180,
                     f"{series} series to be accepted", daemon)
        assert "Too many open files" not in daemon.log(), daemon.log()
        assert sim.wait(60) == 0
        m = metrics_of(daemon)
        assert not any(m.get(f"cryoptycho_scans_total{{outcome={o}}}", 0) for o in ("refused", "failed")), m
        assert "Too many open files" not in daemon.log(), daemon.log()
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait(10)
        if daemon is not None:
            assert daemon.stop() == 0, daemon.log()
    assert "Too many open files" not in daemon.log(), daemon.log()
    assert len(list((tmp_path / "spool").glob("*.spool.h5"))) == series  # every series kept for the next start


def test_a_position_update_scheduled_at_iteration_zero_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """realprobe moved the position updates inside CG (refine_full_batch's ``between``, called
    after a CG iteration): with ``position_start_iteration = 0`` (allowed, ≥ 0) the update due
    before the first iteration was dropped — with ``iterations == position_every`` the
    refinement made none at all, where it made one before (and the live engine's scan end,
    ``_position_update_fits``, counts on it)."""
    from cryoptycho.gpu import operators
    from cryoptycho.gpu import reconstruct as rec
    from cryoptycho.gpu.data import PtychoData
    from cryoptycho.gpu.options import ReconOptions
    from engine_helpers import ENERGY, PIXEL
    from test_engine_positions import _distorted_scan

    nominal, _true, frames, _truth, _geo, probe = _distorted_scan(1e5, grid=6)
    data = PtychoData(frames=operators.from_fft_order(frames), positions=nominal, energy=ENERGY,
                      pixel_size=PIXEL, probe=probe.astype(np.complex64))
    real = rec.update_positions
    done: list[int] = []

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rec, "update_positions", counted)
    # (iterations, every) → updates at 0 only; at 0 and 2 (none in the last `every`)
    for iterations, every, updates in ((3, 3, 1), (4, 2, 2)):
        opts = ReconOptions(iterations=iterations, mu0=1e-3, refine_positions=True, position_start_iteration=0,
                            position_every=every, refine_probe=False)
        done.clear()
        rec.refine_alternating(rec.prepare(data, opts), opts, None)
        assert len(done) == updates, (iterations, every, len(done))


def test_the_viewer_keeps_the_image_of_a_long_scan_that_ends_after_shorter_ones() -> None:
    """Two scans run at once by default: a long scan in one slot while short ones pass through
    the other. The viewer kept the images of the 8 ended scans first *seen* last, so the long
    scan's final image was dropped the moment it arrived (a page opened then showed none for
    the scan that had just finished). The images kept are those of the 8 scans that *ended*
    last."""
    from cryoptycho.daemon.web.hub import ENDED_PREVIEWS_KEPT, Hub
    from cryoptycho.protocols.messages import Result, ScanEvent

    hub = Hub("tcp://127.0.0.1:9", "tcp://127.0.0.1:9")
    obj = np.ones((24, 24), np.complex64)
    probe = np.ones((8, 8), np.complex64)

    def ends(sid: str) -> None:
        hub.apply(Result(sid, 2, 1e-10, (0.0, 0.0), obj, probe, np.zeros((1, 2)), files={"h5": f"/r/{sid}.h5"}))
        hub.apply(ScanEvent(sid, "finished"))

    hub.apply(ScanEvent("long", "acquiring"))
    short = [f"short{i}" for i in range(ENDED_PREVIEWS_KEPT + 2)]
    for sid in short:
        hub.apply(ScanEvent(sid, "acquiring"))
        ends(sid)
    ends("long")
    imaged = [sid for sid, v in hub.scans.items() if v.preview is not None]
    assert "long" in imaged, imaged
    assert sorted(imaged) == sorted(["long", *short[-(ENDED_PREVIEWS_KEPT - 1):]])
    assert next(m["scan_id"] for m in hub.state_messages() if m.get("kind") == "scan") == "long"  # order kept
