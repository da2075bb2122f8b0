"""Image-quality metrics: Fourier ring correlation, SNR(q), NRMSE and phase correlation.

FRC thresholds follow van Heel & Schatz, J. Struct. Biol. 151:250 (2005): the ``n``-bit
information curve  T(n_r) = (ε + (2√ε + 1)/√n_r) / (1 + ε + 2√ε/√n_r)  with ε = 1 for the
1-bit and ε = √2 − 1 (≈ 0.2071) for the ½-bit criterion, n_r the number of pixels in ring r;
and the fixed 0.143 threshold. Resolutions are reported as the full period 1/q (metres) at the
first crossing, linearly interpolated between rings.

Low-dose scoring (measured in gpu/MEASUREMENTS.md, "Low-dose quality"): a raw ring's FRC is noisy
at < 1 count per pixel, so beside the raw curve we report a *pooled* one (each point the FRC of
a band of adjacent rings, with the pooled pixel count in the threshold). Scores are computed on
the phase after removing the mean ice phase, inside an apodised region.

Everything here runs on host arrays (CuPy inputs are copied once): metrics are evaluated once
per result, far from the engine's hot loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .backend import to_numpy

Threshold = Literal["1-bit", "1/2-bit", "0.143"]
THRESHOLDS: tuple[Threshold, ...] = ("1-bit", "1/2-bit", "0.143")


# --- FRC ---------------------------------------------------------------------------------------


@dataclass
class FRCCurve:
    """FRC per ring: ``freq`` (1/m, ring centres), ``frc``, ``n`` pixels per ring."""

    freq: np.ndarray
    frc: np.ndarray
    n: np.ndarray
    pixel_size: float

    def threshold(self, kind: Threshold) -> np.ndarray:
        return frc_threshold(kind, self.n)

    def resolution(self, kind: Threshold) -> float:
        """Full-period resolution (m) at the first crossing below the threshold ``kind``;
        Nyquist (2 × pixel) when the curve never crosses."""
        return crossing_resolution(self.freq, self.frc, self.threshold(kind), self.pixel_size)

    def snr(self) -> np.ndarray:
        """SNR(q) = FRC / (1 − FRC) (Bershad & Rockmore; clipped at FRC → 1)."""
        f = np.clip(self.frc, -0.999999, 0.999999)
        return f / (1.0 - f)

    def pooled(self, width: int = 3) -> FRCCurve:
        """The FRC of bands of ``width`` adjacent rings (a stable curve at low dose)."""
        if width <= 1:
            return self
        assert self._num is not None
        k = np.ones(width)
        num = np.convolve(self._num, k, mode="same")
        den_a = np.convolve(self._den_a, k, mode="same")
        den_b = np.convolve(self._den_b, k, mode="same")
        n = np.convolve(self.n, k, mode="same")
        out = FRCCurve(self.freq, _ratio(num, den_a, den_b), n, self.pixel_size)
        out._num, out._den_a, out._den_b = num, den_a, den_b
        return out

    # ring sums kept for pooling (set by :func:`frc`)
    _num: np.ndarray | None = None
    _den_a: np.ndarray | None = None
    _den_b: np.ndarray | None = None


def _ratio(num: np.ndarray, den_a: np.ndarray, den_b: np.ndarray) -> np.ndarray:
    den = np.sqrt(den_a * den_b)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def frc_threshold(kind: Threshold, n: Any) -> np.ndarray:
    """van Heel & Schatz (2005) information thresholds for rings of ``n`` pixels, or 0.143."""
    n = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    if kind == "0.143":
        return np.full_like(n, 0.143)
    if kind == "1-bit":
        eps = 1.0
    elif kind == "1/2-bit":
        eps = np.sqrt(2.0) - 1.0
    else:
        raise ValueError(f"unknown FRC threshold {kind!r}: choose one of {THRESHOLDS}")
    s = np.sqrt(n)
    return (eps + (2.0 * np.sqrt(eps) + 1.0) / s) / (1.0 + eps + 2.0 * np.sqrt(eps) / s)


def crossing_resolution(
    freq: np.ndarray, curve: np.ndarray, threshold: np.ndarray, pixel_size: float
) -> float:
    """Full period (m) where ``curve`` first drops below ``threshold`` (skipping ring 0); ``inf``
    when it is already below at the first ring (nothing resolved: interpolating towards ring 0,
    whose value says nothing about resolution, gave absurd figures)."""
    below = np.nonzero(curve[1:] < threshold[1:])[0]
    if below.size == 0:
        return 2.0 * pixel_size
    i = int(below[0]) + 1
    if i == 1:
        return float("inf")
    d0 = curve[i - 1] - threshold[i - 1]
    d1 = curve[i] - threshold[i]
    t = d0 / (d0 - d1) if d0 != d1 else 0.0
    q = freq[i - 1] + t * (freq[i] - freq[i - 1])
    return float(1.0 / q) if q > 0 else float("inf")


def frc(a: Any, b: Any, pixel_size: float, ring_width: float = 1.0) -> FRCCurve:
    """Fourier ring correlation of two real (or complex) images of the same shape.

    Rings are ``ring_width`` reciprocal pixels of the *smaller* image axis wide and run to its
    Nyquist frequency. Inputs should already be apodised (see :func:`prepare`)."""
    a = to_numpy(a)
    b = to_numpy(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"FRC needs two 2-D images of one shape, got {a.shape} and {b.shape}")
    if pixel_size <= 0:
        raise ValueError(f"pixel_size must be positive, got {pixel_size!r}")
    fa = np.fft.fft2(a)
    fb = np.fft.fft2(b)
    ny, nx = a.shape
    qy = np.fft.fftfreq(ny)[:, None] * ny
    qx = np.fft.fftfreq(nx)[None, :] * nx
    # Radius in units of the reciprocal pixel of the smaller axis, so rings are round.
    m = min(ny, nx)
    r = np.sqrt((qy * m / ny) ** 2 + (qx * m / nx) ** 2)
    ring = np.round(r / ring_width).astype(np.int64)
    n_rings = int(m // 2 / ring_width) + 1
    keep = ring < n_rings
    idx = ring[keep]
    num = np.bincount(idx, (fa * fb.conj()).real[keep], n_rings)
    den_a = np.bincount(idx, (np.abs(fa) ** 2)[keep], n_rings)
    den_b = np.bincount(idx, (np.abs(fb) ** 2)[keep], n_rings)
    n = np.bincount(idx, minlength=n_rings).astype(np.float64)
    freq = np.arange(n_rings) * ring_width / (m * pixel_size)
    out = FRCCurve(freq=freq, frc=_ratio(num, den_a, den_b), n=n, pixel_size=float(pixel_size))
    out._num, out._den_a, out._den_b = num, den_a, den_b
    return out


# --- regions, windows and phase -----------------------------------------------------------------


def tukey_window(shape: tuple[int, int], edge: float = 0.15) -> np.ndarray:
    """Separable Tukey window with cosine edges ``edge`` × size wide (kills edge leakage)."""
    from scipy.signal.windows import tukey

    return tukey(shape[0], 2 * edge)[:, None] * tukey(shape[1], 2 * edge)[None, :]


def soft_mask(mask: Any, sigma_px: float = 2.0) -> np.ndarray:
    """A binary region with Gaussian-smoothed edges (apodisation that follows a footprint)."""
    from scipy import ndimage  # (here: the daemon imports this module at its start, 0.2 s of SciPy)

    m = np.asarray(to_numpy(mask), dtype=np.float64)
    return np.clip(ndimage.gaussian_filter(m, sigma_px), 0.0, 1.0)


def unwrapped_phase(obj: Any, reference: complex | None = None) -> np.ndarray:
    """Phase of a transmission function, relative to ``reference`` (default: its mean),
    so that the large uniform ice phase never wraps."""
    t = np.asarray(to_numpy(obj))
    ref = np.mean(t) if reference is None else reference
    if abs(ref) == 0:
        raise ValueError("cannot take the phase relative to a zero reference")
    return np.angle(t * np.conj(ref) / abs(ref))


def ice_phase_removed(obj: Any, footprint: Any | None = None) -> np.ndarray:
    """Phase minus the mean phase of the ice (the pixels outside ``footprint``, or all)."""
    t = np.asarray(to_numpy(obj))
    outside = np.ones(t.shape, bool) if footprint is None else ~np.asarray(footprint, bool)
    if not outside.any():
        outside = np.ones(t.shape, bool)
    ref = np.mean(t[outside])
    ph = unwrapped_phase(t, ref)
    return ph - ph[outside].mean()


def particle_footprint(
    truth_phase: Any, fraction: float = 0.1, dilate_px: int = 3
) -> np.ndarray:
    """Where the particle is: ice-removed truth phase above ``fraction`` × its maximum,
    dilated by ``dilate_px`` so that edges are scored too."""
    from scipy import ndimage

    ph = np.asarray(truth_phase, dtype=np.float64)
    smooth = ndimage.gaussian_filter(ph, 1.0)
    core = smooth > fraction * smooth.max()
    return ndimage.binary_dilation(core, iterations=dilate_px) if dilate_px else core


# --- alignment ----------------------------------------------------------------------------------


def phase_ramp(recon: Any, truth: Any, weight: Any | None = None) -> tuple[float, float]:
    """The linear phase (rad per pixel along y, x) of ``recon`` relative to ``truth`` (complex
    transmissions), by weighted least squares on the phase of recon·conj(truth) with its mean
    removed. A ramp e^{ik·r} on the object with e^{−ik·r} on the probe leaves every
    intensity unchanged (an exact gauge of ptychography), so scores should not see it."""
    r = np.asarray(to_numpy(recon)).astype(np.complex128)
    t = np.asarray(to_numpy(truth)).astype(np.complex128)
    if r.shape != t.shape:
        raise ValueError(f"recon {r.shape} and truth {t.shape} differ in shape")
    w = np.ones(r.shape) if weight is None else np.asarray(weight, dtype=np.float64)
    prod = r * np.conj(t)
    mean = np.sum(w * prod)
    diff = np.angle(prod * np.conj(mean)) if abs(mean) > 0 else np.angle(prod)
    yy, xx = np.mgrid[0:r.shape[0], 0:r.shape[1]].astype(np.float64)
    design = np.stack([np.ones(r.size), yy.ravel(), xx.ravel()], axis=1) * np.sqrt(w.ravel())[:, None]
    coef, *_ = np.linalg.lstsq(design, diff.ravel() * np.sqrt(w.ravel()), rcond=None)
    return float(coef[1]), float(coef[2])


def remove_phase_ramp(recon: Any, ramp: tuple[float, float]) -> np.ndarray:
    """``recon`` × e^{−i(a_y y + a_x x)}: the ramp of :func:`phase_ramp` taken out."""
    r = np.asarray(to_numpy(recon))
    yy, xx = np.mgrid[0:r.shape[0], 0:r.shape[1]]
    return r * np.exp(-1j * (ramp[0] * yy + ramp[1] * xx))


def register_translation(reference: Any, image: Any) -> tuple[float, float]:
    """Shift (dy, dx) in pixels that, applied to ``image``, best aligns it to ``reference``
    (FFT cross-correlation peak, refined to sub-pixel by a parabola through its neighbours)."""
    a = np.asarray(to_numpy(reference))
    b = np.asarray(to_numpy(image))
    if a.shape != b.shape:
        raise ValueError(f"images to register differ in shape: {a.shape} vs {b.shape}")
    xc = np.fft.ifft2(np.fft.fft2(a) * np.conj(np.fft.fft2(b))).real
    peak = np.unravel_index(int(np.argmax(xc)), xc.shape)
    shift = []
    for axis, p in enumerate(peak):
        n = xc.shape[axis]
        idx_m = list(peak)
        idx_p = list(peak)
        idx_m[axis] = (p - 1) % n
        idx_p[axis] = (p + 1) % n
        ym, y0, yp = xc[tuple(idx_m)], xc[peak], xc[tuple(idx_p)]
        den = ym - 2 * y0 + yp
        frac = 0.5 * (ym - yp) / den if den != 0 else 0.0
        s = p + frac
        shift.append(s - n if s > n / 2 else s)
    return float(shift[0]), float(shift[1])


def fourier_shift(image: Any, shift: tuple[float, float]) -> np.ndarray:
    """``image`` translated by ``shift`` (dy, dx) pixels, periodic, sub-pixel exact."""
    img = np.asarray(to_numpy(image))
    qy = np.fft.fftfreq(img.shape[0])[:, None]
    qx = np.fft.fftfreq(img.shape[1])[None, :]
    ramp = np.exp(-2j * np.pi * (qy * shift[0] + qx * shift[1]))
    out = np.fft.ifft2(np.fft.fft2(img) * ramp)
    return out if np.iscomplexobj(img) else out.real


# --- scalar scores ------------------------------------------------------------------------------


def nrmse(recon: Any, truth: Any, mask: Any | None = None, scale: bool = False) -> float:
    """‖γ·R − T‖ / ‖T‖ over ``mask`` with the global phase γ (|γ| = 1) that minimises it —
    the reconstruction's overall phase is arbitrary. ``scale=True`` also fits |γ|: a
    reconstruction whose probe is normalised to the *detected* counts carries the specimen's
    uniform absorption in the probe, not in T."""
    r = np.asarray(to_numpy(recon)).astype(np.complex128)
    t = np.asarray(to_numpy(truth)).astype(np.complex128)
    if r.shape != t.shape:
        raise ValueError(f"NRMSE needs arrays of one shape, got {r.shape} and {t.shape}")
    w = np.ones(r.shape) if mask is None else np.asarray(to_numpy(mask), dtype=np.float64)
    inner = np.sum(w * t * np.conj(r))
    gamma = inner / abs(inner) if abs(inner) > 0 else 1.0
    if scale and abs(inner) > 0:
        gamma = inner / np.sum(w * np.abs(r) ** 2)
    return float(np.sqrt(np.sum(w * np.abs(gamma * r - t) ** 2) / np.sum(w * np.abs(t) ** 2)))


def phase_correlation(recon_phase: Any, truth_phase: Any, mask: Any | None = None) -> float:
    """Pearson correlation of two phase maps over ``mask`` (1 = identical up to offset/scale)."""
    a = np.asarray(to_numpy(recon_phase), dtype=np.float64)
    b = np.asarray(to_numpy(truth_phase), dtype=np.float64)
    sel = np.ones(a.shape, bool) if mask is None else np.asarray(to_numpy(mask), bool)
    a = a[sel] - a[sel].mean()
    b = b[sel] - b[sel].mean()
    den = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / den) if den > 0 else 0.0


def fit_affine(src: Any, dst: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The least-squares affine map between two sets of points (N, 2): ``(B, b, c)`` with
    dst ≈ c + B (src − c) + b, c = the mean of ``src`` (so ``b`` is the mean shift)."""
    s = np.asarray(to_numpy(src), dtype=np.float64)
    d = np.asarray(to_numpy(dst), dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != 2 or s.shape != d.shape or len(s) < 3:
        raise ValueError(f"fit_affine needs two (N ≥ 3, 2) point sets of one shape, got {s.shape} and {d.shape}")
    c = s.mean(axis=0)
    coef, *_ = np.linalg.lstsq(np.c_[s - c, np.ones(len(s))], d - c, rcond=None)
    return coef[:2].T, coef[2], c


def affine_registered(obj: Any, origin: tuple[float, float], pixel_size: float, used_positions: Any,
                      true_positions: Any) -> np.ndarray:
    """``obj`` (reconstructed at ``used_positions``, its pixel (0, 0) at ``origin``, metres)
    resampled on the same grid where the true positions put it: mapped through the affine map
    fitted from the used positions to the true ones. A reconstruction that is right up to the
    scan's global (affine) error then scores as if that error had been known; the official
    score registers translation only (gpu/MEASUREMENTS.md, "The scan's affine error")."""
    from scipy import ndimage

    b, off, c = fit_affine(used_positions, true_positions)
    inv = np.linalg.inv(b)
    o = np.asarray(origin, dtype=np.float64)
    # output pixel k sits at o + k·px in the true frame; its source in the used frame is
    # c + B⁻¹(o + k·px − c − off), i.e. input index B⁻¹ k + shift
    shift = (c + inv @ (o - c - off) - o) / pixel_size
    o_host = np.asarray(to_numpy(obj))
    parts = [ndimage.affine_transform(p, inv, offset=shift, order=3, mode="nearest")
             for p in (o_host.real, o_host.imag)]
    return parts[0] + 1j * parts[1]


# --- resolution without ground truth ------------------------------------------------------------


def binomial_split(counts: Any, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Thin integer counts into two independent halves: each detected electron goes to half A
    or B with probability ½. Poisson(λ) counts give two independent Poisson(λ/2) datasets."""
    c = np.asarray(to_numpy(counts))
    if c.dtype.kind not in "iu":
        if not np.all(np.isfinite(c)) or np.any(c != np.round(c)):
            raise ValueError("binomial_split needs integer counts (got non-integral values)")
        c = c.astype(np.int64)
    if np.any(c < 0):
        raise ValueError("binomial_split needs non-negative counts")
    a = rng.binomial(c, 0.5).astype(c.dtype, copy=False)
    return a, (c - a).astype(c.dtype, copy=False)


def half_set_resolution(
    recon_a: Any,
    recon_b: Any,
    pixel_size: float,
    mask: Any | None = None,
    threshold: Threshold = "1/2-bit",
    pool: int = 3,
) -> float:
    """Resolution (m) from the FRC of two reconstructions of independent half-dose datasets.

    The phases (mean removed) are compared inside ``mask`` (bool region, e.g. the scanned
    area; default: the whole image) with soft edges; the pooled curve (``pool`` rings) is
    thresholded, which is stable at low dose. The daemon publishes this number live."""
    pa = unwrapped_phase(recon_a)
    pb = unwrapped_phase(recon_b)
    window = tukey_window(pa.shape) if mask is None else soft_mask(mask) * tukey_window(pa.shape, 0.05)
    pa = (pa - np.average(pa, weights=window + 1e-12)) * window
    pb = (pb - np.average(pb, weights=window + 1e-12)) * window
    return frc(pa, pb, pixel_size).pooled(pool).resolution(threshold)
