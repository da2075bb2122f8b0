"""The engine boundary (gpu/engines.py): a second algorithm plugs in without touching the daemon.

``tests/plugins/flat_engine.py`` is a plug-in as another package would ship it; here it is
installed the way pip installs one (a ``*.dist-info`` with an entry point in the group
``cryoptycho.engines`` on the Python path) and chosen by option alone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from cryoptycho.gpu import engines
from cryoptycho.gpu.backend import backend_name
from cryoptycho.gpu.data import PtychoData
from cryoptycho.gpu.engines import Algorithm, EngineSpec, LiveEngine, MemoryEstimate, create_engine
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.stream import StreamingReconstructor
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import ControlError
from cryoptycho.protocols.messages import ErrorEvent, Preview, Result, ScanEvent
from cryoptycho.protocols.producer import Producer
from cryoptycho.protocols.subscriber import Subscriber
from daemon_support import PIXEL_M, start_daemon, synthetic_scan, wait_subscribed

PLUGINS = Path(__file__).parent / "plugins"


def install_plugin(site: Path) -> None:
    """What ``pip install`` of a package declaring the entry point leaves on the path."""
    info = site / "flat_engine_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flat-engine-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[cryoptycho.engines]\nflat = flat_engine:ALGORITHM\ndiverging = flat_engine:DIVERGING\n")


@pytest.fixture
def flat_registered(monkeypatch, tmp_path):
    """The plug-in installed for this process; the registry rediscovers entry points."""
    install_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(engines, "_discovered", False)
    monkeypatch.setattr(engines, "_REGISTRY", dict(engines._REGISTRY))
    yield
    sys.modules.pop("flat_engine", None)


def spec_of(scan) -> EngineSpec:
    m = scan.frames.shape[1]
    return EngineSpec(frame_shape=(m, m), frame_dtype=scan.frames.dtype, pixel_size_m=PIXEL_M,
                      probe=scan.probe, expected_frames=len(scan.frames), energy_eV=300e3)


def test_unknown_algorithm_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown algorithm 'lsqml'; available: .*map-cg"):
        ReconOptions(algorithm="lsqml")
    assert ReconOptions().algorithm == engines.DEFAULT_ALGORITHM == "map-cg"


def test_entry_point_plugin_is_found_and_runs_offline(flat_registered):
    assert "flat" in engines.available_engines()
    scan = synthetic_scan(n_side=6)
    data = PtychoData(frames=scan.frames, positions=scan.positions, energy=300e3, pixel_size=PIXEL_M,
                      probe=scan.probe)
    # the offline entry point dispatches by name; "flat" has no offline path: its live engine
    # gets every frame and is refined
    from cryoptycho.gpu.reconstruct import reconstruct

    state = reconstruct(data, {"algorithm": "flat", "iterations": 3})
    assert state.options["algorithm"] == "flat" and state.iteration == 3
    np.testing.assert_array_equal(state.object, 1)
    np.testing.assert_array_equal(state.positions, scan.positions)


def test_a_broken_plugin_is_logged_and_skipped(monkeypatch, tmp_path, caplog):
    info = tmp_path / "broken_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[cryoptycho.engines]\nmissing = no_such_module_xyz:ALGORITHM\nnot-one = json:dumps\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(engines, "_discovered", False)
    monkeypatch.setattr(engines, "_REGISTRY", dict(engines._REGISTRY))
    assert engines.available_engines() == ["map-cg"]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "'missing'" in logged and "'not-one'" in logged and "failed to load" in logged


def test_reconstruct_command_runs_the_plugin_by_option(flat_registered, tmp_path):
    from click.testing import CliRunner
    from cryoptycho.daemon.cli import main
    from cryoptycho.daemon.storage.dataset import write_dataset
    from cryoptycho.daemon.storage.result import read_result

    scan = synthetic_scan(n_side=6)
    dataset = write_dataset(tmp_path / "d.h5", PtychoData(
        frames=scan.frames, positions=scan.positions, energy=300e3, pixel_size=PIXEL_M, probe=scan.probe))
    out = tmp_path / "r.h5"
    run = CliRunner().invoke(main, ["reconstruct", str(dataset), "-o", str(out), "-n", "2", "-q",
                                    "--no-export", "--set", "algorithm=flat"])
    assert run.exit_code == 0, run.output
    res = read_result(out)
    assert res.state.options["algorithm"] == "flat" and res.state.iteration == 2
    np.testing.assert_array_equal(res.state.object, 1)


def test_map_cg_through_the_boundary_restores_after_the_canvas_grew(xp):
    scan = synthetic_scan(n_side=8)
    engine = create_engine(spec_of(scan), ReconOptions(backend=backend_name(xp), stream={"batch_size": 16}))
    assert isinstance(engine, StreamingReconstructor) and isinstance(engine, LiveEngine)
    half = len(scan.frames) // 2
    engine.add_frames(scan.frames[:half], scan.positions[:half])
    engine.step()
    good = engine.snapshot()
    engine.add_frames(scan.frames[half:], scan.positions[half:])  # grows the canvas
    engine.step()
    assert engine.snapshot().object.shape != good.object.shape
    engine.restore(good)
    after = engine.snapshot()
    off = np.rint((np.asarray(good.geometry.origin) - np.asarray(after.geometry.origin)) / PIXEL_M).astype(int)
    ny, nx = good.object.shape
    np.testing.assert_array_equal(after.object[off[0]:off[0] + ny, off[1]:off[1] + nx], good.object)
    np.testing.assert_array_equal(after.probe, good.probe)
    np.testing.assert_array_equal(engine.positions(), scan.positions)


def test_memory_estimate_is_typed_and_drives_the_daemons_admission(tmp_path, monkeypatch):
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.metrics import ServiceMetrics
    from cryoptycho.daemon.publisher import Outbox
    from cryoptycho.daemon.scan import ScanSpec
    from cryoptycho.daemon.scans import ScanManager, ScanRefused

    est = engines.memory_estimate(ReconOptions(), frame_shape=(64, 64), frame_dtype="uint16",
                                  n_frames=1000, field_px=(300, 300))
    assert isinstance(est, MemoryEstimate) and est.total >= sum(v for k, v in est.parts.items()
                                                                if k in ("frame_store", "object", "probe"))
    monkeypatch.setattr(engines, "_REGISTRY", dict(engines._REGISTRY))
    huge = Algorithm(live=engines.get_algorithm("map-cg").live,
                     memory_estimate=lambda options, **_: MemoryEstimate(total=1 << 50))
    engines.register_engine("needs-a-petabyte", huge)
    manager = ScanManager(ServiceConfig(spool_dir=tmp_path / "s", results_dir=tmp_path / "r"),
                          ServiceMetrics(), Outbox())

    def spec(options: dict) -> ScanSpec:
        return ScanSpec(scan_id=str(options.get("algorithm", "default")), frame_shape=(32, 32),
                        frame_dtype="uint16", pixel_size_m=PIXEL_M, energy_eV=300e3,
                        probe=np.zeros((0, 0), np.complex64), expected_frames=100, options=options)

    manager.admission(spec({}))  # the default algorithm fits
    with pytest.raises(ScanRefused) as info:
        manager.admission(spec({"algorithm": "needs-a-petabyte"}))
    assert info.value.rule == "memory_budget"
    with pytest.raises(ScanRefused) as info:
        manager.admission(spec({"algorithm": "lsqml"}))
    assert info.value.field == "options.algorithm" and "unknown algorithm 'lsqml'" in info.value.message


def run_scan(daemon, scan, scan_id: str, while_running=None, **extra) -> tuple[Result, list]:
    """Stream ``scan``; half of it only after a first preview (so the engine is stepped after
    a snapshot; ``while_running()`` runs then). Returns the result and every event of the scan."""
    sub = Subscriber(daemon.publish, latest_only=False)
    wait_subscribed(daemon, sub)
    events: list = []

    def until(done, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = sub.recv(timeout_s=0.5)
            if ev is not None and getattr(ev, "scan_id", None) == scan_id:
                events.append(ev)
                if done(ev):
                    return
        raise AssertionError(f"timed out; events {[type(e).__name__ for e in events]}\n{daemon.log()}")

    half = len(scan.frames) // 2
    with Producer(daemon.ingest, control=daemon.control) as producer:
        producer.start_scan(**scan.start_fields(scan_id, **extra))
        producer.send_frames(scan.frames[:half])
        until(lambda ev: isinstance(ev, Preview))
        if while_running is not None:
            while_running()
        producer.send_frames(scan.frames[half:])
        producer.end_scan()
    until(lambda ev: isinstance(ev, ScanEvent) and ev.event in ("finished", "failed"))
    sub.close()
    assert events[-1].event == "finished", daemon.log()
    results = [ev for ev in events if isinstance(ev, Result)]
    assert len(results) == 1, daemon.log()
    return results[0], events


@pytest.mark.subprocess
def test_daemon_runs_an_installed_plugin_chosen_by_option(tmp_path, monkeypatch):
    install_plugin(tmp_path / "site")
    path = [str(tmp_path / "site"), str(PLUGINS), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    scan = synthetic_scan(n_side=8)
    daemon = start_daemon(tmp_path, "--set", "options.algorithm=flat", "--set", "options.iterations=4",
                          "--set", "preview_hz=20")
    try:
        def switch_algorithm() -> None:
            control = ControlClient(daemon.control)
            try:
                with pytest.raises(ControlError) as info:
                    control.set_options("flat-scan", {"algorithm": "map-cg"})
            finally:
                control.close()
            assert "params.options.algorithm" in info.value.msg and "cannot change" in info.value.msg

        result, _ = run_scan(daemon, scan, "flat-scan", while_running=switch_algorithm)
        # the flat engine's object, probe as given and positions as sent: the daemon ran the
        # plug-in, through the boundary only
        np.testing.assert_array_equal(result.object, 1)
        np.testing.assert_allclose(np.sort(result.positions_m, axis=0), np.sort(scan.positions, axis=0),
                                   rtol=0, atol=1e-16)
        with h5py.File(result.files["result"]) as f:
            assert json.loads(f.attrs["options"])["algorithm"] == "flat"
            np.testing.assert_array_equal(f["object"][()], 1)

        # a scan chooses its own algorithm; a diverging step is rolled back through restore()
        result, events = run_scan(daemon, scan, "diverging-scan", options={"algorithm": "diverging"})
        rollbacks = [ev for ev in events if isinstance(ev, ErrorEvent) and ev.rule == "rollback"]
        assert len(rollbacks) == 1, events
        np.testing.assert_allclose(result.probe, scan.probe, rtol=1e-6)
    finally:
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM)
