"""The engine's fast paths agree with the plain definitions they replace: the fused likelihood
with the separate truncation / loss / gradient functions, per-position shifted probes with the
per-group ones, and CG's line model (trial steps without FFTs) with evaluating the objective
at every trial — in double precision, where both sides must agree to rounding."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.gpu import likelihood, line_model, operators
from cryoptycho.gpu.backend import array_module, to_numpy
from cryoptycho.gpu.cg import _Direct, minimize
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.reconstruct import FullBatchObjective


def _rand_c(xp, rng, shape, scale=1.0):
    return xp.asarray(scale * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)))


def _close(a, b, rtol=1e-9):
    a, b = to_numpy(a), to_numpy(b)
    assert np.abs(a - b).max() <= rtol * np.abs(b).max(), np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("model", ["poisson", "amplitude"])
@pytest.mark.parametrize("rule", ["none", "chen-candes", "high-intensity", "poisson-floor"])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_likelihood_matches_separate_functions(xp, model, rule, masked):
    rng = np.random.default_rng(3)
    z = _rand_c(xp, rng, (5, 8, 8), 1.5)
    host = rng.poisson(2.0, (5, 8, 8))
    host[rng.random(host.shape) < 0.05] += 30  # outliers for the rules to drop
    y = xp.asarray(host.astype(np.uint16))
    mask = xp.asarray((rng.random((8, 8)) > 0.2).astype(np.float64)) if masked else None
    yf = y.astype(np.float64)
    keep = likelihood.truncation_keep(z, yf, 2.0, rule, mask)
    loss_fn = likelihood.poisson_loss if model == "poisson" else likelihood.amplitude_loss
    grad_fn = likelihood.poisson_grad if model == "poisson" else likelihood.amplitude_grad
    terms = likelihood.far_field_terms(z, y, model, mask, rule, 2.0)
    assert float(terms.loss) == pytest.approx(loss_fn(z, yf, mask, keep), rel=1e-12)
    _close(terms.grad, grad_fn(z, yf, mask, keep), 1e-12)
    valid = 5 * 64 if mask is None else 5 * float(mask.sum())
    kept = valid if keep is None else float((keep if mask is None else keep * mask).sum())
    assert terms.kept == kept and terms.valid == valid
    if rule != "none":
        assert 0 < kept < valid, "the rule should drop some measurements here"
    factor = likelihood.far_field_terms(z, y, model, mask, rule, 2.0, want_grad=False).factor
    _close(factor * z, terms.grad, 1e-12)


def _batches(xp):
    rng = np.random.default_rng(9)
    pix = rng.uniform(0, 20, size=(9, 2))
    shared = pix.copy()
    shared[:5] = np.round(shared[:5]) + 0.25  # five positions share one sub-pixel shift
    return {
        "distinct": operators.make_batch(xp.asarray(pix), (40, 40), (12, 12)),
        "shared": operators.make_batch(xp.asarray(shared), (40, 40), (12, 12)),
        "grid": operators.make_batch(xp.asarray(np.round(pix)), (40, 40), (12, 12)),
    }


@pytest.mark.parametrize("kind", ["distinct", "shared", "grid"])
def test_position_probes_and_their_adjoint(xp, kind):
    batch = _batches(xp)[kind]
    assert batch.distinct_groups == (kind == "distinct")
    rng = np.random.default_rng(10)
    probe = _rand_c(xp, rng, (12, 12))
    per_group = operators.shifted_probes(probe, batch)
    expected = per_group[batch.group] if per_group.shape[0] > 1 else per_group
    _close(operators.position_probes(probe, batch), expected, 1e-12)
    a = _rand_c(xp, rng, (batch.size, 12, 12))
    lhs = complex(xp.vdot(xp.broadcast_to(operators.position_probes(probe, batch), a.shape).ravel(), a.ravel()))
    rhs = complex(xp.vdot(probe.ravel(), operators.probe_adjoint(a.copy(), batch).ravel()))
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)


@pytest.fixture
def full_batch(xp):
    """A jittered scan in double precision, several chunks, a mask and truncation on."""
    rng = np.random.default_rng(11)
    m, shape, k = 12, (36, 36), 23
    batch = operators.make_batch(xp.asarray(rng.uniform(0, 22, (k, 2))), shape, (m, m))
    obj = xp.exp(1j * xp.asarray(rng.uniform(-0.3, 0.3, shape)))
    probe = _rand_c(xp, rng, (m, m), 2.0)
    host = rng.poisson(to_numpy(abs(operators.forward(obj, probe, batch)) ** 2) * 0.8)
    host[rng.random(host.shape) < 0.01] += 25
    counts = xp.asarray(host.astype(np.uint16))
    mask = xp.ones((m, m))
    mask[0, 5] = 0.0
    opts = ReconOptions(precision="double", chunk_size=7, alpha_h=2.0, prior="tikhonov")
    power = float((abs(probe) ** 2).sum())
    fun = FullBatchObjective(counts, batch, mask, opts, 0.5, power)
    start = {"object": obj * xp.exp(0.05j * _rand_c(xp, rng, shape).real), "probe": probe}
    direction = {"object": _rand_c(xp, rng, shape, 0.02), "probe": _rand_c(xp, rng, (m, m), 0.05)}
    return fun, start, direction


@pytest.mark.parametrize("speculate", [False, True])
@pytest.mark.parametrize("keys", [{"object"}, {"object", "probe"}])
def test_line_model_matches_direct_evaluations(full_batch, keys, speculate):
    fun, x, d = full_batch
    fun.want_probe = "probe" in keys
    # after a line whose first trial was accepted, the next first trial takes its gradient
    fun._line_first_accepted = speculate
    model = line_model.full_batch_line(fun, x, d, keys)
    assert isinstance(model, line_model.FullBatchLine)
    direct = _Direct(fun, x, d, keys)
    for t in (0.0, 0.4, 1.0, 3.0):
        f_m, s_m = model.value(t)
        f_d, s_d = direct.value(t)
        assert f_m == pytest.approx(f_d, rel=1e-12)
        assert s_m == pytest.approx(s_d, rel=1e-8, abs=1e-10 * abs(s_d) + 1e-12)
        x_m, f_pm, g_m = model.point(t)
        x_d, _, g_d = direct.point(t)
        assert float(f_pm) == pytest.approx(f_d, rel=1e-12)  # point() may leave it on the device
        assert set(g_m) == set(g_d)
        for key in g_d:
            _close(x_m[key], x_d[key], 1e-14)
            _close(g_m[key], g_d[key], 1e-9)
    # The accepted point's far field is carried into the next line: same values as fresh.
    x_next, _, _ = model.point(1.0)
    carried = line_model.full_batch_line(fun, x_next, d, keys)
    assert carried.reuses == 1
    fun._line_carry = None
    fresh = line_model.full_batch_line(fun, x_next, d, keys)
    assert fresh.reuses == 0
    assert carried.value(0.7)[0] == pytest.approx(fresh.value(0.7)[0], rel=1e-12)


@pytest.mark.parametrize("keys", [{"object"}, {"object", "probe"}])
def test_line_model_after_a_position_update_is_the_objective_at_the_new_positions(full_batch, keys):
    """CG goes on from the same object and probe arrays after an accepted position update
    (refine_full_batch's ``between``): the line model matched its carried far fields and its
    kept shifted probes by those arrays alone and went on with the old positions' ones — a
    line whose φ(t) was neither the old objective nor the new one (then CG found no descent,
    "CG stalled on the truncation rule", or descended the wrong function)."""
    fun, x, d = full_batch
    xp = array_module(x["object"])
    fun.want_probe = "probe" in keys
    fun._line_first_accepted = False
    line = line_model.full_batch_line(fun, x, d, keys)
    x_next, _, _ = line.point(1.0)  # accepted: its far fields (and the shifted probes) are kept
    # sub-pixel moves of up to ±0.6 px: new fractions, and windows that change pixel
    rng = np.random.default_rng(12)
    moved_px = rng.uniform(0.6, 21.4, (sum(b.size for b in fun.batches), 2))
    fun.move_to(operators.make_batch(xp.asarray(moved_px), x["object"].shape, x["probe"].shape))
    after = line_model.full_batch_line(fun, x_next, d, keys)
    direct = _Direct(fun, x_next, d, keys)
    for t in (0.0, 0.5, 1.5):
        f_m, s_m = after.value(t)
        f_d, s_d = direct.value(t)
        assert f_m == pytest.approx(f_d, rel=1e-12)
        assert s_m == pytest.approx(s_d, rel=1e-8, abs=1e-10 * abs(s_d) + 1e-12)
        _, f_pm, g_m = after.point(t)
        _, _, g_d = direct.point(t)
        assert float(f_pm) == pytest.approx(f_d, rel=1e-12)
        for key in g_d:
            _close(g_m[key], g_d[key], 1e-9)
    assert after.reuses == 0  # nothing of the old positions was carried over


def test_line_model_refused_beyond_memory_budget(full_batch, monkeypatch):
    fun, x, d = full_batch
    monkeypatch.setattr(line_model, "line_budget_bytes", lambda xp: 1000)
    assert fun.line(x, d, {"object"}) is None


def test_cg_with_line_model_follows_direct_cg(full_batch):
    """Same iterates (to rounding) whether trials use the line model or full evaluations."""
    fun, x, _ = full_batch
    fun.want_probe = True

    def plain(v):  # the same objective, without a line model
        return fun(v)

    precond = {"object": 1.0, "probe": 0.01}
    fast = minimize(fun, x, 6, precondition=precond)
    slow = minimize(plain, x, 6, precondition=precond)
    assert fast.iterations == slow.iterations == 6
    np.testing.assert_allclose(fast.losses, slow.losses, rtol=1e-9)
    assert fast.losses[-1] < fast.losses[0]
    _close(fast.x["object"], slow.x["object"], 1e-7)
