"""Probe (illumination) models from physical parameters — the paper's three designs (Fig. 5).

All probes are formed in the probe-forming aperture (reciprocal space), then propagated to the
sample plane:   ψ(r) = F⁻¹[ A(k) · P(k) · exp(−i χ(k)) ],   χ(k) = π λ Δf |k|² + π/2 Cs λ³ |k|⁴
with A the aperture of semi-angle α (|k| ≤ α/λ), P a phase plate (1, a Fresnel zone plate or a
random holographic plate) and Δf > 0 meaning underfocus (probe focused above the sample).
Probes are returned centred in the M×M window and normalised to ``total_intensity`` (= counts
per pattern under the unitary FFT convention).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Literal

import numpy as np

from .backend import (
    array_module,
    complex_dtype,
    complex_of,
    dev_float,
    fft2,
    host_floats,
    ifft2,
    real_of,
    scalar_as,
    to_numpy,
)
from .geometry import wavelength

ProbeKind = Literal["defocused", "fzp", "randomized"]


def _k_grid(shape: tuple[int, int], pixel_size: float, xp: ModuleType) -> tuple[Any, Any]:
    ky = xp.fft.fftfreq(shape[0], pixel_size)[:, None]
    kx = xp.fft.fftfreq(shape[1], pixel_size)[None, :]
    return ky, kx


def aberration_phase(
    shape: tuple[int, int], pixel_size: float, energy_ev: float, defocus: float, cs: float = 0.0,
    xp: ModuleType = np,
) -> Any:
    """χ(k) on the FFT-ordered grid (radians)."""
    lam = wavelength(energy_ev)
    ky, kx = _k_grid(shape, pixel_size, xp)
    k2 = ky * ky + kx * kx
    return np.pi * lam * defocus * k2 + 0.5 * np.pi * cs * lam**3 * k2 * k2


def aperture(
    shape: tuple[int, int], pixel_size: float, energy_ev: float, semiangle: float,
    xp: ModuleType = np, edge_px: float = 1.0,
) -> Any:
    """Probe-forming aperture (FFT order) with a soft edge ``edge_px`` reciprocal pixels wide
    (a hard edge rings in real space and wraps around the window)."""
    lam = wavelength(energy_ev)
    nyquist_angle = lam / (2.0 * pixel_size)
    if not 0 < semiangle <= nyquist_angle:
        raise ValueError(
            f"convergence semi-angle {semiangle * 1e3:.2f} mrad must be in (0, "
            f"{nyquist_angle * 1e3:.2f}] mrad, the largest angle sampled by {pixel_size * 1e10:.2f} Å "
            "pixels at this energy"
        )
    ky, kx = _k_grid(shape, pixel_size, xp)
    kr = xp.sqrt(ky * ky + kx * kx)
    k_max = semiangle / lam
    dk = 1.0 / (max(shape) * pixel_size)
    return xp.clip((k_max - kr) / (edge_px * dk) + 0.5, 0.0, 1.0)


def fresnel_zone_plate(
    shape: tuple[int, int], pixel_size: float, energy_ev: float, semiangle: float, zones: int = 8,
    xp: ModuleType = np,
) -> Any:
    """Binary (0/π) phase zone plate filling the aperture with ``zones`` zones, zone edges at
    radii k_n = k_max·√(n / zones) as for a Fresnel lens."""
    lam = wavelength(energy_ev)
    ky, kx = _k_grid(shape, pixel_size, xp)
    k2 = (ky * ky + kx * kx) / (semiangle / lam) ** 2
    zone = xp.floor(k2 * zones).astype(np.int64)
    return xp.exp(1j * np.pi * (zone % 2))


def random_phase_plate(
    shape: tuple[int, int], pixel_size: float, diameter: float, seed: int = 0, xp: ModuleType = np,
) -> Any:
    """A smooth random phase plate whose in-focus probe is a speckle of about ``diameter``
    metres: white phase noise in the aperture plane, band-limited so that its Fourier transform
    (the sample-plane field) is confined to a Gaussian envelope of that diameter."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    y = (np.fft.fftfreq(shape[0]) * shape[0] * pixel_size)[:, None]
    x = (np.fft.fftfreq(shape[1]) * shape[1] * pixel_size)[None, :]
    sigma = diameter / 4.0
    envelope = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    smooth = np.fft.fft2(np.fft.ifft2(noise) * envelope)
    phase = np.angle(smooth)
    return xp.asarray(np.exp(1j * phase))


#: Aberration coefficients of :func:`aberration_basis`, in metres (Krivanek's names; C10 here
#: is the defocus Δf of :func:`make_probe`, > 0 underfocus).
ABERRATIONS: tuple[str, ...] = ("C10", "C12a", "C12b", "C21a", "C21b", "C30")


def aberration_basis(
    shape: tuple[int, int], pixel_size: float, energy_ev: float, names: tuple[str, ...] = ABERRATIONS,
    xp: ModuleType = np,
) -> Any:
    """χ per metre of each coefficient of ``names`` on the FFT-ordered grid, (n, M, M) radians/m:
    χ(k) = (2π/λ)[½ C10 ω² + ½ ω² (C12a cos 2φ + C12b sin 2φ) + ⅓ ω³ (C21a cos φ + C21b sin φ)
    + ¼ C30 ω⁴], ω = λ|k| and φ the azimuth of k (x towards y). χ is linear in the
    coefficients, so a probe's aberrations are a dot product with this basis."""
    lam = wavelength(energy_ev)
    ky, kx = _k_grid(shape, pixel_size, xp)
    k2 = ky * ky + kx * kx
    terms = {
        "C10": 0.5 * lam**2 * k2,
        "C12a": 0.5 * lam**2 * (kx * kx - ky * ky),
        "C12b": lam**2 * kx * ky,
        "C21a": lam**3 * k2 * kx / 3.0,
        "C21b": lam**3 * k2 * ky / 3.0,
        "C30": 0.25 * lam**4 * k2 * k2,
    }
    unknown = [n for n in names if n not in terms]
    if unknown:
        raise ValueError(f"unknown aberration(s) {unknown}: choose from {ABERRATIONS}")
    scale = 2.0 * np.pi / lam
    return xp.stack([xp.broadcast_to(scale * terms[n], (shape[0], shape[1])) for n in names])


def aberrate(probe: Any, pixel_size: float, energy_ev: float, coefficients: dict[str, float]) -> Any:
    """``probe`` with the extra aberrations ``coefficients`` (metres, names of
    :data:`ABERRATIONS`): ψ' = F⁻¹[F ψ · exp(−i χ)]. Its power is unchanged."""
    xp = array_module(probe)
    names = tuple(coefficients)
    if not names:
        return probe.copy()
    basis = aberration_basis(tuple(probe.shape), pixel_size, energy_ev, names, xp)
    c = xp.asarray([float(coefficients[n]) for n in names])
    chi = (basis * c[:, None, None]).sum(axis=0)
    return ifft2(fft2(probe) * xp.exp(-1j * chi).astype(complex_of(probe.dtype)))


def make_probe(
    kind: ProbeKind,
    shape: tuple[int, int],
    pixel_size: float,
    energy_ev: float = 300e3,
    semiangle: float = 9.2e-3,
    defocus: float | None = None,
    cs: float = 0.0,
    total_intensity: float = 1.0,
    zones: int = 8,
    diameter: float | None = None,
    seed: int = 0,
    xp: ModuleType = np,
    precision: str = "single",
) -> Any:
    """A probe of one of the paper's designs (defaults: 300 keV, α = 9.2 mrad).

    * ``defocused``: plain aperture, Δf = 400 nm by default.
    * ``fzp``: Fresnel zone plate phase in the aperture, Δf = 600 nm by default.
    * ``randomized``: holographic random phase plate focused by the lens (Δf = 0 by default);
      ``diameter`` sets the speckle extent (default: half the window).
    """
    if kind not in ("defocused", "fzp", "randomized"):
        raise ValueError(f"unknown probe kind {kind!r}: choose defocused, fzp or randomized")
    if defocus is None:
        defocus = {"defocused": 400e-9, "fzp": 600e-9, "randomized": 0.0}[kind]
    field = aperture(shape, pixel_size, energy_ev, semiangle, xp).astype(np.complex128)
    if kind == "fzp":
        field = field * fresnel_zone_plate(shape, pixel_size, energy_ev, semiangle, zones, xp)
    elif kind == "randomized":
        extent = diameter if diameter is not None else 0.5 * min(shape) * pixel_size
        field = field * random_phase_plate(shape, pixel_size, extent, seed, xp)
    field = field * xp.exp(-1j * aberration_phase(shape, pixel_size, energy_ev, defocus, cs, xp))
    probe = xp.fft.fftshift(ifft2(field))
    return normalise_probe(probe, total_intensity).astype(complex_dtype(precision))


def normalise_probe(probe: Any, total_intensity: float) -> Any:
    """Scale so that Σ|ψ|² = total_intensity (the mean counts per pattern)."""
    xp = array_module(probe)
    (power,) = host_floats(xp.sum(xp.abs(probe) ** 2))
    if power <= 0:
        raise ValueError("probe has zero intensity")
    return probe * np.sqrt(total_intensity / power)


def scale_probe(probe: np.ndarray, frames: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Probe scaled to Σ|ψ|² = mean counts per pattern (the engines' convention), counting
    only valid detector pixels (``mask`` True, detector order) and the share of the probe's far
    field that falls on them: a probe from nominal lens settings gets its power from the first
    frames of a scan. Host arrays; the probe comes back unchanged when there are no counts."""
    valid = np.ones(frames.shape[1:], bool) if mask is None else np.asarray(mask, bool)
    # summed over the frames first, then masked: indexing the frames with the mask copied them
    # all (≈ 10 ms for 256 frames of 96×96, at a scan's first frames); integer counts add up
    # exactly in 64-bit integers, as they did in float64
    kind = np.asarray(frames).dtype.kind
    acc = np.uint64 if kind in "ub" else np.int64 if kind == "i" else np.float64
    per_pixel = np.add.reduce(np.asarray(frames), axis=0, dtype=acc)
    counts = float(per_pixel[valid].sum(dtype=np.float64)) / max(len(frames), 1)
    far = np.abs(np.fft.fftshift(np.fft.fft2(probe, norm="ortho"), axes=(-2, -1))) ** 2
    if far.ndim == 3:
        far = far.sum(axis=0)  # incoherent probe modes: their patterns add
    share = float(far[valid].sum() / max(far.sum(), 1e-30))
    power = float((np.abs(probe) ** 2).sum())
    if counts <= 0 or power <= 0:
        return probe
    return (probe * np.sqrt(counts / max(share, 1e-6) / power)).astype(probe.dtype)


def probe_area_mask(probe: Any, threshold: float = 0.01) -> Any:
    """Pixels where |ψ|² exceeds ``threshold`` × max — the paper's probe area (1 %)."""
    xp = array_module(probe)
    inten = xp.abs(probe) ** 2
    return inten > scalar_as(threshold * dev_float(inten.max()), inten.dtype)


def probe_diffraction_pattern(probe: Any) -> Any:
    """|F ψ|² in detector order (centred) — the vacuum pattern of this probe."""
    xp = array_module(probe)
    return xp.fft.fftshift(xp.abs(fft2(probe)) ** 2)


# --- mixed-state (incoherent) probe modes -------------------------------------------------
# A partially coherent beam (finite source, energy spread, vibrations) is an incoherent sum of
# coherent modes: the measured intensity is Σ_m |F[ψ_m · T]|². The modes are defined up to a
# unitary mixing (which leaves every intensity unchanged), fixed here by orthogonalising them
# and ordering them by power.

#: Share of the total power given to the extra modes at initialisation (together): a
#: small start, as PtyPy and pty-chi do, so that one mode's data are not spoiled at once.
EXTRA_MODE_POWER = 0.2


def as_modes(probe: Any) -> Any:
    """``probe`` as a (P, M, M) stack of modes: an (M, M) probe is one mode."""
    return probe[None] if probe.ndim == 2 else probe


def orthogonalize_modes(probe: Any) -> Any:
    """Orthonormal-basis form of the modes (P, M, M): Q = Vᴴ ψ with ψψᴴ = V Λ Vᴴ, so that the
    modes are mutually orthogonal and ordered by falling power (Λ). Vᴴ is unitary, so the
    incoherent sum Σ_m |F[ψ_m T]|² — and with it the likelihood — is unchanged. The P×P
    Gram matrix is diagonalised on the host (one small transfer); an (M, M) probe is returned
    as it is."""
    if probe.ndim == 2 or probe.shape[0] == 1:
        return probe
    xp = array_module(probe)
    flat = probe.reshape(probe.shape[0], -1)
    gram = to_numpy(flat @ flat.conj().T).astype(np.complex128)
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1]
    mix = vectors[:, order].conj().T.astype(complex_of(probe.dtype))
    return (xp.asarray(mix) @ flat).reshape(probe.shape)


def mode_powers(probe: Any) -> np.ndarray:
    """Σ|ψ_m|² of each mode (host floats); one value for an (M, M) probe."""
    modes = as_modes(probe)
    return to_numpy((modes.real**2 + modes.imag**2).sum(axis=(-2, -1))).astype(np.float64)


def initial_modes(probe: Any, modes: int, extra_power: float = EXTRA_MODE_POWER) -> Any:
    """A (``modes``, M, M) mixed-state start from the probe ``probe`` ((M, M), or fewer modes
    (P, M, M) whose first is the main one), with the total power Σ|ψ|² unchanged.

    A finite source blurs the probe by incoherent shifts: ψ(r − s) ≈ ψ − s·∇ψ + ½(s·∇)²ψ, so the
    first extra modes of a partially coherent probe are its derivatives ∂_y ψ, ∂_x ψ, then the
    second ones (∂_y², ∂_y∂_x, ∂_x²), made here in Fourier space (2πi k ψ̂), orthogonalised
    (Gram–Schmidt) and given ``extra_power`` of the power together (each order half the
    power of the one before, shared equally by its terms). With more modes than
    derivatives, further modes are higher powers of k. Modes already given are kept (all of them, even
    beyond ``modes``)."""
    if modes < 1:
        raise ValueError(f"probe_modes must be at least 1, got {modes}")
    given = as_modes(probe)
    have = int(given.shape[0])
    if modes <= have:
        return probe  # given modes are never dropped
    if not 0 < extra_power < 1:
        raise ValueError(f"extra mode power must be in (0, 1), got {extra_power}")
    xp = array_module(probe)
    shape = tuple(given.shape[-2:])
    (total,) = host_floats((given.real**2 + given.imag**2).sum())
    main = given[0]
    ky = xp.fft.fftfreq(shape[0])[:, None]
    kx = xp.fft.fftfreq(shape[1])[None, :]
    spec = fft2(main)
    orders = [(a, n - a) for n in range(1, 64) for a in range(n, -1, -1)]
    extra = []
    for a, b in orders[: modes - have]:
        factor = ((2j * np.pi * ky) ** a * (2j * np.pi * kx) ** b).astype(complex_of(main.dtype))
        extra.append(ifft2(spec * factor))
    # Gram–Schmidt in order: each new mode orthogonal to the given ones and to those before
    basis = [given[i].reshape(-1) for i in range(have)]
    for j, mode in enumerate(extra):
        v = mode.reshape(-1)
        for g in basis:
            v = v - (xp.vdot(g, v) / xp.vdot(g, g).real) * g
        basis.append(v)
        extra[j] = v.reshape(shape)
    new = xp.stack(extra)
    powers = mode_powers(new)
    # each derivative order n half the power of order n − 1, shared equally by its n + 1
    # terms (a round source blurs y and x alike)
    order = np.array([a + b for a, b in orders[: modes - have]], dtype=np.float64)
    shares = 0.5 ** (order - 1) / (order + 1)
    shares = shares / shares.sum() * extra_power * total
    scale = np.sqrt(shares / np.maximum(powers, 1e-300))
    new = new * xp.asarray(scale.astype(real_of(main.dtype)))[:, None, None]
    keep = given * scalar_as(np.sqrt(1.0 - extra_power), real_of(main.dtype))
    return xp.concatenate([keep, new.astype(given.dtype)])


def source_modes(probe: Any, pixel_size: float, source_size: float, modes: int = 3) -> Any:
    """The ``modes`` strongest incoherent modes (P, M, M) of ``probe`` seen through a finite
    source: a Gaussian of rms ``source_size`` metres (per axis, in the sample plane) blurs the
    probe by incoherent shifts, ρ = ∫ g(s) |ψ(r − s)⟩⟨ψ(r − s)| ds. The shifts are sampled on a
    grid of σ/2 out to 3σ (Fourier shifts: exact for a band-limited probe), the mixed state is
    diagonalised (:func:`orthogonalize_modes`) and the strongest modes keep the probe's total
    power Σ|ψ|². ``source_size`` 0 gives the probe as its only mode."""
    if modes < 1:
        raise ValueError(f"modes must be at least 1, got {modes}")
    if not np.isfinite(source_size) or source_size < 0:
        raise ValueError(f"source size must be a non-negative length in metres, got {source_size!r}")
    xp = array_module(probe)
    if source_size == 0:
        out = xp.zeros((modes,) + tuple(probe.shape), dtype=probe.dtype)
        out[0] = probe
        return out
    sigma = source_size / pixel_size
    step = sigma / 2.0
    offs = np.arange(-6, 7) * step
    sy, sx = np.meshgrid(offs, offs, indexing="ij")
    weight = np.exp(-(sy**2 + sx**2) / (2 * sigma * sigma)).ravel()
    keep = weight > 1e-3 * weight.max()
    shifts = np.stack([sy.ravel()[keep], sx.ravel()[keep]], axis=1)
    weight = weight[keep] / weight[keep].sum()
    ky = xp.fft.fftfreq(probe.shape[0])[:, None]
    kx = xp.fft.fftfreq(probe.shape[1])[None, :]
    spec = fft2(probe)
    cdt = complex_of(probe.dtype)
    copies = xp.stack([
        ifft2(spec * xp.exp(-2j * np.pi * (ky * float(s[0]) + kx * float(s[1]))).astype(cdt))
        * float(np.sqrt(w)) for s, w in zip(shifts, weight)
    ])
    strongest = orthogonalize_modes(copies)[:modes]
    (total, kept) = host_floats((probe.real**2 + probe.imag**2).sum(),
                                (strongest.real**2 + strongest.imag**2).sum())
    return strongest * float(np.sqrt(total / kept))
