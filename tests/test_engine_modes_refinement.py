"""Position and aberration refinement with a mixed-state (incoherent modes) probe: the position
gradient and the aberration gradient of I = Σ_m |F[S_δ ψ_m · R_k T]|² against finite
differences, the same phase plate on every mode against the modes of the aberrated probe, a
known scan error and defocus recovered from partially coherent data offline (refinement and
the searches), in the streaming engine (NumPy and the strict backend) and through the daemon,
the parallax fit correcting the probe the modes are made from, and the console scripts
(simulate --realistic, reconstruct with modes and refinement)."""

from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import pytest
from cryoptycho.gpu import operators
from cryoptycho.gpu.aberrations import ParametricProbe
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.data import PtychoData
from cryoptycho.gpu.geometry import fit_geometry
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.positions import data_loss, position_terms
from cryoptycho.gpu.probes import aberrate, make_probe, source_modes
from cryoptycho.gpu.reconstruct import FullBatchObjective, problem_kappa, reconstruct
from engine_helpers import (
    ENERGY,
    PIXEL,
    check_coefficient_gradient,
    check_position_gradient,
    nrmse,
    phase_corr,
    scan_errors,
    weak_phase_object,
)

M = 32
SOURCE_PX = 1.5  #: rms source size (object pixels): 3 modes of ≈ 39 / 31 / 31 %


def _modes_problem(modes: int, seed: int = 3):
    """A small noisy scan of ``modes`` incoherent modes of a randomized probe at sub-pixel
    positions: (positions px, geometry, counts FFT order, object (not the optimum), modes)."""
    rng = np.random.default_rng(seed)
    probe = make_probe("randomized", (M, M), PIXEL, ENERGY, 7e-3, 0.0, precision="double",
                       total_intensity=1e4, diameter=12 * PIXEL, seed=seed)
    psi = source_modes(probe, PIXEL, SOURCE_PX * PIXEL, modes)
    iy, ix = np.mgrid[0:4, 0:4]
    pos = (np.stack([iy.ravel(), ix.ravel()], 1) * 3.0 + rng.uniform(0.2, 0.8, (16, 2))) * PIXEL
    geo = fit_geometry(pos, PIXEL, (M, M))
    px = geo.to_pixels(pos)
    truth = weak_phase_object(geo.object_shape, seed)
    batch = operators.make_batch(px, geo.object_shape, (M, M), quantum=1e-7)
    counts = rng.poisson(to_numpy(operators.mode_intensity(truth, psi, batch))).astype(np.float64)
    obj = truth.astype(np.complex128) * np.exp(0.05j) * (1 + 0.02 * rng.standard_normal(truth.shape))
    return px, geo, counts, obj, psi


@pytest.mark.parametrize("modes", [2, 3])
@pytest.mark.parametrize("model", ["poisson", "amplitude"])
def test_position_gradient_with_modes_matches_finite_differences(modes: int, model: str) -> None:
    px, geo, y, obj, psi = _modes_problem(modes)

    def loss_at(q: np.ndarray) -> float:
        b = operators.make_batch(q, geo.object_shape, (M, M), quantum=1e-7)
        return data_loss(obj, psi, y, b, model=model, scale=2.0)

    b = operators.make_batch(px, geo.object_shape, (M, M), quantum=1e-7)
    loss, grad, fisher = position_terms(obj, psi, y, b, model=model, scale=2.0)
    assert loss == pytest.approx(loss_at(px), rel=1e-10)
    # the mode sum is not the main mode alone: the gradient differs from the one-mode one
    _, grad_main, _ = position_terms(obj, psi[0], y, b, model=model, scale=2.0)
    assert np.abs(grad - grad_main).max() > 0.05 * np.abs(grad).max()
    assert np.all(np.linalg.eigvalsh(fisher) > 0)
    assert check_position_gradient(grad, px, loss_at) >= 8


def test_position_terms_of_a_one_mode_stack_are_the_coherent_ones() -> None:
    px, geo, y, obj, psi = _modes_problem(2)
    b = operators.make_batch(px, geo.object_shape, (M, M), quantum=1e-7)
    one = position_terms(obj, psi[0], y, b)
    stack = position_terms(obj, psi[:1], y, b)
    assert stack[0] == pytest.approx(one[0], rel=1e-12)
    np.testing.assert_allclose(stack[1], one[1], rtol=1e-10, atol=1e-12 * np.abs(one[1]).max())
    np.testing.assert_allclose(stack[2], one[2], rtol=1e-10, atol=1e-12 * np.abs(one[2]).max())
    assert data_loss(obj, psi[:1], y, b) == pytest.approx(data_loss(obj, psi[0], y, b), rel=1e-12)


@pytest.mark.parametrize("modes", [2, 3])
def test_aberration_gradient_with_modes_matches_finite_differences(modes: int) -> None:
    px, geo, y, obj, psi = _modes_problem(modes, seed=5)
    batch = operators.make_batch(px, geo.object_shape, (M, M))
    power = float((np.abs(psi) ** 2).sum())
    fun = FullBatchObjective(y, batch, None, ReconOptions(precision="double"),
                             problem_kappa(y, None, psi, batch), power)
    model = ParametricProbe(psi, PIXEL, ENERGY)
    x0 = np.array([0.3, -0.2, 0.4, 0.1, -0.3, 0.2])
    assert model.probe(x0).shape == psi.shape

    def loss(x: np.ndarray) -> float:
        return fun({"object": obj, "probe": model.probe(x)})[0]

    _, grads = fun({"object": obj, "probe": model.probe(x0)})
    g = model.gradient(grads["probe"], x0)
    # every mode contributes: the main mode's term alone is not the gradient
    main_only = grads["probe"].copy()
    main_only[1:] = 0
    assert np.abs(g - model.gradient(main_only, x0)).max() > 0.01 * np.abs(g).max()
    check_coefficient_gradient(g, x0, loss, model.names)


def test_one_plate_on_every_mode_gives_the_modes_of_the_aberrated_probe() -> None:
    """The finite source's modes of the aberrated probe are the nominal modes under the same
    phase plate (up to a unitary mixing of the modes): their density matrices agree."""
    probe = make_probe("defocused", (M, M), PIXEL, ENERGY, 8e-3, 60e-9, precision="double",
                       total_intensity=1e4)
    coefficients = {"C10": 20e-9, "C12a": 8e-9, "C12b": -5e-9}
    model = ParametricProbe(source_modes(probe, PIXEL, SOURCE_PX * PIXEL, 3), PIXEL, ENERGY,
                            tuple(coefficients))
    model.coefficients = np.array(list(coefficients.values()))
    plated = model.probe().reshape(3, -1)
    direct = source_modes(aberrate(probe, PIXEL, ENERGY, coefficients), PIXEL, SOURCE_PX * PIXEL, 3).reshape(3, -1)
    rho_plated = plated.T @ plated.conj()
    rho_direct = direct.T @ direct.conj()
    np.testing.assert_allclose(rho_plated, rho_direct, atol=1e-6 * np.abs(rho_direct).max())
    # and the plate is not the identity here
    nominal = source_modes(probe, PIXEL, SOURCE_PX * PIXEL, 3).reshape(3, -1)
    assert np.abs(nominal.T @ nominal.conj() - rho_direct).max() > 0.1 * np.abs(rho_direct).max()


# --- recovery from partially coherent data with scan and defocus errors ---------------------

DEFOCUS_ERROR = 15e-9


def _realistic_small(counts: float = 1e5, seed: int = 0):
    """A copy of :func:`_simulate_small` (simulated once per arguments: six tests use it)."""
    return copy.deepcopy(_simulate_small(counts, seed))


@functools.cache
def _simulate_small(counts: float, seed: int):
    """8×8 raster (3 px steps) recorded at distorted positions (engine_helpers.scan_errors:
    4 % / −3 % scale, 2° rotation, 2 % shear, 0.3 px jitter) with the three strongest modes of
    a 1.5 px source through a randomized probe 15 nm out of focus; the user has the nominal
    probe and positions. Returns (nominal m, true m, detector-order frames, nominal probe,
    scoring (origin, shape, target))."""
    rng = np.random.default_rng(seed)
    nominal_probe = make_probe("randomized", (M, M), PIXEL, ENERGY, 7e-3, 0.0, precision="double",
                               total_intensity=counts, diameter=12 * PIXEL, seed=seed)
    modes = source_modes(aberrate(nominal_probe, PIXEL, ENERGY, {"C10": DEFOCUS_ERROR}), PIXEL,
                         SOURCE_PX * PIXEL, 3)
    iy, ix = np.mgrid[0:8, 0:8]
    nominal = np.stack([iy.ravel(), ix.ravel()], 1) * 3.0 * PIXEL
    true = scan_errors().true_positions(nominal)
    geo = fit_geometry(np.vstack([nominal, true]), PIXEL, (M, M))
    truth = weak_phase_object(geo.object_shape, seed)
    batch = operators.make_batch(geo.to_pixels(true), geo.object_shape, (M, M))
    frames = rng.poisson(operators.mode_intensity(truth, modes, batch)).astype(np.uint16)
    margin = M // 2 + 3
    shape = (geo.object_shape[0] - 2 * margin, geo.object_shape[1] - 2 * margin)
    origin = (geo.origin[0] + margin * PIXEL, geo.origin[1] + margin * PIXEL)
    target = truth[margin:margin + shape[0], margin:margin + shape[1]]
    return nominal, true, operators.from_fft_order(frames), nominal_probe.astype(np.complex64), (origin, shape, target)


def _score(state, scoring) -> tuple[float, float]:
    from cryoptycho.gpu.sim.evaluation import resample

    origin, shape, target = scoring
    rec = resample(to_numpy(state.object), state.geometry.origin, PIXEL, origin, shape)
    region = (slice(None), slice(None))
    return phase_corr(rec, target, region), nrmse(rec, target, region)


def _position_error_px(state, true: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(state.positions) - true, axis=1).mean() / PIXEL)


REFINE = {"refine_positions": True, "refine_aberrations": True, "aberrations": ["C10"]}


def test_modes_with_refinement_recover_scan_and_defocus_errors_offline() -> None:
    """Known source size, nominal probe and positions: modes + position and aberration
    refinement find the scan error and the 15 nm defocus, and score near the oracle (true modes
    and positions), above modes alone and above refinement with one coherent probe (which
    takes the blur for a wrong defocus)."""
    nominal, true, frames, probe, scoring = _realistic_small()
    data = PtychoData(frames=frames, positions=nominal, energy=ENERGY, pixel_size=PIXEL, probe=probe)
    base = {"iterations": 60, "mu0": 1e-3}
    source = {"source_size_m": SOURCE_PX * PIXEL}
    modes_only = reconstruct(data, {**base, **source})
    coherent_refined = reconstruct(data, {**base, **REFINE})
    both = reconstruct(data, {**base, **source, **REFINE})
    assert both.probe.shape == (3, M, M)
    assert both.options["refine_positions"] and both.options["source_size_m"] == pytest.approx(SOURCE_PX * PIXEL)
    np.testing.assert_allclose(both.nominal_positions, nominal, rtol=0, atol=1e-16)
    before = float(np.linalg.norm(nominal - true, axis=1).mean() / PIXEL)
    assert before > 0.5 and _position_error_px(both, true) < 0.35, (before, _position_error_px(both, true))
    assert both.probe_estimate["aberration_C10_m"] == pytest.approx(DEFOCUS_ERROR, abs=2e-9)
    c_modes, e_modes = _score(modes_only, scoring)
    c_coh, e_coh = _score(coherent_refined, scoring)
    c_both, e_both = _score(both, scoring)
    assert e_both < 0.8 * e_modes and c_both > c_modes, ((c_modes, e_modes), (c_both, e_both))
    assert e_both < 0.5 * e_coh and c_both > c_coh, ((c_coh, e_coh), (c_both, e_both))
    # the oracle (true modes at the true positions) for scale: within 40 % of its NRMSE
    oracle_probe = source_modes(aberrate(probe.astype(np.complex128), PIXEL, ENERGY, {"C10": DEFOCUS_ERROR}),
                                PIXEL, SOURCE_PX * PIXEL, 3).astype(np.complex64)
    oracle = reconstruct(dataclasses.replace(data, positions=true, probe=oracle_probe), base)
    _, e_oracle = _score(oracle, scoring)
    assert e_both < 1.4 * e_oracle, (e_oracle, e_both)


def _streamed(backend: str, iterations: int, steps: int = 5, **options):
    from cryoptycho.gpu.stream import StreamingReconstructor

    nominal, true, frames, probe, scoring = _realistic_small()
    opts = ReconOptions(**{"backend": backend, "mu0": 1e-3, "source_size_m": SOURCE_PX * PIXEL,
                           "position_start_iteration": 5, **REFINE, **options})
    engine = StreamingReconstructor(frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=PIXEL,
                                    probe=probe, options=opts, energy_eV=ENERGY)
    assert engine.probe.shape == (3, M, M)
    for lo in range(0, len(nominal), 16):
        engine.add_frames(frames[lo:lo + 16], nominal[lo:lo + 16])
        for _ in range(steps):
            engine.step()
    engine.refine(iterations)
    return engine.snapshot(), nominal, true, scoring


def test_streaming_engine_refines_positions_and_defocus_with_modes() -> None:
    """The live engine with a known source size refines positions and defocus at scan end
    (``refine``, as the service does): the snapshot keeps the received positions as the nominal
    ones and the coefficient found."""
    state, nominal, true, scoring = _streamed("numpy", 40)
    assert state.probe.shape == (3, M, M)
    np.testing.assert_allclose(state.nominal_positions, nominal, rtol=0, atol=1e-16)
    before = float(np.linalg.norm(nominal - true, axis=1).mean() / PIXEL)
    assert before > 0.5 and _position_error_px(state, true) < 0.35, (before, _position_error_px(state, true))
    assert state.probe_estimate["aberration_C10_m"] == pytest.approx(DEFOCUS_ERROR, abs=2e-9)
    corr, err = _score(state, scoring)
    assert corr > 0.95 and err < 0.02, (corr, err)


def test_scan_end_refinement_after_live_position_steps_starts_from_the_received_positions() -> None:
    """With live position steps (``stream.refine_positions``) the scan-end refinement starts its
    scan model from the received positions, not from the live model's affine part: that part is
    biased (here a y scale of 0.97 for a true 1.04, measured against an object still being
    built), and from it the refinement ended at 0.45 px where from the received positions it
    finds the scan error as without the live steps (0.27 px)."""
    state, nominal, true, _ = _streamed("numpy", 40, stream={"refine_positions": True, "position_every": 2,
                                                              "position_min_visits": 2})
    np.testing.assert_allclose(state.nominal_positions, nominal, rtol=0, atol=1e-16)
    assert _position_error_px(state, true) < 0.35, _position_error_px(state, true)
    assert state.probe_estimate["aberration_C10_m"] == pytest.approx(DEFOCUS_ERROR, abs=2e-9)


def test_streaming_refinement_with_modes_reads_nothing_back_implicitly() -> None:
    """The same on the strict backend (CuPy's semantics: an implicit device → host transfer
    raises), short: positions and the defocus move."""
    state, nominal, _, _ = _streamed("strict", 6, steps=1, position_every=2, aberration_every=2,
                                     aberration_start_iteration=2, position_start_iteration=2,
                                     aberration_fit_iterations=2)
    assert state.probe.shape == (3, M, M)
    assert np.abs(state.positions - nominal).max() > 0.05 * PIXEL
    assert state.probe_estimate["aberration_C10_m"] > 2e-9


def test_streaming_steps_refine_positions_with_modes() -> None:
    """``stream.refine_positions`` with a (3, M, M) probe: the mini-batch steps measure the
    positions through all modes and move them towards the true ones while frames arrive."""
    from cryoptycho.gpu.stream import StreamingReconstructor

    nominal, true, frames, probe, _ = _realistic_small()
    modes = source_modes(aberrate(probe.astype(np.complex128), PIXEL, ENERGY, {"C10": DEFOCUS_ERROR}),
                         PIXEL, SOURCE_PX * PIXEL, 3).astype(np.complex64)
    opts = ReconOptions(mu0=1e-3, refine_positions=True,
                        stream={"refine_positions": True, "position_every": 2, "position_min_visits": 2})
    engine = StreamingReconstructor(frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=PIXEL,
                                    probe=modes, options=opts, energy_eV=ENERGY)
    for lo in range(0, len(nominal), 16):
        engine.add_frames(frames[lo:lo + 16], nominal[lo:lo + 16])
        for _ in range(6):
            engine.step()
    for _ in range(20):
        engine.step()
    state = engine.snapshot()
    assert state.probe.shape == (3, M, M)
    np.testing.assert_allclose(state.nominal_positions, nominal, rtol=0, atol=1e-16)
    before = float(np.linalg.norm(nominal - true, axis=1).mean() / PIXEL)
    after = _position_error_px(state, true)
    assert before > 0.5 and after < 0.5, (before, after)


def test_console_scripts_simulate_realistic_then_reconstruct_with_modes_and_refinement(tmp_path) -> None:
    """``cryoptycho simulate --realistic --source-size`` then ``cryoptycho reconstruct`` with the
    source size (two modes) and position and aberration refinement: the result file holds the
    two modes, the refined positions beside the nominal ones and the coefficients found."""
    import os
    import subprocess

    from cryoptycho.daemon.storage.dataset import read_dataset
    from cryoptycho.daemon.storage.result import read_result

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["cryoptycho", *args], capture_output=True, text=True, env=os.environ.copy(),
                              timeout=300, check=False)

    ds = tmp_path / "real.h5"
    out = cli("simulate", "--realistic", "--source-size", "1.0", "--probe-modes", "2", "--frame-size", "32",
              "--detector", "ideal", "--thin", "--dose", "200", "--overlap", "0.4", "-o", str(ds))
    assert out.returncode == 0, out.stderr
    data = read_dataset(ds)
    assert data.truth_probe.shape == (2, 32, 32) and data.probe is None
    res = tmp_path / "res.h5"
    out = cli("reconstruct", str(ds), "-o", str(res), "-n", "12", "--no-export", "-q",
              "--set", "source_size_m=1e-10", "--set", "probe_modes=2",
              "--set", "refine_positions=true", "--set", "position_start_iteration=4", "--set", "position_every=4",
              "--set", "refine_aberrations=true", "--set", "aberration_start_iteration=4",
              "--set", "aberration_every=4")
    assert out.returncode == 0, out.stderr
    state = read_result(res).state
    assert state.probe.shape == (2, 32, 32)
    assert state.options["refine_positions"] is True and state.options["refine_aberrations"] is True
    np.testing.assert_allclose(state.nominal_positions, data.positions, rtol=0, atol=1e-16)
    assert np.abs(state.positions - data.positions).max() > 0.01e-10  # moved by the refinement
    import h5py

    with h5py.File(res) as f:  # the coefficients found, in /extra beside the parallax estimate
        found = {k: float(v) for k, v in f["extra"].attrs.items() if k.startswith("aberration_")}
    assert set(found) == {f"aberration_{n}_m" for n in ReconOptions().aberrations}
    assert all(np.isfinite(v) for v in found.values()) and any(abs(v) > 0.1e-9 for v in found.values()), found
    assert {k: state.probe_estimate[k] for k in found} == found  # read_result hands them back too


def test_parallax_fit_corrects_the_probe_whose_modes_the_source_makes() -> None:
    """With ``source_size_m`` the parallax fit ("auto", a probe from a probe model) corrects the
    coherent nominal probe and the modes are made from the corrected one, offline (before the
    iterations) and live (when the fit lands)."""
    from cryoptycho.gpu.probes import mode_powers, scale_probe
    from cryoptycho.gpu.stream import StreamingReconstructor
    from engine_helpers import aberrated_dataset

    errors = {"C10": 15e-9, "C12a": 6e-9, "C12b": -4e-9}
    data = aberrated_dataset(1e5, errors, 1, 14, m=M, semiangle=8e-3, nominal_defocus=60e-9)
    source = {"source_size_m": 0.5 * PIXEL}
    offline = reconstruct(data, {"iterations": 2, "mu0": 1e-3, **source})
    assert offline.probe.shape == (3, M, M) and offline.probe_estimate["parallax_applied"] == 1.0
    found = {k: offline.probe_estimate[f"parallax_{k}_m"] for k in errors}
    assert all(abs(found[k] - v) < 3e-9 for k, v in errors.items()), found

    nominal = scale_probe(make_probe("defocused", (M, M), PIXEL, ENERGY, 8e-3, 60e-9), data.frames, None)
    opts = ReconOptions(mu0=1e-3, init="ones", stream={"batch_size": 16}, **source)
    engine = StreamingReconstructor(frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=PIXEL, probe=nominal,
                                    options=opts, expected_frames=len(data.frames), energy_eV=ENERGY,
                                    probe_from_model=True)
    engine.add_frames(data.frames, data.positions)
    engine.step()
    engine.refine(2)  # the fit runs at scan end, before the refinement
    live = engine.parallax_coefficients
    assert live is not None and all(abs(live[k] - v) < 3e-9 for k, v in errors.items()), live
    probe = to_numpy(engine.probe)
    assert probe.shape == (3, M, M)
    want = source_modes(aberrate(to_numpy(nominal).astype(np.complex128), PIXEL, ENERGY, live), PIXEL,
                        0.5 * PIXEL, 3)
    # the same mixed state up to the refinement's two iterations (the probe is fixed: none)
    rho = probe.reshape(3, -1).T @ probe.reshape(3, -1).conj()
    rho_want = want.reshape(3, -1).T @ want.reshape(3, -1).conj()
    rho_want *= mode_powers(probe).sum() / mode_powers(want).sum()
    np.testing.assert_allclose(rho, rho_want, atol=1e-3 * np.abs(rho_want).max())


@pytest.mark.subprocess
def test_daemon_scan_with_a_source_size_refines_positions_and_defocus(tmp_path) -> None:
    """A scan sent to the real daemon with ``source_size_m`` and position and aberration
    refinement: the live result file holds three modes, the refined positions beside the
    received ones and the defocus found at scan end."""
    import signal
    import time

    import h5py
    from cryoptycho.protocols.messages import Result, ScanEvent
    from cryoptycho.protocols.producer import Producer
    from cryoptycho.protocols.subscriber import Subscriber
    from daemon_support import start_daemon, wait_subscribed

    nominal, _true, frames, probe, _ = _realistic_small()
    daemon = start_daemon(tmp_path, "--set", "options.iterations=30", "--set", "resolution_interval_s=0")
    try:
        sub = Subscriber(daemon.publish, latest_only=False)
        wait_subscribed(daemon, sub)
        options = {"mu0": 1e-3, "source_size_m": SOURCE_PX * PIXEL, "position_start_iteration": 5, **REFINE}
        with Producer(daemon.ingest, control=daemon.control) as producer:
            producer.start_scan(scan_id="modes-refine", energy_eV=ENERGY, frame_shape=(M, M),
                                frame_dtype="uint16", expected_frames=len(frames), pixel_size_m=PIXEL,
                                probe=probe, positions_m=nominal, options=options)
            producer.send_frames(frames)
            producer.end_scan()
        result = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            ev = sub.recv(timeout_s=0.5)
            if isinstance(ev, Result) and ev.scan_id == "modes-refine":
                result = ev
            if isinstance(ev, ScanEvent) and ev.scan_id == "modes-refine" and ev.event in ("finished", "failed"):
                assert ev.event == "finished", daemon.log()
                break
        else:
            pytest.fail(f"the scan did not finish\n{daemon.log()}")
        assert result is not None, daemon.log()
        sub.close()
        with h5py.File(result.files["result"]) as f:
            assert f["probe"].shape == (3, M, M)
            refined = np.stack([f["probe_position_y_m"][()], f["probe_position_x_m"][()]], 1)
            received = np.stack([f["nominal_probe_position_y_m"][()], f["nominal_probe_position_x_m"][()]], 1)
            defocus = float(f["extra"].attrs["aberration_C10_m"])
        np.testing.assert_array_equal(received, nominal)
        assert np.abs(refined - received).max() > 0.05 * PIXEL
        assert defocus == pytest.approx(DEFOCUS_ERROR, abs=3e-9)
    finally:
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM)


@pytest.mark.parametrize("modes", [1, 3])
def test_probe_only_evaluation_skips_the_object_gradient(modes: int) -> None:
    """``want_object = False`` (the aberration fit at a held object): same loss and probe
    gradient, no object gradient."""
    px, geo, y, obj, psi = _modes_problem(max(modes, 2))
    psi = psi[0] if modes == 1 else psi
    batch = operators.make_batch(px, geo.object_shape, (M, M))
    power = float((np.abs(psi) ** 2).sum())
    fun = FullBatchObjective(y, batch, None, ReconOptions(precision="double", chunk_size=5),
                             problem_kappa(y, None, psi, batch), power)
    loss, grads = fun({"object": obj, "probe": psi})
    fun.want_object = False
    loss_p, grads_p = fun({"object": obj, "probe": psi})
    assert set(grads_p) == {"probe"}
    assert loss_p == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(grads_p["probe"], grads["probe"], rtol=1e-12, atol=1e-14 * np.abs(grads["probe"]).max())


def test_searches_run_with_modes() -> None:
    """``aberration_search`` and ``scan_search`` (offline, on short reconstructions) with the
    modes of a known source size: the defocus error and the scan matrix are found."""
    nominal, _, frames, probe, _ = _realistic_small()
    data = PtychoData(frames=frames, positions=nominal, energy=ENERGY, pixel_size=PIXEL, probe=probe)
    state = reconstruct(data, {"iterations": 20, "mu0": 1e-3, "source_size_m": SOURCE_PX * PIXEL,
                               "aberration_search": True, "aberrations": ["C10"], "aberration_search_iterations": 10,
                               "scan_search": True, "scan_search_iterations": 8})
    assert state.probe.shape == (3, M, M)
    # the probe: the nominal one's modes under the defocus found, against the true modes
    want = source_modes(aberrate(probe.astype(np.complex128), PIXEL, ENERGY, {"C10": DEFOCUS_ERROR}),
                        PIXEL, SOURCE_PX * PIXEL, 3)
    got = np.asarray(state.probe).reshape(3, -1).astype(np.complex128)
    rho = got.T @ got.conj()
    rho_want = want.reshape(3, -1).T @ want.reshape(3, -1).conj()
    rho_want *= np.trace(rho).real / np.trace(rho_want).real
    nominal_modes = source_modes(probe.astype(np.complex128), PIXEL, SOURCE_PX * PIXEL, 3).reshape(3, -1)
    rho_nominal = nominal_modes.T @ nominal_modes.conj()
    rho_nominal *= np.trace(rho).real / np.trace(rho_nominal).real
    assert np.abs(rho - rho_want).max() < 0.2 * np.abs(rho_nominal - rho_want).max(), (
        np.abs(rho - rho_want).max(), np.abs(rho_nominal - rho_want).max())
    # the scan: the positions used are the nominal ones through the matrix found
    matrix = np.linalg.lstsq(np.c_[nominal - nominal.mean(0), np.ones(len(nominal))],
                             np.asarray(state.positions) - nominal.mean(0), rcond=None)[0][:2].T
    truth = scan_errors().affine()
    assert np.linalg.norm(matrix - truth) < 0.6 * np.linalg.norm(np.eye(2) - truth), (matrix, truth)
