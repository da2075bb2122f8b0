"""Adjoint tests ⟨Ax, y⟩ = ⟨x, A*y⟩ for every linear operator of the forward model, and the
likelihood gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.gpu import likelihood, operators
from cryoptycho.gpu.backend import fft2, ifft2, to_numpy
from cryoptycho.gpu.geometry import fit_geometry, wavelength


def _rand_c(xp, rng, shape):
    return xp.asarray(rng.standard_normal(shape) + 1j * rng.standard_normal(shape))


def _inner(xp, a, b):
    return complex(xp.vdot(a.ravel(), b.ravel()))


@pytest.fixture
def setup(xp):
    rng = np.random.default_rng(1)
    m = 16
    pix = xp.asarray(rng.uniform(0, 20, size=(7, 2)))  # sub-pixel positions
    shape = (40, 40)
    batch = operators.make_batch(pix, shape, (m, m))
    obj = _rand_c(xp, rng, shape)
    probe = _rand_c(xp, rng, (m, m))
    far = _rand_c(xp, rng, (7, m, m))
    return xp, rng, batch, obj, probe, far


def test_fft_is_unitary(xp):
    rng = np.random.default_rng(0)
    a = _rand_c(xp, rng, (3, 8, 8))
    b = _rand_c(xp, rng, (3, 8, 8))
    assert abs(_inner(xp, fft2(a), b) - _inner(xp, a, ifft2(b))) < 1e-9 * abs(_inner(xp, a, a))
    assert np.isclose(float(xp.sum(abs(fft2(a)) ** 2)), float(xp.sum(abs(a) ** 2)))


def test_extract_scatter_adjoint(setup):
    xp, _, batch, obj, _, far = setup
    lhs = _inner(xp, operators.extract(obj, batch), far)
    rhs = _inner(xp, obj, operators.scatter_add(far, batch))
    assert abs(lhs - rhs) < 1e-9 * abs(lhs)


def test_probe_shift_adjoint(setup):
    xp, rng, batch, _, probe, _ = setup
    assert batch.shifts.shape[0] > 1, "test needs several sub-pixel groups"
    g = _rand_c(xp, rng, (batch.shifts.shape[0],) + probe.shape)
    lhs = _inner(xp, operators.shifted_probes(probe, batch), g)
    rhs = _inner(xp, probe, operators.shift_back(g, batch))
    assert abs(lhs - rhs) < 1e-9 * abs(lhs)


def test_forward_adjoint_object(setup):
    xp, _, batch, obj, probe, far = setup
    lhs = _inner(xp, operators.forward(obj, probe, batch), far)
    rhs = _inner(xp, obj, operators.adjoint_object(far, probe, batch))
    assert abs(lhs - rhs) < 1e-9 * abs(lhs)


def test_forward_adjoint_probe(setup):
    xp, _, batch, obj, probe, far = setup
    lhs = _inner(xp, operators.forward(obj, probe, batch), far)
    rhs = _inner(xp, probe, operators.adjoint_probe(far, obj, batch))
    assert abs(lhs - rhs) < 1e-9 * abs(lhs)


def test_subpixel_shift_matches_integer_shift(xp):
    """A window at pixel p + 1 equals the window at p with the probe shifted by one whole pixel
    through the Fourier ramp (on a periodic probe the two agree exactly)."""
    rng = np.random.default_rng(3)
    m = 16
    probe = _rand_c(xp, rng, (m, m))
    b_int = operators.make_batch(xp.asarray([[5.0, 7.0]]), (40, 40), (m, m))
    shifted = operators.shifted_probes(probe, operators.make_batch(xp.asarray([[5.5, 7.25]]), (40, 40), (m, m)))
    # shifting by (0.5, 0.25) twice and four times gives (1, 1): compare to np.roll
    spec = fft2(probe)
    q = xp.fft.fftfreq(m)
    ramp = xp.exp(-2j * np.pi * (q[:, None] * 1.0 + q[None, :] * 1.0))
    rolled = xp.roll(probe, (1, 1), axis=(0, 1))
    assert float(xp.max(abs(ifft2(spec * ramp) - rolled))) < 1e-9
    # the half-pixel shifted probe has the same power (unitary shift)
    assert np.isclose(float(xp.sum(abs(shifted) ** 2)), float(xp.sum(abs(probe) ** 2)))
    assert b_int.shifts.shape[0] == 1


def test_windows_outside_canvas_rejected(xp):
    with pytest.raises(ValueError, match="outside the object canvas"):
        operators.make_batch(xp.asarray([[30.0, 2.0]]), (40, 40), (16, 16))


@pytest.mark.parametrize("model", ["poisson", "amplitude"])
@pytest.mark.parametrize("target", ["object", "probe"])
def test_likelihood_gradient_matches_finite_differences(xp, model, target):
    rng = np.random.default_rng(5)
    m = 12
    shape = (30, 30)
    batch = operators.make_batch(xp.asarray(rng.uniform(0, 15, (5, 2))), shape, (m, m))
    obj = xp.exp(1j * xp.asarray(rng.uniform(-0.3, 0.3, shape)))
    probe = _rand_c(xp, rng, (m, m)) * 2
    y = xp.asarray(rng.poisson(4.0, (5, m, m)).astype(np.float64))
    mask = xp.asarray((rng.uniform(size=(m, m)) > 0.1).astype(np.float64))

    def loss(o, p):
        return likelihood.loss_and_grad(operators.forward(o, p, batch), y, model, mask)[0]

    _, gz = likelihood.loss_and_grad(operators.forward(obj, probe, batch), y, model, mask)
    if target == "object":
        grad = operators.adjoint_object(gz, probe, batch)
        d = _rand_c(xp, rng, shape)
        f = lambda t: loss(obj + t * d, probe)
    else:
        grad = operators.adjoint_probe(gz, obj, batch)
        d = _rand_c(xp, rng, (m, m))
        f = lambda t: loss(obj, probe + t * d)
    t = 1e-6
    fd = (f(t) - f(-t)) / (2 * t)
    analytic = 2 * _inner(xp, grad, d).real
    assert fd == pytest.approx(analytic, rel=1e-4)


def test_truncation_rules(xp):
    rng = np.random.default_rng(2)
    z = _rand_c(xp, rng, (4, 8, 8))
    y = xp.asarray(rng.poisson(2.0, (4, 8, 8)).astype(np.float64))
    assert likelihood.truncation_keep(z, y, alpha_h=np.inf) is None
    keep = likelihood.truncation_keep(z, y, alpha_h=0.5, rule="chen-candes")
    keep_hi = likelihood.truncation_keep(z, y, alpha_h=0.5, rule="high-intensity")
    # the floored rule can only keep more
    assert float(keep_hi.sum()) >= float(keep.sum())
    assert 0 < float(keep.sum()) < keep.size


def test_geometry_roundtrip():
    pos = np.array([[0.0, 0.0], [1e-9, 2e-9], [-3e-9, 5e-9]])
    geo = fit_geometry(pos, 1e-10, (32, 32))
    px = geo.to_pixels(pos)
    assert np.allclose(geo.to_metres(px), pos)
    assert geo.contains(pos).all()
    assert (px >= 0).all()
    assert wavelength(300e3) == pytest.approx(1.9687e-12, rel=1e-3)
    assert to_numpy(px).shape == (3, 2)
