"""Validated reconstruction options. Unknown keys are an error; options are saved with results.

Defaults follow the paper (μ₀ = 1e-2, μ₁ = 8e-2, α_h = 5) unless measurements on low-dose
data said otherwise; where they did, the field's docstring says why.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger(__name__)

#: Default of ``ReconOptions.probe_refine_min_counts`` (mean counts per pattern): above the
#: whole measured range, 300–10⁶, in which refinement never beat the fixed probe.
PROBE_REFINE_MIN_COUNTS = 1e7


class _Strict(BaseModel):
    # every option is a finite number: an infinite μ₀ or a NaN initial phase sent by a client
    # (msgpack carries both) passed the bounds and failed each scan at its first step
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    """Mini-batch updates while frames are still arriving (owned by gpu/stream.py)."""

    batch_size: int = Field(64, ge=1, le=65536)
    """Positions per mini-batch step."""
    fresh_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Share of each batch drawn from frames that have not been visited yet (the rest is drawn
    uniformly from all frames received so far)."""
    initial_capacity: int = Field(1024, ge=1)
    """Frames the store holds before it first grows (it grows geometrically, in place)."""
    growth: float = Field(1.5, gt=1.0, le=4.0)
    """Factor by which a full frame store grows (amortised O(1) appends)."""
    step_size: float = Field(1.5, gt=0, le=2.0)
    """Object step as a fraction of the illumination-normalised gradient (see STREAMING.md for
    the measurements behind the default)."""
    probe_step_size: float = Field(0.5, gt=0, le=2.0)
    """Probe step as a fraction of the object-intensity-normalised probe gradient."""
    illumination_floor: float = Field(0.1, gt=0, le=10.0)
    """δ of the step's normaliser (accumulated illumination + δ), relative to its maximum:
    keeps the step bounded in the probe's dim tails (as rPIE's α)."""
    memory_sweeps: float = Field(4.0, gt=0, le=1000.0)
    """The object step is normalised by the illumination accumulated over about this many
    sweeps of the frames received so far (exponential forgetting): fresh regions take a full
    ePIE-like step, well-visited ones average the batches of a sweep like recursive least
    squares, which removes the mini-batch noise floor."""
    momentum: float = Field(0.1, ge=0, lt=1.0)
    """Nesterov momentum of the object update, as the decay of the velocity over one sweep
    of the data (per step: momentum ** (batch / frames)). The low spatial frequencies of the
    phase converge slowly under a diagonal preconditioner; momentum carries them along. With
    the phase boost (``lowfreq_boost``) doing most of that, 0.1 (was 0.3): on realistic
    low-dose scans 0.3 doubled the NRMSE at scan end (STREAMING.md)."""
    lowfreq_boost: float = Field(10.0, ge=1.0, le=1e6)
    """The live object step's low-frequency boost of the phase (as ``lowfreq_boost`` does for
    CG: gpu/cg.py ``LowFrequencyPreconditioner``, the same cut-off from the probe), applied to
    each step's direction before the momentum; 1: off (the diagonal step). Default 10, with
    ``momentum`` 0.1: nearer the truth at scan end on the synthetic test scans and on realistic
    hemoglobin at 20 and 100 e⁻/Å², for an rfft2/irfft2 pair over the canvas per step (≈ 20 %
    of a 64-frame step's CPU on a 237² canvas; STREAMING.md, "The phase boost on the live
    steps")."""
    subpixel_quantum: float = Field(1e-3, gt=0, le=0.5)
    """Pixels to which the live steps round the probe's sub-pixel offsets. Each distinct
    offset in a batch costs an FFT pair, and jittered stage positions are all distinct;
    a coarser quantum (1/16 px: ≤ 0.03 px error) caps them at (1/quantum)² per batch, which
    pays off for batches larger than that. ``refine`` always uses exact offsets (1e-3 px)."""
    parallax_after: float = Field(1.0, gt=0, le=1.0)
    """With ``parallax`` in force (its "auto": a probe from the scan's probe model), the live
    engine fits the probe's aberrations to the frames received once this share of the expected
    frames has arrived (gpu/parallax.py, in a background thread: the steps go on meanwhile) and
    swaps the corrected probe in, keeping the object; 1.0, or a scan that declares no frame
    count, fits at scan end, before the refinement (STREAMING.md, "The parallax fit live").
    Default 1.0: on the realistic proteasome at 20 e⁻/Å² streamed at 500 frames/s the scan
    (≈ 4 s) ends long before a fit (≈ 15 s on a CPU) does, and a fit on half a raster scan
    (half the particle) is worse while it slows the steps; at scan end the live result matched
    the offline one (NRMSE ratio 1.004, 0.5: 1.065; MEASUREMENTS.md, "Live parallax fit"). With
    an early fit, ``parallax_refit`` fits again at scan end; on a loaded CPU the early fit
    still did not land in time (MEASUREMENTS.md, "After the parallax fit")."""
    parallax_refit: bool = True
    """A parallax fit made before scan end (``parallax_after`` < 1) is made again at scan end,
    on every frame received, and decides the probe the refinement uses (the early fit's
    correction, or the nominal probe when the fit on every frame does not reject it): the
    preview gains the early correction, the result the fit on the whole scan. An early fit
    still running at scan end is waited for first; the refit starts from its estimate (no
    grids: about half the trials); both come out of the half of the refinement budget the
    fit may take, and a refit not done by then is dropped (the early fit's probe stays)."""
    parallax_max_frames: int = Field(4096, ge=64)
    """The live parallax fit reads at most this many frames, every k-th of those received (k the
    smallest that fits, so the whole scan area stays covered): its time grows with the frames
    (≈ 17 s for 1,892 frames of 64² on a loaded 2-core CPU), and at scan end it comes out of the
    refinement budget. At scan end the engine waits for the fit at most half the remaining
    budget; a fit not done by then is dropped (nominal probe, a warning)."""

    probe_warmup_steps: int = Field(20, ge=0)
    """Mini-batch steps with a fixed probe before the probe joins (``refine_probe`` permitting)."""
    refine_positions: bool = False
    """With ``refine_positions`` on, refine the positions while frames arrive too, not only in
    the full-batch refinement after scan end (gpu/stream.py, gpu/positions.py
    ``LiveScanModel``): every ``position_every`` steps the batch's frames visited at least
    ``position_min_visits`` times get their position gradient and Fisher information, and
    the scan model (affine + bounded residuals) is refitted over every frame measured so far,
    when the steps' losses are next read (a preview; no device synchronisation in a step).
    Off by default: no measured gain in the final result. On the realistic preset (hemoglobin,
    20 and 100 e⁻/Å², 2 seeds, through the service) the final phase correlation moved by
    −0.013…+0.024 (mean +0.002) against refinement after scan end only, and the last preview's
    by −0.019…+0.012 (mean −0.007); on a synthetic speckle-probe scan whose positions the data
    determine it brings the scan-end position error from 0.66 px to 0.47–0.56 px and the
    scan-end NRMSE down in 2 of 3 seeds, the final NRMSE up in 2 of 3, at ≈ 56 % more time
    per step (MEASUREMENTS.md, "Live position correction")."""
    position_every: int = Field(4, ge=1)
    """Mini-batch steps between two position measurements (each costs about one more
    data-term evaluation of the batch's frames)."""
    position_min_visits: int = Field(4, ge=1)
    """The warm-up: a frame's position is measured only once the steps have visited the frame
    this many times (the object under it must show structure first)."""
    position_residual_auto: bool = False
    """The live model's residual prior estimated from the measured frames' scatter (as offline
    ``position_residual_auto``, at most ``position_residual_px``) instead of the fixed
    ``position_residual_px``. Off: no measured gain live. On the realistic hemoglobin at
    20 e⁻/Å² (``bench live --realistic``, seed 0) the final result tied (NRMSE 0.0921 → 0.0925,
    phase correlation 0.244 → 0.241, within the run's iteration count), and on the engine
    tests' scan (10⁵ counts, 0.3 px jitter) the estimate, made on an object still converging,
    rose only to 0.06–0.19 px and the live position error fell 0.66 → 0.59 px against 0.47 px
    with the fixed prior (MEASUREMENTS.md, "The live residual prior")."""
    canvas_slack: float = Field(0.25, ge=0, le=4.0)
    """When a position falls outside the canvas, grow it by at least this share of its size on
    the side that overflowed, so a scan that runs past its declared field re-pads rarely."""


AberrationName = Literal["C10", "C12a", "C12b", "C21a", "C21b", "C30"]
"""A coefficient gpu/probes.py's ABERRATIONS knows (tests/test_control_reply_bounds.py checks
that the two agree; this module does not import the engine's)."""


def _distinct_names(names: list[str]) -> list[str]:
    repeated = sorted({name for i, name in enumerate(names) if name in names[:i]})
    if repeated:
        raise ValueError(f"{', '.join(repeated)} named more than once: each coefficient is fitted once")
    return names


#: coefficients to fit: each known name at most once. Unbounded, a set_options of 65,000 names was
#: applied, and echoed in a reply of more values than a client reads, at every later defaults reply
AberrationNames = Annotated[list[AberrationName], Field(max_length=len(AberrationName.__args__)),
                            AfterValidator(_distinct_names)]


def _known_algorithm(name: str) -> str:
    from .engines import get_algorithm  # the registry imports this module

    get_algorithm(name)  # ValueError naming the known algorithms
    return name


class ReconOptions(_Strict):
    """Options of one reconstruction (offline or live)."""

    backend: Literal["numpy", "cupy", "strict"] = "numpy"
    """"strict" is the test backend (gpu/strict.py): CuPy's semantics on the CPU, counted."""
    precision: Literal["single", "double"] = "single"
    seed: int = 0
    algorithm: Annotated[str, AfterValidator(_known_algorithm)] = "map-cg"
    """The reconstruction algorithm (gpu/engines.py): "map-cg" (Poisson MAP, mini-batch steps
    while streaming, full-batch CG after) or a registered plug-in (ENGINE.md, "Adding an algorithm")."""

    noise_model: Literal["poisson", "amplitude"] = "poisson"
    truncation: Literal["none", "chen-candes", "high-intensity", "poisson-floor"] = "poisson-floor"
    """Truncation rule of the likelihood gradient (gpu/likelihood.py). "poisson-floor" (drop a
    measurement only when its residual is large against both the current misfit and counting
    noise floored at one count) is the one rule never worse than none in our measurements
    (MEASUREMENTS.md): identical to none at 5 and 20 e⁻/Å² (a lone electron is never dropped),
    and with 0.1 % unmasked outliers it keeps the clean-data quality (phase correlation
    0.41 vs 0.18 without truncation at 20 e⁻/Å²). The Chen–Candès rule lowered quality at
    every dose ≤ 200 e⁻/Å² without outliers."""
    alpha_h: float = Field(5.0, gt=0)
    """Truncation threshold α_h of eq. 20 (∞ disables truncation). 5 as in the paper; 3 cut
    genuine measurements at 200 e⁻/Å²."""

    lowfreq_boost: float = Field(10.0, ge=1.0, le=1e6)
    """Full-batch CG's object preconditioner: the diagonal one, (illumination + prior
    curvature)⁻¹, with the spatial frequencies below the probe's extent boosted by up to this
    factor in the object's phase direction (gpu/cg.py, ``LowFrequencyPreconditioner``); 1 =
    the diagonal one alone. 10 (the default) reaches the features larger than the probe in
    fewer iterations on large particles (ribosome at 20 e⁻/Å², 10 CG: phase correlation
    0.61 → 0.73) and ends where the diagonal one does; measured in MEASUREMENTS.md, "Low
    frequencies per band, and a Fourier preconditioner". At most 10⁶: the filter is single
    precision, and a boost past float32's range (≈ 3e38) was accepted, then failed each scan at
    CG's first iteration ("objective became non-finite")."""

    prior: Literal["none", "tikhonov", "sparse"] = "tikhonov"
    mu0: float | Literal["auto"] = "auto"
    """Weight of the Tikhonov gradient prior (eq. 12), scaled by κ (gpu/priors.py), ≥ 0, or
    "auto" (the default): chosen from the data's counts per illuminated object pixel e by the
    law of ``priors.auto_mu0`` (μ₀ = 0.01 (e / 7.5)^−0.64 within [1e-3, 0.018]), decided when
    the engine starts (offline: from the dataset; live: from the frames received so far) and
    saved as the number it chose. A fixed μ₀ is best at one dose only: on hemoglobin (0.8 Å pixels) the best of a
    grid 0.003…0.3 was 0.03–0.1 at 5 e⁻/Å², 0.01–0.03 at 20 and 0.003–0.01 at 100, on the
    proteasome 0.01 at 5 and 0.003–0.01 at 20 (MEASUREMENTS.md, "Dose-aware μ₀")."""
    mu1: float = Field(8e-2, ge=0)
    """Weight of the sparse (denoiser) prior (eq. 13)."""
    denoiser: str = "bm3d"
    """Denoiser behind the sparse prior (see cryoptycho.gpu.denoise)."""
    denoise_every: int = Field(10, ge=1)

    iterations: int = Field(100, ge=0)
    """Full-batch conjugate-gradient iterations (offline, and refinement after scan end)."""
    time_budget_s: float | None = Field(None, gt=0)

    refine_probe: bool | Literal["auto"] = "auto"
    """Refine the probe jointly with the object: true, false, or "auto" — refine only when the
    mean counts per pattern (valid pixels) reach ``probe_refine_min_counts``, decided when the
    probe would join (offline: from the dataset; live: at the end of the warm-up) and recorded
    as true/false in the options saved with the result. A dataset with no probe and no probe
    model is always refined (there is nothing to fix). Refinement fits shot noise at low dose:
    hemoglobin at 20 e⁻/Å² (340 counts) lost phase correlation from the exact probe
    (0.37 → 0.20) and from a 20 nm-defocused one (0.29 → 0.19); see ``probe_refine_min_counts``
    for the measurements (MEASUREMENTS.md, "Probe refinement against counts per pattern")."""
    probe_refine_min_counts: float = Field(PROBE_REFINE_MIN_COUNTS, gt=0)
    """Mean counts per pattern from which ``refine_probe="auto"`` refines the probe. Measured
    with the engine defaults (100 CG, Tikhonov μ₀ = 0.03, probe from iteration 10;
    tests/measure/probe_refine_measure.py, MEASUREMENTS.md) at 300–10⁶ counts, from the exact probe and from
    one 15–30 nm out of focus: refinement never beat the fixed probe — it fits shot noise below
    ≈ 3·10³ counts (hemoglobin, 64×64 frames: phase correlation 0.37 → 0.20 at 300 counts, probe
    overlap 0.48) and costs up to 0.15 of phase correlation above, even at 10⁶ counts where the
    probe it finds keeps overlap 1.00 with the truth (0.84 → 0.71). Hence a default above the
    measured range: "auto" keeps a given probe fixed at every dose this product sees."""
    probe_start_iteration: int = Field(10, ge=0)
    probe_modes: int = Field(1, ge=1, le=16)
    """Incoherent probe modes (mixed-state probe, for partial spatial coherence): the model
    intensity is Σ_m |F[ψ_m(r − r_k)·T(r)]|². 1 is the coherent probe. Extra modes start from
    the probe's derivatives with 20 % of its power together (gpu/probes.py, ``initial_modes``)
    and are kept orthogonal, ordered by power; a dataset probe of shape (modes, M, M) keeps
    all its modes (more are added up to ``probe_modes``). Extra modes that start from the
    derivatives are only meaningful refined (``refine_probe`` true); with a fixed probe give
    their source instead (``source_size_m``)."""
    source_size_m: float | Literal["auto"] = "auto"
    """Partial coherence: the (M, M) probe's modes are made from it seen through a Gaussian
    source of this rms size at the sample, metres (gpu/probes.py, ``source_modes``;
    ``probe_modes`` of them, 3 when ``probe_modes`` is 1); 0: no source blur. "auto" (the
    default): the size the scan states — the dataset's ``/probe_model`` ``source_size_m`` or the
    wire's ``probe_model.source_size_m`` (an instrument's stated value) — and, when it states
    none, 0 unless ``source_estimate`` is on. Decided when the engine starts and saved as the
    number used. A probe given as modes (P, M, M) keeps them (the stated size is not applied).
    Why on when stated: with the source size known the fixed probe's modes recover what partial
    coherence costs (hemoglobin, 1 Å source: phase correlation 0.418 → 0.533 at 100 e⁻/Å²,
    0.304 → 0.327 at 20), and a stated 0 is the coherent probe (MEASUREMENTS.md, "The source
    size: stated or estimated")."""
    source_estimate: bool = False
    """With ``source_size_m`` "auto" and a scan that states no source size, estimate it from
    the frames before the reconstruction (offline only; gpu/coherence.py,
    ``estimate_source_size``: short reconstructions on one binomial half at the trial sizes
    0, 0.5, 1 and 1.5 Å, scored by the other half's data term, both ways round, the parabola
    through the best) and use it only when both halves put a size > 0 below a point source.
    On realistic hemoglobin (seeds 0, 1) it found a 1 Å source as 1.10–1.11 Å at 20 and
    100 e⁻/Å² (phase correlation within 0.005 of the stated size's) and a point source as 0
    (MEASUREMENTS.md, "The source size: stated or estimated"). Off by default for
    its cost: 8 short reconstructions, 3–10× the wall time of the reconstruction itself, on
    every scan that states no size; the live engine does not run it."""
    source_estimate_iterations: int = Field(10, ge=1)
    """CG iterations of each short reconstruction of the source size estimate."""

    @field_validator("source_size_m")
    @classmethod
    def _source_size_not_negative(cls, value: float | str) -> float | str:
        if value != "auto" and not (value >= 0 and math.isfinite(value)):  # also rejects NaN
            raise ValueError(f"source_size_m must be a length ≥ 0 in metres or 'auto', got {value!r}")
        return value

    refine_positions: bool = False
    """Refine the probe positions from the data (gpu/positions.py): Gauss–Newton updates of a
    scan model — an affine map of the nominal positions plus small per-position residuals —
    alternating with the object CG (live: after scan end, and with ``stream.refine_positions``
    also in the mini-batch steps while frames arrive). For scans whose positions are nominal (scan-coil
    distortion, jitter, drift). Off by default: on top of the defaults' parallax fit (with
    ``position_residual_auto``) it ties with the defaults on hemoglobin (2 seeds, 20 and
    100 e⁻/Å²), loses on the proteasome (2 seeds, both doses: phase correlation
    −0.001…−0.004, NRMSE +0.009…+0.030) and the ribosome at 20 e⁻/Å² (−0.010 / +0.019), and
    gains a little on the ribosome at 100 (+0.003 / −0.005); the 0.3 Å jitter of the realistic
    preset is below a single position's Cramér–Rao bound of 0.8 Å at 20 e⁻/Å² (MEASUREMENTS.md,
    "Realistic scans: the gap, one error at a time")."""
    position_model: Literal["affine", "free"] = "affine"
    """"affine": the positions follow an affine map of the nominal scan plus residuals with a
    Gaussian prior (its rms estimated, ``position_residual_auto``, at most
    ``position_residual_px``); "free": every position on its own."""
    position_residual_px: float = Field(0.5, ge=0)
    """Prior rms (object pixels) of each position's residual from the affine scan model: the
    cap of the estimate (``position_residual_auto``, the default), the fixed rms without it and
    in the live mini-batch model (unless ``stream.position_residual_auto``);
    0 = a purely affine scan."""
    position_residual_auto: bool = True
    """Estimate the residuals' prior rms at each update from the data (gpu/positions.py,
    ``residual_rms_from_scatter``: the scatter of the per-position Gauss–Newton points about
    the affine fit beyond their counting noise), at most ``position_residual_px``; when the
    scatter is all noise the positions stay affine. On by default (it acts only with
    ``refine_positions``): the fixed ``position_residual_px`` prior fits the counting noise —
    on realistic hemoglobin (2 seeds, 20, 100 and 200 e⁻/Å², the preset and its scan errors
    alone) and the proteasome it was worse than the estimate in NRMSE in every case (by
    0.003–0.062) and in phase correlation in 20 of 23 (by up to 0.028; the other three within
    0.007, with its NRMSE worse), and moved exact positions by 0.27 Å (MEASUREMENTS.md, "The
    residual prior when positions are refined"). ``false``: the fixed prior of rms
    ``position_residual_px``. Offline and at the live scan end (``refine``); the live
    mini-batch model keeps the fixed prior unless ``stream.position_residual_auto``."""
    position_start_iteration: int = Field(10, ge=0)
    """CG iterations before the first position update (the object must show some structure)."""
    position_every: int = Field(5, ge=1)
    """CG iterations between position updates (none in the last ``position_every``)."""
    position_max_step_px: float = Field(1.0, gt=0)
    """Largest move of any position in one update, object pixels (a trust region)."""
    scan_search: bool = False
    """Before the reconstruction, search the scan's global 2×2 matrix (the affine scan error,
    with the linear part of a raster's drift) on the reduced objective: the data term after
    ``scan_search_iterations`` CG iterations of the object from the common start, at the
    positions c + A (u − c) (gpu/positions.py, ``search_scan_matrix``); the reconstruction
    then starts at the positions the best A gives (and ``refine_positions`` refines on from
    there when set). The result keeps the nominal positions beside them. Offline only: the live
    engine logs a warning naming it and skips it. The
    reduced objective is scored on held-out counts (binomial halves). Off by default: on the
    realistic preset it gains at 100 e⁻/Å² (proteasome 0.459 → 0.514 phase correlation) and
    loses at 20 e⁻/Å² (0.337 → 0.316), at 6–12× the time (MEASUREMENTS.md, "The scan's affine
    error")."""
    scan_search_iterations: int = Field(20, ge=1)
    """CG iterations of each short reconstruction of the scan search."""
    scan_search_step: float = Field(0.02, gt=0, le=0.2)
    """First trial offset of each matrix entry (relative: 0.02 = 2 % scale or shear)."""
    scan_search_rounds: int = Field(1, ge=1)
    """Rounds of the scan search (10 short reconstructions each; the step halves)."""


    refine_aberrations: bool = False
    """Refine the probe as the nominal probe plus the aberration coefficients ``aberrations``
    (gpu/aberrations.py: a few parameters instead of M×M free pixels), alternating with the
    object CG. Exclusive with ``refine_probe`` (which must then be false, or "auto" deciding
    false)."""
    aberrations: AberrationNames = Field(
        default_factory=lambda: ["C10", "C12a", "C12b", "C21a", "C21b", "C30"], min_length=1)
    """Coefficients refined by ``refine_aberrations``: defocus, two-fold astigmatism (two
    components), coma (two), spherical aberration."""
    aberration_start_iteration: int = Field(5, ge=0)
    """CG iterations before the first aberration fit."""
    aberration_every: int = Field(5, ge=1)
    """CG iterations between aberration fits (none in the last ``aberration_every``)."""
    aberration_fit_iterations: int = Field(10, ge=1)
    """L-BFGS iterations of one aberration fit (object held)."""

    aberration_search: bool = False
    """Before the reconstruction, search the aberrations ``aberrations`` of the nominal probe on
    the reduced objective (the objective after ``aberration_search_iterations`` CG iterations
    of the object with each trial probe; gpu/aberrations.py, ``search_aberrations``), then
    reconstruct with the probe found. Costs about 3 × (number of coefficients) × rounds short
    reconstructions. Off by default: with the realistic preset it recovers part of the probe
    error at 100 e⁻/Å² and none at 20 e⁻/Å², where the reduced objective is flat in the defocus
    (MEASUREMENTS.md, "Realistic scans"). Offline only: the live engine logs a warning naming
    it and skips it."""
    aberration_search_iterations: int = Field(15, ge=1)
    aberration_search_step_rad: float = Field(2.0, gt=0)
    """First step of the search, radians of aberration phase at the edge of the probe's
    spectral support (20 nm of defocus at 9.2 mrad and 300 keV: 2.7 rad)."""
    aberration_search_rounds: int = Field(1, ge=1)
    aberration_search_halves: bool = False
    """Score the search's trial probes on two binomial halves of the counts (the object fitted
    to one, the mean of both halves' data terms: the noise-fitting bias of the default score,
    which moved exact probes by ±20 nm at low dose, cancels to first order), a coefficient moving
    only past ``aberration_search_significance``. Opt-in: on the realistic preset it keeps the
    nominal defocus where the default search's moves gained (MEASUREMENTS.md, "Realistic scans:
    one error at a time, and the search's bias")."""
    aberration_search_significance: float = Field(2.0, ge=0)
    """With ``aberration_search_halves``: a coefficient moves only when the gain is larger than
    this many standard errors of the per-position differences; 0 takes any lower value."""

    parallax: bool | Literal["auto"] = "auto"
    """Before the reconstruction, correct the nominal probe by the aberrations
    ``parallax_aberrations`` fitted to the bright-field disc of every pattern (gpu/parallax.py:
    the object is eliminated per spatial frequency, so the fit pools all counts and does not
    iterate). "auto": when the dataset's probe comes from its probe model (nominal lens
    settings) rather than a measured ``/probe``, and the probe is one coherent mode. A Gaussian
    prior (20 nm rms per coefficient) keeps the probe near the nominal one when the data cannot
    tell. On the realistic preset it gains +0.055 / +0.093 phase correlation on the proteasome
    at 20 / 100 e⁻/Å² and +0.013 / +0.051 on hemoglobin, whose data at 5–20 e⁻/Å² hardly pin
    the probe (MEASUREMENTS.md, "Parallax estimate of the probe aberrations")."""
    parallax_aberrations: AberrationNames = Field(
        default_factory=lambda: ["C10", "C12a", "C12b"], min_length=1)
    """Coefficients the parallax fit estimates (defocus first, then the others)."""
    parallax_range_m: float = Field(60e-9, gt=0)
    """Half-width of the parallax fit's search, metres of aberration coefficient."""
    parallax_confidence: float = Field(0.95, ge=0, lt=1)
    """Under ``parallax`` "auto" the fitted correction is applied only when the data reject the
    nominal probe at this confidence: the fit's ``significance`` (ĉᵀΣ⁻¹ĉ with the sandwich
    covariance Σ = H⁻¹JH⁻¹, J the score's scatter measured on surrogates of the data —
    gpu/parallax.py, "The gate"; ≈ χ² with one degree of freedom per coefficient when the
    nominal probe is right) above the χ² quantile. On an
    exact nominal probe (the demo's hemoglobin at 20 e⁻/Å²) the fit moved it by 6–10 nm of pure
    noise (significance 1.3) and cost 0.06 phase correlation; 0 applies every fit."""

    parallax_scan: bool = False
    """With the parallax fit, also fit the scan's affine error (the 2×2 matrix A − I on the
    nominal offsets from the scan centre, jointly with the aberrations; gpu/parallax.py) and,
    when the data reject the nominal scan at ``parallax_confidence`` (χ², 4 degrees of
    freedom; 0: always), reconstruct at the nominal positions through the fitted matrix. Off
    by default: the fit is unbiased on noiseless data but its statistical error is about the
    size of a real scan's error at 100 e⁻/Å² and larger at cryo doses (MEASUREMENTS.md, "The
    scan matrix from the parallax fit"); on a spiral scan with ``parallax_reach`` 1.8 it is
    found at 100 e⁻/Å². Offline only."""
    parallax_scan_prior: float = Field(0.03, gt=0, le=0.5)
    """Rms of the Gaussian prior on each entry of A − I (a fraction: 0.03 is 3 %)."""
    parallax_reach: float = Field(0.9, gt=0, le=4.0)
    """Highest object frequency the parallax fit uses, as a multiple of the scan step's Nyquist
    frequency. On a raster the Fourier sum over positions aliases past 1; a spiral or random
    scan has no lattice, and there 1.8 divides the scan matrix's standard error by 2.4 (on the
    realistic proteasome at 100 e⁻/Å², spiral: applied, phase correlation 0.472 → 0.610 against
    an oracle 0.709; MEASUREMENTS.md, "The scan matrix from the parallax fit"), at 4–7× the
    fit's time (4× the frequencies)."""
    parallax_wide_reach: float | None = Field(1.8, gt=0, le=4.0)
    """Under ``parallax`` "auto", offline: when the fit at ``parallax_reach`` does not reject the
    nominal probe decisively (at 1 − α/50 of ``parallax_confidence``'s 1 − α: χ² 16.3 at 0.95),
    fit again at this reach, and let that fit's test at ``parallax_confidence`` decide: where
    it rejects, the first fit's estimate applies if the first was significant at
    ``parallax_confidence``, else the wide fit's; where it does not, the nominal probe is kept
    (one test decides, so that the two fits open at most α (1 + 1/50) of the time when the
    probe is right, where two gates in a row opened 17 of 82 times on synthetic scans; the
    result records the reach used as ``parallax_reach``); None: one fit. Not made on a scan less
    than 1.8× as wide as the probe (``parallax.MAX_PROBE_TO_SCAN``: there its model is biased,
    47–48 nm of defocus found for 20 on 8×8 frames of a 15 Å raster). Costs a second fit
    only where the first was not decisive (hemoglobin +4–6 s, proteasome at 20 e⁻/Å² +25–35 s,
    a 3,472-pattern ribosome +168 s CPU and +1.1 GB on the loaded 2-core box). On the
    realistic preset it finds hemoglobin's probe error at 100 e⁻/Å² (phase correlation 0.312 →
    0.480, NRMSE 0.832 → 0.750; the true probe 0.479 / 0.751) and the proteasome's at 20 where the first fit is not significant, keeps the
    defaults where it is (proteasome at 100, ribosome), and stayed shut on every scan whose
    nominal probe was right; ``parallax_reach`` 1.8 alone loses on the proteasome at 100 and
    the ribosome (MEASUREMENTS.md, "The parallax gate's noise"). Not live: the streaming
    engine fits once, at ``parallax_reach``; nor with ``parallax_scan`` (the joint fit is made
    once); nor under ``time_budget_s``, whose count starts after the fits (the budget is CG's):
    the wide fit's minutes on a large scan would come on top of it. A value at or below
    ``parallax_reach`` makes one fit, as None does."""

    parallax_null_draws: int = Field(0, ge=0, le=999)
    """Under ``parallax`` "auto", offline and without ``time_budget_s``: where a parallax fit's
    χ² rejects the nominal probe, refit up to this many null surrogates of the data (the
    nominal probe's fitted signal plus sign-flipped pattern deviations) with the whole search,
    and apply the fit only where at most (B + 1)(1 − ``parallax_confidence``) − 1 of them are
    as significant (p = (k + 1)/(B + 1); 19 at 0.95: none may be). The χ² gate's sandwich is
    measured at the estimate, where a noise peak is more sharply curved than the truth: with
    the probe right it opened on 10 of 47 synthetic scans at ~1 count a bright-field pixel
    (MEASUREMENTS.md, "The two parallax gates' family-wise rate"); with 19 it opened on 0 of
    20 fresh ones (6 without), kept hemoglobin s0 and the proteasome at 100 e⁻/Å² but lost
    hemoglobin s1 at 100 (χ² 7.86, p 0.15), hence opt-in. Costs a fit per surrogate where the
    χ² opens (hemoglobin, proteasome: 82–86 s CPU against 4–7 s), stopping at the first
    surrogate as significant as the data; 0: the χ² gate alone."""

    parallax_aliases: bool = False
    """On a raster scan, the parallax fit models each object frequency of one reciprocal cell of
    the scan lattice together with all its aliases up to ``parallax_reach`` in one least
    squares (gpu/parallax.py, ``aliases``), so that past the step's Nyquist frequency every
    count combination is used once. Opt-in: with the nominal probe right it applied a wrong
    8 nm correction at ``parallax_reach`` 1.8 on the realistic hemoglobin at 100 e⁻/Å² under
    the curvature-only gate, as the plain fit did (MEASUREMENTS.md, "The alias-aware parallax
    fit"; the cause was the gate's noise model, "The parallax gate's noise"). A scan that is no lattice is
    refused ("auto": the fit is skipped, with a warning). Offline only."""

    chunk_size: int = Field(256, ge=1)
    """Positions per chunk of a full-batch evaluation (bounds device memory; same result)."""

    init: Literal["random", "spectral", "ones"] = "random"
    spectral_iterations: int = Field(60, ge=1)
    """Power iterations of the spectral initialisation (paper: 50–70)."""
    init_phase_mean: float = 0.1
    init_phase_std: float = Field(0.1, ge=0)

    stream: StreamOptions = Field(default_factory=StreamOptions)

    def refines_probe(self, mean_counts: float, has_probe: bool = True) -> bool:
        """Whether the probe is refined on data of ``mean_counts`` mean counts per pattern
        (valid pixels): ``refine_probe`` when it is a bool; for "auto", whether the counts
        reach ``probe_refine_min_counts`` (always, when ``has_probe`` is false: there is no
        known probe to keep)."""
        if self.refine_probe != "auto":
            return bool(self.refine_probe)
        if not math.isfinite(mean_counts) or mean_counts < 0:
            raise ValueError(f"mean counts per pattern must be a finite number ≥ 0, got {mean_counts!r}")
        refine = not has_probe or mean_counts >= self.probe_refine_min_counts
        reason = ("no probe given" if not has_probe else
                  f"{mean_counts:.4g} mean counts per pattern "
                  f"{'≥' if refine else '<'} probe_refine_min_counts {self.probe_refine_min_counts:.4g}")
        log.info("refine_probe auto: %s → probe %s", reason, "refined" if refine else "fixed")
        return refine

    def with_probe_decision(self, mean_counts: float, has_probe: bool = True) -> ReconOptions:
        """A copy whose ``refine_probe`` is the decision of :meth:`refines_probe` (true/false):
        what the engines run with and save with their results."""
        return self.model_copy(update={"refine_probe": self.refines_probe(mean_counts, has_probe)})

    @field_validator("mu0")
    @classmethod
    def _mu0_not_negative(cls, value: float | str) -> float | str:
        if value != "auto" and not value >= 0:  # also rejects NaN
            raise ValueError(f"mu0 must be ≥ 0 or 'auto', got {value!r}")
        return value

    def with_mu0_decision(self, counts_per_pixel: float) -> ReconOptions:
        """A copy whose ``mu0`` is a number: for "auto", the law of ``priors.auto_mu0`` at
        ``counts_per_pixel`` detected electrons per illuminated object pixel."""
        if self.mu0 != "auto":
            return self
        from .priors import auto_mu0

        mu0 = auto_mu0(counts_per_pixel)
        log.info("mu0 auto: %.4g counts per object pixel → μ₀ = %.4g", counts_per_pixel, mu0)
        return self.model_copy(update={"mu0": mu0})

    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict (for result files and the wire)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ReconOptions:
        return cls.model_validate(data or {})

    def merged(self, overrides: dict[str, Any] | None) -> ReconOptions:
        """A copy with ``overrides`` applied (nested for ``stream``), validated."""
        return ReconOptions.model_validate(merge_overrides(self.to_dict(), overrides))


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``base`` (options as a dict) with ``overrides`` applied, ``stream``'s keys one by one:
    not validated."""
    out = dict(base)
    for key, value in (overrides or {}).items():
        below = out.get(key)
        out[key] = {**below, **value} if key == "stream" and isinstance(below, dict) and isinstance(
            value, dict) else value
    return out


#: incoherent modes a finite source is represented by when ``probe_modes`` asks for one mode
SOURCE_MODES = 3


def source_modes_in_force(opts: ReconOptions) -> int:
    """Probe modes of a reconstruction whose source is finite: ``opts.probe_modes``, or
    :data:`SOURCE_MODES` when that asks for one (a single mode cannot hold a source)."""
    return opts.probe_modes if opts.probe_modes > 1 else SOURCE_MODES


def source_size_in_force(opts: ReconOptions, stated: float | None) -> float:
    """The source size (m) a reconstruction uses: ``opts.source_size_m`` when it is a number;
    for "auto", the size the scan states (``stated``; 0 when it states none)."""
    if opts.source_size_m == "auto":
        return 0.0 if stated is None else float(stated)
    return float(opts.source_size_m)
