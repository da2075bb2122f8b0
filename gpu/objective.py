"""The data term of the MAP objective on a batch: value and Wirtinger gradients w.r.t. object
and probe in one pass (one FFT and one inverse FFT per position).

Priors are added by :mod:`cryoptycho.gpu.priors`; optimisers combine the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backend import array_module, fft2, ifft2
from .likelihood import NoiseModel, TruncationRule, loss_and_grad, truncation_keep
from .operators import Batch, exit_waves, group_sum, scatter_add, shift_back


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
    xp = array_module(obj)
    waves, windows, probes = exit_waves(obj, probe, batch)
    far = fft2(waves)
    y = counts if counts.dtype == far.real.dtype else counts.astype(far.real.dtype)
    keep = truncation_keep(far, y, alpha_h, truncation, mask, truncation_sums)
    loss, g_far = loss_and_grad(far, y, model, mask, keep)
    back = ifft2(g_far)
    psi = probes[batch.group] if probes.shape[0] > 1 else probes
    g_obj = scatter_add(psi.conj() * back, batch)
    g_probe = None
    if want_probe:
        g_probe = shift_back(group_sum(windows.conj() * back, batch), batch)
    if keep is None:
        kept = 1.0
    else:
        valid = float(xp.broadcast_to(mask, keep.shape).sum()) if mask is not None else keep.size
        kept = float((keep if mask is None else keep * mask).sum()) / max(valid, 1.0)
    return DataTerm(loss, g_obj, g_probe, kept, batch.size)
