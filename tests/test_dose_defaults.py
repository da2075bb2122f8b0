"""The dose-aware Tikhonov weight (``mu0="auto"``, the default): μ₀ is chosen from the data's
counts per illuminated object pixel (gpu/priors.py ``auto_mu0``), offline, live and through the
console script, and saved as the number chosen."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from cryoptycho.daemon.storage.dataset import write_dataset
from cryoptycho.daemon.storage.result import read_result
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.priors import MU0_AUTO_RANGE, auto_mu0, prior_term
from cryoptycho.gpu.reconstruct import counts_per_object_pixel, prepare, reconstruct
from cryoptycho.gpu.stream import StreamingReconstructor
from engine_helpers import phase_corr, scored_region, synthetic_dataset


def test_law_falls_with_the_counts_and_stays_in_range() -> None:
    counts = np.geomspace(0.01, 1e6, 40)
    mu0 = np.array([auto_mu0(c) for c in counts])
    assert np.all(np.diff(mu0) <= 0) and mu0[0] > mu0[-1]
    assert mu0.min() == MU0_AUTO_RANGE[0] and mu0.max() == MU0_AUTO_RANGE[1]
    # between the clips, ten times the counts lower μ₀ by less than ten times (not plain 1/e:
    # measured optimum 0.03–0.1 at 1.6 counts per pixel, 0.003–0.01 at 32)
    mid = [auto_mu0(c) for c in (5.0, 50.0)]
    assert all(MU0_AUTO_RANGE[0] < m < MU0_AUTO_RANGE[1] for m in mid), mid
    assert 1.0 < mid[0] / mid[1] < 10.0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="counts per object pixel"):
            auto_mu0(bad)


def test_options_accept_auto_or_a_weight() -> None:
    assert ReconOptions().mu0 == "auto"
    assert ReconOptions(mu0=0.05).with_mu0_decision(1.0).mu0 == 0.05
    assert ReconOptions().with_mu0_decision(5.0).mu0 == auto_mu0(5.0)
    for bad in (-0.1, float("nan"), "often"):
        with pytest.raises(ValueError, match="mu0"):
            ReconOptions(mu0=bad)
    with pytest.raises(ValueError, match="decided"):
        prior_term(np.ones((4, 4), complex), ReconOptions(), 1.0)


def test_reconstruct_decides_from_the_dose_and_saves_the_number() -> None:
    low, high = synthetic_dataset(300.0, grid=5, seed=1), synthetic_dataset(3e4, grid=5, seed=1)
    chosen = []
    for data in (low, high):
        p = prepare(data)
        counts = counts_per_object_pixel(p.counts_fft, p.mask, p.probe, p.batch)
        state = reconstruct(data, {"iterations": 2, "refine_probe": False})
        assert state.options["mu0"] == pytest.approx(auto_mu0(counts))
        chosen.append(state.options["mu0"])
    assert chosen[0] > chosen[1]  # lower dose, stronger prior


def test_default_handles_high_dose_without_tuning() -> None:
    """At ≈ 11,000 e⁻/Å² the old constant default (0.03) over-smoothed; test_engine_recon's
    high-dose test had to pin μ₀ = 1e-3. The dose-aware default needs no pin."""
    data = synthetic_dataset(1e5, grid=8, seed=0)
    region = scored_region(data.truth_object, 12)
    auto = reconstruct(data, {"iterations": 30, "refine_probe": False})
    old = reconstruct(data, {"iterations": 30, "refine_probe": False, "mu0": 0.03})
    assert auto.options["mu0"] < 0.01
    pc_auto = phase_corr(to_numpy(auto.object), data.truth_object, region)
    pc_old = phase_corr(to_numpy(old.object), data.truth_object, region)
    assert pc_auto > 0.9 and pc_auto > pc_old


def test_console_script_saves_the_decided_weight(tmp_path) -> None:
    data = synthetic_dataset(2e3, grid=4, seed=3)
    dataset = write_dataset(tmp_path / "d.h5", data)
    out = tmp_path / "r.h5"
    run = subprocess.run(
        ["cryoptycho", "reconstruct", str(dataset), "-o", str(out),
         "-n", "2", "-q", "--fixed-probe"],
        check=False, capture_output=True, text=True, env=os.environ.copy(), timeout=120,
    )
    assert run.returncode == 0, run.stderr
    saved = read_result(out).state.options["mu0"]
    p = prepare(data)
    assert saved == pytest.approx(auto_mu0(counts_per_object_pixel(p.counts_fft, p.mask, p.probe, p.batch)))
    fixed = subprocess.run(
        ["cryoptycho", "reconstruct", str(dataset), "-o", str(out),
         "-n", "2", "-q", "--fixed-probe", "--set", "mu0=0.07"],
        check=False, capture_output=True, text=True, env=os.environ.copy(), timeout=120,
    )
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(json.dumps(read_result(out).state.options))["mu0"] == 0.07


def test_streaming_engine_decides_live_and_saves_the_number() -> None:
    data = synthetic_dataset(2e3, grid=6, seed=2)
    engine = StreamingReconstructor(
        frame_shape=data.frame_shape, frame_dtype=data.frames.dtype, pixel_size=data.pixel_size,
        probe=data.probe, options=ReconOptions(refine_probe=False, stream={"batch_size": 8}),
    )
    engine.add_frames(data.frames[:18], data.positions[:18])
    engine.step()
    early = engine.decided_options().mu0
    assert isinstance(early, float) and MU0_AUTO_RANGE[0] <= early <= MU0_AUTO_RANGE[1]
    engine.add_frames(data.frames[18:], data.positions[18:])
    for _ in range(4):
        engine.step()
    engine.refine(2)
    state = engine.snapshot()
    assert isinstance(state.options["mu0"], float)
    assert np.isfinite(to_numpy(state.object)).all()


def _stalling_minimize(monkeypatch, seen: list[float]):  # type: ignore[no-untyped-def]
    """reconstruct.minimize as CG behaves when the truncation rule's discontinuities stop it:
    a few real iterations, then "no_descent"."""
    from cryoptycho.gpu import reconstruct as rc

    real = rc.minimize

    def stalls(fun, x, max_iter, *args, **kw):  # type: ignore[no-untyped-def]
        seen.append(fun.options.alpha_h)
        res = real(fun, x, min(max_iter, 3), *args, **kw)
        res.stopped = "no_descent"
        return res

    monkeypatch.setattr(rc, "minimize", stalls)


def test_cg_stalled_by_truncation_goes_on_with_a_wider_threshold(monkeypatch) -> None:
    """Item 5 of issue 14: on a ribosome at 20 e⁻/Å², CG stopped after 38 iterations because a
    measurement flipping between dropped and kept made every trial step look uphill; the
    refinement widens α_h (×2, at most twice) and continues instead of stopping."""
    data = synthetic_dataset(300.0, grid=5, seed=1)
    seen: list[float] = []
    _stalling_minimize(monkeypatch, seen)
    state = reconstruct(data, {"iterations": 20, "refine_probe": False})
    assert seen == [5.0, 10.0, 20.0]  # two widenings, then the stall ends the run
    assert state.iteration == 9 and state.options["alpha_h"] == 5.0  # the user's setting is kept
    seen.clear()
    state = reconstruct(data, {"iterations": 20, "refine_probe": False, "truncation": "none"})
    assert seen == [5.0] and state.iteration == 3  # no truncation: a stall is a stall


def test_objective_built_directly_decides_the_same_weight() -> None:
    from cryoptycho.gpu.reconstruct import FullBatchObjective

    data = synthetic_dataset(300.0, grid=5, seed=1)
    p = prepare(data)
    counts = counts_per_object_pixel(p.counts_fft, p.mask, p.probe, p.batch)
    fun = FullBatchObjective(p.counts_fft, p.batch, p.mask, p.options, p.kappa, p.probe_power)
    assert fun.options.mu0 == pytest.approx(auto_mu0(counts))


@pytest.mark.subprocess
def test_live_scan_through_the_daemon_saves_the_decided_weight(tmp_path) -> None:
    """The field's path: a scan streamed to the real daemon with default options; the result
    file's options hold the μ₀ the dose decided (a number), not "auto"."""
    import signal

    import h5py
    from cryoptycho.protocols.subscriber import Subscriber
    from daemon_support import start_daemon, stream_for_result, synthetic_scan, wait_subscribed

    scan = synthetic_scan(n_side=8)
    daemon = start_daemon(tmp_path, "--set", "options.iterations=4", "--set", "refine_time_budget_s=30")
    try:
        sub = Subscriber(daemon.publish, latest_only=False)
        wait_subscribed(daemon, sub)
        result = stream_for_result(daemon, sub, scan.start_fields("dose"), scan.frames, batch=16)
        sub.close()
        with h5py.File(result.files["result"]) as f:
            saved = json.loads(f.attrs["options"])["mu0"]
        assert isinstance(saved, float) and MU0_AUTO_RANGE[0] <= saved <= MU0_AUTO_RANGE[1], saved
    finally:
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM)
