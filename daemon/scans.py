"""The scan table of the service: admission, spooling, hand-over to workers, recovery, finishing.

Every method here runs on the manager thread except :meth:`ScanManager.finish_result` and
:meth:`ScanManager.worker_exited`, which workers call (they only touch files of their own scan
and a thread-safe queue).
"""

from __future__ import annotations

import logging
import queue
import time
from collections import OrderedDict
from typing import Any

import h5py
import numpy as np
from cryoptycho.gpu.backend import free_device_bytes, get_xp
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.protocols.sources import DetectorFrames
from pydantic import ValidationError

from .config import ServiceConfig
from .metrics import ServiceMetrics
from .publisher import Outbox
from .session import ScanSpec, Session, State
from .storage.spool import SpoolWriter, file_stem, read_spool, spool_path, unfinished_spools
from .worker import Cancel, EndOfScan, FrameBatch, Interrupt, ScanWorker

log = logging.getLogger("cryoptycho.scans")

#: finished sessions kept for `list_scans`/`status` after their worker exits
HISTORY = 256


class ScanRefused(ValueError):
    """A scan_start that cannot be accepted; ``field`` and ``rule`` name the reason."""

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(f"{field}: {message} [rule {rule}]")
        self.field, self.rule, self.message = field, rule, message


def estimate_bytes(spec: ScanSpec, options: ReconOptions) -> int:
    """Engine memory of the scan (frame store + object + probe + work buffers), all halves included."""
    from cryoptycho.gpu.stream import StreamingReconstructor

    est = StreamingReconstructor.memory_estimate(
        frame_shape=spec.frame_shape,
        frame_dtype=np.dtype(spec.frame_dtype),
        n_frames=spec.expected_frames or options.stream.initial_capacity,
        field_px=spec.field_px(),
        options=options,
    )
    return int(est["total"]) if isinstance(est, dict) and "total" in est else int(sum(est.values()))


class ScanManager:
    def __init__(self, config: ServiceConfig, metrics: ServiceMetrics, outbox: Outbox) -> None:
        self.config = config
        self.metrics = metrics
        self.outbox = outbox
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.waiting: list[str] = []  #: accepted scans without a worker yet (FIFO)
        self.running: dict[str, ScanWorker] = {}
        self.spools: dict[str, SpoolWriter] = {}
        self._exited: queue.SimpleQueue[Session] = queue.SimpleQueue()
        self.stopping = False
        config.spool_dir.mkdir(parents=True, exist_ok=True)
        config.results_dir.mkdir(parents=True, exist_ok=True)
        metrics.queue_capacity.set(config.queue_capacity_frames)

    # -- scan lifecycle (manager thread) -------------------------------------------------------
    def start_scan(self, spec: ScanSpec) -> Session:
        """Accept a scan or raise :class:`ScanRefused`; nothing is written for a refused scan."""
        if spec.scan_id in self.sessions or spool_path(self.config.spool_dir, spec.scan_id).exists():
            raise ScanRefused("scan_id", "unique_scan_id", f"scan {spec.scan_id!r} already exists")
        if self.stopping:
            raise ScanRefused("scan_id", "service_stopping", "the service is shutting down")
        if len(self.waiting) >= self.config.max_queued_scans + max(
            0, self.config.max_concurrent_scans - len(self.running)
        ):
            raise ScanRefused("scan_id", "max_queued_scans", f"{len(self.waiting)} scans are already waiting")
        options = self._options_for(spec)
        need = self._reservation(spec, options)
        spool = SpoolWriter.create(self.config.spool_dir, spec, fsync=self.config.spool_fsync)
        session = Session(spec, need)
        self._register(session, spool)
        self.outbox.post("scan.accepted", {"scan_id": spec.scan_id, "memory_bytes": need,
                                           "expected_frames": spec.expected_frames})
        log.info("scan accepted", extra={"scan_id": spec.scan_id, "memory_bytes": need})
        return session

    def _options_for(self, spec: ScanSpec) -> ReconOptions:
        try:
            return self.config.options.merged(spec.options)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ScanRefused(f"options.{where}", "recon_options", err["msg"]) from None

    def _reservation(self, spec: ScanSpec, options: ReconOptions) -> dict[str, int]:
        """Memory the scan needs, checked against the budgets before any frame is accepted."""
        per_engine = estimate_bytes(spec, options)
        engines = 3 if self.config.resolution_interval_s > 0 else 1  # main + two half sets
        total = per_engine * engines
        device = "device" if options.backend == "cupy" else "host"
        if device == "device":
            budget = self.config.device_memory_budget_bytes
            if budget is None:
                budget = free_device_bytes(get_xp("cupy")) or 0
        else:
            budget = self.config.host_memory_budget_bytes
        if total > budget:
            raise ScanRefused(
                "expected_frames",
                "memory_budget",
                f"the scan needs ≈{total / 2**20:.0f} MiB of {device} memory "
                f"({spec.expected_frames} frames of {spec.frame_shape[0]}×{spec.frame_shape[1]} "
                f"{spec.frame_dtype}, canvas {spec.field_px()} px) but the budget is {budget / 2**20:.0f} MiB",
            )
        return {device: total}

    def _register(self, session: Session, spool: SpoolWriter) -> None:
        self.sessions[session.scan_id] = session
        self.spools[session.scan_id] = spool
        self.waiting.append(session.scan_id)
        self._trim_history()

    def add_frames(self, session: Session, frames: np.ndarray, indices: np.ndarray, positions: np.ndarray,
                   arrived: float, detector: DetectorFrames | None = None) -> int:
        """Spool, then count, then hand to the worker. Returns the number of frames kept.
        ``detector``: the frames' compressed chunks from a detector source, spooled as they are."""
        with session.lock:  # summaries read the ledger from other threads
            keep = session.ledger.admit(indices)
        dup = int((~keep).sum())
        if dup:
            self.metrics.frames_dropped.labels(reason="duplicate").inc(dup)
        if not keep.any():
            return 0
        binned = raw = None
        if detector is not None:
            binned, raw = detector.binned, detector.raw
        if not keep.all():
            frames, indices, positions = frames[keep], indices[keep], positions[keep]
            binned, raw = (None if c is None else c.select(keep) for c in (binned, raw))
        self.spools[session.scan_id].append(frames, indices, positions, binned=binned, raw=raw)
        n = len(frames)
        self.metrics.frames_received.inc(n)
        self.metrics.last_frame.set(time.time())
        session.last_activity = time.monotonic()
        worker = self.running.get(session.scan_id)
        if worker is not None:
            worker.put(FrameBatch(frames, positions, arrived))
        return n

    def end_scan(self, session: Session, reason: str = "scan_end", frame_count: int | None = None) -> None:
        if session.ended:
            return
        session.ended = True
        session.end_count = frame_count
        if frame_count is not None and session.spec.expected_frames is None:
            session.ledger.expected = frame_count
        spool = self.spools.get(session.scan_id)
        if spool is not None:
            spool.set_status("ended")
        worker = self.running.get(session.scan_id)
        if worker is not None:
            self._close_spool(session.scan_id)
            worker.put(EndOfScan(reason))
        self.outbox.post("scan.ended", {"scan_id": session.scan_id, "reason": reason,
                                        "frames": session.ledger.as_dict()})

    def abort_scan(self, session: Session, reason: str) -> None:
        """Cancel a scan (producer abort or control `cancel`); its spool is kept, marked aborted."""
        worker = self.running.get(session.scan_id)
        if worker is not None:
            worker.put(Cancel(reason))
        elif session.transition(State.ABORTED, error=reason):
            self.outbox.post("scan.aborted", {"scan_id": session.scan_id, "reason": reason})
            self._settle(session)
        spool = self.spools.get(session.scan_id)
        if spool is not None:
            spool.set_status("aborted")
            self._close_spool(session.scan_id)

    def _close_spool(self, scan_id: str) -> None:
        spool = self.spools.pop(scan_id, None)
        if spool is not None:
            spool.close()

    # -- admission -----------------------------------------------------------------------------
    def reserved(self) -> dict[str, int]:
        out = {"host": 0, "device": 0}
        for scan_id in self.running:
            for dev, b in self.sessions[scan_id].reserved_bytes.items():
                out[dev] += b
        return out

    def admit(self) -> None:
        """Start workers for waiting scans while slots and memory allow (FIFO, no overtaking)."""
        while self.waiting and not self.stopping and len(self.running) < self.config.max_concurrent_scans:
            session = self.sessions[self.waiting[0]]
            if session.state.final:
                self.waiting.pop(0)
                continue
            used = self.reserved()
            budget = {"host": self.config.host_memory_budget_bytes,
                      "device": self.config.device_memory_budget_bytes or 1 << 62}
            if self.running and any(used[d] + b > budget[d] for d, b in session.reserved_bytes.items()):
                return  # wait for a running scan to free its memory
            self.waiting.pop(0)
            self._start_worker(session)
        self._update_gauges()

    def _start_worker(self, session: Session) -> None:
        options = self._options_for(session.spec)
        worker = ScanWorker(session, options, self.config, self.outbox, self.metrics,
                            finish=self.finish_result, on_exit=self.worker_exited)
        session.worker = worker
        session.started = True
        self.running[session.scan_id] = worker
        spool = self.spools[session.scan_id]
        if spool.count:  # frames spooled while the scan waited (or before a crash)
            frames, _, positions = spool.read()
            worker.put(FrameBatch(frames, positions))
        if session.ended:
            self._close_spool(session.scan_id)
            worker.put(EndOfScan("scan_end"))
        worker.start()
        self.outbox.post("scan.acquiring", {"scan_id": session.scan_id})
        log.info("worker started", extra={"scan_id": session.scan_id})

    # -- called from worker threads ------------------------------------------------------------
    def finish_result(self, session: Session, state: Any) -> None:
        """Write the result file (engine result + the spool's NXcxi raw part under /raw) and the
        phase exports (MRC, PNG); then retire the spool. Runs on the worker thread."""
        from .storage.result import export_phase, write_result

        stem = self.config.results_dir / file_stem(session.scan_id)
        path = stem.with_suffix(".h5")
        spool_file = spool_path(self.config.spool_dir, session.scan_id)
        extra: dict[str, Any] = {"scan_id": session.scan_id, "recovered": session.recovered,
                                 **{f"frames_{k}": v for k, v in session.ledger.as_dict().items()}}
        if session.figures.get("resolution_m") is not None:
            extra["resolution_m"] = float(session.figures["resolution_m"])

        def raw(group: h5py.Group) -> None:
            with h5py.File(spool_file, "r") as src:
                src.copy(src["entry_1"], group, "entry_1")
                src.copy(src["scan"], group, "scan")

        write_result(path, state, extra=extra, raw=raw)
        export_phase(state, stem)
        with h5py.File(spool_file, "r+") as f:
            f.attrs["status"] = "finished"
        if not self.config.keep_spool:
            spool_file.unlink()
        session.result_path = str(path)

    def worker_exited(self, session: Session) -> None:
        self._exited.put(session)
        self.outbox.wake()

    # -- housekeeping (manager thread) -----------------------------------------------------------
    def reap(self) -> None:
        """Settle scans whose workers have exited, then admit waiting ones."""
        changed = False
        while True:
            try:
                session = self._exited.get_nowait()
            except queue.Empty:
                break
            self.running.pop(session.scan_id, None)
            self._settle(session)
            changed = True
        if changed:
            self.admit()

    def _settle(self, session: Session) -> None:
        state = session.state
        if state.final:
            self.metrics.scans.labels(outcome=state.value).inc()
            spool = self.spools.pop(session.scan_id, None)
            if spool is not None:
                spool.set_status(state.value)
                spool.close()
            elif state is not State.FINISHED:  # the worker held the spool: mark it (finished ones are retired)
                self._mark_spool(session.scan_id, state.value)
        # a non-final session here was interrupted by shutdown: its spool stays open for recovery
        self._update_gauges()

    def _mark_spool(self, scan_id: str, status: str) -> None:
        path = spool_path(self.config.spool_dir, scan_id)
        if path.exists():
            with h5py.File(path, "r+") as f:
                f.attrs["status"] = status

    def check_timeouts(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if session.state.final or session.ended:
                continue
            limit = self.config.recover_wait_s if session.recovered else self.config.acquisition_timeout_s
            if now - session.last_activity > limit:
                log.warning("no frames for %.0f s: ending scan with what it has", limit,
                            extra={"scan_id": session.scan_id})
                self.end_scan(session, reason="acquisition_timeout")

    def queued_frames(self) -> int:
        return sum(w.queued_frames for w in self.running.values())

    def backpressure(self) -> bool:
        """True while any worker's queue is over capacity: the manager stops reading ingest."""
        return any(w.queued_frames > self.config.queue_capacity_frames for w in self.running.values())

    def _update_gauges(self) -> None:
        counts = {s: 0 for s in State}
        for session in self.sessions.values():
            counts[session.state] += 1
        for state, n in counts.items():
            self.metrics.scans_in_state.labels(state=state.value).set(n)
        for dev, b in self.reserved().items():
            self.metrics.memory_reserved.labels(device=dev).set(b)
        self.metrics.queue_depth.set(self.queued_frames())

    def _trim_history(self) -> None:
        while len(self.sessions) > HISTORY:
            oldest = next((k for k, s in self.sessions.items() if s.state.final), None)
            if oldest is None:
                return
            del self.sessions[oldest]

    # -- recovery and shutdown ---------------------------------------------------------------
    def recover(self) -> list[str]:
        """Re-open the unfinished scans of the spool directory (after a crash or a drain)."""
        recovered = []
        for path in unfinished_spools(self.config.spool_dir):
            try:
                contents = read_spool(path, frames=False)
                spec = contents.spec
                if spec.scan_id in self.sessions:
                    continue
                options = self._options_for(spec)
                need = self._reservation(spec, options)
                spool = SpoolWriter.reopen(path, fsync=self.config.spool_fsync)
            except (OSError, ValueError, KeyError) as exc:
                log.error("cannot recover spool %s: %s", path, exc)
                self.outbox.post("error", {"field": "spool", "rule": "recoverable_spool",
                                           "message": f"{path}: {exc}", "scan_id": None})
                continue
            session = Session(spec, need, recovered=True)
            session.ledger.admit(contents.indices)
            session.ended = contents.status == "ended"
            self._register(session, spool)
            recovered.append(spec.scan_id)
            log.info("recovered scan from spool (%d frames, %s)", spool.count, contents.status,
                     extra={"scan_id": spec.scan_id})
            self.outbox.post("scan.accepted", {"scan_id": spec.scan_id, "recovered": True,
                                               "expected_frames": spec.expected_frames,
                                               "frames": session.ledger.as_dict()})
        self.admit()
        return recovered

    def interrupt(self, ended_too: bool) -> None:
        """Shutdown: stop workers without a final state (their scans stay in the spool and are
        recovered at the next start). Scans whose scan_end arrived are left to finish unless
        ``ended_too``."""
        self.stopping = True
        for worker in self.running.values():
            if ended_too or not worker.session.ended:
                worker.put(Interrupt())

    def close(self) -> None:
        for scan_id in list(self.spools):
            self._close_spool(scan_id)
