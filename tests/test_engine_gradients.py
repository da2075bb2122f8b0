"""Wirtinger gradients of every engine objective against central finite differences:
f(x + h d) − f(x − h d) ≈ 4 h Re⟨∂f/∂x̄, d⟩ (CONVENTIONS.md), for object and probe, in double
precision."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.gpu import operators, priors
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.objective import data_term
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.reconstruct import FullBatchObjective


def _rand_c(xp, rng, shape, scale=1.0):
    return xp.asarray(scale * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)))


def _check(xp, f, grad, x, d, h=1e-6, rtol=1e-5):
    fd = (f(x + h * d) - f(x - h * d)) / (4 * h)
    an = float(xp.vdot(grad.ravel(), d.ravel()).real)
    assert abs(fd - an) <= rtol * max(abs(an), 1e-8), (fd, an)


@pytest.fixture
def problem(xp):
    rng = np.random.default_rng(7)
    m, shape = 12, (30, 30)
    batch = operators.make_batch(xp.asarray(rng.uniform(0, 16, (6, 2))), shape, (m, m))
    obj = xp.exp(1j * _rand_c(xp, rng, shape, 0.2).real) * (1 + 0.05 * _rand_c(xp, rng, shape).real)
    probe = _rand_c(xp, rng, (m, m), 2.0)
    far = operators.forward(obj, probe, batch)
    # Counts scattered around the model intensity, many of them zero (the low-dose regime).
    host = rng.poisson(to_numpy(abs(far) ** 2) * 0.7 + 0.05).astype(np.float64)
    host[rng.random(host.shape) < 0.02] += 40.0  # outliers for the truncation rules to find
    counts = xp.asarray(host)
    mask = xp.ones((m, m))
    mask[0, 3] = 0.0
    return xp, rng, batch, obj, probe, counts, mask


@pytest.mark.parametrize(
    "model,rule,alpha",
    [("poisson", "chen-candes", 5.0), ("poisson", "high-intensity", 5.0),
     ("poisson", "poisson-floor", 2.0), ("amplitude", "high-intensity", 5.0)],
)
def test_truncated_data_term_gradients(problem, model, rule, alpha):
    xp, rng, batch, obj, probe, counts, mask = problem
    base = data_term(obj, probe, counts, batch, model=model, truncation=rule, alpha_h=alpha, mask=mask)
    assert 0.0 < base.kept_fraction < 1.0, "the rule should discard some, not all, measurements"
    # The kept set is piecewise constant in (T, ψ); hold it fixed as the rule does per step.
    from cryoptycho.gpu.likelihood import truncation_keep

    keep = truncation_keep(operators.forward(obj, probe, batch), counts, alpha, rule, mask)

    def loss(t, p):
        from cryoptycho.gpu.likelihood import loss_and_grad

        return loss_and_grad(operators.forward(t, p, batch), counts, model, mask, keep)[0]

    d_obj = _rand_c(xp, rng, obj.shape, 0.1)
    d_probe = _rand_c(xp, rng, probe.shape, 0.1)
    _check(xp, lambda t: loss(t, probe), base.grad_object, obj, d_obj)
    _check(xp, lambda p: loss(obj, p), base.grad_probe, probe, d_probe)


def test_tikhonov_gradient(xp):
    rng = np.random.default_rng(2)
    t = _rand_c(xp, rng, (9, 11))
    d = _rand_c(xp, rng, (9, 11))
    loss, grad = priors.tikhonov(t, 0.37)
    assert loss > 0
    _check(xp, lambda x: priors.tikhonov(x, 0.37)[0], grad, t, d)
    # A constant image has no gradient to penalise.
    flat_loss, flat_grad = priors.tikhonov(xp.full((5, 5), 2 - 1j), 1.0)
    assert flat_loss == 0.0 and float(abs(flat_grad).max()) == 0.0


def test_sparse_term_gradient(xp):
    rng = np.random.default_rng(3)
    t = xp.exp(1j * (1.0 + 0.3 * xp.asarray(rng.standard_normal((16, 16)))))
    prior = priors.SparsePrior("gaussian", mu1=0.08, every=5)
    assert prior.update(t, 0) and not prior.update(t, 3) and prior.update(t, 5)
    d = _rand_c(xp, rng, t.shape)
    loss, grad = prior.term(t, scale=3.0)
    assert loss > 0
    _check(xp, lambda x: prior.term(x, scale=3.0)[0], grad, t, d)


@pytest.mark.parametrize("model,prior", [("poisson", "tikhonov"), ("amplitude", "none"),
                                         ("poisson", "sparse")])
def test_full_objective_gradients_with_probe_normalisation(problem, model, prior):
    """The engine's objective writes the probe through ψ̂ = ψ·√P/‖ψ‖: its probe gradient must be
    the exact derivative of that composition (and orthogonal to ψ: the loss ignores scale)."""
    xp, rng, batch, obj, probe, counts, mask = problem
    opts = ReconOptions(noise_model=model, prior=prior, precision="double", chunk_size=4,
                        denoiser="gaussian")
    sparse = priors.SparsePrior("gaussian", 0.08, 10) if prior == "sparse" else None
    if sparse is not None:
        sparse.update(obj, 0)
    power = 1.3 * float((abs(probe) ** 2).sum())
    fun = FullBatchObjective(counts, batch, mask, opts, kappa=0.5, probe_power=power, sparse=sparse)
    x = {"object": obj, "probe": probe}
    _, g = fun(x)
    d_obj = _rand_c(xp, rng, obj.shape, 0.1)
    d_probe = _rand_c(xp, rng, probe.shape, 0.1)
    _check(xp, lambda t: fun({"object": t, "probe": probe})[0], g["object"], obj, d_obj)
    _check(xp, lambda p: fun({"object": obj, "probe": p})[0], g["probe"], probe, d_probe)
    radial = float(xp.vdot(probe.ravel(), g["probe"].ravel()).real)
    assert abs(radial) < 1e-9 * float(xp.linalg.norm(g["probe"])) * float(xp.linalg.norm(probe))


def test_chunked_evaluation_equals_one_pass(problem):
    """Chunks only bound memory: every chunk size gives the same loss and gradients (each chunk
    keeps just the sub-pixel probe shifts its own positions use)."""
    _, _, batch, obj, probe, counts, mask = problem
    assert batch.shifts.shape[0] > 2
    x = {"object": obj, "probe": probe}
    results = []
    for chunk in (1, 4, 1000):
        opts = ReconOptions(precision="double", chunk_size=chunk)
        results.append(FullBatchObjective(counts, batch, mask, opts, 0.5, 7.0)(x))
    for loss, grads in results[1:]:
        assert np.isclose(loss, results[0][0], rtol=1e-12)
        for key in ("object", "probe"):
            assert np.allclose(to_numpy(grads[key]), to_numpy(results[0][1][key]), rtol=1e-10, atol=1e-12)
