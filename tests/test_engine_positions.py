"""Position correction (gpu/positions.py): the position gradient and Fisher information against
finite differences of the data term, recovery of a known affine scan error and jitter, and
the offline reconstruction from nominal positions against the one without refinement."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryoptycho.gpu import operators
from cryoptycho.gpu.data import PtychoData
from cryoptycho.gpu.geometry import fit_geometry
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.positions import (
    ScanModel,
    data_loss,
    position_terms,
    residual_rms_from_scatter,
    update_positions,
)
from cryoptycho.gpu.reconstruct import reconstruct
from cryoptycho.gpu.sim.evaluation import resample
from engine_helpers import (
    ENERGY,
    PIXEL,
    check_position_gradient,
    distorted_scan,
    fractional_inside,
    nrmse,
    scan_errors,
    synthetic_dataset,
)

M = 32
#: a randomized (speckle) probe: sharp features make positions well determined
ERRORS = scan_errors()


def _distorted_scan(counts: float, grid: int = 8, step_px: float = 3.0, seed: int = 0):
    """(nominal m, true m, frames in FFT order, truth object, truth geometry, probe)."""
    return distorted_scan(counts, grid, step_px, seed, m=M)


@pytest.mark.parametrize("model", ["poisson", "amplitude"])
def test_position_gradient_matches_finite_differences(model: str) -> None:
    d = synthetic_dataset(1e4, m=M, grid=4, seed=3)
    geo = fit_geometry(d.positions, PIXEL, (M, M))
    px = geo.to_pixels(d.positions)
    y = operators.to_fft_order(d.frames)
    obj = d.truth_object.astype(np.complex128) * np.exp(0.05j)  # not the exact optimum
    probe = d.truth_probe.astype(np.complex128)

    def loss_at(q: np.ndarray) -> float:
        b = operators.make_batch(q, geo.object_shape, (M, M), quantum=1e-7)
        return data_loss(obj, probe, y, b, model=model, scale=2.0)

    b = operators.make_batch(px, geo.object_shape, (M, M), quantum=1e-7)
    loss, grad, _ = position_terms(obj, probe, y, b, model=model, scale=2.0)
    assert loss == pytest.approx(loss_at(px), rel=1e-10)
    assert check_position_gradient(grad, px, loss_at) >= 4


def test_position_fisher_is_the_hessian_on_noiseless_data() -> None:
    """At the truth with noiseless intensities the Poisson data term's Hessian with respect to
    a position equals the Fisher information (the Gauss–Newton term is exact there)."""
    d = synthetic_dataset(1e4, m=M, grid=4, seed=4, noiseless=True)
    geo = fit_geometry(d.positions, PIXEL, (M, M))
    px = geo.to_pixels(d.positions)
    y = operators.to_fft_order(d.frames).astype(np.float64)
    obj = d.truth_object.astype(np.complex128)
    probe = d.truth_probe.astype(np.complex128)
    b = operators.make_batch(px, geo.object_shape, (M, M), quantum=1e-7)
    _, _, fisher = position_terms(obj, probe, y, b)
    k = next(i for i in range(len(px)) if fractional_inside(px, i))
    eps = 2e-3
    for a, c in ((0, 0), (1, 1), (0, 1)):
        def at(da: float, dc: float, a: int = a, c: int = c) -> float:
            q = px.copy()
            q[k, a] += da
            q[k, c] += dc
            return data_loss(obj, probe, y, operators.make_batch(q, geo.object_shape, (M, M), quantum=1e-7))
        hess = (at(eps, eps) - at(eps, -eps) - at(-eps, eps) + at(-eps, -eps)) / (4 * eps * eps)
        assert fisher[k, a, c] == pytest.approx(hess, rel=2e-2)


def test_updates_recover_affine_scan_error_and_jitter_with_the_true_object() -> None:
    nominal, true, frames, truth, geo, probe = _distorted_scan(1e5)
    scan = ScanModel(geo.to_pixels(nominal))
    target = geo.to_pixels(true)
    before = np.linalg.norm(scan.positions - target, axis=1).mean()
    opts = ReconOptions(position_residual_px=0.5)
    for _ in range(6):
        upd = update_positions(truth, probe, frames, scan, geo.object_shape, None, opts)
    assert upd.loss_after <= upd.loss_before
    after = np.linalg.norm(scan.positions - target, axis=1).mean()
    # the jitter is 0.3 px rms per axis: the affine model alone cannot go below ≈ 0.37 px
    assert before > 0.5 and after < 0.25, (before, after)
    np.testing.assert_allclose(scan.matrix, ERRORS.affine(), atol=0.015)


def test_residual_rms_from_scatter_is_the_scatter_beyond_the_counting_noise() -> None:
    rng = np.random.default_rng(5)
    k = 4000
    # per-position Fisher information of various strength and shape (noise rms 0.5–1.5 px)
    a = rng.normal(size=(k, 2, 2))
    info = np.einsum("kab,kcb->kac", a, a) + np.eye(2)[None] * rng.uniform(0.5, 4.0, size=(k, 1, 1))
    cov = np.linalg.inv(info)
    noise = np.einsum("kab,kb->ka", np.linalg.cholesky(cov), rng.normal(size=(k, 2)))
    residuals = rng.normal(0.0, 0.4, size=(k, 2))
    assert residual_rms_from_scatter(residuals + noise, info) == pytest.approx(0.4, rel=0.15)
    # noise alone: nothing (or next to nothing) is left for the residuals
    assert residual_rms_from_scatter(noise, info) < 0.1


def test_estimated_residual_prior_still_recovers_the_jitter_the_data_resolve() -> None:
    nominal, true, frames, truth, geo, probe = _distorted_scan(1e5)
    scan = ScanModel(geo.to_pixels(nominal))
    target = geo.to_pixels(true)
    opts = ReconOptions(position_residual_px=2.0, position_residual_auto=True)
    for _ in range(6):
        update_positions(truth, probe, frames, scan, geo.object_shape, None, opts)
    after = np.linalg.norm(scan.positions - target, axis=1).mean()
    # 0.3 px rms jitter per axis, well resolved at 10⁵ counts: the estimate finds it (not the
    # 2 px cap) and the positions end as close as with the hand-set 0.5 px prior
    assert 0.15 < scan.residual_estimate_px < 0.6, scan.residual_estimate_px
    assert after < 0.25, after


def _affine_residual_px(positions: np.ndarray, given: np.ndarray) -> float:
    """rms (pixels) of ``positions`` about their least-squares affine map of ``given``."""
    design = np.hstack([given, np.ones((len(given), 1))])
    coef, *_ = np.linalg.lstsq(design, positions, rcond=None)
    return float(np.sqrt(np.mean((positions - design @ coef) ** 2))) / PIXEL


@pytest.mark.parametrize("seed", [0, 1])
def test_refined_positions_do_not_fit_the_counting_noise_by_default(seed: int) -> None:
    """Turning on ``refine_positions`` alone estimates the residual prior from the data: on a
    scan whose positions are exact, at a dose where one position's data do not resolve a
    sub-pixel move, the positions stay an affine map of the given ones (the estimate is 0), near
    the truth. The fixed 0.5 px prior (``position_residual_auto=false``, still honoured) moves
    each position by the noise (≈ 0.26 px rms; the estimate's moves stay ≤ 0.14 px, a gauge)."""
    assert ReconOptions().position_residual_auto
    data = synthetic_dataset(300.0, m=M, grid=8, seed=seed)
    exact = np.asarray(data.positions)

    def refined(extra: dict) -> np.ndarray:
        return np.asarray(reconstruct(data, {"iterations": 30, "mu0": 1e-3, "refine_positions": True,
                                             **extra}).positions)

    default, fixed = refined({}), refined({"position_residual_auto": False})
    # affine to roundoff: ≈ 1e-6 px here (2.9e-7 / 7e-7 px on seeds 0 / 1 with OpenBLAS's SkylakeX
    # kernels, 3.8e-7 / 1.4e-6 with its Haswell or Zen ones, 1.6e-6 / 1.4e-6 with Sandybridge's:
    # a bound of 1e-6 failed on an AVX2 machine); the fixed prior's noise fit is 0.26-0.28 px
    assert _affine_residual_px(default, exact) < 1e-4
    assert _affine_residual_px(fixed, exact) > 0.15
    moved = default - exact
    moved -= moved.mean(axis=0)  # a common translation is a gauge
    assert np.sqrt(np.mean(moved**2)) / PIXEL < 0.2


def test_reconstruction_from_nominal_positions_improves_with_refinement() -> None:
    nominal, true, frames, truth, geo, probe = _distorted_scan(1e5)
    margin = M // 2 + 3
    shape = (geo.object_shape[0] - 2 * margin, geo.object_shape[1] - 2 * margin)
    origin = (geo.origin[0] + margin * PIXEL, geo.origin[1] + margin * PIXEL)
    region = (slice(None), slice(None))
    target = truth[margin:margin + shape[0], margin:margin + shape[1]]

    def run(positions: np.ndarray, refine: bool) -> tuple[float, np.ndarray]:
        data = PtychoData(frames=operators.from_fft_order(frames), positions=positions, energy=ENERGY,
                          pixel_size=PIXEL, probe=probe.astype(np.complex64))
        state = reconstruct(data, {"iterations": 60, "mu0": 1e-3, "refine_positions": refine})
        rec = resample(state.object, state.geometry.origin, PIXEL, origin, shape)
        return nrmse(rec, target, region), np.asarray(state.positions)

    fixed, _ = run(nominal, False)
    refined, positions = run(nominal, True)
    oracle, _ = run(true, False)
    pos_error = np.linalg.norm(positions - true, axis=1).mean() / PIXEL
    assert pos_error < 0.35, pos_error  # nominal: 0.60 px
    assert refined < fixed - 0.4 * (fixed - oracle), (oracle, fixed, refined)


def test_live_engine_refines_positions_at_scan_end() -> None:
    """The streaming engine's ``refine`` (scan end in the service) with refine_positions: the
    stored positions move towards the true ones and the snapshot keeps the received ones."""
    from cryoptycho.gpu.stream import StreamingReconstructor

    nominal, true, frames, _truth, _geo, probe = _distorted_scan(1e5)
    opts = ReconOptions(mu0=1e-3, refine_positions=True, position_start_iteration=5)
    engine = StreamingReconstructor(frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=PIXEL,
                                    probe=probe.astype(np.complex64), options=opts, energy_eV=ENERGY)
    engine.add_frames(operators.from_fft_order(frames), nominal)
    for _ in range(20):
        engine.step()
    engine.refine(40)
    state = engine.snapshot()
    np.testing.assert_allclose(state.nominal_positions, nominal, rtol=0, atol=1e-16)
    before = np.linalg.norm(nominal - true, axis=1).mean() / PIXEL
    after = np.linalg.norm(state.positions - true, axis=1).mean() / PIXEL
    assert before > 0.5 and after < 0.4, (before, after)


def test_position_updates_that_find_nothing_leave_cg_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refinement that finds nothing costs nothing: when every position update is rejected the
    alternating refinement's result is the plain CG run's (CG's direction and step are not reset
    at the update points; they were, which cost up to 0.010 phase correlation on realistic scans)."""
    import copy

    from cryoptycho.gpu import reconstruct as rec

    nominal, _true, frames, _truth, _geo, probe = _distorted_scan(1e5)
    data = PtychoData(frames=operators.from_fft_order(frames), positions=nominal, energy=ENERGY,
                      pixel_size=PIXEL, probe=probe.astype(np.complex64))
    opts = ReconOptions(iterations=24, mu0=1e-3, refine_positions=True, position_start_iteration=4,
                        position_every=4, precision="double")
    problem = rec.prepare(data, opts)
    real = rec.update_positions
    computed = []

    def finds_nothing(obj, psi, counts, scan, *args, **kwargs):  # type: ignore[no-untyped-def]
        # the real update, on a copy of the scan model, reported as rejected
        upd = real(obj, psi, counts, copy.deepcopy(scan), *args, **kwargs)
        computed.append(upd.loss_before)
        return dataclasses.replace(upd, accepted=False, loss_after=upd.loss_before, max_shift_px=0.0)

    monkeypatch.setattr(rec, "update_positions", finds_nothing)
    obj, _, losses, positions = rec.refine_alternating(problem, opts, None)
    plain, _, plain_losses = rec.refine_full_batch(
        problem.object, problem.probe, problem.counts_fft, problem.batch, problem.mask, opts,
        opts.iterations, kappa=problem.kappa, probe_power=problem.probe_power)
    assert len(computed) == 5  # at iterations 4, 8, 12, 16, 20 (none in the last 4)
    np.testing.assert_allclose(positions, problem.positions, rtol=0, atol=1e-6 * PIXEL)
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-12)
    np.testing.assert_allclose(obj, plain, rtol=0, atol=1e-12)


def test_refinement_canvas_starts_from_the_plain_runs_random_start() -> None:
    """Position refinement reconstructs on a larger canvas (room for moved positions); its
    random start holds the plain run's start on the plain canvas, so a refinement that moves
    nothing does not start from other random phases."""
    from cryoptycho.gpu import reconstruct as rec

    nominal, _true, frames, _truth, _geo, probe = _distorted_scan(1e4, grid=4)
    data = PtychoData(frames=operators.from_fft_order(frames), positions=nominal, energy=ENERGY,
                      pixel_size=PIXEL, probe=probe.astype(np.complex64))
    plain = rec.prepare(data, ReconOptions(init="random"))
    wide = rec.prepare(data, ReconOptions(init="random", refine_positions=True))
    extra = (np.asarray(wide.geometry.object_shape) - plain.geometry.object_shape) // 2
    assert extra[0] > 0 and extra[0] == extra[1]
    # the same object pixels: the wide canvas's origin lies `extra` pixels further out
    np.testing.assert_allclose(np.asarray(plain.geometry.origin) - wide.geometry.origin,
                               extra * PIXEL, rtol=1e-9)
    e = int(extra[0])
    np.testing.assert_array_equal(wide.object[e:-e, e:-e], plain.object)


def test_a_position_update_keeps_the_low_frequency_preconditioner(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lowfreq_boost` preconditions the object for the whole refinement: an accepted position
    update rebuilds the object's preconditioner for the moved scan, boost included (it fell
    back to the plain diagonal one for the rest of the run)."""
    from cryoptycho.gpu import reconstruct as rec

    nominal, _true, frames, _truth, _geo, probe = _distorted_scan(1e5)
    data = PtychoData(frames=operators.from_fft_order(frames), positions=nominal, energy=ENERGY,
                      pixel_size=PIXEL, probe=probe.astype(np.complex64))
    opts = ReconOptions(iterations=4, mu0=1e-3, lowfreq_boost=10.0, precision="double")
    problem = rec.prepare(data, opts)
    built = []
    real = rec.LowFrequencyPreconditioner

    class Counted(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            built.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(rec, "LowFrequencyPreconditioner", Counted)

    def moved_at_two(done: int, x):  # type: ignore[no-untyped-def]
        return problem.batch if done == 2 else None  # "moved" (to where they were): a restart

    rec.refine_full_batch(problem.object, problem.probe, problem.counts_fft, problem.batch, problem.mask, opts,
                          opts.iterations, kappa=problem.kappa, probe_power=problem.probe_power, between=moved_at_two)
    assert len(built) == 2  # before CG, and again at the update
