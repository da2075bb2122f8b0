"""The parallax fit's gate (gpu/parallax.py, "The gate"): with the nominal probe exactly right and
the scan jittered by the realistic preset's 0.3 Å, at a high dose and without counting noise,
the gate stays shut — the significance from the score's curvature alone fired here (χ² 7–240
against the 7.81 threshold), since the jitter-scattered signal and the noise × noise scatter of
the score are not in the curvature — while a probe error of the preset's size (20 nm defocus,
10 nm two-fold astigmatism) still opens it."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.gpu import operators
from cryoptycho.gpu.parallax import estimate_aberrations
from cryoptycho.gpu.probes import aberrate, make_probe
from engine_helpers import ENERGY, PIXEL, fit_geometry, weak_phase_object

M = 32
#: the realistic preset's probe error (ExperimentErrors.realistic: 20 nm, |C12| 10 nm at 30°)
PRESET_ERROR = {"C10": 20e-9, "C12a": 10e-9 * np.cos(np.deg2rad(60.0)), "C12b": 10e-9 * np.sin(np.deg2rad(60.0))}
CONFIDENCE = 0.95  # ReconOptions.parallax_confidence


def _jittered_scan(counts: float | None, errors: dict[str, float], seed: int, jitter_m: float = 0.3e-10,
                   grid: int = 12):
    """Frames of a weak phase object on a 12 × 12 raster of 3 Å steps whose every position is off
    by Gaussian jitter (rms ``jitter_m`` per axis), recorded with the nominal probe aberrated by
    ``errors``; Poisson at ``counts`` per pattern, or the expected intensities (None). Returns
    the frames (detector order), the nominal positions and the nominal probe."""
    rng = np.random.default_rng(seed)
    nominal = make_probe("defocused", (M, M), PIXEL, ENERGY, 8e-3, 60e-9, precision="double",
                         total_intensity=counts or 1e5)
    iy, ix = np.mgrid[0:grid, 0:grid]
    positions = np.stack([iy.ravel(), ix.ravel()], axis=1) * 3.0 * PIXEL
    true_positions = positions + rng.normal(0.0, jitter_m, positions.shape)
    geometry = fit_geometry(true_positions, PIXEL, (M, M))
    obj = weak_phase_object(geometry.object_shape, 7, peak=0.5)
    batch = operators.make_batch(geometry.to_pixels(true_positions), geometry.object_shape, (M, M))
    inten = np.abs(operators.forward(obj, aberrate(nominal, PIXEL, ENERGY, errors), batch)) ** 2
    frames = inten if counts is None else rng.poisson(inten).astype(np.float64)
    return operators.from_fft_order(frames), positions, nominal


@pytest.mark.parametrize("counts, seed", [(1e5, 0), (1e5, 2), (None, 0)])
def test_jitter_alone_keeps_the_gate_shut_and_a_preset_probe_error_opens_it(counts, seed) -> None:
    frames, positions, nominal = _jittered_scan(counts, {}, seed)
    right = estimate_aberrations(frames, positions, nominal, PIXEL, ENERGY)
    assert not right.rejects_nominal(CONFIDENCE), (right.significance, right.coefficients)

    frames, positions, nominal = _jittered_scan(counts, PRESET_ERROR, seed)
    wrong = estimate_aberrations(frames, positions, nominal, PIXEL, ENERGY)
    assert wrong.rejects_nominal(CONFIDENCE), (wrong.significance, wrong.coefficients)
    assert abs(wrong.coefficients["C10"] - PRESET_ERROR["C10"]) < 3e-9, wrong.coefficients


def test_the_gate_is_no_looser_than_the_curvature_where_the_noise_is_counting_noise() -> None:
    """Without jitter, at a dose where counting noise dominates (10³ counts a pattern), the
    gate's χ² stays within the curvature's order: the sandwich adds the noise × noise scatter,
    it does not discard the curvature's information (a real error is still found)."""
    frames, positions, nominal = _jittered_scan(1e3, PRESET_ERROR, 3, jitter_m=0.0)
    fit = estimate_aberrations(frames, positions, nominal, PIXEL, ENERGY)
    assert fit.rejects_nominal(CONFIDENCE), (fit.significance, fit.curvature_significance)
    assert fit.significance <= fit.curvature_significance * 1.5, (fit.significance, fit.curvature_significance)


def test_noise_draws_must_be_positive() -> None:
    frames, positions, nominal = _jittered_scan(None, {}, 0)
    with pytest.raises(ValueError, match="noise_draws"):
        estimate_aberrations(frames, positions, nominal, PIXEL, ENERGY, noise_draws=0)


def _fake_fits(monkeypatch, significance_at: dict[float, float]) -> list[float]:
    """Replace the fit reconstruct.prepare calls by one whose χ² depends on the reach asked
    for (the real fit's record, 5 nm of defocus found); returns the reaches asked, in order."""
    import cryoptycho.gpu.reconstruct as reconstruct_module
    from cryoptycho.gpu.parallax import ParallaxFit

    asked: list[float] = []

    def fake(*args, nyquist_fraction: float, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(nyquist_fraction)
        return ParallaxFit(coefficients={"C10": 5e-9, "C12a": 0.0, "C12b": 0.0},
                           standard_error={"C10": 1e-9, "C12a": 1e-9, "C12b": 1e-9},
                           significance=significance_at[nyquist_fraction])

    monkeypatch.setattr(reconstruct_module, "estimate_aberrations", fake)
    return asked


@pytest.mark.parametrize("first, wide, asked, applied_reach", [
    (20.0, 20.0, [0.9], 0.9),  # the first fit is decisive (χ² above 16.27, 99.9 %): no second fit
    (1.0, 20.0, [0.9, 1.8], 1.8),  # the first does not tell, the wide one does: the wide one applies
    (1.0, 2.0, [0.9, 1.8], None),  # neither: the nominal probe is kept
    # significant at 95 % but not decisive: the wide fit's test decides (two 95 % gates in a row
    # opened on 17 of 82 synthetic scans with the probe right); the first's estimate applies
    # where the wide fit confirms it, none where it does not
    (10.0, 20.0, [0.9, 1.8], 0.9),
    (10.0, 2.0, [0.9, 1.8], None),
])
def test_the_wide_reach_is_fitted_only_where_the_first_fit_finds_nothing(monkeypatch, first, wide, asked,
                                                                         applied_reach) -> None:
    from cryoptycho.gpu.reconstruct import prepare
    from engine_helpers import aberrated_dataset

    data = aberrated_dataset(1e4, {}, 0, 10)
    calls = _fake_fits(monkeypatch, {0.9: first, 1.8: wide})
    problem = prepare(data, {"iterations": 1, "parallax_wide_reach": 1.8})
    assert calls == asked
    record = problem.probe_estimate
    assert record["parallax_applied"] == (applied_reach is not None)
    if applied_reach is not None:
        assert record["parallax_reach"] == applied_reach
        assert record["parallax_significance"] == (first if applied_reach == 0.9 else wide)
    else:  # the first fit's record, and what the wide one found
        assert record["parallax_reach"] == 0.9 and record["parallax_wide_significance"] == wide
    calls.clear()
    prepare(data, {"iterations": 1, "parallax_wide_reach": None})  # None: one fit, at parallax_reach
    assert calls == [0.9]
    calls.clear()
    prepare(data, {"iterations": 1, "parallax_scan": True})  # the joint scan fit is made once
    assert calls == [0.9]
    calls.clear()
    # under a time budget (`reconstruct --time-budget`): the wide fit's minutes on a large scan
    # came before the budget's clock started, past what the budget promises
    prepare(data, {"iterations": 1, "time_budget_s": 2.0})
    assert calls == [0.9]


def test_no_wide_fit_on_a_scan_barely_wider_than_the_probe(caplog) -> None:
    """A 6 × 6 raster of 3 Å steps (15 Å) under a probe about 9 Å wide (8 × 8 frames, 60 nm of
    defocus at 8 mrad): the Fourier sum over so small a scan mixes object frequencies across
    which the probe's transfer turns, and the wide fit applied 47–48 nm for a 20 nm defocus
    error with χ² 40–95 (seeds 0 and 2 at 10⁴ counts; noiseless its score peaks at 50 nm, the
    first fit's at 20). The wide fit is not made there (logged with the widths); the first
    fit's gate decides alone. A 10 × 10 scan (27 Å) of the same frames is wide enough."""
    from cryoptycho.gpu.parallax import MAX_PROBE_TO_SCAN, probe_width, scan_width
    from cryoptycho.gpu.reconstruct import prepare
    from engine_helpers import aberrated_dataset

    data = aberrated_dataset(1e4, {"C10": 20e-9}, 0, 6, m=8)
    nominal = make_probe("defocused", (8, 8), PIXEL, ENERGY, 8e-3, 60e-9, precision="double")
    assert probe_width(nominal, PIXEL) > MAX_PROBE_TO_SCAN * scan_width(data.positions)
    with caplog.at_level("WARNING", logger="cryoptycho"):
        problem = prepare(data, {"iterations": 1})
    assert "no wide fit" in caplog.text and "15.0 Å" in caplog.text
    record = problem.probe_estimate
    assert record["parallax_reach"] == 0.9 and "parallax_wide_significance" not in record, record
    if record["parallax_applied"]:  # (what the first fit applies is near the truth, never the 47 nm)
        assert abs(record["parallax_C10_m"] - 20e-9) < 5e-9, record

    wider = aberrated_dataset(1e4, {"C10": 20e-9}, 0, 10, m=8)
    assert probe_width(nominal, PIXEL) <= MAX_PROBE_TO_SCAN * scan_width(wider.positions)


def _null_scan_at_low_counts():
    """Seed 210 of tests/measure/parallax_fwer_measure.py: 10³ counts a pattern (~1 count a
    bright-field pixel), no jitter, the nominal probe exactly right — a scan on which the χ²
    gate opens (14.5 at reach 0.9; MEASUREMENTS.md, "The search's null")."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "measure"))
    try:
        from parallax_fwer_measure import scan
    finally:
        sys.path.pop(0)
    frames, positions, nominal, counts, jitter = scan(210)
    assert counts == 1e3 and jitter == 0.0
    return frames, positions, nominal


def test_the_search_null_keeps_a_low_count_noise_peak_shut() -> None:
    """The sandwich is measured at the estimate, where a noise peak is more sharply curved than
    the truth, so at ~1 count a bright-field pixel the χ² gate opens on a scan whose probe is
    right. Refitted null surrogates find such peaks as significant: the first already is
    (18.4 against 14.5), so the draws stop there (p = 2/2) and the null stands."""
    frames, positions, nominal = _null_scan_at_low_counts()
    fit = estimate_aberrations(frames, positions, nominal, PIXEL, ENERGY, null_draws=19)
    assert fit.rejects_nominal(CONFIDENCE), fit.significance  # what the χ² gate alone would apply
    assert fit.null_p_value == 1.0 and not fit.passes_null(CONFIDENCE), fit.null_p_value
    assert fit.record(False, len(positions))["parallax_null_p_value"] == fit.null_p_value


def test_the_search_null_keeps_a_preset_probe_error() -> None:
    """The preset's probe error at 10⁵ counts (χ² ≈ 1,100): no refitted null surrogate comes
    near, so p = 1/(B + 1) (B = 4 at 80 % to keep the test quick; the default's 19 at 95 % asks
    the same of each draw)."""
    frames, positions, nominal = _jittered_scan(1e5, PRESET_ERROR, 0)
    fit = estimate_aberrations(frames, positions, nominal, PIXEL, ENERGY, null_draws=4, null_confidence=0.8)
    assert fit.null_p_value == pytest.approx(1 / 5) and fit.passes_null(0.8), fit.null_p_value
    assert abs(fit.coefficients["C10"] - PRESET_ERROR["C10"]) < 3e-9, fit.coefficients


def test_null_draws_must_not_be_negative() -> None:
    frames, positions, nominal = _jittered_scan(None, {}, 0)
    with pytest.raises(ValueError, match="null_draws"):
        estimate_aberrations(frames, positions, nominal, PIXEL, ENERGY, null_draws=-1)


@pytest.mark.parametrize("null_p, applied", [(None, True), (0.05, True), (0.1, False), (1.0, False)])
def test_the_gate_applies_a_fit_only_where_the_search_null_rejects(monkeypatch, null_p, applied) -> None:
    """reconstruct.prepare passes ``parallax_null_draws`` to the fit (offline, no time budget)
    and applies a χ²-significant fit only where its null p-value is within α; a decisive first
    fit whose null stands is not decisive (the wide fit is made)."""
    import cryoptycho.gpu.reconstruct as reconstruct_module
    from cryoptycho.gpu.parallax import ParallaxFit
    from cryoptycho.gpu.reconstruct import prepare
    from engine_helpers import aberrated_dataset

    asked: list[tuple[float, int]] = []

    def fake(*args, nyquist_fraction: float, null_draws: int = 0, **kwargs):  # type: ignore[no-untyped-def]
        asked.append((nyquist_fraction, null_draws))
        return ParallaxFit(coefficients={"C10": 5e-9, "C12a": 0.0, "C12b": 0.0},
                           standard_error={"C10": 1e-9, "C12a": 1e-9, "C12b": 1e-9},
                           significance=20.0, null_p_value=null_p)

    monkeypatch.setattr(reconstruct_module, "estimate_aberrations", fake)
    data = aberrated_dataset(1e4, {}, 0, 10)
    record = prepare(data, {"iterations": 1, "parallax_null_draws": 19}).probe_estimate
    assert record["parallax_applied"] == applied, record
    assert asked == ([(0.9, 19)] if applied else [(0.9, 19), (1.8, 19)])
    asked.clear()
    prepare(data, {"iterations": 1, "parallax_null_draws": 19, "time_budget_s": 2.0})
    assert asked == [(0.9, 0)]  # under a time budget no surrogate is refitted
