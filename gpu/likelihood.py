"""Noise models on far-field waves: values and Wirtinger gradients, with truncation and masks.

For a far field z (B, M, M, FFT order), measured counts y and a per-pixel weight w (0 for invalid
pixels: gaps, hot or saturated pixels — never "count 0"):

* Poisson (eq. 16/18):   L = Σ w [ I − y + y·log(y / I) ],  I = |z|² + ε   (the deviance; ≥ 0)
                         ∂L/∂z̄ = w (1 − y / I) z
* Amplitude (Gaussian):  L = Σ w ( |z| − √y )²
                         ∂L/∂z̄ = w (1 − √y / |z|) z

Gradients are the conjugate Wirtinger derivative ∂L/∂z̄; for a real L and a complex step d,
L(z + t d) = L(z) + 2 t Re⟨∂L/∂z̄, d⟩ + O(t²). Steepest descent moves along −∂L/∂z̄.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .backend import array_module, dev_float, host_floats, on_device, real_of, scalar_as

NoiseModel = Literal["poisson", "amplitude"]
TruncationRule = Literal["none", "chen-candes", "high-intensity", "poisson-floor"]

#: Intensity floor that keeps log(I) finite where the model predicts (near) zero counts.
INTENSITY_FLOOR = 1e-6


def _weights(y: Any, mask: Any | None) -> Any:
    xp = array_module(y)
    if mask is None:
        return xp.ones((1,) * y.ndim, dtype=real_of(y.dtype) if y.dtype.kind == "f" else np.float32)
    return mask


def poisson_loss(z: Any, y: Any, mask: Any | None = None, keep: Any | None = None) -> float:
    """Poisson deviance of counts ``y`` given far fields ``z`` (sum over the batch)."""
    xp = array_module(z)
    inten = (z.real**2 + z.imag**2) + INTENSITY_FLOOR
    yf = y.astype(inten.dtype, copy=False)
    ylogy = xp.where(yf > 0, yf * xp.log(xp.maximum(yf, INTENSITY_FLOOR) / inten), 0.0)
    term = inten - yf + ylogy
    w = _weights(yf, mask)
    if keep is not None:
        w = w * keep
    return host_floats((w * term).sum())[0]


def poisson_grad(z: Any, y: Any, mask: Any | None = None, keep: Any | None = None) -> Any:
    """∂L/∂z̄ of :func:`poisson_loss`."""
    inten = (z.real**2 + z.imag**2) + INTENSITY_FLOOR
    factor = 1.0 - y.astype(inten.dtype, copy=False) / inten
    w = _weights(factor, mask)
    if keep is not None:
        w = w * keep
    return (w * factor) * z


def amplitude_loss(z: Any, y: Any, mask: Any | None = None, keep: Any | None = None) -> float:
    xp = array_module(z)
    amp = xp.abs(z)
    diff = amp - xp.sqrt(y.astype(amp.dtype, copy=False))
    w = _weights(amp, mask)
    if keep is not None:
        w = w * keep
    return host_floats((w * diff * diff).sum())[0]


def amplitude_grad(z: Any, y: Any, mask: Any | None = None, keep: Any | None = None) -> Any:
    xp = array_module(z)
    amp = xp.abs(z)
    root = xp.sqrt(y.astype(amp.dtype, copy=False))
    factor = 1.0 - root / xp.maximum(amp, np.sqrt(INTENSITY_FLOOR))
    w = _weights(amp, mask)
    if keep is not None:
        w = w * keep
    return (w * factor) * z


def loss_and_grad(
    z: Any,
    y: Any,
    model: NoiseModel = "poisson",
    mask: Any | None = None,
    keep: Any | None = None,
) -> tuple[float, Any]:
    """Loss and ∂L/∂z̄ together (the fused path of :func:`far_field_terms`, no truncation
    rule: ``keep`` is a fixed keep-mask or None)."""
    if model not in ("poisson", "amplitude"):
        raise ValueError(f"unknown noise model {model!r}: choose 'poisson' or 'amplitude'")
    xp = array_module(z)
    inten = _intensity(z)
    weight = mask if keep is None else (keep if mask is None else keep * mask)
    factor, term = _factor_and_term(xp, inten, _counts_as(y, inten.dtype), model, weight)
    return host_floats(term.sum())[0], factor * z


def loss_per_pattern(inten: Any, y: Any, model: NoiseModel = "poisson", mask: Any | None = None) -> Any:
    """The noise model's loss of each pattern (B,) from intensities ``inten`` (B, M, M; consumed)
    and counts ``y``, where the arrays live: the terms whose sum :func:`far_field_terms` returns
    without truncation. A held-out score compares two models pattern by pattern (the patterns'
    counts are independent, so the spread of the differences is the score's noise)."""
    if model not in ("poisson", "amplitude"):
        raise ValueError(f"unknown noise model {model!r}: choose 'poisson' or 'amplitude'")
    xp = array_module(inten)
    _, term = _factor_and_term(xp, inten, _counts_as(y, inten.dtype), model, mask)
    return term.sum(axis=(-2, -1))


@dataclass
class FarFieldTerms:
    loss: float  #: Σ w·(noise-model loss) over the batch
    grad: Any | None  #: ∂L/∂z̄ (None when not requested)
    factor: Any | None  #: ∂L/∂z̄ ÷ z, real (with ``want_grad=False`` only)
    kept: float  #: measurements kept by the truncation rule (valid ones only)
    valid: float  #: valid measurements (mask) in the batch


def far_field_terms(
    z: Any,
    y: Any,
    model: NoiseModel = "poisson",
    mask: Any | None = None,
    truncation: TruncationRule = "none",
    alpha_h: float = 5.0,
    sums: tuple[float, float, float] | None = None,
    want_grad: bool = True,
    overwrite: bool = False,
    inten: Any | None = None,
) -> FarFieldTerms:
    """Truncation rule, loss and gradient of far fields ``z`` in one pass over the batch.

    Equal (to float rounding) to :func:`truncation_keep` followed by :func:`loss_and_grad`,
    but |z|² is formed once and shared, the counts stay in their own dtype when it casts
    safely to the real dtype (no float copy of the frames per evaluation), temporaries are
    updated in place, and the truncation test is done on squares (no square roots): for
    resid ≥ 0 and thresholds ≥ 0, resid ≤ max(a, b) ⟺ resid² ≤ max(a², b²). On a CPU this
    took the likelihood from ≈ 1.1 to ≈ 0.35 of a batched FFT pair (64×64 frames).
    ``overwrite``: the gradient is written into ``z`` (the caller's temporary). Without
    ``want_grad`` the real factor f with ∂L/∂z̄ = f·z is returned instead (a line search needs
    only Re⟨∂L/∂z̄, ż⟩ = Σ f·Re(z̄ ż), no complex product). ``inten``: |z|² when the caller
    has it (it is overwritten)."""
    if model not in ("poisson", "amplitude"):
        raise ValueError(f"unknown noise model {model!r}: choose 'poisson' or 'amplitude'")
    if inten is None:
        inten = _intensity(z)
    xp = array_module(inten)
    yv = _counts_as(y, inten.dtype)
    keep = _keep_by_squares(xp, inten, yv, alpha_h, truncation, mask, sums)
    n = inten.size
    # counts stay where they are made (device scalars): reading them is the caller's choice
    valid = float(n) if mask is None else dev_float(mask.sum()) * (n // mask.size)
    if keep is None:
        weight = mask
        kept = valid
    else:
        weight = keep if mask is None else keep * mask
        kept = dev_float(xp.count_nonzero(keep)) if mask is None else dev_float(weight.sum())
    factor, term = _factor_and_term(xp, inten, yv, model, weight)
    grad = None
    if want_grad:
        grad = z if overwrite else z.copy()
        grad *= factor
        factor = None
    return FarFieldTerms(dev_float(term.sum()), grad, factor, kept, valid)


def _intensity(z: Any) -> Any:
    inten = z.real * z.real
    inten += z.imag * z.imag
    return inten


def _counts_as(y: Any, dtype: Any) -> Any:
    """Counts usable against real arrays of ``dtype`` without widening the result: integer
    frames that cast safely (uint8/uint16 to float32) are used as they are."""
    return y if np.can_cast(y.dtype, dtype, casting="safe") else y.astype(dtype)


def _factor_and_term(xp: Any, inten: Any, y: Any, model: str, weight: Any | None) -> tuple[Any, Any]:
    """(w·∂L/∂|z|²-like factor, w·loss per measurement); ``inten`` = |z|² is consumed. On CuPy
    the Poisson pair is one fused kernel (:func:`fused_poisson`); this code is its reference."""
    if model == "poisson" and fused_available(xp):
        return fused_poisson(inten, y, weight)
    return factor_and_term_reference(xp, inten, y, model, weight)


def factor_and_term_reference(
    xp: Any, inten: Any, y: Any, model: str, weight: Any | None
) -> tuple[Any, Any]:
    """:func:`_factor_and_term` as array operations (NumPy, and the reference of the fused
    CuPy kernel); ``inten`` is consumed."""
    if model == "poisson":
        inten += INTENSITY_FLOOR
        ratio = xp.divide(y, inten)
        # y·log(y/I) with 0·log 0 = 0: the floor keeps log finite where y = 0 (product 0).
        term = xp.maximum(ratio, np.finfo(inten.dtype).tiny)
        xp.log(term, out=term)
        term *= y
        term += inten
        term -= y
        factor = xp.subtract(1.0, ratio, out=ratio)
    else:
        amp = xp.sqrt(inten, out=inten)
        root = xp.sqrt(y.astype(amp.dtype))  # sqrt of uint16 alone would be float32
        term = amp - root
        root /= xp.maximum(amp, np.sqrt(INTENSITY_FLOOR))
        factor = xp.subtract(1.0, root, out=root)
        term *= term
    if weight is not None:
        term *= weight
        factor *= weight
    return factor, term


# --- fused element-wise kernels (CuPy) ------------------------------------------------------
# The Poisson factor and loss are ~9 element-wise passes over the far field as array
# operations; one CUDA kernel reads |z|², y and the weight once and writes both results.

_POISSON_BODY = """
    const T i = inten + (T)FLOOR;
    const T r = (T)y / i;
    const T t = (T)y * log(r > (T)TINY ? r : (T)TINY) + i - (T)y;
    factor = ((T)1 - r) WEIGHT;
    term = t WEIGHT;
"""


def fused_available(xp: Any) -> bool:
    """The fused kernels exist for CuPy only (NumPy and the strict test backend use the
    reference array code)."""
    return xp.__name__.startswith("cupy")


def _poisson_kernel(cupy: Any, weighted: bool, dtype: Any) -> Any:
    """The kernel, compiled once per (weighted, dtype) by ``cupy`` (the module of the arrays)."""
    tiny = float(np.finfo(dtype).tiny)
    body = (_POISSON_BODY.replace("FLOOR", repr(INTENSITY_FLOOR)).replace("TINY", repr(tiny))
            .replace("WEIGHT", "* (T)w" if weighted else ""))
    params = "T inten, Y y, W w" if weighted else "T inten, Y y"
    return cupy.ElementwiseKernel(params, "T factor, T term", body,
                                  f"cryoptycho_poisson_{'w' if weighted else 'u'}_{np.dtype(dtype).char}")


_KERNELS: dict[tuple[bool, str], Any] = {}


def fused_poisson(inten: Any, y: Any, weight: Any | None) -> tuple[Any, Any]:
    """(factor, term) of the Poisson model in one CuPy kernel; equal to
    :func:`factor_and_term_reference` up to float rounding (tests/test_fused_kernels.py)."""
    key = (weight is not None, np.dtype(inten.dtype).char)
    if key not in _KERNELS:
        _KERNELS[key] = _poisson_kernel(array_module(inten), weight is not None, inten.dtype)
    kernel = _KERNELS[key]
    if weight is None:
        return kernel(inten, y)
    return kernel(inten, y, weight)


def _keep_by_squares(
    xp: Any, inten: Any, y: Any, alpha_h: float, rule: str, mask: Any | None,
    sums: tuple[float, float, float] | None,
) -> Any | None:
    """:func:`truncation_keep` on squared residuals and thresholds (boolean)."""
    if rule == "none" or not np.isfinite(alpha_h):
        return None
    if rule not in ("chen-candes", "high-intensity", "poisson-floor"):
        raise ValueError(f"unknown truncation rule {rule!r}")
    resid = xp.subtract(y, inten)
    xp.abs(resid, out=resid)
    if sums is None:
        if mask is None:
            sums = (dev_float(resid.sum()), dev_float(inten.sum()), float(inten.size))
        else:
            wsum = dev_float(mask.sum()) * (inten.size // mask.size)
            sums = (dev_float((resid * mask).sum()), dev_float((inten * mask).sum()), wsum)
    resid_sum, inten_sum, wsum = sums
    # A device sum is not read back to test it: masks are checked to keep a valid pixel.
    if not on_device(wsum) and wsum <= 0:
        return None
    k_t = resid_sum / wsum
    on_dev = on_device(inten_sum) or on_device(k_t)
    rms = (xp.sqrt(inten_sum / wsum) if on_dev else float(np.sqrt(inten_sum / wsum))) + 1e-12
    c = (alpha_h * k_t / rms) ** 2
    resid *= resid
    rdt = inten.dtype
    if rule == "chen-candes":
        thr = inten * scalar_as(c, rdt)
    elif rule == "high-intensity":
        thr = xp.maximum(inten, scalar_as(rms * rms, rdt))
        thr *= scalar_as(c, rdt)
    else:
        # max(c·I, α²·max(I, 1)) = max(max(c, α²)·I, α²)
        top = xp.maximum(c, alpha_h * alpha_h) if on_dev else max(c, alpha_h * alpha_h)
        thr = inten * scalar_as(top, rdt)
        xp.maximum(thr, alpha_h * alpha_h, out=thr)
    # boolean: multiplying by it casts on the fly, no float copy of the mask
    return xp.less_equal(resid, thr)


def truncation_sums(z: Any, y: Any, mask: Any | None = None) -> tuple[float, float, float]:
    """(Σ w|y − I|, Σ w I, Σ w) of a batch: summed over the chunks of a full batch, they give
    the statistics K_t = Σ w|y − I| / Σ w and rms² = Σ w I / Σ w of the whole scan."""
    return intensity_sums(z.real**2 + z.imag**2, y, mask)


def intensity_sums(inten: Any, y: Any, mask: Any | None = None) -> tuple[float, float, float]:
    """:func:`truncation_sums` from the intensities |z|² (left unchanged)."""
    xp = array_module(inten)
    resid = xp.abs(y.astype(inten.dtype, copy=False) - inten)
    w = _weights(inten, mask)
    wsum = float(inten.size) if mask is None else dev_float(xp.broadcast_to(w, inten.shape).sum())
    return dev_float((w * resid).sum()), dev_float((w * inten).sum()), wsum


def truncation_keep(
    z: Any,
    y: Any,
    alpha_h: float = 5.0,
    rule: TruncationRule = "chen-candes",
    mask: Any | None = None,
    sums: tuple[float, float, float] | None = None,
) -> Any | None:
    """Measurements kept by the truncated-gradient rule (eq. 20/21), or None for "keep all".

    ``chen-candes``: keep i when |y_i − I_i| ≤ α_h · K_t · |z_i| / rms(|z|), where K_t is the
    mean residual |y − I| over valid measurements (‖T‖ of eq. 20 replaced by the rms of |z| so
    the ratio is O(1), as for Gaussian designs).
    ``high-intensity``: the same test, but the per-measurement amplitude is floored at rms(|z|),
    so a rare count where the model predicts little intensity (the high-angle events that carry
    resolution at < 1 e⁻/pixel) is not discarded.
    ``poisson-floor``: keep i when it passes the Chen–Candès test *or* the Poisson-noise test
    |y_i − I_i| ≤ α_h · √max(I_i, 1): a measurement is dropped only when its residual is large
    both against the current misfit and against counting noise (floored at one count), so a
    lone detected electron is never discarded (α_h ≥ 1) while hot pixels and grossly
    inconsistent patterns still are.
    ``alpha_h = inf`` or rule ``none`` disables truncation.
    ``sums`` (:func:`truncation_sums` over a larger set, e.g. all chunks of a full batch) sets
    K_t and rms; by default they come from this batch.
    """
    if rule == "none" or not np.isfinite(alpha_h):
        return None
    xp = array_module(z)
    amp = xp.abs(z)
    inten = amp * amp
    resid = xp.abs(y.astype(amp.dtype, copy=False) - inten)
    resid_sum, inten_sum, wsum = truncation_sums(z, y, mask) if sums is None else sums
    if not on_device(wsum) and wsum <= 0:
        return None
    k_t = resid_sum / wsum
    rms = xp.sqrt(inten_sum / wsum) + 1e-12 if on_device(inten_sum) else float(np.sqrt(inten_sum / wsum)) + 1e-12
    if rule == "chen-candes":
        scale = amp / rms
    elif rule == "high-intensity":
        scale = xp.maximum(amp, rms) / rms
    elif rule == "poisson-floor":
        keep = (resid <= alpha_h * k_t * amp / rms) | (resid <= alpha_h * xp.sqrt(xp.maximum(inten, 1.0)))
        return keep.astype(amp.dtype)
    else:
        raise ValueError(f"unknown truncation rule {rule!r}")
    return (resid <= alpha_h * k_t * scale).astype(amp.dtype)
