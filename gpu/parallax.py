"""The probe's aberrations from the data, before any iteration: a bright-field (parallax) fit.

Tilt-corrected bright-field imaging ("parallax", py4DSTEM's ``Parallax``) reads defocus and
astigmatism from the shifts between virtual bright-field images: the image seen through
detector pixel k is the object shifted by ∇χ(k)/2π. That needs a probe whose aperture phase is
smooth. Our default probe carries a random phase plate (phase varying over a few detector
pixels), so its virtual images are not shifted copies of one image; instead this module fits
the linear transfer those shifts come from, for *any* known probe spectrum.

For a weak object T = 1 + t and the engine's conventions (unitary FFT, probe centre at r_j,
Ψ = F ψ), the counts of pattern j at detector frequency k are, to first order in t,

    y_j(k) = |Ψ(k)|² + 2 Re Σ_q Ψ*(k) Ψ(k − q) t̂(q) e^{2πi q·r_j}.

Their Fourier sum over the scan, D(q, k) = Σ_j y_j(k) e^{−2πi q·r_j}, is therefore, for q ≠ 0,

    D(q, k) = a(q) Ψ*(k) Ψ(k − q) + b(q) Ψ(k) Ψ*(k + q),   a = t̂(q), b = conj t̂(−q)

— two unknown numbers per object frequency q, seen through every bright-field pixel k (the
"double overlap" of single-sideband ptychography). With the probe written as the nominal one
with extra aberrations, Ψ_c = Ψ₀ exp(−i Σ c_j B_j) (probes.aberration_basis), the fit
maximises over c the data energy the model explains,

    S(c) = Σ_q d_qᴴ G_q (G_qᴴ G_q)⁻¹ G_qᴴ d_q,   G_q = [Ψ_c*(k)Ψ_c(k−q), Ψ_c(k)Ψ_c*(k+q)]_k,

with each k whitened by its counting noise (variance ≈ K ȳ(k)). The object is eliminated
exactly (two unknowns per q against hundreds of pixels k), so the object cannot absorb a probe
error as it does in the iterative reconstruction, and every count of the scan contributes —
what makes the estimate usable at cryo doses. For a probe without a phase plate and small q,
Ψ*(k)Ψ(k − q) ≈ |Ψ|² e^{i q·∇χ(k)}: the parallax shift ∇χ/2π, the relation tcBF fits.

The affine scan error (``scan=True``, off by default). If the probe was at r + E r for the
nominal r (A = I + E), the nominal Fourier sum at q' sees the object at q = A⁻ᵀq', so the
columns become Ψ*(k)Ψ(k − A⁻ᵀq'), Ψ(k)Ψ*(k + A⁻ᵀq'): shifted by a few per cent of q' — a
fraction of a detector step, since q' stops at the scan step's Nyquist frequency. For a smooth
aperture phase that shift is a 2×2 matrix acting on k and trades against defocus and
astigmatism; for a speckle probe it moves the speckle, which no aberration does, so E can be
fitted jointly with the coefficients. What it is worth (gpu/MEASUREMENTS.md, "The scan matrix
from the parallax fit"): on the realistic proteasome, noiseless, E comes out within 0.4 % of
the truth; with counting noise its standard error is ≈ 1.7 % per entry at 100 e⁻/Å² and
≈ 6 % at 20 e⁻/Å² (the scan's own error is 1–2.5 %), and with a plain defocused aperture
≈ 10 % at 100 e⁻/Å². On a spiral scan (no lattice, no exact aliasing) ``nyquist_fraction=1.8``
brings it to ≈ 0.8 % at 100 e⁻/Å²; at 20 e⁻/Å² no reach tried got below 1.4 %. The model also assumes the object's spectrum constant across the scan's
frequency resolution 1/L: a scan only ~2 probe windows wide, over an object whose spectrum
falls steeply, biases E by 1–2 %.

The object frequencies used: a half-plane grid of spacing ≤ 1/(scan extent) up to 0.9 × the
scan step's Nyquist frequency (the Fourier sum aliases beyond it) and 2 × the aperture radius,
without |q| < 2 spacings (the particle's mean and the ice, the least sensitive to aberrations).
On a raster, ``aliases=True`` (the alias-aware fit, ``parallax_aliases``) goes past Nyquist
honestly: there e^{−2πi(q + G)·r_j} = e^{−2πi q·r_j}·const for every reciprocal lattice vector
G, so D(q, k) holds the object at all of q's aliases, D = Σ_G [a_G Ψ*(k)Ψ(k − q − G) +
b_G Ψ(k)Ψ*(k + q + G)]. The rows are then the frequencies of one reciprocal cell (each count
combination once), each with 2 columns per alias |q + G| ≤ the reach, projected jointly (Ψ off
the padded grid by an exact FFT of the probe times e^{2πiG·r}, one per G); inside Nyquist it is
the plain fit. What it is worth (gpu/MEASUREMENTS.md, "The alias-aware parallax fit"): it
recovers hemoglobin's probe error like the plain fit at reach 1.8, but its χ² gate is no better
calibrated — the false positives with the nominal probe right come from the scan's jitter, not
from the aliasing. Each frequency is weighted by its shell's signal share s/(1 + s) (s: the projected energy above
the noise's, measured with the nominal probe): at low dose the high-frequency shells hold only
noise, and unweighted they let the fit chase noise at large defocus.

The gate. ``parallax="auto"`` applies the fit only when the data reject the nominal probe:
ĉᵀΣ⁻¹ĉ above the χ² quantile (3 degrees of freedom). With Σ = H⁻¹ (H the score's negative
Hessian at ĉ, the curvature) that statistic fired on 25 % of realistic scans whose nominal
probe was exactly right (hemoglobin, 100 e⁻/Å², 20 noise draws; MEASUREMENTS.md, "The parallax
gate's noise"): the curvature is the gradient's variance only for a true likelihood with few
unknowns, and here (i) two object unknowns per frequency are profiled out at a signal-to-noise
near 1 per frequency, so the noise × noise part of the gradient (nᴴ ∂Π n) scatters it without
adding curvature, (ii) the shell weights make the score no likelihood, and (iii) signal that
varies from pattern to pattern without being the model's — scattered by the scan's jitter,
which moves each frequency's signal by 2π|q|δ into the k-structure of other frequencies'
columns, or the second-order terms of a strong object — is structured, not white. So Σ is the
sandwich H⁻¹ J H⁻¹ with J the gradient's scatter measured on surrogates of the data: the fitted
signal (each shell's projection scaled by √(signal share), so that its energy is the signal's
and not the projected noise's) plus the patterns' deviations from their mean with a random sign
each (the coherent object sum cancels; counting noise, jitter-scattered signal and whatever
else differs between patterns stay, with the scan's own correlations between frequencies),
plus the curvature's share (at low signal the shrunk surrogate signal alone undercounts it).
Two surrogates (``noise_draws``) cost 4 n trial probes, a few per cent of the fit.
``ParallaxFit.curvature_significance`` keeps ĉᵀHĉ for comparison.

The search's null (``null_draws``, opt-in through ``parallax_null_draws``). The sandwich is
measured at the estimate, and at ~1 count a bright-field pixel a noise peak is more sharply
curved than the truth: with the probe right the χ² gate opened on 10 of 47 synthetic scans at
10³ counts a pattern. Where it opens, B surrogates of the data under the nominal probe (its
fitted signal, shrunk per shell as above, plus sign-flipped pattern deviations) are refitted
with the whole search and gated the same way; the fit stands
at p = (k + 1)/(B + 1) ≤ α, k the surrogates at least as significant (MEASUREMENTS.md, "The
two parallax gates' family-wise rate").
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import array_module, asarray, complex_of, fft2, ifft2, real_of, to_numpy
from .operators import to_fft_order
from .probes import aberration_basis


class FitCancelled(RuntimeError):
    """The caller cancelled the fit (``estimate_aberrations(cancel=…)``)."""


@dataclass
class ParallaxFit:
    """What :func:`estimate_aberrations` found."""

    coefficients: dict[str, float]  #: metres, to add to the nominal probe (probes.aberrate)
    explained_nominal: float = 0.0  #: share of the whitened data energy the nominal probe explains
    explained: float = 0.0  #: the same with the fitted probe
    frequencies: int = 0  #: object frequencies q used
    pixels: int = 0  #: bright-field detector pixels used
    evaluations: int = 0
    #: log-likelihood of the fit over the nominal probe's (Gaussian noise of the residual's level)
    log_likelihood_gain: float = 0.0
    #: metres, the standard deviation of each coefficient (the sandwich Σ of :attr:`significance`)
    standard_error: dict[str, float] = dataclasses.field(default_factory=dict)
    #: ĉᵀ Σ⁻¹ ĉ: the fitted correction's distance from the nominal probe in standard deviations,
    #: squared, Σ = H⁻¹ J H⁻¹ the sandwich covariance (H the score's negative Hessian, J the
    #: gradient's scatter: the curvature's share plus the noise × noise share measured on
    #: sign-flipped surrogates of the data, module docstring "The gate"); ≈ χ² with len(c)
    #: degrees of freedom when the nominal probe is right. What the "auto" gate tests.
    significance: float = 0.0
    #: ĉᵀ H ĉ, the significance from the curvature alone (the gate before 2026-12-07): at the
    #: signal-to-noise of cryo doses it leaves out the noise × noise scatter and fired on 25 %
    #: of scans whose nominal probe was right (MEASUREMENTS.md, "The parallax gate's noise")
    curvature_significance: float = 0.0
    #: the scan matrix's error E = A − I found (``scan=True``): row-major (yy, yx, xy, xx) of the
    #: 2×2 map on (y, x) offsets from the scan centre, true ≈ nominal + E·nominal; None: not fitted
    scan_matrix: tuple[float, float, float, float] | None = None
    #: posterior standard deviations of the four entries
    scan_standard_error: tuple[float, float, float, float] | None = None
    #: eᵀ Σ⁻¹ e of the four entries (Σ their posterior covariance): ≈ χ² with 4 degrees of
    #: freedom when the nominal scan is right
    scan_significance: float = 0.0
    #: the p-value of :attr:`significance` under the null of the whole search, from refitted
    #: surrogates (``estimate_aberrations(null_draws=…)``, module docstring "The search's
    #: null"); a lower bound once it is above the level asked; None: not measured
    null_p_value: float | None = None

    @property
    def gain(self) -> float:
        """Relative gain of the explained energy over the nominal probe's."""
        return self.explained / max(self.explained_nominal, 1e-300) - 1.0

    def rejects_nominal(self, confidence: float) -> bool:
        """Whether the data reject the nominal probe at ``confidence``: :attr:`significance`
        above the χ² quantile with one degree of freedom per fitted coefficient."""
        from scipy.stats import chi2

        dof = max(len(self.coefficients), 1)
        return self.significance > float(chi2.ppf(confidence, dof))

    def passes_null(self, confidence: float) -> bool:
        """Whether the search's null (:attr:`null_p_value`) rejects the nominal probe at
        ``confidence``; True where it was not measured (the χ² test alone decides)."""
        return self.null_p_value is None or self.null_p_value <= (1.0 - confidence) * (1.0 + 1e-9)

    def scan_rejects_nominal(self, confidence: float) -> bool:
        """Whether the data reject the nominal scan matrix at ``confidence`` (χ², 4 degrees of
        freedom); False when the scan was not fitted."""
        from scipy.stats import chi2

        return self.scan_matrix is not None and self.scan_significance > float(chi2.ppf(confidence, 4))

    def scan_positions(self, positions: np.ndarray) -> np.ndarray:
        """``positions`` (K, 2) through the fitted scan matrix about their centre (the nominal
        positions as the data place them); unchanged when the scan was not fitted."""
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        if self.scan_matrix is None:
            return pos.copy()
        centre = pos.mean(axis=0)
        a = np.eye(2) + np.asarray(self.scan_matrix, dtype=np.float64).reshape(2, 2)
        return (pos - centre) @ a.T + centre

    def scan_record(self, applied: bool, confidence: float | None = None) -> dict[str, float]:
        """The scan fit as flat scalars for /extra: ``parallax_scan_<yy|yx|xy|xx>`` the entries
        of A − I found (applied or not), ``…_se`` their standard errors,
        ``parallax_scan_significance``, ``parallax_scan_threshold`` (the χ² it was held against,
        with ``confidence``), ``parallax_scan_applied``; empty when the scan was not fitted."""
        if self.scan_matrix is None:
            return {}
        out: dict[str, float] = {}
        se = self.scan_standard_error or (math.nan,) * 4
        for key, value, err in zip(("yy", "yx", "xy", "xx"), self.scan_matrix, se):
            out[f"parallax_scan_{key}"] = float(value)
            out[f"parallax_scan_{key}_se"] = float(err)
        out.update(parallax_scan_significance=float(self.scan_significance),
                   parallax_scan_applied=float(bool(applied)))
        if confidence is not None:
            from scipy.stats import chi2

            out["parallax_scan_threshold"] = float(chi2.ppf(confidence, 4))
        return out

    def record(self, applied: bool, frames: int, confidence: float | None = None) -> dict[str, float]:
        """The fit as flat scalars for a result file's /extra (offline and live write the same
        keys, daemon/storage/FORMATS.md): ``parallax_<name>_m`` the coefficients found (applied
        or not), ``parallax_<name>_se_m`` their standard errors, ``parallax_significance`` (the
        gate's χ²; ``parallax_curvature_significance`` the curvature's alone) and
        the χ² threshold it was held against (``confidence``; absent when the fit was applied
        without a test), ``parallax_applied`` (1: the used probe carries the correction, 0: the
        nominal probe was kept), ``parallax_frames`` (patterns the fit read)."""
        out = {f"parallax_{k}_m": float(v) for k, v in self.coefficients.items()}
        out.update({f"parallax_{k}_se_m": float(v) for k, v in self.standard_error.items()})
        out.update(parallax_significance=float(self.significance),
                   parallax_curvature_significance=float(self.curvature_significance),
                   parallax_applied=float(bool(applied)),
                   parallax_frames=float(frames), parallax_log_likelihood_gain=float(self.log_likelihood_gain))
        if self.null_p_value is not None:
            out["parallax_null_p_value"] = float(self.null_p_value)
        if confidence is not None:
            from scipy.stats import chi2

            out["parallax_confidence"] = float(confidence)
            out["parallax_threshold"] = float(chi2.ppf(confidence, max(len(self.coefficients), 1)))
        return out


def _scan_step(offsets: np.ndarray) -> float:
    """The scan's step: the median distance to the nearest other position."""
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(offsets).query(offsets, k=2)
    return float(np.median(dist[:, 1]))


def _scan_lattice(offsets: np.ndarray) -> np.ndarray:
    """The scan's lattice basis (2, 2), rows a₁, a₂ in metres, such that every offset is an
    integer combination of them (plus one common offset); ValueError when the scan is no lattice
    (spiral, random, jittered nominal positions)."""
    r = offsets - offsets[0]
    length = np.hypot(r[:, 0], r[:, 1])
    scale = float(length.max())
    order = np.argsort(length)
    order = order[length[order] > 1e-6 * scale]
    if len(order) < 2:
        raise ValueError("the alias-aware parallax fit needs a two-dimensional raster scan")
    a1 = r[order[0]]
    second = [i for i in order if abs(a1[0] * r[i, 1] - a1[1] * r[i, 0]) > 0.1 * length[order[0]] * length[i]]
    if not second:
        raise ValueError("the alias-aware parallax fit needs a two-dimensional raster scan")
    basis = np.stack([a1, r[second[0]]])
    coords = r @ np.linalg.inv(basis)
    if np.abs(coords - np.round(coords)).max() > 1e-3:
        raise ValueError("the alias-aware parallax fit needs a raster (lattice) scan: the nominal positions "
                         "are not integer combinations of two steps")
    return basis


def _alias_rows(offsets: np.ndarray, spacing: float, top: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The alias-aware fit's object frequencies on a raster.

    On a lattice scan e^{−2πi(q + G)·r_j} = e^{−2πi q·r_j}·const for every reciprocal lattice
    vector G, so the Fourier sum at q holds the object at q and at all its aliases q + G. Rows:
    the padded-grid frequencies (multiples of ``spacing``) inside one reciprocal cell (|fractional
    coordinate| < ½ along both lattice steps), one of each ±q pair, |q| ≥ 2 spacings; each with
    the aliases q + G of |q + G| ≤ ``top`` (G = 0 included when |q| ≤ ``top``). Returns the
    rows (Nq, 2) in padded steps, the alias slots (Nq, A) as indices into the lattice vectors
    (−1: empty) and those vectors (nG, 2) in 1/m, closed under negation, G = 0 first."""
    basis = _scan_lattice(offsets)
    recip = np.linalg.inv(basis).T  # rows b₁, b₂: a_i·b_j = δ_ij
    reach = 0.5 * float(np.hypot(*recip[0]) + np.hypot(*recip[1]))
    n = math.ceil(reach / spacing) + 1
    grid = np.arange(-n, n + 1)
    qy, qx = np.meshgrid(grid, grid, indexing="ij")
    qi = np.stack([qy.ravel(), qx.ravel()], axis=1)
    q = qi * spacing
    frac = q @ basis.T
    half = (qi[:, 0] > 0) | ((qi[:, 0] == 0) & (qi[:, 1] > 0))
    low = np.hypot(q[:, 0], q[:, 1]) >= 2.0 * spacing * (1 - 1e-9)
    keep = half & low & (np.abs(frac) < 0.5 - 1e-9).all(axis=1)
    qi, q = qi[keep], q[keep]
    g_max = math.ceil(top * float(np.hypot(*basis.T).max())) + 1
    ns = np.array([(a, b) for a in range(-g_max, g_max + 1) for b in range(-g_max, g_max + 1)])
    ns = ns[np.argsort(np.abs(ns).sum(axis=1), kind="stable")]  # G = 0 first
    vectors = ns @ recip
    shifted = q[:, None, :] + vectors[None]  # (Nq, nG, 2)
    inside = np.hypot(shifted[..., 0], shifted[..., 1]) <= top * (1 + 1e-9)
    rows = inside.any(axis=1)
    qi, inside = qi[rows], inside[rows]
    used = np.flatnonzero(inside.any(axis=0) | inside.any(axis=0)[_negation(ns)])
    remap = np.full(len(ns), -1)
    remap[used] = np.arange(len(used))
    width = int(inside.sum(axis=1).max())
    slots = np.full((len(qi), width), -1)
    for i, row in enumerate(inside):
        idx = remap[np.flatnonzero(row)]
        slots[i, :len(idx)] = idx
    return qi, slots, vectors[used]


def _negation(ns: np.ndarray) -> np.ndarray:
    """For each integer pair in ``ns``, the index of its negation in ``ns``."""
    index = {tuple(v): i for i, v in enumerate(ns.tolist())}
    return np.array([index[(-a, -b)] for a, b in ns.tolist()])


class BrightFieldModel:
    """The data's Fourier sums over the scan and the transfer model of a trial probe.

    The object frequencies q are multiples of dk/s (dk the detector's frequency step, s the
    smallest integer making that at most 1/(scan extent)), so Ψ(k ∓ q) are entries of one
    s-fold zero-padded FFT of the probe: a trial costs one FFT and a gather."""

    def __init__(
        self, frames: Any, positions_m: Any, probe: Any, pixel_size: float, energy_ev: float,
        mask: Any | None = None, names: tuple[str, ...] = ("C10", "C12a", "C12b"),
        max_frequency: float | None = None, bright_field_threshold: float = 0.5, shells: int = 6,
        nyquist_fraction: float = 0.9, fft_order: bool = False, max_frequencies: int | None = None,
        aliases: bool = False,
    ) -> None:
        xp = array_module(probe)
        if probe.ndim != 2 or probe.shape[0] != probe.shape[1]:
            raise ValueError(f"the parallax fit needs one (M, M) probe, got shape {tuple(probe.shape)}")
        frames_shape = tuple(frames.shape)
        if len(frames_shape) != 3 or frames_shape[1:] != tuple(probe.shape):
            raise ValueError(f"frames {frames_shape} do not match the probe {tuple(probe.shape)}")
        pos = np.asarray(to_numpy(positions_m), dtype=np.float64).reshape(-1, 2)
        if len(pos) != frames_shape[0]:
            raise ValueError(f"{len(pos)} positions for {frames_shape[0]} frames")
        if len(pos) < 9:
            raise ValueError(f"the parallax fit needs a scan of at least 9 positions, got {len(pos)}")
        self.xp = xp
        self.names = tuple(names)
        m = int(probe.shape[0])
        self.m = m
        self.pixel_size = float(pixel_size)
        self.cdt = complex_of(probe.dtype)
        rdt = real_of(self.cdt)
        self.spectrum = fft2(probe).astype(self.cdt)
        power = self.spectrum.real**2 + self.spectrum.imag**2
        bright = power > bright_field_threshold * power.max()
        if mask is not None:
            bright &= to_fft_order(asarray(mask, xp)).astype(bool)
        index = to_numpy(xp.nonzero(bright.ravel())[0])  # one size-dependent sync, at set-up
        self.n_pixels = int(index.shape[0])
        if self.n_pixels < 8:
            raise ValueError(f"only {self.n_pixels} bright-field pixels: the probe has no bright-field disc")
        self.index = asarray(index, xp)
        if isinstance(frames, np.ndarray):
            # host frames: only the bright-field pixels go to the device, not a second copy of
            # every frame beside the engine's own
            shifted = frames if fft_order else np.fft.ifftshift(frames, axes=(-2, -1))
            host = shifted.reshape(frames_shape[0], -1)[:, index]
            counts = asarray(np.ascontiguousarray(host), xp, rdt)
        else:
            shifted = frames if fft_order else to_fft_order(frames)
            counts = shifted.reshape(frames_shape[0], -1)[:, self.index].astype(rdt)
        mean = counts.mean(axis=0)
        # counting noise of D(q, k): variance ≈ K ȳ(k) (floored so an empty pixel weighs little)
        floor = 0.01 * mean.mean() + 1e-3
        self.weight = (1.0 / xp.sqrt(xp.maximum(mean, floor))).astype(rdt)

        offsets = pos - pos.mean(axis=0)
        self.offsets = offsets  #: (K, 2) nominal positions about their mean, metres
        span = float(max(np.ptp(offsets, axis=0).max(), pixel_size))
        dk = 1.0 / (m * self.pixel_size)
        self.oversample = max(1, math.ceil(span * dk))
        spacing = dk / self.oversample
        k_radius = math.sqrt(self.n_pixels / math.pi) * dk
        # beyond the scan step's Nyquist the Fourier sum over positions aliases
        top = min(nyquist_fraction * 0.5 / max(_scan_step(offsets), 1e-30), 2.0 * k_radius)
        if max_frequency is not None:
            top = min(top, float(max_frequency))
        self.top = top  #: 1/m, the highest object frequency used
        self.spacing = spacing  #: 1/m, the object frequencies' grid step
        self.aliases: np.ndarray | None = None
        if aliases:
            # rows: the frequencies of one reciprocal cell of the scan lattice (each count
            # combination once); columns: every alias q + G of each up to ``top``
            qi, self.aliases, alias_vectors = _alias_rows(offsets, spacing, top)
        else:
            n = int(top / spacing)
            grid = np.arange(-n, n + 1)
            qy, qx = np.meshgrid(grid, grid, indexing="ij")
            qi = np.stack([qy.ravel(), qx.ravel()], axis=1)
            r = np.hypot(qi[:, 0], qi[:, 1]) * spacing
            half = (qi[:, 0] > 0) | ((qi[:, 0] == 0) & (qi[:, 1] > 0))
            # |q| < 2 steps: the particle's mean and the ice, the least sensitive to aberrations
            qi = qi[half & (r <= top) & (r >= 2.0 * spacing * (1 - 1e-9))]
        if max_frequencies is not None and len(qi) > max_frequencies:
            # a fixed random subset: the cost is per frequency, and the information on the scan
            # matrix sits in the high frequencies that a disc-shaped cap would drop
            keep = np.sort(np.random.default_rng(0).choice(len(qi), size=int(max_frequencies), replace=False))
            qi = qi[keep]
            if self.aliases is not None:
                self.aliases = self.aliases[keep]
        if len(qi) < 4:
            raise ValueError(f"the scan gives only {len(qi)} usable object frequencies: too small a scan")
        self.q = qi * spacing  #: (Nq, 2) object frequencies, 1/m
        #: (K, Nk) each pattern's bright-field counts less their mean over the scan
        self.centred = (counts - mean[None]).astype(rdt)
        d = self._fourier_sum(self.centred)
        self.data = d * self.weight[None]  # (Nq, Nk) whitened
        energy_q = to_numpy((self.data.real**2 + self.data.imag**2).sum(axis=1)).astype(np.float64)
        self.energy = float(energy_q.sum())
        # gather indices into the s-fold padded spectrum: k → s·n, k ∓ q → s·n ∓ q/spacing
        big = self.oversample * m
        ny, nx = np.divmod(index, m)
        ny = np.where(ny >= (m + 1) // 2, ny - m, ny) * self.oversample
        nx = np.where(nx >= (m + 1) // 2, nx - m, nx) * self.oversample

        def flat(a: np.ndarray, b: np.ndarray) -> Any:
            return asarray(((a % big) * big + (b % big)).astype(np.int64), xp)

        self.qi = qi.astype(np.float64)  #: (Nq, 2) object frequencies in padded-grid steps
        self.at_k = flat(ny, nx)
        self.at_minus = flat(ny[None] - qi[:, :1], nx[None] - qi[:, 1:])  # Ψ(k − q)
        self.at_plus = flat(ny[None] + qi[:, :1], nx[None] + qi[:, 1:])  # Ψ(k + q)
        if self.aliases is not None:
            # Ψ(k − q − G) = spectrum of ψ(r)e^{2πiG·r} at k − q: one padded FFT per alias
            # vector G (exact, G is off the padded grid), stacked; slot g of row i reads the
            # spectrum aliases[i, g] (−1: an empty slot, masked), and Ψ*(k + q + G) the one of −G
            self.alias_vectors = alias_vectors  #: (nG, 2) the lattice vectors G, 1/m
            #: (Nq, A, 2) each slot's frequency q + G in padded steps (empty slots: q)
            self.alias_steps = self.qi[:, None, :] + (alias_vectors / spacing)[np.maximum(self.aliases, 0)] * (
                self.aliases >= 0)[..., None]
            negate = np.array([int(np.argmin(np.hypot(*(alias_vectors + v).T))) for v in alias_vectors])
            stride = big * big
            # an empty slot reads the zero appended after the last spectrum (a zero column)
            empty = (self.aliases < 0)[..., None]
            slot = np.maximum(self.aliases, 0)
            self.alias_minus = xp.where(asarray(empty, xp), len(alias_vectors) * stride,
                                        asarray(slot[..., None].astype(np.int64) * stride, xp) + self.at_minus[:, None])
            self.alias_plus = xp.where(asarray(empty, xp), len(alias_vectors) * stride,
                                       asarray(negate[slot][..., None].astype(np.int64) * stride, xp)
                                       + self.at_plus[:, None])
            ry, rx = np.indices((m, m)) * self.pixel_size
            # a list of device arrays (each trial loops over them: see ``moments``)
            self.alias_ramps = [asarray(r, xp, self.cdt) for r in np.exp(
                2j * np.pi * (alias_vectors[:, :1, None] * ry[None] + alias_vectors[:, 1:, None] * rx[None]))]
        self.basis = aberration_basis(tuple(probe.shape), pixel_size, energy_ev, self.names, xp).astype(rdt)
        # the probe's centre (its intensity centroid, window pixels): the Taylor expansion of
        # Ψ off the padded grid (scan matrix, :meth:`projected`) is centred there, so its phase
        # ramp is small
        inten = to_numpy(probe.real**2 + probe.imag**2).astype(np.float64)
        grid_y, grid_x = np.indices(inten.shape)
        self.centre = np.array([(inten * grid_y).sum(), (inten * grid_x).sum()]) / max(inten.sum(), 1e-300)
        rho_y, rho_x = (2.0 * np.pi * (g - c) / big for g, c in zip((grid_y, grid_x), self.centre))
        #: ρ_y, ρ_x, ρ_y², ρ_yρ_x, ρ_x²: the weights whose FFTs are Ψ's derivatives along the
        #: padded grid (first and second order); a list of device arrays, not one stacked array:
        #: the trials loop over them, and looping over a device array's rows is a device → host
        #: conversion (gpu/strict.py refuses it)
        self.moments = [asarray(w, xp, rdt) for w in (rho_y, rho_x, rho_y**2, rho_y * rho_x, rho_x**2)]
        self.evaluations = 0
        # per-frequency weights: the share of signal in each shell of |q| (a Wiener weight,
        # s/(1 + s) with s the shell's projected energy above the noise's 2σ² per frequency),
        # so shells of pure noise do not steer the fit
        nominal = self.projected(np.zeros(len(self.names)))
        #: model columns per frequency (row): 2, or 2 per alias
        self.columns = np.full(len(qi), 2) if self.aliases is None else 2 * (self.aliases >= 0).sum(axis=1)
        dof = float(np.maximum(self.n_pixels - self.columns, 1).sum())
        self.sigma2 = max((self.energy - float(nominal.sum())) / dof, 1e-300)
        radius = np.hypot(*self.q.T)
        edges = np.linspace(2.0 * spacing, max(top, float(radius.max())), shells + 1)
        shell = np.clip(np.digitize(radius, edges) - 1, 0, shells - 1)
        self.q_weight = np.zeros(len(qi))
        for i in range(shells):
            sel = shell == i
            if sel.any():
                # the noise projects σ² per column
                snr = max(float(nominal[sel].mean()) / (float(self.columns[sel].mean()) * self.sigma2) - 1.0, 0.0)
                self.q_weight[sel] = snr / (1.0 + snr)

    def _fourier_sum(self, values: Any) -> Any:
        """Σ_j values_j(k) e^{−2πi q·r_j} for every frequency q: (Nq, Nk)."""
        phase = np.exp(-2j * np.pi * (self.q @ self.offsets.T))  # (Nq, K)
        return asarray(phase, self.xp, self.cdt) @ values.astype(self.cdt)

    def noise_surrogate(self, rng: np.random.Generator) -> Any:
        """Whitened Fourier sums of the patterns' deviations from the mean with a random sign
        each: the coherent object signal cancels, what each pattern holds beyond it (counting
        noise, and whatever else varies from pattern to pattern) stays, with the scan's own
        correlations between frequencies (aliases past Nyquist). (Nq, Nk) like :attr:`data`."""
        signs = asarray(rng.choice((-1.0, 1.0), size=(self.centred.shape[0], 1)), self.xp, self.centred.dtype)
        return self._fourier_sum(self.centred * signs) * self.weight[None]

    def projected(self, coefficients: np.ndarray, scan: np.ndarray | None = None,
                  data: Any | None = None, fitted: bool = False) -> Any:
        """Energy of each frequency's data in the span of its two model columns, for the probe
        with the extra aberrations ``coefficients`` (metres), (Nq,) host floats.

        ``scan``: the scan matrix's error E = A − I (2×2, acting on (y, x) offsets: the probe
        was at r + E r for the nominal r). The nominal Fourier sum at q' then sees the object
        at q = A⁻ᵀ q', through the columns Ψ*(k)Ψ(k − q), Ψ(k)Ψ*(k + q): Ψ off the padded grid,
        by a second-order Taylor expansion about the nominal gather points (shifts of a few
        per cent of q', a fraction of a padded step). ``data``: other whitened sums in place of
        the data's (:meth:`noise_surrogate`); ``fitted``: the projection itself, (Nq, Nk) on the
        backend, instead of its energy."""
        xp = self.xp
        self.evaluations += 1
        chi = xp.tensordot(asarray(np.asarray(coefficients, dtype=np.float64), xp, self.basis.dtype),
                           self.basis, axes=1)
        psi = ifft2(self.spectrum * xp.exp(-1j * chi).astype(self.cdt))
        big = self.oversample * self.m
        padded = xp.zeros((big, big), dtype=self.cdt)
        padded[:self.m, :self.m] = psi  # zero-padded: its FFT interpolates Ψ between the k
        spec = fft2(padded).ravel()
        at_k = spec[self.at_k]
        d = self.data if data is None else data
        if self.aliases is not None:
            return self._projected_aliases(psi, padded, at_k, scan, d, fitted)
        if scan is None or not np.any(scan):
            minus, plus = spec[self.at_minus], spec[self.at_plus]
        else:
            a_inv = np.linalg.inv(np.eye(2) + np.asarray(scan, dtype=np.float64).reshape(2, 2))
            shift = self.qi @ (a_inv - np.eye(2))  # rows: A⁻ᵀq' − q' in padded steps
            derivs = []
            for w in self.moments:
                padded[:self.m, :self.m] = psi * w
                derivs.append(fft2(padded).ravel())
            minus = self._off_grid(spec, derivs, self.at_minus, -shift)
            plus = self._off_grid(spec, derivs, self.at_plus, shift)
        g1 = xp.conj(at_k)[None] * minus * self.weight[None]  # Ψ*(k) Ψ(k − q)
        g2 = at_k[None] * xp.conj(plus) * self.weight[None]  # Ψ(k) Ψ*(k + q)
        h11 = (g1.real**2 + g1.imag**2).sum(axis=1)
        h22 = (g2.real**2 + g2.imag**2).sum(axis=1)
        h12 = (xp.conj(g1) * g2).sum(axis=1)
        b1 = (xp.conj(g1) * d).sum(axis=1)
        b2 = (xp.conj(g2) * d).sum(axis=1)
        det = h11 * h22 - (h12.real**2 + h12.imag**2)
        tiny = 1e-9 * (h11 * h22) + 1e-300
        if fitted:
            det = xp.maximum(det, tiny)
            x1 = (h22 * b1 - h12 * b2) / det
            x2 = (h11 * b2 - xp.conj(h12) * b1) / det
            return g1 * x1[:, None] + g2 * x2[:, None]
        # bᴴ H⁻¹ b for the Hermitian 2×2 H = [[h11, h12], [h12*, h22]]
        quad = (h22 * (b1.real**2 + b1.imag**2) + h11 * (b2.real**2 + b2.imag**2)
                - 2.0 * (xp.conj(b1) * h12 * b2).real) / xp.maximum(det, tiny)
        return to_numpy(quad).astype(np.float64)

    def _projected_aliases(self, psi: Any, padded: Any, at_k: Any, scan: np.ndarray | None, d: Any,
                           fitted: bool = False) -> Any:
        """:meth:`projected` with every alias: the energy of each row's data in the span of
        the 2 columns of each alias q + G, Ψ*(k)Ψ(k − q − G) and Ψ(k)Ψ*(k + q + G); with
        ``scan``, at the object frequency A⁻ᵀ(q + G) each alias's data come from."""
        xp = self.xp
        zero = [xp.zeros(1, dtype=self.cdt)]  # what an empty slot reads
        spectra = []
        moved = scan is not None and np.any(scan)
        derivs: list[list[Any]] = [[] for _ in self.moments] if moved else []
        for ramp in self.alias_ramps:
            shifted = psi * ramp
            padded[:self.m, :self.m] = shifted
            spectra.append(fft2(padded).ravel())
            for out, w in zip(derivs, self.moments):
                padded[:self.m, :self.m] = shifted * w
                out.append(fft2(padded).ravel())
        stack = xp.concatenate(spectra + zero)
        if moved:
            a_inv = np.linalg.inv(np.eye(2) + np.asarray(scan, dtype=np.float64).reshape(2, 2))
            # rows: A⁻ᵀ(q + G) − (q + G) in padded steps, per row and alias slot
            shift = self.alias_steps @ (a_inv - np.eye(2))
            dstack = [xp.concatenate(d + zero) for d in derivs]
            minus = self._off_grid(stack, dstack, self.alias_minus, -shift)
            plus = self._off_grid(stack, dstack, self.alias_plus, shift)
        else:
            minus, plus = stack[self.alias_minus], stack[self.alias_plus]
        weighted = at_k * self.weight
        g1 = xp.conj(weighted) * minus  # (Nq, A, Nk): Ψ*(k)Ψ(k − q − G)
        g2 = weighted * xp.conj(plus)  # Ψ(k)Ψ*(k + q + G)
        g = xp.concatenate([g1, g2], axis=1)  # (Nq, 2A, Nk)
        h = xp.conj(g) @ xp.swapaxes(g, 1, 2)  # Gᴴ G per row, (Nq, 2A, 2A)
        b = (xp.conj(g) @ d[:, :, None])[..., 0]  # Gᴴ d
        diag = xp.real(xp.diagonal(h, axis1=1, axis2=2))
        # empty slots have zero columns: a unit diagonal there keeps H invertible (their b is 0);
        # a relative ridge keeps nearly collinear aliases (low overlap) from amplifying noise
        ridge = 1e-9 * diag.max(axis=1, keepdims=True) + (diag <= 0)
        h = h + ridge[..., None] * xp.eye(h.shape[1], dtype=h.dtype)[None]
        x = xp.linalg.solve(h, b[..., None])[..., 0]
        if fitted:
            return (x[:, None, :] @ g)[:, 0, :]
        return to_numpy(xp.real((xp.conj(b) * x).sum(axis=1))).astype(np.float64)

    def _off_grid(self, spec: Any, derivs: list[Any], at: Any, shift: np.ndarray) -> Any:
        """Ψ at the gather points ``at`` (Nq, Nk) moved by ``shift`` (Nq, 2) padded steps
        (or (Nq, A, Nk) and (Nq, A, 2): per alias slot)."""
        xp = self.xp
        big = self.oversample * self.m
        dy = asarray(shift[..., :1], xp, self.basis.dtype)
        dx = asarray(shift[..., 1:], xp, self.basis.dtype)
        # the centred expansion's phase: Ψ(u + δ) = e^{−2πi δ·c/big} Σ ψ(r) e^{−2πi u·r/big} e^{−iδ·ρ}
        ramp = asarray(np.exp(-2j * np.pi * (shift @ self.centre) / big)[..., None], xp, self.cdt)
        sy, sx, syy, syx, sxx = (d[at] for d in derivs)
        return ramp * (spec[at] - 1j * (dy * sy + dx * sx)
                       - 0.5 * (dy * dy * syy + 2.0 * dy * dx * syx + dx * dx * sxx))

    def log_likelihood(self, coefficients: np.ndarray, scan: np.ndarray | None = None) -> float:
        """Σ_q w_q · projected energy / σ²: the log-likelihood of the transfer model (object
        frequencies free, Gaussian noise of the residual's level σ²), each frequency weighted by
        its shell's signal share. ``scan``: the scan matrix's error (:meth:`projected`)."""
        return float((self.q_weight * self.projected(coefficients, scan)).sum()) / self.sigma2

    def explained(self, coefficients: np.ndarray, scan: np.ndarray | None = None) -> float:
        """Share of the whitened data energy that the probe explains (unweighted)."""
        return float(self.projected(coefficients, scan).sum()) / max(self.energy, 1e-300)


#: the widest probe the wide parallax fit (``parallax_wide_reach``, reconstruct.py) is made for,
#: as a share of the scan's narrower side (:func:`probe_width`, :func:`scan_width`). The model's Fourier sum over a scan of
#: extent L holds the object's frequencies within ~1/L of each q, across which the columns
#: Ψ*(k)Ψ(k − q) turn by 2π × the parallax shift × 1/L — up to the probe's half width over L.
#: Noiseless, a 20 nm defocus error (a defocused probe of 8 mrad, 60 nm) was found at 20 nm at
#: both reaches for width / scan 0.33–0.51 and missed at 0.59–0.66 (15 or 50 nm at reach 1.8,
#: 10 nm at 0.9 for 0.66); the limit sits between (MEASUREMENTS.md, "The parallax fit on scans
#: barely wider than the probe").
MAX_PROBE_TO_SCAN = 0.55


def probe_width(probe: Any, pixel_size: float) -> float:
    """The probe's width, metres: 2√2 × the rms radius of |ψ|² about its centroid (a uniform
    disc's diameter), taken around the window (a probe wider than its window wraps round it,
    and then measures about the window's width)."""
    xp = array_module(probe)
    power = xp.abs(probe) ** 2
    m = int(probe.shape[-1])
    variance = 0.0
    for axis in (1, 0):
        marginal = to_numpy(power.sum(axis=axis)).astype(np.float64)  # one small read per axis
        marginal /= max(float(marginal.sum()), 1e-300)
        n = np.arange(marginal.shape[0])
        centre = np.angle((marginal * np.exp(2j * np.pi * n / m)).sum()) / (2 * np.pi) * m
        d = (n - centre + m / 2) % m - m / 2
        variance += float((marginal * d**2).sum())
    return 2.0 * math.sqrt(2.0 * variance) * float(pixel_size)


def scan_width(positions_m: Any) -> float:
    """The scan's extent along its narrower side (of the positions' bounding box), metres."""
    pos = np.asarray(to_numpy(positions_m), dtype=np.float64).reshape(-1, 2)
    return float(np.ptp(pos, axis=0).min())


def _grid_best(f: Any, centre: np.ndarray, axes: list[int], span: float, n: int) -> np.ndarray:
    """The best point of an n^len(axes) grid of half-width ``span`` around ``centre``."""
    best_x, best_v = centre, f(centre)
    values = np.linspace(-span, span, n)
    for combo in np.array(np.meshgrid(*([values] * len(axes)), indexing="ij")).reshape(len(axes), -1).T:
        x = centre.copy()
        x[axes] += combo
        v = f(x)
        if v > best_v:
            best_x, best_v = x, v
    return best_x


def _hessian(f: Any, x: np.ndarray, h: float) -> np.ndarray:
    """Central-difference Hessian of ``f`` at ``x`` with step ``h``."""
    n = len(x)
    out = np.zeros((n, n))
    f0 = f(x)
    for i in range(n):
        for j in range(i, n):
            if i == j:
                e = np.eye(n)[i] * h
                out[i, i] = (f(x + e) - 2.0 * f0 + f(x - e)) / h**2
            else:
                ei, ej = np.eye(n)[i] * h, np.eye(n)[j] * h
                out[i, j] = out[j, i] = (f(x + ei + ej) - f(x + ei - ej) - f(x - ei + ej)
                                         + f(x - ei - ej)) / (4.0 * h * h)
    return out


def _per_frequency_gradient(per_q: Any, x: np.ndarray, h: float) -> np.ndarray:
    """(Nq, len(x)) central-difference gradients of each term of ``per_q`` at ``x``, step ``h``."""
    cols = []
    for i in range(len(x)):
        e = np.eye(len(x))[i] * h
        cols.append((per_q(x + e) - per_q(x - e)) / (2.0 * h))
    return np.stack(cols, axis=1)


def _polish(f: Any, x: np.ndarray, free: list[int], step: float) -> np.ndarray:
    """Nelder–Mead on the coordinates ``free`` of ``x`` (maximising ``f``), simplex size ``step``."""
    from scipy.optimize import minimize

    def g(v: np.ndarray) -> float:
        y = x.copy()
        y[free] = v
        return -f(y)

    v0 = x[free]
    simplex = np.vstack([v0] + [v0 + np.eye(len(free))[i] * step for i in range(len(free))])
    res = minimize(g, v0, method="Nelder-Mead",
                   # 0.1 nm and 10⁻³ of log-likelihood: far below the estimate's spread (≥ 3 nm,
                   # MEASUREMENTS.md); tighter only spent trials (realistic proteasome: 268 → 58
                   # polish trials, the same estimate to 0.05 nm)
                   options={"initial_simplex": simplex, "xatol": 0.1, "fatol": 1e-3, "maxiter": 300})
    out = x.copy()
    if -res.fun >= f(x):
        out[free] = res.x
    return out


def estimate_aberrations(
    frames: Any, positions_m: Any, probe: Any, pixel_size: float, energy_ev: float,
    mask: Any | None = None, names: tuple[str, ...] | list[str] = ("C10", "C12a", "C12b"),
    search_range_m: float = 60e-9, prior_rms_m: float | None = 20e-9,
    max_frequency: float | None = None, fft_order: bool = False, cancel: threading.Event | None = None,
    start: dict[str, float] | None = None, scan: bool = False, scan_prior_rms: float = 0.03,
    nyquist_fraction: float = 0.9, max_frequencies: int | None = None, aliases: bool = False,
    noise_draws: int = 2, null_draws: int = 0, null_confidence: float = 0.95,
) -> ParallaxFit:
    """The aberrations of the true probe relative to ``probe`` (the nominal one), from the
    bright-field disc of every pattern (module docstring).

    ``frames`` (K, M, M) counts in detector order, ``positions_m`` (K, 2) the nominal probe
    centres, ``probe`` (M, M) the nominal probe on the frames' backend, ``mask`` the valid
    detector pixels (detector order); ``fft_order``: the frames are already in FFT order (the
    live engine's frame store), so they are not shifted (no copy of the store). Maximises the weighted log-likelihood of the transfer
    model (:meth:`BrightFieldModel.log_likelihood`) plus a Gaussian prior of rms
    ``prior_rms_m`` on each coefficient (None: no prior): at a dose too low to tell, the
    estimate stays near the nominal probe instead of following the noise. Stages: C10 alone (a
    grid over ±``search_range_m``, a Nelder–Mead polish), then all of ``names`` from there (a
    grid over the next two within ±``search_range_m``/2, a polish of all). Returns a
    :class:`ParallaxFit`; its coefficients are what ``probes.aberrate`` adds to ``probe``.
    ``cancel``: once set, the fit raises :class:`FitCancelled` at its next trial probe (the live
    engine drops a fit whose result it will not use, so that it stops taking CPU time).
    ``start``: an earlier estimate (metres by name, e.g. from part of the scan): the fit skips
    the grids and polishes all of ``names`` from there (about half the evaluations).
    ``scan``: also fit the scan matrix's error E = A − I (four entries, a Gaussian prior of rms
    ``scan_prior_rms`` each): a last stage polishes the aberrations and E together, and the
    standard errors and significances come from the joint curvature (see
    :attr:`ParallaxFit.scan_matrix`). ``nyquist_fraction``: the highest object frequency used,
    as a fraction of the scan step's Nyquist frequency (on a raster the Fourier sum aliases
    beyond 1; a spiral or random scan does not alias exactly, and there frequencies up to
    about twice it carry most of what the fit learns about the scan matrix);
    ``max_frequencies``: at most this many of them, a fixed random subset. ``aliases``: on a
    raster, model each frequency of one reciprocal cell of the scan lattice together with all
    its aliases up to ``nyquist_fraction`` × Nyquist in one least squares (the alias-aware fit,
    module docstring): every count combination is used once, so the χ² significance stays
    calibrated past Nyquist; ValueError on a scan that is no lattice. ``noise_draws``: surrogates
    of the data the gate's covariance is measured on (module docstring, "The gate").
    ``null_draws``: when the fit's :attr:`ParallaxFit.significance` rejects the nominal probe at
    ``null_confidence``, refit up to this many null surrogates of the data (the nominal probe's
    fitted signal plus sign-flipped pattern deviations) with the whole search, and set
    :attr:`ParallaxFit.null_p_value` (this docstring, below; MEASUREMENTS.md, "The two parallax gates' family-wise rate"); 0: none."""
    names = tuple(names)
    if not names:
        raise ValueError("the parallax fit needs at least one aberration coefficient")
    if noise_draws < 1:
        raise ValueError(f"noise_draws must be at least 1, got {noise_draws!r}")
    if prior_rms_m is not None and not prior_rms_m > 0:
        raise ValueError(f"prior_rms_m must be positive metres or None, got {prior_rms_m!r}")
    if null_draws < 0:
        raise ValueError(f"null_draws must be 0 or more, got {null_draws!r}")
    model = BrightFieldModel(frames, positions_m, probe, pixel_size, energy_ev, mask, names, max_frequency,
                             fft_order=fft_order, nyquist_fraction=nyquist_fraction,
                             max_frequencies=max_frequencies, aliases=aliases)
    fit = _fit_model(model, names, search_range_m, prior_rms_m, cancel, start, scan, scan_prior_rms, noise_draws)
    if null_draws and fit.rejects_nominal(null_confidence):
        fit.null_p_value, extra = _search_null(model, fit, names, search_range_m, prior_rms_m, cancel, scan,
                                               scan_prior_rms, noise_draws, null_draws, null_confidence)
        fit.evaluations += extra
    return fit


def _search_null(model: BrightFieldModel, fit: ParallaxFit, names: tuple[str, ...], search_range_m: float,
                 prior_rms_m: float | None, cancel: threading.Event | None, scan: bool, scan_prior_rms: float,
                 noise_draws: int, draws: int, confidence: float) -> tuple[float, int]:
    """(p-value, trial probes) of ``fit``'s significance under the null of the whole search
    (this docstring, below; MEASUREMENTS.md, "The two parallax gates' family-wise rate"): (k + 1)/(B + 1) over B = ``draws`` refitted
    surrogates, k of them at least as significant. The draws stop once k makes the p-value
    exceed 1 − ``confidence`` whatever the rest find (the null stands; the value returned is
    then a lower bound, already above the level)."""
    # the null's data: the nominal probe's fitted signal, its projected noise taken out per
    # shell (×√(signal share), as the gate's surrogates), plus sign-flipped pattern deviations:
    # the counting noise and the jitter-scattered signal the model does not hold (counting
    # noise alone, drawn at each count's Poisson variance, let 2 of 20 jittered 10³-count scans
    # through where these let none; at high counts these also carry the object's incoherent
    # variation, a null on the safe side); a seed of its own, so that the decision repeats
    n = len(names)
    signal = model.projected(np.zeros(n), None, fitted=True) * asarray(
        np.sqrt(model.q_weight)[:, None], model.xp, real_of(model.cdt))
    rng = np.random.default_rng(1)
    alpha = 1.0 - confidence
    exceed, spent = 0, 0
    for b in range(draws):
        if cancel is not None and cancel.is_set():
            raise FitCancelled("the parallax fit was cancelled")
        surrogate = copy.copy(model)
        surrogate.data = signal + model.noise_surrogate(rng)
        surrogate.evaluations = 0
        refit = _fit_model(surrogate, names, search_range_m, prior_rms_m, cancel, None, scan, scan_prior_rms,
                           noise_draws)
        spent += surrogate.evaluations
        exceed += refit.significance >= fit.significance
        if (exceed + 1) / (draws + 1) > alpha * (1.0 + 1e-9):  # (1/5 against 1 − 0.8 in floats)
            return (exceed + 1) / (b + 2), spent
    return (exceed + 1) / (draws + 1), spent


def _fit_model(model: BrightFieldModel, names: tuple[str, ...], search_range_m: float, prior_rms_m: float | None,
               cancel: threading.Event | None, start: dict[str, float] | None, scan: bool, scan_prior_rms: float,
               noise_draws: int) -> ParallaxFit:
    """:func:`estimate_aberrations`' search, gate and record on ``model`` (its data, or a
    surrogate's in their place)."""
    n = len(names)
    unit = 1e-9  # search in nanometres
    x0 = np.zeros(n)
    inv_var = 0.0 if prior_rms_m is None else (unit / prior_rms_m) ** 2
    base = model.log_likelihood(x0)

    def check_cancel() -> None:
        """Before each trial probe: a cancelled fit stops here (and ``cancel`` counts the trial)."""
        if cancel is not None and cancel.is_set():
            raise FitCancelled("the parallax fit was cancelled")

    def score(x: np.ndarray) -> float:
        check_cancel()
        return model.log_likelihood(x * unit) - base - 0.5 * inv_var * float(np.sum(x**2))

    span = search_range_m / unit
    first = [names.index("C10")] if "C10" in names else [0]
    rest = [i for i in range(n) if i not in first]
    if start is not None:
        warm = np.clip([float(start.get(k, 0.0)) / unit for k in names], -span, span)
        best = _polish(score, warm if score(warm) > score(x0) else x0.copy(), list(range(n)), span / 24)
        rest = []
    else:
        best = _polish(score, _grid_best(score, x0.copy(), first, span, 25), first, span / 24)
    if rest:
        trial = _grid_best(score, best.copy(), rest[:2], span / 2, 9 if len(rest[:2]) == 2 else 17)
        for extra in rest[2:]:
            trial = _grid_best(score, trial, [extra], span / 2, 17)
        best = _polish(score, trial, list(range(n)), span / 24)
    if scan:
        if not scan_prior_rms > 0:
            raise ValueError(f"scan_prior_rms must be a positive fraction, got {scan_prior_rms!r}")
        # joint parameters: the aberrations (nm) and the four entries of A − I (per cent)
        pct = 0.01
        inv_var_scan = (pct / scan_prior_rms) ** 2

        def joint(x: np.ndarray) -> float:
            check_cancel()
            e = (x[n:] * pct).reshape(2, 2)
            return (model.log_likelihood(x[:n] * unit, e) - base - 0.5 * inv_var * float(np.sum(x[:n] ** 2))
                    - 0.5 * inv_var_scan * float(np.sum(x[n:] ** 2)))

        x = _polish(joint, np.concatenate([best, np.zeros(4)]), list(range(n + 4)), span / 24)
        hessian = _hessian(joint, x, 2.0)
        best = x[:n]
    else:
        hessian = _hessian(score, best, 2.0)
        x = best
    # the score's gradient scatters also by the noise alone (noise × noise, which the curvature
    # does not see): measured on sign-flipped surrogates of the data (module docstring, "The gate")
    rng = np.random.default_rng(0)
    noise_scatter = np.zeros((len(x), len(x)))
    e_best = None if not scan else (x[n:] * pct).reshape(2, 2)
    # the fitted signal, its projected noise taken out per shell (×√(signal share)); the gate's
    # trial probes (2 per coefficient and surrogate) are the fit's like any other: a cancel
    # stops them, and a FitProgress counts them
    check_cancel()
    signal = model.projected(x[:n] * unit, e_best, fitted=True) * asarray(
        np.sqrt(model.q_weight)[:, None], model.xp, real_of(model.cdt))
    for _ in range(noise_draws):
        surrogate = signal + model.noise_surrogate(rng)

        def per_q(v: np.ndarray, surrogate: Any = surrogate) -> np.ndarray:
            check_cancel()
            e = None if not scan else (v[n:] * pct).reshape(2, 2)
            return model.q_weight * model.projected(v[:n] * unit, e, surrogate) / model.sigma2

        g = _per_frequency_gradient(per_q, x, 1.0)
        noise_scatter += g.T @ g / noise_draws
    # the curvature's own share stays in (a surrogate's fitted signal is shrunk to its expected
    # share, so at low signal the measured scatter alone would undercount it)
    prior = np.concatenate([np.full(n, inv_var), np.full(len(x) - n, inv_var_scan if scan else 0.0)])
    scatter = -hessian - np.diag(prior) + noise_scatter
    scan_fields: dict[str, Any] = {}
    try:
        cov = np.linalg.inv(-hessian)
        se_all = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        # each block's distance from nominal under its marginal posterior (the other block free)
        curvature = float(best @ np.linalg.inv(cov[:n, :n]) @ best)
        sandwich = cov @ scatter @ cov
        se = np.sqrt(np.clip(np.diag(sandwich), 0.0, None))[:n]
        significance = float(best @ np.linalg.pinv(sandwich[:n, :n]) @ best)
        if scan:
            e = x[n:]
            scan_fields = {"scan_significance": float(e @ np.linalg.inv(cov[n:, n:]) @ e),
                           "scan_standard_error": tuple(float(v * pct) for v in se_all[n:])}
    except np.linalg.LinAlgError:
        se, significance, curvature = np.full(n, np.inf), 0.0, 0.0
        if scan:
            scan_fields = {"scan_significance": 0.0, "scan_standard_error": (math.inf,) * 4}
    fitted_scan = None
    if scan:
        scan_fields["scan_matrix"] = tuple(float(v * pct) for v in x[n:])
        fitted_scan = (x[n:] * pct).reshape(2, 2)
    return ParallaxFit(
        coefficients={name: float(best[i] * unit) for i, name in enumerate(names)},
        explained_nominal=model.explained(x0), explained=model.explained(best * unit, fitted_scan),
        frequencies=len(model.q), pixels=model.n_pixels, evaluations=model.evaluations,
        log_likelihood_gain=model.log_likelihood(best * unit, fitted_scan) - base,
        standard_error={name: float(se[i] * unit) for i, name in enumerate(names)},
        significance=significance, curvature_significance=curvature, **scan_fields,
    )


__all__ = ["MAX_PROBE_TO_SCAN", "BrightFieldModel", "FitCancelled", "ParallaxFit", "estimate_aberrations",
           "probe_width", "scan_width"]
