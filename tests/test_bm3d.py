"""Tests of the open BM3D (cryoptycho.gpu.bm3d): accuracy against the reference package, the
transforms and block matching against independent implementations, backends, edge cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.fft
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.bm3d import BM3DProfile, StageParams, bm3d, estimate_sigma
from cryoptycho.gpu.bm3d_matching import Matches, match_blocks, reference_grid, window_sums
from cryoptycho.gpu.bm3d_transforms import bior15_matrix, dct_matrix, haar_matrix
from cryoptycho.gpu.denoise import available_denoisers, get_denoiser


def _psnr(estimate: np.ndarray, clean: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((np.asarray(estimate, np.float64) - clean) ** 2)))


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return data.camera().astype(np.float32)


def _noisy(clean: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (clean + rng.normal(0.0, sigma, clean.shape)).astype(np.float32)


# --- accuracy against the reference implementation ------------------------------------------


@pytest.mark.parametrize(
    ("crop", "sigma"), [("camera", 10.0), ("camera", 25.0), ("camera", 50.0), ("brick", 25.0)]
)
def test_psnr_matches_reference_package(crop: str, sigma: float) -> None:
    ref = pytest.importorskip("bm3d")
    data = pytest.importorskip("skimage.data")
    if crop == "camera":
        clean = data.camera().astype(np.float32)[100:196, 150:246]
    else:
        clean = data.brick().astype(np.float32)[:96, :96]
    noisy = _noisy(clean, sigma)
    profile = ref.BM3DProfile()
    profile.num_threads = 1  # the CI cores are shared; one thread is also deterministic
    reference = ref.bm3d(noisy / 255.0, sigma / 255.0, profile=profile) * 255.0
    ours_grey = bm3d(noisy, sigma, data_range=255.0)  # the papers' 0–255 convention
    ours_free = bm3d(noisy, sigma)  # scale-free default (σ mapped to a fixed grey level)
    p_ref, p_noisy = _psnr(reference, clean), _psnr(noisy, clean)
    for ours in (ours_grey, ours_free):
        p = _psnr(ours, clean)
        assert p > p_ref - 0.3, (p, p_ref)
        assert p > p_noisy + 5.0, (p, p_noisy)


def test_wiener_stage_improves_on_basic_estimate(camera: np.ndarray) -> None:
    clean = camera[200:296, 200:296]
    noisy = _noisy(clean, 25.0, seed=3)
    basic = bm3d(noisy, 25.0, stages=1)
    final = bm3d(noisy, 25.0)
    assert _psnr(final, clean) > _psnr(basic, clean) + 0.2


def test_estimate_sigma_of_white_noise(camera: np.ndarray) -> None:
    clean = camera[:128, :128]
    for sigma in (5.0, 25.0, 50.0):
        assert estimate_sigma(_noisy(clean, sigma, seed=1)) == pytest.approx(sigma, rel=0.12)


def test_estimated_sigma_is_used_when_none(camera: np.ndarray) -> None:
    clean = camera[300:364, 100:164]
    noisy = _noisy(clean, 20.0, seed=2)
    auto = bm3d(noisy)
    given = bm3d(noisy, estimate_sigma(noisy))
    np.testing.assert_array_equal(auto, given)


# --- invariances and edge cases -------------------------------------------------------------


def test_scale_and_offset_equivariance(camera: np.ndarray) -> None:
    # Scale-free default: a phase in radians is denoised like the same image in grey levels.
    noisy = _noisy(camera[:64, :80], 20.0, seed=4).astype(np.float64)
    a, b = 0.013, -1.7
    base = bm3d(noisy, 20.0)
    scaled = bm3d(a * noisy + b, a * 20.0)
    np.testing.assert_allclose(scaled, a * base + b, rtol=0, atol=1e-9 * 255)


def test_constant_image_stays_constant(xp) -> None:
    image = xp.full((40, 52), 3.25, dtype=np.float32)
    out = to_numpy(bm3d(image, 0.1))
    np.testing.assert_allclose(out, 3.25, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(45, 70), (71, 33), (9, 23)])
def test_non_square_and_odd_sizes(shape: tuple[int, int]) -> None:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    clean = (120 + 80 * np.sign(np.sin(xx / 6.0)) + 0.5 * yy).astype(np.float32)
    noisy = _noisy(clean, 15.0, seed=5)
    out = bm3d(noisy, 15.0)
    assert out.shape == shape and np.all(np.isfinite(out))
    assert _psnr(out, clean) > _psnr(noisy, clean) + 3.0


def test_tiling_does_not_change_the_result(camera: np.ndarray) -> None:
    noisy = _noisy(camera[50:120, 60:141], 25.0, seed=6)
    whole = bm3d(noisy, 25.0, profile=BM3DProfile(tile_refs=64))
    tiled = bm3d(noisy, 25.0, profile=BM3DProfile(tile_refs=5))
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-3)


def test_deterministic_and_dtype_preserving(camera: np.ndarray) -> None:
    noisy = _noisy(camera[:48, :56], 25.0, seed=7)
    first, second = bm3d(noisy, 25.0), bm3d(noisy, 25.0)
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.float32
    assert bm3d(noisy.astype(np.float64), 25.0).dtype == np.float64
    assert bm3d(np.clip(noisy, 0, 255).astype(np.uint8), 25.0).dtype == np.float32


def test_backends_agree(xp, camera: np.ndarray) -> None:
    noisy = _noisy(camera[120:184, 220:292], 25.0, seed=8)
    host = bm3d(noisy, 25.0)
    out = bm3d(xp.asarray(noisy), 25.0)
    assert type(out) is type(xp.asarray(noisy)) and out.dtype == np.float32
    # Float32 rounding may flip a near-tie in block matching: compare in bulk, not per pixel.
    diff = np.abs(to_numpy(out) - host)
    assert np.median(diff) < 1e-3 and np.mean(diff) < 0.05


def test_device_synchronisations_per_denoiser_call(camera: np.ndarray) -> None:
    """Counted on the strict backend (CuPy's semantics): one device → host transfer for the
    input's checks, offset and estimated σ together, and one per stage for the group sizes of
    the tile — no ``nonzero`` per group size, no ``bincount`` (each would read device data on
    the host). The sparse prior denoises phase and log-amplitude: twice that, plus its own one."""
    from cryoptycho.gpu.backend import get_xp
    from cryoptycho.gpu.denoise import denoise_complex
    from cryoptycho.gpu.strict import counting

    xp = get_xp("strict")
    noisy = xp.asarray(_noisy(camera[120:184, 220:292], 25.0, seed=8))
    for sigma in (25.0, None):
        with counting() as c:
            bm3d(noisy, sigma)
        assert c.syncs == 3 and [e.kind for e in c.events if e.kind != "h2d"] == ["d2h"] * 3, c.summary()
    field = xp.asarray(np.exp(1j * to_numpy(noisy) / 255).astype(np.complex64))
    with counting() as c:
        denoise_complex(field, get_denoiser("bm3d"), 0.1)
    assert c.syncs == 7, c.summary()


def test_zero_sigma_returns_a_copy() -> None:
    image = np.arange(100, dtype=np.float32).reshape(10, 10)
    out = bm3d(image, 0.0)
    np.testing.assert_array_equal(out, image)
    assert out is not image


@pytest.mark.parametrize(
    ("image", "kwargs", "match"),
    [
        (np.zeros((4, 16, 16)), {}, "2-D"),
        (np.zeros((16, 16), complex), {}, "real"),
        (np.zeros((7, 30)), {"sigma": 1.0}, "smaller than the BM3D block"),
        (np.full((16, 16), np.nan), {"sigma": 1.0}, "NaN"),
        (np.zeros((16, 16)), {"sigma": -1.0}, "sigma"),
        (np.zeros((16, 16)), {"sigma": 1.0, "data_range": 0.0}, "data_range"),
        (np.zeros((16, 16)), {"sigma": 1.0, "stages": 3}, "stages"),
        (
            np.zeros((16, 16)),
            {"profile": BM3DProfile(hard=StageParams(max_group=12))},
            "hard.max_group",
        ),
        (
            np.zeros((16, 16)),
            {"profile": BM3DProfile(wiener=StageParams(window=8))},
            "wiener.window",
        ),
        (
            np.zeros((16, 16)),
            {"profile": BM3DProfile(hard=StageParams(transform="db4"))},
            "transform",
        ),
        (np.zeros((16, 16)), {"profile": BM3DProfile(lambda_3d=0)}, "lambda_3d"),
    ],
)
def test_bad_input_is_a_clear_error(image: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bm3d(image, **kwargs)


def test_registered_as_default_denoiser(camera: np.ndarray) -> None:
    assert "bm3d" in available_denoisers()
    denoise = get_denoiser("bm3d")
    noisy = _noisy(camera[:40, :40], 10.0)
    np.testing.assert_array_equal(denoise(noisy, 10.0), bm3d(noisy, 10.0))
    with pytest.raises(ValueError, match="unknown bm3d parameter"):
        get_denoiser("bm3d", sharpen=2)


# --- building blocks against independent implementations -----------------------------------


def test_dct_matrix_is_scipy_orthonormal_dct() -> None:
    x = np.random.default_rng(0).normal(size=(8, 5))
    np.testing.assert_allclose(
        dct_matrix(8) @ x, scipy.fft.dct(x, axis=0, norm="ortho"), atol=1e-12
    )


@pytest.mark.parametrize("n", [1, 2, 4, 16, 32])
def test_haar_matrix_is_orthonormal_haar(n: int) -> None:
    m = haar_matrix(n)
    np.testing.assert_allclose(m @ m.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(m[0], np.full(n, 1 / np.sqrt(n)))
    if n >= 2:  # finest details: differences of neighbouring pairs
        np.testing.assert_allclose(m[-1, -2:], [1 / np.sqrt(2), -1 / np.sqrt(2)])


def test_bior15_matrix_matches_pywavelets() -> None:
    pywt = pytest.importorskip("pywt")
    with warnings.catch_warnings():  # pywt warns that level 3 touches the 8-sample boundary
        warnings.simplefilter("ignore", UserWarning)
        cols = [
            np.concatenate(pywt.wavedec(e, "bior1.5", mode="periodization", level=3))
            for e in np.eye(8)
        ]
    expected = np.array(cols).T
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(bior15_matrix(8), expected, atol=1e-12)


def test_reference_grid_covers_the_last_block() -> None:
    np.testing.assert_array_equal(reference_grid(20, 8, 3), [0, 3, 6, 9, 12])
    np.testing.assert_array_equal(reference_grid(21, 8, 3), [0, 3, 6, 9, 12, 13])
    np.testing.assert_array_equal(reference_grid(8, 8, 3), [0])


def test_block_matching_equals_brute_force(xp) -> None:
    rng = np.random.default_rng(11)
    img = np.round(rng.uniform(0, 40, size=(17, 19))).astype(np.float32)
    block, window, k, tau = 4, 7, 8, 300.0
    ry, rx = reference_grid(17, block, 3), reference_grid(19, block, 3)
    found_xp = match_blocks(
        xp.asarray(img), ry, rx, block=block, window=window, max_group=k, tau=tau
    )
    got = Matches(*(to_numpy(a) for a in (found_xp.ys, found_xp.xs, found_xp.size)))
    half = window // 2
    for i, (y, x) in enumerate((y, x) for y in ry for x in rx):
        ref = img[y : y + block, x : x + block]
        found = []
        for cy in range(max(0, y - half), min(17 - block, y + half) + 1):
            for cx in range(max(0, x - half), min(19 - block, x + half) + 1):
                d = float(np.sum((img[cy : cy + block, cx : cx + block] - ref) ** 2)) / block**2
                if d <= tau:
                    found.append((d, cy, cx))
        found.sort()
        size = 1 << (min(len(found), k).bit_length() - 1)
        assert int(got.size[i]) == size
        assert (int(got.ys[i, 0]), int(got.xs[i, 0])) == (y, x)
        got_d = [
            float(np.sum((img[cy : cy + block, cx : cx + block] - ref) ** 2)) / block**2
            for cy, cx in zip(got.ys[i, :size], got.xs[i, :size])
        ]
        # Same distances as the brute-force best `size` (ties may pick different members).
        np.testing.assert_allclose(sorted(got_d), [f[0] for f in found[:size]], rtol=1e-5)


@pytest.mark.parametrize("length", [1, 3, 8, 11])
def test_window_sums_equal_direct_sums(length: int) -> None:
    a = np.random.default_rng(12).normal(size=(30, 4, 25))
    starts = np.array([0, 2, 7, 30 - length])
    direct = np.stack([a[s : s + length].sum(axis=0) for s in starts])
    np.testing.assert_allclose(window_sums(a, starts, length, axis=0), direct, atol=1e-12)
    direct_x = np.stack([a[..., s : s + length].sum(axis=-1) for s in starts[:3]], axis=-1)
    np.testing.assert_allclose(window_sums(a, starts[:3], length, axis=2), direct_x, atol=1e-12)
