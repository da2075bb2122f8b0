"""Low-dose scoring: unresolved curves, the quantum-limit reference, and what the demo reports."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.gpu.sim.evaluation import evaluate_against_truth, ideal_phase_image, quantum_limit

PIXEL = 1e-10
ICE_PHASE = 1.5
ICE_AMPLITUDE = 0.93


def _truth(shape: tuple[int, int] = (96, 96)) -> tuple[np.ndarray, tuple[float, float], np.ndarray]:
    """Blobs of phase (peak ≈ 0.35 rad) on a uniform ice phase, positions covering the middle."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    phase = np.zeros(shape)
    for _ in range(25):
        cy, cx = rng.uniform(30, 66, 2)
        phase += 0.12 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(1.5, 4.0) ** 2))
    truth = ICE_AMPLITUDE * np.exp(1j * (ICE_PHASE + phase))
    origin = (-48 * PIXEL, -48 * PIXEL)
    g = np.arange(-30, 31, 4) * PIXEL
    positions = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    return truth, origin, positions


def test_a_curve_below_threshold_from_the_first_ring_is_not_resolved() -> None:
    truth, origin, positions = _truth()
    # contrast reversed: the FRC is −1 at every ring; the crossing used to be extrapolated from
    # the DC ring into a finite "resolution" (or ~1e16 m when interpolated towards q = 0)
    reversed_contrast = np.abs(truth) * np.exp(1j * (2 * ICE_PHASE - np.angle(truth)))
    ev = evaluate_against_truth(reversed_contrast, origin, truth, origin, PIXEL, positions, register=False)
    assert ev.phase_correlation < -0.99
    for key, value in ev.resolutions.items():
        assert np.isinf(value), (key, value)
    same = evaluate_against_truth(truth, origin, truth, origin, PIXEL, positions, register=False)
    assert same.resolutions["particle/raw/1-bit"] == pytest.approx(2 * PIXEL)


def test_ideal_phase_image_is_unbiased_with_the_shot_noise_of_the_surviving_electrons() -> None:
    truth, _origin, _pos = _truth((256, 256))
    dose = 50.0
    phase_truth = np.angle(truth) - ICE_PHASE
    estimates = np.stack([ideal_phase_image(truth, dose, PIXEL, np.random.default_rng(s)) for s in range(8)])
    err = estimates - (phase_truth - phase_truth.mean())
    electrons = dose * (PIXEL * 1e10) ** 2 * ICE_AMPLITUDE**2
    # Poisson(N(1 + 2φ)) / 2N has variance (1 + 2φ) / 4N ≈ 1/4N for a weak phase
    assert abs(err.mean()) < 0.01
    assert err.var() == pytest.approx((1 + 2 * phase_truth.mean()) / (4 * electrons), rel=0.05)
    with pytest.raises(ValueError, match="dose"):
        ideal_phase_image(truth, 0.0, PIXEL, np.random.default_rng(0))


def test_quantum_limit_improves_with_dose() -> None:
    truth, origin, positions = _truth()
    low = quantum_limit(truth, origin, PIXEL, positions, dose=2.0, seed=1)
    high = quantum_limit(truth, origin, PIXEL, positions, dose=500.0, seed=1)
    assert high.phase_correlation > 0.9 > low.phase_correlation
    key = "particle/pooled/1/2-bit"
    assert high.resolutions[key] < low.resolutions[key]


def test_demo_fixes_the_known_probe_and_reports_the_dose_limit() -> None:
    from cryoptycho.daemon.commands.demo import command, summary_lines

    refine = next(p for p in command.params if p.name == "refine_probe")
    assert refine.default is False
    ours = {"particle/raw/1-bit": 2.86e-9, "particle/pooled/1-bit": 2.0e-9}
    ideal = {"particle/raw/1-bit": 1.5e-9, "particle/pooled/1-bit": float("inf")}
    report = {
        "resolutions_m": ours,
        "phase_correlation": 0.377,
        "quantum_limit": {"resolutions_m": ideal, "phase_correlation": 0.51},
        "live_half_set_resolution_m": None,
    }
    text = "\n".join(summary_lines(report, "hemoglobin", 20.0))
    assert "28.6 Å raw rings, 20.0 Å pooled; phase correlation 0.38" in text
    assert "15.0 Å raw, not resolved pooled; phase correlation 0.51" in text
    assert "half-set" not in text
