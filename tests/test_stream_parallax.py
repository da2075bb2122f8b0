"""The parallax fit in the live engine (gpu/stream.py): a probe built from a probe model is
corrected from the frames received after ``stream.parallax_after`` of the scan — while the
scan still streams — or at scan end, and only under ``parallax`` "auto" when the probe came
from a model; the daemon publishes and saves the fitted aberrations with the live result."""

from __future__ import annotations

import signal
import time

import h5py
import numpy as np
import pytest
from cryoptycho.gpu.backend import backend_name, to_numpy
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.probes import make_probe, scale_probe
from cryoptycho.gpu.stream import StreamingReconstructor
from engine_helpers import ENERGY, PIXEL, aberrated_dataset

M = 32
SEMIANGLE = 8e-3
NOMINAL_DEFOCUS = 60e-9
ERRORS = {"C10": 15e-9, "C12a": 6e-9, "C12b": -4e-9}
GRID = 14
COUNTS = 1e5


def _scan(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(frames in detector order, positions, nominal probe scaled to the counts, true probe):
    Poisson frames of a weak phase object recorded with the nominal defocused probe aberrated
    by ``ERRORS``."""
    data = aberrated_dataset(COUNTS, ERRORS, seed, GRID, m=M, semiangle=SEMIANGLE, nominal_defocus=NOMINAL_DEFOCUS)
    model = make_probe("defocused", (M, M), PIXEL, ENERGY, SEMIANGLE, NOMINAL_DEFOCUS)
    return data.frames, data.positions, scale_probe(model, data.frames, None), data.truth_probe


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """|⟨a, b⟩| / (‖a‖ ‖b‖): 1 for the same probe up to a constant."""
    return float(abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _engine(xp, probe: np.ndarray, n: int, from_model: bool = True, **opts) -> StreamingReconstructor:
    stream = opts.pop("stream", {})
    options = ReconOptions(backend=backend_name(xp), init="ones", refine_probe=False, prior="tikhonov",
                           mu0=1e-3, stream={"batch_size": 16, **stream}, **opts)
    return StreamingReconstructor(frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=PIXEL, probe=probe,
                                  options=options, expected_frames=n, energy_eV=ENERGY,
                                  probe_from_model=from_model)


def _step_until_fitted(engine: StreamingReconstructor, deadline_s: float = 120.0) -> None:
    """Step until the background fit has landed (it runs beside the steps)."""
    end = time.monotonic() + deadline_s
    while engine.parallax_fit is None:
        assert time.monotonic() < end, "the parallax fit did not finish"
        engine.step()


def test_streaming_engine_corrects_a_defocused_model_probe_while_streaming(xp) -> None:
    frames, pos, nominal, true = _scan()
    n = len(frames)
    engine = _engine(xp, nominal, n, stream={"parallax_after": 0.5})
    half = n // 2
    engine.add_frames(frames[:half], pos[:half])
    for _ in range(3):
        engine.step()
    _step_until_fitted(engine)
    assert engine.n_frames == half  # fitted on the first half, before the scan ended
    found = engine.parallax_coefficients
    assert found is not None
    err = {k: abs(found[k] - ERRORS[k]) * 1e9 for k in ERRORS}
    nominal_err = float(np.sqrt(sum(v**2 for v in ERRORS.values()))) * 1e9
    assert float(np.sqrt(sum(v**2 for v in err.values()))) < 0.5 * nominal_err, (found, err)
    probe = to_numpy(engine.probe)
    assert _overlap(probe, true) > _overlap(nominal, true) + 0.05, (_overlap(probe, true), _overlap(nominal, true))
    # the probe keeps the power the data ask for, and the engine goes on
    assert np.isclose(float(np.sum(np.abs(probe) ** 2)), engine.probe_power(), rtol=1e-3)
    assert engine.probe_estimate["parallax_frames"] == half
    engine.add_frames(frames[half:], pos[half:])
    for _ in range(5):
        engine.step()
    assert engine.parallax_coefficients == found  # no second fit while the scan streams
    engine.refine(2)
    state = engine.snapshot()
    assert np.all(np.isfinite(state.object))
    # stream.parallax_refit (default): fitted again at scan end, on every frame
    final = engine.parallax_coefficients
    assert final is not None and final != found
    assert state.probe_estimate["parallax_frames"] == n and state.probe_estimate["parallax_applied"] == 1
    assert state.probe_estimate["parallax_C10_m"] == final["C10"]
    err_final = float(np.sqrt(sum((final[k] - ERRORS[k]) ** 2 for k in ERRORS))) * 1e9
    assert err_final < 0.5 * nominal_err, final
    assert _overlap(to_numpy(engine.probe), true) > _overlap(nominal, true) + 0.05
    # the snapshot keeps the probe the fit corrected, at the used probe's power
    assert _overlap(state.nominal_probe, nominal) == pytest.approx(1.0, abs=1e-6)
    assert np.sum(np.abs(state.nominal_probe) ** 2) == pytest.approx(np.sum(np.abs(state.probe) ** 2), rel=1e-6)


def test_parallax_refit_off_keeps_the_early_fit() -> None:
    frames, pos, nominal, _ = _scan()
    n = len(frames)
    engine = _engine(np, nominal, n, stream={"parallax_after": 0.5, "parallax_refit": False})
    engine.add_frames(frames[: n // 2], pos[: n // 2])
    _step_until_fitted(engine)
    found = engine.parallax_coefficients
    engine.add_frames(frames[n // 2 :], pos[n // 2 :])
    engine.step()
    engine.refine(1)
    assert engine.parallax_coefficients == found  # once per scan
    assert engine.snapshot().probe_estimate["parallax_frames"] == n // 2


def test_an_early_correction_the_whole_scan_rejects_is_undone(monkeypatch) -> None:
    """The fit at scan end decides: when it does not reject the nominal probe (significance
    below the χ² threshold) the early fit's correction is taken out again, and the record says
    the correction was not applied."""
    import dataclasses

    import cryoptycho.gpu.stream as stream_module

    fit = stream_module.estimate_aberrations
    calls = []

    def weak_at_scan_end(*args, **kwargs):
        found = fit(*args, **kwargs)
        calls.append(len(args[0]))
        return found if len(calls) == 1 else dataclasses.replace(found, significance=0.1)

    monkeypatch.setattr(stream_module, "estimate_aberrations", weak_at_scan_end)
    frames, pos, nominal, _ = _scan()
    n = len(frames)
    engine = _engine(np, nominal, n, stream={"parallax_after": 0.5})
    engine.add_frames(frames[: n // 2], pos[: n // 2])
    _step_until_fitted(engine)
    assert engine.parallax_coefficients is not None
    assert _overlap(to_numpy(engine.probe), nominal) < 0.99  # the early correction is in
    engine.add_frames(frames[n // 2 :], pos[n // 2 :])
    engine.step()
    engine.refine(0)
    assert calls == [n // 2, n]
    assert engine.parallax_coefficients is None
    assert _overlap(to_numpy(engine.probe), nominal) == pytest.approx(1.0, abs=1e-6)
    state = engine.snapshot()
    assert state.probe_estimate["parallax_applied"] == 0
    assert state.probe_estimate["parallax_significance"] == 0.1
    assert state.probe_estimate["parallax_threshold"] > 0.1


def test_fit_at_scan_end_when_never_due_and_only_for_a_model_probe() -> None:
    """parallax_after = 1: the fit runs in ``refine``; a measured probe (not from a model) keeps
    its probe under "auto"; ``parallax=false`` turns it off."""
    frames, pos, nominal, true = _scan(seed=2)
    n = len(frames)
    late = _engine(np, nominal, n, stream={"parallax_after": 1.0})
    measured = _engine(np, nominal, n, from_model=False)
    off = _engine(np, nominal, n, parallax=False)
    for engine in (late, measured, off):
        engine.add_frames(frames, pos)
        for _ in range(4):
            engine.step()
        assert engine.parallax_fit is None
    late.refine(1)
    assert late.parallax_coefficients is not None
    assert _overlap(to_numpy(late.probe), true) > _overlap(nominal, true) + 0.05
    for engine in (measured, off):
        engine.refine(1)
        assert engine.parallax_fit is None


def test_a_scan_too_small_for_the_fit_keeps_the_nominal_probe() -> None:
    frames, pos, nominal, _ = _scan()
    engine = _engine(np, nominal, 6)
    engine.add_frames(frames[:6], pos[:6])
    engine.step()
    engine.refine(1)  # "auto": a warning, not an error
    assert engine.parallax_fit is None
    forced = _engine(np, nominal, 6, parallax=True)
    forced.add_frames(frames[:6], pos[:6])
    forced.step()
    with pytest.raises(ValueError, match="parallax"):
        forced.refine(1)


def test_the_fit_reads_every_kth_frame_beyond_parallax_max_frames(caplog) -> None:
    """A long scan's fit reads a stride of its frames, spread over the whole scan area, and
    still corrects the probe."""
    frames, pos, nominal, true = _scan(seed=3)
    n = len(frames)
    engine = _engine(np, nominal, n, stream={"parallax_max_frames": 64})
    engine.add_frames(frames, pos)
    engine.step()
    with caplog.at_level("INFO", logger="cryoptycho.stream"):
        engine.refine(1)
    stride = -(-n // 64)
    assert f"parallax fit on {len(range(0, n, stride))} frames" in caplog.text
    assert len(range(0, n, stride)) <= 64 < n
    assert _overlap(to_numpy(engine.probe), true) > _overlap(nominal, true)


def test_a_fit_that_outlasts_half_the_refinement_budget_is_dropped(monkeypatch, caplog) -> None:
    """The refinement budget is a promise: ``refine`` waits for a running fit at most half of
    it, then keeps the nominal probe; the late fit's result is never used."""
    import threading

    import cryoptycho.gpu.stream as stream_module

    frames, pos, nominal, _ = _scan(seed=4)
    gate, entered = threading.Event(), threading.Event()
    fit = stream_module.estimate_aberrations

    def stuck(*args, **kwargs):
        entered.set()
        assert gate.wait(60), "the test never released the fit"
        return fit(*args, **kwargs)

    monkeypatch.setattr(stream_module, "estimate_aberrations", stuck)
    engine = _engine(np, nominal, len(frames))
    engine.add_frames(frames, pos)
    engine.step()
    try:
        with caplog.at_level("WARNING", logger="cryoptycho.stream"):
            engine.refine(2, time_budget_s=0.5)
        assert entered.is_set() and not gate.is_set()  # refine returned while the fit was stuck
    finally:
        gate.set()
    assert "not done within" in caplog.text
    assert engine.parallax_fit is None
    assert np.allclose(to_numpy(engine.probe), nominal.astype(to_numpy(engine.probe).dtype), rtol=1e-4, atol=1e-6)


@pytest.mark.subprocess
def test_daemon_live_result_of_a_probe_model_scan_carries_the_fitted_aberrations(tmp_path) -> None:
    """Through the real daemon: a scan declared with a probe model (no measured probe) gets the
    fit live, and its published result and result file carry the coefficients."""
    from cryoptycho.protocols.message_types import ProbeModelSpec
    from cryoptycho.protocols.subscriber import Subscriber
    from daemon_support import start_daemon, stream_for_result, wait_subscribed

    frames, pos, _, _ = _scan()
    daemon = start_daemon(tmp_path, "--set", "options.iterations=3", "--set", "refine_time_budget_s=60",
                          "--set", "resolution_interval_s=0")
    try:
        sub = Subscriber(daemon.publish, latest_only=False)
        wait_subscribed(daemon, sub)  # SUB connects asynchronously: a slow joiner would miss the first events
        fields = {"scan_id": "model", "energy_eV": ENERGY, "frame_shape": (M, M), "frame_dtype": "uint16",
                  "expected_frames": len(frames), "pixel_size_m": PIXEL, "probe": None,
                  "probe_model": ProbeModelSpec("defocused", SEMIANGLE, NOMINAL_DEFOCUS), "positions_m": pos}
        result = stream_for_result(daemon, sub, fields, frames, timeout_s=180)
        sub.close()
        found = {k: result.metadata[f"parallax_{k}_m"] for k in ERRORS}
        err = float(np.sqrt(sum((found[k] - ERRORS[k]) ** 2 for k in ERRORS)))
        assert err < 0.5 * float(np.sqrt(sum(v**2 for v in ERRORS.values()))), found
        with h5py.File(result.files["result"]) as f:
            saved = {k: float(f["extra"].attrs[f"parallax_{k}_m"]) for k in ERRORS}
            # the probe estimate as offline result files record it (tests/test_parallax.py)
            assert f["extra"].attrs["parallax_applied"] == 1
            assert f["extra"].attrs["parallax_significance"] > f["extra"].attrs["parallax_threshold"]
            assert f["nominal_probe"].shape == f["probe"].shape == (M, M)
        assert saved == pytest.approx(found, rel=1e-12)
    finally:
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM)
    # read after the stop, which waits until the test has copied every line the daemon wrote
    assert "parallax fit" in daemon.log()


@pytest.mark.subprocess
def test_bench_live_reports_the_live_and_offline_probe_estimates(tmp_path) -> None:
    """`cryoptycho simulate --realistic` (40 nm defocus off) then `cryoptycho bench live` with an
    early fit (``stream.parallax_after=0.5``): the live result file carries the fit refitted at
    scan end on every frame — the same estimate as the offline reconstruction's."""
    import json
    import subprocess

    data = tmp_path / "tiny.h5"
    subprocess.run(["cryoptycho", "simulate", "--realistic", "--frame-size", "32", "--detector", "ideal", "--thin",
                    "--dose", "200", "--overlap", "0.4", "--defocus-error", "40", "--astigmatism", "0",
                    "-o", str(data)], check=True, capture_output=True, timeout=300)
    run = subprocess.run(
        ["cryoptycho", "bench", "live", "--dataset", str(data), "--iterations", "2", "--offline-iterations", "2",
         "--refine-s", "60", "--rate", "100", "--set", "stream.parallax_after=0.5", "--json"],
        check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout)
    live, offline = figures["live_probe_estimate"], figures["offline_probe_estimate"]
    # the CG iterations the service's refinement ran (--iterations 2, well inside the budget)
    assert 1 <= figures["refine_iterations"] <= 2
    assert live["parallax_frames"] == offline["parallax_frames"] == figures["frames"]
    assert live["parallax_applied"] == offline["parallax_applied"] == 1
    assert abs(live["parallax_C10_m"] - 40e-9) < 15e-9
    for k in ("C10", "C12a", "C12b"):
        assert live[f"parallax_{k}_m"] == pytest.approx(offline[f"parallax_{k}_m"], abs=0.2e-9), k


def test_an_early_fit_still_running_at_scan_end_is_waited_for_then_refitted_from_its_estimate(
        monkeypatch) -> None:
    import threading

    import cryoptycho.gpu.stream as stream_module

    frames, pos, nominal, true = _scan(seed=5)
    n = len(frames)
    fit = stream_module.estimate_aberrations
    calls, released = [], threading.Event()

    def early_is_slow(*args, **kwargs):
        calls.append((len(args[0]), kwargs.get("start")))
        if len(args[0]) < n:  # the early fit, on half the frames: still running when refine starts
            released.wait(0.5)
        return fit(*args, **kwargs)

    monkeypatch.setattr(stream_module, "estimate_aberrations", early_is_slow)
    engine = _engine(np, nominal, n, stream={"parallax_after": 0.5})
    engine.add_frames(frames[: n // 2], pos[: n // 2])
    engine.step()  # starts the early fit
    engine.add_frames(frames[n // 2 :], pos[n // 2 :])
    engine.step()
    engine.refine(1, time_budget_s=120)
    released.set()
    assert [c[0] for c in calls] == [n // 2, n]
    early = calls[0]
    assert early[1] is None and calls[1][1] is not None  # the refit starts from the early estimate
    assert engine.probe_estimate["parallax_frames"] == n
    assert _overlap(to_numpy(engine.probe), true) > _overlap(nominal, true) + 0.05


def test_a_cancelled_refit_keeps_the_early_probe(monkeypatch) -> None:
    """A refit that outlasts the budget is cancelled (it stops at its next trial) and the early
    fit's correction stays."""
    import threading

    import cryoptycho.gpu.stream as stream_module
    from cryoptycho.gpu.parallax import FitCancelled

    frames, pos, nominal, _ = _scan(seed=6)
    n = len(frames)
    fit = stream_module.estimate_aberrations
    stopped = threading.Event()

    def refit_hangs(*args, **kwargs):
        if len(args[0]) == n:  # the refit: runs until the engine cancels it
            assert kwargs["cancel"].wait(60), "the engine never cancelled the refit"
            try:
                return fit(*args, **kwargs)
            except FitCancelled:
                stopped.set()
                raise
        return fit(*args, **kwargs)

    monkeypatch.setattr(stream_module, "estimate_aberrations", refit_hangs)
    # the refit starts whatever the early fit's pace: on a busy host that pace said it could not
    # finish in the budget, and it was skipped instead of started and cancelled
    monkeypatch.setattr(stream_module, "REFIT_SHARE", 0.0)
    engine = _engine(np, nominal, n, stream={"parallax_after": 0.5})
    engine.add_frames(frames[: n // 2], pos[: n // 2])
    _step_until_fitted(engine)
    early = engine.parallax_coefficients
    probe = to_numpy(engine.probe).copy()
    engine.add_frames(frames[n // 2 :], pos[n // 2 :])
    engine.step()
    engine.refine(1, time_budget_s=8.0)  # 4 s for the refit, then it is cancelled
    assert stopped.wait(120), "the refit was not cancelled"
    assert engine.parallax_coefficients == early
    assert engine.probe_estimate["parallax_frames"] == n // 2
    assert _overlap(to_numpy(engine.probe), probe) > 0.999


def test_no_refit_when_no_frame_arrived_after_the_early_fit(monkeypatch) -> None:
    import cryoptycho.gpu.stream as stream_module

    fit = stream_module.estimate_aberrations
    calls = []

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return fit(*args, **kwargs)

    monkeypatch.setattr(stream_module, "estimate_aberrations", counted)
    frames, pos, nominal, _ = _scan()
    engine = _engine(np, nominal, len(frames), stream={"parallax_after": 0.5})
    engine.add_frames(frames, pos)  # the whole scan before the first step: the early fit sees it all
    _step_until_fitted(engine)
    engine.refine(1)
    assert calls == [len(frames)]
    assert engine.probe_estimate["parallax_applied"] == 1


def test_a_refit_that_cannot_finish_in_the_budget_is_not_started(monkeypatch, caplog) -> None:
    """The early fit's pace predicts the refit's time: when it would not fit in the wait left,
    the refit is skipped (the refinement keeps its time) and the early estimate stands."""
    import threading

    import cryoptycho.gpu.stream as stream_module

    fit = stream_module.estimate_aberrations
    calls = []

    def slow(*args, **kwargs):
        calls.append(len(args[0]))
        threading.Event().wait(0.5)  # a fit that takes at least half a second
        return fit(*args, **kwargs)

    monkeypatch.setattr(stream_module, "estimate_aberrations", slow)
    frames, pos, nominal, _ = _scan(seed=7)
    n = len(frames)
    engine = _engine(np, nominal, n, stream={"parallax_after": 0.5})
    engine.add_frames(frames[: n // 2], pos[: n // 2])
    _step_until_fitted(engine)
    early = engine.parallax_coefficients
    engine.add_frames(frames[n // 2 :], pos[n // 2 :])
    engine.step()
    with caplog.at_level("INFO", logger="cryoptycho.stream"):
        engine.refine(1, time_budget_s=1.0)  # half of it, 0.5 s, for the fit: < 0.6 × 0.5 s × 2
    assert calls == [n // 2]
    assert "refit on" in caplog.text and "skipped" in caplog.text
    assert engine.parallax_coefficients == early
    assert engine.probe_estimate["parallax_frames"] == n // 2


class _FakeClock:
    """A clock that only the fake fit advances (one second per trial): the engine's budget
    decisions then depend on the fit's work, not on how busy the host is."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _early_fit_of_ten_slow_trials(monkeypatch, clock: _FakeClock, n: int, hold: bool = False):
    """Patch the fit: the early one (on fewer than ``n`` frames) first does ten trials of one
    (fake) second each, then (``hold``: once cancelled) runs the real fit, whose trials take no
    fake time. Returns (ten trials done, cancelled) events."""
    import threading

    import cryoptycho.gpu.stream as stream_module
    from cryoptycho.gpu.parallax import FitCancelled

    fit = stream_module.estimate_aberrations
    ten, cancelled = threading.Event(), threading.Event()

    def slow_start(*args, **kwargs):
        if len(args[0]) < n:
            for _ in range(10):
                kwargs["cancel"].is_set()  # one trial probe
                clock.now += 1.0
            ten.set()
            if hold:  # not landing before refine looks at it
                assert kwargs["cancel"].wait(60), "the engine never dropped the fit"
        try:
            return fit(*args, **kwargs)
        except FitCancelled:
            cancelled.set()
            raise

    monkeypatch.setattr(stream_module, "estimate_aberrations", slow_start)
    return ten, cancelled


def test_a_running_fit_whose_pace_says_it_cannot_finish_is_dropped_at_once(monkeypatch, caplog) -> None:
    """At scan end an early fit still running is judged by the work it did: ten trials in ten
    seconds with ~190 to go cannot finish in the 30 s share of a 60 s budget, so ``refine``
    drops it at once (the fit stops at its next trial) and gives the budget to CG — every
    iteration asked for runs — and the nominal probe and the refined object stand."""

    frames, pos, nominal, _ = _scan(seed=8)
    n = len(frames)
    clock = _FakeClock()
    ten, cancelled = _early_fit_of_ten_slow_trials(monkeypatch, clock, n, hold=True)
    engine = _engine(np, nominal, n, stream={"parallax_after": 0.5})
    engine.clock = clock
    engine.add_frames(frames[: n // 2], pos[: n // 2])
    engine.step()  # starts the early fit
    engine.add_frames(frames[n // 2 :], pos[n // 2 :])
    engine.step()
    assert ten.wait(60), "the early fit never ran its trials"
    before = to_numpy(engine.snapshot().object).copy()
    with caplog.at_level("WARNING", logger="cryoptycho.stream"):
        losses = engine.refine(3, time_budget_s=60.0)
    assert cancelled.wait(60), "the dropped fit was not cancelled"
    assert "dropped after" in caplog.text and "not done within" not in caplog.text
    assert len(losses) == 3  # the whole budget went to CG (the fake clock did not move during it)
    assert engine.parallax_fit is None
    assert np.allclose(to_numpy(engine.probe), nominal.astype(to_numpy(engine.probe).dtype), rtol=1e-4, atol=1e-6)
    assert not np.allclose(to_numpy(engine.snapshot().object), before)  # the refined object is kept


def test_a_running_fit_whose_pace_says_it_finishes_is_waited_for(monkeypatch) -> None:
    """The same early fit, when its trials so far say it is nearly done (an expected count of
    12), is waited for and applied, then refitted on every frame."""
    import cryoptycho.gpu.stream as stream_module

    frames, pos, nominal, true = _scan(seed=8)
    n = len(frames)
    clock = _FakeClock()
    ten, cancelled = _early_fit_of_ten_slow_trials(monkeypatch, clock, n)
    monkeypatch.setattr(stream_module, "FIT_TRIALS_COLD", 12)
    engine = _engine(np, nominal, n, stream={"parallax_after": 0.5})
    engine.clock = clock
    engine.add_frames(frames[: n // 2], pos[: n // 2])
    engine.step()
    engine.add_frames(frames[n // 2 :], pos[n // 2 :])
    engine.step()
    assert ten.wait(60), "the early fit never ran its trials"
    losses = engine.refine(3, time_budget_s=60.0)
    assert not cancelled.is_set()
    assert len(losses) == 3
    assert engine.probe_estimate["parallax_frames"] == n  # the refit on every frame landed
    assert _overlap(to_numpy(engine.probe), true) > _overlap(nominal, true) + 0.05
