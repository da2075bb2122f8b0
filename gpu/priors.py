"""Priors of the MAP objective (eq. 12 and 13): Tikhonov gradient prior and the sparse
(denoiser) prior, each as (loss, conjugate Wirtinger gradient ∂R/∂T̄).

Scaling (κ). The paper's κ (after Thibault & Guizar-Sicairos 2012, ref. 42) is garbled in our
copy. We define it from the curvatures of the two terms:

    κ = N_m · ‖y‖₁ / N_pix² = N_m² ȳ / N_pix²

with N_m the number of valid measurements, ȳ the mean count per valid measurement (so
‖y‖₁ = N_m ȳ, the total counts) and N_pix the number of illuminated object pixels. Why: the data
term's curvature per object pixel is the illumination, ≈ ‖y‖₁ / N_pix; the prior's is
μ₀ κ · λ(DᴴD) with λ ∈ [0, 8]. Their ratio is μ₀ · λ · N_m / N_pix: μ₀ times the measurement
redundancy N_m / N_pix (10²–10³ in ptychography), independent of the dose and the detector
size. Measured on synthetic weak-phase objects (MEASUREMENTS.md), the best μ₀ is ≈ 0.01 at
200 e⁻/Å², ≈ 0.04 at 20 e⁻/Å² and ≈ 0.04–0.1 at 5 e⁻/Å²: μ₀ ∈ [1e-2, 1e-1] is the useful range.
(ptypy's ML engine uses the same form divided by 8, which moves that range to [0.1, 1].)
"""

from __future__ import annotations

import math
from typing import Any

from .backend import array_module, dev_float, on_device, real_of, scalar_as
from .denoise import denoise_complex, get_denoiser


def kappa(n_valid_measurements: int, mean_counts: float, n_object_pixels: int) -> float:
    """κ of the module docstring. ``mean_counts`` is the mean count per *valid measurement*
    (detector pixel of one pattern); ``n_object_pixels`` the illuminated object pixels."""
    if n_valid_measurements <= 0:
        raise ValueError(f"n_valid_measurements must be positive, got {n_valid_measurements}")
    if not mean_counts > 0:
        raise ValueError(f"mean_counts must be positive, got {mean_counts} (no counts recorded?)")
    n_m = float(n_valid_measurements)
    if on_device(n_object_pixels):
        # a count still on the device (the live engine's lit pixels): κ stays there too,
        # the count floored at one pixel instead of checked on the host
        pixels = array_module(n_object_pixels).maximum(n_object_pixels, 1).astype("float64")
        return n_m * n_m * float(mean_counts) / pixels**2
    if n_object_pixels <= 0:
        raise ValueError(f"n_object_pixels must be positive, got {n_object_pixels}")
    return n_m * n_m * float(mean_counts) / float(n_object_pixels) ** 2


#: The dose-aware Tikhonov weight (``mu0="auto"``, the default):
#: μ₀ = MU0_AUTO_REF · (e / MU0_AUTO_COUNTS_REF)^(−MU0_AUTO_EXPONENT), clipped to MU0_AUTO_RANGE,
#: e = ‖y‖₁ / N_pix the detected electrons per illuminated object pixel (the dose times the
#: pixel area, as the data see it). Why a power of e: the data term's curvature per pixel grows
#: as e while the object's spectrum does not, so the weight of the prior *relative* to the data
#: (which μ₀ is, κ carrying the dose) must fall as the counting noise falls — as a Wiener filter's
#: 1/SNR. The constants are fitted to the best fixed μ₀ of a grid on hemoglobin and the
#: proteasome at 5, 20 and 100 e⁻/Å² (0.8 Å pixels): MEASUREMENTS.md, "Dose-aware μ₀",
#: tests/measure/dose_measure.py. The larger particle prefers a smaller μ₀ at the same dose; the law
#: sits between the two. The upper clip, 0.018, is fitted on all three particles at 5 e⁻/Å²
#: (e ≈ 1.6–2.3), pooled over two or three noise seeds: the ribosome loses 6–7 % of its phase
#: correlation at 0.022 (both seeds), hemoglobin at 0.013 (the previous, one-seed clip) lost 6 %
#: pooled over three seeds — each seed 0.010–0.014 below μ₀ = 0.03, a systematic loss, not seed
#: scatter. At 0.018 all three are within 5 % of their best fixed μ₀ (hemoglobin 0.96×,
#: ribosome 0.97×, proteasome 0.99×); the window a law in e alone has there is only ≈ 0.015–0.02.
#: The clip binds below e ≈ 3 (MEASUREMENTS.md, "Several noise seeds"). Below 5 e⁻/Å² it is not
#: measured.
MU0_AUTO_REF = 0.01
MU0_AUTO_COUNTS_REF = 7.5
MU0_AUTO_EXPONENT = 0.64
MU0_AUTO_RANGE = (1e-3, 0.018)


def auto_mu0(counts_per_pixel: Any) -> Any:
    """μ₀ for data of ``counts_per_pixel`` detected electrons per illuminated object pixel
    (the law of ``MU0_AUTO_*`` above). A device scalar gives a device scalar (no read-back:
    the live engine decides at every step), the count floored at 1e-12."""
    if on_device(counts_per_pixel):
        xp = array_module(counts_per_pixel)
        ratio = xp.maximum(counts_per_pixel, 1e-12) / MU0_AUTO_COUNTS_REF
        return xp.clip(MU0_AUTO_REF * ratio**-MU0_AUTO_EXPONENT, *MU0_AUTO_RANGE)
    if not math.isfinite(counts_per_pixel) or counts_per_pixel <= 0:
        raise ValueError(f"counts per object pixel must be a positive number, got {counts_per_pixel!r}")
    mu0 = MU0_AUTO_REF * (counts_per_pixel / MU0_AUTO_COUNTS_REF) ** -MU0_AUTO_EXPONENT
    return float(min(max(mu0, MU0_AUTO_RANGE[0]), MU0_AUTO_RANGE[1]))


def _diffs(obj: Any) -> tuple[Any, Any]:
    xp = array_module(obj)
    return xp.diff(obj, axis=0), xp.diff(obj, axis=1)


def tikhonov(obj: Any, weight: float) -> tuple[float, Any]:
    """R = weight · Σ |D_y T|² + |D_x T|² (forward differences, no wrap-around) and
    ∂R/∂T̄ = weight · (D_yᴴ D_y + D_xᴴ D_x) T."""
    xp = array_module(obj)
    dy, dx = _diffs(obj)
    loss = weight * dev_float((dy.real**2 + dy.imag**2).sum() + (dx.real**2 + dx.imag**2).sum())
    grad = xp.zeros_like(obj)
    # Dᴴ of a forward difference: −d on the upper pixel, +d on the lower one.
    grad[:-1, :] -= dy
    grad[1:, :] += dy
    grad[:, :-1] -= dx
    grad[:, 1:] += dx
    return loss, grad * scalar_as(weight, real_of(obj.dtype))


class SparsePrior:
    """R = μ₁ · scale · Σ |T − T_sparse|² with T_sparse = D(T) refreshed every ``every``
    iterations (the denoiser is costly) and held fixed in between, so the term stays a smooth
    quadratic that the line search can trust."""

    def __init__(
        self, denoiser_name: str, mu1: float, every: int = 10, sigma: float | None = None,
        **denoiser_params: Any,
    ) -> None:
        if every < 1:
            raise ValueError(f"denoise_every must be ≥ 1, got {every}")
        if mu1 < 0:
            raise ValueError(f"mu1 must be ≥ 0, got {mu1}")
        self.denoiser_name = denoiser_name
        self.denoiser = get_denoiser(denoiser_name, **denoiser_params)
        self.mu1 = float(mu1)
        self.every = int(every)
        self.sigma = sigma
        self.target: Any | None = None
        self.last_update: int | None = None

    def update(self, obj: Any, iteration: int, force: bool = False) -> bool:
        """Refresh T_sparse when due (or ``force``); True when it changed (the objective
        changed with it)."""
        due = force or self.target is None or (
            self.last_update is not None and iteration - self.last_update >= self.every
        )
        if not due:
            return False
        self.target = denoise_complex(obj, self.denoiser, self.sigma)
        self.last_update = iteration
        return True

    def term(self, obj: Any, scale: float = 1.0) -> tuple[float, Any]:
        if self.target is None:
            raise RuntimeError("SparsePrior.term called before update(): no denoised target yet")
        diff = obj - self.target
        w = self.mu1 * scale
        return w * dev_float((diff.real**2 + diff.imag**2).sum()), scalar_as(w, real_of(obj.dtype)) * diff


def prior_term(
    obj: Any, options: Any, kappa: float, iteration: int | None = None,
    sparse: SparsePrior | None = None,
) -> tuple[float, Any]:
    """The prior selected by ``options.prior`` ("none", "tikhonov", "sparse"), scaled by κ.
    For "sparse", ``sparse`` must be given; with ``iteration`` it is refreshed when due."""
    xp = array_module(obj)
    if options.prior == "none":
        return 0.0, xp.zeros_like(obj)
    if options.prior == "tikhonov":
        if options.mu0 == "auto":
            raise ValueError("mu0 'auto' must be decided before the prior is evaluated "
                             "(ReconOptions.with_mu0_decision)")
        return tikhonov(obj, options.mu0 * kappa)
    if options.prior == "sparse":
        if sparse is None:
            raise ValueError("prior 'sparse' needs a SparsePrior (sparse=...)")
        if iteration is not None:
            sparse.update(obj, iteration)
        return sparse.term(obj, scale=kappa)
    raise ValueError(f"unknown prior {options.prior!r}: choose none, tikhonov or sparse")
