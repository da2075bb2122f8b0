"""Initial transmission functions: random (the paper's choice below ~100 e⁻/Å²), flat, and the
truncated spectral initialisation of eq. 22 (Marchesini et al.)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .backend import array_module, complex_dtype, host_floats
from .operators import Batch, adjoint_object, forward, illumination

#: Pixels lit by less than this share of the peak illumination are left out of the spectral
#: eigenproblem: (QᴴQ)⁻¹ would amplify them and the leading eigenvector would sit on the scan's
#: faint rim instead of the object.
LIT_FRACTION = 0.1


def random_object(shape: tuple[int, int], options: Any, xp: ModuleType = np) -> Any:
    """Unit amplitude, phase ~ N(init_phase_mean, init_phase_std) per pixel (paper: 0.1, 0.1),
    seeded by ``options.seed``."""
    rng = np.random.default_rng(options.seed)
    phase = rng.normal(options.init_phase_mean, options.init_phase_std, size=tuple(shape))
    return xp.asarray(np.exp(1j * phase).astype(complex_dtype(options.precision)))


def flat_object(shape: tuple[int, int], options: Any, xp: ModuleType = np) -> Any:
    return xp.ones(tuple(shape), dtype=complex_dtype(options.precision))


def spectral_object(
    counts_fft: Any,
    batch: Batch,
    probe: Any,
    object_shape: tuple[int, int],
    mask: Any | None = None,
    iterations: int = 60,
    keep_fraction: float = 0.2,
    seed: int = 0,
) -> Any:
    """Truncated spectral initialisation (eq. 22): the phase of the leading eigenvector of
    (QᴴQ)⁻¹ Qᴴ Fᴴ diag(y · 1[y > ε]) F Q, with ε such that the largest ``keep_fraction`` of the
    valid intensities contribute, found by ``iterations`` power iterations. Returns a unit-
    amplitude object with that phase (mean phase removed); unilluminated pixels get phase 0.

    Below ~100 e⁻/Å² most pixels hold 0 or 1 counts and the percentile threshold degenerates:
    then every non-zero count is kept (the paper found the method useless there anyway)."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if iterations < 1:
        raise ValueError(f"spectral initialisation needs ≥ 1 power iteration, got {iterations}")
    xp = array_module(probe)
    real = probe.real.dtype
    y = counts_fft.astype(real)
    valid = xp.ones(y.shape[-2:], dtype=bool) if mask is None else mask > 0
    values = y[:, valid]
    # A one-off start: its few scalars are read back explicitly.
    eps = host_floats(xp.quantile(values.astype(np.float64), 1.0 - keep_fraction))[0] if values.size else 0.0
    weight = xp.where((y > eps) & valid, y, 0.0).astype(real)
    if not host_floats(weight.any())[0]:
        weight = xp.where((y > 0) & valid, y, 0.0).astype(real)
    if not host_floats(weight.any())[0]:
        raise ValueError("spectral initialisation: the dataset holds no counts in valid pixels")
    illum = illumination(probe, batch)
    lit = illum > LIT_FRACTION * host_floats(illum.max())[0]
    inv = xp.where(lit, 1.0 / xp.maximum(illum, 1e-30), 0.0).astype(real)
    # Start from the flat object, not from noise: the leading eigenspace is nearly degenerate
    # (every smooth object fills the bright-field disc), so a random start keeps its
    # high-frequency content for hundreds of iterations; the flat start only picks up the
    # structure the weighted intensities put there. ``seed`` adds a tiny perturbation.
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(object_shape) + 1j * rng.standard_normal(object_shape)
    v = xp.asarray((1.0 + 1e-3 * noise).astype(probe.dtype)) * lit
    for _ in range(iterations):
        v = inv * adjoint_object(weight * forward(v, probe, batch), probe, batch)
        (norm,) = host_floats(xp.linalg.norm(v))
        if norm == 0 or not np.isfinite(norm):
            raise FloatingPointError("spectral initialisation diverged (zero or non-finite vector)")
        v = v / norm
    total = v[lit].sum()
    mean = complex(*host_floats(total.real, total.imag))
    if abs(mean) > 0:
        v = v * (abs(mean) / mean)
    phase = xp.where(lit, xp.angle(v), 0.0)
    return xp.exp(1j * phase).astype(probe.dtype)


__all__ = ["flat_object", "random_object", "spectral_object"]
