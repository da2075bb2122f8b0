"""The source size (partial spatial coherence) of a scan, estimated from its frames.

A finite incoherent source is an incoherent sum of probe shifts s with weight g(s):
I(k, r) = ∫ g(s) I_coh(k, r − s) ds. It leaves the position-averaged pattern (the disc)
unchanged and multiplies the scan-frequency spectrum of the data by ĝ(Q): the interference
between overlapping discs fades. To first order in the object's scattering this is the same as
a coherent probe on the object blurred by g (the linear terms of |F[ψ(r − s)·T]|² averaged
over s are those of T ⊛ g), so the data tell a finite source from a blurred object only
through the terms quadratic in the scattering (the dark field, the object's own power at
scattering vector q, is not attenuated by a source while a blurred object scatters less).
Rather than a closed form for those terms, the estimate scores each trial source size by the
likelihood of *held-out* counts (binomial halves) after a short reconstruction on the other
half, which uses every term the forward model has, and claims a source only when both halves
agree. Held-out, not fitted, counts: a blurring source and a sharper object fit the fitted half
alike (the first-order ambiguity), the other half's noise is independent of the fit.

NumPy/CuPy through the engine's own reconstruction; no files, no sockets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import array_module, host_floats
from .metrics import binomial_split
from .operators import sub_batch
from .options import ReconOptions
from .positions import data_loss
from .probes import normalise_probe, source_modes

log = logging.getLogger(__name__)

#: Trial source sizes of the estimate, metres rms at the sample. A source beyond the last
#: trial is estimated as the last (the parabola needs a neighbour on each side).
SOURCE_GRID_M: tuple[float, ...] = (0.0, 0.5e-10, 1.0e-10, 1.5e-10)


@dataclass
class SourceEstimate:
    """What :func:`estimate_source_size` found. ``scores[σ]`` is the held-out data term at
    trial σ in each direction (fit on half A scored on B, and B on A); ``best_m`` the trial of
    the lowest sum; ``estimate_m`` the vertex of the parabola through it and its neighbours
    (``best_m`` at the ends of the grid); ``confident`` whether both directions put ``best_m``
    > 0 below σ = 0 by more than ``margin`` (so one direction's noise cannot claim a source)."""

    best_m: float
    estimate_m: float
    confident: bool
    scores: dict[float, tuple[float, float]] = field(default_factory=dict)
    margin: float = 0.0

    @property
    def source_size_m(self) -> float:
        """The source size to reconstruct with: ``estimate_m`` when confident, else 0."""
        return self.estimate_m if self.confident else 0.0

    def gains(self) -> tuple[float, float]:
        """Held-out data term at σ = 0 minus at ``best_m``, per direction (> 0: the source helps)."""
        zero, best = self.scores[0.0], self.scores[self.best_m]
        return (zero[0] - best[0], zero[1] - best[1])

    def record(self) -> dict[str, float]:
        """For the result file's probe estimate (``/extra``)."""
        ga, gb = self.gains()
        return {"source_size_estimate_m": float(self.estimate_m), "source_size_applied_m": self.source_size_m,
                "source_size_gain_a": float(ga), "source_size_gain_b": float(gb)}


def estimate_source_size(
    obj: Any, probe: Any, counts_fft: Any, batch: Any, mask: Any | None, options: ReconOptions,
    pixel_size: float, probe_power: float, *, grid: Sequence[float] = SOURCE_GRID_M,
    iterations: int = 10, modes: int = 3, margin: float = 0.0, seed: int = 0,
) -> SourceEstimate:
    """Estimate the source size (rms, metres) from ``counts_fft`` (K, M, M integer counts, FFT
    order): split them into two binomial halves; for each trial σ of ``grid`` (0 included),
    reconstruct the object from the common start ``obj`` with the fixed probe ``probe`` (its
    main mode) seen through a source σ (``probes.source_modes``, ``modes`` modes) for
    ``iterations`` CG iterations on one half, and score the data term of the other half; both
    ways round. Costs 2 × len(grid) short reconstructions."""
    # reconstruct imports this module
    from .reconstruct import AMPLITUDE_NLL_SCALE, problem_kappa, refine_full_batch

    trials = sorted({float(s) for s in grid} | {0.0})
    if any(not np.isfinite(s) or s < 0 for s in trials):
        raise ValueError(f"trial source sizes must be finite lengths ≥ 0, got {list(grid)}")
    main = probe if probe.ndim == 2 else probe[0]
    half_a, half_b = binomial_split(counts_fft, np.random.default_rng([int(seed), 3, 14]))
    xp = array_module(counts_fft)
    halves = (xp.asarray(half_a), xp.asarray(half_b))
    fixed = options.model_copy(update={"refine_probe": False, "refine_positions": False,
                                       "refine_aberrations": False, "source_size_m": 0.0})
    power = 0.5 * probe_power
    kappas = [problem_kappa(h, mask, main, batch) for h in halves]
    chunk = options.chunk_size
    scale = AMPLITUDE_NLL_SCALE if options.noise_model == "amplitude" else 1.0
    scores: dict[float, tuple[float, float]] = {}
    for sigma in trials:
        psi = main if sigma == 0 else source_modes(main, pixel_size, sigma, modes)
        psi = normalise_probe(psi, power)
        both = []
        for fit, test, kappa in ((halves[0], halves[1], kappas[0]), (halves[1], halves[0], kappas[1])):
            o, p, _ = refine_full_batch(obj, psi, fit, batch, mask, fixed, iterations, kappa=kappa,
                                        probe_power=power)
            parts = [data_loss(o, p, test[sl], sub_batch(batch, sl), model=options.noise_model,
                               mask=mask, scale=scale)
                     for sl in (slice(i, min(i + chunk, batch.size)) for i in range(0, batch.size, chunk))]
            both.append(float(sum(host_floats(*parts))))
        scores[sigma] = (both[0], both[1])
        log.info("source size %.2f Å: held-out data term %.6g / %.6g", sigma * 1e10, both[0], both[1])
    best = min(trials, key=lambda s: sum(scores[s]))
    confident = best > 0 and all(z - b > margin for z, b in zip(scores[0.0], scores[best]))
    return SourceEstimate(best_m=best, estimate_m=parabola_vertex(trials, [sum(scores[s]) for s in trials]),
                          confident=confident, scores=scores, margin=margin)


def parabola_vertex(x: Sequence[float], y: Sequence[float]) -> float:
    """The minimiser of the parabola through the lowest of the points (x, y) (x ascending) and
    its two neighbours, kept between those neighbours; the lowest point's x at an end of the
    grid or where the three points do not curve upwards."""
    j = int(np.argmin(y))
    if j == 0 or j == len(x) - 1:
        return float(x[j])
    xs, ys = np.asarray(x[j - 1:j + 2], dtype=np.float64), np.asarray(y[j - 1:j + 2], dtype=np.float64)
    scale = xs[2] - xs[0]
    a, b, _ = np.polyfit((xs - xs[1]) / scale, ys, 2)
    if not a > 0:
        return float(x[j])
    return float(np.clip(xs[1] - scale * b / (2 * a), xs[0], xs[2]))


__all__ = ["SOURCE_GRID_M", "SourceEstimate", "estimate_source_size", "parabola_vertex"]
