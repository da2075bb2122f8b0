"""The alias-aware parallax fit (gpu/parallax.py, ``estimate_aberrations(aliases=True)``): on a
raster the Fourier sum over the scan at q holds the object at every alias q + G (G a reciprocal
lattice vector), so the fit models each frequency of one reciprocal cell with all its aliases in
one least squares. Checked here: its columns are the probe's spectrum at every alias (and, with
a scan matrix, at A⁻ᵀ(q + G)); inside the step's Nyquist frequency it is the plain fit; every
count combination is used once; noiseless it recovers a known defocus and astigmatism; and with
the nominal probe right it does not apply a correction (its χ² gate stays shut)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryoptycho.gpu.backend import ifft2
from cryoptycho.gpu.geometry import wavelength
from cryoptycho.gpu.parallax import BrightFieldModel, _scan_lattice, estimate_aberrations
from cryoptycho.gpu.probes import make_probe
from engine_helpers import ENERGY, PIXEL, aberrated_dataset
from test_parallax_scan import DISTORTION
from test_parallax_scan import _dataset as speckle_dataset
from test_parallax_scan import _nominal as speckle_probe


def _direct(psi: np.ndarray, f: np.ndarray) -> complex:
    """Ψ at the frequency ``f`` (1/m, (y, x)) as the direct Fourier sum over the probe window,
    with the padded spectrum's scale (unitary FFT of the M × M window)."""
    m = psi.shape[0]
    ry, rx = np.indices(psi.shape) * PIXEL
    return complex((psi * np.exp(-2j * np.pi * (f[0] * ry + f[1] * rx))).sum() / m)


@pytest.mark.parametrize("scan", [None, DISTORTION / 2])
def test_alias_columns_are_the_probe_spectrum_at_every_alias(scan) -> None:
    """Ψ(k − q − G) and Ψ(k + q + G) as the model gathers them (exact FFTs of the ramped probe;
    with the scan matrix, a second-order expansion to A⁻ᵀ(q + G)) against direct sums. The scan
    error here is 2 % / −1.5 % scale, 1 % / −0.5 % off-diagonal (the realistic preset's size):
    past Nyquist the shifts are twice those inside it, and the expansion's error grows as their
    cube."""
    data = speckle_dataset(None, np.zeros((2, 2)), grid=10)
    model = BrightFieldModel(data.frames, data.positions, speckle_probe(), PIXEL, ENERGY, names=("C10",),
                             aliases=True, nyquist_fraction=1.8)
    assert model.alias_vectors.shape[0] > 1 and (model.aliases > 0).any()  # past Nyquist: aliases
    m, big = model.m, model.oversample * model.m
    psi = ifft2(model.spectrum)
    spacing = 1.0 / (big * PIXEL)
    captured = {}
    original = model._off_grid

    def capture(spec, derivs, at, shift):  # the expansion's output, for the comparison below
        out = original(spec, derivs, at, shift)
        captured[id(at)] = out
        return out

    model._off_grid = capture
    stack = []
    for ramp in model.alias_ramps:
        padded = np.zeros((big, big), complex)
        padded[:m, :m] = psi * ramp
        stack.append(np.fft.fft2(padded, norm="ortho").ravel())
    stack = np.concatenate(stack + [np.zeros(1)])
    if scan is not None:
        model.projected(np.zeros(1), scan)
    a_inv_t = np.linalg.inv(np.eye(2) + (np.zeros((2, 2)) if scan is None else scan)).T
    ny, nx = np.divmod(model.index, m)
    k = np.stack([np.where(ny >= m // 2, ny - m, ny), np.where(nx >= m // 2, nx - m, nx)], axis=1) / (m * PIXEL)
    scale = np.abs(model.spectrum).max()
    rng = np.random.default_rng(0)
    checked = 0
    for i, a, j in zip(rng.integers(len(model.qi), size=200), rng.integers(model.aliases.shape[1], size=200),
                       rng.integers(model.n_pixels, size=200)):
        g = model.aliases[i, a]
        if g < 0:
            assert stack[model.alias_minus[i, a, j]] == 0 and stack[model.alias_plus[i, a, j]] == 0
            continue
        q = a_inv_t @ (model.qi[i] * spacing + model.alias_vectors[g])  # the object frequency
        if scan is None:
            minus, plus = stack[model.alias_minus[i, a, j]], stack[model.alias_plus[i, a, j]]
            tol = 1e-9 * scale
        else:
            minus = captured[id(model.alias_minus)][i, a, j]
            plus = captured[id(model.alias_plus)][i, a, j]
            tol = 0.02 * scale  # as test_parallax_scan's inside Nyquist at a 5 % scan error
        assert abs(minus - _direct(psi, k[j] - q)) < tol
        assert abs(plus - _direct(psi, k[j] + q)) < tol
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("scan", [None, DISTORTION])
def test_inside_nyquist_the_alias_aware_fit_is_the_plain_fit(scan) -> None:
    """Up to 0.9 × the step's Nyquist no frequency has an alias inside the reach: the same
    frequencies, the same projected energy per frequency."""
    data = speckle_dataset(None, np.zeros((2, 2)), grid=10)
    plain, aware = (BrightFieldModel(data.frames, data.positions, speckle_probe(), PIXEL, ENERGY, names=("C10",),
                                     aliases=al) for al in (False, True))
    assert aware.aliases.shape[1] == 1
    order_p, order_a = np.lexsort(plain.qi.T), np.lexsort(aware.qi.T)
    np.testing.assert_array_equal(plain.qi[order_p], aware.qi[order_a])
    np.testing.assert_allclose(aware.projected(np.array([3e-9]), scan)[order_a],
                               plain.projected(np.array([3e-9]), scan)[order_p], rtol=1e-6)  # the ridge: 1e-9


def test_every_count_combination_is_used_once() -> None:
    """The rows lie in one reciprocal cell of the lattice and no two are aliases of each other
    (or of each other's conjugate), where the plain fit at reach 1.8 takes frequencies from
    outside the cell (whose counts are those of an alias inside it); and every alias inside the
    reach is a column of its row."""
    data = speckle_dataset(None, np.zeros((2, 2)), grid=10)
    lattice = _scan_lattice(data.positions - data.positions.mean(axis=0))
    np.testing.assert_allclose(np.abs(lattice), 3 * PIXEL * np.eye(2)[::-1] if lattice[0, 0] == 0 else
                               3 * PIXEL * np.eye(2), atol=1e-15)

    def reused(q: np.ndarray) -> int:
        frac = q @ lattice.T  # integer ⇔ q is a lattice vector of the reciprocal lattice
        pairs = 0
        for sign in (1, -1):
            d = frac[:, None, :] - sign * frac[None, :, :]
            same = (np.abs(d - np.round(d)) < 1e-6).all(axis=2)
            pairs += int(same.sum()) - (len(q) if sign == 1 else 0)
        return pairs

    kw = {"names": ("C10",), "nyquist_fraction": 1.8}
    aware = BrightFieldModel(data.frames, data.positions, speckle_probe(), PIXEL, ENERGY, aliases=True, **kw)
    plain = BrightFieldModel(data.frames, data.positions, speckle_probe(), PIXEL, ENERGY, **kw)
    assert reused(aware.q) == 0
    assert (np.abs(aware.q @ lattice.T) < 0.5).all()
    assert (np.abs(plain.q @ lattice.T) > 0.5).any(axis=1).mean() > 0.5
    for i in range(len(aware.q)):
        slots = aware.aliases[i][aware.aliases[i] >= 0]
        inside = [g for g, v in enumerate(aware.alias_vectors)
                  if np.hypot(*(aware.q[i] + v)) <= aware.top * (1 + 1e-9)]
        assert sorted(slots.tolist()) == inside


def test_a_scan_that_is_no_lattice_is_refused() -> None:
    data = speckle_dataset(None, np.zeros((2, 2)), grid=10)
    jittered = data.positions + np.random.default_rng(0).normal(scale=0.1 * PIXEL, size=data.positions.shape)
    with pytest.raises(ValueError, match="raster"):
        BrightFieldModel(data.frames, jittered, speckle_probe(), PIXEL, ENERGY, aliases=True)


def test_parallax_aliases_reaches_the_fit_of_a_reconstruction(caplog) -> None:
    """``parallax_aliases`` through ``prepare``: on the raster the fit runs (its record is in
    the probe estimate); on jittered nominal positions (no lattice) "auto" skips the fit with a
    warning that names why, and the nominal probe is used."""
    from cryoptycho.gpu.reconstruct import prepare

    data = speckle_dataset(2e3, np.zeros((2, 2)), seed=1, grid=10)
    opts = {"iterations": 1, "init": "ones", "parallax_aliases": True, "parallax_reach": 1.8}
    problem = prepare(data, opts)
    assert "parallax_significance" in problem.probe_estimate
    jittered = data.positions + np.random.default_rng(0).normal(scale=0.1 * PIXEL, size=data.positions.shape)
    with caplog.at_level("WARNING", logger="cryoptycho.gpu.reconstruct"):
        skipped = prepare(dataclasses.replace(data, positions=jittered), opts)
    assert "parallax fit skipped" in caplog.text and "raster" in caplog.text
    assert not skipped.probe_estimate


#: the defocused probe of tests/test_parallax.py and its aberration error
SEMIANGLE, NOMINAL_DEFOCUS = 8e-3, 60e-9
ERRORS = {"C10": 15e-9, "C12a": 6e-9, "C12b": -4e-9}


def _defocused_nominal() -> np.ndarray:
    return make_probe("defocused", (32, 32), PIXEL, ENERGY, SEMIANGLE, NOMINAL_DEFOCUS)


def test_noiseless_alias_aware_fit_recovers_defocus_and_astigmatism() -> None:
    """Expected intensities on a 10 × 10 raster, reach 1.8 × Nyquist (every row has aliases
    inside the reach): each coefficient within a tenth of the probe's depth of field λ/α²
    (3.1 nm at 300 kV, 8 mrad; an error of that size moves the aperture edge's phase by π/10).
    The first-order model's bias at this scan size is of that order (the plain fit inside
    Nyquist: 1.4 nm), and it falls with the scan's size (16 × 16: 0.6 nm)."""
    data = aberrated_dataset(None, ERRORS, 0, 10, m=32, semiangle=SEMIANGLE, nominal_defocus=NOMINAL_DEFOCUS)
    fit = estimate_aberrations(data.frames, data.positions, _defocused_nominal(), PIXEL, ENERGY,
                               nyquist_fraction=1.8, aliases=True)
    tolerance = 0.1 * wavelength(ENERGY) / SEMIANGLE**2
    err = {k: abs(fit.coefficients[k] - ERRORS[k]) for k in ERRORS}
    assert max(err.values()) < tolerance, (fit.coefficients, tolerance)
    assert fit.rejects_nominal(0.95)
