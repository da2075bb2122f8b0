"""Offline (full-batch) reconstruction: data → device problem → MAP by nonlinear CG.

The objective is  L(T, ψ) = D(T, ψ̂) + R(T),  ψ̂ = ψ · √P / ‖ψ‖:  the data term of the chosen
noise model (Poisson deviance, or the amplitude model scaled ×2 so that both share the same
curvature at the fit — the Gaussian NLL of √y, whose variance is ¼ — and a prior weighs the same
against either), plus the prior. Writing the probe through its normalisation ψ̂ keeps the power
constraint Σ|ψ̂|² = P (the measured counts per pattern) exact and the objective smooth, so CG
needs no projection step; the chain rule gives the probe gradient (see :func:`_normalised`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .aberrations import ParametricProbe, fit_aberrations, search_aberrations
from .backend import (
    array_module,
    asarray,
    complex_dtype,
    dev_float,
    fft2,
    get_xp,
    host_floats,
    ifft2,
    on_device,
    real_dtype,
    real_of,
    scalar_as,
    to_numpy,
)
from .cg import IterationPace, LowFrequencyPreconditioner, minimize, probe_cutoff
from .data import PtychoData
from .geometry import ScanGeometry, fit_geometry, implausible_energy
from .init import flat_object, random_object, spectral_object
from .likelihood import intensity_sums, truncation_sums
from .line_model import full_batch_line
from .metrics import binomial_split
from .objective import data_term
from .operators import (
    Batch,
    forward,
    illumination,
    make_batch,
    mode_intensity,
    sub_batch,
    to_fft_order,
)
from .options import ReconOptions, source_modes_in_force, source_size_in_force
from .parallax import MAX_PROBE_TO_SCAN, ParallaxFit, estimate_aberrations, probe_width, scan_width
from .positions import (
    ScanModel,
    data_loss,
    data_loss_per_position,
    search_scan_matrix,
    update_positions,
)
from .positions import margin_px as position_margin_px
from .priors import SparsePrior, prior_term
from .priors import kappa as kappa_of
from .probes import (
    aberrate,
    initial_modes,
    make_probe,
    normalise_probe,
    orthogonalize_modes,
    source_modes,
)
from .state import ReconState

#: The amplitude model's loss is doubled: Var(√y) ≈ ¼ for Poisson y, so 2(|z| − √y)² is its
#: Gaussian NLL and matches the Poisson deviance's curvature at the fit (fair prior weights).
AMPLITUDE_NLL_SCALE = 2.0

log = logging.getLogger(__name__)

#: Spare canvas pixels around the probe windows (position refinement adds more: positions.margin_px)
CANVAS_MARGIN = 2

#: Times a refinement widens α_h (×2 each) when the truncation rule's discontinuities stop CG
#: (see refine_full_batch): 5 → at most 20, which still drops a 20-count hit where ≲ 1 is
#: expected.
TRUNCATION_RELAXATIONS = 2

Progress = Callable[[int, int, float], None]


@dataclass
class Problem:
    """Everything the optimiser needs, on the device."""

    xp: ModuleType
    options: ReconOptions
    counts_fft: Any  #: (K, M, M) counts, FFT order, in the frames' own dtype
    mask: Any | None  #: (M, M) real 0/1, FFT order; None = all valid
    batch: Batch
    geometry: ScanGeometry
    probe: Any  #: initial probe, normalised to ``probe_power``
    object: Any  #: initial object
    positions: np.ndarray  #: (K, 2) m
    probe_power: float  #: Σ|ψ|² = measured counts per pattern
    kappa: float
    energy: float
    #: the probe before the parallax fit corrected it (at ``probe_power``), when the fit ran
    nominal_probe: Any | None = None
    #: the fit's record (``ParallaxFit.record``), for the result file; empty when none ran
    probe_estimate: dict[str, float] = dataclasses.field(default_factory=dict)
    #: the dataset's positions when the parallax fit's scan matrix moved them (``positions``
    #: are then the corrected ones); None otherwise
    nominal_positions: np.ndarray | None = None


def _as_options(options: ReconOptions | dict[str, Any] | None) -> ReconOptions:
    if options is None:
        return ReconOptions()
    if isinstance(options, ReconOptions):
        return options
    return ReconOptions.from_dict(options)


def measured_probe_power(counts_fft: Any, mask: Any | None, probe: Any | None = None) -> float:
    """Mean counts per pattern, corrected for masked pixels by the share of the probe's
    diffraction power that falls on valid pixels (without a probe: valid pixels only)."""
    xp = array_module(counts_fft)
    if mask is None:
        (total,) = host_floats(counts_fft.sum(dtype=np.float64))
        return total / counts_fft.shape[0]
    if probe is not None and probe.ndim == 3:
        # incoherent modes: their diffraction powers add
        spec = fft2(probe)
        spec = (spec.real**2 + spec.imag**2).sum(axis=0)
        total, on, whole = host_floats(
            (counts_fft * mask).sum(dtype=np.float64), (spec * mask).sum(), spec.sum())
        return total / counts_fft.shape[0] / max(on / max(whole, 1e-300), 1e-12)
    if probe is None:
        (total,) = host_floats((counts_fft * mask).sum(dtype=np.float64))
        return total / counts_fft.shape[0]
    spec = xp.abs(fft2(probe)) ** 2
    total, on, whole = host_floats(
        (counts_fft * mask).sum(dtype=np.float64), (spec * mask).sum(), spec.sum())
    share = on / max(whole, 1e-300)
    return total / counts_fft.shape[0] / max(share, 1e-12)


def _initial_probe(data: PtychoData, options: ReconOptions, xp: ModuleType, counts_fft: Any) -> Any:
    m = data.frame_shape
    if data.probe is not None:
        return asarray(data.probe, xp, complex_dtype(options.precision))
    if data.probe_model is not None:
        pm = data.probe_model
        return make_probe(
            pm.kind, m, data.real_pixel_size, data.energy, pm.semiangle, pm.defocus, pm.cs,
            1.0, pm.zones, pm.diameter, pm.seed, xp, options.precision,
        )
    if not options.refine_probe:
        raise ValueError(
            "the dataset has neither /probe nor /probe_model and refine_probe is off: "
            "there is no probe to reconstruct with"
        )
    # No probe given: the focused probe whose vacuum pattern is the mean pattern (flat phase);
    # probe refinement must then do the rest.
    mean = counts_fft.astype(real_dtype(options.precision)).mean(axis=0)
    probe = xp.fft.fftshift(ifft2(xp.sqrt(mean).astype(complex_dtype(options.precision))))
    return probe


def _parallax_corrected(probe: Any, data: PtychoData, opts: ReconOptions,
                        positions: np.ndarray) -> tuple[Any, dict[str, float]]:
    """The nominal probe corrected by the parallax fit (gpu/parallax.py) when ``opts.parallax``
    asks for it ("auto": a probe from the dataset's probe model, one mode), and the fit's record
    for the result file (``ParallaxFit.record``; empty when no fit ran)."""
    probe, record, _ = _parallax_applied(probe, data, opts, positions)
    return probe, record


def _wide_fit_holds(probe: Any, positions: np.ndarray, pixel_size: float) -> bool:
    """Whether the scan is wide enough against the probe for the wide parallax fit's model
    (``parallax.MAX_PROBE_TO_SCAN``): on 8×8 frames under a ~9 Å probe on a 15 Å raster it
    applied 47–48 nm of defocus for 20 (χ² 40–95), a bias of the model no noise gate sees."""
    width, scan = probe_width(probe, pixel_size), scan_width(positions)
    if width <= MAX_PROBE_TO_SCAN * scan:
        return True
    log.warning("parallax: no wide fit: the probe is about %.1f Å across, the scan %.1f Å along its narrower "
                "side (the wide fit needs a scan at least %.2g× the probe's width)", width * 1e10, scan * 1e10,
                1.0 / MAX_PROBE_TO_SCAN)
    return False


def _parallax_applied(probe: Any, data: PtychoData, opts: ReconOptions,
                      positions: np.ndarray) -> tuple[Any, dict[str, float], np.ndarray]:
    """:func:`_parallax_corrected`, and the positions to reconstruct at: ``positions`` through
    the fitted scan matrix when ``opts.parallax_scan`` and the data reject the nominal scan."""
    auto = opts.parallax == "auto"
    use = (data.probe is None and data.probe_model is not None and probe.ndim == 2) if auto else opts.parallax
    if not use:
        if opts.parallax_scan:
            log.warning("parallax_scan: the parallax fit does not run (parallax=%s, %s), so the scan "
                        "matrix is not fitted: the nominal positions are used", opts.parallax,
                        "a measured /probe" if data.probe is not None else "no single-mode probe model")
        return probe, {}, positions
    if probe.ndim != 2:
        raise ValueError("parallax needs a single coherent probe: give an (M, M) probe or set parallax=false")
    def fit_at(reach: float) -> ParallaxFit:
        return estimate_aberrations(data.frames, positions, probe, data.real_pixel_size, data.energy,
                                    mask=data.mask, names=tuple(opts.parallax_aberrations),
                                    search_range_m=opts.parallax_range_m, scan=opts.parallax_scan,
                                    scan_prior_rms=opts.parallax_scan_prior,
                                    nyquist_fraction=reach, aliases=opts.parallax_aliases,
                                    null_draws=null_draws, null_confidence=opts.parallax_confidence)

    # the search's null costs a fit per surrogate: offline only, as the wide fit (a time
    # budget's count starts after the fits)
    null_draws = opts.parallax_null_draws if auto and opts.time_budget_s is None else 0

    def rejects(f: ParallaxFit, confidence: float) -> bool:
        """The gate: the χ² test at ``confidence``, and where the search's null was measured
        (``parallax_null_draws``) its p-value at ``parallax_confidence``'s α as well."""
        return f.rejects_nominal(confidence) and f.passes_null(opts.parallax_confidence)

    reach = opts.parallax_reach
    wide_record: dict[str, float] = {}
    unconfirmed = False  # the first fit rejected the nominal probe, not decisively, and the wide one did not
    try:
        fit = fit_at(reach)
        wide = opts.parallax_wide_reach
        # with parallax_scan the joint fit is made once: a second joint fit would cost 4–7× the
        # first and move the scan matrix the first one already gated
        # nor under a time budget: the wide fit costs up to minutes on a large scan (a 3,472-pattern
        # ribosome: 168 s of CPU), before the budget's clock starts, which the budget promises
        if (auto and wide is not None and wide > reach and not opts.parallax_scan
                and opts.time_budget_s is None
                and not rejects(fit, decisive_confidence(opts.parallax_confidence))
                and _wide_fit_holds(probe, positions, data.real_pixel_size)):
            # One test decides, the wide fit's (its frequencies include the first's): two gates
            # in a row, each at parallax_confidence, opened on 17 of 82 synthetic scans whose
            # probe was right. The first fit decides alone only when decisive, at 1/50 of the
            # test's α: the family-wise rate is at most α (1 + 1/50) (MEASUREMENTS.md, "The two
            # parallax gates' family-wise rate")
            first_rejects = rejects(fit, opts.parallax_confidence)
            log.info("parallax fit at reach %g %s (χ² %.1f): fitting at reach %g", reach,
                     "not decisive" if first_rejects else "not significant", fit.significance, wide)
            wider = fit_at(wide)
            wide_record = {"parallax_wide_significance": float(wider.significance)}
            if rejects(wider, opts.parallax_confidence):
                if not first_rejects:  # else the first fit's estimate, now confirmed
                    fit, reach, wide_record = wider, wide, {}
            else:
                unconfirmed = first_rejects
    except ValueError as exc:
        if not auto:
            raise ValueError(f"parallax: {exc}") from exc
        # "auto" on a scan the fit cannot use (too few positions or frequencies): nominal probe
        log.warning("parallax fit skipped, the nominal probe is used: %s", exc)
        return probe, {}, positions
    log.info("parallax fit: %s nm (log-likelihood gain %.1f, %d frequencies × %d pixels)",
             {k: round(v * 1e9, 1) for k, v in fit.coefficients.items()}, fit.log_likelihood_gain,
             fit.frequencies, fit.pixels)
    confidence = opts.parallax_confidence if auto else None
    frames = len(positions)
    reach_record = {"parallax_reach": float(reach), **wide_record}
    # the scan matrix has its own gate (always a test: even an explicit parallax=true applies
    # it only when the data reject the nominal scan at parallax_confidence)
    scan_applies = fit.scan_rejects_nominal(opts.parallax_confidence)
    if fit.scan_matrix is not None:
        log.info("parallax scan fit: A − I = %s %% ± %s %% (χ² %.1f, %s)",
                 [round(v * 100, 2) for v in fit.scan_matrix],
                 [round(v * 100, 2) for v in fit.scan_standard_error or ()], fit.scan_significance,
                 "applied" if scan_applies else "not significant: the nominal positions are kept")
    scan_record = fit.scan_record(scan_applies, opts.parallax_confidence)
    used = fit.scan_positions(positions) if scan_applies else positions
    if not any(fit.coefficients.values()):
        return probe, {**fit.record(False, frames, confidence), **scan_record, **reach_record}, used
    if auto and (unconfirmed or not rejects(fit, opts.parallax_confidence)):
        log.info("parallax fit not significant (χ² %.1f for %d coefficients%s): the nominal probe is kept",
                 fit.significance, len(fit.coefficients),
                 ", not confirmed by the wide fit" if unconfirmed else "")
        return probe, {**fit.record(False, frames, confidence), **scan_record, **reach_record}, used
    return (aberrate(probe, data.real_pixel_size, data.energy, fit.coefficients),
            {**fit.record(True, frames, confidence), **scan_record, **reach_record}, used)


#: the share of ``parallax_confidence``'s α the first parallax fit decides with alone when a wide
#: fit follows (``decisive_confidence``)
DECISIVE_SHARE = 1.0 / 50.0


def decisive_confidence(confidence: float) -> float:
    """The confidence at which the first parallax fit decides without the wide fit:
    1 − α/50 for ``confidence`` 1 − α (0.999 for 0.95; χ² 16.3 for three coefficients)."""
    return 1.0 - (1.0 - confidence) * DECISIVE_SHARE


def with_source(probe: Any, opts: ReconOptions, pixel_size: float, stated: float | None = None) -> Any:
    """``probe`` blurred by the finite source :func:`source_size_in_force` into incoherent modes
    (``probes.source_modes`` of its main mode; the probe itself when there is no source). Under
    "auto" a probe given as modes keeps them: a stated size is for a coherent probe."""
    if opts.source_size_m == "auto" and probe.ndim == 3:
        return probe
    size = source_size_in_force(opts, stated)
    if not size:
        return probe
    main = probe if probe.ndim == 2 else probe[0]
    return source_modes(main, pixel_size, size, source_modes_in_force(opts))


def illuminated_pixels(probe: Any, batch: Batch, threshold: float = 0.01) -> int:
    """Object pixels whose total illumination exceeds ``threshold`` × its maximum."""
    illum = illumination(probe, batch)
    xp = array_module(illum)
    top = scalar_as(threshold * dev_float(illum.max()), illum.dtype)
    return int(host_floats(xp.count_nonzero(illum > top))[0])


def _count_stats(counts_fft: Any, mask: Any | None, probe: Any, batch: Batch) -> tuple[int, float, int]:
    """(valid measurements, total valid counts, illuminated object pixels)."""
    k, m1, m2 = counts_fft.shape
    total, valid = host_floats(
        (counts_fft if mask is None else counts_fft * mask).sum(dtype=np.float64),
        m1 * m2 if mask is None else mask.sum(),
    )
    if total <= 0:
        raise ValueError("the dataset holds no counts in valid pixels: nothing to reconstruct")
    return k * int(valid), total, illuminated_pixels(probe, batch)


def problem_kappa(counts_fft: Any, mask: Any | None, probe: Any, batch: Batch) -> float:
    n_m, total, lit = _count_stats(counts_fft, mask, probe, batch)
    return kappa_of(n_m, total / n_m, lit)


def counts_per_object_pixel(counts_fft: Any, mask: Any | None, probe: Any, batch: Batch) -> float:
    """Detected electrons per illuminated object pixel, ‖y‖₁ / N_pix: the dose as the data
    see it, which ``mu0="auto"`` turns into μ₀ (``priors.auto_mu0``)."""
    _, total, lit = _count_stats(counts_fft, mask, probe, batch)
    return total / max(lit, 1)


def prepare(data: PtychoData, options: ReconOptions | dict[str, Any] | None = None) -> Problem:
    """Validate ``data`` and move it to the options' backend, with geometry, probe (normalised
    to the measured power), initial object and κ."""
    opts = _as_options(options)
    data.validate()
    energy_warning = implausible_energy(data.energy)
    if energy_warning:
        log.warning(energy_warning)
    xp = get_xp(opts.backend)
    rdt = real_dtype(opts.precision)
    m = data.frame_shape
    counts_fft = xp.asarray(np.ascontiguousarray(to_fft_order(np.asarray(data.frames))))
    mask = None
    if data.mask is not None:
        mask_host = to_fft_order(np.asarray(data.mask, dtype=rdt))
        if not mask_host.any():
            raise ValueError("mask marks every detector pixel invalid")
        mask = xp.asarray(mask_host)
    positions = np.asarray(data.positions, dtype=np.float64)
    # the probe first: the parallax fit may also move the positions (its scan matrix)
    probe = _initial_probe(data, opts, xp, counts_fft)
    nominal = probe
    probe, estimate, fitted_positions = _parallax_applied(probe, data, opts, positions)
    nominal_positions = positions if fitted_positions is not positions else None
    positions = fitted_positions
    margin = CANVAS_MARGIN
    if opts.refine_positions or opts.scan_search:
        # refined positions may leave the nominal scan's canvas: room for a few per cent
        span = float(np.ptp(positions, axis=0).max()) / data.real_pixel_size if len(positions) else 0.0
        margin = position_margin_px(span)
    geometry = fit_geometry(positions, data.real_pixel_size, m, margin_px=margin)
    batch = make_batch(geometry.to_pixels(positions), geometry.object_shape, m, xp=xp)
    stated = data.stated_source_size
    if opts.source_size_m == "auto" and (stated is not None or not opts.source_estimate or probe.ndim == 3):
        # decided now and saved as the number used (with source_estimate and nothing stated,
        # full_batch_reconstruct decides after the estimate)
        opts = opts.model_copy(update={"source_size_m": 0.0 if probe.ndim == 3 else source_size_in_force(opts, stated)})
        if opts.source_size_m:
            log.info("source size: %.3g Å rms, as the scan states: %d incoherent probe modes",
                     opts.source_size_m * 1e10, source_modes_in_force(opts))
    probe = with_source(probe, opts, data.real_pixel_size, stated)
    if opts.probe_modes > 1 or probe.ndim == 3:
        probe = initial_modes(probe, opts.probe_modes)
        if probe.ndim == 3 and probe.shape[0] == 1:
            probe = probe[0]
    power = measured_probe_power(counts_fft, mask, probe)
    if power <= 0:
        raise ValueError("the dataset holds no counts in valid pixels: nothing to reconstruct")
    probe = normalise_probe(probe, power).astype(complex_dtype(opts.precision))
    nominal_probe = normalise_probe(nominal, power).astype(complex_dtype(opts.precision)) if estimate else None
    if opts.init == "random":
        obj = _random_start(geometry.object_shape, margin - CANVAS_MARGIN, opts, xp)
    elif opts.init == "ones":
        obj = flat_object(geometry.object_shape, opts, xp)
    else:
        # the spectral start of a mixed-state probe uses its main mode at the full power
        main = probe if probe.ndim == 2 else probe[0] * scalar_as(
            dev_float(xp.sqrt((abs(probe) ** 2).sum() / (abs(probe[0]) ** 2).sum())), real_of(probe.dtype))
        obj = spectral_object(
            counts_fft, batch, main, geometry.object_shape, mask,
            iterations=opts.spectral_iterations, seed=opts.seed,
        )
    return Problem(
        xp=xp, options=opts, counts_fft=counts_fft, mask=mask, batch=batch, geometry=geometry,
        probe=probe, object=obj, positions=positions, probe_power=power,
        kappa=problem_kappa(counts_fft, mask, probe, batch), energy=float(data.energy),
        nominal_probe=nominal_probe, probe_estimate=estimate, nominal_positions=nominal_positions,
    )


def _random_start(shape: tuple[int, int], extra: int, opts: ReconOptions, xp: ModuleType) -> Any:
    """The random start of the canvas without refinement's ``extra`` spare pixels on each
    side, padded with the start's mean phase: position refinement's larger canvas must not
    draw other random phases (on the realistic ribosome at 20 e⁻/Å² that alone moved the
    phase correlation by 0.017, by chance), so a refinement that moves nothing starts and ends
    where the plain reconstruction does."""
    if extra <= 0:
        return random_object(shape, opts, xp)
    inner = random_object((shape[0] - 2 * extra, shape[1] - 2 * extra), opts, xp)
    obj = xp.full(shape, np.exp(1j * opts.init_phase_mean), dtype=inner.dtype)
    obj[extra:shape[0] - extra, extra:shape[1] - extra] = inner
    return obj


def _sub_batch(batch: Batch, sl: slice) -> Batch:
    """The positions ``sl`` of ``batch``, with only the probe shifts they use: a chunk must not
    shift the probe for every sub-pixel group of the whole scan (up to one per position)."""
    return sub_batch(batch, sl)


def _normalised(probe: Any, power: float) -> tuple[Any, Any]:
    """ψ·s with s = √P/‖ψ‖ (on a device s stays there: a zero or non-finite probe then shows
    as a non-finite loss, which CG refuses, instead of being read back here)."""
    xp = array_module(probe)
    norm = dev_float(xp.sqrt((probe.real**2 + probe.imag**2).sum()))
    if not on_device(norm) and (norm == 0 or not math.isfinite(norm)):
        raise FloatingPointError("probe became zero or non-finite")
    s = math.sqrt(power) / norm
    return probe * scalar_as(s, real_of(probe.dtype)), s


class FullBatchObjective:
    """x = {"object": T, "probe": ψ} ↦ (L, {"object": ∂L/∂T̄, "probe": ∂L/∂ψ̄}) over all
    positions, evaluated in chunks of ``options.chunk_size`` positions (memory bound only)."""

    def __init__(
        self, counts_fft: Any, batch: Batch, mask: Any | None, options: ReconOptions,
        kappa: float, probe_power: float, sparse: SparsePrior | None = None,
    ) -> None:
        if probe_power <= 0:
            raise ValueError(f"probe power must be positive, got {probe_power}")
        if options.mu0 == "auto" and options.prior == "tikhonov":
            # κ = N_m ‖y‖₁ / N_pix², so the counts per illuminated pixel ‖y‖₁ / N_pix that
            # decide μ₀ are √(‖y‖₁ κ / N_m): no probe needed
            k, m1, m2 = counts_fft.shape
            total, valid = host_floats(
                (counts_fft if mask is None else counts_fft * mask).sum(dtype=np.float64),
                m1 * m2 if mask is None else mask.sum())
            options = options.with_mu0_decision(math.sqrt(max(total, 1e-12) * kappa / max(k * valid, 1.0)))
        self.counts_fft = counts_fft
        self.mask = mask
        self.options = options
        self.kappa = float(kappa)
        self.power = float(probe_power)
        self.sparse = sparse
        chunk = options.chunk_size
        self.slices = [slice(i, min(i + chunk, batch.size)) for i in range(0, batch.size, chunk)]
        self.batches = [_sub_batch(batch, sl) for sl in self.slices]
        self.scale = AMPLITUDE_NLL_SCALE if options.noise_model == "amplitude" else 1.0
        #: Compute the probe gradient (skipped while the probe is fixed: it costs a group sum
        #: and a shift-back per chunk). Without it the result has no "probe" key.
        self.want_probe = True
        #: Compute the object gradient (skipped by a fit of the probe alone, e.g. the
        #: aberration fit at a held object: no scatter onto the object per evaluation).
        #: Without it the result has no "object" key.
        self.want_object = True

    def move_to(self, batch: Batch) -> None:
        """The objective at new positions (a batch of the same size). The batches are replaced
        by a new list, never changed in place: the line model's cached far fields and shifted
        probes are matched to the list by identity (line_model.py), and CG goes on from the
        same object and probe arrays after a position update."""
        if batch.size != sum(sl.stop - sl.start for sl in self.slices):
            raise ValueError(f"the positions moved to number {batch.size}, the objective has "
                             f"{sum(sl.stop - sl.start for sl in self.slices)}")
        self.batches = [_sub_batch(batch, sl) for sl in self.slices]

    def _truncation_sums(self, t: Any, psi: Any) -> tuple[float, float, float] | None:
        """Scan-wide truncation statistics. With several chunks they need a pass of their own
        (one extra forward FFT per position), so that chunking never changes the result."""
        opts = self.options
        if len(self.slices) == 1 or opts.truncation == "none" or not math.isfinite(opts.alpha_h):
            return None
        total: list[Any] = [0.0, 0.0, 0.0]
        for sl, sub in zip(self.slices, self.batches):
            y = self.counts_fft[sl]
            if psi.ndim == 3:
                inten = mode_intensity(t, psi, sub)
                part = intensity_sums(inten, y, self.mask)
                total = [a + b for a, b in zip(total, part)]
                continue
            far = forward(t, psi, sub)
            part = truncation_sums(far, y if y.dtype == far.real.dtype else y.astype(far.real.dtype),
                                   self.mask)
            total = [a + b for a, b in zip(total, part)]
        return total[0], total[1], total[2]

    def line(self, x: dict[str, Any], d: dict[str, Any], keys: set[str]) -> Any:
        """CG's line search model along ``d`` (trials at elementwise cost, line_model.py), or
        None when its far fields (one per position and probe mode) do not fit in memory."""
        return full_batch_line(self, x, d, keys)

    def __call__(self, x: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        opts = self.options
        t = x["object"]
        xp = array_module(t)
        psi, s = _normalised(x["probe"], self.power)
        loss = 0.0
        g_obj = xp.zeros_like(t)
        g_psi = xp.zeros_like(psi)
        sums = self._truncation_sums(t, psi)
        for sl, sub in zip(self.slices, self.batches):
            dt = data_term(
                t, psi, self.counts_fft[sl], sub, model=opts.noise_model,
                truncation=opts.truncation, alpha_h=opts.alpha_h, mask=self.mask,
                want_probe=self.want_probe, truncation_sums=sums, want_object=self.want_object,
            )
            loss += dt.loss
            if self.want_object:
                g_obj += dt.grad_object
            if self.want_probe:
                g_psi += dt.grad_probe
        return self.finish(t, psi, s, loss, g_obj, g_psi)

    def finish(self, t: Any, psi: Any, s: float, loss: float, g_obj: Any, g_psi: Any
               ) -> tuple[float, dict[str, Any]]:
        """Total loss and gradients from the data term's sums at object ``t`` and normalised
        probe ``psi = s·probe``: scaling, the prior, and the probe's power constraint."""
        xp = array_module(t)
        p_loss, p_grad = prior_term(t, self.options, self.kappa, None, self.sparse)
        grads = {"object": self.scale * g_obj + p_grad} if self.want_object else {}
        if self.want_probe:
            g_psi *= self.scale
            # Chain rule through ψ̂ = s ψ, s = √P/‖ψ‖: the radial part of the gradient vanishes.
            radial = dev_float(xp.vdot(psi.ravel(), g_psi.ravel()).real) / self.power
            rdt = real_of(psi.dtype)
            grads["probe"] = scalar_as(s, rdt) * (g_psi - scalar_as(radial, rdt) * psi)
        return self.scale * loss + p_loss, grads


def refine_full_batch(
    obj: Any,
    probe: Any,
    counts_fft: Any,
    batch: Batch,
    mask: Any | None,
    options: ReconOptions | dict[str, Any],
    iterations: int,
    time_budget_s: float | None = None,
    start_iteration: int = 0,
    sparse: SparsePrior | None = None,
    *,
    kappa: float | None = None,
    probe_power: float | None = None,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.perf_counter,
    between: Callable[[int, dict[str, Any]], Batch | None] | None = None,
    pace: IterationPace | None = None,
    stopped: list[str] | None = None,
) -> tuple[Any, Any, list[float]]:
    """Run ``iterations`` full-batch CG iterations (numbered from ``start_iteration``) on all
    positions of ``batch``. The probe keeps its power Σ|ψ|² (or ``probe_power``) and joins at
    ``options.probe_start_iteration`` when ``options.refine_probe`` (for "auto": when the mean
    valid counts per pattern of ``counts_fft`` reach the threshold). Returns the object, the
    (normalised) probe and the loss after each iteration (data term + prior). The time budget
    counts from the call (the set-up is part of it) and is kept as CG keeps it
    (:func:`cryoptycho.gpu.cg.minimize`); ``clock`` is injectable for tests.
    ``between(done, x)`` runs after each iteration (``done`` iterations counted from 0, ``x``
    CG's current variables, not to be modified): it returns new positions (a batch of the same
    size) when it moved them — the objective changed, CG restarts from steepest descent there —
    or None, and CG goes on untouched (a position update that finds nothing costs nothing). It
    does not run after the last iteration reported (:func:`cryoptycho.gpu.cg.minimize`'s
    ``update``). ``pace``: CG's estimate of its next iteration, shared with the caller's own
    guards and runs (see :class:`cryoptycho.gpu.cg.IterationPace`). ``stopped``: why CG stopped
    is appended to it ("max_iter", "time_budget", "converged" or "no_descent"; "time_budget"
    when no time was left to start)."""
    t_start = clock()
    opts = _as_options(options)
    if opts.refine_probe == "auto":
        opts = opts.with_probe_decision(measured_probe_power(counts_fft, mask))
    budget = time_budget_s if time_budget_s is not None else opts.time_budget_s
    if budget is not None and budget <= 0:
        final, _ = _normalised(probe, float(probe_power) if probe_power is not None
                               else host_floats((abs(probe) ** 2).sum())[0])
        if stopped is not None:
            stopped.append("time_budget")
        return obj, final, []  # no time: no set-up is paid for
    if counts_fft.shape[0] != batch.size:
        raise ValueError(
            f"counts hold {counts_fft.shape[0]} patterns but the batch has {batch.size} positions"
        )
    if counts_fft.shape[1:] != probe.shape[-2:]:
        raise ValueError(f"frame shape {counts_fft.shape[1:]} does not match probe {probe.shape}")
    power = host_floats((abs(probe) ** 2).sum())[0] if probe_power is None else float(probe_power)
    if opts.mu0 == "auto":
        opts = opts.with_mu0_decision(counts_per_object_pixel(counts_fft, mask, probe, batch))
    kap = problem_kappa(counts_fft, mask, probe, batch) if kappa is None else float(kappa)
    if opts.prior == "sparse" and sparse is None:
        sparse = SparsePrior(opts.denoiser, opts.mu1, opts.denoise_every)
    if sparse is not None:
        sparse.update(obj, start_iteration)
    fun = FullBatchObjective(counts_fft, batch, mask, opts, kap, power, sparse)

    def object_precond(batch: Batch, probe: Any) -> Any:
        illum = illumination(probe, batch)
        damping = 0.05 * host_floats(illum.max())[0]
        if opts.prior == "tikhonov":
            damping += 4.0 * opts.mu0 * kap
        elif opts.prior == "sparse":
            damping += opts.mu1 * kap
        return (1.0 / (illum + damping)).astype(illum.dtype)

    (obj_power,) = host_floats((abs(obj) ** 2).mean())
    precond = {
        "object": object_precond(batch, probe),
        "probe": 1.0 / max(float(batch.size) * obj_power, 1e-30),
    }
    if opts.lowfreq_boost > 1:
        # (the start's phase factors: the boost acts on the object's phase, not its amplitude)
        precond["object"] = LowFrequencyPreconditioner(precond["object"], probe_cutoff(probe), opts.lowfreq_boost,
                                                       reference=obj)

    def active(it: int) -> set[str]:
        fun.want_probe = opts.refine_probe and it >= opts.probe_start_iteration
        return {"object", "probe"} if fun.want_probe else {"object"}

    total = start_iteration + iterations

    def callback(it: int, x: dict[str, Any], loss: float) -> bool:
        if progress is not None:
            progress(it + 1, total, loss)
        changed = False
        if sparse is not None and opts.prior == "sparse":
            changed = sparse.update(x["object"], it + 1)
        return changed

    def update(it: int, x: dict[str, Any]) -> bool:
        """``between`` after iteration ``it`` (timed apart by CG: its own guard predicts it)."""
        assert between is not None
        moved = between(it + 1, x)
        if moved is not None:
            if moved.size != batch.size:
                raise ValueError(f"between() moved {moved.size} positions, the scan has {batch.size}")
            # minimize reads the preconditioner's dict at every iteration: the new one is used
            # from the restart on
            fun.move_to(moved)
            precond["object"] = object_precond(moved, x["probe"])
            if opts.lowfreq_boost > 1:  # (as built before CG: a position update keeps the boost)
                precond["object"] = LowFrequencyPreconditioner(precond["object"], probe_cutoff(x["probe"]),
                                                               opts.lowfreq_boost, reference=x["object"])
            return True
        return False

    x = {"object": obj, "probe": probe}
    losses: list[float] = []
    it = start_iteration
    relaxed = 0  # widenings of α_h after the truncation rule stalled CG
    while it < total:
        left = None if budget is None else budget - (clock() - t_start)
        res = minimize(fun, x, total - it, left, callback, active, precond, start_iteration=it,
                       clock=clock, update=None if between is None else update, pace=pace)
        if stopped is not None:
            stopped.append(res.stopped)
        x = res.x
        losses += res.losses
        it += res.iterations
        if (res.stopped == "no_descent" and it < total and relaxed < TRUNCATION_RELAXATIONS
                and fun.options.truncation != "none" and math.isfinite(fun.options.alpha_h)):
            # The truncation rule makes the objective discontinuous: along a line, a measurement
            # near its threshold flips from dropped to kept and the loss jumps by its deviance
            # (ribosome, 20 e⁻/Å²: +5.7 at every trial step while φ' promised −0.07), so the
            # line search finds no descent long before CG has converged. A wider α_h keeps the
            # marginal measurements (outliers far above it stay dropped) and CG goes on.
            relaxed += 1
            fun.options = fun.options.model_copy(update={"alpha_h": 2.0 * fun.options.alpha_h})
            log.info("CG stalled on the truncation rule at iteration %d: alpha_h → %g", it,
                     fun.options.alpha_h)
            continue
        # With the sparse prior the objective is only stationary until T_sparse moves: when CG
        # has converged on the current target, refresh it early instead of stopping.
        if res.stopped not in ("converged", "no_descent") or sparse is None or it >= total:
            break
        sparse.update(x["object"], it, force=True)
        it += 0 if res.iterations else 1  # count a fruitless attempt, so the loop ends
    final_probe, _ = _normalised(x["probe"], power)
    # incoherent modes are defined up to a unitary mixing (the loss is unchanged by it): hand
    # them back orthogonal and ordered by power
    return x["object"], orthogonalize_modes(final_probe), losses


def _spectral_centroid(probe: Any) -> np.ndarray:
    """Circular centroid (cycles per pixel, y and x) of the probe's power spectrum."""
    xp = array_module(probe)
    power = xp.abs(fft2(probe)) ** 2
    if power.ndim == 3:
        power = power.sum(axis=0)  # of all modes together
    out = []
    for axis, n in ((1, power.shape[0]), (0, power.shape[1])):
        marginal = power.sum(axis=axis)
        phase = xp.exp(2j * np.pi * xp.arange(n) / n)
        out.append(float(np.angle(complex(to_numpy((marginal * phase).sum())))) / (2 * np.pi))
    return np.asarray(out)


def fix_phase_ramp(obj: Any, probe: Any, reference_probe: Any) -> tuple[Any, Any]:
    """Fix the exact gauge between probe and object: a ramp e^{2πi q·r} on the object with
    e^{−2πi q·r} on the probe leaves every intensity unchanged (the product gains a constant
    phase per position), so a refined probe may drift along it and tilt the object's phase.
    The probe's spectral centroid is put back where ``reference_probe`` (the starting probe)
    has it, and the object takes the opposite ramp."""
    xp = array_module(obj)
    dq = _spectral_centroid(probe) - _spectral_centroid(reference_probe)
    dq = (dq + 0.5) % 1.0 - 0.5
    if not np.any(dq):
        return obj, probe

    def ramp(shape: tuple[int, ...], sign: float) -> Any:
        y = xp.arange(shape[-2])[:, None]
        x = xp.arange(shape[-1])[None, :]
        return xp.exp(sign * 2j * np.pi * (dq[0] * y + dq[1] * x))

    return (obj * ramp(obj.shape, 1.0)).astype(obj.dtype), (probe * ramp(probe.shape, -1.0)).astype(probe.dtype)


def _search_aberrations(problem: Problem, opts: ReconOptions) -> Problem:
    """``problem`` with its probe replaced by the one :func:`search_aberrations` finds.

    By default each trial probe is scored by the objective after a short reconstruction from
    all the counts. That objective rewards a probe that lets the object fit more noise: an exact
    probe moved to overlap 0.32–0.93 on the engine tests' scan at 3,000 counts, and on hemoglobin
    at 20 e⁻/Å² with an exact probe and a 1 % scan shear C10 went to −21.7 nm (phase correlation
    0.36 → 0.22). With ``aberration_search_halves`` the object is fitted to one binomial half of
    the counts (metrics.binomial_split) and the score is the mean of both halves' data terms at
    it, position by position: the fitted half alone has that bias, the held-out half alone the
    opposite one (it chose −30 nm where the truth was +30 nm); for a fixed design they are equal
    and opposite (E[fitted] = σ²(n − p), E[held out] = σ²(n + p)), so the mean cancels them to
    first order. A coefficient then moves only when its gain passes
    ``aberration_search_significance`` standard errors of the per-position differences
    (:func:`search_aberrations`). Opt-in: on the realistic preset (all errors at once) it finds
    no significant defocus at 20 e⁻/Å² and on one of two seeds at 100, where the default search's
    moves gained (MEASUREMENTS.md, "Realistic scans: one error at a time, and the search's
    bias"). Counts that are not integers (noiseless or gain-corrected frames) cannot be thinned:
    there the default score is used."""
    model = ParametricProbe(problem.probe, problem.geometry.pixel_size, problem.energy, opts.aberrations)
    held_out = _halves(problem, opts, 15) if opts.aberration_search_halves else None
    if held_out is None:
        if opts.aberration_search_halves:
            log.info("aberration search: the counts are not integers, no held-out half: the "
                     "fitted counts' objective is searched")
        fixed = opts.model_copy(update={"refine_probe": False})

        def reduced(psi: Any) -> Any:
            _, _, losses = refine_full_batch(
                problem.object, psi, problem.counts_fft, problem.batch, problem.mask, fixed,
                opts.aberration_search_iterations, kappa=problem.kappa, probe_power=problem.probe_power,
            )
            return losses[-1] if losses else math.inf
    else:
        fit_counts, test_counts, fixed, kappa, power = held_out

        def reduced(psi: Any) -> Any:
            obj, fitted, _ = refine_full_batch(
                problem.object, psi, fit_counts, problem.batch, problem.mask, fixed,
                opts.aberration_search_iterations, kappa=kappa, probe_power=power,
            )
            test = _data_terms(obj, fitted, test_counts, problem.batch, problem, opts)
            fit = _data_terms(obj, fitted, fit_counts, problem.batch, problem, opts)
            return 0.5 * (test + fit)

    before, after, evals = search_aberrations(model, reduced, opts.aberration_search_step_rad,
                                              opts.aberration_search_rounds,
                                              opts.aberration_search_significance)
    log.info("aberration search: %s %.6g → %.6g (%d short reconstructions), %s",
             "reduced objective" if held_out is None else "two halves' data term", before, after, evals,
             ", ".join(f"{k} {v * 1e9:+.2f} nm" for k, v in model.as_dict().items()))
    estimate = {**problem.probe_estimate,
                **{f"search_{k}_m": v for k, v in model.as_dict().items()}}
    return dataclasses.replace(problem, probe=model.probe().astype(problem.probe.dtype),
                               probe_estimate=estimate)


def _halves(problem: Problem, opts: ReconOptions, stream: int) -> tuple[Any, Any, ReconOptions, float, float] | None:
    """Two independent halves of the counts by binomial thinning (metrics.binomial_split, the
    random stream ``[seed, stream]``) on the problem's device: (fit counts, test counts, the
    options for a fit to half the dose — μ₀ "auto" decided for it —, κ and probe power of a
    half); None for counts that are not integers."""
    counts = to_numpy(problem.counts_fft)
    if counts.dtype.kind not in "iu" and (not np.all(np.isfinite(counts)) or np.any(counts != np.round(counts))):
        return None
    half_a, half_b = binomial_split(counts, np.random.default_rng([int(opts.seed), stream]))
    xp = problem.xp
    dtype = problem.counts_fft.dtype
    fit_counts = xp.asarray(half_a.astype(dtype, copy=False))
    test_counts = xp.asarray(half_b.astype(dtype, copy=False))
    fixed = opts.model_copy(update={"refine_probe": False, "mu0": problem.options.mu0})
    kappa = problem_kappa(fit_counts, problem.mask, problem.probe, problem.batch)
    return fit_counts, test_counts, fixed, kappa, 0.5 * problem.probe_power


def _data_terms(obj: Any, psi: Any, counts: Any, batch: Batch, problem: Problem,
                         opts: ReconOptions) -> np.ndarray:
    """The data term (no truncation) of ``counts`` at ``obj`` and the normalised probe
    ``psi``, position by position (float64 on the host), in chunks of ``opts.chunk_size``."""
    scale = AMPLITUDE_NLL_SCALE if opts.noise_model == "amplitude" else 1.0
    chunk = opts.chunk_size
    xp = problem.xp
    parts = [data_loss_per_position(obj, psi, counts[sl], sub_batch(batch, sl), model=opts.noise_model,
                                    mask=problem.mask, scale=scale)
             for sl in (slice(i, min(i + chunk, batch.size)) for i in range(0, batch.size, chunk))]
    return to_numpy(xp.concatenate(parts)).astype(np.float64)


def _search_scan(problem: Problem, opts: ReconOptions) -> tuple[Problem, Any]:
    """``problem`` at the positions of the scan matrix :func:`search_scan_matrix` finds, and
    the search. The reduced objective is *cross-validated*: the counts are split by binomial
    thinning into two independent halves (metrics.binomial_split), each trial's object is
    reconstructed from one half and scored by the data term of the other. The data term of the
    half it was fitted to would be biased: a larger scan covers more object pixels, and more
    free pixels fit more of the noise (proteasome, 100 e⁻/Å²: a 4 % larger scan lowered it by
    more than the true matrix did)."""
    geo = problem.geometry
    xp = problem.xp
    m = geo.probe_shape
    nominal = geo.to_pixels(problem.positions)
    hi = np.asarray(geo.object_shape, dtype=np.float64) - np.asarray(m, dtype=np.float64) - 1.0
    scale = AMPLITUDE_NLL_SCALE if opts.noise_model == "amplitude" else 1.0
    chunk = opts.chunk_size
    half_a, half_b = binomial_split(problem.counts_fft, np.random.default_rng([int(opts.seed), 14]))
    fit_counts = xp.asarray(half_a)
    test_counts = xp.asarray(half_b)
    # the half is half the dose: μ₀ "auto" and κ are decided for it
    fixed = opts.model_copy(update={"refine_probe": False, "mu0": problem.options.mu0})
    kappa = problem_kappa(fit_counts, problem.mask, problem.probe, problem.batch)
    power = 0.5 * problem.probe_power

    def positions_of(matrix: np.ndarray) -> np.ndarray:
        return ScanModel(nominal, matrix).positions

    def reduced(matrix: np.ndarray) -> float:
        pos = positions_of(matrix)
        if np.any(pos < 0) or np.any(pos > hi):
            return math.inf  # off the canvas: a matrix far beyond a few per cent
        batch = make_batch(pos, geo.object_shape, m, xp=xp)
        obj, psi, _ = refine_full_batch(
            problem.object, problem.probe, fit_counts, batch, problem.mask, fixed,
            opts.scan_search_iterations, kappa=kappa, probe_power=power,
        )
        parts = [data_loss(obj, psi, test_counts[sl], sub_batch(batch, sl), model=opts.noise_model,
                           mask=problem.mask, scale=scale)
                 for sl in (slice(i, min(i + chunk, batch.size)) for i in range(0, batch.size, chunk))]
        return float(sum(host_floats(*parts)))

    found = search_scan_matrix(reduced, opts.scan_search_step, opts.scan_search_rounds)
    log.info("scan search: held-out data term %.6g → %.6g (%d short reconstructions), matrix %s",
             found.loss_before, found.loss_after, found.evaluations,
             np.round(found.matrix.ravel(), 5).tolist())
    pos = positions_of(found.matrix)
    batch = make_batch(pos, geo.object_shape, m, xp=xp)
    return dataclasses.replace(problem, batch=batch, positions=geo.to_metres(pos)), found


def _estimate_source(problem: Problem, opts: ReconOptions) -> tuple[Problem, ReconOptions]:
    """``problem`` with the probe's modes of the source size estimated from the data
    (gpu/coherence.py; applied only when confident), and the options with that size (a
    number). The estimate's record goes to the result's probe estimate."""
    from .coherence import estimate_source_size

    # a half holds half the dose: μ₀ "auto" is decided for it (as the scan search does)
    est = estimate_source_size(
        problem.object, problem.probe, problem.counts_fft, problem.batch, problem.mask,
        opts.model_copy(update={"mu0": problem.options.mu0}),
        problem.geometry.pixel_size, problem.probe_power, iterations=opts.source_estimate_iterations,
        seed=opts.seed)
    size = est.source_size_m
    log.info("source size estimate: %.2f Å (held-out gain %s): %s", est.best_m * 1e10,
             [round(g, 1) for g in est.gains()],
             f"{size * 1e10:.2f} Å applied" if size else "not confident, coherent probe")
    opts = opts.model_copy(update={"source_size_m": size})
    estimate = {**problem.probe_estimate, **est.record()}
    if not size:
        return dataclasses.replace(problem, options=opts, probe_estimate=estimate), opts
    probe = with_source(problem.probe, opts, problem.geometry.pixel_size)
    if opts.probe_modes > 1:
        probe = initial_modes(probe, opts.probe_modes)
    probe = normalise_probe(probe, problem.probe_power).astype(problem.probe.dtype)
    kappa = problem_kappa(problem.counts_fft, problem.mask, probe, problem.batch)
    return dataclasses.replace(problem, options=opts, probe=probe, kappa=kappa, probe_estimate=estimate), opts


def _probe_loss(fun: FullBatchObjective, obj: Any) -> Callable[[Any], tuple[float, Any]]:
    """ψ ↦ (L, ∂L/∂ψ̄) of ``fun`` with the object held at ``obj``."""

    def loss_and_grad(psi: Any) -> tuple[float, Any]:
        loss, grads = fun({"object": obj, "probe": psi})
        return loss, grads["probe"]

    return loss_and_grad


def _affine_of(nominal_px: np.ndarray, positions_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, offset) of the scan model (about the nominal centre) that maps ``nominal_px``
    to ``positions_px`` (least squares; exact for positions of an affine map)."""
    centre = nominal_px.mean(axis=0)
    design = np.c_[nominal_px - centre, np.ones(len(nominal_px))]
    coef, *_ = np.linalg.lstsq(design, positions_px - centre, rcond=None)
    return coef[:2].T, coef[2]


#: A position or aberration update's cost in mean CG iterations, before one of its kind was timed
#: (a position update evaluates the data term's gradient and trials at the moved positions:
#: 0.6–1.3 s against plain iterations of 0.3–1.5 s, median 0.6, in `bench live --realistic`
#: with refine_positions; an aberration fit runs ``aberration_fit_iterations`` evaluations of the
#: probe alone: a guess that errs long, not measured).
UPDATE_ITERATIONS = {"positions": 2.0, "aberrations": 5.0}


def refine_alternating(
    problem: Problem, opts: ReconOptions, progress: Progress | None, nominal_m: np.ndarray | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[Any, Any, list[float], np.ndarray]:
    """:func:`refine_full_batch` alternating with updates of the positions (gpu/positions.py)
    and of the probe's aberration coefficients (gpu/aberrations.py) at the object CG holds:
    after ``*_start_iteration`` CG iterations, every ``*_every``, none in the last ``*_every``
    (CG converges at the final positions and probe). A position update runs inside CG, which
    restarts only when the update moved the positions; an aberration fit ends a CG run.
    Returns the object, the probe, the losses and the positions (metres, refined or not). ``nominal_m``: the nominal
    positions when ``problem.positions`` already hold a scan search's affine image of them
    (the scan model then starts at that matrix, its residuals shrunk towards it).
    With ``refine_aberrations`` the coefficients found are added to ``problem.probe_estimate``
    as ``aberration_<name>_m`` (metres, relative to ``problem.probe``). A mixed-state probe
    (P, M, M) is refined as well: the positions' terms and the aberration gradient sum over
    the modes, every mode under the same phase plate. Within ``opts.time_budget_s`` an update
    starts only when its predicted cost (the last update's of its kind, else
    ``UPDATE_ITERATIONS`` of the mean CG iteration so far), a fresh evaluation and a CG iteration
    after it still fit (the iteration predicted as CG predicts it, by the pace all CG runs here
    share); an update at a point CG converged short of runs only when CG did not stop for the
    budget; accepted position updates and aberration fits that no CG iteration followed after
    all (one that took longer than predicted) are undone — the positions and probe returned are
    those the object was fitted with (``clock`` is injectable for tests)."""
    geo = problem.geometry
    total = opts.iterations
    budget = opts.time_budget_s
    t_start = clock()
    spent: dict[str, float] = {}  # seconds the last update of each kind took

    ran = [0]  # CG iterations run so far (the schedule's count runs ahead where CG stopped early)
    #: the scan model (matrix, offset, residuals) before the position updates that no CG
    #: iteration has followed yet (empty: none)
    unfollowed: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    #: the probe and its coefficients before the aberration fit that no CG iteration has
    #: followed yet (empty: none)
    unfollowed_probe: list[tuple[Any, np.ndarray]] = []

    # CG's own estimate of its next iteration, shared by all its runs here: the guards below
    # predict by the figures CG stops by (the mean alone said "fits" where CG, predicting by
    # its longest recent iteration, then stopped: an update nothing followed, a new run past
    # the budget)
    pace = IterationPace()

    def per_iteration() -> float:
        """Mean seconds per CG iteration run so far (set-up and updates included: errs long)."""
        return (clock() - t_start) / max(ran[0], 1)

    def next_iteration() -> float:
        """The next CG iteration's predicted seconds: the longer of the mean and CG's estimate
        (the iteration being reported included, when CG is running)."""
        return max(per_iteration(), pace.ahead_s(clock()))

    def update_fits(kind: str, done: int) -> bool:
        """Whether a ``kind`` update due at the schedule's iteration ``done`` is expected to end
        in the budget with a CG iteration after it (the object follows the update: an update that
        only CG's time left unfollowed moves the positions or probe away from the object) — and
        the fresh evaluation CG needs first when the update changed the objective."""
        if budget is None:
            return True
        elapsed = clock() - t_start
        cost = spent.get(kind, UPDATE_ITERATIONS[kind] * per_iteration())
        if elapsed + cost + pace.evaluation_s + next_iteration() <= budget:
            return True
        log.info("%s update at iteration %d skipped: about %.1f s needed, %.1f s left of the budget",
                 kind, done, cost, budget - elapsed)
        return False
    scale = AMPLITUDE_NLL_SCALE if opts.noise_model == "amplitude" else 1.0
    scan = None
    if opts.refine_positions:
        # from the scan search's matrix when there was one: the nominal positions stay its base
        base = geo.to_pixels(problem.positions if nominal_m is None else nominal_m)
        scan = ScanModel(base)
        if nominal_m is not None:
            scan.matrix, scan.offset = _affine_of(base, geo.to_pixels(problem.positions))
    model = None
    if opts.refine_aberrations:
        model = ParametricProbe(problem.probe, geo.pixel_size, problem.energy, opts.aberrations)
    due: dict[int, set[str]] = {}
    if scan is not None:
        for s in range(opts.position_start_iteration, total - opts.position_every + 1, opts.position_every):
            due.setdefault(s, set()).add("positions")
    if model is not None:
        for s in range(opts.aberration_start_iteration, total - opts.aberration_every + 1,
                       opts.aberration_every):
            due.setdefault(s, set()).add("aberrations")
    xp = problem.xp
    m = geo.probe_shape
    obj, probe = problem.object, problem.probe
    losses: list[float] = []
    def report(i: int, _total: int, loss: float) -> None:
        ran[0] += 1
        unfollowed.clear()  # an iteration ran after any update: the object follows it
        unfollowed_probe.clear()
        if progress is not None:
            progress(i, total, loss)

    def batch_now() -> Batch:
        return problem.batch if scan is None else make_batch(scan.positions, geo.object_shape, m, xp=xp)

    def move_positions(done: int, o: Any, p: Any) -> bool:
        """One position update at object ``o`` and probe ``p``; True when it moved them."""
        assert scan is not None
        if not update_fits("positions", done):
            return False
        t0 = clock()
        fitted_at = (scan.matrix.copy(), scan.offset.copy(), np.array(scan.residual, copy=True))
        psi, _ = _normalised(p, problem.probe_power)
        upd = update_positions(o, psi, problem.counts_fft, scan, geo.object_shape, problem.mask,
                               opts, scale)
        spent["positions"] = clock() - t0
        log.info("positions: iteration %d, %s, data term %.6g → %.6g, largest move %.3f px%s", done,
                 "accepted" if upd.accepted else "rejected", upd.loss_before, upd.loss_after,
                 upd.max_shift_px, "" if not opts.position_residual_auto else
                 f", residual rms estimate {scan.residual_estimate_px:.3f} px")
        if upd.accepted and not unfollowed:
            unfollowed.append(fitted_at)  # where the object was last fitted
        return upd.accepted

    # CG is interrupted only where the probe's aberrations are fitted (the probe changes). The
    # position updates run inside CG (refine_full_batch's ``between``): an update that is
    # rejected leaves CG's direction and step untouched, so a refinement that finds nothing
    # costs nothing (each restart used to cost up to 0.010 in phase correlation); an accepted
    # one changes the objective and CG restarts there, as it did at every update before.
    inner = sorted(s for s, what in due.items() if "positions" in what)
    it = 0
    if inner and inner[0] == 0 and "aberrations" not in due[0]:
        # due before CG's first iteration (position_start_iteration 0), which ``between``
        # (called after an iteration) never sees; at an aberration fit the loop below runs it
        move_positions(0, obj, probe)
    for stop in sorted(s for s, what in due.items() if "aberrations" in what) + [total]:
        while it < stop:
            points = {s for s in inner if it < s < stop}

            def between(done: int, x: dict[str, Any], points: set[int] = points) -> Batch | None:
                if done not in points or not move_positions(done, x["object"], x["probe"]):
                    return None
                return batch_now()

            if (budget is not None and ran[0]
                    and clock() - t_start + pace.evaluation_s + next_iteration() > budget):
                break  # a new CG run's set-up, evaluation and first iteration would not fit
            left = None if budget is None else max(budget - (clock() - t_start), 1e-3)
            stopped: list[str] = []
            obj, probe, part = refine_full_batch(
                obj, probe, problem.counts_fft, batch_now(), problem.mask, opts, stop - it, left, it,
                kappa=problem.kappa, probe_power=problem.probe_power, progress=report,
                between=between if points else None, clock=clock, pace=pace, stopped=stopped,
            )
            losses += part
            reached = it + len(part)
            it = stop  # CG may stop early (converged at these positions/probe): the schedule goes on
            if budget is not None and clock() - t_start >= budget:
                break
            # converged before an update point: update there; CG goes on from it only when the
            # positions moved (a rejected update at the same object would be rejected again).
            # Not when CG stopped for the budget: no iteration would follow the update.
            pending = sorted(s for s in points if s > reached)
            if (pending and stopped and stopped[-1] in ("converged", "no_descent")
                    and move_positions(pending[0], obj, probe)):
                it = pending[0]
        if stop >= total or (budget is not None and clock() - t_start >= budget):
            break
        batch = batch_now()
        if "aberrations" in due[stop] and model is not None and update_fits("aberrations", len(losses)):
            t0 = clock()
            if not unfollowed_probe:
                unfollowed_probe.append((probe, model.coefficients.copy()))  # what the object was fitted with
            fun = FullBatchObjective(problem.counts_fft, batch, problem.mask, opts, problem.kappa,
                                     problem.probe_power)
            fun.want_object = False  # the object is held: its gradient is never used
            before, after, evals = fit_aberrations(
                model, _probe_loss(fun, obj), opts.aberration_fit_iterations)
            probe = model.probe()
            spent["aberrations"] = clock() - t0
            log.info("aberrations: iteration %d, objective %.6g → %.6g (%d evaluations), %s", it,
                     before, after, evals,
                     ", ".join(f"{k} {v * 1e9:+.2f} nm" for k, v in model.as_dict().items()))
        if "positions" in due[stop] and scan is not None:
            move_positions(stop, obj, probe)
    if unfollowed and scan is not None:
        # The updates since the last CG iteration took longer than predicted and left no
        # iteration after them: the object was fitted at the positions before them, and is
        # saved with those (an update costs 0.5-3 s at load, the last one's time predicts it)
        scan.matrix, scan.offset, scan.residual = unfollowed[0]
        log.info("positions: the update(s) after the last CG iteration are undone (no time left to follow them)")
    if unfollowed_probe and model is not None:
        # the same for an aberration fit that took longer than predicted: the object was fitted
        # with the probe before it, and the saved object and probe must agree
        probe, model.coefficients = unfollowed_probe[0]
        log.info("aberrations: the fit after the last CG iteration is undone (no time left to follow it)")
    positions = problem.positions if scan is None else geo.to_metres(scan.positions)
    if model is not None:
        # the coefficients found (relative to the probe the refinement started from) go to the
        # result file's /extra with the probe estimate
        problem.probe_estimate.update({f"aberration_{k}_m": v for k, v in model.as_dict().items()})
    return obj, probe, losses, positions


def reconstruct(
    data: PtychoData,
    options: ReconOptions | dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> ReconState:
    """Full offline reconstruction of ``data`` with the algorithm ``options.algorithm`` names
    (gpu/engines.py; the default "map-cg" is :func:`full_batch_reconstruct`);
    ``progress(iteration, total, loss)`` is called after each iteration."""
    from .engines import reconstruct as by_algorithm

    return by_algorithm(data, _as_options(options), progress)


def full_batch_reconstruct(
    data: PtychoData,
    options: ReconOptions | dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> ReconState:
    """The "map-cg" offline reconstruction: full-batch CG of the Poisson MAP objective (with
    position and aberration refinement when the options ask for them)."""
    problem = prepare(data, options)
    # refine_probe "auto" is decided here, from the dataset's mean valid counts per pattern; the
    # state saves the decision (true/false) with the options.
    has_probe = data.probe is not None or data.probe_model is not None
    opts = problem.options.with_probe_decision(
        measured_probe_power(problem.counts_fft, problem.mask), has_probe)
    if opts.mu0 == "auto":
        opts = opts.with_mu0_decision(
            counts_per_object_pixel(problem.counts_fft, problem.mask, problem.probe, problem.batch))
    if opts.source_size_m == "auto":  # source_estimate on, and the scan states no size
        problem, opts = _estimate_source(problem, opts)
    if opts.aberration_search:
        problem = _search_aberrations(problem, opts)
    nominal = problem.nominal_positions
    if opts.scan_search:
        nominal = problem.positions if nominal is None else nominal
        problem, _ = _search_scan(problem, opts)
    positions = problem.positions
    if opts.refine_positions or opts.refine_aberrations:
        if opts.refine_aberrations and opts.refine_probe:
            raise ValueError("refine_aberrations and refine_probe both refine the probe: choose one")
        obj, probe, losses, positions = refine_alternating(problem, opts, progress, nominal)
        if nominal is None and opts.refine_positions:
            nominal = problem.positions
    else:
        obj, probe, losses = refine_full_batch(
            problem.object, problem.probe, problem.counts_fft, problem.batch, problem.mask, opts,
            opts.iterations, kappa=problem.kappa, probe_power=problem.probe_power, progress=progress,
        )
    if opts.refine_probe is True:
        obj, probe = fix_phase_ramp(obj, probe, problem.probe)
    state = ReconState(
        object=obj, probe=probe, geometry=problem.geometry, iteration=len(losses),
        options=opts.to_dict(), frames_used=int(problem.counts_fft.shape[0]),
        positions=positions, energy=problem.energy, nominal_positions=nominal,
        nominal_probe=problem.nominal_probe, probe_estimate=dict(problem.probe_estimate),
    )
    for i, value in enumerate(losses, start=1):
        state.record_loss(i, value)
    return state


__all__ = [
    "AMPLITUDE_NLL_SCALE",
    "FullBatchObjective",
    "Problem",
    "counts_per_object_pixel",
    "fix_phase_ramp",
    "full_batch_reconstruct",
    "illuminated_pixels",
    "measured_probe_power",
    "prepare",
    "problem_kappa",
    "reconstruct",
    "refine_alternating",
    "refine_full_batch",
    "source_size_in_force",
    "with_source",
]
