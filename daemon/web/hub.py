"""The viewer's model of the daemon: one subscriber thread, per-scan state, latest-only fan-out.

The hub subscribes to the daemon's publish socket like any other subscriber (so it can never slow
the reconstruction: PUB drops for slow subscribers), encodes each preview once, and hands every
browser a :class:`ClientSlot`. A slot keeps only the newest preview and metrics per scan, so a
browser that falls behind skips stale images, while scan events, results and errors are queued
in order (bounded).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import ControlError, ControlTimeout
from cryoptycho.protocols.messages import ErrorEvent, Metrics, Preview, Result, ScanEvent
from cryoptycho.protocols.security import ClientCurve
from cryoptycho.protocols.subscriber import EventsDropped, Subscriber

from . import images

log = logging.getLogger(__name__)

#: Loss points kept per scan for the convergence curve.
LOSS_HISTORY = 2000
#: Ordered (non-conflatable) messages a slow browser may have pending before the oldest go.
MAX_ORDERED_PENDING = 500
#: Ended scans the viewer remembers (as many as the daemon's list_scans: daemon/scans.HISTORY).
ENDED_SCANS_KEPT = 256
#: Ended scans whose final images the viewer keeps and sends to a newly opened page (the
#: daemon keeps as many previews: daemon/scans.FINAL_PREVIEWS); older ones keep their files.
ENDED_PREVIEWS_KEPT = 8
ENDED = ("finished", "failed", "aborted")


@dataclass
class ScanView:
    scan_id: str
    state: str = "announced"
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    preview: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    loss: deque = field(default_factory=lambda: deque(maxlen=LOSS_HISTORY))
    files: dict[str, str] = field(default_factory=dict)  #: kind → path announced by the daemon

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": "scan",
            "scan_id": self.scan_id,
            "state": self.state,
            "reason": self.reason,
            "summary": self.summary,
            "files": sorted(self.files),
        }


class ClientSlot:
    """What one browser has yet to receive. ``put`` may be called from any thread through
    ``loop.call_soon_threadsafe``; ``take`` runs on the browser's event loop."""

    def __init__(self) -> None:
        self._latest: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._ordered: deque[dict[str, Any]] = deque(maxlen=MAX_ORDERED_PENDING)
        self._ready = asyncio.Event()
        self.skipped = 0  #: stale previews/metrics this browser never saw

    def put(self, message: dict[str, Any]) -> None:
        kind = message.get("kind", "")
        if kind in ("preview", "metrics"):
            key = (kind, str(message.get("scan_id")))
            if key in self._latest:
                self.skipped += 1
                del self._latest[key]
            self._latest[key] = message
        else:
            self._ordered.append(message)
        self._ready.set()

    async def take(self) -> list[dict[str, Any]]:
        await self._ready.wait()
        self._ready.clear()
        out = list(self._ordered)
        self._ordered.clear()
        out.extend(self._latest.values())
        self._latest.clear()
        return out


class Hub:
    """Daemon state as the browsers see it."""

    def __init__(
        self,
        publish_endpoint: str,
        control_endpoint: str,
        *,
        max_side: int = images.DEFAULT_MAX_SIDE,
        control_timeout_s: float = 2.0,
        poll_s: float = 2.0,
        curve: ClientCurve | None = None,
    ) -> None:
        self.publish_endpoint = publish_endpoint
        self.control_endpoint = control_endpoint
        self.curve = curve  #: this viewer's CURVE keys, for a daemon whose sockets require them
        self.max_side = max_side
        self.control_timeout_s = control_timeout_s
        self.scans: dict[str, ScanView] = {}
        #: ended scans in the order they ended (``scans`` is in the order first seen: a long
        #: scan run beside short ones ends after scans seen after it)
        self._ended: dict[str, None] = {}
        self.last_error: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._clients: dict[ClientSlot, asyncio.AbstractEventLoop] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poller: threading.Thread | None = None
        self.poll_s = poll_s
        self.failure: BaseException | None = None  #: why the subscriber thread died, if it did

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="viewer-subscriber", daemon=True)
        self._thread.start()
        self._poller = threading.Thread(target=self._poll, name="viewer-control-poll", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._poller):
            if thread is not None:
                thread.join(timeout=5)

    def _poll(self) -> None:
        """While browsers watch a running scan, read the daemon's scan summaries every
        ``poll_s``: they say what the published metrics cannot (a half-set estimate that
        resolved nothing is +∞ there, and the wire carries finite values only)."""
        try:
            while not self._stop.wait(self.poll_s):
                with self._lock:
                    watched = bool(self._clients) and any(
                        v.state in ("acquiring", "refining") for v in self.scans.values())
                if watched:
                    self.poll_once()
        except BaseException as exc:  # surfaced through /healthz and the log, never swallowed
            self.failure = exc
            log.exception("viewer control-poll thread died")
            raise

    def poll_once(self) -> None:
        """One read of ``list_scans``; an unreachable daemon is skipped (the subscriber still
        shows what is published)."""
        try:
            with ControlClient(self.control_endpoint, timeout_s=self.control_timeout_s, retries=1,
                               curve=self.curve) as ctl:
                summaries = ctl.list_scans()
        except (ControlError, ControlTimeout, zmq.ZMQError) as exc:
            log.debug("control poll failed: %s", exc)
            return
        for summary in summaries:
            with self._lock:
                view = self.scans.get(str(summary.get("scan_id")))
            if view is None or view.metrics is None or view.metrics.get("resolution_m") is not None:
                continue
            note = _resolution(summary.get("resolution_m"))["resolution_note"]
            if note != view.metrics.get("resolution_note"):
                view.metrics = view.metrics | {"resolution_note": note}
                self._broadcast(view.metrics | {"loss_point": list(view.loss)[-1:] if view.loss else []})

    def _run(self) -> None:
        try:
            with Subscriber(self.publish_endpoint, latest_only=True, skip_invalid=True, curve=self.curve) as sub:
                while not self._stop.is_set():
                    try:
                        event = sub.recv(timeout_s=0.2)
                    except EventsDropped as exc:  # logged, not fatal: the viewer goes on with newer events
                        log.warning("viewer subscriber: %s", exc)
                        continue
                    if event is not None:
                        self.apply(event)
        except BaseException as exc:  # surfaced through /healthz and the log, never swallowed
            self.failure = exc
            log.exception("viewer subscriber thread died")
            raise

    # --- clients ----------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> ClientSlot:
        slot = ClientSlot()
        with self._lock:
            self._clients[slot] = loop
        return slot

    def detach(self, slot: ClientSlot) -> None:
        with self._lock:
            self._clients.pop(slot, None)

    def _broadcast(self, message: dict[str, Any]) -> None:
        with self._lock:
            clients = list(self._clients.items())
        for slot, loop in clients:
            try:
                loop.call_soon_threadsafe(slot.put, message)
            except RuntimeError:  # that browser's loop has closed; it is detaching
                self.detach(slot)

    def _trim(self) -> None:
        """Forget the oldest ended scans and their images. A viewer left open for months kept
        every scan it had seen, with its images: its memory, and what each newly opened page
        downloads first, grew with every scan."""
        with self._lock:
            for sid, view in self.scans.items():  # ended as catch_up found them: in list order
                if view.state in ENDED:
                    self._ended.setdefault(sid)
            ended = [sid for sid in self._ended if sid in self.scans and self.scans[sid].state in ENDED]
            self._ended = dict.fromkeys(ended)
            for sid in ended[:-ENDED_SCANS_KEPT]:
                del self.scans[sid]
            for sid in ended[-ENDED_SCANS_KEPT:-ENDED_PREVIEWS_KEPT]:
                self.scans[sid].preview = None

    def state_messages(self) -> list[dict[str, Any]]:
        """Everything a newly connected browser needs, oldest scans first."""
        with self._lock:
            views = list(self.scans.values())
        out: list[dict[str, Any]] = []
        for view in views:
            out.append(view.as_json())
            if view.metrics is not None:
                # the scan's own state: the last metrics may predate its final event
                out.append(view.metrics | {"loss_history": list(view.loss), "state": view.state})
            if view.preview is not None:
                out.append(view.preview)
        return out

    # --- the daemon's side ------------------------------------------------------------------
    def _view(self, scan_id: str) -> ScanView:
        with self._lock:
            view = self.scans.get(scan_id)
            if view is None:
                view = self.scans[scan_id] = ScanView(scan_id)
            return view

    def apply(self, event: Any) -> None:
        """Fold one published event into the state and push it to the browsers."""
        if isinstance(event, Preview):
            message = self._preview_message(
                event.scan_id, event.iteration, event.frames_used, event.pixel_size_m,
                event.object_phase, event.object_amplitude, event.probe, event.coverage,
            )
            # the daemon's publish time lets a page (and `bench view`) measure publish → drawn
            message["published_s"] = event.time_s
            self._view(event.scan_id).preview = message
            self._broadcast(message)
        elif isinstance(event, Metrics):
            view = self._view(event.scan_id)
            if event.loss is not None and np.isfinite(event.loss):
                view.loss.append((int(event.iteration), float(event.loss), int(event.frames_used)))
            message = {
                "kind": "metrics",
                "scan_id": event.scan_id,
                "frames_received": event.frames_received,
                "frames_used": event.frames_used,
                "frames_dropped": event.frames_dropped,
                "iteration": event.iteration,
                "loss": _finite(event.loss),
                **_resolution(event.resolution_m),
                "latency_s": event.latency_s,
                "state": event.state,
            }
            if message["resolution_m"] is None and view.metrics is not None:
                # the wire has no ∞: "not resolved" comes from the control poll and stays
                message["resolution_note"] = view.metrics.get("resolution_note")
            if event.state:
                view.state = event.state
            view.metrics = message
            self._broadcast(message | {"loss_point": list(view.loss)[-1:] if view.loss else []})
        elif isinstance(event, ScanEvent):
            view = self._view(event.scan_id)
            view.state, view.reason = event.event, event.reason
            view.summary.update({k: v for k, v in event.info.items() if np.isscalar(v)})
            self._broadcast(view.as_json())
            if view.state in ENDED:
                with self._lock:
                    self._ended.pop(event.scan_id, None)
                    self._ended[event.scan_id] = None  # ended now: the newest
                self._trim()
        elif isinstance(event, Result):
            view = self._view(event.scan_id)
            view.files = {k: str(v) for k, v in event.files.items()}
            view.state = "finished"
            message = self._preview_message(
                event.scan_id, event.iterations, None, event.pixel_size_m,
                images.specimen_phase(np.asarray(event.object)), np.abs(event.object),
                event.probe, None, final=True,
            )
            view.preview = message
            self._broadcast(view.as_json())
            self._broadcast(message)
            self._trim()
        elif isinstance(event, ErrorEvent):
            self.last_error = {"kind": "error", "scan_id": event.scan_id, "field": event.field,
                               "rule": event.rule, "message": event.message}
            self._broadcast(self.last_error)

    def refresh_from_control(self) -> str | None:
        """Pull the daemon's current scans and latest images through the control socket (for
        late joiners). Returns None on success, else a message saying why it could not."""
        try:
            with ControlClient(self.control_endpoint, timeout_s=self.control_timeout_s, retries=1,
                               curve=self.curve) as ctl:
                scans = ctl.list_scans()
                # images from result files only for the ended scans whose images _trim keeps
                newest = [summary for summary in scans if summary.get("state") in ENDED][-ENDED_PREVIEWS_KEPT:]
                imaged = {str(summary["scan_id"]) for summary in newest if summary.get("state") == "finished"}
                for summary in scans:
                    sid = str(summary["scan_id"])
                    view = self._view(sid)
                    view.summary = {k: v for k, v in summary.items()
                                    if (np.isscalar(v) and _json_safe(v)) or v is None}
                    view.state = str(summary.get("state", view.state))
                    if view.metrics is None:
                        view.metrics = _metrics_from_summary(sid, summary)
                    if sid in imaged and not (view.preview or {}).get("final"):
                        self._load_result(view, summary.get("result_path"))
                    elif view.preview is None and view.state not in ("finished", "failed", "aborted"):
                        snap = ctl.snapshot(sid)
                        if "object" in snap:
                            obj = np.asarray(snap["object"])
                            view.preview = self._preview_message(
                                sid, int(snap.get("iteration", 0)), None,
                                float(snap["pixel_size_m"]), images.specimen_phase(obj), np.abs(obj),
                                np.asarray(snap["probe"]), np.asarray(snap.get("coverage")),
                            )
        except (ControlError, ControlTimeout, zmq.ZMQError) as exc:
            # the daemon may be down or the scan gone; the page says so and keeps updating
            return f"control socket {self.control_endpoint} unavailable: {exc}"
        finally:
            self._trim()
        return None

    def _load_result(self, view: ScanView, path: Any) -> None:
        """A finished scan's images from its result file (a viewer opened after the scan ended
        has seen no live message). A file this host cannot read is said in the scan's reason."""
        if not path:
            return
        from cryoptycho.daemon.storage.result import read_result

        try:
            state = read_result(path).state
        except (OSError, ValueError, KeyError) as exc:
            view.reason = f"result {path} not readable here: {exc}"
            log.warning("result file of %s not readable: %s", view.scan_id, exc)
            return
        obj = np.asarray(state.object)
        view.files = {"result": str(path)}
        view.preview = self._preview_message(
            view.scan_id, int(state.iteration), int(state.frames_used), float(state.geometry.pixel_size),
            images.specimen_phase(obj), np.abs(obj), np.asarray(state.probe), None, final=True,
        )

    def _preview_message(
        self, scan_id: str, iteration: int, frames_used: int | None, pixel_size_m: float,
        phase: Any, amplitude: Any, probe: Any, coverage: Any, final: bool = False,
    ) -> dict[str, Any]:
        probe = np.asarray(probe)
        if probe.ndim == 3:  # probe modes: show the strongest
            probe = probe[int(np.argmax((np.abs(probe) ** 2).sum(axis=(1, 2))))]
        phase_img = images.encode(np.asarray(phase), self.max_side)
        message: dict[str, Any] = {
            "kind": "preview",
            "scan_id": scan_id,
            "iteration": int(iteration),
            "frames_used": frames_used,
            "pixel_size_m": float(pixel_size_m) * phase_img.scale,
            "final": final,
            "time_s": time.time(),
            "phase": phase_img.as_json(),
            "probe_amplitude": images.encode(np.abs(probe), self.max_side).as_json(),
            "probe_phase": images.encode(np.angle(probe), self.max_side, (-np.pi, np.pi)).as_json(),
        }
        if amplitude is not None:
            message["amplitude"] = images.encode(np.asarray(amplitude), self.max_side).as_json()
        if coverage is not None and np.ndim(coverage) == 2:
            cov = np.asarray(coverage, dtype=np.float64)
            top = float(cov.max()) if cov.size else 0.0
            message["coverage"] = images.encode(cov, self.max_side, (0.0, top or 1.0)).as_json()
        return message

    def file_for(self, scan_id: str, kind: str) -> Path | None:
        """A result file the daemon announced for this scan (never any other path)."""
        with self._lock:
            view = self.scans.get(scan_id)
            path = view.files.get(kind) if view else None
        return Path(path) if path else None


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _json_safe(value: Any) -> bool:
    return not (isinstance(value, float | np.floating) and not np.isfinite(value))


def _resolution(value: Any) -> dict[str, Any]:
    """The half-set estimate for the page: metres, or ``+inf`` — the FRC was below threshold at
    its first ring, nothing is resolved yet — which the page says in words (JSON has no ∞)."""
    if value is not None and np.isinf(value) and value > 0:
        return {"resolution_m": None, "resolution_note": "not resolved"}
    return {"resolution_m": _finite(value), "resolution_note": None}


def _metrics_from_summary(scan_id: str, summary: dict[str, Any]) -> dict[str, Any]:
    """A metrics message from a control ``list_scans`` summary, for scans that ended before
    this viewer subscribed."""
    frames = summary.get("frames") or {}
    return {
        "kind": "metrics",
        "scan_id": scan_id,
        "frames_received": frames.get("received"),
        "frames_used": summary.get("frames_used"),
        "frames_dropped": frames.get("duplicates"),
        "iteration": summary.get("iteration"),
        "loss": _finite(summary.get("loss")),
        **_resolution(summary.get("resolution_m")),
        "latency_s": _finite(summary.get("latency_s")),
        "state": str(summary.get("state", "")),
    }
