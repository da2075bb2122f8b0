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
from cryoptycho.gpu.probes import initial_modes, mode_powers, orthogonalize_modes
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
    kw = dict(model=model, mask=mask, truncation=truncation, alpha_h=50.0)
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
    loss, grads = fun({"object": obj, "probe": probe})
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
    modes = initial_modes(probe, 3)
    assert modes.shape == (3, 32, 32)
    powers = mode_powers(modes)
    assert powers.sum() == pytest.approx(500.0, rel=1e-9)
    assert powers[0] == pytest.approx(0.95 * 500.0, rel=1e-9)
    assert powers[1] > powers[2] > 0
    flat = to_numpy(modes).reshape(3, -1)
    gram = flat @ flat.conj().T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-8 * abs(gram).max())
    # the main mode is the given probe, scaled
    main = to_numpy(modes[0]) / np.sqrt(0.95)
    np.testing.assert_allclose(main, to_numpy(probe), rtol=1e-9, atol=1e-12)
    assert initial_modes(probe, 1) is probe
    with pytest.raises(ValueError, match="at least 1"):
        initial_modes(probe, 0)
