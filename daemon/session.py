"""One scan's session: its state machine and its frame ledger (its description, ScanSpec, is scan.py's).

States: announced → acquiring → refining → finished, or aborted / failed from any live state.
The manager thread owns every Session; workers report through their queues and the Session's
``lock``-protected fields (state, figures) that the control handlers read.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from enum import Enum
from typing import Any

import numpy as np

from .scan import ScanSpec


class State(str, Enum):
    ANNOUNCED = "announced"
    ACQUIRING = "acquiring"
    REFINING = "refining"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (State.FINISHED, State.ABORTED, State.FAILED)


STATES = tuple(s.value for s in State)
OUTCOMES = ("finished", "aborted", "failed", "refused")
#: why a frame that arrived was not used; the metric label values
DROP_REASONS = ("duplicate", "invalid", "unknown_scan", "scan_closed")

#: frames whose preview latency `status` summarises (p50/p95)
LATENCY_WINDOW = 20000

_ALLOWED = {
    State.ANNOUNCED: {State.ACQUIRING, State.REFINING, State.ABORTED, State.FAILED},
    State.ACQUIRING: {State.REFINING, State.ABORTED, State.FAILED},
    State.REFINING: {State.FINISHED, State.ABORTED, State.FAILED},
}


class TransitionError(RuntimeError):
    pass


class FrameLedger:
    """Which frame indices have arrived: detects duplicates, reordering and (at the end) gaps.

    ``received`` counts frames once they are durable (:meth:`stored`, called after the spool
    write), not when :meth:`admit` lets them in: a status or receipt never reports a frame a
    crash could still lose."""

    def __init__(self, expected: int | None = None) -> None:
        self._seen = np.zeros(max(expected or 0, 1024), dtype=bool)
        self.expected = expected
        self.received = 0
        self.duplicates = 0
        self.reordered = 0
        self.highest = -1

    def admit(self, indices: np.ndarray) -> np.ndarray:
        """Boolean mask of the indices to keep (first arrival); updates the counters."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and idx.min() < 0:
            raise ValueError("frame indices must be non-negative")
        top = int(idx.max()) + 1 if idx.size else 0
        if top > self._seen.size:
            grown = np.zeros(max(top, 2 * self._seen.size), dtype=bool)
            grown[: self._seen.size] = self._seen
            self._seen = grown
        keep = ~self._seen[idx]
        # duplicates inside this very batch: keep the first occurrence only
        _, first = np.unique(idx, return_index=True)
        unique_mask = np.zeros(idx.size, dtype=bool)
        unique_mask[first] = True
        keep &= unique_mask
        self.duplicates += int(idx.size - keep.sum())
        kept = idx[keep]
        self._seen[kept] = True
        # a kept index below the highest seen so far arrived out of order
        running = np.maximum.accumulate(np.concatenate([[self.highest], kept]))[:-1]
        self.reordered += int((kept < running).sum())
        if kept.size:
            self.highest = max(self.highest, int(kept.max()))
        return keep

    def seen(self) -> np.ndarray:
        """The indices admitted so far (sorted, int64)."""
        return np.flatnonzero(self._seen).astype(np.int64)

    def stored(self, n: int) -> None:
        """``n`` admitted frames are on disk: they count as received."""
        self.received += int(n)

    def unstored(self, indices: np.ndarray) -> None:
        """Admitted frames whose spool write failed: not held, so :meth:`missing` and
        :attr:`gaps` count them again (a receipt listed only the indices never sent, and its
        sender would resend those, not the frames the full disk lost)."""
        self._seen[np.asarray(indices, dtype=np.int64)] = False

    @property
    def admitted(self) -> int:
        """Frames let in so far (:meth:`admit`): those on disk and those on their way there."""
        return int(self._seen.sum())

    @property
    def gaps(self) -> int:
        """Indices below the expected count (or the highest seen) that never arrived."""
        top = self.expected if self.expected is not None else self.highest + 1
        return int(top - self._seen[:top].sum()) if top > 0 else 0

    def missing(self, limit: int = 100) -> list[int]:
        top = self.expected if self.expected is not None else self.highest + 1
        return [int(i) for i in np.flatnonzero(~self._seen[:top])[:limit]]

    def as_dict(self) -> dict[str, int]:
        return {
            "received": self.received,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "gaps": self.gaps,
            "highest_index": self.highest,
        }


class Session:
    """A scan's live record. Mutations of ``state`` go through :meth:`transition`."""

    def __init__(self, spec: ScanSpec, reserved_bytes: dict[str, int], recovered: bool = False) -> None:
        self.spec = spec
        self.scan_id = spec.scan_id
        self.reserved_bytes = reserved_bytes
        self.recovered = recovered
        self.lock = threading.Lock()
        self.state = State.ANNOUNCED
        self.ledger = FrameLedger(spec.expected_frames)
        self.created = time.time()
        self.last_activity = time.monotonic()
        self.ended = False  #: scan_end received (or implied)
        self.end_count: int | None = None
        self.end_reason: str | None = None  #: why it ended ("scan_end", "acquisition_timeout", …) or is stopping
        self.started = False  #: a worker has been given this scan
        self.error: str | None = None
        self.result_path: str | None = None
        self.figures: dict[str, Any] = {}  #: latest engine figures (iteration, loss, resolution, …)
        #: frame-to-preview latencies (s) of the most recent frames, one entry per frame
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        #: their percentiles, computed by the worker that records them: `list_scans` summarises
        #: up to 256 sessions on the manager thread, where computing them took 15-25 ms of CPU
        self._latency_figures: dict[str, float | None] = {"latency_p50_s": None, "latency_p95_s": None}
        self.worker: Any = None
        #: a streamed scan's positions so far ((y, x) minimum, maximum) and the span (m) its
        #: memory budget was last checked for (ScanManager.check_streamed_field)
        self.streamed_extent: tuple[np.ndarray, np.ndarray] | None = None
        self.streamed_room: np.ndarray | None = None
        #: frames of this scan the daemon refused (invalid messages), and the last reason
        self.frames_refused = 0
        self.last_refusal: str | None = None
        #: scan_start messages of this scan id refused while the daemon held this scan: a second
        #: sender using the same id, whose frames the daemon cannot tell from the first's
        self.starts_refused = 0
        #: the accepted scan_start's time_s as its sender stamped it (None for a recovered scan):
        #: a producer tells its own scan from another sender's of the same id by it
        self.start_time_s: float | None = None
        #: the final status its spool was closed with (a cancel's close, on the spool thread), read
        #: by the mark after its worker exits (ScanManager._mark_spool, on the closer thread after
        #: that close), which then leaves the file alone: a receipt said it was closed so
        self.spool_status: str | None = None

    def completeness(self) -> dict[str, Any]:
        """What a result says of how much of the declared scan it holds: frames received (distinct
        indices), declared (``expected_frames``, when declared), ``partial`` (fewer than declared:
        a scan stopped early, or a partial one an operator reconstructed with ``finish_scan``),
        and why it ended. A subscriber must not take a partial result for the whole scan."""
        out: dict[str, Any] = {"frames_received": self.ledger.received}
        if self.spec.expected_frames is not None:
            out["frames_expected"] = int(self.spec.expected_frames)
            out["partial"] = self.ledger.received < self.spec.expected_frames
        if self.end_reason is not None:
            out["end_reason"] = self.end_reason
        return out

    def transition(self, new: State, error: str | None = None) -> bool:
        """Move to ``new``; False (and no change) if the session is already final."""
        with self.lock:
            if self.state.final:
                return False
            if new not in _ALLOWED[self.state]:
                raise TransitionError(f"scan {self.scan_id}: cannot go from {self.state.value} to {new.value}")
            self.state = new
            if error is not None:
                self.error = error
            return True

    def refused(self, frames: int, reason: str) -> None:
        """Count ``frames`` refused by the checks, for the receipt (PROTOCOL.md § 4.5)."""
        with self.lock:
            self.frames_refused += frames
            self.last_refusal = reason

    def start_refused(self) -> None:
        """Count a repeated scan_start of this scan's id, for the receipt (PROTOCOL.md § 4.5)."""
        with self.lock:
            self.starts_refused += 1

    def update_figures(self, **values: Any) -> None:
        with self.lock:
            self.figures.update(values)

    def record_latency(self, seconds: float, frames: int) -> None:
        with self.lock:
            self.latencies.extend([seconds] * frames)
            lat = np.fromiter(self.latencies, float, len(self.latencies))
        if lat.size:
            p50, p95 = np.percentile(lat, [50, 95])
            with self.lock:
                self._latency_figures = {"latency_p50_s": float(p50), "latency_p95_s": float(p95)}

    def latency_percentiles(self) -> dict[str, float | None]:
        with self.lock:
            return dict(self._latency_figures)

    def summary(self) -> dict[str, Any]:
        latency = self.latency_percentiles()
        with self.lock:
            return {
                **latency,
                "scan_id": self.scan_id,
                "state": self.state.value,
                "frames": self.ledger.as_dict(),
                "expected_frames": self.spec.expected_frames,
                "ended": self.ended,
                "end_reason": self.end_reason,
                "recovered": self.recovered,
                "error": self.error,
                "result_path": self.result_path,
                "created": self.created,
                **{k: v for k, v in self.figures.items() if np.isscalar(v) or v is None},
            }
