"""Mixed-state (incoherent) probe modes: the model intensity Σ_m |F[S_δ ψ_m · R_k T]|², its
Wirtinger gradients against finite differences (object and each mode), the orthogonalisation
and initialisation of modes, and reconstructions of partially coherent data."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.gpu import operators
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.objective import data_term
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.probes import EXTRA_MODE_POWER, initial_modes, mode_powers, orthogonalize_modes
from cryoptycho.gpu.reconstruct import FullBatchObjective


def _rand_c(xp, rng, shape, scale=1.0):
    return xp.asarray(scale * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)))


def _fd(xp, f, grad, x, d, h=1e-6, rtol=1e-5):
    fd = (f(x + h * d) - f(x - h * d)) / (4 * h)
    an = float(xp.vdot(grad.ravel(), d.ravel()).real)
    assert abs(fd - an) <= rtol * max(abs(an), 1e-8), (fd, an)


def _problem(xp, modes: int, seed: int = 3):
    rng = np.random.default_rng(seed)
    m, shape = 12, (30, 30)
    batch = operators.make_batch(xp.asarray(rng.uniform(0, 16, (6, 2))), shape, (m, m))
    obj = xp.exp(1j * _rand_c(xp, rng, shape, 0.2).real) * (1 + 0.05 * _rand_c(xp, rng, shape).real)
    probe = _rand_c(xp, rng, (modes, m, m), 1.5)
    inten = to_numpy(operators.mode_intensity(obj, probe, batch))
    counts = xp.asarray(rng.poisson(inten * 0.7 + 0.05).astype(np.float64))
    mask = xp.ones((m, m))
    mask[0, 3] = 0.0
    return rng, batch, obj, probe, counts, mask


def _independent_intensity(obj, probe, batch):
    """Σ_m |z_m|² from the single-probe forward operator, one mode at a time."""
    return sum(abs(operators.forward(obj, probe[m], batch)) ** 2 for m in range(probe.shape[0]))


@pytest.mark.parametrize("modes", [2, 3])
@pytest.mark.parametrize("model", ["poisson", "amplitude"])
@pytest.mark.parametrize("truncation", ["none", "poisson-floor"])
def test_mixed_data_term_gradients_match_finite_differences(xp, modes, model, truncation):
    rng, batch, obj, probe, counts, mask = _problem(xp, modes)
    kw = {"model": model, "mask": mask, "truncation": truncation, "alpha_h": 50.0}
    dt = data_term(obj, probe, counts, batch, **kw)
    assert dt.grad_probe.shape == probe.shape
    d_obj = _rand_c(xp, rng, obj.shape)
    _fd(xp, lambda t: data_term(t, probe, counts, batch, want_probe=False, **kw).loss,
        dt.grad_object, obj, d_obj)
    for m in range(modes):  # each mode on its own
        d = xp.zeros_like(probe)
        d[m] = _rand_c(xp, rng, probe.shape[1:])
        _fd(xp, lambda p: data_term(obj, p, counts, batch, want_probe=False, **kw).loss,
            dt.grad_probe, probe, d)


def test_mode_intensity_is_the_sum_of_single_mode_intensities(xp):
    _, batch, obj, probe, _, _ = _problem(xp, 3)
    got = to_numpy(operators.mode_intensity(obj, probe, batch))
    want = to_numpy(_independent_intensity(obj, probe, batch))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # one mode is the coherent model
    one = to_numpy(operators.mode_intensity(obj, probe[0], batch))
    np.testing.assert_allclose(one, to_numpy(abs(operators.forward(obj, probe[0], batch)) ** 2), rtol=1e-12)


def test_one_mode_stack_equals_the_coherent_probe(xp):
    """A (1, M, M) probe is the (M, M) probe: same loss, same gradients (to rounding)."""
    _, batch, obj, probe, counts, mask = _problem(xp, 1)
    single = data_term(obj, probe[0], counts, batch, mask=mask)
    stack = data_term(obj, probe, counts, batch, mask=mask)
    assert float(stack.loss) == pytest.approx(float(single.loss), rel=1e-12)
    np.testing.assert_allclose(to_numpy(stack.grad_object), to_numpy(single.grad_object), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_numpy(stack.grad_probe[0]), to_numpy(single.grad_probe), rtol=1e-9, atol=1e-12)


def test_full_batch_objective_gradient_with_modes_keeps_total_power(xp):
    """The power constraint is on the sum of the modes: the probe gradient of the normalised
    objective is finite-difference exact and has no radial part."""
    rng, batch, obj, probe, counts, mask = _problem(xp, 3)
    opts = ReconOptions(precision="double", chunk_size=4, prior="tikhonov", mu0=0.01,
                        truncation="chen-candes", alpha_h=30.0)
    fun = FullBatchObjective(counts, batch, mask, opts, kappa=2.0, probe_power=40.0)
    _loss, grads = fun({"object": obj, "probe": probe})
    assert grads["probe"].shape == probe.shape
    d = _rand_c(xp, rng, probe.shape)
    _fd(xp, lambda p: fun({"object": obj, "probe": p})[0], grads["probe"], probe, d)
    _fd(xp, lambda t: fun({"object": t, "probe": probe})[0], grads["object"], obj, _rand_c(xp, rng, obj.shape))
    radial = float(xp.vdot(probe.ravel(), grads["probe"].ravel()).real)
    assert abs(radial) < 1e-8 * float(xp.linalg.norm(grads["probe"])) * float(xp.linalg.norm(probe))


def test_orthogonalised_modes_leave_the_intensity_unchanged(xp):
    _, batch, obj, probe, _, _ = _problem(xp, 3)
    ortho = orthogonalize_modes(probe)
    flat = to_numpy(ortho).reshape(3, -1)
    gram = flat @ flat.conj().T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-9 * abs(gram).max())
    powers = mode_powers(ortho)
    assert list(powers) == sorted(powers, reverse=True)
    np.testing.assert_allclose(to_numpy(operators.mode_intensity(obj, ortho, batch)),
                               to_numpy(operators.mode_intensity(obj, probe, batch)), rtol=1e-9)


def test_initial_modes_keep_power_and_the_main_mode(xp):
    from cryoptycho.gpu.probes import make_probe

    probe = xp.asarray(make_probe("defocused", (32, 32), 1e-10, 300e3, 8e-3, 60e-9,
                                  total_intensity=500.0, precision="double"))
    modes = initial_modes(probe, 4)
    assert modes.shape == (4, 32, 32)
    powers = mode_powers(modes)
    main_share = 1.0 - EXTRA_MODE_POWER
    assert powers.sum() == pytest.approx(500.0, rel=1e-9)
    assert powers[0] == pytest.approx(main_share * 500.0, rel=1e-9)
    # first derivatives (y, x) alike; the second order has half their power over three terms
    assert powers[1] == pytest.approx(powers[2], rel=1e-6)
    assert powers[3] == pytest.approx(powers[1] / 3, rel=1e-6)
    flat = to_numpy(modes).reshape(4, -1)
    gram = flat @ flat.conj().T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-8 * abs(gram).max())
    # the main mode is the given probe, scaled
    main = to_numpy(modes[0]) / np.sqrt(main_share)
    np.testing.assert_allclose(main, to_numpy(probe), rtol=1e-9, atol=1e-12)
    assert initial_modes(probe, 1) is probe
    with pytest.raises(ValueError, match="at least 1"):
        initial_modes(probe, 0)


# --- reconstructions of partially coherent data ------------------------------------------------

M = 32
SOURCE_PX = 1.5  # rms source size in object pixels: three modes hold 39 %, 31 % and 31 %


def _partially_coherent(counts: float = 1e5, seed: int = 0):
    """A weak-phase scan (8×8 positions, 3 px steps, 32×32 frames) recorded with the three
    strongest modes of a defocused probe seen through a Gaussian source; the dataset gives the
    nominal (coherent) probe. Simulated with the single-probe forward operator, mode by mode."""
    from cryoptycho.gpu.data import PtychoData
    from cryoptycho.gpu.geometry import fit_geometry
    from cryoptycho.gpu.probes import make_probe, source_modes
    from engine_helpers import ENERGY, PIXEL, weak_phase_object

    rng = np.random.default_rng(seed)
    probe = make_probe("defocused", (M, M), PIXEL, ENERGY, 8e-3, 60e-9, precision="double",
                       total_intensity=counts)
    true = source_modes(probe, PIXEL, SOURCE_PX * PIXEL, 3)
    iy, ix = np.mgrid[0:8, 0:8]
    pos = np.stack([iy.ravel(), ix.ravel()], 1) * 3.0 * PIXEL + rng.uniform(-0.3, 0.3, (64, 2)) * PIXEL
    geo = fit_geometry(pos, PIXEL, (M, M))
    truth = weak_phase_object(geo.object_shape, seed, peak=1.0)
    batch = operators.make_batch(geo.to_pixels(pos), geo.object_shape, (M, M))
    inten = _independent_intensity(truth, true, batch)
    frames = rng.poisson(inten).astype(np.uint16)
    data = PtychoData(frames=operators.from_fft_order(frames), positions=pos, energy=ENERGY,
                      pixel_size=PIXEL, probe=probe.astype(np.complex64))
    return data, true, truth


def _scores(state, truth):
    from engine_helpers import nrmse, phase_corr, scored_region

    region = scored_region(truth, M // 2)
    rec = to_numpy(state.object)
    return phase_corr(rec, truth, region), nrmse(rec, truth, region)


def test_source_modes_of_a_point_source_are_the_probe():
    from cryoptycho.gpu.probes import make_probe, source_modes

    probe = make_probe("defocused", (M, M), 1e-10, 300e3, 8e-3, 60e-9, precision="double")
    modes = source_modes(probe, 1e-10, 0.0, 2)
    np.testing.assert_array_equal(modes[0], probe)
    assert not modes[1].any()
    wide = source_modes(probe, 1e-10, 1.5e-10, 3)
    powers = mode_powers(wide)
    assert powers.sum() == pytest.approx(1.0, rel=1e-9)
    assert powers[1] == pytest.approx(powers[2], rel=1e-3)  # a round source: y and x alike
    assert powers[1] > 0.2


def test_known_modes_reconstruct_partially_coherent_data_better_than_one_probe():
    """With the probe fixed, the three true modes (a (3, M, M) dataset probe) explain the data
    that the coherent probe cannot: higher phase correlation and lower NRMSE."""
    import dataclasses

    from cryoptycho.gpu.reconstruct import reconstruct

    data, true, truth = _partially_coherent()
    opts = {"iterations": 40, "refine_probe": False, "init": "ones"}
    coherent = reconstruct(data, opts)
    mixed = reconstruct(dataclasses.replace(data, probe=true.astype(np.complex64)), opts)
    assert mixed.probe.shape == (3, M, M)
    c1, e1 = _scores(coherent, truth)
    c3, e3 = _scores(mixed, truth)
    assert c3 > c1 + 0.2 and e3 < e1, ((c1, e1), (c3, e3))


def test_a_known_source_size_makes_the_modes_of_a_fixed_probe(xp):
    """``source_size_m``: the nominal coherent probe and the source's rms size give the modes,
    offline and live; with the probe fixed they score as the true modes do, far above the
    coherent probe."""
    from cryoptycho.gpu.reconstruct import reconstruct
    from cryoptycho.gpu.stream import StreamingReconstructor
    from engine_helpers import PIXEL

    data, _, truth = _partially_coherent()
    backend = "strict" if "strict" in xp.__name__ else ("cupy" if "cupy" in xp.__name__ else "numpy")
    opts = {"iterations": 40, "refine_probe": False, "init": "ones", "backend": backend}
    coherent = reconstruct(data, opts)
    sourced = reconstruct(data, dict(opts, source_size_m=SOURCE_PX * PIXEL))
    assert sourced.probe.shape == (3, M, M)
    c1, e1 = _scores(coherent, truth)
    c3, e3 = _scores(sourced, truth)
    assert c3 > c1 + 0.2 and e3 < e1, ((c1, e1), (c3, e3))
    live = StreamingReconstructor(frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=PIXEL,
                                  probe=data.probe, options=ReconOptions(**opts, source_size_m=SOURCE_PX * PIXEL))
    assert live.probe.shape == (3, M, M)


def test_refined_modes_fit_partially_coherent_data_better_than_one_refined_probe():
    """From the nominal coherent probe, ``probe_modes=3`` refines three orthogonal modes whose
    total power is the measured one; on this scan they fit the data better and score higher
    than one refined probe."""
    from cryoptycho.gpu.reconstruct import reconstruct

    data, _, truth = _partially_coherent()
    opts = {"iterations": 60, "refine_probe": True, "init": "ones", "probe_start_iteration": 5}
    one = reconstruct(data, opts)
    three = reconstruct(data, dict(opts, probe_modes=3))
    assert three.probe.shape == (3, M, M) and one.probe.shape == (M, M)
    assert three.options["probe_modes"] == 3
    flat = np.asarray(three.probe).reshape(3, -1).astype(np.complex128)
    gram = flat @ flat.conj().T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-5 * abs(gram).max())
    assert mode_powers(three.probe).sum() == pytest.approx(mode_powers(one.probe).sum(), rel=1e-3)
    assert three.loss_values[-1] < one.loss_values[-1]
    c1, e1 = _scores(one, truth)
    c3, e3 = _scores(three, truth)
    assert c3 > c1 and e3 < e1, ((c1, e1), (c3, e3))


def test_mixed_state_probe_is_taken_with_position_refinement():
    """(Refused until modes and refinement were combined: tests/test_engine_modes_refinement.py.)"""
    from cryoptycho.gpu.reconstruct import reconstruct

    data, _, _ = _partially_coherent()
    state = reconstruct(data, {"iterations": 2, "probe_modes": 2, "refine_probe": True, "refine_positions": True,
                               "position_start_iteration": 1, "position_every": 1})
    assert state.probe.shape == (2, M, M) and state.nominal_positions is not None


def test_streaming_engine_refines_modes(xp):
    """The streaming engine takes a coherent probe and ``probe_modes=3`` (or a (3, M, M)
    probe), steps and refines all modes, and hands out orthogonal modes of the measured power."""
    from cryoptycho.gpu.stream import StreamingReconstructor

    data, true, _ = _partially_coherent()
    backend = "strict" if "strict" in xp.__name__ else ("cupy" if "cupy" in xp.__name__ else "numpy")
    opts = ReconOptions(backend=backend, probe_modes=3, refine_probe=True, init="ones",
                        stream={"probe_warmup_steps": 4})
    engine = StreamingReconstructor(frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=data.pixel_size,
                                    probe=data.probe, options=opts)
    assert engine.probe.shape == (3, M, M)
    before = mode_powers(engine.probe)
    frames, pos = np.asarray(data.frames), np.asarray(data.positions)
    for lo in range(0, len(pos), 16):
        engine.add_frames(frames[lo:lo + 16], pos[lo:lo + 16])
        for _ in range(3):
            engine.step()
    after = mode_powers(engine.probe)
    assert not np.allclose(after / after.sum(), before / before.sum())  # the modes were refined
    losses = engine.refine(10)
    assert len(losses) == 10 and losses[-1] < losses[0]
    state = engine.snapshot()
    assert state.probe.shape == (3, M, M)
    flat = state.probe.reshape(3, -1).astype(np.complex128)
    gram = flat @ flat.conj().T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-5 * abs(gram).max())
    assert mode_powers(state.probe).sum() == pytest.approx(engine.probe_power(), rel=1e-3)
    # a (modes, M, M) probe is taken as it is
    given = StreamingReconstructor(frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=data.pixel_size,
                                   probe=true.astype(np.complex64), options=opts.model_copy(update={"probe_modes": 3}))
    np.testing.assert_allclose(to_numpy(given.probe), true, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="probe shape"):
        StreamingReconstructor(frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=data.pixel_size,
                               probe=np.ones((3, M, M + 1), np.complex64), options=opts)


# --- the simulator's finite source ----------------------------------------------------------


def test_simulated_finite_source_tends_to_the_coherent_scan():
    """A finite source records incoherent modes whose summed patterns hold the same counts;
    as the source shrinks to a point the frames become the coherent ones."""
    from cryoptycho.gpu.sim.errors import ExperimentErrors
    from cryoptycho.gpu.sim.ptycho import simulate_ptychography

    kw = {"sample": "hemoglobin", "dose": 20.0, "frame_size": 32, "detector": "ideal",
          "multislice": False, "seed": 1, "noise": False}
    coherent = simulate_ptychography(**kw)
    point = simulate_ptychography(errors=ExperimentErrors(source_size=0.005e-10), **kw)
    wide = simulate_ptychography(errors=ExperimentErrors(source_size=1.0e-10, source_modes=3), **kw)
    assert wide.truth_probe.shape == (3, 32, 32) and coherent.truth_probe.shape == (32, 32)
    np.testing.assert_allclose(point.frames, coherent.frames, rtol=2e-3, atol=1e-3 * coherent.frames.max())
    total = coherent.frames.sum(axis=(1, 2))
    np.testing.assert_allclose(wide.frames.sum(axis=(1, 2)), total, rtol=1e-3)
    assert np.abs(wide.frames - coherent.frames).max() > 0.05 * coherent.frames.max()
    powers = mode_powers(wide.truth_probe)
    assert powers.sum() == pytest.approx(float((abs(coherent.truth_probe) ** 2).sum()), rel=1e-4)
    assert powers[1] > 0.05 * powers.sum()


def test_simulate_cli_writes_probe_modes_under_truth_and_reconstruct_uses_a_source(tmp_path):
    import os
    import subprocess
    import sys

    from cryoptycho.daemon.storage.dataset import read_dataset

    out = tmp_path / "coherence.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "cryoptycho.daemon.cli", "simulate", "--sample", "hemoglobin",
         "--dose", "20", "--frame-size", "32", "--detector", "ideal", "--thin",
         "--source-size", "1.0", "--probe-modes", "2", "-o", str(out)],
        capture_output=True, text=True, env=os.environ.copy(), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "2 incoherent probe modes" in " ".join(proc.stderr.split())  # (rich wraps lines)
    data = read_dataset(out)
    assert data.truth_probe.shape == (2, 32, 32)
    assert data.probe_model is not None and data.probe is None  # the user gets the nominal model
    assert data.metadata["errors"]["source_size"] == pytest.approx(1e-10)
    # the probe model states the size, as an operator would know it (--stated-source-size)
    assert data.probe_model.source_size == pytest.approx(1e-10)
    # and the reconstruction with the known source writes its two modes to the result file
    from cryoptycho.daemon.storage.result import read_result

    res = tmp_path / "coherence.result.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "cryoptycho.daemon.cli", "reconstruct", str(out), "-o", str(res),
         "-n", "3", "--set", "source_size_m=1e-10", "--set", "probe_modes=2"],
        capture_output=True, text=True, env=os.environ.copy(), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    state = read_result(res).state
    assert state.geometry.probe_shape == (32, 32)
    probe = state.probe
    assert probe.shape == (2, 32, 32)
    powers = mode_powers(probe)
    assert powers[0] > powers[1] > 0.05 * powers.sum()


def test_mode_steps_do_not_synchronise_on_a_device():
    """On the strict (CuPy-semantics) backend, mini-batch steps with three refined modes make
    no device synchronisation and no frame copy, as with one probe."""
    from cryoptycho.gpu import strict
    from cryoptycho.gpu.stream import StreamingReconstructor

    data, _, _ = _partially_coherent()
    engine = StreamingReconstructor(
        frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=data.pixel_size, probe=data.probe,
        options=ReconOptions(backend="strict", probe_modes=3, refine_probe=True,
                             stream={"probe_warmup_steps": 0, "batch_size": 16}),
        expected_frames=len(data.positions))
    engine.add_frames(np.asarray(data.frames), np.asarray(data.positions))
    with strict.counting() as c:
        results = [engine.step() for _ in range(8)]
    assert c.syncs == 0, c.summary()
    assert all(r.probe_updated for r in results)
    assert all(np.isfinite(engine.flush_losses()))


def test_a_one_mode_probe_reconstructs_exactly_as_the_coherent_probe():
    """A (1, M, M) dataset probe runs the coherent engine: bit-identical object and probe."""
    import dataclasses

    from cryoptycho.gpu.reconstruct import reconstruct

    data, _, _ = _partially_coherent()
    opts = {"iterations": 8, "refine_probe": True, "probe_start_iteration": 2, "init": "ones"}
    coherent = reconstruct(data, opts)
    stacked = reconstruct(dataclasses.replace(data, probe=data.probe[None]), opts)
    assert stacked.probe.shape == (M, M)
    np.testing.assert_array_equal(stacked.object, coherent.object)
    np.testing.assert_array_equal(stacked.probe, coherent.probe)
    assert stacked.loss_values == coherent.loss_values


@pytest.mark.parametrize("keys", [{"object"}, {"object", "probe"}])
def test_line_model_with_modes_matches_direct_evaluations(xp, keys):
    """CG's line model (line_model.py) carries the mode axis: values, slopes, points and
    gradients as direct evaluations of the objective give them."""
    from cryoptycho.gpu import line_model
    from cryoptycho.gpu.cg import _Direct

    rng, batch, obj, probe, counts, mask = _problem(xp, 3)
    opts = ReconOptions(precision="double", chunk_size=4, alpha_h=5.0, prior="tikhonov")
    fun = FullBatchObjective(counts, batch, mask, opts, kappa=0.5, probe_power=40.0)
    fun.want_probe = "probe" in keys
    x = {"object": obj, "probe": probe}
    d = {"object": _rand_c(xp, rng, obj.shape, 0.02), "probe": _rand_c(xp, rng, probe.shape, 0.05)}
    model = line_model.full_batch_line(fun, x, d, keys)
    assert isinstance(model, line_model.FullBatchLine)
    direct = _Direct(fun, x, d, keys)
    for t in (0.0, 0.4, 1.0, 3.0):
        f_m, s_m = model.value(t)
        f_d, s_d = direct.value(t)
        assert f_m == pytest.approx(f_d, rel=1e-12)
        assert s_m == pytest.approx(s_d, rel=1e-8, abs=1e-10 * abs(s_d) + 1e-12)
        _, f_pm, g_m = model.point(t)
        _, _, g_d = direct.point(t)
        assert float(f_pm) == pytest.approx(f_d, rel=1e-12)
        for key in g_d:
            np.testing.assert_allclose(to_numpy(g_m[key]), to_numpy(g_d[key]), rtol=1e-9,
                                       atol=1e-9 * float(abs(to_numpy(g_d[key])).max()))
    x_next, _, _ = model.point(1.0)
    carried = line_model.full_batch_line(fun, x_next, d, keys)
    assert carried.reuses == 1
    fun._line_carry = None
    fresh = line_model.full_batch_line(fun, x_next, d, keys)
    assert carried.value(0.7)[0] == pytest.approx(fresh.value(0.7)[0], rel=1e-12)
