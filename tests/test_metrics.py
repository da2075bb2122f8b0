"""FRC, thresholds, SNR, NRMSE, registration, binomial thinning and averaging."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.gpu.average import align_and_average
from cryoptycho.gpu.metrics import (
    affine_registered,
    binomial_split,
    fit_affine,
    fourier_shift,
    frc,
    frc_threshold,
    half_set_resolution,
    nrmse,
    phase_correlation,
    register_translation,
)

PX = 1e-10


def band_limited_noise(shape: tuple[int, int], cutoff_px: float, rng: np.random.Generator) -> np.ndarray:
    """White noise keeping only frequencies with |q| < cutoff (cycles/pixel)."""
    q = np.hypot(np.fft.fftfreq(shape[0])[:, None], np.fft.fftfreq(shape[1])[None, :])
    return np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * (q < cutoff_px)).real


def test_frc_of_identical_images_is_one() -> None:
    img = np.random.default_rng(0).standard_normal((64, 64))
    curve = frc(img, img, PX)
    assert np.allclose(curve.frc[1:], 1.0)
    assert curve.resolution("1-bit") == pytest.approx(2 * PX)  # never crosses: Nyquist


def test_frc_of_independent_noise_is_near_zero() -> None:
    rng = np.random.default_rng(1)
    curve = frc(rng.standard_normal((128, 128)), rng.standard_normal((128, 128)), PX)
    # each ring's FRC of independent noise has standard deviation ≈ 1/√n
    z = curve.frc[2:] * np.sqrt(curve.n[2:])
    assert abs(np.mean(curve.frc[2:])) < 0.03
    assert np.std(z) == pytest.approx(1.0, rel=0.3)
    assert curve.resolution("1/2-bit") > 20 * PX  # crosses at once


def test_a_curve_below_threshold_from_the_first_ring_resolves_nothing() -> None:
    img = band_limited_noise((96, 96), 0.2, np.random.default_rng(4))
    reversed_contrast = frc(img, -img, PX)
    assert reversed_contrast.resolution("1-bit") == float("inf")
    assert reversed_contrast.resolution("1/2-bit") == float("inf")


def test_thresholds_follow_van_heel_and_schatz() -> None:
    # SNR of 1 bit is 1 and of ½ bit √2−1; for large rings the threshold tends to the FRC of
    # that SNR, FRC = SNR / (1 + SNR)
    big = 1e12
    assert frc_threshold("1-bit", big) == pytest.approx(0.5, abs=1e-4)
    assert frc_threshold("1/2-bit", big) == pytest.approx((np.sqrt(2) - 1) / np.sqrt(2), abs=1e-4)
    assert frc_threshold("0.143", 10) == pytest.approx(0.143)
    # a ring of one pixel carries no information: the threshold is 1
    assert frc_threshold("1-bit", 1) == pytest.approx(1.0)
    n = np.array([4, 16, 64, 256, 1024])
    for kind in ("1-bit", "1/2-bit"):
        t = frc_threshold(kind, n)
        assert np.all(np.diff(t) < 0)
    assert np.all(frc_threshold("1/2-bit", n) < frc_threshold("1-bit", n))
    with pytest.raises(ValueError, match="threshold"):
        frc_threshold("2-bit", 10)  # type: ignore[arg-type]


def test_snr_is_frc_over_one_minus_frc() -> None:
    rng = np.random.default_rng(2)
    s = band_limited_noise((64, 64), 0.2, rng)
    curve = frc(s + 0.5 * rng.standard_normal(s.shape), s + 0.5 * rng.standard_normal(s.shape), PX)
    assert np.allclose(curve.snr()[1:10], curve.frc[1:10] / (1 - curve.frc[1:10]))


def test_half_set_resolution_finds_the_band_limit() -> None:
    rng = np.random.default_rng(3)
    shape = (128, 128)
    cutoff = 0.2  # cycles/pixel → period 5 px
    signal = band_limited_noise(shape, cutoff, rng)
    signal /= signal.std()
    halves = [np.exp(1j * 0.3 * (signal + 0.5 * rng.standard_normal(shape))) for _ in range(2)]
    res = half_set_resolution(halves[0], halves[1], PX)
    assert res == pytest.approx(PX / cutoff, rel=0.1)
    # noisier halves resolve less
    noisy = [np.exp(1j * 0.3 * (signal + 4.0 * rng.standard_normal(shape))) for _ in range(2)]
    assert half_set_resolution(noisy[0], noisy[1], PX) > 1.2 * res


def test_binomial_split_gives_independent_poisson_halves() -> None:
    rng = np.random.default_rng(4)
    lam = 3.0
    counts = rng.poisson(lam, size=200_000).astype(np.uint16)
    a, b = binomial_split(counts, rng)
    assert a.dtype == counts.dtype and b.dtype == counts.dtype
    assert np.array_equal(a.astype(int) + b, counts)
    for half in (a, b):
        assert half.mean() == pytest.approx(lam / 2, rel=0.02)
        assert half.var() == pytest.approx(lam / 2, rel=0.03)  # Poisson: variance = mean
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.01
    with pytest.raises(ValueError, match="integer"):
        binomial_split(np.array([0.5, 1.0]), rng)
    with pytest.raises(ValueError, match="non-negative"):
        binomial_split(np.array([-1, 2]), rng)


def test_nrmse_ignores_the_global_phase() -> None:
    rng = np.random.default_rng(5)
    t = np.exp(1j * rng.uniform(0, 1, (32, 32)))
    assert nrmse(t * np.exp(2.1j), t) == pytest.approx(0.0, abs=1e-12)
    assert nrmse(np.ones_like(t), t) > 0.1
    assert nrmse(0.9 * t, t) == pytest.approx(0.1)
    assert nrmse(0.9 * t * np.exp(0.3j), t, scale=True) == pytest.approx(0.0, abs=1e-12)
    assert phase_correlation(np.angle(t) * 3 + 1, np.angle(t)) == pytest.approx(1.0)


def test_register_translation_recovers_a_subpixel_shift() -> None:
    rng = np.random.default_rng(6)
    img = band_limited_noise((64, 64), 0.15, rng)
    moved = fourier_shift(img, (2.3, -4.6))
    dy, dx = register_translation(img, moved)
    assert (dy, dx) == pytest.approx((-2.3, 4.6), abs=0.15)


def test_average_aligns_shifted_noisy_copies() -> None:
    rng = np.random.default_rng(7)
    signal = band_limited_noise((64, 64), 0.1, rng)
    truth = np.exp(1j * (0.5 * signal / signal.std() + 1.3))
    offsets = [(0.0, 0.0), (1.5, -2.0), (-3.0, 0.5), (2.0, 2.0)]
    copies = [fourier_shift(truth, o) * np.exp(1j * (0.3 * rng.standard_normal(truth.shape) + k))
              for k, o in enumerate(offsets)]
    out = align_and_average(copies)
    # shifts bring every copy back onto the first (copy 0 sits at offset 0)
    for s, o in zip(out.shifts, offsets):
        assert s == pytest.approx((-o[0], -o[1]), abs=0.3)
    err_single = nrmse(copies[0], truth)
    assert nrmse(out.average, truth) < 0.7 * err_single
    with pytest.raises(ValueError, match="empty"):
        align_and_average([])


def test_scan_affine_registration_undoes_a_known_affine_distortion() -> None:
    """A reconstruction that is right up to the scan's affine map (built here analytically: the
    object sampled where the map sends each pixel, no resampling code under test) scores ~1
    once registered through the map fitted from the used to the true positions, and clearly
    lower as it is."""
    rng = np.random.default_rng(3)
    n, origin = 160, (-8e-9, -7e-9)
    centres = rng.uniform(-8e-9, 8e-9, (60, 2)) + np.array([0.0, 1e-9])
    weights = rng.uniform(-0.4, 0.4, 60)

    def phase(yx: np.ndarray) -> np.ndarray:  # (..., 2) metres → smooth blobs, σ = 2 px
        d2 = ((yx[..., None, :] - centres) ** 2).sum(-1)
        return (weights * np.exp(-d2 / (2 * (2 * PX) ** 2))).sum(-1)

    k = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1) * PX + np.asarray(origin)
    t = np.deg2rad(3.0)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    a = rot @ np.array([[1.05, 0.02], [0.0, 0.96]])
    shift = np.array([3e-10, -2e-10])
    used = np.stack(np.meshgrid(np.linspace(-5e-9, 5e-9, 9), np.linspace(-4e-9, 6e-9, 9), indexing="ij"),
                    -1).reshape(-1, 2)
    c = used.mean(0)
    true = c + (used - c) @ a.T + shift
    b, off, centre = fit_affine(used, true)
    assert np.allclose(b, a) and np.allclose(off, shift) and np.allclose(centre, c)
    # a feature at true point c + A (u − c) + b appears at u in a reconstruction made at ``used``
    recon = np.exp(1j * phase(c + (k - c) @ a.T + shift))
    truth = phase(k)
    inner = np.zeros((n, n), bool)
    inner[30:130, 30:130] = True  # pixels whose source lies inside the reconstruction's grid
    registered = affine_registered(recon, origin, PX, used, true)
    assert phase_correlation(np.angle(registered), truth, inner) > 0.99
    assert phase_correlation(np.angle(recon), truth, inner) < 0.5
    # the identity map leaves the reconstruction as it is
    same = affine_registered(recon, origin, PX, used, used)
    assert np.abs(same - recon).max() < 1e-6
