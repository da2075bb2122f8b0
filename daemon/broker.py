"""Scan placement across many daemons: ZeroMQ's load-balancing broker, routed by scan id.

A live reconstruction is stateful (object, probe and optimiser state live on one GPU), so frames
cannot be spread round-robin: every message of a scan must reach the daemon that holds the scan.
The broker therefore routes by *scan*, not by message:

* producers PUSH to the broker's ingest PULL socket exactly as they would to a daemon;
* a ``scan_start`` goes to a *free* backend (a daemon with fewer active scans than slots); the
  broker remembers scan id → backend and sends every later message of that scan there;
* when no backend is free, the new scan is held (with its frames) in broker memory, in arrival
  order, and placed on the first backend that frees (the zguide "LRU queue" idea: work waits for a
  ready worker, not on a fixed one); beyond ``hold_bytes`` the broker stops reading its ingest
  socket, so producers block (PUSH backpressure) instead of the broker running out of memory, and
  hands the oldest held scan to the least-loaded live daemon, which queues it (else the paused
  ingest would also hold back the scan_end that frees a slot: a deadlock);
* a backend is free according to the broker's own accounting (scans placed minus scans ended) and,
  when it has a control endpoint, to its ``status`` reply (running + waiting scans, its
  ``max_concurrent_scans``, whether it is stopping). A backend whose control socket stops answering
  gets no new scans; scans already there stay there (they cannot move).

Backends are configured up front (``--backend``) or register themselves on the broker's control
socket (method ``register``, the load-balancing pattern's "ready" message); see deploy/README.md.
Only the header part of each message is read (:func:`cryoptycho.protocols.messages.peek`); frame
payloads are forwarded without a copy or a decode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import zmq
from cryoptycho.protocols.control import handle
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.limits import Limits, control_max_part_bytes, ingest_max_part_bytes
from cryoptycho.protocols.messages import Reply, Request, decode, encode, peek
from cryoptycho.protocols.security import ClientCurve, apply_client_curve

log = logging.getLogger("cryoptycho.broker")

#: requests one control client may have queued unread (the daemon's control_queue_messages)
CONTROL_QUEUE_MESSAGES = 16
#: scans remembered after their end, so late or duplicate messages still reach the same daemon
ENDED_MEMORY = 4096


@dataclass
class Backend:
    """One daemon behind the broker."""

    ingest: str
    control: str | None = None
    slots: int | None = None
    """Scans this backend takes at once; None = its reported ``max_concurrent_scans`` (or 1)."""
    socket: zmq.Socket | None = None
    active: set[str] = field(default_factory=set)
    """Scans placed here whose scan_end/abort has not been forwarded yet."""
    pending: deque = field(default_factory=deque)
    """Messages waiting for the socket to accept them (HWM reached or peer not connected yet)."""
    pending_bytes: int = 0
    placed: int = 0
    messages: int = 0
    monitor: BackendMonitor | None = None

    def capacity(self) -> int:
        if self.slots is not None:
            return self.slots
        if self.monitor is not None and self.monitor.max_concurrent is not None:
            return self.monitor.max_concurrent
        return 1

    def load(self) -> int:
        """Scans occupying the backend: the larger of the broker's count and the daemon's own."""
        reported = self.monitor.active if self.monitor is not None else None
        return max(len(self.active), reported or 0)

    def available(self, now: float) -> bool:
        """Alive (its control answers, if it has one) and not draining."""
        return self.monitor is None or self.monitor.usable(now)

    def free(self, now: float) -> bool:
        return self.available(now) and self.load() < self.capacity()

    def summary(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ingest": self.ingest,
            "control": self.control,
            "capacity": self.capacity(),
            "load": self.load(),
            "active": sorted(self.active),
            "available": self.available(now),
            "placed": self.placed,
            "messages": self.messages,
            "pending_messages": len(self.pending),
        }
        if self.monitor is not None:
            out.update(self.monitor.summary(now))
        return out


@dataclass
class BrokerOptions:
    ingest: str = "tcp://127.0.0.1:5590"
    """Endpoint the broker's ingest PULL socket binds (producers PUSH here)."""
    control: str | None = "tcp://127.0.0.1:5591"
    """Endpoint of the broker's control ROUTER socket (ping, status, register, unregister)."""
    hold_bytes: int = 2 * 2**30
    """Most bytes of messages held for scans waiting for a free backend (and unsent to a
    backend); beyond it the broker stops reading ingest, which blocks the producers."""
    poll_interval_s: float = 1.0
    """Period of the ``status`` requests to backends with a control endpoint."""
    dead_after_s: float = 5.0
    """A backend whose control socket has not answered for this long gets no new scans."""
    sndhwm: int = 1000
    """Messages queued per backend socket before it reports full (then the broker holds them)."""
    limits: Limits = field(default_factory=Limits)
    curve: ClientCurve | None = None
    """The broker's CURVE client keys towards daemons that run with CURVE (its own sockets
    stay plain: put it behind a NetworkPolicy or firewall, deploy/README.md)."""


class Broker:
    """The broker loop; run it in a thread with :meth:`start` or call :meth:`run` directly."""

    def __init__(self, options: BrokerOptions, backends: list[Backend] | None = None,
                 context: zmq.Context | None = None) -> None:
        self.options = options
        self.ctx = context or zmq.Context.instance()
        self.backends: dict[str, Backend] = {}
        self.routes: OrderedDict[str, Backend] = OrderedDict()
        self.ended: OrderedDict[str, Backend] = OrderedDict()
        self.waiting: OrderedDict[str, list[list[Any]]] = OrderedDict()
        self.held_bytes = 0
        self.counters: dict[str, int] = {"messages": 0, "scans_placed": 0, "scans_held": 0, "aborted_while_held": 0,
                                         "scans_overcommitted": 0}
        self.dropped: dict[str, int] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        # The loop holds it while it changes state, so status() may be called from any thread.
        self._lock = threading.RLock()
        self._initial = list(backends or [])
        self.ingest_endpoint: str | None = None
        self.control_endpoint: str | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 10.0) -> Broker:
        """Run the loop in a background thread; return once the sockets are bound."""
        self._thread = threading.Thread(target=self._run_guarded, name="broker", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            self.maybe_raise()
            if time.monotonic() > deadline:
                raise TimeoutError("broker did not bind its sockets in time")
        self.maybe_raise()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop and re-raise any error it died of."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError("broker thread did not stop")
        self.maybe_raise()

    def maybe_raise(self) -> None:
        if self._error is not None:
            raise RuntimeError("broker loop failed") from self._error

    def _run_guarded(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # surfaced through maybe_raise()/stop()
            log.exception("broker loop failed")
            self._error = exc
            self._ready.set()

    def request_stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ the loop

    def run(self, on_ready: Any = None, on_tick: Any = None) -> None:
        """Bind, serve until :meth:`request_stop`, close. ``on_ready``/``on_tick`` are called once
        after binding and once per loop turn (systemd READY=1 / WATCHDOG=1 in the CLI)."""
        opts = self.options
        ingest = self.ctx.socket(zmq.PULL)
        ingest.setsockopt(zmq.LINGER, 0)
        # a part over the limits is dropped with its sender as its length arrives, not held
        # whole first (PROTOCOL.md § 1, Message size)
        ingest.setsockopt(zmq.MAXMSGSIZE, ingest_max_part_bytes(opts.limits))
        ingest.bind(opts.ingest)
        self.ingest_endpoint = ingest.getsockopt_string(zmq.LAST_ENDPOINT)
        control = None
        if opts.control:
            control = ControlEndpoint(self.ctx, opts.control, self._control_table(), opts.limits)
            self.control_endpoint = control.endpoint
        for backend in self._initial:
            self.add_backend(backend)
        log.info("broker ingest %s, control %s, %d backends", self.ingest_endpoint,
                 self.control_endpoint, len(self.backends))
        self._ready.set()
        if on_ready is not None:
            on_ready()
        try:
            while not self._stop.is_set():
                with self._lock:
                    self._poll_backends(time.monotonic())
                    poller = self._build_poller(ingest, control)
                events = dict(poller.poll(100))
                with self._lock:
                    self._handle(events, ingest, control)
                if on_tick is not None:
                    on_tick()
        finally:
            for backend in list(self.backends.values()):
                self._close_backend(backend)
            if control is not None:
                control.close()
            ingest.close(0)

    def _handle(self, events: dict[Any, int], ingest: zmq.Socket, control: ControlEndpoint | None) -> None:
        if control is not None and events.get(control.socket):
            control.handle()
        for backend in list(self.backends.values()):
            if backend.socket is not None and events.get(backend.socket, 0) & zmq.POLLOUT:
                self._flush(backend)
            if backend.monitor is not None and events.get(backend.monitor.socket, 0) & zmq.POLLIN:
                backend.monitor.receive(time.monotonic())
        if events.get(ingest, 0) & zmq.POLLIN:
            self._drain_ingest(ingest)
        self._place_waiting(time.monotonic())

    def _build_poller(self, ingest: zmq.Socket, control: ControlEndpoint | None) -> zmq.Poller:
        poller = zmq.Poller()
        if self.held_bytes + self._unsent_bytes() < self.options.hold_bytes:
            poller.register(ingest, zmq.POLLIN)  # else: backpressure, producers block
        if control is not None:
            poller.register(control.socket, zmq.POLLIN)
        for backend in self.backends.values():
            if backend.pending and backend.socket is not None:
                poller.register(backend.socket, zmq.POLLOUT)
            if backend.monitor is not None:
                poller.register(backend.monitor.socket, zmq.POLLIN)
        return poller

    def _drain_ingest(self, ingest: zmq.Socket) -> None:
        # Up to a batch per turn, so control requests and backend flushes are not starved.
        for _ in range(256):
            try:
                parts = ingest.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.route(parts)
            if self.held_bytes + self._unsent_bytes() >= self.options.hold_bytes:
                return

    # ------------------------------------------------------------------ routing

    def route(self, parts: list[Any]) -> None:
        """Send one received message where its scan lives (or hold it until a backend frees)."""
        self.counters["messages"] += 1
        try:
            kind, scan_id = peek(parts, self.options.limits)
        except ProtocolError as exc:
            self._drop(exc.rule, f"{exc}")
            return
        if kind not in ("scan_start", "frames", "scan_end", "abort") or scan_id is None:
            self._drop("not_ingest", f"message type {kind!r} (scan id {scan_id!r}) is not routable")
            return
        if kind == "scan_start":
            # a repeated scan_start stays with the original: its daemon answers "unique_scan"
            if scan_id in self.waiting:
                self._hold(scan_id, parts)
                return
            if scan_id in self.routes:
                self._send(self.routes[scan_id], parts)
                return
            self.ended.pop(scan_id, None)  # an id reused after its end is a new scan
            backend = self._pick(time.monotonic())
            if backend is None:
                self.waiting[scan_id] = []
                self.counters["scans_held"] += 1
                log.info("no free backend; holding scan", extra={"scan_id": scan_id})
                self._hold(scan_id, parts)
            else:
                self._assign(scan_id, backend)
                self._send(backend, parts)
            return
        if scan_id in self.waiting:
            if kind == "abort":  # never placed: no daemon needs to hear of it
                self.held_bytes -= sum(_size(p) for p in self.waiting.pop(scan_id))
                self.counters["aborted_while_held"] += 1
                return
            self._hold(scan_id, parts)
            return
        backend = self.routes.get(scan_id) or self.ended.get(scan_id)
        if backend is None:
            self._drop("unknown_scan", f"{kind} for scan {scan_id!r}, which no scan_start opened")
            return
        self._send(backend, parts)
        if kind in ("scan_end", "abort") and scan_id in self.routes:
            self._finish(scan_id)

    def _pick(self, now: float) -> Backend | None:
        """The free backend with the most spare slots (ties: fewest scans placed so far)."""
        free = [b for b in self.backends.values() if b.free(now)]
        return min(free, key=lambda b: (b.load() - b.capacity(), b.placed)) if free else None

    def _least_loaded(self, now: float) -> Backend | None:
        live = [b for b in self.backends.values() if b.available(now)]
        return min(live, key=lambda b: (b.load() - b.capacity(), b.placed)) if live else None

    def _assign(self, scan_id: str, backend: Backend) -> None:
        self.routes[scan_id] = backend
        backend.active.add(scan_id)
        backend.placed += 1
        self.counters["scans_placed"] += 1
        log.info("scan placed on %s", backend.ingest, extra={"scan_id": scan_id})

    def _finish(self, scan_id: str) -> None:
        backend = self.routes.pop(scan_id)
        backend.active.discard(scan_id)
        self.ended[scan_id] = backend
        while len(self.ended) > ENDED_MEMORY:
            self.ended.popitem(last=False)

    def _hold(self, scan_id: str, parts: list[Any]) -> None:
        self.waiting[scan_id].append(parts)
        self.held_bytes += _size(parts)

    def _place_waiting(self, now: float) -> None:
        while self.waiting:
            scan_id = next(iter(self.waiting))
            backend = self._pick(now)
            if backend is None and self.held_bytes >= self.options.hold_bytes:
                # Held frames fill the budget, so ingest is paused — which would also hold back
                # the scan_end that frees a slot (deadlock). Hand the oldest held scan to a live
                # daemon beyond its slots instead: the daemon queues it, spooled to disk.
                backend = self._least_loaded(now)
                if backend is not None:
                    self.counters["scans_overcommitted"] += 1
                    log.warning("hold budget full: scan queued on %s beyond its slots", backend.ingest,
                                extra={"scan_id": scan_id})
            if backend is None:
                return
            messages = self.waiting.pop(scan_id)
            self._assign(scan_id, backend)
            for parts in messages:
                self.held_bytes -= _size(parts)
                self._send(backend, parts)
                kind, _ = peek(parts, self.options.limits)
                if kind in ("scan_end", "abort") and scan_id in self.routes:
                    self._finish(scan_id)

    def _send(self, backend: Backend, parts: list[Any]) -> None:
        backend.messages += 1
        if backend.pending or not self._try_send(backend, parts):
            backend.pending.append(parts)
            backend.pending_bytes += _size(parts)

    def _try_send(self, backend: Backend, parts: list[Any]) -> bool:
        assert backend.socket is not None
        try:
            backend.socket.send_multipart(parts, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def _flush(self, backend: Backend) -> None:
        while backend.pending:
            parts = backend.pending[0]
            if not self._try_send(backend, parts):
                return
            backend.pending.popleft()
            backend.pending_bytes -= _size(parts)

    def _unsent_bytes(self) -> int:
        return sum(b.pending_bytes for b in self.backends.values())

    def _drop(self, rule: str, message: str) -> None:
        self.dropped[rule] = self.dropped.get(rule, 0) + 1
        log.warning("dropped a message: %s", message, extra={"rule": rule})

    # ------------------------------------------------------------------ backends

    def add_backend(self, backend: Backend) -> Backend:
        """Connect to ``backend`` (idempotent per ingest endpoint: a re-register updates it)."""
        existing = self.backends.get(backend.ingest)
        if existing is not None:
            existing.slots = backend.slots if backend.slots is not None else existing.slots
            if backend.control and backend.control != existing.control:
                if existing.monitor is not None:
                    existing.monitor.close()
                existing.control = backend.control
                existing.monitor = BackendMonitor(self.ctx, backend.control, self.options)
            return existing
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.options.sndhwm)
        sock.setsockopt(zmq.LINGER, 2000)  # give queued frames a moment to leave on shutdown
        _client_curve(sock, self.options.curve)
        sock.connect(backend.ingest)
        backend.socket = sock
        if backend.control:
            backend.monitor = BackendMonitor(self.ctx, backend.control, self.options)
        self.backends[backend.ingest] = backend
        log.info("backend added: ingest %s, control %s", backend.ingest, backend.control)
        return backend

    def remove_backend(self, ingest: str) -> None:
        """Stop placing scans on ``ingest``; refuse while scans are still routed there."""
        backend = self.backends.get(ingest)
        if backend is None:
            raise KeyError(f"no backend with ingest endpoint {ingest!r}")
        if backend.active or backend.pending:
            raise ValueError(
                f"backend {ingest} still has {len(backend.active)} active scans and "
                f"{len(backend.pending)} unsent messages"
            )
        self._close_backend(backend)
        del self.backends[ingest]
        for scan_id in [sid for sid, b in self.ended.items() if b is backend]:
            del self.ended[scan_id]  # late messages of its ended scans are now unroutable

    def _close_backend(self, backend: Backend) -> None:
        if backend.monitor is not None:
            backend.monitor.close()
        if backend.socket is not None:
            backend.socket.close()
            backend.socket = None

    def _poll_backends(self, now: float) -> None:
        for backend in self.backends.values():
            if backend.monitor is not None:
                backend.monitor.maybe_request(now)

    # ------------------------------------------------------------------ control

    def status(self) -> dict[str, Any]:
        with self._lock:
            return self._status()

    def _status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "ingest": self.ingest_endpoint,
            "control": self.control_endpoint,
            "backends": [b.summary(now) for b in self.backends.values()],
            "routes": {sid: b.ingest for sid, b in self.routes.items()},
            "waiting": list(self.waiting),
            "held_bytes": self.held_bytes,
            "counters": dict(self.counters),
            "dropped": dict(self.dropped),
        }

    def _control_table(self) -> dict[str, Any]:
        def ping() -> dict[str, Any]:
            return {"pong": True, "time_s": time.time()}

        def status() -> dict[str, Any]:
            return self.status()

        def register(ingest: str, control: str | None = None, slots: int | None = None) -> dict[str, Any]:
            backend = self.add_backend(backend_from_params({"ingest": ingest, "control": control, "slots": slots}))
            return {"registered": backend.ingest}

        def unregister(ingest: str) -> dict[str, Any]:
            self.remove_backend(ingest)
            return {"unregistered": ingest}

        return {"ping": ping, "status": status, "register": register, "unregister": unregister}


class ControlEndpoint:
    """The broker's own control ROUTER socket, served with the protocol's dispatcher."""

    def __init__(self, ctx: zmq.Context, endpoint: str, table: dict[str, Any], limits: Limits | None = None) -> None:
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # requests are small: a client sending a large part is disconnected, and few wait
        self.socket.setsockopt(zmq.MAXMSGSIZE, control_max_part_bytes(limits or Limits()))
        self.socket.setsockopt(zmq.RCVHWM, CONTROL_QUEUE_MESSAGES)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.table = table

    def handle(self) -> None:
        for _ in range(64):
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            reply = handle(parts, self.table)
            if reply:
                try:
                    self.socket.send_multipart(reply, zmq.NOBLOCK)
                except zmq.Again:  # the client went away; ROUTER drops unroutable replies anyway
                    log.warning("control reply could not be sent")

    def close(self) -> None:
        self.socket.close(0)


class BackendMonitor:
    """Polls a daemon's control ``status`` without blocking the broker loop (a DEALER socket
    that looks like a REQ peer to the daemon's ROUTER: empty delimiter, then the request)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, options: BrokerOptions) -> None:
        self.endpoint = endpoint
        self.options = options
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 4)
        _client_curve(self.socket, options.curve)
        self.socket.connect(endpoint)
        self.created = time.monotonic()
        self.last_request = -float("inf")
        self.last_reply: float | None = None
        self.active: int | None = None
        self.max_concurrent: int | None = None
        self.stopping = False
        self.error: str | None = None

    def maybe_request(self, now: float) -> None:
        if now - self.last_request < self.options.poll_interval_s:
            return
        self.last_request = now
        try:
            self.socket.send_multipart([b"", *encode(Request("status", {}, time.time()))], zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected yet or still answering earlier requests: liveness covers it

    def receive(self, now: float) -> None:
        while True:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            body = parts[1:] if parts and len(parts[0].buffer) == 0 else parts
            try:
                reply = decode(body, self.options.limits)
            except ProtocolError as exc:
                self.error = f"undecodable status reply: {exc}"
                continue
            if not isinstance(reply, Reply) or not reply.success:
                self.error = f"status failed: {getattr(reply, 'msg', reply)}"
                continue
            self.last_reply = now
            self.error = None
            self._update(reply.result)

    def _update(self, result: dict[str, Any]) -> None:
        running, waiting = result.get("running", []), result.get("waiting", [])
        # waiting_total: a daemon lists only the first of many waiting scans (older ones: all)
        self.active = len(running) + int(result.get("waiting_total", len(waiting)))
        limit = result.get("max_concurrent_scans")
        self.max_concurrent = limit if isinstance(limit, int) and limit >= 1 else None
        self.stopping = bool(result.get("stopping", False))

    def usable(self, now: float) -> bool:
        """Answered recently and not draining (a daemon never heard from is not usable)."""
        if self.stopping or self.last_reply is None:
            return False
        return now - self.last_reply <= self.options.dead_after_s

    def summary(self, now: float) -> dict[str, Any]:
        return {
            "reported_active": self.active,
            "reported_max_concurrent_scans": self.max_concurrent,
            "stopping": self.stopping,
            "last_status_age_s": None if self.last_reply is None else now - self.last_reply,
            "status_error": self.error,
        }

    def close(self) -> None:
        self.socket.close(0)


def backend_from_params(params: dict[str, Any]) -> Backend:
    """A Backend from ``register`` parameters ``{ingest, control?, slots?}``, validated."""
    ingest = params.get("ingest")
    if not isinstance(ingest, str) or "://" not in ingest:
        raise ValueError(f"params.ingest: must be a ZeroMQ endpoint like tcp://host:5600, got {ingest!r}")
    control = params.get("control")
    if control is not None and (not isinstance(control, str) or "://" not in control):
        raise ValueError(f"params.control: must be a ZeroMQ endpoint or absent, got {control!r}")
    slots = params.get("slots")
    if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool) or slots < 1):
        raise ValueError(f"params.slots: must be a positive integer or absent, got {slots!r}")
    return Backend(ingest=ingest, control=control, slots=slots)


def parse_backend(text: str) -> Backend:
    """``INGEST[,control=ENDPOINT][,slots=N]`` (the CLI form) → Backend."""
    fields = [f.strip() for f in text.split(",") if f.strip()]
    if not fields:
        raise ValueError("empty backend description")
    params: dict[str, Any] = {"ingest": fields[0]}
    for item in fields[1:]:
        key, sep, value = item.partition("=")
        if not sep or key not in ("control", "slots"):
            raise ValueError(f"backend {text!r}: expected control=ENDPOINT or slots=N, got {item!r}")
        if key == "slots":
            try:
                params["slots"] = int(value)
            except ValueError:
                raise ValueError(f"backend {text!r}: slots must be an integer, got {value!r}") from None
        else:
            params["control"] = value
    return backend_from_params(params)


def _size(parts: list[Any]) -> int:
    return sum(memoryview(getattr(p, "buffer", p)).nbytes for p in parts)


def _client_curve(sock: zmq.Socket, curve: ClientCurve | None) -> None:
    if curve is not None:
        apply_client_curve(sock, curve.secret_file, curve.server_public_file)
