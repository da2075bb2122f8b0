"""The manager: one thread that owns every socket (ingest PULL, publish PUB, control ROUTER).

It polls the sockets, the workers' outbox and a stop pipe with one ``zmq.Poller``; it decodes and
validates ingest messages, spools frames (they count as received only once on disk), hands them
to the scan's worker, answers control requests and publishes what workers post. It never runs
engine code, so it stays responsive while scans compute (see worker.py for why threads).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import numpy as np
import zmq
from cryoptycho.protocols.control import handle
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.limits import Limits
from cryoptycho.protocols.messages import (
    Abort,
    ErrorEvent,
    Frames,
    ScanEnd,
    ScanEvent,
    ScanStart,
    decode,
    peek,
)
from cryoptycho.protocols.sources import DetectorFrames
from cryoptycho.protocols.topics import encode_event
from cryoptycho.protocols.wire import unpack
from prometheus_client import start_http_server

from .config import ServiceConfig
from .handlers import build_table
from .ingest import DirectIngest, check_chunks, check_direct, frame_positions, spec_from_scan_start
from .metrics import ServiceMetrics
from .notify import SystemdNotifier
from .publisher import Outbox, to_message
from .scans import ScanManager, ScanRefused
from .session import ScanSpec

log = logging.getLogger("cryoptycho.service")

#: ingest messages handled per loop turn before control and publishing get their turn
INGEST_BURST = 64
#: PUB send queue per subscriber: a slow viewer loses old messages instead of slowing ingest
PUB_HWM = 64


class Service:
    """The live reconstruction service. ``start()`` binds, ``run()`` loops, ``stop()`` drains."""

    def __init__(self, config: ServiceConfig, limits: Limits | None = None) -> None:
        self.config = config
        self.limits = limits or Limits()
        self.metrics = ServiceMetrics()
        self.outbox = Outbox()
        self.scans = ScanManager(config, self.metrics, self.outbox)
        self.notifier = SystemdNotifier()
        self.table = build_table(self)
        self.endpoints: dict[str, str] = {}
        self.metrics_port: int | None = None
        self.started_at = time.monotonic()
        self._declared: dict[str, ScanStart] = {}
        self._stop = threading.Event()
        self._stop_rx, self._stop_tx = socket.socketpair()
        self._stop_rx.setblocking(False)
        self._stop_tx.setblocking(False)
        self._ctx = zmq.Context()
        self._metrics_server: Any = None
        #: sources in this process (``--source``) deliver here, validated like the ingest socket
        self.direct = DirectIngest()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Bind every socket, start the metrics endpoint, recover unfinished scans."""
        ctx = self._ctx
        self.ingest = ctx.socket(zmq.PULL)
        self.publish = ctx.socket(zmq.PUB)
        self.publish.setsockopt(zmq.SNDHWM, PUB_HWM)
        self.control = ctx.socket(zmq.ROUTER)
        for sock in (self.ingest, self.publish, self.control):
            sock.setsockopt(zmq.LINGER, 1000)
        self.ingest.setsockopt(zmq.RCVHWM, 256)
        for name, sock in (("ingest", self.ingest), ("publish", self.publish), ("control", self.control)):
            endpoint = getattr(self.config, name)
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                raise RuntimeError(f"cannot bind {name} socket to {endpoint}: {exc}") from None
            self.endpoints[name] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.config.metrics_enabled:
            server, _thread = start_http_server(
                self.config.metrics_port, addr=self.config.metrics_host, registry=self.metrics.registry
            )
            self._metrics_server = server
            self.metrics_port = int(server.server_port)
        self.metrics.info.info({"version": _version(), "backend": self.config.options.backend})
        self.metrics.up.set(1)
        if self.config.recover:
            for scan_id in self.scans.recover():
                self._declared[scan_id] = _declaration(self.scans.sessions[scan_id].spec)
        log.info("service ready", extra={**self.endpoints, "metrics_port": self.metrics_port})
        self.notifier.ready(f"ingest {self.endpoints['ingest']}")

    def request_stop(self) -> None:
        """Ask the loop to drain and return; safe from signal handlers and other threads."""
        self._stop.set()
        try:
            self._stop_tx.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def run(self) -> None:
        """The manager loop; returns after a stop request has drained the workers."""
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.outbox.fd, zmq.POLLIN)
        poller.register(self._stop_rx.fileno(), zmq.POLLIN)
        ingest_registered = False
        last_housekeeping = 0.0
        while not self._stop.is_set():
            want_ingest = not self.scans.backpressure()
            if want_ingest != ingest_registered:
                for sock in (self.ingest, self.direct.fd):
                    if want_ingest:
                        poller.register(sock, zmq.POLLIN)
                    else:
                        poller.unregister(sock)
                ingest_registered = want_ingest
            events = dict(poller.poll(100))
            if events.get(self.ingest):
                self._read_ingest()
            if events.get(self.direct.fd):
                self._read_direct()
            if events.get(self.control):
                self._read_control()
            self.scans.reap()
            self._flush_outbox()
            now = time.monotonic()
            if now - last_housekeeping >= 0.5:
                last_housekeeping = now
                self._housekeeping()
            if self.config.watchdog:
                self.notifier.watchdog()
        self._drain()

    def _drain(self) -> None:
        """SIGTERM: stop reading ingest; scans still acquiring are checkpointed (they are in the
        spool, recovered at the next start); scans past scan_end may finish within
        ``drain_timeout_s``, then they are interrupted too and recovered like the others."""
        self.notifier.stopping()
        self.direct.close()
        log.info("draining", extra={"running": sorted(self.scans.running)})
        self.scans.interrupt(ended_too=False)
        deadline = time.monotonic() + self.config.drain_timeout_s
        for worker in list(self.scans.running.values()):
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        self.scans.interrupt(ended_too=True)
        for worker in list(self.scans.running.values()):
            worker.thread.join(10.0)
            if worker.thread.is_alive():
                log.error("worker did not stop; its scan will be recovered from the spool",
                          extra={"scan_id": worker.session.scan_id})
        self.scans.reap()
        self._flush_outbox()
        self.scans.close()
        self.metrics.up.set(0)

    def close(self) -> None:
        for sock in (getattr(self, n, None) for n in ("ingest", "publish", "control")):
            if sock is not None:
                sock.close()
        self._ctx.term()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.outbox.close()
        self.direct.release()
        self._stop_rx.close()
        self._stop_tx.close()

    # -- ingest ------------------------------------------------------------------------------
    def _read_ingest(self) -> None:
        for _ in range(INGEST_BURST):
            try:
                parts = self.ingest.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            arrived = time.monotonic()
            self.metrics.received_bytes.inc(sum(len(p.buffer) for p in parts))
            try:
                msg = decode(parts, self.limits, self._declared)
                self._handle(msg, arrived)
            except ProtocolError as exc:
                self._reject(exc, parts)
            if self.scans.backpressure():
                return

    def _read_direct(self) -> None:
        """Messages of sources in this process: the ingest socket's checks, no decoding."""
        for msg, arrived in self.direct.take(INGEST_BURST):
            detector = msg if isinstance(msg, DetectorFrames) else None
            if detector is not None:
                msg = detector.frames
            try:
                check_direct(msg, self.limits, self._declared)
                if detector is not None:
                    check_chunks(detector, self._declared[msg.scan_id])
                self._handle(msg, arrived, detector)
            except (ProtocolError, ValueError) as exc:
                # a source builds messages in this process, so a value the daemon cannot use
                # (e.g. a probe its sampling cannot hold) arrives as a ValueError, not on the wire
                err = exc if isinstance(exc, ProtocolError) else ProtocolError(
                    "message", "invalid", str(exc), getattr(msg, "scan_id", None))
                self._reject(err, [], len(msg.indices) if isinstance(msg, Frames) else 0)

    def _reject(self, exc: ProtocolError, parts: list[Any], frames: int | None = None) -> None:
        self.metrics.messages_rejected.labels(rule=exc.rule).inc()
        n = _frames_in(parts, self.limits) if frames is None else frames
        if n:
            reason = {"known_scan": "unknown_scan", "open_scan": "scan_closed"}.get(exc.rule, "invalid")
            self.metrics.frames_dropped.labels(reason=reason).inc(n)
        log.warning("rejected message: %s", exc, extra={"scan_id": exc.scan_id, "rule": exc.rule})
        self.outbox.post("error", ErrorEvent.from_error(exc, time.time()))

    def _handle(self, msg: Any, arrived: float, detector: DetectorFrames | None = None) -> None:
        if isinstance(msg, ScanStart):
            try:
                spec = spec_from_scan_start(msg)
                self.scans.start_scan(spec)
            except ScanRefused as exc:
                self.metrics.scans.labels(outcome="refused").inc()
                self.outbox.post("scan.rejected", ScanEvent(msg.scan_id, "rejected", str(exc),
                                                            {"field": exc.field, "rule": exc.rule}))
                raise ProtocolError(exc.field, exc.rule, exc.message, msg.scan_id) from None
            self._declared[msg.scan_id] = msg
            self.scans.admit()
            return
        session = self.scans.sessions[msg.scan_id]
        if isinstance(msg, Frames):
            if session.state.final or session.ended:
                raise ProtocolError("scan_id", "open_scan", f"scan {msg.scan_id!r} is {session.state.value}"
                                    + (" (scan_end received)" if session.ended else ""), msg.scan_id)
            positions = frame_positions(msg, session.spec)
            self.scans.add_frames(session, msg.data, np.asarray(msg.indices, dtype=np.int64), positions, arrived,
                                  detector)
        elif isinstance(msg, ScanEnd):
            self.scans.end_scan(session, "scan_end", msg.frame_count)
            self.scans.admit()
        elif isinstance(msg, Abort):
            self.scans.abort_scan(session, msg.reason or "aborted by producer")

    # -- control -----------------------------------------------------------------------------
    def _read_control(self) -> None:
        for _ in range(INGEST_BURST):
            try:
                parts = self.control.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            reply = handle(parts, self.table, self.limits)
            if reply:
                self.control.send_multipart(reply, copy=False)

    # -- publish -----------------------------------------------------------------------------
    def _flush_outbox(self) -> None:
        for topic, payload in self.outbox.take():
            try:
                self.publish.send_multipart(encode_event(to_message(topic, payload)), zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass  # only when every subscriber is over its HWM: they skip this message

    # -- housekeeping ------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        self.scans.check_timeouts()
        self.scans.admit()
        self.metrics.queue_depth.set(self.scans.queued_frames())
        _gpu_memory(self.metrics, self.config.options.backend)
        for scan_id in [s for s in self._declared if s not in self.scans.sessions]:
            del self._declared[scan_id]  # forgotten with the session history


class BackgroundService:
    """A started :class:`Service` whose manager loop runs on a thread (demo, benchmarks):
    its exception is kept in ``error`` and re-raised by :meth:`stop`."""

    def __init__(self, config: ServiceConfig) -> None:
        self.service = Service(config)
        self.service.start()
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, name="service", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.service.run()
        except Exception as exc:  # kept, logged, re-raised by stop()
            log.exception("service loop failed")
            self.error = exc

    def stop(self) -> None:
        self.service.request_stop()
        self.thread.join(self.service.config.drain_timeout_s + 30)
        self.service.close()
        if self.error is not None:
            raise self.error


def _frames_in(parts: list[Any], limits: Limits) -> int:
    """Frames a refused message carried (0 when it is not a readable frames message)."""
    try:
        if peek(parts, limits)[0] != "frames":
            return 0
        _, arrays, _ = unpack(parts, limits)
        return int(np.size(arrays.get("indices", ())))
    except ProtocolError:
        return 0


def _declaration(spec: ScanSpec) -> ScanStart:
    """A ScanStart equivalent to a recovered scan's spooled description (for frame validation)."""
    return ScanStart(
        scan_id=spec.scan_id, energy_eV=spec.energy_eV, frame_shape=spec.frame_shape,
        frame_dtype=spec.frame_dtype, expected_frames=spec.expected_frames or 1,
        pixel_size_m=spec.pixel_size_m, probe=spec.probe.astype(np.complex64),
        positions_m=spec.positions_m, mask=None if spec.mask is None else spec.mask.astype(np.uint8),
        options=spec.options, metadata=spec.metadata,
    )


def _gpu_memory(metrics: ServiceMetrics, backend: str) -> None:
    if backend != "cupy":
        return
    from cryoptycho.gpu.backend import get_xp

    cp = get_xp("cupy")
    free, total = cp.cuda.runtime.memGetInfo()
    metrics.gpu_memory_used.set(total - free)
    metrics.gpu_memory_total.set(total)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cryoptycho")
    except PackageNotFoundError:
        return "unknown"
