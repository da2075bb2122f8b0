"""The parametric probe (gpu/aberrations.py): gradient with respect to the aberration
coefficients against finite differences, and recovery of a known defocus and astigmatism error
from data with few counts, where the free M×M probe loses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryoptycho.gpu import operators
from cryoptycho.gpu.aberrations import ParametricProbe, fit_aberrations
from cryoptycho.gpu.geometry import fit_geometry
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.probes import aberrate, aberration_basis, make_probe
from cryoptycho.gpu.reconstruct import FullBatchObjective, problem_kappa, reconstruct
from engine_helpers import ENERGY, PIXEL, nrmse, scored_region, synthetic_dataset

M = 32


def test_aberration_basis_matches_make_probe_defocus_and_cs() -> None:
    """C10 and C30 of the basis are make_probe's defocus and C_s (same sign convention)."""
    nominal = make_probe("defocused", (M, M), PIXEL, ENERGY, 8e-3, 20e-9, cs=0.0, precision="double")
    want = make_probe("defocused", (M, M), PIXEL, ENERGY, 8e-3, 50e-9, cs=1e-3, precision="double")
    got = aberrate(nominal, PIXEL, ENERGY, {"C10": 30e-9, "C30": 1e-3})
    np.testing.assert_allclose(got, want, atol=1e-12 * np.abs(want).max() + 1e-9)
    basis = aberration_basis((M, M), PIXEL, ENERGY)
    assert basis.shape == (6, M, M)
    with pytest.raises(ValueError, match="unknown aberration"):
        aberration_basis((M, M), PIXEL, ENERGY, ("C99",))


def _objective(data, probe_power):
    geo = fit_geometry(data.positions, PIXEL, (M, M))
    batch = operators.make_batch(geo.to_pixels(data.positions), geo.object_shape, (M, M))
    y = operators.to_fft_order(data.frames)
    opts = ReconOptions(precision="double")
    kap = problem_kappa(y, None, data.truth_probe, batch)
    return FullBatchObjective(y, batch, None, opts, kap, probe_power)


def test_aberration_gradient_matches_finite_differences() -> None:
    data = synthetic_dataset(1e4, m=M, grid=4, seed=5)
    power = float((np.abs(data.truth_probe) ** 2).sum())
    fun = _objective(data, power)
    obj = data.truth_object.astype(np.complex128)
    model = ParametricProbe(data.truth_probe.astype(np.complex128), PIXEL, ENERGY)
    x0 = np.array([0.3, -0.2, 0.4, 0.1, -0.3, 0.2])

    def loss(x: np.ndarray) -> float:
        return fun({"object": obj, "probe": model.probe(x)})[0]

    _, grads = fun({"object": obj, "probe": model.probe(x0)})
    g = model.gradient(grads["probe"], x0)
    eps = 1e-5
    for j in range(len(x0)):
        e = np.zeros_like(x0)
        e[j] = eps
        fd = (loss(x0 + e) - loss(x0 - e)) / (2 * eps)
        assert g[j] == pytest.approx(fd, rel=1e-4, abs=1e-6 * abs(loss(x0))), model.names[j]


def test_fit_recovers_defocus_and_astigmatism_with_the_object_held() -> None:
    data = synthetic_dataset(1e4, m=M, grid=6, seed=6, noiseless=True)
    power = float((np.abs(data.truth_probe) ** 2).sum())
    fun = _objective(data, power)
    obj = data.truth_object.astype(np.complex128)
    error = {"C10": 15e-9, "C12a": 6e-9, "C12b": -4e-9}
    # the nominal probe: the truth without the error
    nominal = aberrate(data.truth_probe.astype(np.complex128), PIXEL, ENERGY,
                       {k: -v for k, v in error.items()})
    model = ParametricProbe(nominal, PIXEL, ENERGY, ("C10", "C12a", "C12b"))

    def loss_and_grad(psi):
        loss, grads = fun({"object": obj, "probe": psi})
        return loss, grads["probe"]

    before, after, _ = fit_aberrations(model, loss_and_grad, max_iter=30)
    assert after < before
    got = model.as_dict()
    for name, value in error.items():
        assert got[name] == pytest.approx(value, abs=0.3e-9), (name, got)


def test_reconstruction_with_aberration_refinement_beats_the_wrong_nominal_probe() -> None:
    """Low counts (300 per pattern): the nominal probe is 20 nm out of focus with 8 nm of
    astigmatism; refining 3 coefficients recovers most of the loss."""
    data = synthetic_dataset(300, m=M, grid=8, seed=1)
    error = {"C10": 20e-9, "C12a": 8e-9}
    nominal = aberrate(data.truth_probe.astype(np.complex128), PIXEL, ENERGY,
                       {k: -v for k, v in error.items()}).astype(np.complex64)
    region = scored_region(data.truth_object, M // 2 + 2)
    base = {"iterations": 60, "precision": "double"}

    def score(d, **extra):
        st = reconstruct(d, {**base, **extra})
        return nrmse(st.object, data.truth_object, region), st

    exact, _ = score(data)
    wrong = dataclasses.replace(data, probe=nominal)
    fixed, _ = score(wrong)
    refined, _ = score(wrong, refine_aberrations=True, aberrations=["C10", "C12a", "C12b"])
    assert fixed > exact
    assert refined < fixed - 0.5 * (fixed - exact), (exact, fixed, refined)
