"""The data term of the MAP objective on a batch: value and Wirtinger gradients w.r.t. object
and probe in one pass (one FFT and one inverse FFT per position).

Priors are added by :mod:`cryoptycho.gpu.priors`; optimisers combine the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backend import array_module, fft2, ifft2, on_device
from .likelihood import FarFieldTerms, NoiseModel, TruncationRule, far_field_terms
from .operators import Batch, exit_waves, extract, position_probes, probe_adjoint, scatter_add


@dataclass
class DataTerm:
    loss: float  #: noise-model loss summed over the batch
    grad_object: Any  #: ∂L/∂T̄, object-shaped
    grad_probe: Any | None  #: ∂L/∂ψ̄, probe-shaped, per mode (None when not requested)
    kept_fraction: float  #: share of valid measurements kept by the truncation rule
    count: int  #: number of positions in the batch


def data_term(
    obj: Any,
    probe: Any,
    counts: Any,
    batch: Batch,
    *,
    model: NoiseModel = "poisson",
    truncation: TruncationRule = "none",
    alpha_h: float = 5.0,
    mask: Any | None = None,
    want_probe: bool = True,
    truncation_sums: tuple[float, float, float] | None = None,
    want_object: bool = True,
) -> DataTerm:
    """Loss and gradients for measured ``counts`` (B, M, M) in FFT order (any dtype; converted
    on the fly, so the frame store stays in its integer dtype). ``mask`` (M, M) in FFT order,
    1 = valid pixel. ``truncation_sums`` (likelihood.truncation_sums over the whole scan) makes
    the truncation statistics those of the full batch when it is evaluated in chunks.

    ``probe`` (M, M) is one coherent probe; (P, M, M) holds P incoherent modes, whose
    intensities add: I = Σ_m |z_m|² (:func:`mixed_data_term`). Without ``want_object`` the
    object gradient is not formed (``grad_object`` None): a fit of the probe alone skips the
    scatter back onto the object."""
    if probe.ndim == 3:
        return mixed_data_term(obj, probe, counts, batch, model=model, truncation=truncation,
                               alpha_h=alpha_h, mask=mask, want_probe=want_probe,
                               truncation_sums=truncation_sums, want_object=want_object)
    waves, windows, psi = exit_waves(obj, probe, batch)
    far = fft2(waves)
    del waves
    terms = far_field_terms(
        far, counts, model, mask, truncation, alpha_h, truncation_sums, overwrite=True
    )
    del far
    return back_propagate(terms, windows, psi, batch, want_probe, want_object)


def mixed_data_term(
    obj: Any,
    probe: Any,
    counts: Any,
    batch: Batch,
    *,
    model: NoiseModel = "poisson",
    truncation: TruncationRule = "none",
    alpha_h: float = 5.0,
    mask: Any | None = None,
    want_probe: bool = True,
    truncation_sums: tuple[float, float, float] | None = None,
    want_object: bool = True,
) -> DataTerm:
    """:func:`data_term` of a mixed-state probe (P, M, M): the model intensity is
    I = Σ_m |z_m|², z_m = F[S_δ ψ_m · R_k T]. Both noise models depend on the far fields only
    through I, so ∂L/∂z̄_m = f · z_m with the same real factor f for every mode (Poisson:
    f = w(1 − y/I); amplitude: f = w(1 − √y/√I)). The object gradient sums the modes'
    back-propagations, the probe gradient has one per mode (P, M, M)."""
    windows = extract(obj, batch)
    fars = []
    inten = None
    for m in range(probe.shape[0]):  # (iterating a device array would read it back)
        far = fft2(position_probes(probe[m], batch) * windows)
        part = far.real * far.real
        part += far.imag * far.imag
        inten = part if inten is None else inten + part
        fars.append(far)
    terms = far_field_terms(fars[0], counts, model, mask, truncation, alpha_h, truncation_sums,
                            want_grad=False, inten=inten)
    factor = terms.factor
    for far in fars:
        far *= factor
    del factor
    return back_propagate_modes(terms, fars, windows, [position_probes(probe[m], batch)
                                                       for m in range(probe.shape[0])],
                                batch, want_probe, want_object)


def back_propagate_modes(
    terms: FarFieldTerms, grads: Any, windows: Any, psis: Any, batch: Batch, want_probe: bool,
    want_object: bool = True,
) -> DataTerm:
    """:func:`back_propagate` of P incoherent modes: ``grads[m]`` = ∂L/∂z̄ₘ (B, M, M) and
    ``psis[m]`` the mode's per-position probes (B or 1, M, M) (lists, or arrays with a leading
    mode axis). Object gradients summed, one probe gradient per mode (P, M, M)."""
    xp = array_module(windows)
    n = int(grads.shape[0]) if hasattr(grads, "shape") else len(grads)
    g_obj = None
    g_probe = None
    for m in range(n):
        back = ifft2(grads[m])
        if want_probe:
            part = probe_adjoint(windows.conj() * back, batch)
            if g_probe is None:
                g_probe = xp.zeros((n,) + tuple(part.shape), dtype=part.dtype)
            g_probe[m] = part
        if not want_object:
            continue
        back *= psis[m].conj()
        part = scatter_add(back, batch)
        g_obj = part if g_obj is None else g_obj + part
    valid = terms.valid
    kept = terms.kept / (array_module(valid).maximum(valid, 1.0) if on_device(valid) else max(valid, 1.0))
    return DataTerm(terms.loss, g_obj, g_probe, kept, batch.size)


def back_propagate(
    terms: FarFieldTerms, windows: Any, psi: Any, batch: Batch, want_probe: bool,
    want_object: bool = True,
) -> DataTerm:
    """Object and probe gradients from the far-field gradient: one inverse FFT, then the
    adjoints of the window product. ``windows`` and ``psi`` are the caller's temporaries and
    are overwritten (conjugated in place): no (B, M, M) copies on the way back."""
    xp = array_module(windows)
    back = ifft2(terms.grad)
    terms.grad = None
    g_probe = None
    if want_probe:
        xp.conjugate(windows, out=windows)
        windows *= back
        g_probe = probe_adjoint(windows, batch)
    del windows
    g_obj = None
    if want_object:
        # psi of shape (1, M, M) may be the caller's own probe (a view): conjugate a copy
        psi_c = psi.conj() if psi.shape[0] == 1 else xp.conjugate(psi, out=psi)
        back *= psi_c
        g_obj = scatter_add(back, batch)
    valid = terms.valid
    # a device count stays on the device (no read-back per batch)
    kept = terms.kept / (array_module(valid).maximum(valid, 1.0) if on_device(valid) else max(valid, 1.0))
    return DataTerm(terms.loss, g_obj, g_probe, kept, batch.size)
