"""Position and aberration refinement with a mixed-state (incoherent modes) probe: the position
gradient and the aberration gradient of I = Σ_m |F[S_δ ψ_m · R_k T]|² against finite
differences, the same phase plate on every mode against the modes of the aberrated probe, a
known scan error and defocus recovered from partially coherent data offline and in the
streaming engine, and the console scripts (simulate --realistic, reconstruct with modes and
refinement)."""

from __future__ import annotations

import dataclasses

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
from engine_helpers import ENERGY, PIXEL, nrmse, phase_corr, scan_errors, scored_region, weak_phase_object

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


def _fractional_inside(px: np.ndarray, k: int) -> bool:
    # a move across a whole pixel changes the window (the shifted probe wraps differently)
    frac = px[k] - np.floor(px[k])
    return bool(np.all((frac > 0.1) & (frac < 0.9)))


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
    checked = 0
    eps = 1e-3
    for k in range(len(px)):
        if not _fractional_inside(px, k):
            continue
        for a in (0, 1):
            up, down = px.copy(), px.copy()
            up[k, a] += eps
            down[k, a] -= eps
            fd = (loss_at(up) - loss_at(down)) / (2 * eps)
            assert grad[k, a] == pytest.approx(fd, rel=1e-3, abs=1e-4 * max(1.0, abs(fd)))
        checked += 1
    assert checked >= 8


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
    eps = 1e-5
    for j in range(len(x0)):
        e = np.zeros_like(x0)
        e[j] = eps
        fd = (loss(x0 + e) - loss(x0 - e)) / (2 * eps)
        assert g[j] == pytest.approx(fd, rel=1e-4, abs=1e-6 * abs(loss(x0))), model.names[j]


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
