"""End-to-end engine behaviour on small synthetic weak-phase datasets (tests/engine_helpers.py):
high-dose accuracy, probe refinement, the Poisson-vs-amplitude comparison at low dose, the
full-batch refinement API and the optimiser itself."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cryoptycho.gpu.backend import backend_name, to_numpy
from cryoptycho.gpu.cg import minimize
from cryoptycho.gpu.probes import make_probe
from cryoptycho.gpu.reconstruct import prepare, reconstruct, refine_full_batch
from engine_helpers import (
    ENERGY,
    PIXEL,
    frc_resolution,
    nrmse,
    phase_corr,
    scored_region,
    synthetic_dataset,
)


def probe_overlap(a, b) -> float:
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    return float(abs(np.vdot(a, b)) / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def high_dose():
    return synthetic_dataset(1e5, grid=8, seed=0)  # ≈ 11,000 e⁻/Å², 100 counts/pixel


def test_high_dose_known_probe_nrmse(xp, high_dose):
    # ≈ 11,000 e⁻/Å² needs almost no prior: μ₀ = 1e-3 (the default 0.03 is tuned for 5–20).
    state = reconstruct(high_dose, {"backend": backend_name(xp), "iterations": 30,
                                    "refine_probe": False, "mu0": 1e-3})
    region = scored_region(high_dose.truth_object, 12)
    obj = to_numpy(state.object)
    assert nrmse(obj, high_dose.truth_object, region) < 0.05
    assert phase_corr(obj, high_dose.truth_object, region) > 0.9
    assert state.iteration == 30 and len(state.loss_values) == 30
    assert state.loss_values[-1] < state.loss_values[0]


def test_spectral_initialisation(high_dose):
    """Eq. 22 by power iterations from the flat object. On weak-phase objects it is a weak
    start (the paper: useful only above ~100 e⁻/Å²); measured here at 11,000 e⁻/Å²: phase
    correlation 0.18 after 5 iterations (random init: −0.02), falling to 0.05 after 60 as the
    iterate drifts to the nearly degenerate leading eigenvector. The engine defaults to the
    random start for that reason."""
    region = scored_region(high_dose.truth_object, 12)
    problem = prepare(high_dose, {"init": "spectral", "spectral_iterations": 5})
    obj = to_numpy(problem.object)
    assert np.allclose(np.abs(obj), 1.0, atol=1e-5)  # the spectral init fixes the phase only
    assert phase_corr(obj, high_dose.truth_object, region) > 0.1
    rand = to_numpy(prepare(high_dose, {"init": "random"}).object)
    assert phase_corr(obj, high_dose.truth_object, region) > phase_corr(
        rand, high_dose.truth_object, region) + 0.1
    again = to_numpy(prepare(high_dose, {"init": "spectral", "spectral_iterations": 5}).object)
    assert np.array_equal(obj, again)  # seeded: reproducible


def test_probe_refinement_improves_object():
    data = synthetic_dataset(1e5, grid=8, seed=0)
    truth_probe = data.truth_probe
    # A probe with 50 % more defocus than the truth (overlap ≈ 0.67 with it).
    data.probe = make_probe("defocused", (32, 32), PIXEL, ENERGY, 8e-3, 90e-9,
                            total_intensity=1e5, precision="double").astype(np.complex64)
    region = scored_region(data.truth_object, 12)
    common = {"iterations": 100, "prior": "none", "probe_start_iteration": 5}
    fixed = reconstruct(data, {**common, "refine_probe": False})
    refined = reconstruct(data, {**common, "refine_probe": True})
    pc_fixed = phase_corr(fixed.object, data.truth_object, region)
    pc_refined = phase_corr(refined.object, data.truth_object, region)
    assert pc_refined > pc_fixed + 0.03, (pc_fixed, pc_refined)
    assert nrmse(refined.object, data.truth_object, region) < nrmse(
        fixed.object, data.truth_object, region)
    assert probe_overlap(refined.probe, truth_probe) > probe_overlap(data.probe, truth_probe) + 0.05
    # The power constraint holds: Σ|ψ|² stays the measured counts per pattern.
    assert np.isclose(float(np.sum(np.abs(refined.probe) ** 2)),
                      data.frames.sum() / len(data.frames), rtol=1e-3)


def test_poisson_beats_amplitude_at_low_dose():
    """The paper's core claim with the engine's defaults (μ₀ 0.03, poisson-floor truncation,
    probe fixed below its refinement threshold): the truncated Poisson model against the
    amplitude model on the same data at 20 e⁻/Å² (0.18 e⁻ per detector pixel), the same
    40-iteration budget. Measured on seeds 0–4 (2026-12, loaded 2-core machine): NRMSE 0.064–0.077
    (Poisson) vs 0.119–0.134 (amplitude) at every seed; phase correlation 0.22–0.49 vs 0.18–0.39,
    better at every seed but by as little as 0.02, so it is compared on the mean over seeds; the
    pooled-ring FRC moves in steps of 0.043 cycles/px and ties at single seeds (seed 0), so its
    mean is compared too. The defaults' 100 iterations rank the models the same way."""
    seeds = (0, 1, 2)
    scores: dict[str, list[tuple[float, float, float]]] = {"poisson": [], "amplitude": []}
    for seed in seeds:
        data = synthetic_dataset(20 * 9, grid=12, seed=seed, radius_px=(2.5, 5.0))
        region = scored_region(data.truth_object, 12)
        for model, rows in scores.items():
            state = reconstruct(data, {"noise_model": model, "iterations": 40})
            rows.append((
                frc_resolution(state.object, data.truth_object, region)[0],
                phase_corr(state.object, data.truth_object, region),
                nrmse(state.object, data.truth_object, region),
            ))
    frc_p, pc_p, err_p = np.asarray(scores["poisson"]).T
    frc_a, pc_a, err_a = np.asarray(scores["amplitude"]).T
    assert np.all(err_p < 0.7 * err_a), scores  # at every seed, by a wide margin
    assert pc_p.mean() > pc_a.mean() + 0.05, scores
    assert frc_p.mean() > frc_a.mean(), scores  # strictly: a tie is not "beats"


def test_refine_full_batch_continues_a_reconstruction(high_dose):
    problem = prepare(high_dose, {"iterations": 10, "refine_probe": True, "probe_start_iteration": 12})
    obj, probe, losses = refine_full_batch(
        problem.object, problem.probe, problem.counts_fft, problem.batch, problem.mask,
        problem.options, iterations=6, start_iteration=10,
    )
    assert len(losses) == 6 and all(b <= a for a, b in itertools.pairwise(losses))
    assert obj.shape == problem.object.shape and probe.shape == problem.probe.shape
    # The probe joined at iteration 12 (it moved) and kept its power.
    assert not np.allclose(to_numpy(probe), to_numpy(problem.probe))
    assert np.isclose(float(np.sum(np.abs(probe) ** 2)), problem.probe_power, rtol=1e-4)
    with pytest.raises(ValueError, match="patterns but the batch has"):
        refine_full_batch(problem.object, problem.probe, problem.counts_fft[:3], problem.batch,
                          problem.mask, problem.options, iterations=1)


def test_progress_and_time_budget(high_dose):
    seen = []
    state = reconstruct(high_dose, {"iterations": 4, "refine_probe": False},
                        progress=lambda it, total, loss: seen.append((it, total, loss)))
    assert [s[0] for s in seen] == [1, 2, 3, 4] and all(s[1] == 4 for s in seen)
    assert [s[2] for s in seen] == state.loss_values
    # A budget already spent stops before the first iteration.
    stopped = reconstruct(high_dose, {"iterations": 50, "time_budget_s": 1e-9})
    assert stopped.iteration == 0


def test_cg_solves_a_complex_quadratic(xp):
    """f(x) = Σ w|x − b|² + |y − c|²: CG (with a two-stage active set) reaches the minimiser."""
    rng = np.random.default_rng(0)
    w = xp.asarray(rng.uniform(0.5, 5.0, (6, 7)))
    b = xp.asarray(rng.standard_normal((6, 7)) + 1j * rng.standard_normal((6, 7)))
    c = xp.asarray(rng.standard_normal(4) + 1j * rng.standard_normal(4))

    def fun(x):
        dx, dy = x["object"] - b, x["probe"] - c
        loss = float((w * abs(dx) ** 2).sum() + (abs(dy) ** 2).sum())
        return loss, {"object": w * dx, "probe": dy}

    x0 = {"object": xp.zeros((6, 7), complex), "probe": xp.zeros(4, complex)}
    res = minimize(fun, x0, max_iter=60, active=lambda it: {"object"} if it < 5 else {"object", "probe"})
    assert float(abs(res.x["object"] - b).max()) < 1e-6
    assert float(abs(res.x["probe"] - c).max()) < 1e-6
    assert all(b2 <= a2 for a2, b2 in zip(res.losses, res.losses[1:]))
    early = minimize(fun, x0, max_iter=3, active=lambda it: {"object"})
    assert np.array_equal(to_numpy(early.x["probe"]), np.zeros(4))  # inactive: untouched


def _with_outliers(data, fraction: float, seed: int):
    """Unmasked hot pixels / X-ray hits: rare measurements with 20 spurious counts."""
    hit = np.random.default_rng(1000 + seed).random(data.frames.shape) < fraction
    data.frames = data.frames + (hit * 20).astype(data.frames.dtype)
    return data


def test_poisson_floor_truncation_keeps_lone_electrons():
    """At 5 e⁻/Å² (0.04 e⁻/pixel) no measurement fails the counting-noise test, so the default
    rule reconstructs exactly what no truncation does, whereas the Chen–Candès rule drops the
    detected electrons (measured: phase correlation 0.20 → −0.01 over seeds 0–2)."""
    data = synthetic_dataset(5 * 9, grid=6, seed=0)
    common = {"iterations": 8, "refine_probe": False}
    none = reconstruct(data, {**common, "truncation": "none"})
    floor = reconstruct(data, {**common, "truncation": "poisson-floor", "alpha_h": 5.0})
    chen = reconstruct(data, {**common, "truncation": "chen-candes", "alpha_h": 5.0})
    assert np.array_equal(none.object, floor.object)
    assert not np.allclose(none.object, chen.object)


def test_truncation_rejects_outliers_at_low_dose():
    """With 0.1 % unmasked outlier measurements at 20 e⁻/Å², truncation restores the outlier-free
    quality. Measured over seeds 0–2: phase correlation 0.18 ± 0.12 (none) vs 0.41 ± 0.03
    (poisson-floor, α_h = 5); NRMSE 0.179 vs 0.088 (0.087 without outliers)."""
    data = _with_outliers(synthetic_dataset(20 * 9, grid=12, seed=0, radius_px=(2.5, 5.0)), 1e-3, 0)
    region = scored_region(data.truth_object, 12)
    common = {"iterations": 40, "mu0": 0.0125, "refine_probe": False}
    none = reconstruct(data, {**common, "truncation": "none"})
    floor = reconstruct(data, {**common, "truncation": "poisson-floor"})
    err_none = nrmse(none.object, data.truth_object, region)
    err_floor = nrmse(floor.object, data.truth_object, region)
    assert err_floor < 0.7 * err_none, (err_none, err_floor)
    assert phase_corr(floor.object, data.truth_object, region) > phase_corr(
        none.object, data.truth_object, region) + 0.1
