"""The live engine: mini-batch Poisson MAP updates while frames are still arriving.

Each :meth:`StreamingReconstructor.step` draws a batch that mixes frames never visited before
(oldest first, so none waits long) with frames drawn uniformly from those already visited, and
takes one illumination-normalised gradient step on the object (and, after a warm-up, on the
probe). There is no iteration count: the daemon calls ``step`` for as long as it likes, and
``refine`` runs full-batch CG (:func:`cryoptycho.gpu.reconstruct.refine_full_batch`) after the
scan has ended. See ``STREAMING.md`` for the update rule and why it is scaled the way it is.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import (
    array_module,
    asarray,
    complex_dtype,
    dev_float,
    fft2,
    get_xp,
    host_floats,
    on_device,
    real_dtype,
    scalar_as,
    to_numpy,
)
from .cg import LowFrequencyPreconditioner, probe_cutoff
from .framestore import FrameStore
from .geometry import ScanGeometry, fit_geometry
from .objective import data_term
from .operators import SUBPIXEL_QUANTUM, Batch, extract, make_batch, place_kernel, to_fft_order
from .options import ReconOptions
from .parallax import FitCancelled, ParallaxFit, estimate_aberrations
from .positions import LiveScanModel, position_terms_device
from .positions import margin_px as position_margin_px
from .priors import SparsePrior, auto_mu0, prior_term
from .priors import kappa as kappa_of
from .probes import aberrate, initial_modes, orthogonalize_modes
from .reconstruct import (
    AMPLITUDE_NLL_SCALE,
    Problem,
    refine_alternating,
    refine_full_batch,
    source_size_in_force,
    with_source,
)
from .state import ReconState

#: Spare object pixels kept around every probe window (sub-pixel shifts need one).
CANVAS_MARGIN_PX = 2
#: Frames per chunk when the whole store is swept (illumination refresh): bounds work memory.
SWEEP_CHUNK = 512
#: Step losses kept on the device before they are read back even if nobody asked (an engine
#: whose losses are never read — the half-set estimator's — must not grow without bound).
MAX_PENDING_LOSSES = 1024
#: A refinement's set-up and first full evaluation cost about this many sweeps of mini-batch
#: steps over all frames (measured ≈ 1.4 on a CPU); ``refine`` does not start when they do not fit.
FIRST_EVALUATION_SWEEPS = 2.0
#: A refit warm-started from the early parallax fit takes about this share of the early fit's
#: time per frame (237 of 447 trial probes measured, plus the Fourier sums of the frames).
REFIT_SHARE = 0.6
#: Trial probes of a parallax fit of the default three coefficients: with the trials a running
#: fit has done and its pace, ``refine`` predicts what is left of it, until a fit of the same kind
#: has landed and given its own count. Measured: a cold fit 447 and a warm-started one 237 on the
#: realistic proteasome, 204–205 and 83–84 on the small scans of tests/test_stream_parallax.py
#: (the grids alone are 106); the fewest are taken, so that a prediction errs towards waiting
#: (the half budget still caps the wait).
FIT_TRIALS_COLD = 200
FIT_TRIALS_WARM = 80
#: Trials a fit must have done before its pace is trusted (before them it builds its model).
FIT_PACE_TRIALS = 3
#: Seconds between the checks of a running fit while ``refine`` waits for it at scan end.
PARALLAX_CHECK_S = 0.25

Extent = tuple[tuple[float, float], tuple[float, float]]

log = logging.getLogger("cryoptycho.stream")


def _log_failed_late_fit(job: Future[ParallaxFit]) -> None:
    """A parallax fit dropped for the budget still surfaces its failure (in its own thread)."""
    exc = job.exception()
    if exc is not None and not isinstance(exc, FitCancelled):
        log.error("a parallax fit dropped at scan end failed: %s", exc, exc_info=exc)


class FitProgress(threading.Event):
    """The parallax fit's cancel flag, which also counts the fit's trial probes: the fit reads
    it once per trial (``estimate_aberrations(cancel=…)``), so ``trials`` is the work it did so
    far, from which ``refine`` predicts whether it can finish in the budget left."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self._clock = clock
        self.trials = 0  #: written by the fit's thread only
        #: when the first trial began: the fit's pace counts from there, not from its set-up
        #: (the Fourier sums of its frames, which no trial count measures)
        self.first_trial_at: float | None = None

    def is_set(self) -> bool:
        if self.trials == 0:
            self.first_trial_at = self._clock()
        self.trials += 1
        return super().is_set()


@dataclass(frozen=True)
class StepResult:
    """Outcome of one mini-batch step. ``loss`` and ``kept_fraction`` stay where they were
    computed — a 0-d device array on a device backend, a float on NumPy — so that a step does
    not wait for the device; :meth:`StreamingReconstructor.flush_losses` reads the losses of
    many steps in one transfer when a metric is due."""

    loss: Any  #: data-term loss per position of the batch (before the update)
    batch_size: int  #: positions in the batch
    iteration: int  #: steps taken so far, this one included
    n_frames: int  #: frames in the store when the step ran
    fresh: int  #: positions of the batch that were visited for the first time
    probe_updated: bool
    kept_fraction: Any  #: share of valid measurements kept by the truncation rule



def _lanes_hold(flat: np.ndarray, top: int) -> bool:
    """Whether :func:`_lane_sum` is exact for these native uint16 frames (n, pixels) whose
    largest count is ``top``: each 16-bit lane of a 64-bit word adds up pixels / 4 counts."""
    return (flat.shape[1] % 4 == 0 and flat.flags.c_contiguous
            and top * (flat.shape[1] // 4) <= 0xFFFF)


def _lane_sum(flat: np.ndarray) -> int:
    """Σ of native uint16 frames (n, pixels) read as four counts to a 64-bit word, where
    :func:`_lanes_hold`: the words add up natively with no carry between the lanes, one pass
    instead of NumPy's buffered uint16 → uint32 cast and add (96×96 frames from memory: max +
    sum ≈ 2.6 → 1.3 µs each). Low-dose frames qualify: counts ≤ 28 for 96×96."""
    words = flat.view(np.uint64).sum(axis=1)
    lanes = (words & 0xFFFF) + ((words >> 16) & 0xFFFF) + ((words >> 32) & 0xFFFF) + (words >> 48)
    return int(lanes.sum(dtype=np.uint64))


class StreamingReconstructor:
    """Object (and probe) reconstruction that grows with the scan. Driven from ONE thread."""

    def __init__(
        self,
        *,
        frame_shape: tuple[int, int],
        frame_dtype: Any,
        pixel_size: float,
        probe: Any,
        options: ReconOptions,
        mask: Any | None = None,
        extent_m: Extent | None = None,
        expected_frames: int | None = None,
        energy_eV: float | None = None,
        probe_from_model: bool = False,
        source_size_m: float | None = None,
    ) -> None:
        """``probe_from_model``: the probe was built from nominal lens settings (a probe
        model), not measured, so ``options.parallax`` "auto" corrects it from the data.
        ``source_size_m``: the source size the scan states (rms at the sample, m; None: none),
        which ``options.source_size_m`` "auto" uses (the live engine does not estimate one)."""
        shape = tuple(int(s) for s in frame_shape)
        if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 2:
            raise ValueError(f"frame_shape must be square (M, M) with M ≥ 2, got {frame_shape!r}")
        if not np.isfinite(pixel_size) or pixel_size <= 0:
            raise ValueError(f"pixel_size must be a positive number of metres, got {pixel_size!r}")
        pshape = tuple(np.shape(probe))
        if pshape[-2:] != shape or len(pshape) not in (2, 3) or 0 in pshape:
            raise ValueError(f"probe shape {pshape} does not match frame shape {shape} "
                             "(give (M, M), or (modes, M, M) for a mixed-state probe)")
        if expected_frames is not None and expected_frames < 1:
            raise ValueError(f"expected_frames must be ≥ 1 when given, got {expected_frames}")
        if extent_m is not None:
            ext = np.asarray(extent_m, dtype=np.float64)
            if ext.shape != (2, 2) or not np.all(np.isfinite(ext)) or np.any(ext[:, 1] < ext[:, 0]):
                raise ValueError(
                    f"extent_m must be ((ymin, ymax), (xmin, xmax)) in metres, got {extent_m!r}"
                )
        if source_size_m is not None and not (np.isfinite(source_size_m) and source_size_m >= 0):
            raise ValueError(f"source_size_m must be a length ≥ 0 in metres, got {source_size_m!r}")
        self._stated_source = source_size_m
        if options.source_size_m == "auto":  # decided once, saved as the number used
            coherent = len(tuple(np.shape(probe))) == 2
            options = options.model_copy(update={
                "source_size_m": source_size_in_force(options, source_size_m) if coherent else 0.0})
            if options.source_estimate and source_size_m is None:
                log.warning("source_estimate: offline only, not run by the live engine (the scan "
                            "states no source size: a coherent probe)")
        self.options = options
        # the scan-wide searches run on every frame before an offline reconstruction; the live
        # engine has no such point, so a scan that asks for them is told they are skipped
        offline_only = [name for name in ("aberration_search", "scan_search", "parallax_scan")
                        if getattr(options, name)]
        if offline_only:
            log.warning("%s: offline only, not run by the live engine (reconstruct the saved scan "
                        "with `cryoptycho reconstruct` for it)", ", ".join(offline_only))
        self.xp = get_xp(options.backend)
        self._rdtype = real_dtype(options.precision)
        self._cdtype = complex_dtype(options.precision)
        self._pixel_size = float(pixel_size)
        self._extent = extent_m
        self._rng = np.random.default_rng(options.seed)
        xp = self.xp
        # Inputs are checked on the host (where they usually come from) before they move.
        probe_host = to_numpy(probe)
        if not np.all(np.isfinite(probe_host)) or np.abs(probe_host).max() == 0:
            raise ValueError("probe must be finite and not all zero")
        given = asarray(probe_host, xp, self._cdtype).copy()
        #: the live phase boost's cut-off and its filter (``stream.lowfreq_boost``)
        self._lowfreq_qc = probe_cutoff(probe_host)
        self._lowfreq: LowFrequencyPreconditioner | None = None
        #: the given probe when it is one coherent probe: what the parallax fit corrects (its
        #: modes, if any, are made again from the corrected probe)
        self._coherent: Any = given if given.ndim == 2 else None
        self.probe = self._mixed(given)
        self.mask = None
        #: valid pixels, detector order, on the host: frames arriving from the host are
        #: counted there, before they are stored (no device reduction read back per batch)
        self._mask_host: np.ndarray | None = None
        self._mask_off: np.ndarray | None = None  #: flat indices of the masked-off pixels
        if mask is not None:
            if tuple(np.shape(mask)) != shape:
                raise ValueError(f"mask shape {np.shape(mask)} does not match frame shape {shape}")
            self._mask_host = np.asarray(to_numpy(mask)).astype(bool)
            if not self._mask_host.any():
                raise ValueError("mask marks no detector pixel as valid")
            self._mask_off = np.flatnonzero(~self._mask_host)
            self.mask = to_fft_order(asarray(self._mask_host, xp)).astype(self._rdtype)
        stream = options.stream
        capacity = expected_frames if expected_frames is not None else stream.initial_capacity
        # host frames of counts ≤ 255 are stored as uint8 until one is not (low-dose frames:
        # half the fresh pages a first scan faults in, half the store; FrameStore narrow)
        self.frame_store = FrameStore(shape, frame_dtype, capacity, xp, stream.growth, narrow=True)
        self.geometry: ScanGeometry | None = None
        self.obj: Any = None
        self._illum: Any = None  # Σ over received frames of |S_δ ψ|², canvas-shaped
        self._illum_stale = False
        self._steps_since_refresh = 0
        self._next_fresh = 0  # frames [0, _next_fresh) have been drawn at least once
        self._valid_counts = 0.0  # Σ counts over valid pixels of all frames received
        #: the largest count of the frames received, where every frame's was measured (host
        #: uint32 frames: _host_counts' pass for its 32-bit sums), else None (peak_count)
        self._peak: int | None = 0
        #: the largest count of the frames _host_counts measured last, else None (FrameStore.append)
        self._batch_top: int | None = None
        self._unit_mu0: ReconOptions | None = None  # the options with μ₀ = 1 (mu0 "auto")
        self._iteration = 0
        self._visits = 0  # frame visits by mini-batch steps, all frames together
        self._loss_history: list[float] = []
        self._losses_reported = 0  #: entries of the history flush_losses has returned
        self._pending_losses: list[Any] = []  # device losses of steps not read back yet
        #: wall seconds per frame visited by the steps (smoothed; on a device the host runs at
        #: most a launch queue ahead, so on average this is the device's pace): what a
        #: full-batch evaluation will cost, for keeping ``refine``'s time budget
        self.step_seconds_per_frame: float | None = None
        self._sparse: SparsePrior | None = None
        self._refined = 0  # full-batch CG iterations run by refine()
        self._probe_decision: bool | None = None  # refine_probe "auto", once decided
        self._energy = energy_eV
        #: the positions as received (metres, arrival order); the snapshot gives them as the
        #: nominal ones once positions were refined (refine_positions)
        self._received = np.zeros((0, 2))
        self._positions_moved = False
        #: a full-batch refinement set the positions: the next one starts from them
        self._batch_refined_positions = False
        #: the scan model of the live position refinement, made at its first measurement
        self._live_positions: LiveScanModel | None = None
        #: position measurements not read back yet: (frames, positions px, gradient, Fisher)
        self._pending_positions: list[tuple[np.ndarray, np.ndarray, Any, Any]] = []
        self._expected = expected_frames
        #: the bright-field fit of the probe's aberrations (gpu/parallax.py) once it has run
        self.parallax_fit: ParallaxFit | None = None
        #: the probe the fit corrects, kept while the fit is still to come (None: no fit)
        self._parallax_probe: Any = None
        self._parallax_job: Future[ParallaxFit] | None = None
        self._parallax_frames = 0  #: frames the fit was given
        self._parallax_applied = False  #: its correction is in the probe (significant, see options)
        self._parallax_job_final = False  #: the running fit is the scan-end one
        self._parallax_seen = 0  #: frames received when the last fit started
        self._parallax_started = 0.0  #: when it started (``clock``)
        self._parallax_seconds: float | None = None  #: how long the last fit that landed took
        self._parallax_cancel = FitProgress()  #: set: the running fit stops (dropped); counts its trials
        self._parallax_warm = False  #: the running fit starts from an earlier estimate
        #: trial probes of the last fit that landed, by warm start (False: cold, True: warm)
        self._parallax_trials: dict[bool, int] = {}
        #: the engine's clock for its own timings (the parallax fit's pace; injectable for tests)
        self.clock: Callable[[], float] = time.perf_counter
        self._parallax_early = False  #: a fit before scan end has landed (``stream.parallax_refit``)
        #: the probe the fit corrected (the snapshot saves it beside the used one) and the fit's
        #: record (``ParallaxFit.record``: coefficients, significance, applied)
        self._nominal_probe: Any = None
        self._probe_estimate: dict[str, float] = {}
        if self._parallax_wanted(probe_from_model):
            self._parallax_probe = self._coherent.copy()
        if extent_m is not None:
            self._new_canvas(np.zeros((0, 2)))

    # --- public state -----------------------------------------------------------------------

    @property
    def n_frames(self) -> int:
        return self.frame_store.n

    @property
    def iteration(self) -> int:
        return self._iteration

    @property
    def loss_history(self) -> list[float]:
        """Per-position loss of every step (mini-batch) and refinement iteration."""
        self._read_pending()
        return list(self._loss_history)

    def flush_losses(self) -> list[float]:
        """The losses of the steps and iterations since the last call, on every backend (the
        engine boundary's contract): device losses come back in one transfer for all of them.
        Raises FloatingPointError when one is not finite (the step did not raise: checking
        would have made every step wait for the device)."""
        self._read_pending()
        new = self._loss_history[self._losses_reported:]
        self._losses_reported = len(self._loss_history)
        return new

    def _read_pending(self) -> list[float]:
        """Read back the device losses not yet read, append them to :attr:`loss_history` and
        return them (one transfer; FloatingPointError when one is not finite)."""
        pending, self._pending_losses = self._pending_losses, []
        records, self._pending_positions = self._pending_positions, []
        if not pending and not records:
            return []
        values, arrays = self._read_back(pending, [a for r in records for a in r[2:]])
        if records:
            assert self._live_positions is not None
            for (sel, at, _g, _h), grad, fisher in zip(records, arrays[0::2], arrays[1::2], strict=True):
                self._live_positions.record(sel, at, grad, fisher)
            self._update_positions()
        first = self._iteration - len(pending) + 1
        self._loss_history.extend(values)
        for i, value in enumerate(values):
            if not np.isfinite(value):
                raise FloatingPointError(
                    f"non-finite loss at step {first + i}: lower stream.step_size "
                    f"(now {self.options.stream.step_size})"
                )
        return values

    def _read_back(self, scalars: list[Any], arrays: list[Any]) -> tuple[list[float], list[np.ndarray]]:
        """Device scalars and arrays on the host in ONE transfer (one synchronisation)."""
        if not arrays:
            return list(host_floats(*scalars)), []
        xp = self.xp
        parts = [xp.stack([v.astype(np.float64).reshape(()) for v in scalars])] if scalars else []
        parts += [a.astype(np.float64).reshape(-1) for a in arrays]
        flat = to_numpy(xp.concatenate(parts))
        values = flat[: len(scalars)].tolist()
        out, at = [], len(scalars)
        for a in arrays:
            out.append(flat[at : at + a.size].reshape(a.shape))
            at += a.size
        return values, out

    @property
    def mean_counts(self) -> float:
        """Mean counts per pattern over the valid detector pixels."""
        return self._valid_counts / self.n_frames if self.n_frames else 0.0

    def coverage(self) -> np.ndarray:
        """Host copy of the illumination map Σ_k |S_δ ψ|² over all frames received (canvas
        shaped; zeros before the first frame) — the previews' "where have we been" layer."""
        if self.obj is None:
            return np.zeros((0, 0), dtype=self._rdtype)
        if self._illum_stale:
            self._refresh_illumination()
        return to_numpy(self._illum).copy()

    # --- frames in --------------------------------------------------------------------------

    #: add_frames takes ``peak`` (daemon/worker.py passes a detector reducer's bound)
    takes_peak = True

    def add_frames(self, frames: Any, positions_m: Any, indices: Any | None = None,
                   peak: int | None = None) -> None:
        """Add ``frames`` (n, M, M) counts in detector order at probe positions (n, 2) metres.

        ``indices`` are the frames' scan indices (default: arrival order). Positions outside
        the canvas grow it (new pixels get the initial object value). ``peak``: a bound of the
        frames' largest count, never below it, where the caller measured it (a detector
        reducer, while binning): host unsigned frames then skip the max pass over them. It is
        trusted: a peak below a count would wrap that count in a narrow store's byte rows.
        """
        if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, np.integer)) or peak < 0):
            raise ValueError(f"peak must be a count (an integer ≥ 0) or None, got {peak!r}")
        store = self.frame_store
        frames_mod = array_module(frames)
        if not hasattr(frames, "dtype"):
            frames = np.asarray(frames)
        if frames.ndim != 3 or tuple(frames.shape[1:]) != store.frame_shape:
            raise ValueError(
                f"frames must have shape (n, {store.frame_shape[0]}, {store.frame_shape[1]}), "
                f"got {tuple(frames.shape)}"
            )
        if frames.dtype.kind not in "uif":
            raise ValueError(f"frames must hold counts (integer or float), got dtype {frames.dtype}")
        if not np.can_cast(frames.dtype, store.dtype, casting="safe"):
            raise ValueError(
                f"frames dtype {frames.dtype} does not fit the store's dtype {store.dtype} "
                "(declared frame_dtype) without loss"
            )
        n = int(frames.shape[0])
        pos = np.asarray(to_numpy(positions_m), dtype=np.float64)
        if pos.shape != (n, 2):
            raise ValueError(f"positions_m must have shape ({n}, 2) to match frames, got {pos.shape}")
        if not np.all(np.isfinite(pos)):
            raise ValueError("positions_m contain NaN or infinite values")
        if indices is not None and np.shape(indices) != (n,):
            raise ValueError(f"indices must have shape ({n},), got {np.shape(indices)}")
        if n == 0:
            return
        # On the frames' own backend; device frames are read back once for all checks.
        checks = []
        if frames.dtype.kind == "f":
            checks.append(frames_mod.all(frames_mod.isfinite(frames)))
        if frames.dtype.kind in "if":
            checks.append(~(frames < 0).any())
        self._batch_top = None
        if frames_mod is np:
            counted = self._host_counts(frames, peak)
        else:
            self._peak = None
            valid = frames if self.mask is None else frames * self._mask_host_dev(frames_mod)
            checks.append(valid.sum(dtype=np.float64))
        flags = host_floats(*checks) if frames_mod is not np else [float(c) for c in checks]
        if frames_mod is not np:
            counted = flags[-1]
            flags = flags[:-1]
        if frames.dtype.kind == "f" and not flags[0]:
            raise ValueError("frames contain NaN or infinite counts")
        if frames.dtype.kind in "if" and not flags[-1]:
            raise ValueError("frames contain negative counts")

        # as received, in a buffer grown by doubling (a concatenation per call would copy
        # every position received so far: quadratic in the scan)
        k = self.n_frames
        if k + n > len(self._received):
            grown = np.zeros((max(k + n, 2 * len(self._received)), 2))
            grown[:k] = self._received[:k]
            self._received = grown
        self._received[k : k + n] = pos
        if self._live_positions is not None:
            # frames arriving after the scan model is known start where it puts them
            pos = self._live_positions.add(pos / self._pixel_size) * self._pixel_size
        self._ensure_canvas(pos)
        where = store.append(frames, pos, indices, peak=self._batch_top)
        self._valid_counts += counted
        batch = self._batch(np.arange(where.start, where.stop))
        self._add_illumination(self._illum, batch)

    @property
    def peak_count(self) -> int | None:
        """The largest count of every frame received, where it was measured on the way (host
        unsigned frames of 16 or 32 bits; or a bound of it that add_frames was given, exact
        where over 255, e.g. a DECTRIS reducer's), else None: what the spool's close stores the frames'
        counts in (spool.py HeldPeak)."""
        return self._peak

    def _host_counts(self, frames: np.ndarray, peak: int | None = None) -> float:
        """Σ counts over the valid detector pixels of host ``frames``. Integer counts are
        summed as integers (exact) and the masked-off pixels subtracted (no masked copy of
        the frames); where a frame's sum cannot overflow 32 bits (uint16 up to 256 × 256
        pixels, or frames whose largest count says so: 2×2-binned uint16 frames are uint32),
        per frame in 32 bits: ≈ 3× faster than a float64 or 64-bit sum (96×96 uint32 frames:
        2.8 → 1.3 µs each, the max included); uint16 frames whose largest count allows it, four
        counts to a 64-bit word (:func:`_lane_sum`). ``peak``: the caller's bound of the largest
        count (add_frames), taken instead of the max pass."""
        if frames.dtype.kind in "ui" and frames.dtype.itemsize <= 4:
            flat = frames.reshape(frames.shape[0], -1)
            narrow = flat.shape[1] * np.iinfo(frames.dtype).max < 2**32
            if frames.dtype.kind == "u" and (not narrow or frames.dtype.itemsize > 1):
                # wide frames: rules out a 32-bit overflow of the sums; uint16 frames (binned
                # counts of a detector that declares a saturation value): the spool's close
                # stores them as uint8 where it allows (half the bytes to bitshuffle and compress)
                top = self._batch_top = int(flat.max()) if peak is None else int(peak)
                self._peak = None if self._peak is None else max(self._peak, top)  # (peak_count)
            else:
                self._peak = None  # not measured: nothing narrower to store, no overflow to rule out
            if frames.dtype == np.uint16 and _lanes_hold(flat, top):
                total = _lane_sum(flat)
            elif frames.dtype.kind == "u" and (narrow or flat.shape[1] * top < 2**32):
                total = int(flat.sum(axis=1, dtype=np.uint32).sum(dtype=np.uint64))
            else:
                total = int(flat.sum())
            if self._mask_off is not None:
                total -= int(flat[:, self._mask_off].sum())
            return float(total)
        self._peak = None
        valid = frames if self._mask_host is None else frames * self._mask_host
        return float(valid.sum(dtype=np.float64))

    # --- mini-batch step ------------------------------------------------------------------

    def step(self) -> StepResult:
        """One mini-batch update of the object (and of the probe after the warm-up)."""
        if self.n_frames == 0:
            raise RuntimeError("step() needs frames: call add_frames first")
        t_start = time.perf_counter()
        if self._parallax_probe is not None:
            self._parallax_poll(final=False)
        opts = self.options
        stream = opts.stream
        which, fresh = self._draw_batch()
        batch = self._batch(which)
        want_probe = self._iteration >= stream.probe_warmup_steps and self.refines_probe()
        term = data_term(
            self.obj,
            self.probe,
            self.frame_store.counts(which),
            batch,
            model=opts.noise_model,
            truncation=opts.truncation,
            alpha_h=opts.alpha_h,
            mask=self.mask,
            want_probe=want_probe,
        )
        if not on_device(term.loss) and not np.isfinite(term.loss):
            raise FloatingPointError(
                f"non-finite loss at step {self._iteration}: lower stream.step_size "
                f"(now {stream.step_size})"
            )
        illum = self._illumination(batch)
        self._curv *= self._forget(batch.size)
        self._curv += illum
        floor = stream.illumination_floor * dev_float(self._curv.max())
        grad = term.grad_object
        if opts.prior != "none":
            kappa = self._kappa()
            grad = grad + self._prior_share(illum) * self._prior_grad(kappa)
            floor += stream.memory_sweeps * self._prior_curvature(kappa)
        probe_precond = None
        if want_probe:
            windows = extract(self.obj, batch)
            inten = (windows.real**2 + windows.imag**2).sum(axis=0)
            probe_precond = inten + scalar_as(
                stream.illumination_floor * dev_float(inten.max()), inten.dtype)
        if stream.lowfreq_boost > 1:
            diag = 1.0 / (self._curv + scalar_as(floor, self._rdtype))
            delta = (-stream.step_size * self._lowfreq_filter().rebased(diag, self.obj)(grad)).astype(
                self._cdtype, copy=False)
        else:
            delta = (-stream.step_size * grad / (self._curv + scalar_as(floor, self._rdtype))).astype(
                self._cdtype, copy=False)
        if stream.momentum > 0:
            # Momentum is set per sweep of the data, so its memory (in data) does not depend
            # on the batch size: per step it is momentum ** (B / n). Nesterov's form (step +
            # β·velocity) beat heavy ball at every sweep count measured (STREAMING.md).
            beta = stream.momentum ** (batch.size / self.n_frames)
            self._velocity *= beta
            self._velocity += delta
            delta = delta + beta * self._velocity
        self.obj += delta
        if want_probe:
            self.probe -= (stream.probe_step_size * term.grad_probe / probe_precond).astype(
                self._cdtype, copy=False
            )
            self._constrain_probe_power()
            self._illum_stale = True
        self.frame_store.visits[which] += 1
        self._visits += len(which)
        if self._positions_due():
            self._measure_positions(which)
        self._iteration += 1
        self._steps_since_refresh += 1
        per_frame = (time.perf_counter() - t_start) / batch.size
        old = self.step_seconds_per_frame
        self.step_seconds_per_frame = per_frame if old is None else 0.9 * old + 0.1 * per_frame
        loss = term.loss / batch.size
        if on_device(loss):
            self._pending_losses.append(loss)  # read back when a metric is due
            if len(self._pending_losses) + len(self._pending_positions) >= MAX_PENDING_LOSSES:
                self._read_pending()
        else:
            self._loss_history.append(loss)
        return StepResult(
            loss=loss,
            batch_size=batch.size,
            iteration=self._iteration,
            n_frames=self.n_frames,
            fresh=fresh,
            probe_updated=want_probe,
            kept_fraction=term.kept_fraction,
        )

    # --- the parallax fit while streaming -------------------------------------------------

    def _parallax_wanted(self, probe_from_model: bool) -> bool:
        """Whether this scan's probe gets the parallax fit (``options.parallax``; "auto": a
        single-mode probe built from a probe model, as offline)."""
        want = self.options.parallax
        if want == "auto":
            return probe_from_model and self._coherent is not None and self._energy is not None
        if want and (self._coherent is None or self._energy is None):
            raise ValueError("parallax needs a single coherent probe and the beam energy: "
                             "give an (M, M) probe and energy_eV, or set parallax=false")
        return bool(want)

    def _parallax_due(self) -> bool:
        """``stream.parallax_after`` of the expected frames have arrived (never before scan end
        when the scan declares no frame count, or the share is 1)."""
        after = self.options.stream.parallax_after
        if self._expected is None or after >= 1.0 or self._parallax_early:
            return False
        return self.n_frames >= max(9, math.ceil(after * self._expected))

    def _parallax_poll(self, final: bool, wait_s: float | None = None) -> None:
        """Start the fit when due (in a background thread: it takes seconds to minutes and the
        steps go on meanwhile) and swap its probe in once it is done; ``final`` (scan end):
        start it now if it never started and wait for it (at most ``wait_s``, if given)."""
        if self._parallax_job is None:
            if not (final or self._parallax_due()):
                return
            n = self.n_frames
            if self._parallax_early and n == self._parallax_seen:
                self._parallax_probe = None  # no frame since the early fit: it stands
                return
            if self._parallax_early and wait_s is not None and self._parallax_seconds is not None:
                # the refit must leave the refinement its time: it is skipped when the early
                # fit's pace says it cannot finish in the wait left (a warm start needs about
                # half the trials of a cold fit; the time scales with the frames)
                predicted = REFIT_SHARE * self._parallax_seconds * n / max(self._parallax_seen, 1)
                if predicted > wait_s:
                    log.info("parallax refit on %d frames skipped: about %.0f s needed, %.1f s left of "
                             "the budget; the early fit's estimate stands", n, predicted, wait_s)
                    self._parallax_probe = None
                    return
            opts = self.options
            # every k-th frame: the fit's time grows with its frames, a stride keeps the whole
            # scan area (a prefix of a raster scan would see part of the particle)
            stride = -(-n // opts.stream.parallax_max_frames)
            # a refit starts from the early fit's estimate (no grids: about half the trials)
            start = self.parallax_fit.coefficients if final and self.parallax_fit is not None else None
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parallax")
            self._parallax_cancel = FitProgress(self.clock)
            self._parallax_warm = start is not None
            self._parallax_started = self.clock()
            # rows below n of the store are never written again (a growth copies them into a
            # new array and leaves this one to the view): the thread reads them unlocked
            self._parallax_job = pool.submit(
                estimate_aberrations, self.frame_store.frames[:n:stride],
                self.frame_store.positions[:n:stride].copy(),
                self._parallax_probe, self._pixel_size, float(self._energy or 0.0), mask=self._mask_host,
                names=tuple(opts.parallax_aberrations), search_range_m=opts.parallax_range_m,
                fft_order=True, cancel=self._parallax_cancel, start=start)
            pool.shutdown(wait=False)  # its one thread ends with the job
            self._parallax_frames = len(range(0, n, stride))
            self._parallax_seen = n
            self._parallax_job_final = final
        if not (final or self._parallax_job.done()):
            return
        if final and wait_s is not None and not self._wait_for_fit(wait_s):
            # the refinement budget is a promise to the operator: a fit that would break it is
            # dropped (cancelled; its result is not used)
            self._drop_parallax_job()
            self._parallax_probe = None
            return
        job, self._parallax_job = self._parallax_job, None
        self._parallax_seconds = self.clock() - self._parallax_started
        self._parallax_trials[self._parallax_warm] = self._parallax_cancel.trials
        nominal = self._parallax_probe
        # an early fit keeps the nominal probe for the fit on every frame at scan end
        early = not self._parallax_job_final
        refit = early and self._parallax_early_wanted()
        self._parallax_early = self._parallax_early or early
        self._parallax_probe = nominal if refit else None
        auto = self.options.parallax == "auto"
        try:
            fit = job.result()  # an error of the fit's thread is raised here, in the engine's
        except ValueError as exc:
            if not auto:
                raise ValueError(f"parallax: {exc}") from exc
            log.warning("parallax fit skipped, the %s probe is used: %s",
                        "early fit's" if self._parallax_applied else "nominal", exc)
            return
        self.parallax_fit = fit
        log.info("parallax fit on %d frames: %s nm (log-likelihood gain %.1f, %d frequencies × %d pixels)",
                 self._parallax_frames, {k: round(v * 1e9, 1) for k, v in fit.coefficients.items()},
                 fit.log_likelihood_gain, fit.frequencies, fit.pixels)
        confidence = self.options.parallax_confidence
        apply = any(fit.coefficients.values()) and (not auto or fit.rejects_nominal(confidence))
        self._nominal_probe = nominal
        self._probe_estimate = fit.record(apply, self._parallax_frames, confidence if auto else None)
        if not apply:
            if any(fit.coefficients.values()):
                log.info("parallax fit not significant (χ² %.1f for %d coefficients): the nominal probe "
                         "is kept", fit.significance, len(fit.coefficients))
            if self._parallax_applied:  # an early fit's correction that the whole scan rejects
                self._parallax_applied = False
                self._swap_probe(self._mixed(nominal))
            return
        self._parallax_applied = True
        # the fit corrects the nominal probe: a probe the steps refined meanwhile is replaced
        # (with a finite source or probe_modes, by the modes of the corrected probe)
        self._swap_probe(self._mixed(aberrate(nominal, self._pixel_size, float(self._energy or 0.0),
                                              fit.coefficients)))

    def _wait_for_fit(self, wait_s: float) -> bool:
        """Wait for the running fit at most ``wait_s`` (``clock`` seconds); False — give it up —
        as soon as its pace says it cannot finish in the wait left, so that the refinement gets
        that time instead of a fit whose result would come too late. The pace is the fit's over
        its life since its first trial (slowed by the steps beside it while the scan streamed)
        or, once it did ``FIT_PACE_TRIALS`` trials during this wait, the faster of that and its
        pace now."""
        assert self._parallax_job is not None
        job, progress = self._parallax_job, self._parallax_cancel
        t0 = self.clock()
        wait_mark: tuple[float, int] | None = None  # (time, trials) at the first check past a trial
        while not job.done():
            now = self.clock()
            left = wait_s - (now - t0)
            if left <= 0:
                log.warning("parallax fit on %d frames not done within %.1f s of the refinement budget: "
                            "the %s probe is kept", self._parallax_frames, wait_s,
                            "early fit's" if self._parallax_applied else "nominal")
                return False
            trials, first = progress.trials, progress.first_trial_at
            if trials and wait_mark is None:
                wait_mark = (now, trials)
            if trials >= FIT_PACE_TRIALS and first is not None:
                pace = (now - first) / (trials - 1)
                if wait_mark is not None and trials - wait_mark[1] >= FIT_PACE_TRIALS:
                    pace = min(pace, (now - wait_mark[0]) / (trials - wait_mark[1]))
                expected = self._parallax_trials.get(
                    self._parallax_warm, FIT_TRIALS_WARM if self._parallax_warm else FIT_TRIALS_COLD)
                # a fit past its expected count has little left, but not nothing
                predicted = pace * max(expected - trials, 0.1 * expected)
                if predicted > left:
                    log.warning("parallax fit on %d frames dropped after %d trials: about %.1f s more "
                                "needed, %.1f s left of its share of the refinement budget; the %s probe "
                                "is kept", self._parallax_frames, trials, predicted, left,
                                "early fit's" if self._parallax_applied else "nominal")
                    return False
            futures_wait([job], timeout=min(PARALLAX_CHECK_S, left))
        return True

    def _mixed(self, probe: Any) -> Any:
        """``probe`` as the engine uses it: blurred by ``source_size_m`` into incoherent modes
        and/or given ``probe_modes`` modes (extra ones start from the probe's derivatives);
        itself when neither asks for modes."""
        probe = with_source(probe, self.options, self._pixel_size, self._stated_source)
        if self.options.probe_modes > 1 or probe.ndim == 3:
            probe = initial_modes(probe, self.options.probe_modes)
            if probe.ndim == 3 and probe.shape[0] == 1:
                probe = probe[0]
        return probe

    def _drop_parallax_job(self) -> None:
        """Give up the running fit: it stops at its next trial probe (its CPU time goes back to
        the steps and the refinement), and a failure still surfaces in the log."""
        assert self._parallax_job is not None
        self._parallax_cancel.set()
        self._parallax_job.add_done_callback(_log_failed_late_fit)
        self._parallax_job = None

    def _parallax_early_wanted(self) -> bool:
        """Whether a fit before scan end is made again at scan end (``stream.parallax_refit``)."""
        return self.options.stream.parallax_refit and self.options.stream.parallax_after < 1.0

    def _swap_probe(self, probe: Any) -> None:
        """Replace the probe (the object stays), at the power the data ask for."""
        self.probe = probe.astype(self._cdtype, copy=True)
        self._constrain_probe_power()
        self._velocity[...] = 0  # the momentum was built for the old probe
        self._illum_stale = True

    @property
    def probe_estimate(self) -> dict[str, float]:
        """The parallax fit's record (``ParallaxFit.record``: coefficients found, significance,
        whether applied) once a fit landed; empty before."""
        return dict(self._probe_estimate)

    @property
    def parallax_coefficients(self) -> dict[str, float] | None:
        """The aberrations (metres) the parallax fit added to the nominal probe, once it ran."""
        if self.parallax_fit is None or not self._parallax_applied:
            return None
        return dict(self.parallax_fit.coefficients)

    # --- positions while streaming ----------------------------------------------------------

    def _positions_due(self) -> bool:
        """Whether this step measures positions (``refine_positions`` with
        ``stream.refine_positions``, every ``stream.position_every`` steps)."""
        opts = self.options
        return (opts.refine_positions and opts.stream.refine_positions
                and self._iteration % opts.stream.position_every == 0)

    def _measure_positions(self, which: np.ndarray) -> None:
        """Position gradient and Fisher information of the frames of ``which`` visited at least
        ``position_min_visits`` times, at the current object and probe. On a device they stay
        there until the losses are read (:meth:`_read_pending`); on the host the scan model is
        updated at once."""
        opts = self.options
        sel = which[self.frame_store.visits[which] >= opts.stream.position_min_visits]
        if len(sel) == 0:
            return
        if self._live_positions is None:
            n = self.n_frames
            self._live_positions = LiveScanModel(
                self._received[:n] / self._pixel_size,
                self.frame_store.positions[:n] / self._pixel_size if self._positions_moved else None)
        at = self.frame_store.positions[sel] / self._pixel_size
        scale = AMPLITUDE_NLL_SCALE if opts.noise_model == "amplitude" else 1.0
        _loss, grad, fisher = position_terms_device(
            self.obj, self.probe, self.frame_store.counts(sel), self._batch(sel),
            model=opts.noise_model, mask=self.mask, scale=scale)
        if on_device(grad):
            self._pending_positions.append((sel, at, grad, fisher))
            return
        self._live_positions.record(sel, at, np.asarray(grad), np.asarray(fisher))
        self._update_positions()

    def _update_positions(self) -> None:
        """Refit the live scan model and move every frame to it."""
        assert self._live_positions is not None
        opts = self.options
        new = self._live_positions.update(opts.position_residual_px, opts.position_max_step_px,
                                          opts.position_model, residual_auto=opts.stream.position_residual_auto)
        if new is None:
            return
        pos = new * self._pixel_size
        self._ensure_canvas(pos)
        self.frame_store.positions[: len(pos)] = pos
        self._positions_moved = True
        self._illum_stale = True  # the coverage and the prior's share follow the positions

    def _lowfreq_filter(self) -> LowFrequencyPreconditioner:
        """The phase boost's filter for the current canvas (rebuilt when it grows), its
        cut-off from the probe as given (on the host: no read-back in a step), on a coarse
        grid: the full one's FFT pair over the 2×-padded canvas cost 1.2–2.5× a whole 64-frame
        step on a CPU (237² and 443² canvases), the coarse one (3× on the hemoglobin scans)
        0.1–0.35×, with the same reconstructions (STREAMING.md)."""
        shape = tuple(self.obj.shape)
        if self._lowfreq is None or self._lowfreq.shape != shape:
            ones = self.xp.ones(shape, dtype=self._rdtype)
            # the coarsest grid that still holds the boosted band (q_c ≤ its Nyquist, 0.5)
            coarsen = max(1, int(0.5 / self._lowfreq_qc))
            self._lowfreq = LowFrequencyPreconditioner(ones, self._lowfreq_qc, self.options.stream.lowfreq_boost,
                                                       reference=ones.astype(self._cdtype), coarsen=coarsen)
        return self._lowfreq

    def _mask_host_dev(self, xp: Any) -> Any:
        """The detector-order mask on ``xp`` (for frames that arrive on the device)."""
        return xp.asarray(self._mask_host, dtype=self._rdtype)

    def _forget(self, batch_size: int) -> float:
        """Decay of the accumulated illumination per step, so that it remembers about
        ``memory_sweeps`` passes over the frames received so far."""
        sweeps = self.options.stream.memory_sweeps
        return float(np.exp(-batch_size / (self.n_frames * sweeps)))

    def _draw_batch(self) -> tuple[np.ndarray, int]:
        """Store indices of the next batch (sorted) and how many of them are fresh."""
        stream = self.options.stream
        n = self.n_frames
        size = min(stream.batch_size, n)
        unvisited = n - self._next_fresh
        earlier = self._next_fresh
        n_fresh = min(unvisited, round(stream.fresh_fraction * size))
        n_old = min(earlier, size - n_fresh)
        n_fresh = min(unvisited, size - n_old)  # too few earlier frames: take more fresh ones
        fresh = np.arange(self._next_fresh, self._next_fresh + n_fresh)
        old = self._rng.choice(earlier, size=n_old, replace=False) if n_old else fresh[:0]
        self._next_fresh += n_fresh
        return np.sort(np.concatenate([fresh, old])), n_fresh

    # --- priors and probe -----------------------------------------------------------------

    def _prior_share(self, batch_illum: Any) -> Any:
        """Per-pixel share of the data this batch holds, D_batch / D_all: weighting the prior
        gradient by it makes the prior's total pull over one sweep of the data equal to its
        full-batch pull, whatever the batch size (see STREAMING.md)."""
        if self._illum_stale and self._steps_since_refresh * self.options.stream.batch_size >= (
            self.n_frames
        ):
            self._refresh_illumination()
        floor = self.options.stream.illumination_floor * dev_float(self._illum.max())
        return batch_illum / (self._illum + scalar_as(floor, self._rdtype))

    def _auto_mu0(self) -> Any:
        """μ₀ of ``priors.auto_mu0`` for the frames received so far (a device scalar on a
        device: the steps stay free of read-backs)."""
        top = scalar_as(0.01 * dev_float(self._illum.max()), self._rdtype)
        lit = self.xp.count_nonzero(self._illum > top)
        if not on_device(lit):
            return auto_mu0(max(self._valid_counts, 1e-12) / max(int(lit), 1))
        return auto_mu0(max(self._valid_counts, 1e-12) / self.xp.maximum(lit, 1).astype("float64"))

    def _prior_options(self, kappa: Any) -> tuple[ReconOptions, Any]:
        """(options, κ) for the prior; with mu0 "auto" the μ₀ decided from the frames so far
        is folded into κ (options with μ₀ = 1), so that it may stay a device scalar."""
        if self.options.mu0 != "auto" or self.options.prior != "tikhonov":
            return self.options, kappa
        if self._unit_mu0 is None:
            self._unit_mu0 = self.options.model_copy(update={"mu0": 1.0})
        return self._unit_mu0, self._auto_mu0() * kappa

    def _prior_curvature(self, kappa: float) -> float:
        """Mean curvature of the prior per object pixel (Tikhonov: 4 μ₀κ, the mean eigenvalue
        of the discrete Laplacian; sparse: μ₁κ), added to the step's normaliser as CG's
        preconditioner does, so a strong prior cannot make the step unstable."""
        opts, kappa = self._prior_options(kappa)
        if opts.prior == "tikhonov":
            return 4.0 * opts.mu0 * kappa
        if opts.prior == "sparse":
            return opts.mu1 * kappa
        return 0.0

    def _prior_grad(self, kappa: float) -> Any:
        opts, kappa = self._prior_options(kappa)
        if opts.prior == "sparse" and self._sparse is None:
            self._sparse = SparsePrior(opts.denoiser, opts.mu1, opts.denoise_every)
        # The sparse prior's denoiser runs every `denoise_every` *sweeps* of the data, not
        # steps: a mini-batch step is a small fraction of a full-batch iteration.
        _loss, grad = prior_term(self.obj, opts, kappa, self.sweeps, self._sparse)
        return grad

    def _kappa(self) -> float:
        """κ of :func:`cryoptycho.gpu.priors.kappa` for the frames received so far."""
        m = self.frame_store.frame_shape
        per_frame = int(self._mask_host.sum()) if self._mask_host is not None else m[0] * m[1]
        n_valid = per_frame * self.n_frames
        top = scalar_as(0.01 * dev_float(self._illum.max()), self._rdtype)
        lit = self.xp.count_nonzero(self._illum > top)
        if not on_device(lit):
            lit = max(int(lit), 1)
        # on a device κ stays there (kappa_of floors the count at one pixel)
        return kappa_of(n_valid, max(self._valid_counts, 1e-12) / n_valid, lit)

    @property
    def sweeps(self) -> int:
        """Completed passes over the frames received so far (frame visits ÷ frames)."""
        return self._visits // self.n_frames if self.n_frames else 0

    def refines_probe(self) -> bool:
        """``options.refine_probe``; "auto" is decided once, from the mean counts per pattern
        received by the time of the first call: the end of the warm-up, when the probe would
        join (or ``refine``, whichever comes first)."""
        if self.options.refine_probe != "auto":
            return bool(self.options.refine_probe)
        if self._probe_decision is None:
            self._probe_decision = self.options.refines_probe(self.mean_counts)
        return self._probe_decision

    def decided_options(self) -> ReconOptions:
        """The options with refine_probe and mu0 "auto" replaced by their decisions once made
        (what snapshots save)."""
        opts = self.options
        if opts.mu0 == "auto" and self._illum is not None:
            opts = opts.model_copy(update={"mu0": host_floats(self._auto_mu0())[0]})
        if opts.refine_probe == "auto" and self._probe_decision is not None:
            return opts.model_copy(update={"refine_probe": self._probe_decision})
        return opts

    def probe_power(self) -> float:
        """Σ|ψ|² the measured data ask for: mean counts per pattern on the valid pixels,
        divided by the share of the probe's diffraction power that falls on them."""
        if self.mask is None:
            return self.mean_counts
        far = fft2(self.probe)
        far_int = far.real**2 + far.imag**2
        share_on = dev_float((far_int * self.mask).sum())
        total = dev_float(far_int.sum())
        if on_device(share_on):
            xp = self.xp
            return self.mean_counts / xp.maximum(share_on / xp.maximum(total, 1e-30), 1e-6)
        share = share_on / max(total, 1e-30)
        return self.mean_counts / max(share, 1e-6)

    def _constrain_probe_power(self) -> None:
        power = dev_float((self.probe.real**2 + self.probe.imag**2).sum())
        target = self.probe_power()
        if on_device(power) or on_device(target):
            # the same rule without reading the device: a zero power or target scales by 1
            xp = self.xp
            ok = (power > 0) & (target > 0)
            scale = xp.where(ok, xp.sqrt(target / xp.where(ok, power, 1.0)), 1.0)
            self.probe *= scale.astype(self._rdtype)
            return
        if power > 0 and target > 0:
            self.probe *= self.xp.asarray(np.sqrt(target / power), dtype=self._rdtype)

    # --- after the scan -------------------------------------------------------------------

    def refine(
        self,
        iterations: int,
        time_budget_s: float | None = None,
        callback: Callable[[int, int, float], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> list[float]:
        """Full-batch CG over every frame received (after scan end). ``callback(iteration,
        total, loss)`` runs after each CG iteration. Returns the loss per position of each
        iteration. CG state does not persist between calls: call once with the whole budget
        rather than in pieces (each call restarts from steepest descent). ``time_budget_s``
        counts from this call, set-up included (``clock``, default the engine's ``clock``, is
        injectable for tests)."""
        clock = self.clock if clock is None else clock
        t_entry = clock()
        if self.n_frames == 0:
            raise RuntimeError("refine() needs frames: call add_frames first")
        if iterations < 0:
            raise ValueError(f"iterations must be ≥ 0, got {iterations}")
        if self._parallax_probe is not None:
            # the fit not yet run (or still running) belongs before the refinement: its time
            # comes out of the budget
            # (an early fit still running is waited for, then refitted on every frame,
            # ``stream.parallax_refit``: all within half the budget)
            deadline = None if time_budget_s is None else clock() + time_budget_s / 2
            while self._parallax_probe is not None:
                self._parallax_poll(final=True, wait_s=None if deadline is None else max(0.0, deadline - clock()))
            if time_budget_s is not None:
                time_budget_s = max(1e-9, time_budget_s - (clock() - t_entry))
            t_entry = clock()
        if time_budget_s is not None and (time_budget_s <= 0 or (
            self.step_seconds_per_frame is not None
            and time_budget_s < FIRST_EVALUATION_SWEEPS * self.n_frames * self.step_seconds_per_frame
        )):
            return []  # no time for even the first evaluation: the streamed state stands
        self.refines_probe()  # "auto" decides now if the warm-up has not ended yet
        n = self.n_frames
        batch = self._batch(np.arange(n), SUBPIXEL_QUANTUM)
        # Iterations continue the sweep count, so a probe the stream already refines keeps
        # being refined and the sparse prior's schedule goes on.
        start = self.sweeps
        opts = self.decided_options()
        if opts.refine_probe and self._iteration > opts.stream.probe_warmup_steps:
            start = max(start, opts.probe_start_iteration)
        if opts.prior == "sparse" and self._sparse is None:
            self._sparse = SparsePrior(opts.denoiser, opts.mu1, opts.denoise_every)
        self._constrain_probe_power()
        self._read_pending()
        kappa, power = host_floats(self._kappa(), self.probe_power())
        if time_budget_s is not None:
            time_budget_s = max(0.0, time_budget_s - (clock() - t_entry))
        if opts.refine_positions or opts.refine_aberrations:
            obj, probe, losses = self._refine_alternating(opts, batch, iterations, time_budget_s, callback, clock)
        else:
            obj, probe, losses = refine_full_batch(
                self.obj, self.probe, self.frame_store.frames[:n], batch, self.mask, opts,
                iterations, time_budget_s, start_iteration=start, sparse=self._sparse,
                kappa=kappa, probe_power=power, progress=callback, clock=clock,
            )
        self.obj = obj.astype(self._cdtype, copy=False)
        self.probe = probe.astype(self._cdtype, copy=False)
        self._velocity[...] = 0
        self._illum_stale = True
        per_position = [value / n for value in losses]
        for value in per_position:
            self._iteration += 1
            self._loss_history.append(value)
        self._refined += len(losses)
        return per_position

    def _refine_alternating(
        self, opts: ReconOptions, batch: Batch, iterations: int, time_budget_s: float | None,
        callback: Callable[[int, int, float], None] | None, clock: Callable[[], float] = time.perf_counter,
    ) -> tuple[Any, Any, list[float]]:
        """The offline engine's CG alternating with position and/or aberration updates
        (reconstruct.refine_alternating) on every frame received; refined positions replace
        the stored ones, the received ones are kept for the snapshot."""
        assert self.geometry is not None
        n = self.n_frames
        if opts.refine_aberrations and self._energy is None:
            raise ValueError("refine_aberrations needs the beam energy (energy_eV)")
        kappa, power = host_floats(self._kappa(), self.probe_power())  # (device scalars on a GPU)
        problem = Problem(
            xp=self.xp, options=opts, counts_fft=self.frame_store.frames[:n], mask=self.mask,
            batch=batch, geometry=self.geometry, probe=self.probe, object=self.obj,
            positions=self._refine_start_positions(opts, iterations, time_budget_s), probe_power=power,
            kappa=kappa, energy=float(self._energy or 0.0),
        )
        run = opts.model_copy(update={"iterations": iterations, "time_budget_s": time_budget_s})
        obj, probe, losses, positions = refine_alternating(problem, run, callback, clock=clock)
        for key, value in problem.probe_estimate.items():
            # each refinement starts from the probe the last one left: plates add up
            self._probe_estimate[key] = self._probe_estimate.get(key, 0.0) + value
        if opts.refine_positions and losses:
            # (no iteration ran: nothing was refined, and the positions it hands back are only
            # its start — the received ones after live steps, which would undo those steps)
            self.frame_store.positions[:n] = positions
            self._positions_moved = True
            self._batch_refined_positions = True
            if self._live_positions is not None:
                self._live_positions.forget(positions / self._pixel_size)
        return obj, probe, losses

    def _refine_start_positions(self, opts: ReconOptions, iterations: int,
                                time_budget_s: float | None) -> np.ndarray:
        """Where the full-batch refinement starts its scan model: the stored positions, or,
        after live position steps and before any full-batch refinement, the received ones. The
        live model's affine part is biased (measured against an object still being built, a
        raster's y scale comes out too small: MEASUREMENTS.md, "Live position correction"),
        and from there the full-batch updates stay near it — the object made at the live
        positions fits them — where from the received positions they find the scan error
        (small modes scan: 0.45 px against 0.27 px). That pays only when the refinement
        reaches a position update: one too short for any (few iterations, or a budget a loaded
        machine fills with set-up and a few CG iterations) would refine the object, built at
        the live positions, at the received ones — undoing the live steps (synthetic scan,
        refine(2): 0.47 → 0.66 px) and moving the object away from its fit (MEASUREMENTS.md,
        "The live service on realistic scans") — so it keeps the live positions."""
        n = self.n_frames
        live = self._live_positions
        if (live is None or not opts.refine_positions or len(live.nominal) != n
                or self._batch_refined_positions or not self._position_update_fits(opts, iterations, time_budget_s)):
            return self.frame_store.positions[:n].copy()
        return self._received[:n].copy()

    def _position_update_fits(self, opts: ReconOptions, iterations: int, time_budget_s: float | None) -> bool:
        """Whether a refinement of ``iterations`` CG iterations within ``time_budget_s`` is
        expected to reach its first position update (reconstruct.refine_alternating's schedule:
        after ``position_start_iteration`` iterations, none in the last ``position_every``).
        The time is estimated as for the first evaluation (``FIRST_EVALUATION_SWEEPS``) plus
        one sweep of the live steps' cost per CG iteration before the update."""
        if iterations < opts.position_start_iteration + opts.position_every:
            return False
        if time_budget_s is None or self.step_seconds_per_frame is None:
            return True
        sweeps = FIRST_EVALUATION_SWEEPS + opts.position_start_iteration
        return time_budget_s >= sweeps * self.n_frames * self.step_seconds_per_frame

    def snapshot(self) -> ReconState:
        """Host copies of object, probe and bookkeeping, safe to hand to another thread."""
        if self.obj is None:
            raise RuntimeError("snapshot() before any frame or declared extent: no canvas yet")
        self._read_pending()
        n = self.n_frames
        state = ReconState(
            object=np.array(to_numpy(self.obj), copy=True),
            # modes orthogonal and ordered by power (a unitary mixing: the model is unchanged;
            # the mini-batch steps commute with it, so the engine keeps its own copy as it is)
            probe=np.array(to_numpy(orthogonalize_modes(self.probe)), copy=True),
            geometry=self.geometry,
            iteration=self._iteration,
            options=self.decided_options().to_dict(),
            frames_used=n,
            positions=self.frame_store.positions[:n].copy(),
            energy=self._energy,
            nominal_positions=self._received[:n].copy() if self._positions_moved else None,
            nominal_probe=self._nominal_probe_snapshot(),
            probe_estimate=dict(self._probe_estimate),
        )
        start = self._iteration - len(self._loss_history) + 1
        state.loss_epochs = list(range(start, self._iteration + 1))
        state.loss_values = list(self._loss_history)
        return state

    def _nominal_probe_snapshot(self) -> np.ndarray | None:
        """The probe the parallax fit corrected, at the used probe's power (host copy)."""
        if self._nominal_probe is None:
            return None
        nominal = np.array(to_numpy(self._nominal_probe), copy=True)
        used = float(np.sum(np.abs(to_numpy(self.probe)) ** 2))
        return nominal * np.sqrt(used / max(float(np.sum(np.abs(nominal) ** 2)), 1e-300))

    @staticmethod
    def memory_estimate(
        frame_shape: tuple[int, int],
        frame_dtype: Any,
        n_frames: int,
        field_px: int | tuple[int, int],
        options: ReconOptions,
    ) -> dict[str, int]:
        """Bytes a scan of ``n_frames`` frames over an object canvas of ``field_px`` pixels
        needs on the options' backend, by part (``total`` = the peak: store + canvas + the
        larger of the mini-batch and the refinement work). Counted from the arrays the code
        allocates (see STREAMING.md); the daemon refuses scans that cannot fit."""
        if n_frames < 0:
            raise ValueError(f"n_frames must be ≥ 0, got {n_frames}")
        m2 = int(frame_shape[0]) * int(frame_shape[1])
        ny, nx = (field_px, field_px) if np.ndim(field_px) == 0 else field_px
        canvas = int(ny) * int(nx)
        c = complex_dtype(options.precision).itemsize
        r = real_dtype(options.precision).itemsize
        item = np.dtype(frame_dtype).itemsize
        frame_store = n_frames * (m2 * item + 2 * 8 + 8 + 4)
        # object, velocity, prior gradient, update; illumination, accumulated illumination,
        # prior share; scatter_add's float64 bincount pair for the complex gradient.
        canvas_bytes = canvas * (4 * c + 3 * r + 2 * 8)
        probe = 4 * m2 * c * options.probe_modes
        batch = min(options.stream.batch_size, max(n_frames, 1))
        # Per position-pixel in one step: windows, waves, far field, its gradient, the back-
        # propagated gradient, the per-position shifted probes and the ramps/FFTs that make
        # them (complex; two of them again for the batch illumination), the likelihood's
        # intensity/count/factor temporaries (real) and the gather/scatter index (int64).
        # Checked against the tracemalloc peak of a step with distinct sub-pixel shifts (the
        # worst case) in tests/test_stream_engine.py.
        # + a far field per extra incoherent mode
        per_position = m2 * ((11 + options.probe_modes) * c + 6 * r + 8)
        stream_work = batch * per_position
        chunk = min(options.chunk_size, max(n_frames, 1))
        # refine_full_batch: chunked data-term work and the CG vectors (x, gradient,
        # preconditioned gradient, direction, trial, old). Batches keep window corners, not a
        # per-pixel index. CG's line model (line_model.py: up to five far fields per frame) is
        # used only when it fits a quarter of the free memory: not part of the requirement.
        refine_work = chunk * per_position + 6 * (canvas * c + m2 * c)
        total = frame_store + canvas_bytes + probe + max(stream_work, refine_work)
        return {
            "frame_store": int(frame_store),
            "object": int(canvas_bytes),
            "probe": int(probe),
            "stream_work": int(stream_work),
            "refine_work": int(refine_work),
            "total": int(total),
        }

    # --- the engine boundary (gpu/engines.py::LiveEngine) -----------------------------------

    def restore(self, state: ReconState) -> None:
        """Put a :meth:`snapshot`'s object and probe back (a rollback). The canvas may have
        grown since the snapshot (it only grows): the old object goes back at its place in metres."""
        if self.obj is None or self.geometry is None:
            raise RuntimeError("restore() before any frame or declared extent: no canvas yet")
        xp, old, new = self.xp, state.geometry, self.geometry
        off = np.rint((np.asarray(old.origin) - np.asarray(new.origin)) / new.pixel_size).astype(int)
        ny, nx = np.shape(state.object)
        self.obj[off[0] : off[0] + ny, off[1] : off[1] + nx] = xp.asarray(state.object, dtype=self.obj.dtype)
        self.probe[...] = xp.asarray(state.probe, dtype=self.probe.dtype)
        self._illum_stale = True  # the illumination follows the probe

    def positions(self) -> np.ndarray:
        """(n_frames, 2) probe positions in metres, as refined (refine_positions) or as received."""
        return self.frame_store.positions[: self.n_frames].copy()

    # --- canvas ---------------------------------------------------------------------------

    def _batch(self, which: np.ndarray, quantum: float | None = None) -> Batch:
        """Windows of the stored frames ``which``; sub-pixel offsets rounded to ``quantum``
        (default: the live steps' ``stream.subpixel_quantum``)."""
        assert self.geometry is not None
        pixels = self.geometry.to_pixels(self.frame_store.positions[which])
        q = self.options.stream.subpixel_quantum if quantum is None else quantum
        # made on the host (positions live there) and moved: no device round trip per step
        return make_batch(
            pixels, self.geometry.object_shape, self.frame_store.frame_shape, q, xp=self.xp
        )

    def _illumination(self, batch: Batch) -> Any:
        """Σ_k R_k^H |ψ|² — the probe intensity placed at each window without its sub-pixel
        shift: a preconditioner and coverage map need no sub-pixel accuracy, and skipping
        the shift saves two FFTs per position over :func:`operators.illumination`."""
        out = self.xp.zeros(batch.object_shape, dtype=self._rdtype)
        self._add_illumination(out, batch)
        return out

    def _add_illumination(self, out: Any, batch: Batch) -> None:
        """``out += Σ_k R_k^H |ψ|²`` in place (see :meth:`_illumination`): no canvas-sized
        temporary and no canvas-sized add per call."""
        inten = (self.probe.real**2 + self.probe.imag**2).astype(self._rdtype, copy=False)
        if inten.ndim == 3:
            inten = inten.sum(axis=0)  # incoherent modes: intensities add
        assert batch.host_corners is not None  # _batch makes its batches with make_batch
        place_kernel(out, inten, batch.host_corners, batch.corners)

    def _initial_object(self, shape: tuple[int, int]) -> Any:
        """Fresh canvas pixels: unit amplitude, phase N(init_phase_mean, init_phase_std)
        (``init="ones"``: unit transmission). A spectral start needs the data, so a live scan
        starts from the random one."""
        opts = self.options
        if opts.init == "ones":
            values = np.ones(shape, dtype=self._cdtype)
        else:
            phase = self._rng.normal(opts.init_phase_mean, opts.init_phase_std, size=shape)
            # e^{iφ} as cos φ + i sin φ straight into the canvas dtype: NumPy's complex exp
            # of 1j·φ (a complex128 temporary, then a cast) gave the same values at about twice
            # the time, at every scan's first frames (≈ 200,000 pixels for a 256² raster)
            values = np.empty(shape, dtype=self._cdtype)
            np.cos(phase, out=values.real)
            np.sin(phase, out=values.imag)
        return asarray(values, self.xp)

    def _new_canvas(self, positions: np.ndarray) -> None:
        m = self.frame_store.frame_shape
        margin = CANVAS_MARGIN_PX
        if self.options.refine_positions:
            # refined positions may leave the nominal scan's canvas: room for a few per cent
            # (as offline), so that the canvas rarely grows while they move
            if self._extent is not None:
                span_m = float(np.ptp(np.asarray(self._extent, dtype=np.float64), axis=1).max())
            else:
                span_m = float(np.ptp(positions, axis=0).max()) if len(positions) else 0.0
            margin = max(margin, position_margin_px(span_m / self._pixel_size))
        self.geometry = fit_geometry(
            positions, self._pixel_size, m, margin_px=margin, extent_m=self._extent
        )
        self.obj = self._initial_object(self.geometry.object_shape)
        self._illum = self.xp.zeros(self.geometry.object_shape, dtype=self._rdtype)
        self._curv = self.xp.zeros(self.geometry.object_shape, dtype=self._rdtype)
        self._velocity = self.xp.zeros(self.geometry.object_shape, dtype=self._cdtype)

    def _ensure_canvas(self, positions: np.ndarray) -> None:
        """Grow the canvas (and everything canvas-shaped) so every window of ``positions``
        fits with the margin; the old content keeps its place in metres."""
        if self.geometry is None:
            self._new_canvas(positions)
            return
        geo = self.geometry
        px = geo.to_pixels(positions)
        size = np.asarray(geo.object_shape)
        m = np.asarray(geo.probe_shape)
        # rounding of positions → pixels (1e-15 px) must not count as leaving the canvas
        tol = 1e-6
        before = np.maximum(0, np.ceil(CANVAS_MARGIN_PX - px.min(axis=0) - tol)).astype(int)
        after = np.maximum(0, np.ceil(px.max(axis=0) + m + 1 + CANVAS_MARGIN_PX - size - tol)).astype(int)
        if not (before.any() or after.any()):
            return
        slack = np.ceil(self.options.stream.canvas_slack * size).astype(int)
        before = np.where(before > 0, np.maximum(before, slack), 0)
        after = np.where(after > 0, np.maximum(after, slack), 0)
        shape = tuple(int(s) for s in size + before + after)
        obj = self._initial_object(shape)
        illum = self.xp.zeros(shape, dtype=self._rdtype)
        inner = (slice(before[0], before[0] + size[0]), slice(before[1], before[1] + size[1]))
        obj[inner] = self.obj
        illum[inner] = self._illum
        curv = self.xp.zeros(shape, dtype=self._rdtype)
        curv[inner] = self._curv
        self._curv = curv
        velocity = self.xp.zeros(shape, dtype=self._cdtype)
        velocity[inner] = self._velocity
        self._velocity = velocity
        origin = (geo.origin[0] - before[0] * geo.pixel_size, geo.origin[1] - before[1] * geo.pixel_size)
        self.geometry = ScanGeometry(geo.pixel_size, origin, shape, geo.probe_shape)
        self.obj = obj
        self._illum = illum
        self._sparse = None  # its denoised target was canvas-shaped; rebuilt on next use

    def _refresh_illumination(self) -> None:
        """Recompute Σ|S_δ ψ|² over all frames with the current probe, in chunks."""
        illum = self.xp.zeros(self.geometry.object_shape, dtype=self._rdtype)
        for lo in range(0, self.n_frames, SWEEP_CHUNK):
            batch = self._batch(np.arange(lo, min(lo + SWEEP_CHUNK, self.n_frames)))
            self._add_illumination(illum, batch)
        self._illum = illum
        self._illum_stale = False
        self._steps_since_refresh = 0
