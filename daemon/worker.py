"""One worker thread per active scan: drives its StreamingReconstructor, fed through a queue.

Why threads (not processes): the manager thread must stay responsive (sockets, metrics, control)
while engines compute. NumPy's FFTs and BLAS, and every CuPy call, release the GIL, so a worker
spends most of its time outside the interpreter lock and the manager's zmq poll loop keeps
running; frames are handed over without pickling or copying. A process per scan would isolate
crashes better but would copy every frame once more; an engine *exception* is already contained
here (the scan fails, the daemon lives), and a NaN or diverging loss rolls the engine back.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.engines import EngineSpec, LiveEngine, create_engine
from cryoptycho.gpu.framestore import FrameStore
from cryoptycho.gpu.operators import from_fft_order
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.state import ReconState

from .config import ServiceConfig
from .metrics import ServiceMetrics
from .publisher import Outbox, preview_message, result_message
from .resolution import HalfSetEstimator
from .scan import engine_spec
from .session import Session, State
from .storage.spool import FftOrder

log = logging.getLogger("cryoptycho.worker")


@dataclass
class FrameBatch:
    frames: np.ndarray  #: (n, M, M) wire dtype, detector order
    positions_m: np.ndarray  #: (n, 2)
    arrived: float = field(default_factory=time.monotonic)
    #: never below the frames' largest count where given (a detector reducer's bound), for an
    #: engine whose add_frames takes it (``takes_peak``): it skips its own max pass
    peak: int | None = None


@dataclass
class EndOfScan:
    reason: str = "scan_end"
    arrived: float = field(default_factory=time.monotonic)  #: the refinement budget starts here


@dataclass
class Cancel:
    reason: str = "cancelled"
    failed: bool = False  #: the manager met an internal error on this scan: end it failed, not aborted


@dataclass
class Interrupt:
    """Shutdown: stop without a final state; the scan stays in the spool and is recovered later."""


class EngineDiverged(RuntimeError):
    pass


class ScanFailed(RuntimeError):
    """An expected way for a scan to fail (no frames, diverging again and again): the scan's
    own outcome, not a fault of the service (not counted as an internal error)."""


#: seconds the spool thread waits at a scan's end for its worker to take in the scan's last
#: frames, to write the spool's derived binned rows from them (:meth:`ScanWorker.held_frames`);
#: a worker further behind leaves them to be decoded from the detector frames (spool.py DERIVED)
HELD_FRAMES_WAIT_S = 5.0

#: Bytes per second assumed for writing the result file (the spool's frames are copied into it)
#: when the refinement budget keeps time for it: a slow local disk's rate, so the estimate errs
#: towards finishing early.
RESULT_WRITE_BYTES_PER_S = 100e6


def split_budget(budget_s: float, spent_s: float, reserve_s: float, halves_share: float) -> tuple[float, float]:
    """(main refinement, half-set refinements) seconds out of a post-scan budget: the budget is
    a promise from scan end to the final image, so what was already spent (the last preview)
    and what must follow the refinements (``reserve_s``: resolution, result file) come out of
    it, and the half sets take their share of the rest rather than time on top of it."""
    left = max(0.0, budget_s - spent_s - reserve_s)
    halves = left * halves_share
    return left - halves, halves


def detector_order(frames: np.ndarray) -> np.ndarray:
    """Host frames (n, M, M) in FFT order as a new array in detector order (``fftshift``): for
    even sides one copy that swaps the halves (its own inverse), where ``np.fft.fftshift`` rolls
    twice (measured on a 96×96 uint32 frame: 16 µs against 11, 6 of them the fresh pages)."""
    n, my, mx = frames.shape
    if my % 2 or mx % 2:
        return from_fft_order(frames)
    out = np.empty_like(frames)
    out.reshape(n, 2, my // 2, 2, mx // 2)[...] = frames.reshape(n, 2, my // 2, 2, mx // 2)[:, ::-1, :, ::-1]
    return out


class _Stop(Exception):
    """Raised from the refinement callback to leave a cancelled or interrupted refinement."""

    def __init__(self, reason: str, failed: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.failed = reason, failed


class ScanWorker:
    """Runs one scan from its first frame to its final result on its own thread."""

    def __init__(
        self,
        session: Session,
        options: ReconOptions,
        config: ServiceConfig,
        outbox: Outbox,
        metrics: ServiceMetrics,
        finish: Callable[[Session, Any], dict[str, str]],
        on_exit: Callable[[Session], None],
    ) -> None:
        self.session = session
        self.options = options
        self.config = config
        self.outbox = outbox
        self.metrics = metrics
        self._finish = finish
        self._on_exit = on_exit
        self.inbox: queue.SimpleQueue[FrameBatch | EndOfScan | Cancel | Interrupt] = queue.SimpleQueue()
        self._queued = 0
        self._queued_lock = threading.Lock()
        self._options_update: ReconOptions | None = None
        self._snapshot_request = threading.Event()
        self.engine: LiveEngine | None = None
        self._engine_spec: EngineSpec | None = None
        self._used = 0  #: frames visited by at least one update
        #: set once every frame of the scan is in the engine (its end taken) or the worker stopped
        self._frames_in = threading.Event()
        #: the frame store's frames array and its rows at the scan's end (:meth:`held_frames`)
        self._held: tuple[Any, int] | None = None
        #: the largest count of those frames where the engine measured it (:meth:`held_peak`)
        self._held_peak: int | None = None
        #: a cancelled scan's spool close takes its rows from the frames held at the cancel:
        #: they outlive the worker until :meth:`release_held` (:meth:`keep_held_for_close`)
        self._keep_held = False
        #: orders :meth:`release_held` against :meth:`held_bytes` (the closer and manager threads)
        self._held_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"worker-{session.scan_id}", daemon=True)

    # -- called from the manager thread -------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def put(self, item: FrameBatch | EndOfScan | Cancel | Interrupt) -> None:
        if isinstance(item, FrameBatch):
            with self._queued_lock:
                self._queued += len(item.frames)
        self.inbox.put(item)

    @property
    def queued_frames(self) -> int:
        with self._queued_lock:
            return self._queued

    def held_frames(self, start: int, stop: int) -> FftOrder | None:
        """Rows [start, stop) of the scan's frames as the engine's frame store holds them: host
        frames in its FFT order (a view of a host store, a copy of a device's) and the store's
        dtype (spool.py HeldFrames: the store's rows are the spool's, both in the order the
        spool thread handed the frames over), once every
        frame is in (the scan's end taken). None where the worker did not get that far within
        :data:`HELD_FRAMES_WAIT_S`, stopped, or its engine keeps no FrameStore. Any thread: the
        array and rows are those of the scan's end, which nothing writes again (an append writes
        rows after them, a growth a new array) and the engine only reads."""
        if not self._frames_in.wait(HELD_FRAMES_WAIT_S):
            return None
        held = self._held
        if held is None or not 0 <= start <= stop <= held[1]:
            return None
        # in the store's FFT order: the spool puts them in detector order chunk by chunk, on its
        # compression threads, in one pass with the cast to the dtype it stores (spool.FftOrder)
        return FftOrder(to_numpy(held[0][start:stop]))

    def keep_held_for_close(self) -> None:
        """Before a Cancel is put: the frames the store holds when the worker takes the Cancel
        are kept for the spool's close (:meth:`held_frames`, as at a scan's end) after the worker
        stops, until :meth:`release_held`; a worker that stopped already keeps none."""
        self._keep_held = True

    def release_held(self) -> None:
        """The spool's close is over: the frames kept for it are let go of."""
        with self._held_lock:
            self._keep_held = False
            self._held = None

    def held_bytes(self) -> dict[str, int]:
        """Memory the frames kept for the spool's close still take (``{"host" | "device": bytes}``,
        empty once :meth:`release_held` let go of them, or where none were kept): after the worker
        exits, its scan's memory is not free until then (ScanManager counts it at admission)."""
        with self._held_lock:
            held = self._held
        if held is None:
            return {}
        frames = held[0]
        return {"host" if isinstance(frames, np.ndarray) else "device": int(frames.nbytes)}

    def held_peak(self) -> int | None:
        """The largest count of the frames :meth:`held_frames` gives (spool.py HeldPeak), or
        None where it is not known (waits as :meth:`held_frames` does)."""
        if not self._frames_in.wait(HELD_FRAMES_WAIT_S) or self._held is None:
            return None
        peak = self._held_peak
        return None if peak is None else int(peak)

    def set_options(self, options: ReconOptions) -> None:
        """Apply new options at the next step (the engine is only touched by this thread)."""
        self._options_update = options

    # -- the worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        s = self.session
        try:
            self._main()
        except Exception as exc:  # the scan fails; the daemon and other scans carry on
            log.exception("scan failed", extra={"scan_id": s.scan_id})
            if not isinstance(exc, ScanFailed):
                self.metrics.internal_errors.labels(where="worker").inc()
            if s.transition(State.FAILED, error=f"{type(exc).__name__}: {exc}"):
                self.outbox.post("scan.failed", {"scan_id": s.scan_id, "error": s.error})
        finally:
            # the engine holds every frame of the scan (on the GPU too) and frames may still wait
            # in the inbox (a cancelled scan): an ended scan keeps its summary, not its data
            store = getattr(self.engine, "frame_store", None)
            if isinstance(store, FrameStore) and not store.stop_prefault():
                log.warning("frame store prefault thread still running after the scan",
                            extra={"scan_id": s.scan_id})
            self.engine = self._good = None
            with self._held_lock:
                if not self._keep_held:
                    self._held = None
            self._frames_in.set()  # (held_frames waits no longer)
            self.inbox = queue.SimpleQueue()
            self._on_exit(s)

    def _main(self) -> None:
        s, cfg = self.session, self.config
        halves: HalfSetEstimator | None = None
        preview_every = 1.0 / cfg.preview_hz
        next_preview = time.monotonic() + preview_every
        next_resolution = time.monotonic() + cfg.resolution_interval_s
        unpreviewed: list[tuple[float, int]] = []  # (arrival time, frames) not yet in a preview
        self._good: ReconState | None = None
        self._preview_s = 0.0  # cost of the last preview (snapshot + publish)
        self._scan_end: float | None = None  # when scan_end arrived: the budget's start
        self._best_loss = np.inf
        rollbacks = 0
        ended = False
        while not ended:
            for item in self._drain(block=self.engine is None or self.engine.n_frames == 0):
                if isinstance(item, Cancel):
                    if self._keep_held:  # every frame handed over before the cancel is in
                        self._hold_frames()
                    self._abort(item.reason, item.failed)
                    return
                if isinstance(item, Interrupt):
                    log.info("interrupted by shutdown", extra={"scan_id": s.scan_id})
                    return
                if isinstance(item, EndOfScan):
                    ended = True
                    self._hold_frames()
                    self._scan_end = item.arrived
                    continue
                first_frames = self.engine is None
                if first_frames:
                    self._start_engines(item.frames)
                    if cfg.resolution_interval_s > 0:
                        halves = HalfSetEstimator(
                            self._new_half_engine, s.spec.pixel_size_m,
                            cfg.resolution_share, seed=self.options.seed + 1,
                        )
                if item.peak is not None and getattr(self.engine, "takes_peak", False):
                    self.engine.add_frames(item.frames, item.positions_m, peak=item.peak)
                else:  # the engine interface (gpu/engines.py LiveEngine): plugin engines too
                    self.engine.add_frames(item.frames, item.positions_m)
                store = getattr(self.engine, "frame_store", None)
                if first_frames and isinstance(store, FrameStore):
                    # the scan's declared frames are faulted in ahead of the appends on a thread
                    # of their own (a fresh store's pages cost a first scan ≈ 12 µs per frame
                    # here): within the memory budget and, as the warm reserve, half the memory
                    # available (resident before the frames come; more calls the OOM killer)
                    from .service import memory_available  # (here: the service imports this module)

                    try:
                        available = memory_available()
                        store.start_prefault(cfg.host_memory_budget_bytes if available is None
                                             else min(cfg.host_memory_budget_bytes, available // 2))
                    except Exception:  # an optimisation (e.g. no thread left): the appends fault their own rows
                        log.warning("frame store prefault not started", exc_info=True, extra={"scan_id": s.scan_id})
                if halves is not None:
                    halves.add_frames(item.frames, item.positions_m)
                unpreviewed.append((item.arrived, len(item.frames)))
                if s.state is State.ANNOUNCED:
                    s.transition(State.ACQUIRING)
            if self.engine is None or self.engine.n_frames == 0:
                if ended:
                    raise ScanFailed("the scan ended without a single frame")
                continue
            self._apply_options()
            try:
                self._step(halves)
                now = time.monotonic()
                if now >= next_preview:
                    # the steps' losses are read (and checked) here, not per step
                    next_preview = now + preview_every
                    self._preview(unpreviewed)
            except EngineDiverged as exc:
                rollbacks += 1
                if rollbacks > cfg.max_rollbacks:
                    raise ScanFailed(f"engine diverged {rollbacks} times; last: {exc}") from None
                self._rollback(str(exc))
            if halves is not None:
                halves.maybe_step()
            now = time.monotonic()
            if halves is not None and now >= next_resolution:
                next_resolution = now + cfg.resolution_interval_s
                self._resolution(halves)
        try:
            self._preview(unpreviewed)  # the scan's last frames are in an image before refinement
        except EngineDiverged as exc:
            self._rollback(str(exc))
            self._preview(unpreviewed)
        self._refine(halves)

    def _hold_frames(self) -> None:
        """No frame comes after (the scan's end, or its cancel): the frame store's rows so far
        are the spool's first rows, for its close (:meth:`held_frames`)."""
        store = getattr(self.engine, "frame_store", None)
        if isinstance(store, FrameStore):
            store.stop_prefault()  # the rest stays untouched
            self._held = (store.frames, store.n)
            self._held_peak = getattr(self.engine, "peak_count", None)
        self._frames_in.set()

    def _start_engines(self, first: np.ndarray) -> None:
        """Create the engine at the first frames: a model probe gets its power from them."""
        self._engine_spec = engine_spec(self.session.spec, first)
        self.engine = self._new_engine()

    def _new_engine(self) -> LiveEngine:
        """An engine of the scan's algorithm (options.algorithm, gpu/engines.py)."""
        assert self._engine_spec is not None
        return create_engine(self._engine_spec, self.options)

    def _new_half_engine(self) -> LiveEngine:
        """An engine of a half set (resolution estimate): without the parallax fit, which
        would run twice more on half the counts (minutes on a CPU for a large particle). The
        offline-only searches are off: the scan's engine already warned that it skips them."""
        assert self._engine_spec is not None
        options = self.options.model_copy(update={"aberration_search": False, "scan_search": False,
                                                  "parallax_scan": False})
        return create_engine(dataclasses.replace(self._engine_spec, probe_from_model=False), options)

    def _note_parallax(self) -> dict[str, float]:
        """The engine's probe estimate (optional engine attributes: ``probe_estimate``, the
        parallax fit's record, ``ParallaxFit.record``; else ``parallax_coefficients``, metres by
        name), as session figures ``parallax_*``: published with the metrics and status and the
        result message (the result file gets the record from the engine's snapshot). The record
        says whether the fit was applied (``parallax_applied``): a refit at scan end may take an
        early correction out again."""
        figures = {k: float(v) for k, v in (getattr(self.engine, "probe_estimate", None) or {}).items()}
        if not figures:
            coefficients = getattr(self.engine, "parallax_coefficients", None) or {}
            figures = {f"parallax_{name}_m": float(value) for name, value in coefficients.items()}
        if not figures:
            return {}
        if any(self.session.figures.get(k) != v for k, v in figures.items()):  # new: log once
            log.info("parallax fit: %s nm (%s)",
                     {k[len("parallax_"):-2]: round(v * 1e9, 1) for k, v in figures.items()
                      if k.endswith("_m") and not k.endswith("_se_m")},
                     "applied" if figures.get("parallax_applied", 1.0) else "not applied",
                     extra={"scan_id": self.session.scan_id})
            self.session.update_figures(**figures)
        return figures

    def _drain(self, block: bool) -> list[FrameBatch | EndOfScan | Cancel | Interrupt]:
        items = []
        try:
            if block:
                items.append(self.inbox.get(timeout=0.2))
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        n = sum(len(i.frames) for i in items if isinstance(i, FrameBatch))
        if n:
            with self._queued_lock:
                self._queued -= n
        return items

    def _step(self, halves: HalfSetEstimator | None) -> None:
        t0 = time.perf_counter()
        try:
            result = self.engine.step()
        except FloatingPointError as exc:
            raise EngineDiverged(str(exc)) from None
        dt = time.perf_counter() - t0
        if halves is not None:
            halves.account_main(dt)
        self.metrics.update_duration.observe(dt)
        self.metrics.iterations.inc()
        self._fold(result.fresh)
        self.session.update_figures(
            iteration=result.iteration, n_frames=result.n_frames, frames_used=self._used,
        )

    def _read_losses(self) -> None:
        """The losses of the steps since the last read, in one transfer (on a GPU, reading one
        per step would make every step wait for the device): each is checked for divergence,
        the last is published."""
        try:
            losses = self.engine.flush_losses()  # device losses come back in one transfer
        except FloatingPointError as exc:
            raise EngineDiverged(str(exc)) from None
        for loss in losses:
            self._check_loss(loss)
        if losses:
            self.metrics.loss.set(losses[-1])
            self.session.update_figures(loss=float(losses[-1]))

    def _fold(self, frames: int) -> None:
        """Count frames visited by the model for the first time."""
        self._used += frames
        self.metrics.frames_used.inc(frames)

    def _check_loss(self, loss: float) -> None:
        if not np.isfinite(loss):
            raise EngineDiverged(f"loss became {loss}")
        if loss > self.config.divergence_factor * self._best_loss:
            raise EngineDiverged(f"loss {loss:.4g} > {self.config.divergence_factor:g} × best {self._best_loss:.4g}")
        self._best_loss = min(self._best_loss, float(loss))

    def _rollback(self, why: str) -> None:
        """Restore the last good object and probe (checkpointed at each preview)."""
        self.metrics.rollbacks.inc()
        log.warning("rolling back engine: %s", why, extra={"scan_id": self.session.scan_id})
        if self._good is None:
            raise ScanFailed(f"engine diverged ({why}) before any good state was checkpointed")
        self.engine.restore(self._good)
        self.outbox.post("error", {"scan_id": self.session.scan_id, "field": "engine", "rule": "rollback",
                                   "message": f"engine rolled back to its last good state: {why}"})

    def _apply_options(self) -> None:
        new, self._options_update = self._options_update, None
        if new is not None:
            self.options = new
            self.engine.options = new

    def _preview(self, unpreviewed: list[tuple[float, int]]) -> None:
        """Publish the current images (latest-only) and checkpoint them as the last good state;
        ``unpreviewed`` (arrival time, frames) are now in an image: their latency is recorded.
        Raises EngineDiverged (before anything is published or checkpointed) when a step since
        the last preview diverged."""
        self._read_losses()
        t0 = time.perf_counter()
        state = self.engine.snapshot()
        self._good = state
        s = self.session
        preview = preview_message(s.scan_id, state, self._used, self.engine.coverage())
        s.update_figures(last_preview=preview)  # what the control `snapshot` serves
        self.outbox.offer(s.scan_id, "preview", preview)
        self._preview_s = time.perf_counter() - t0
        done = time.monotonic()
        if unpreviewed:
            s.update_figures(latency_s=done - unpreviewed[-1][0])
        for arrived, n in unpreviewed:
            s.record_latency(done - arrived, n)
            for _ in range(n):
                self.metrics.preview_latency.observe(done - arrived)
        unpreviewed.clear()
        self._note_parallax()
        self._publish_metrics()

    def _finish_reserve(self) -> float:
        """Seconds kept for what follows the refinement: snapshots and the resolution estimate
        (about two previews' cost) and the result file, into which the spool's frames are
        copied (estimated from their bytes)."""
        spec = self.session.spec
        n = self.engine.n_frames if self.engine is not None else 0
        frames = n * spec.frame_shape[0] * spec.frame_shape[1] * np.dtype(spec.frame_dtype).itemsize
        return 2.0 * self._preview_s + 2.0 * frames / RESULT_WRITE_BYTES_PER_S

    def _publish_metrics(self) -> None:
        self.outbox.offer(self.session.scan_id, "metrics", self.session.summary())

    def _resolution(self, halves: HalfSetEstimator) -> None:
        res = halves.estimate()
        if res is not None and np.isfinite(res):
            self.metrics.resolution.set(res)
            self.session.update_figures(resolution_m=res)
        elif res == np.inf:  # estimated, and nothing resolved: said so, not left blank
            self.session.update_figures(resolution_m=res)

    def _abort(self, reason: str, failed: bool = False) -> None:
        s = self.session
        if failed:
            if s.transition(State.FAILED, error=reason):
                self.outbox.post("scan.failed", {"scan_id": s.scan_id, "error": reason})
        elif s.transition(State.ABORTED, error=reason):
            self.outbox.post("scan.aborted", {"scan_id": s.scan_id, "reason": reason})

    def _refine(self, halves: HalfSetEstimator | None) -> None:
        s, cfg = self.session, self.config
        s.transition(State.REFINING)
        self._publish_metrics()
        budget = cfg.refine_time_budget_s
        if self.options.time_budget_s is not None:
            budget = min(budget, self.options.time_budget_s)
        t_end = self._scan_end if self._scan_end is not None else time.monotonic()
        share = cfg.resolution_share if halves is not None and halves.enabled else 0.0
        # the engines skip a refinement whose set-up and first evaluation would not fit
        main_s, _ = split_budget(budget, time.monotonic() - t_end, self._finish_reserve(), share)
        last = [time.monotonic()]
        done = [0]  # the engine counts refinement iterations only once refine() returns

        def callback(iteration: int, total: int, loss: float) -> None:
            loss = loss / self.engine.n_frames  # refine reports the sum; steps report per position
            self._check_loss(loss)
            self.metrics.iterations.inc()
            self.metrics.loss.set(loss)
            done[0] += 1
            s.update_figures(iteration=int(self.engine.iteration) + done[0], loss=float(loss))
            for item in self._drain(False):
                if isinstance(item, Cancel):
                    raise _Stop(item.reason, item.failed)
                if isinstance(item, Interrupt):
                    raise _Stop("shutdown")
            if time.monotonic() - last[0] >= 1.0 / cfg.preview_hz:
                last[0] = time.monotonic()
                self._publish_metrics()

        t0 = time.perf_counter()
        try:
            self.engine.refine(self.options.iterations, time_budget_s=main_s, callback=callback)
        except _Stop as stop:
            if stop.reason == "shutdown":
                log.info("refinement interrupted by shutdown", extra={"scan_id": s.scan_id})
            else:
                self._abort(stop.reason, stop.failed)
            return
        except EngineDiverged as exc:
            # the refinement's objects were never installed: the streamed state is still good
            log.warning("refinement diverged (%s): keeping the streamed result", exc,
                        extra={"scan_id": s.scan_id})
            self.metrics.rollbacks.inc()
        s.update_figures(refine_s=time.perf_counter() - t0, refine_iterations=done[0])
        self._fold(self.engine.n_frames - self._used)  # full-batch refinement visits every frame
        s.update_figures(frames_used=self._used)
        if halves is not None:
            t_halves = time.perf_counter()
            _, halves_s = split_budget(budget, time.monotonic() - t_end, self._finish_reserve(), 1.0)
            halves.refine(self.options.iterations, halves_s)
            self._resolution(halves)
            s.update_figures(halves_refine_s=time.perf_counter() - t_halves)
        t_finish = time.perf_counter()
        parallax = self._note_parallax()  # the fit may have run at scan end, in refine()
        state = self.engine.snapshot()
        files = self._finish(s, state)  # writes the result files (sets s.result_path)
        final_s = time.monotonic() - t_end
        s.update_figures(finish_s=time.perf_counter() - t_finish, final_image_s=final_s)
        log.info("final image %.2f s after scan end (budget %.1f s)", final_s, budget,
                 extra={"scan_id": s.scan_id})
        result = result_message(s.scan_id, state, self.engine.positions(),
                                files, s.figures.get("loss"), s.figures.get("resolution_m"))
        result.metadata.update(parallax)
        # frames held of those declared, and why it ended: a partial scan reconstructed on request
        # (finish_scan) or stopped early is not to be taken for the whole scan downstream
        result.metadata.update(s.completeness())
        s.transition(State.FINISHED)
        self.outbox.post("result", result)
        self.outbox.post("scan.finished", {"scan_id": s.scan_id, "result_path": s.result_path})
