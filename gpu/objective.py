"""The data term of the MAP objective on a batch: value and Wirtinger gradients w.r.t. object
and probe in one pass (one FFT and one inverse FFT per position).

Priors are added by :mod:`cryoptycho.gpu.priors`; optimisers combine the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backend import array_module, fft2, ifft2, on_device
from .likelihood import FarFieldTerms, NoiseModel, TruncationRule, far_field_terms
from .operators import Batch, exit_waves, probe_adjoint, scatter_add


@dataclass
class DataTerm:
    loss: float  #: noise-model loss summed over the batch
    grad_object: Any  #: ∂L/∂T̄, object-shaped
    grad_probe: Any | None  #: ∂L/∂ψ̄, probe-shaped (None when not requested)
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
) -> DataTerm:
    """Loss and gradients for measured ``counts`` (B, M, M) in FFT order (any dtype; converted
    on the fly, so the frame store stays in its integer dtype). ``mask`` (M, M) in FFT order,
    1 = valid pixel. ``truncation_sums`` (likelihood.truncation_sums over the whole scan) makes
    the truncation statistics those of the full batch when it is evaluated in chunks."""
    waves, windows, psi = exit_waves(obj, probe, batch)
    far = fft2(waves)
    del waves
    terms = far_field_terms(
        far, counts, model, mask, truncation, alpha_h, truncation_sums, overwrite=True
    )
    del far
    return back_propagate(terms, windows, psi, batch, want_probe)


def back_propagate(
    terms: FarFieldTerms, windows: Any, psi: Any, batch: Batch, want_probe: bool
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
    # psi of shape (1, M, M) may be the caller's own probe (a view): conjugate a copy
    psi_c = psi.conj() if psi.shape[0] == 1 else xp.conjugate(psi, out=psi)
    back *= psi_c
    g_obj = scatter_add(back, batch)
    valid = terms.valid
    # a device count stays on the device (no read-back per batch)
    kept = terms.kept / (array_module(valid).maximum(valid, 1.0) if on_device(valid) else max(valid, 1.0))
    return DataTerm(terms.loss, g_obj, g_probe, kept, batch.size)
