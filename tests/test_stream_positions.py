"""Position refinement while frames arrive (gpu/stream.py with gpu/positions.py
``LiveScanModel``): the live engine moves the positions of a scan with a known affine error and
jitter towards the true ones, without a device synchronisation in its steps, and the daemon's
result file carries the positions it refined while streaming beside the received ones."""

from __future__ import annotations

import signal
import time

import h5py
import numpy as np
import pytest
from cryoptycho.gpu import operators, strict
from cryoptycho.gpu.backend import backend_name
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.positions import LiveScanModel
from cryoptycho.gpu.stream import StreamingReconstructor
from engine_helpers import ENERGY, PIXEL, distorted_scan, scan_errors

M = 32
#: a few per cent of affine scan error and 0.3 px of jitter (a speckle probe pins positions)
ERRORS = scan_errors()


def _distorted_scan(counts: float = 1e5, grid: int = 8, step_px: float = 3.0, seed: int = 0):
    """(nominal m, true m, frames in detector order, probe): frames recorded at the true
    (distorted) positions of a nominal raster."""
    nominal, true, frames, _truth, _geo, probe = distorted_scan(counts, grid, step_px, seed, m=M)
    return nominal, true, operators.from_fft_order(frames), probe.astype(np.complex64)


def _rms_px(positions: np.ndarray, true: np.ndarray) -> float:
    return float(np.sqrt((np.linalg.norm(positions - true, axis=1) ** 2).mean()) / PIXEL)


def _stream(xp, live: bool, steps_per_part: int = 50, parts: int = 4, residual_auto: bool = False):
    """Stream the distorted scan in ``parts`` arrivals with steps between them, reading the
    losses every 5 steps as the daemon's previews do; (engine, true positions, nominal)."""
    nominal, true, frames, probe = _distorted_scan()
    opts = ReconOptions(backend=backend_name(xp), mu0=1e-3, refine_positions=True,
                        stream={"batch_size": 16, "refine_positions": live,
                                "position_residual_auto": residual_auto})
    engine = StreamingReconstructor(frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=PIXEL,
                                    probe=probe, options=opts, energy_eV=ENERGY)
    n = len(frames)
    for part in range(parts):
        sl = slice(part * n // parts, (part + 1) * n // parts)
        engine.add_frames(frames[sl], nominal[sl])
        for i in range(steps_per_part):
            engine.step()
            if i % 5 == 4:
                engine.flush_losses()
    engine.flush_losses()
    return engine, true, nominal


def test_live_position_refinement_reduces_the_position_error(xp) -> None:
    engine, true, nominal = _stream(xp, live=True)
    before, after = _rms_px(nominal, true), _rms_px(engine.positions(), true)
    # measured: 0.66 → 0.47 (numpy), 0.49 (strict: other rounding) px rms
    assert before > 0.6 and after < 0.8 * before, (before, after)
    state = engine.snapshot()
    np.testing.assert_array_equal(state.nominal_positions, nominal)  # the received ones
    np.testing.assert_array_equal(state.positions, engine.positions())
    # the affine part moved towards the true scan error (the y scale is +4 %)
    assert engine._live_positions is not None and engine._live_positions.matrix[0, 0] > 1.005


def test_a_scan_end_refinement_too_short_for_a_position_update_keeps_the_live_positions() -> None:
    """A refinement that ends before its first position update (here 2 CG iterations; in the
    service, a budget a loaded machine fills with set-up and a few iterations) refines the
    object at the positions it was built at, the live ones: it keeps the live steps' gain and
    ends better than the streamed state. Starting it from the received positions instead (right
    for a refinement that updates positions) undid the live steps (0.56 → 0.66 px) and left the
    object worse than at scan end (NRMSE 0.0121 → 0.0124 on this scan, seed 2)."""
    from cryoptycho.gpu.sim.evaluation import resample
    from engine_helpers import distorted_scan, nrmse

    nominal, true, frames_fft, truth, geo, probe = distorted_scan(seed=2, m=M)
    frames = operators.from_fft_order(frames_fft)
    opts = ReconOptions(mu0=1e-3, refine_positions=True, stream={"batch_size": 16, "refine_positions": True})
    engine = StreamingReconstructor(frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=PIXEL,
                                    probe=probe.astype(np.complex64), options=opts, energy_eV=ENERGY)
    n = len(frames)
    for part in range(4):
        sl = slice(part * n // 4, (part + 1) * n // 4)
        engine.add_frames(frames[sl], nominal[sl])
        for i in range(50):
            engine.step()
            if i % 5 == 4:
                engine.flush_losses()
    engine.flush_losses()
    margin = M // 2 + 3
    shape = (geo.object_shape[0] - 2 * margin, geo.object_shape[1] - 2 * margin)
    origin = (geo.origin[0] + margin * PIXEL, geo.origin[1] + margin * PIXEL)
    target = truth[margin:margin + shape[0], margin:margin + shape[1]]

    def error() -> float:
        s = engine.snapshot()
        return nrmse(resample(s.object, s.geometry.origin, PIXEL, origin, shape), target,
                     (slice(None), slice(None)))

    live_positions, at_scan_end = engine.positions(), error()
    assert _rms_px(live_positions, true) < 0.9 * _rms_px(nominal, true)  # the live steps moved them
    assert 2 < opts.position_start_iteration + opts.position_every  # no update in 2 iterations
    engine.refine(2)
    # (to rounding: the scan model works in pixels)
    np.testing.assert_allclose(engine.positions(), live_positions, rtol=0, atol=1e-6 * PIXEL)
    # measured: 0.0121 → 0.0116 (from the received positions: → 0.0124)
    assert error() < at_scan_end


def test_without_live_refinement_the_positions_stay_as_received(xp) -> None:
    engine, _true, nominal = _stream(xp, live=False, steps_per_part=10)
    np.testing.assert_array_equal(engine.positions(), nominal)
    assert engine.snapshot().nominal_positions is None


def test_no_synchronisation_in_a_step_that_measures_positions() -> None:
    nominal, _true, frames, probe = _distorted_scan()
    opts = ReconOptions(backend="strict", mu0=1e-3, refine_positions=True,
                        stream={"batch_size": 16, "refine_positions": True, "position_every": 1,
                                "position_min_visits": 1})
    engine = StreamingReconstructor(frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=PIXEL,
                                    probe=probe, options=opts, energy_eV=ENERGY)
    engine.add_frames(frames, nominal)
    for _ in range(8):
        engine.step()
    engine.flush_losses()
    with strict.counting() as c:
        for _ in range(12):
            engine.step()
    assert c.syncs == 0, c.summary()
    assert len(engine._pending_positions) >= 10  # measured, waiting for the next read
    moved_before = engine.positions()
    with strict.counting() as c:
        losses = engine.flush_losses()
    # the losses and every pending measurement come back in one transfer
    assert c.syncs == 1 and len(losses) == 12, c.summary()
    assert not engine._pending_positions
    assert np.abs(engine.positions() - moved_before).max() > 0


def _fit_quadratic(true: np.ndarray, updates: int, noise: float = 1e-3) -> LiveScanModel:
    """A live model of the first 30 of ``true``'s frames fitted to a quadratic loss around
    them (Fisher 50 per px²), measuring every frame before each update."""
    rng = np.random.default_rng(0)
    model = LiveScanModel(NOMINAL[:30])
    fisher = np.repeat(np.eye(2)[None] * 50.0, 30, axis=0)
    for _ in range(updates):
        at = model.positions
        grad = np.einsum("kab,kb->ka", fisher, at - true[:30]) + rng.normal(0, noise, (30, 2))
        assert model.record(np.arange(30), at, grad, fisher) == 30
        model.update(residual_px=0.5, max_step_px=1.0)
    return model


NOMINAL = np.stack(np.meshgrid(np.arange(6.0), np.arange(6.0), indexing="ij"), -1).reshape(-1, 2) * 4
AFFINE = np.array([[1.03, 0.01], [-0.02, 0.98]])


def test_live_scan_model_fits_the_affine_error_and_places_late_frames_on_it() -> None:
    true = NOMINAL.mean(0) + (NOMINAL - NOMINAL.mean(0)) @ AFFINE.T
    model = _fit_quadratic(true, 3)
    np.testing.assert_allclose(model.matrix, AFFINE, atol=0.005)
    late = model.add(NOMINAL[30:])  # frames that arrive after the fit start on the model
    expected = model.centre + (NOMINAL[30:] - model.centre) @ model.matrix.T + model.offset
    np.testing.assert_allclose(late, expected, atol=1e-12)
    assert len(model.positions) == 36 and not model.measured[30:].any()


def test_live_scan_model_bounds_residuals_and_caps_moves() -> None:
    true = NOMINAL.astype(np.float64).copy()
    true[5] += (3.0, -2.0)  # one position far off its scan
    model = _fit_quadratic(true, 1)
    assert np.abs(model.positions - NOMINAL[:30]).max() <= 1.0 + 1e-9  # one update: ≤ 1 px
    model = _fit_quadratic(true, 10)
    assert np.linalg.norm(model.residual, axis=1).max() <= 1.5 + 1e-9  # 3 × 0.5 px
    assert model.updates == 10


def test_live_scan_model_waits_for_enough_measured_frames() -> None:
    model = LiveScanModel(NOMINAL)
    fisher = np.repeat(np.eye(2)[None], 11, axis=0)
    model.record(np.arange(11), NOMINAL[:11], np.ones((11, 2)), fisher)
    assert model.update(0.5, 1.0) is None  # 11 < 12 frames: six parameters would fit noise
    bad = np.full((1, 2, 2), np.nan)
    assert model.record(np.array([11]), NOMINAL[11:12], np.ones((1, 2)), bad) == 0
    assert model.update(0.5, 1.0) is None


def test_live_engine_uses_the_estimated_residual_prior_only_when_asked() -> None:
    import math

    engine, _, _ = _stream(np, live=True, steps_per_part=20, parts=2)
    assert engine._live_positions is not None and engine._live_positions.updates > 0
    assert math.isnan(engine._live_positions.residual_estimate_px)  # default: the fixed prior
    engine, _, _ = _stream(np, live=True, steps_per_part=20, parts=2, residual_auto=True)
    live = engine._live_positions
    assert live is not None and live.updates > 0
    assert 0.0 <= live.residual_estimate_px <= engine.options.position_residual_px
    # the residuals are bounded by the estimate, not by the fixed prior
    assert np.linalg.norm(live.residual, axis=1).max() <= 3.0 * live.residual_estimate_px + 1e-9


def _noisy_live_model(residual_rms: float, noise_px: float, measured: int, seed: int = 0):
    """A live model of a 12 × 12 raster (4 px steps) on its affine map plus residuals of rms
    ``residual_rms`` px per axis; only the first ``measured`` frames measured, each with a Newton
    target scattered by counting noise of ``noise_px`` rms per axis (Fisher 1/noise²): (model,
    true positions)."""
    rng = np.random.default_rng(seed)
    nominal = np.stack(np.meshgrid(np.arange(12.0), np.arange(12.0), indexing="ij"), -1).reshape(-1, 2) * 4
    true = nominal + rng.normal(0.0, residual_rms, nominal.shape)
    model = LiveScanModel(nominal)
    fisher = np.repeat(np.eye(2)[None] / noise_px**2, measured, axis=0)
    target = true[:measured] + rng.normal(0.0, noise_px, (measured, 2))
    at = model.positions[:measured]
    grad = np.einsum("kab,kb->ka", fisher, at - target)
    assert model.record(np.arange(measured), at, grad, fisher) == measured
    return model, true


def test_live_residual_prior_estimated_keeps_exact_positions_out_of_the_noise() -> None:
    """Exact positions, targets scattered by 0.7 px of counting noise (the Cramér–Rao bound of
    one position at 20 e⁻/Å² is ≈ 1 px): the fixed 0.5 px prior moves the residuals into the
    noise, the estimated one (as offline) keeps them on the affine map."""
    fixed, true = _noisy_live_model(0.0, 0.7, 100)
    fixed.update(residual_px=0.5, max_step_px=10.0)
    auto, _ = _noisy_live_model(0.0, 0.7, 100)
    auto.update(residual_px=0.5, max_step_px=10.0, residual_auto=True)
    assert np.sqrt(np.mean(fixed.residual[:100] ** 2)) > 0.15
    assert np.sqrt(np.mean(auto.residual ** 2)) < 0.02
    assert auto.residual_estimate_px < 0.05
    assert _rms_px(auto.positions * PIXEL, true * PIXEL) < _rms_px(fixed.positions * PIXEL, true * PIXEL)


def test_live_residual_estimate_ignores_the_frames_not_yet_measured() -> None:
    """Residuals of 0.4 px rms with 0.15 px of noise on the first 50 of 144 frames: the
    estimate comes from the measured frames' scatter (the 94 without information say nothing
    of it; counted, their zero information swamps the median and the estimate falls to 0)."""
    model, true = _noisy_live_model(0.4, 0.15, 50)
    model.update(residual_px=1.0, max_step_px=10.0, residual_auto=True)
    assert 0.3 < model.residual_estimate_px < 0.5
    moved = model.positions[:50] - model.nominal[:50]
    assert np.sqrt(np.mean((moved - (true[:50] - model.nominal[:50])) ** 2)) < 0.25
    assert np.abs(model.residual[50:]).max() < 0.01  # no information: left on the affine map


@pytest.mark.subprocess
def test_daemon_live_result_carries_positions_refined_while_streaming(tmp_path) -> None:
    """No refinement after scan end (iterations 0): whatever moved the positions in the result
    file moved them while frames arrived."""
    from cryoptycho.protocols.messages import Metrics, Result, ScanEvent
    from cryoptycho.protocols.producer import Producer
    from cryoptycho.protocols.subscriber import Subscriber
    from daemon_support import start_daemon, wait_subscribed

    nominal, _true, frames, probe = _distorted_scan()
    daemon = start_daemon(tmp_path, "--set", "options.iterations=0", "--set", "preview_hz=20")
    try:
        sub = Subscriber(daemon.publish, latest_only=False)
        wait_subscribed(daemon, sub)
        options = {"refine_positions": True, "mu0": 1e-3,
                   "stream": {"batch_size": 16, "refine_positions": True, "position_every": 1,
                              "position_min_visits": 2}}
        with Producer(daemon.ingest, control=daemon.control) as producer:
            producer.start_scan(scan_id="live-pos", energy_eV=ENERGY, frame_shape=(M, M),
                                frame_dtype="uint16", expected_frames=len(frames), pixel_size_m=PIXEL,
                                probe=probe, positions_m=nominal, options=options)
            producer.send_frames(frames)
            # end the scan only once the engine has stepped well past the warm-up
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                ev = sub.recv(timeout_s=0.5)
                if isinstance(ev, Metrics) and ev.scan_id == "live-pos" and ev.iteration >= 60:
                    break
            else:
                pytest.fail(f"the engine did not reach 60 steps\n{daemon.log()}")
            producer.end_scan()
        result = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ev = sub.recv(timeout_s=0.5)
            if isinstance(ev, Result) and ev.scan_id == "live-pos":
                result = ev
            if isinstance(ev, ScanEvent) and ev.scan_id == "live-pos" and ev.event in ("finished", "failed"):
                assert ev.event == "finished", daemon.log()
                break
        assert result is not None, daemon.log()
        sub.close()
        with h5py.File(result.files["result"]) as f:
            refined = np.stack([f["probe_position_y_m"][()], f["probe_position_x_m"][()]], 1)
            received = np.stack([f["nominal_probe_position_y_m"][()], f["nominal_probe_position_x_m"][()]], 1)
        np.testing.assert_array_equal(received, nominal)
        moved = np.abs(refined - received).max()
        assert 0 < moved < 3.0 * PIXEL, moved
    finally:
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM)


@pytest.mark.subprocess
def test_bench_live_on_a_realistic_dataset_scores_positions_live_and_offline(tmp_path) -> None:
    """`cryoptycho simulate --realistic` then `cryoptycho bench live --dataset … --set …`, as a
    user runs them: the figures carry both NRMSEs and the nominal, live and offline position
    errors against the file's /truth, and the live positions moved while streaming."""
    import json
    import math
    import subprocess

    data = tmp_path / "tiny.h5"
    subprocess.run(["cryoptycho", "simulate", "--realistic", "--frame-size", "24", "--pixel-size", "1.5",
                    "--semiangle", "5", "--thin", "--dose", "100", "-o", str(data)],
                   check=True, capture_output=True, timeout=300)
    run = subprocess.run(
        ["cryoptycho", "bench", "live", "--dataset", str(data), "--iterations", "0",
         "--offline-iterations", "3", "--refine-s", "5", "--set", "refine_positions=true",
         # 2.4 s of streaming (480 frames): on a busy box the default 500 frames/s left the
         # engine too few steps to move the positions measurably
         "--rate", "200",
         "--set", "stream.refine_positions=true", "--set", "stream.position_min_visits=1", "--json"],
        check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    assert figures["dose"] == 100 and figures["frame_size"] == 24
    for key in ("live_nrmse", "offline_nrmse", "nrmse_ratio", "live_phase_correlation",
                "offline_phase_correlation"):
        assert math.isfinite(figures[key]), key
    nominal = figures["nominal_position_error_m"]
    assert 0.3e-10 < nominal < 3e-10  # the preset's errors (≈ 1 Å), the mean translation removed
    # no refinement after scan end (0 iterations): the live positions moved while streaming
    # abs=0: approx's default absolute tolerance (1e-12) is 1 % of these errors in metres
    assert figures["live_position_error_m"] != pytest.approx(nominal, rel=1e-6, abs=0)
    assert figures["offline_position_error_m"] == pytest.approx(nominal, rel=1e-9, abs=0)  # 3 CG: none yet
    assert figures["refine_iterations"] == 0  # --iterations 0: the streamed state is the result


def test_bench_live_refuses_contradictory_or_invalid_arguments(tmp_path) -> None:
    from click.testing import CliRunner
    from cryoptycho.daemon.cli import main

    data = tmp_path / "x.h5"
    data.write_bytes(b"")
    result = CliRunner().invoke(main, ["bench", "live", "--set", "refine_positions=maybe"])
    assert result.exit_code != 0 and "refine_positions" in result.output
    result = CliRunner().invoke(main, ["bench", "live", "--realistic", "--dataset", str(data)])
    assert result.exit_code != 0 and "--realistic" in result.output
    result = CliRunner().invoke(main, ["bench", "live", "--sample", "proteasome", "--dataset", str(data)])
    assert result.exit_code != 0 and "--sample" in result.output
    result = CliRunner().invoke(main, ["bench", "live", "--sample", "no-such-particle"])
    assert result.exit_code != 0 and "no-such-particle" in result.output


def test_half_set_estimate_on_canvases_grown_apart() -> None:
    """The two half-set engines refine their positions apart, so their canvases may grow apart:
    the FRC compares the region both hold."""
    from cryoptycho.daemon.resolution import _common_region

    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 30))
    b = np.zeros((25, 28))
    b[3:23, 0:28] = a[:, 2:30]  # b's origin is 3 px above and 2 px right of a's
    pixel = 1e-10
    cov = np.arange(a.size, dtype=float).reshape(a.shape)
    ca, cb, cc = _common_region(a, (0.0, 0.0), b, (-3 * pixel, 2 * pixel), pixel, cov)
    assert ca.shape == cb.shape == cc.shape == (20, 28)
    np.testing.assert_array_equal(ca, cb)
    np.testing.assert_array_equal(cc, cov[:, 2:30])
