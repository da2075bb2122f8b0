"""The scan matrix from the parallax fit (gpu/parallax.py, ``estimate_aberrations(scan=True)``):
with a speckle (randomized phase-plate) probe the bright-field model's columns Ψ*(k)Ψ(k − A⁻ᵀq)
depend on the scan's 2×2 matrix A, so the fit recovers a known A from the data alone; it leaves
an undistorted scan at the nominal one (the χ² gate does not apply it); and a reconstruction
with ``parallax_scan`` runs at the corrected positions and records the estimate. The counts
here (2,000 per pattern on a 0.2 rad object, a thin object at 2,000 e⁻/Å² through the console)
are far above cryo doses, where the fit's errors are as large as the scan's
(gpu/MEASUREMENTS.md, "The scan matrix from the parallax fit")."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryoptycho.gpu import operators
from cryoptycho.gpu.data import ProbeModel, PtychoData
from cryoptycho.gpu.geometry import fit_geometry
from cryoptycho.gpu.parallax import BrightFieldModel, estimate_aberrations
from cryoptycho.gpu.probes import make_probe
from cryoptycho.gpu.reconstruct import prepare
from engine_helpers import ENERGY, PIXEL

M = 32
SEMIANGLE = 7e-3
PHASE_RMS = 0.2  #: rad, the white-noise object's phase
#: A − I of the distorted scans below, row-major on (y, x): 4 % / −3 % scale, shear and rotation
DISTORTION = np.array([[0.04, 0.02], [-0.01, -0.03]])


def _nominal(xp=np) -> object:
    return make_probe("randomized", (M, M), PIXEL, ENERGY, SEMIANGLE, precision="double", seed=3, xp=xp)


def _dataset(counts: float | None, distortion: np.ndarray, seed: int = 0, grid: int = 24) -> PtychoData:
    """Frames recorded with the nominal speckle probe at the nominal raster (3-pixel steps)
    mapped through I + ``distortion`` about its centre; noiseless when ``counts`` is None, else
    Poisson at ``counts`` per pattern. The dataset gives the nominal positions and probe model.

    The object is white phase noise (PHASE_RMS rad rms): the model treats the object spectrum
    as constant across the scan's frequency resolution 1/L, and an object whose spectrum falls
    steeply there (smooth blobs) biases the matrix by ~1–2 % at this scan size (L ≈ 2 probe
    windows; gpu/MEASUREMENTS.md, "The scan matrix from the parallax fit")."""
    rng = np.random.default_rng(seed)
    probe = _nominal() * np.sqrt(1e4 if counts is None else counts)
    iy, ix = np.mgrid[0:grid, 0:grid]
    nominal = np.stack([iy.ravel(), ix.ravel()], axis=1) * 3.0 * PIXEL
    centre = nominal.mean(axis=0)
    true = (nominal - centre) @ (np.eye(2) + distortion).T + centre
    geometry = fit_geometry(np.concatenate([nominal, true]), PIXEL, (M, M))
    truth = np.exp(1j * PHASE_RMS * rng.standard_normal(geometry.object_shape))
    batch = operators.make_batch(geometry.to_pixels(true), geometry.object_shape, (M, M))
    inten = np.abs(operators.forward(truth, probe, batch)) ** 2
    frames = inten.astype(np.float32) if counts is None else rng.poisson(inten).astype(np.uint16)
    return PtychoData(
        frames=operators.from_fft_order(frames), positions=nominal, energy=ENERGY, pixel_size=PIXEL,
        probe_model=ProbeModel(kind="randomized", semiangle=SEMIANGLE, seed=3),
        truth_object=truth.astype(np.complex64), truth_probe=probe.astype(np.complex64),
        truth_origin=geometry.origin, truth_positions=true,
    )


def test_off_grid_spectrum_matches_the_direct_sum() -> None:
    """The model's Ψ off the padded grid (a centred second-order expansion) against the direct
    Fourier sum of the probe, at shifts of a 5 % scan error."""
    data = _dataset(None, np.zeros((2, 2)), grid=10)
    psi = _nominal()
    model = BrightFieldModel(data.frames, data.positions, psi, PIXEL, ENERGY)
    big = model.oversample * M
    shift = model.qi @ (np.linalg.inv(np.eye(2) + DISTORTION) - np.eye(2))
    padded = np.zeros((big, big), complex)
    spectra = []
    for w in [np.ones((M, M))] + list(model.moments):
        padded[:M, :M] = psi * w
        spectra.append(np.fft.fft2(padded).ravel())
    approx = model._off_grid(spectra[0], spectra[1:], model.at_minus, -shift)
    ry, rx = np.indices((M, M))
    rng = np.random.default_rng(0)
    scale = np.abs(spectra[0]).max()
    for iq, ik in zip(rng.integers(len(model.qi), size=30), rng.integers(model.n_pixels, size=30)):
        uy, ux = divmod(int(model.at_minus[iq, ik]), big)
        u = np.array([uy, ux], float) - shift[iq]
        exact = (psi * np.exp(-2j * np.pi * (u[0] * ry + u[1] * rx) / big)).sum()
        assert abs(approx[iq, ik] - exact) < 0.02 * scale


def test_noiseless_recovers_the_scan_matrix() -> None:
    """Expected intensities: each entry of A − I within 1 % (the model's bias at this scan
    size, ≤ 0.7 % here) of a 4 % / −3 % scale, 2 % / −1 % off-diagonal distortion."""
    data = _dataset(None, DISTORTION)
    fit = estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, names=("C10",),
                               scan=True, scan_prior_rms=0.2)
    found = np.array(fit.scan_matrix).reshape(2, 2)
    assert np.abs(found - DISTORTION).max() < 0.01, found
    assert abs(fit.coefficients["C10"]) < 2e-9, fit.coefficients
    assert fit.scan_rejects_nominal(0.95)


def test_counting_noise_recovers_the_scan_matrix_and_the_gate_applies_it() -> None:
    """Poisson counts (2,000 per pattern, 576 patterns): every entry within 3 standard errors
    plus the model's bias and within 1.5 % of the truth (the nominal scan is 4 % off), and the
    data reject the nominal scan."""
    data = _dataset(2e3, DISTORTION, seed=1)
    fit = estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, names=("C10",),
                               scan=True)
    found = np.array(fit.scan_matrix)
    se = np.array(fit.scan_standard_error)
    err = np.abs(found - DISTORTION.ravel())
    assert (err < 3 * se + 0.007).all() and err.max() < 0.015, (found, se)
    assert (se > 0).all() and (se < 0.015).all(), se
    assert fit.scan_rejects_nominal(0.95), fit.scan_significance
    moved = fit.scan_positions(data.positions)
    centre = data.positions.mean(axis=0)
    np.testing.assert_allclose(moved - centre, (data.positions - centre) @ (np.eye(2) + found.reshape(2, 2)).T)


def test_undistorted_scan_is_left_alone() -> None:
    """The same counts on the nominal scan: the fit stays within 2 % of it and the χ² gate
    does not reject it."""
    data = _dataset(2e3, np.zeros((2, 2)), seed=2)
    fit = estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, names=("C10",),
                               scan=True)
    assert np.abs(fit.scan_matrix).max() < 0.02, fit.scan_matrix
    assert not fit.scan_rejects_nominal(0.95), fit.scan_significance
    record = fit.scan_record(False, 0.95)
    assert record["parallax_scan_applied"] == 0
    assert record["parallax_scan_significance"] < record["parallax_scan_threshold"]


def test_without_scan_the_fit_has_no_scan_matrix() -> None:
    data = _dataset(2e3, DISTORTION, seed=1, grid=12)
    fit = estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, names=("C10",))
    assert fit.scan_matrix is None and fit.scan_record(False) == {}
    assert not fit.scan_rejects_nominal(0.0)
    np.testing.assert_array_equal(fit.scan_positions(data.positions), data.positions)


def test_prepare_moves_the_positions_only_when_asked_and_significant() -> None:
    """``parallax_scan`` through ``prepare``: the distorted scan's positions are the nominal
    ones through the fitted matrix, kept beside them, and the estimate is in the record; off
    (the default), the positions are the dataset's."""
    data = _dataset(2e3, DISTORTION, seed=1)
    on = prepare(data, {"iterations": 1, "parallax_scan": True, "init": "ones"})
    estimate = on.probe_estimate
    found = np.array([estimate[f"parallax_scan_{k}"] for k in ("yy", "yx", "xy", "xx")])
    assert np.abs(found - DISTORTION.ravel()).max() < 0.015, found
    assert estimate["parallax_scan_applied"] == 1
    np.testing.assert_array_equal(on.nominal_positions, data.positions)
    centre = data.positions.mean(axis=0)
    np.testing.assert_allclose(on.positions - centre,
                               (data.positions - centre) @ (np.eye(2) + found.reshape(2, 2)).T)
    off = prepare(data, {"iterations": 1, "init": "ones"})
    assert off.nominal_positions is None
    np.testing.assert_array_equal(off.positions, data.positions)
    assert not any(k.startswith("parallax_scan") for k in off.probe_estimate)


def test_bad_scan_prior_is_refused() -> None:
    data = _dataset(2e3, DISTORTION, seed=1, grid=12)
    with pytest.raises(ValueError, match="scan_prior_rms"):
        estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, names=("C10",),
                             scan=True, scan_prior_rms=0.0)


def test_cli_simulate_realistic_then_reconstruct_records_and_applies_the_scan_fit(tmp_path) -> None:
    """Through the console scripts: ``simulate --realistic`` with a 4 % / −3 % scan scale error
    (plus the preset's drift and jitter; a thin object at a high dose, so the fit is sharp) →
    ``reconstruct --set parallax_scan=true``: the result file holds the four entries, their
    standard errors, the significance against its threshold and whether it was applied; the
    positions used are the nominal ones through the recorded matrix, closer to the true ones
    than the nominal positions; the nominal positions are kept beside them."""
    import subprocess

    import h5py
    from cryoptycho.daemon.storage.dataset import read_dataset
    from cryoptycho.daemon.storage.result import read_result

    def cli(*args: str) -> None:
        out = subprocess.run(["cryoptycho", *args], capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr

    ds, res = tmp_path / "real.h5", tmp_path / "res.h5"
    cli("simulate", "--realistic", "--frame-size", "32", "--detector", "ideal", "--thin", "--dose", "2000",
        "--scan-scale", "4", "-3", "--scan-rotation", "0", "--scan-shear", "0", "-o", str(ds))
    cli("reconstruct", str(ds), "-o", str(res), "-n", "1", "--no-export", "-q", "--set", "parallax_scan=true")
    with h5py.File(res) as f:
        extra = dict(f["extra"].attrs)
    keys = ("yy", "yx", "xy", "xx")
    found = np.array([extra[f"parallax_scan_{k}"] for k in keys])
    assert all(extra[f"parallax_scan_{k}_se"] > 0 for k in keys)
    assert extra["parallax_scan_significance"] > extra["parallax_scan_threshold"] > 0
    assert extra["parallax_scan_applied"] == 1
    data = read_dataset(ds)
    state = read_result(res).state
    nominal, true = np.asarray(data.positions), np.asarray(data.truth_positions)
    np.testing.assert_allclose(state.nominal_positions, nominal)
    used = np.asarray(state.positions)
    centre = nominal.mean(axis=0)
    np.testing.assert_allclose(used - centre, (nominal - centre) @ (np.eye(2) + found.reshape(2, 2)).T,
                               atol=1e-14)

    def rms_from_truth(p: np.ndarray) -> float:
        return float(np.sqrt((((p - p.mean(axis=0)) - (true - true.mean(axis=0))) ** 2).sum(axis=1).mean()))

    assert rms_from_truth(used) < 0.7 * rms_from_truth(nominal)
    assert state.probe_estimate["parallax_scan_yy"] == pytest.approx(found[0])


def test_parallax_scan_without_a_parallax_fit_says_so(caplog) -> None:
    """A measured probe (no probe model: "auto" does not fit) with ``parallax_scan``: the
    positions stay the dataset's and a warning names why."""
    data = dataclasses.replace(_dataset(2e3, DISTORTION, seed=1, grid=12), probe=_nominal(), probe_model=None)
    with caplog.at_level("WARNING", logger="cryoptycho.gpu.reconstruct"):
        problem = prepare(data, {"iterations": 1, "parallax_scan": True, "init": "ones"})
    assert "parallax_scan: the parallax fit does not run" in caplog.text
    assert problem.nominal_positions is None
    np.testing.assert_array_equal(problem.positions, data.positions)


def test_frequency_reach_and_subset() -> None:
    """``nyquist_fraction`` widens the object frequencies used past the step's Nyquist (for
    non-lattice scans), ``max_frequencies`` keeps a fixed subset of them: the same one on every
    call, so a fit is reproducible."""
    data = _dataset(2e3, np.zeros((2, 2)), seed=1, grid=12)

    def model(**kw: float) -> BrightFieldModel:
        return BrightFieldModel(data.frames, data.positions, _nominal(), PIXEL, ENERGY, **kw)

    base, wide = model(), model(nyquist_fraction=1.8)
    assert len(wide.q) > 3 * len(base.q)
    assert np.hypot(*wide.q.T).max() > 1.5 * np.hypot(*base.q.T).max()
    sub, again = model(nyquist_fraction=1.8, max_frequencies=100), model(nyquist_fraction=1.8, max_frequencies=100)
    assert len(sub.q) == 100
    np.testing.assert_array_equal(sub.q, again.q)
    assert {tuple(v) for v in sub.q} <= {tuple(v) for v in wide.q}


def test_parallax_reach_sets_the_fits_frequencies(monkeypatch) -> None:
    """``parallax_reach`` is the fit's ``nyquist_fraction`` (offline), and out-of-range values
    are refused by name."""
    from cryoptycho.gpu import reconstruct
    from cryoptycho.gpu.options import ReconOptions

    seen: list[float] = []

    def spy(*args: object, **kw: object) -> object:
        seen.append(kw["nyquist_fraction"])
        return estimate_aberrations(*args, **kw)

    monkeypatch.setattr(reconstruct, "estimate_aberrations", spy)
    data = _dataset(2e3, np.zeros((2, 2)), seed=1, grid=12)
    # one fit each (parallax_wide_reach, the second fit where the first finds nothing, is
    # tests/test_parallax_gate.py's)
    prepare(data, {"iterations": 1, "init": "ones", "parallax_reach": 1.5, "parallax_wide_reach": None})
    prepare(data, {"iterations": 1, "init": "ones", "parallax_wide_reach": None})
    assert seen == [1.5, 0.9]
    with pytest.raises(ValueError, match="parallax_reach"):
        ReconOptions.from_dict({"parallax_reach": 0})
