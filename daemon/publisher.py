"""The hand-over from worker threads to the PUB socket, which only the manager thread touches.

ZeroMQ sockets are not thread-safe, so workers never send: they :meth:`Outbox.post` events and
:meth:`Outbox.offer` previews/metrics, and wake the manager's poller through a socketpair. Previews
and metrics are *latest-only* per (scan, topic): a preview that was not yet sent when a newer one
arrives is replaced, so a slow publisher path never builds a backlog of stale images. Events and
results are never dropped (FIFO). Slow *subscribers* are handled by ZeroMQ itself: the PUB socket
drops messages for a subscriber whose queue (SNDHWM) is full, so ingest never waits for viewers.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

import numpy as np
from cryoptycho.protocols.message_types import ErrorEvent, Metrics, Preview, Result, ScanEvent

if TYPE_CHECKING:
    from cryoptycho.gpu.state import ReconState

#: (topic, payload): a typed message (previews, results) or a dict the manager converts
Post = tuple[str, Any]


class Outbox:
    """Thread-safe outbox with a wake-up file descriptor for a zmq Poller."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # every post and offer is numbered: what is taken goes out in that order, so that a
        # scan's last metrics or preview (state "refining") never follows its "finished"
        self._seq = 0
        self._fifo: deque[tuple[int, Post]] = deque()
        self._latest: OrderedDict[tuple[str, str], tuple[int, Post]] = OrderedDict()
        self._rx, self._tx = socket.socketpair()
        self._rx.setblocking(False)
        self._tx.setblocking(False)
        self.replaced = 0  #: latest-only posts superseded before they were sent
        self._closed = False

    @property
    def fd(self) -> int:
        """Readable when something was posted; register it with ``zmq.Poller``."""
        return self._rx.fileno()

    def post(self, topic: str, payload: Any) -> None:
        """Queue an event or result; delivered in order, never dropped."""
        with self._lock:
            self._seq += 1
            self._fifo.append((self._seq, (topic, payload)))
        self.wake()

    def offer(self, scan_id: str, topic: str, payload: Any) -> None:
        """Offer the latest preview/metrics of a scan; replaces an unsent one of the same topic."""
        key = (scan_id, topic)
        with self._lock:
            if key in self._latest:
                self.replaced += 1
                del self._latest[key]
            self._seq += 1
            self._latest[key] = (self._seq, (topic, payload))
        self.wake()

    def take(self) -> list[Post]:
        """Everything pending, in the order it was posted or offered (a replaced offer counts
        as made when its replacement was)."""
        try:
            while self._rx.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            out = sorted([*self._fifo, *self._latest.values()], key=lambda item: item[0])
            self._fifo.clear()
            self._latest.clear()
        return [post for _, post in out]

    def wake(self) -> None:
        """Wake the manager's poller (used by workers that exit). After :meth:`close` there is
        nobody to wake: a worker that outlived the shutdown's join exits later (a busy host), and
        its wake found a closed socket (EBADF in the worker thread) or, worse, a reused fd."""
        with self._lock:
            if self._closed:
                return
            try:
                self._tx.send(b"\0")
            except BlockingIOError:
                pass  # the pipe is full, so the manager is already due to wake up

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._rx.close()
            self._tx.close()


def preview_message(scan_id: str, state: ReconState, frames_used: int, coverage: Any) -> Preview:
    """The typed preview of an engine snapshot. Called on the worker thread: the phase and
    amplitude of the whole canvas (tens of MB for a 2k × 2k canvas) are computed there, never on
    the manager thread that owns the sockets."""
    obj = np.asarray(state.object)
    return Preview(
        scan_id=scan_id, iteration=int(state.iteration), frames_used=int(frames_used),
        pixel_size_m=float(state.geometry.pixel_size), origin_m=_origin(state),
        object_phase=np.angle(obj).astype(np.float32), probe=np.asarray(state.probe, np.complex64),
        object_amplitude=np.abs(obj).astype(np.float32),
        coverage=None if coverage is None else np.asarray(coverage, np.float32), time_s=time.time(),
    )


def result_message(scan_id: str, state: ReconState, positions_m: Any, files: dict[str, str],
                   loss: float | None, resolution_m: float | None) -> Result:
    """The typed final result of a scan (worker thread); ``files`` lists every file written."""
    return Result(
        scan_id=scan_id, iterations=int(state.iteration), pixel_size_m=float(state.geometry.pixel_size),
        origin_m=_origin(state), object=np.asarray(state.object, np.complex64),
        probe=np.asarray(state.probe, np.complex64), positions_m=np.asarray(positions_m, np.float64),
        loss=_finite(loss), files={str(k): str(v) for k, v in files.items()},
        metadata={"resolution_m": _finite(resolution_m)}, time_s=time.time(),
    )


def _origin(state: ReconState) -> tuple[float, float]:
    oy, ox = state.geometry.origin
    return float(oy), float(ox)


def to_message(topic: str, payload: Any) -> Any:
    """The wire message for an outbox post: previews and results are posted as typed messages
    (built on the worker thread); events, metrics and errors as dicts, converted here."""
    if not isinstance(payload, dict):
        return payload
    p = payload
    if topic == "metrics":
        frames = p.get("frames", {})
        res = p.get("resolution_m")
        return Metrics(
            scan_id=p["scan_id"], frames_received=int(frames.get("received", 0)),
            frames_used=int(p.get("frames_used") or 0), frames_dropped=int(frames.get("duplicates", 0)),
            iteration=int(p.get("iteration") or 0), loss=_finite(p.get("loss")),
            resolution_m=res if res is not None and np.isfinite(res) and res > 0 else None,
            latency_s=_finite(p.get("latency_s")), state=str(p.get("state", "")), time_s=time.time(),
        )
    if topic == "error":
        return ErrorEvent(field=p["field"], rule=p["rule"], message=p["message"],
                          scan_id=p.get("scan_id"), time_s=time.time())
    if topic.startswith("scan."):
        info = {k: v for k, v in p.items() if k not in ("scan_id", "reason")}
        return ScanEvent(scan_id=p["scan_id"], event=topic[5:], reason=str(p.get("reason", "")),
                         info=_jsonable(info), time_s=time.time())
    raise ValueError(f"no wire message for outbox topic {topic!r} (previews and results are posted typed)")


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class ErrorThrottle:
    """Rate limit of published ``error`` events, so that a flood of bad messages cannot overrun
    the subscribers' queues (PUB drops what does not fit, silently for both sides).

    Within each ``window_s`` the first ``burst`` errors are published one by one; the rest are
    counted by rule and published as ONE error event (field ``message``, rule ``suppressed``)
    whose message starts with their number. Every error is therefore accounted for on the
    publish socket: the individual events plus the numbers of the ``suppressed`` events equal
    the errors (and the ``messages_rejected`` counter).
    """

    def __init__(self, burst: int = 20, window_s: float = 1.0) -> None:
        self.burst = burst
        self.window_s = window_s
        self._window_start = -float("inf")
        self._sent = 0
        self._suppressed: dict[str, int] = {}
        self._scans: set[str] = set()
        self._lock = threading.Lock()  # the manager and the DECTRIS bridge thread report errors

    def admit(self, rule: str, scan_id: str | None, now: float) -> bool:
        """True: publish this error now; False: it was counted into the next summary."""
        with self._lock:
            return self._admit(rule, scan_id, now)

    def _admit(self, rule: str, scan_id: str | None, now: float) -> bool:
        if now - self._window_start >= self.window_s and not self._suppressed:
            self._window_start, self._sent = now, 0
        if self._sent < self.burst:
            self._sent += 1
            return True
        self._suppressed[rule] = self._suppressed.get(rule, 0) + 1
        if scan_id is not None and len(self._scans) < 8:
            self._scans.add(scan_id)
        return False

    def summary(self, now: float) -> dict[str, Any] | None:
        """The ``suppressed`` error event once the window is over (None when there is none yet);
        a new window starts with it."""
        with self._lock:
            return self._summary(now)

    def _summary(self, now: float) -> dict[str, Any] | None:
        if not self._suppressed or now - self._window_start < self.window_s:
            return None
        n = sum(self._suppressed.values())
        rules = ", ".join(f"{rule} {k}" for rule, k in sorted(self._suppressed.items(), key=lambda x: -x[1]))
        scans = f"; scans {', '.join(sorted(self._scans))}" if self._scans else ""
        message = (f"{n} more errors in {now - self._window_start:.1f} s were not published one by one "
                   f"(by rule: {rules}{scans})")
        self._suppressed.clear()
        self._scans.clear()
        self._window_start, self._sent = now, 0
        return {"field": "message", "rule": "suppressed", "message": message, "scan_id": None}
