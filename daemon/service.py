"""The manager: one thread that owns every socket (ingest PULL, publish PUB, control ROUTER).

It polls the sockets, the workers' outbox and a stop pipe with one ``zmq.Poller``; it decodes and
validates ingest messages, spools frames (they count as received only once on disk), hands them
to the scan's worker, answers control requests and publishes what workers post. It never runs
engine code, so it stays responsive while scans compute (see worker.py for why threads).
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import zmq
from cryoptycho.gpu import framestore
from cryoptycho.protocols.control import dispatch, encode_reply, handle, split_envelope
from cryoptycho.protocols.dectris.receiver import ErrorLogLimiter
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.limits import Limits, control_max_part_bytes, ingest_max_part_bytes
from cryoptycho.protocols.messages import (
    Abort,
    ErrorEvent,
    Frames,
    Reply,
    Request,
    ScanEnd,
    ScanEvent,
    ScanStart,
    decode,
    peek,
)
from cryoptycho.protocols.schema import SCAN_ID_PATTERN
from cryoptycho.protocols.sources import DetectorFrames, RecoveredScan, UnpositionedFrames
from cryoptycho.protocols.topics import encode_event
from cryoptycho.protocols.wire import encodable, read_header, unpack
from prometheus_client import start_http_server

from .config import ServiceConfig
from .handlers import Later, build_table
from .ingest import (
    DirectIngest,
    check_chunks,
    check_direct,
    frame_positions,
    keep_message_memory,
    release_free_memory,
    resident_bytes,
)
from .logs import LOG_ITEMS_MAX, named
from .metrics import ServiceMetrics
from .notify import SystemdNotifier
from .publisher import ErrorThrottle, Outbox, to_message
from .scan import ScanSpec, outline_from_scan_start, spec_from_scan_start, start_from_spec
from .scans import ScanManager, ScanRefused
from .storage.rawcopy import PENDING_SUFFIX
from .storage.spool import spool_path, unfinished_spools

log = logging.getLogger("cryoptycho.service")

#: how a control handler's later work reports back (value, error), on the manager thread
Done = Callable[[Any, "Exception | None"], None]

#: ingest messages handled per loop turn before control and publishing get their turn
INGEST_BURST = 64
#: CPU seconds of the manager thread after which a burst of ingest messages or control requests
#: ends early, so the other socket and publishing get their turn: a peer sending costly messages
#: (a header of 65,536 values takes ~0.1 s to read and refuse) held the loop for 64 of them,
#: 7 s, before the next control request was read. A burst cut short is only spread over turns:
#: the next turn's poll returns at once while messages wait.
BURST_CPU_S = 0.05
#: PUB send queue per subscriber: a slow viewer loses old messages instead of slowing ingest
PUB_HWM = 64
#: ZMTP heartbeats on the publish socket (ms): a subscriber whose ZeroMQ does not answer a PING
#: within the timeout — its process stopped (a `watch` suspended with Ctrl-Z), its host gone
#: without closing the connection, or so far behind that its socket stopped reading — is
#: disconnected, and the PUB_HWM messages queued for it are released (previews of the whole
#: canvas, 5.2 MB each for 660 × 660: one stopped subscriber raised the daemon's peak resident
#: memory by 178 MB, held until it read again). A live subscriber reconnects by itself; what was
#: in flight and what was published until then is lost. A slow but alive reader answers late
#: if its socket is read only when it wants the next event (the PING waits behind the previews
#: queued before it): the SDK's Subscriber reads its socket on a thread of its own.
PUB_HEARTBEAT_IVL_MS = 2000
PUB_HEARTBEAT_TIMEOUT_MS = 10000
#: error events published one by one per second; the rest are summarised (publisher.ErrorThrottle),
#: so a flood of bad messages stays well inside PUB_HWM and the subscribers' queues
ERROR_BURST = 20
#: rejected ingest messages are logged one per rule in full, then their number at most
#: once per window (protocols/dectris/receiver.ErrorLogLimiter); each is still counted
#: (messages_rejected), published (within ERROR_BURST) and told to its producer (receipt)
REJECTION_LOG_WINDOW_S = 30.0
#: (rule, scan) kinds of rejected messages logged in full per window; the rest together as one
REJECTION_LOG_KINDS = 16
#: a loop step (one message, one request, one housekeeping pass) slower than this is logged as
#: "slow manager step" with its wall and CPU time: no request may hold up ping longer (issue 12)
SLOW_STEP_S = 0.05
#: the interpreter's switch interval in the daemon (CPython's default is 5 ms): a worker running
#: small NumPy operations holds the interpreter lock until it is forced to switch, and the
#: manager waits for the lock after every socket call; at 1 ms, a 2-core host running two such
#: threads beside a ping loop had 5 pings over 50 ms in 2,000 instead of 52, at no loss of the
#: workers' throughput we could measure there (noise ±40 %)
SWITCH_INTERVAL_S = 0.001
#: seconds between two readings of the spool's and results' free disk space (a gauge)
DISK_CHECK_S = 10.0
#: a second stop signal (SIGTERM, SIGINT, SIGHUP) cuts the drain only this long after the first:
#: one stop often arrives as two signals at once, not as two requests — a terminal's Ctrl-C goes
#: to the whole foreground process group, so a wrapper that forwards it (`timeout`, a shell
#: script's trap, `uv run`, tini with -g) doubles it; systemd with SendSIGHUP=yes sends SIGHUP right
#: after KillSignal, and with KillMode=control-group signals every process of the unit. Copies
#: come within milliseconds; a person who wants the drain cut presses again later. (No
#: supervisor sends a second soft signal later on purpose: systemd, docker stop and Kubernetes
#: follow the first with SIGKILL after their grace period.)
SECOND_SIGNAL_AFTER_S = 1.0
#: how long a stopping daemon reads on from its detector sources (``--source``) for the images
#: they hold (received, being decoded, not yet delivered) before it closes their sink; a source
#: bounds its own stop well within this (protocols/dectris/source.py STOP_JOBS_S), so this only
#: ends a source that is itself stuck: what it still held is then lost, and said so in the log
SOURCES_STOP_S = 30.0
#: seconds a metrics client may stay silent mid-request (a scrape sends its request at once)
METRICS_CLIENT_TIMEOUT_S = 5.0



def _metrics_handler(base: type) -> type:
    """prometheus_client's request handler with a socket timeout; a client that times out is
    hung up on with a debug line (wsgiref would print a traceback to stderr for each)."""

    class MetricsHandler(base):  # type: ignore[misc,valid-type]
        timeout = METRICS_CLIENT_TIMEOUT_S

        def handle(self) -> None:
            try:
                super().handle()
            except TimeoutError:
                log.debug("metrics client %s silent for %.0f s: disconnected", self.client_address,
                          METRICS_CLIENT_TIMEOUT_S)

    return MetricsHandler


def _stop_metrics_server(server: Any) -> None:
    """Stop and close prometheus_client's server. Its ``shutdown()`` returns only at the serving
    loop's next poll, up to 0.5 s later (socketserver's default, which prometheus_client keeps):
    every stop of a daemon waited for it. A connection to the server wakes the poll at once; it
    is repeated until the loop has seen the request (a connection that came first is served as
    an empty request, which the handler drops)."""
    stopper = threading.Thread(target=server.shutdown, name="metrics-stop", daemon=True)
    stopper.start()
    host, port = server.server_address[:2]
    while stopper.is_alive():
        try:
            socket.create_connection((host, port), timeout=0.2).close()
        except OSError as exc:  # the wake-up is an optimisation: shutdown() still returns at the next poll
            log.debug("could not wake the metrics server to stop it: %s", exc)
        stopper.join(0.05)
    server.server_close()


def set_numpy_hugepages(enabled: bool) -> bool:
    """Whether NumPy advises the kernel to back large arrays with transparent huge pages; returns
    the previous setting. It is process-wide, and the daemon owns its process. Measured with
    ``bench protocol`` (96×96, 256 frames per message, THP ``defrag = madvise``): the worker's
    CPU per frame 50–57 µs with the advice, 21–23 without, frames in the store 1.6× faster."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # NumPy < 2 keeps it under numpy.core
        from numpy.core.multiarray import _set_madvise_hugepage
    return bool(_set_madvise_hugepage(bool(enabled)))


def memory_available() -> int | None:
    """The host's available memory in bytes (``MemAvailable``, Linux), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux: no figure, no guard
        return None
    return None


def warm_frame_store(nbytes: int) -> threading.Thread | None:
    """Fault in ``nbytes`` of memory for the frame stores of scans to come, on a thread of its
    own (``frame_store_warm_bytes``; SERVICE.md, "Process settings"); 0 gives back any reserve
    now. Returns the thread, if one was started. More than half the host's available memory is
    refused (the scans need the rest; faulting in more than is free calls the kernel's
    out-of-memory killer). A refusal is logged, and the stores fault their memory in as they
    would without the reserve."""
    if not nbytes:
        framestore.MAPPINGS.set_warm_bytes(0)
        return None
    available = memory_available()
    if available is not None and nbytes > available // 2:
        log.warning("frame store memory not faulted in ahead: frame_store_warm_bytes = %d is more than half "
                    "the %d bytes of memory available", nbytes, available)
        return None

    def warm() -> None:
        t0 = time.monotonic()
        try:
            framestore.MAPPINGS.set_warm_bytes(nbytes)
        except OSError as exc:
            log.warning("frame store memory not faulted in ahead (frame_store_warm_bytes): %s", exc)
        except Exception:
            log.exception("faulting in frame store memory failed")
        else:
            log.info("frame store memory faulted in ahead", extra={"bytes": nbytes, "seconds": time.monotonic() - t0})

    thread = threading.Thread(target=warm, name="frame-store-warm", daemon=True)
    thread.start()
    return thread

#: ``control_busy`` refusals sent to a client in a row at most (libzmq's default send queue per
#: peer): a DEALER pipelining past this without reading loses the rest of its replies, which the
#: router would have dropped unsent anyway
REFUSALS_SENT_MAX = 1000


class Service:
    """The live reconstruction service. ``start()`` binds, ``run()`` loops, ``stop()`` drains."""

    def __init__(self, config: ServiceConfig, limits: Limits | None = None) -> None:
        self.config = config
        self.limits = limits or config.limits
        self.metrics = ServiceMetrics()
        self.outbox = Outbox()
        self.scans = ScanManager(config, self.metrics, self.outbox)
        self.notifier = SystemdNotifier()
        self.table = build_table(self)
        self.endpoints: dict[str, str] = {}
        #: the control socket's ZMQ_MAXMSGSIZE (PROTOCOL.md § 1, Message size)
        self.control_part_bytes = config.control_max_part_bytes or control_max_part_bytes(self.limits)
        self.metrics_port: int | None = None
        self.started_at = time.monotonic()
        self._declared: dict[str, ScanStart] = {}
        self.error_throttle = ErrorThrottle(ERROR_BURST)
        # one line per rejected message flooded the log at a producer's message rate (one that
        # streams on after its scan was refused, or has the frame shape wrong): 3,000 lines for
        # 3,000 messages, and journald's rate limit then drops the daemon's other lines too
        self._rejections_log = ErrorLogLimiter(
            log, "rejected message", REJECTION_LOG_WINDOW_S, level=logging.WARNING,
            # by rule and scan: another scan's rejection under a rule a flood already logged
            # (a sender streaming on to its refused scan) was only counted, never named; not by
            # field (a key the sender made up), and at most REJECTION_LOG_KINDS kinds a window
            key=lambda exc: (getattr(exc, "rule", None), getattr(exc, "scan_id", None)),
            max_kinds=REJECTION_LOG_KINDS,
            extra=lambda exc: {"scan_id": getattr(exc, "scan_id", None), "rule": getattr(exc, "rule", None)})
        # a scan_start's probe, positions and spool file are built on this thread while the
        # manager keeps answering (ingest pauses until it is done, so message order holds)
        self._prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="scan-start")
        self._prepare_pool.submit(lambda: None).result()  # started now: Thread.start() waits for it
        self._preparing: tuple[ScanStart, Future[tuple[ScanSpec, Any]]] | None = None
        self._stop = threading.Event()
        self._stop_why: str | None = None
        self._hurry = threading.Event()  #: a second signal: the drain waits for no scan
        self._stop_at: float | None = None  #: when the first stop was asked for (monotonic)
        #: signals taken as copies of the first (SECOND_SIGNAL_AFTER_S): (name, seconds after it),
        #: logged by the drain (not from the signal handler)
        self._copies: list[tuple[str | None, float]] = []
        self._memory_kept = False  #: keep_message_memory took (glibc): released when idle
        #: when a scan was last live (receiving, waiting, reconstructing), and whether the kept
        #: memory was given back since (:meth:`_release_idle_memory`)
        self._live_at = time.monotonic()
        self._released = True
        #: ingest messages were read since the last housekeeping turn: busy, though no scan may
        #: have been live at a turn (a refused scan's frames, a scan over between two turns)
        self._ingested = False
        self._disk_checked = -float("inf")
        self._stop_rx, self._stop_tx = socket.socketpair()
        self._stop_rx.setblocking(False)
        self._stop_tx.setblocking(False)
        self._ctx = zmq.Context()
        self._metrics_server: Any = None
        self._auth: Any = None  #: the CURVE authenticator (ZAP handler), when CURVE is on
        #: sources in this process (``--source``) deliver here, validated like the ingest socket
        self.direct = DirectIngest(scan_id_taken=self.scans.scan_id_taken)
        self.direct.limits = self.limits
        #: the reply the control handler now running asked to make later (:meth:`reply_later`)
        self._later: tuple[str, Callable[[Done], None], Callable[[Any, Exception | None], dict[str, Any]]] | None = None
        #: per control client (ROUTER identity), its replies not sent yet, in request order: one
        #: made later holds back the replies to that client's later requests, never another's
        self._replies: dict[bytes, deque[_PendingReply]] = {}
        #: clients refused ``control_busy`` since their replies last drained: logged once per
        #: such episode, not per request (a client pipelining without end would flood the log)
        self._busy_logged: set[bytes] = set()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Bind every socket, start the metrics endpoint, recover unfinished scans."""
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        set_numpy_hugepages(self.config.numpy_hugepages)
        self._memory_kept = keep_message_memory(self.config.ingest_queue_bytes)
        framestore.MAPPINGS.set_keep_bytes(self.config.frame_store_reuse_bytes)
        self.frame_store_warming = warm_frame_store(self.config.frame_store_warm_bytes)
        # the engine's host FFTs import scipy.fft on first use: 0.2 s inside a daemon's first
        # scan, its frames queueing meanwhile (the first scan stored 1.02-1.15x faster with it
        # imported before, bench protocol --scan ahead); imported here instead, and so is the
        # engine, which the module imports no longer bring (daemon.scans took two option helpers
        # from it, and with it SciPy's ndimage, which no scan uses)
        import cryoptycho.gpu.reconstruct  # noqa: F401
        import scipy.fft  # noqa: F401
        self._check_backend()
        ctx = self._ctx
        self.ingest = ctx.socket(zmq.PULL)
        self.publish = ctx.socket(zmq.PUB)
        self.publish.setsockopt(zmq.SNDHWM, PUB_HWM)
        self.publish.setsockopt(zmq.HEARTBEAT_IVL, PUB_HEARTBEAT_IVL_MS)
        self.publish.setsockopt(zmq.HEARTBEAT_TIMEOUT, PUB_HEARTBEAT_TIMEOUT_MS)
        self.control = ctx.socket(zmq.ROUTER)
        for sock in (self.ingest, self.publish, self.control):
            sock.setsockopt(zmq.LINGER, 1000)
        if self.config.curve_keys_dir is not None:
            from cryoptycho.protocols.security import apply_server_curve, start_authenticator

            try:
                # the authenticator must run before the sockets bind, or the first peers go unchecked
                self._auth = start_authenticator(ctx, self.config.curve_keys_dir)
                for sock in (self.ingest, self.publish, self.control):
                    apply_server_curve(sock, self.config.curve_keys_dir)
            except (OSError, ValueError) as exc:
                # a missing or unreadable key directory was a FileNotFoundError traceback from serve
                raise RuntimeError(f"curve_keys_dir {self.config.curve_keys_dir}: {exc}") from None
        self.ingest.setsockopt(zmq.RCVHWM, ingest_hwm(self.config.ingest_queue_bytes, self.limits))
        # a part over the limits would be refused once whole: ZeroMQ drops its sender as soon as
        # the part's length arrives instead, so that the queue bound above holds in bytes
        self.ingest.setsockopt(zmq.MAXMSGSIZE, ingest_max_part_bytes(self.limits))
        self.control.setsockopt(zmq.MAXMSGSIZE, self.control_part_bytes)
        self.control.setsockopt(zmq.RCVHWM, self.config.control_queue_messages)
        for name, sock in (("ingest", self.ingest), ("publish", self.publish), ("control", self.control)):
            endpoint = getattr(self.config, name)
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                # the likeliest case, a second `serve` at the default ports, said only "Address already in use"
                hint = (f" (another daemon there? stop it, or give this one other endpoints: --{name} / the "
                        f"{name} setting; tcp://127.0.0.1:* takes any free port)" if exc.errno == zmq.EADDRINUSE else "")
                raise RuntimeError(f"cannot bind {name} socket to {endpoint}: {exc}{hint}") from None
            self.endpoints[name] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.config.metrics_enabled:
            try:
                server, _thread = start_http_server(
                    self.config.metrics_port, addr=self.config.metrics_host, registry=self.metrics.registry
                )
            except OSError as exc:  # e.g. a second daemon on the host left at the default port
                raise RuntimeError(
                    f"cannot serve metrics on {self.config.metrics_host}:{self.config.metrics_port}: "
                    f"{exc.strerror or exc} (another daemon there? set metrics_port — 0 = any free port — "
                    "or metrics_enabled = false)") from None
            # prometheus_client's server spends a thread per connection and never times one
            # out: each client that connects and sends nothing (slowloris, a stuck scraper) held
            # a thread of the daemon for good. A connection idle this long is now closed.
            server.RequestHandlerClass = _metrics_handler(server.RequestHandlerClass)
            self._metrics_server = server
            self.metrics_port = int(server.server_port)
        self.metrics.info.info({"version": _version(), "backend": self.config.options.backend})
        self.metrics.up.set(1)
        self.scans.load_raw_pending()
        if self.config.recover:
            self._recovered(self.scans.recover())
        log.info("service ready", extra={**self.endpoints, "metrics_port": self.metrics_port})
        self.notifier.ready(f"ingest {self.endpoints['ingest']}")

    def _recovered(self, scan_ids: list[str]) -> None:
        """Scans recovered from the spool: at the start, or later, once another program let go
        of a spool it held for writing at the start (ScanManager.retry_held_recoveries)."""
        for scan_id in scan_ids:
            self._declared[scan_id] = start_from_spec(self.scans.sessions[scan_id].spec)
            self._offer_to_source(scan_id)

    def _offer_to_source(self, scan_id: str) -> None:
        """A recovered scan still open whose spool derives its binned frames from detector
        frames is offered to the detector source (``--source``), which may resume its series:
        the detector goes on sending the images of a series the daemon was killed in."""
        session, spool = self.scans.sessions[scan_id], self.scans.spools.get(scan_id)
        if session.ended or spool is None or spool.derivation is None:
            return
        self.direct.recovered.append(RecoveredScan(self._declared[scan_id], session.ledger.seen(),
                                                   spool.derivation))

    def request_stop(self, why: str | None = None, again_hurries: bool = False) -> None:
        """Ask the loop to drain and return; safe from signal handlers and other threads.
        ``why`` (e.g. the signal's name) is said in the drain's log. ``again_hurries``: if a
        stop was already asked for at least :data:`SECOND_SIGNAL_AFTER_S` before (Ctrl-C pressed
        twice), scans past scan_end are not waited for; like the others they stay in the spool
        for the next start. One sooner is taken as a copy of the first (logged by the drain)."""
        now = time.monotonic()
        # only signals count: after a stop the daemon asked for itself (a failed source), an
        # operator's first Ctrl-C is a first, not a copy of that stop nor a second press
        if again_hurries and self._stop_at is None:
            self._stop_at = now
        elif again_hurries and self._stop.is_set():
            if now - self._stop_at >= SECOND_SIGNAL_AFTER_S:
                self._hurry.set()
            else:
                self._copies.append((why, now - self._stop_at))
        self._stop_why = self._stop_why or why
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
            want_ingest = self._preparing is None and not self.scans.backpressure()
            if want_ingest != ingest_registered:
                for sock in (self.ingest, self.direct.fd):
                    if want_ingest:
                        poller.register(sock, zmq.POLLIN)
                    else:
                        poller.unregister(sock)
                ingest_registered = want_ingest
            events = dict(poller.poll(100))
            turn = self._clock()
            if events.get(self.ingest):
                self._read_ingest()
            if events.get(self.direct.fd):
                self._read_direct()
            if events.get(self.ingest) or events.get(self.direct.fd):
                self._ingested = True  # messages were read: not idle (_release_idle_memory)
            if events.get(self.control):
                self._read_control()
            if self._preparing is not None and self._preparing[1].done():
                t = self._clock()
                self._finish_start()
                self._timed(t, "scan_start registration")
            t = self._clock()
            self._guarded("housekeeping", self.scans.reap)
            self._timed(t, "reap")
            t = self._clock()
            self._flush_outbox()
            self._timed(t, "publish")
            now = time.monotonic()
            if now - last_housekeeping >= 0.5:
                last_housekeeping = now
                t = self._clock()
                self._guarded("housekeeping", self._housekeeping)
                self._timed(t, "housekeeping")
            if self.config.watchdog:
                self._guarded("housekeeping", self.notifier.watchdog)  # a vanished notify socket is not fatal
            self._timed(turn, "loop turn")
        self._drain()

    def _check_backend(self) -> None:
        """The configured engine backend must be usable here. A daemon set to ``cupy`` on a host
        without CuPy or without a visible GPU said it was ready, refused every scan that did not
        override the backend, and logged an internal-error traceback from its GPU memory gauge
        twice a second for as long as it ran."""
        from cryoptycho.gpu.backend import BackendUnavailable, get_xp

        try:
            get_xp(self.config.options.backend)
        except BackendUnavailable as exc:
            raise RuntimeError(f"options.backend = {self.config.options.backend!r} cannot be used on this host: "
                               f"{exc} (or set options.backend = \"numpy\")") from None

    def _log_signal_copies(self) -> None:
        while self._copies:
            why, after = self._copies.pop(0)
            log.info("%s %.3f s after the first stop signal: taken as the same stop (a forwarded copy); "
                     "scans past scan_end are still waited for — send it again %g s or more after the "
                     "first to stop waiting", why or "stop request", after, SECOND_SIGNAL_AFTER_S)

    def _drain(self) -> None:
        """SIGTERM: stop reading ingest; scans still acquiring are checkpointed (they are in the
        spool, recovered at the next start); scans past scan_end may finish within
        ``drain_timeout_s``, then they are interrupted too and recovered like the others."""
        self.notifier.stopping()
        self._drain_sources()
        self.direct.close()
        if self._preparing is not None:  # registered like any accepted scan: recovered at the next start
            self._preparing[1].exception()
            self._finish_start()
        log.info("draining%s", f" ({self._stop_why})" if self._stop_why else "",
                 extra={"running": sorted(self.scans.running)})
        self.scans.interrupt(ended_too=False)
        deadline = time.monotonic() + self.config.drain_timeout_s
        for worker in list(self.scans.running.values()):
            while worker.thread.is_alive() and time.monotonic() < deadline and not self._hurry.is_set():
                self._log_signal_copies()
                worker.thread.join(min(0.2, max(0.0, deadline - time.monotonic())))
        self._log_signal_copies()
        if self._hurry.is_set():
            log.info("stop requested again: scans past scan_end are not waited for (kept in the spool)")
        self.scans.interrupt(ended_too=True)
        for worker in list(self.scans.running.values()):
            worker.thread.join(10.0)
            if worker.thread.is_alive():
                log.error("worker did not stop; its scan will be recovered from the spool",
                          extra={"scan_id": worker.session.scan_id})
        self.scans.reap()
        self._flush_outbox()
        self._rejections_log.flush(force=True)
        self.scans.close()
        self.metrics.up.set(0)
        self._guarded("housekeeping", self._report_kept)  # a report that fails must not fail the stop

    def _drain_sources(self) -> None:
        """Ask the detector sources to stop and take every message they deliver until they
        have returned (at most :data:`SOURCES_STOP_S`), before their sink closes and the scans
        are interrupted: images a source had received — in its socket's queue, being decoded,
        in its converter — reach the spool, and the scan stays open for the next start to resume.
        Until this the sink was closed first, and whatever the source delivered after was lost."""
        direct = self.direct
        direct.stop_sources()
        if not direct.sources_running and not direct.waiting:
            return
        deadline = time.monotonic() + SOURCES_STOP_S
        while True:
            if self._preparing is not None and self._preparing[1].done():
                self._finish_start()
            if self._preparing is None:
                # (back-pressure is not waited for: what the sources still hold is bounded, and
                # the scans are interrupted next, their frames spooled either way)
                while direct.waiting and self._preparing is None:
                    self._read_direct()
            if not direct.sources_running and not direct.waiting and self._preparing is None:
                return
            if time.monotonic() >= deadline:
                break
            self._guarded("housekeeping", self.scans.reap)
            if self._preparing is not None:
                futures_wait([self._preparing[1]], min(0.05, max(0.0, deadline - time.monotonic())))
            else:
                direct.wait_readable(0.05)
        lost = [(type(m).__name__, getattr(m, "scan_id", None)) for m, _ in direct.take(direct.waiting)]
        log.error("the detector source did not stop within %.0f s of the daemon's stop: the images it still "
                  "held are not spooled (%d messages waiting dropped: %s)", SOURCES_STOP_S, len(lost), lost[:10])

    def _report_kept(self) -> None:
        """Tell the operator which scans stopped without a final state: they are in the spool,
        and the next start finishes them (or, with recover off, the operator does)."""
        kept = [s for s in self.scans.sessions.values() if not s.state.final]
        known = {spool_path(self.config.spool_dir, s.scan_id) for s in kept}
        unfinished = unfinished_spools(self.config.spool_dir)
        # scans whose spool close failed: their journal keeps every frame (not "could not recover").
        # Each list below names its first few and counts the rest (named()): one line per item, two
        # 3 kB paths in each, made a stop with 5,000 pending raw copies write tens of MB of log
        unclosed = [f"{sid}: {why}" for sid, why in self.scans.unclosed.items()
                    if spool_path(self.config.spool_dir, sid) in unfinished]
        if unclosed:
            log.warning("%d spool files could not be closed: %s", len(unclosed), named(unclosed))
        known |= {spool_path(self.config.spool_dir, sid) for sid in self.scans.unclosed}
        # found held for writing at the start and still held: not refused, waiting for the writer
        held = self.scans.held_at_start()
        waiting = [p.name for p in unfinished if p not in known and p in held]
        if waiting:
            log.warning("%d unfinished spool files stay in %s, open for writing in another program, which this daemon "
                        "waited for to close them: the next start recovers them once it has (h5py: File.close(), or "
                        "end that Python session): %s", len(waiting), self.config.spool_dir, named(waiting))
        stranded = [p.name for p in unfinished if p not in known and p not in held and p in self.scans.unrecovered]
        if stranded:  # refused at the start ("cannot recover spool"): tried again at every start
            log.warning("%d unfinished spool files this daemon could not recover stay in %s (the reasons "
                        "were logged at the start): %s", len(stranded), self.config.spool_dir, named(stranded))
        # e.g. a scan stopped whose final status could not be written, or spools left with recover off
        left = [p.name for p in unfinished if p not in known and p not in self.scans.unrecovered]
        if left:
            log.warning("%d unfinished spool files stay in %s with their journals, which keep their frames: %s; %s",
                        len(left), self.config.spool_dir, named(left),
                        "the next start rebuilds and recovers them" if self.config.recover else
                        "recover is off (`cryoptycho replay` or `reconstruct` read them through their journals)")
        self._report_raw_pending()
        if not kept:
            if not unclosed:
                log.info("stopped with no unfinished scan")
            return
        # (a detector's series wait in the spool however many there are: named as the lists above)
        listed = named(f"{s.scan_id} ({'ended' if s.ended else 'open'}, {s.ledger.received} frames)" for s in kept)
        ids = {"kept": [s.scan_id for s in kept[:LOG_ITEMS_MAX]]}
        if self.config.recover:
            log.info("%d unfinished scans kept in the spool for the next start to finish: %s", len(kept), listed,
                     extra=ids)
        else:
            log.warning("%d unfinished scans kept in the spool, and recover is off: the next start leaves them "
                        "(`cryoptycho replay` or `reconstruct` their spool files in %s): %s", len(kept),
                        self.config.spool_dir, listed, extra=ids)

    def _report_raw_pending(self) -> None:
        """The stop's lines for the results that lack their raw frames: one per reason (still held,
        or each cause of a failed copy), naming the first few."""
        failures = self.scans.raw_failures()
        groups: dict[str, tuple[str, list[str]]] = {}
        for scan_id, (spool_file, result) in sorted(self.scans.raw_pending().items()):
            why, cause = failures.get(scan_id, ("", ""))
            # by an OSError's errno, else by the exception's type: a cause quoting its paths
            # ("result … is not that of spool …") differs for every scan
            entry = groups.setdefault(cause.split(":", 1)[0], (why, []))
            entry[1].append(f"{scan_id} (result {result}, spool {spool_file})")
        for kind, (why, listed) in groups.items():
            if not kind:
                said, then = ("their spools are still open for writing in another program",
                              "copies them once that program lets go")
            else:
                said = f"their copies failed ({why})" if len(listed) == 1 else \
                    f"their copies failed ({kind}; the first named: {why})"
                then = "tries again"
            log.warning("%d results lack their raw frames (/raw): %s; the spools are kept, each with its marker "
                        "(<spool>%s): the next start %s: %s", len(listed), said, PENDING_SUFFIX, then, named(listed))

    def close(self) -> None:
        self._prepare_pool.shutdown(wait=True)
        for sock in (getattr(self, n, None) for n in ("ingest", "publish", "control")):
            if sock is not None:
                sock.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        if self._metrics_server is not None:
            _stop_metrics_server(self._metrics_server)
        self.outbox.close()
        self.direct.release()
        self._stop_rx.close()
        self._stop_tx.close()

    # -- ingest ------------------------------------------------------------------------------
    def _read_ingest(self) -> None:
        began = time.thread_time()
        for _ in range(INGEST_BURST):
            try:
                parts = self.ingest.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            arrived = time.monotonic()
            t = self._clock()
            nbytes = sum(len(p.buffer) for p in parts)
            self.metrics.received_bytes.inc(nbytes)
            msg = None
            try:
                msg = decode(parts, self.limits, self._declared)
                self._handle(msg, arrived)
            except ProtocolError as exc:
                # accounted for from what this reading found: never decoded again (a header of a
                # million values cost the loop as much again for each reading)
                if msg is not None:  # decoded, then refused by the daemon's state
                    frames, start = (len(msg.indices) if isinstance(msg, Frames) else 0), isinstance(msg, ScanStart)
                else:
                    frames, start = exc.frames, exc.message_type == "scan_start"
                self._guarded("ingest", self._reject, exc, parts, frames, start)
            except Exception as exc:  # noqa: BLE001 - a bug or a storage fault: only this message's scan fails
                self._guarded("ingest", self._ingest_fault, exc, msg, parts)
            self._timed(t, "ingest message", _message_of, msg, nbytes)
            if self._preparing is not None or self.scans.backpressure():
                return
            if time.thread_time() - began >= BURST_CPU_S:
                return

    def _read_direct(self) -> None:
        """Messages of sources in this process: the ingest socket's checks, no decoding. Like
        the socket, reading pauses while a scan start is being prepared (order is kept)."""
        for _ in range(INGEST_BURST):
            taken = self.direct.take(1)
            if not taken:
                return
            msg, arrived = taken[0]
            if isinstance(msg, UnpositionedFrames):
                self._guarded("ingest", self._unpositioned, msg)
            else:
                self._take_direct(msg, arrived)
            if self._preparing is not None or self.scans.backpressure():
                return

    def _take_direct(self, msg: Any, arrived: float) -> None:
        """One message of a source in this process: checked, then handled as the socket's are."""
        detector = msg if isinstance(msg, DetectorFrames) else None
        if detector is not None:
            msg = detector.frames
        try:
            check_direct(msg, self.limits, self._declared)
            if detector is not None:
                check_chunks(detector, self._declared[msg.scan_id])
            if isinstance(msg, ScanStart):  # until _finish_start: a series refused is every frame lost
                self.scans.uncapped.add(msg.scan_id)
            self._handle(msg, arrived, detector)
        except (ProtocolError, ValueError) as exc:
            if isinstance(msg, ScanStart) and msg.scan_id not in self.scans.sessions:
                self.scans.uncapped.discard(msg.scan_id)  # refused before admission: no scan to exempt
            # a source builds messages in this process, so a value the daemon cannot use
            # (e.g. a probe its sampling cannot hold) arrives as a ValueError, not on the wire
            err = exc if isinstance(exc, ProtocolError) else ProtocolError(
                "message", "invalid", str(exc), getattr(msg, "scan_id", None))
            self._guarded("ingest", self._reject, err, [], len(msg.indices) if isinstance(msg, Frames) else 0,
                          isinstance(msg, ScanStart))
        except Exception as exc:  # noqa: BLE001 - a bug or a storage fault: only this message's scan fails
            self._guarded("ingest", self._ingest_fault, exc, msg, [])

    def _unpositioned(self, msg: UnpositionedFrames) -> None:
        """Detector frames a scan has no position for: kept in its spool while it is open."""
        session = self.scans.sessions.get(msg.scan_id)
        if session is None or session.state.final or msg.scan_id not in self.scans.spools:
            n = len(msg.image_ids)
            self.metrics.frames_dropped.labels(reason="scan_closed").inc(n)
            log.error("%d detector images without a position (ids %s…) arrived after scan %s closed; not kept",
                      n, msg.image_ids[:10].tolist(), msg.scan_id, extra={"scan_id": msg.scan_id})
            return
        self.scans.keep_unpositioned(session, msg.image_ids, msg.raw)

    def _reject(self, exc: ProtocolError, parts: list[Any], frames: int | None = None,
                start: bool | None = None) -> None:
        """Count, log and publish a refused message; ``frames`` it carried and whether it is a
        ``start`` (a scan_start) are read from ``parts`` where not given."""
        self.metrics.messages_rejected.labels(rule=exc.rule).inc()
        if start is None:
            start = _is_scan_start(parts, self.limits)
        if exc.scan_id is not None and exc.scan_id not in self.scans.sessions and start:
            # its producer polls `receipt` (PROTOCOL.md § 4.5): refused by the message checks
            # too, not only by the daemon's decisions, or it answers "unknown" for good
            self.scans.remember_refusal(exc.scan_id, str(exc))
        elif exc.rule == "unique_scan" and exc.scan_id in self.scans.sessions:
            # a second sender of this id: both producers' receipts say so (their frames of one
            # index are indistinguishable here, the first kept), rather than each a success
            self.scans.sessions[exc.scan_id].start_refused()
        n = _frames_in(parts, self.limits) if frames is None else frames
        if n:
            reason = {"known_scan": "unknown_scan", "open_scan": "scan_closed"}.get(exc.rule, "invalid")
            self.metrics.frames_dropped.labels(reason=reason).inc(n)
            session = self.scans.sessions.get(exc.scan_id) if exc.scan_id is not None else None
            if session is not None:  # its producer's receipt says why frames it sent are not held
                session.refused(n, f"{exc.field}: {exc.message} [rule {exc.rule}]")
        self._rejections_log(exc)
        self.publish_error(ErrorEvent.from_error(exc, time.time()))

    def _refuse(self, msg: ScanStart, exc: ScanRefused) -> None:
        self.metrics.scans.labels(outcome="refused").inc()
        self.scans.remember_refusal(msg.scan_id, str(exc))
        self.outbox.post("scan.rejected", ScanEvent(msg.scan_id, "rejected", str(exc),
                                                    {"field": exc.field, "rule": exc.rule}))
        raise ProtocolError(exc.field, exc.rule, exc.message, msg.scan_id) from None

    def _prepare(self, msg: ScanStart) -> tuple[ScanSpec, Any]:
        """The slow part of accepting a scan (probe model, positions, spool file); off the
        manager thread, which registers the scan when this is done (:meth:`_finish_start`)."""
        # stat calls: on a slow network file system they held the manager loop, every peer waiting
        self.scans.check_unique_files(msg.scan_id)
        spec = spec_from_scan_start(msg)
        return spec, self.scans.create_spool(spec)

    def _finish_start(self) -> None:
        assert self._preparing is not None
        (msg, future), self._preparing = self._preparing, None
        try:
            try:
                spec, spool = future.result()
            except ProtocolError as exc:  # its probe model or geometry cannot be built
                self._refuse(msg, ScanRefused(exc.field, exc.rule, exc.message))
            except ScanRefused as exc:  # no room for its spool file
                self._refuse(msg, exc)
            try:
                self.scans.start_scan(spec, spool)
            except ScanRefused as exc:
                self._refuse(msg, exc)
            self.scans.sessions[msg.scan_id].start_time_s = msg.time_s
            self._declared[msg.scan_id] = msg
            self.scans.admit()
        except ProtocolError as exc:  # refused: scan.rejected is out, now the error event
            self._reject(exc, [], start=True)
        except Exception as exc:  # noqa: BLE001 - logged, counted and published by _ingest_fault
            self._ingest_fault(exc, msg, [])
        finally:
            self.scans.uncapped.discard(msg.scan_id)

    def publish_error(self, event: ErrorEvent) -> None:
        """Publish an error event through the rate limit (see ERROR_BURST); thread-safe (the
        DECTRIS bridge reports its dropped series here). What it quotes from
        the bad message is bounded, and a scan id that is not one (too long, bad characters)
        moves into the text: subscribers must be able to read every event the daemon sends."""
        event = self._bounded(event)
        if self.error_throttle.admit(event.rule, event.scan_id, time.monotonic()):
            self.outbox.post("error", event)
        else:
            self.metrics.errors_suppressed.inc()

    def _bounded(self, event: ErrorEvent) -> ErrorEvent:
        """``event`` with its field and message clipped, and a scan id that is not one moved into
        the text. Every error event leaves through it: those of publish_error, and those the
        scans and workers post to the outbox themselves (_flush_outbox) — a raw_copy_pending
        event quotes two paths, which a configuration or a hostile scan id can make long."""
        sid = event.scan_id
        if sid is not None and (len(sid) > self.limits.max_scan_id_length or not re.fullmatch(SCAN_ID_PATTERN, sid)):
            event = replace(event, scan_id=None, message=f"{event.message} (scan_id {_clip(sid, 80)!r})")
        return replace(event, field=_clip(event.field, 256), message=_clip(event.message, 2048))

    def _ingest_fault(self, exc: Exception, msg: Any, parts: list[Any]) -> None:
        """An unexpected exception while handling an ingest message: log it with its traceback,
        count it, publish a named error and fail the scan it concerns; the daemon goes on."""
        sid = getattr(msg, "scan_id", None)
        if sid is None:
            try:
                sid = peek(parts, self.limits)[1]
            except ProtocolError:
                sid = None
        text = f"{type(exc).__name__}: {exc}"
        log.error("internal error on an ingest message: %s", text, exc_info=exc, extra={"scan_id": sid})
        self.metrics.internal_errors.labels(where="ingest").inc()
        self.publish_error(ErrorEvent("message", "internal_error", f"the daemon failed on this message: {text}",
                                       sid, time.time()))
        session = self.scans.sessions.get(sid) if sid is not None else None
        if session is not None:
            self._guarded("ingest", self.scans.fail_scan, session, f"internal error: {text}")
        elif isinstance(msg, ScanStart):  # it failed before it was registered: its producer waits for a verdict
            self.metrics.scans.labels(outcome="refused").inc()
            self.scans.remember_refusal(msg.scan_id, f"internal error: {text}")
            self.outbox.post("scan.rejected", ScanEvent(msg.scan_id, "rejected", f"internal error: {text}",
                                                        {"field": "message", "rule": "internal_error"}))

    def _guarded(self, where: str, fn: Any, *args: Any) -> None:
        """Run one step of the loop; an unexpected exception is logged, counted and published
        as an error event instead of ending the manager loop."""
        try:
            fn(*args)
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            log.error("internal error in %s: %s", where, text, exc_info=exc)
            self.metrics.internal_errors.labels(where=where).inc()
            self.outbox.post("error", ErrorEvent(where, "internal_error", text, None, time.time()))

    def _handle(self, msg: Any, arrived: float, detector: DetectorFrames | None = None) -> None:
        if isinstance(msg, ScanStart):
            try:
                # refuse from the declaration alone, before a probe or positions are built:
                # a scan that cannot fit must not hold up the loop (PROTOCOL.md § 7)
                # the id's spool and result files are looked for off this thread (_prepare)
                self.scans.admission(outline_from_scan_start(msg), files=False)
            except ScanRefused as exc:
                self.scans.uncapped.discard(msg.scan_id)
                self._refuse(msg, exc)
            future = self._prepare_pool.submit(self._prepare, msg)
            future.add_done_callback(lambda _: self.outbox.wake())
            self._preparing = (msg, future)
            return
        session = self.scans.sessions.get(msg.scan_id)
        if session is None:  # forgotten with the session history since it was declared
            raise ProtocolError("scan_id", "known_scan", f"scan {msg.scan_id!r} is no longer known", msg.scan_id)
        if isinstance(msg, Frames):
            if session.state.final or session.ended:
                raise ProtocolError("scan_id", "open_scan", f"scan {msg.scan_id!r} is {session.state.value}"
                                    + (" (scan_end received)" if session.ended else ""), msg.scan_id)
            if session.scan_id not in self.scans.spools:
                # cancelled or failed: its spool is closed while its worker stops the scan (its
                # state is still live); these frames can be kept nowhere, and are refused by name
                why = session.end_reason or session.error or "stopped"
                raise ProtocolError("scan_id", "open_scan", f"scan {msg.scan_id!r} is stopping ({why})", msg.scan_id)
            positions = frame_positions(msg, session.spec)
            self.scans.check_streamed_field(session, positions)
            self.scans.add_frames(session, msg.data, np.asarray(msg.indices, dtype=np.int64), positions, arrived,
                                  detector, msg.wire_data)
        elif isinstance(msg, ScanEnd):
            self.scans.end_scan(session, "scan_end", msg.frame_count)
            self.scans.admit()
        elif isinstance(msg, Abort):
            self.scans.abort_scan(session, msg.reason or "aborted by producer")

    # -- step timing -------------------------------------------------------------------------
    @staticmethod
    def _clock() -> tuple[float, float, float]:
        return time.perf_counter(), time.thread_time(), time.process_time()

    def _timed(self, start: tuple[float, float, float], step: str, detail: Any = None, *args: Any) -> None:
        """Log a step that took longer than SLOW_STEP_S, with the CPU time of this thread and of
        the whole process meanwhile: thread CPU ≈ wall is work on this thread; process CPU ≫
        thread CPU is other threads holding the interpreter lock; both ≪ wall is waiting for
        the host (its other processes, the disk)."""
        wall = time.perf_counter() - start[0]
        if wall <= SLOW_STEP_S:
            return
        cpu, proc = time.thread_time() - start[1], time.process_time() - start[2]
        what = detail(*args) if callable(detail) else detail  # described only when slow
        log.warning("slow manager step: %s%s took %.0f ms (CPU: %.0f ms this thread, %.0f ms the process)",
                    step, f" ({what})" if what else "", wall * 1e3, cpu * 1e3, proc * 1e3,
                    extra={"step": step, "wall_ms": round(wall * 1e3, 1), "cpu_ms": round(cpu * 1e3, 1),
                           "process_cpu_ms": round(proc * 1e3, 1)})

    # -- control -----------------------------------------------------------------------------
    def _read_control(self) -> None:
        began = time.thread_time()
        for _ in range(INGEST_BURST):
            try:
                parts = self.control.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            t = self._clock()
            self._guarded("control", self._answer, parts)
            self._timed(t, "control request", _method_of, parts)
            if time.thread_time() - began >= BURST_CPU_S:
                return

    def _answer(self, parts: list[Any]) -> None:
        self._later = None
        if self._refused_busy(parts):
            return
        reply = handle(parts, self.table, self.limits)
        later, self._later = self._later, None
        if not reply:
            return
        envelope = reply[: len(split_envelope(parts)[0])]
        client = bytes(envelope[0].buffer) if isinstance(envelope[0], zmq.Frame) else bytes(envelope[0])
        if later is None and client not in self._replies:
            self.control.send_multipart(reply, zmq.NOBLOCK, copy=False)
            return
        slot = _PendingReply(None if later is not None else reply)
        self._replies.setdefault(client, deque()).append(slot)
        if later is not None:
            method, start, answer = later

            def done(value: Any, error: Exception | None) -> None:
                slot.parts = envelope + self._late_reply(method, answer, value, error)
                self._send_ready(client)

            try:
                start(done)
            except Exception as exc:  # noqa: BLE001 - answered as the handler's failure, never left pending
                done(None, exc)
        self._send_ready(client)

    def _refused_busy(self, parts: list[Any]) -> bool:
        """Answer a request ``control_busy`` unhandled when its client has
        ``control_pending_replies`` replies waiting already (behind one made later: a receipt's
        look at a hung file system). A DEALER client may pipeline requests without reading, and
        each held a reply of up to ``max_header_bytes`` for as long as the first waited: one
        buggy client grew the daemon without bound. The refusals keep request order as every
        reply does, so they wait too, counted in one entry rather than held one by one."""
        if len(parts) < 2:
            return False
        client = bytes(parts[0].buffer) if isinstance(parts[0], zmq.Frame) else bytes(parts[0])
        pending = self._replies.get(client)
        most = self.config.control_pending_replies
        if pending is None or len(pending) < most:
            return False
        method = _method_of(parts)
        if method in self.table:
            self.metrics.control_requests.labels(method=method, success="false").inc()
        last = pending[-1]
        if last.repeat:  # the refusal before this one is still held: one more of the same
            # (up to the send queue ZeroMQ gives a peer: past it the router drops a reply to a
            # client that does not read anyway, and sending millions of them stalled this thread)
            last.repeat = min(last.repeat + 1, REFUSALS_SENT_MAX)
            return True
        if client not in self._busy_logged:
            self._busy_logged.add(client)
            log.warning("control client %s has %d replies waiting (control_pending_replies %d) behind a delayed "
                        "one: its requests are refused control_busy, unhandled, until it reads them (logged once "
                        "until its replies are sent)", client[:32].hex() + ("…" if len(client) > 32 else ""),
                        len(pending), most)
        envelope = [bytes(p.buffer) if isinstance(p, zmq.Frame) else bytes(p) for p in split_envelope(parts)[0]]
        reply = Reply(False, f"{len(pending)} replies to this client wait already (at most {most}, "
                             "control_pending_replies) behind a request whose answer is delayed: this request "
                             "was not handled; read the replies, then ask again",
                      {"field": "control", "rule": "control_busy"}, time.time())
        pending.append(_PendingReply(envelope + encode_reply(reply, method, self.limits), repeat=1))
        return True

    def control_replies_held(self) -> dict[str, int]:
        """Control clients with replies waiting to be sent, and the entries held for them (a run
        of ``control_busy`` refusals is one): read from another thread, a moment's picture."""
        queues = list(self._replies.values())
        return {"clients": len(queues), "entries": sum(len(q) for q in queues)}

    def reply_later(self, method: str, start: Callable[[Done], None],
                    answer: Callable[[Any, Exception | None], dict[str, Any]]) -> Later:
        """Called by a control handler whose answer needs the spool thread: the reply to this
        request is made by ``answer(value, error)`` once ``start`` has called ``done(value,
        error)`` (on the manager thread, e.g. through ScanManager.after_disk). Until then the
        loop goes on; replies to the same client stay in request order."""
        self._later = (method, start, answer)
        return Later()  # not sent: the reply made later replaces it

    def _late_reply(self, method: str, answer: Callable[[Any, Exception | None], dict[str, Any]], value: Any,
                    error: Exception | None) -> list[Any]:
        """The parts of a reply made later, exactly as ``dispatch`` makes them (a raised
        ProtocolError names field and rule, any other exception is an internal error)."""
        reply = dispatch({method: lambda: answer(value, error)}, Request(method, {}))
        self.metrics.control_requests.labels(method=method, success=str(reply.success).lower()).inc()
        reply.time_s = time.time()
        return encode_reply(reply, method, self.limits)

    def _send_ready(self, client: bytes) -> None:
        pending = self._replies.get(client)
        while pending and pending[0].parts is not None:
            slot = pending.popleft()
            for _ in range(max(slot.repeat, 1)):
                self.control.send_multipart(slot.parts, zmq.NOBLOCK, copy=False)
        if pending is not None and not pending:
            del self._replies[client]
            self._busy_logged.discard(client)  # its episode is over: the next one is logged again

    # -- publish -----------------------------------------------------------------------------
    def _flush_outbox(self) -> None:
        summary = self.error_throttle.summary(time.monotonic())
        if summary is not None:
            self.outbox.post("error", summary)
        for topic, payload in self.outbox.take():
            try:
                message = to_message(topic, payload)
                if isinstance(message, ErrorEvent):  # (posted by the scans and workers: not clipped yet)
                    message = self._bounded(message)
                try:
                    parts = encode_event(message)
                except UnicodeEncodeError:
                    # a path quoted from a directory whose name is no UTF-8 (``--spool-dir`` given
                    # in bytes Python holds as surrogates): the event goes out with them written
                    # \xff, not lost for a "could not be published"
                    parts = encode_event(replace(message, **{
                        f.name: encodable(getattr(message, f.name)) for f in fields(message)
                        if isinstance(getattr(message, f.name), (str, dict, list, tuple))}))
            except Exception as exc:  # a post the wire cannot carry: say so instead of dying
                text = f"{type(exc).__name__}: {exc}"
                log.error("cannot publish %s: %s", topic, text, exc_info=exc)
                self.metrics.internal_errors.labels(where="publish").inc()
                sid = payload.get("scan_id") if isinstance(payload, dict) else getattr(payload, "scan_id", None)
                parts = encode_event(ErrorEvent("publish", "internal_error", f"{topic} could not be published: {text}",
                                                sid if isinstance(sid, str) else None, time.time()))
            try:
                self.publish.send_multipart(parts, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass  # only when every subscriber is over its HWM: they skip this message

    # -- housekeeping ------------------------------------------------------------------------
    def _disk_free(self) -> None:
        """The spool and results file systems' free bytes: over months, the spool files of
        aborted and failed scans (kept for `finish_scan` and `replay`) and the results fill them,
        and at disk_reserve_bytes new scans are refused; the gauge lets an alert come first."""
        for name, directory in (("spool", self.config.spool_dir), ("results", self.config.results_dir)):
            self.metrics.disk_free.labels(dir=name).set(shutil.disk_usage(directory).free)

    def _housekeeping(self) -> None:
        self._rejections_log.flush()
        self.scans.check_timeouts()
        self.scans.retry_raw_copies()
        self.scans.retry_reopens()
        self._recovered(self.scans.retry_held_recoveries())
        self.scans.admit()
        self.metrics.queue_depth.set(self.scans.queued_frames())
        _gpu_memory(self.metrics, self.config.options.backend)
        now = time.monotonic()
        if now - self._disk_checked >= DISK_CHECK_S:
            self._disk_checked = now
            self._disk_free()
        for scan_id in [s for s in self._declared if s not in self.scans.sessions]:
            del self._declared[scan_id]  # forgotten with the session history
        self._release_idle_memory(now)

    def _release_idle_memory(self, now: float) -> None:
        """Once no scan has been live for ``release_memory_idle_s``, give the freed message
        memory that keep_message_memory keeps resident back to the kernel (malloc_trim), once
        per idle spell: kept, it stayed resident for ever at the most the daemon ever held, on a
        daemon that runs for years. Trimmed while idle only: a scan's next messages reuse it."""
        after = self.config.release_memory_idle_s
        if not self._memory_kept or after <= 0:
            return
        ingested, self._ingested = self._ingested, False
        if (ingested or self._preparing is not None
                or any(not s.state.final for s in self.scans.sessions.values())):
            self._live_at, self._released = now, False
            return
        if self._released or now - self._live_at < after:
            return
        self._released = True
        # off the manager thread: trimming gigabytes (madvise page by page) must not hold up ping
        threading.Thread(target=self._trim, args=(now - self._live_at,), name="malloc-trim", daemon=True).start()

    def _trim(self, idle_s: float) -> None:
        try:
            before, t0 = resident_bytes(), time.monotonic()
            release_free_memory()
            after = resident_bytes()
            log.info("idle for %.0f s: freed message memory given back to the kernel (malloc_trim, %.2f s): "
                     "resident %s → %s MB", idle_s, time.monotonic() - t0,
                     "?" if before is None else f"{before / 2**20:.0f}", "?" if after is None else f"{after / 2**20:.0f}")
        except Exception as exc:  # the daemon goes on with the memory kept
            log.error("giving idle memory back failed: %s", exc, exc_info=exc)
            self.metrics.internal_errors.labels(where="housekeeping").inc()


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


@dataclass
class _PendingReply:
    parts: list[Any] | None  #: None until the reply is made
    #: a ``control_busy`` refusal sent this many times (requests refused in a row), else 0
    repeat: int = 0


def _message_of(msg: Any, nbytes: int) -> str:
    return f"{getattr(msg, 'type', 'undecodable')} {_clip(repr(getattr(msg, 'scan_id', '')), 80)}, {nbytes} bytes"


#: a request header larger than this is not read again to name its method in the slow-step log
METHOD_LOG_HEADER_BYTES = 64 * 1024


def _method_of(parts: list[Any]) -> str:
    """The method a control request named, for the slow-step log (never raises). A large
    header is described by its size: reading a header bomb again to log it cost as much as
    answering it."""
    try:
        body = split_envelope(parts)[1]
        size = memoryview(body[0].buffer if isinstance(body[0], zmq.Frame) else body[0]).nbytes
        if size > METHOD_LOG_HEADER_BYTES:
            return f"request of {size} bytes"
        header = read_header(body, Limits())
        return _clip(str(header.get("method")), 60)
    except Exception:  # noqa: BLE001 - a malformed request is logged as such, its reply says why
        return "malformed request"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


#: With an HWM of one message libzmq 4.3.5 never delivered a CURVE producer's messages
#: (tests/test_deploy_curve.py hung at the scan's start; two passed): a floor with a margin.
MIN_INGEST_HWM = 4


def ingest_hwm(queue_bytes: int, limits: Limits) -> int:
    """ZMQ_RCVHWM of the ingest socket: ``queue_bytes`` of messages as large as the limits allow
    (at least :data:`MIN_INGEST_HWM`). ZeroMQ fixes a connection's HWM when the peer connects
    (changing it later does not reach open connections), before a scan declares its frame size,
    so the bound is derived from the largest message any scan may send, not from a declared one."""
    return max(MIN_INGEST_HWM, queue_bytes // limits.max_message_bytes)


def _is_scan_start(parts: list[Any], limits: Limits) -> bool:
    """Whether a refused message is a readable scan_start (its header at least)."""
    try:
        return peek(parts, limits)[0] == "scan_start"
    except ProtocolError:
        return False


def _frames_in(parts: list[Any], limits: Limits) -> int:
    """Frames a refused message carried (0 when it is not a readable frames message)."""
    try:
        if peek(parts, limits)[0] != "frames":
            return 0
        _, arrays, _ = unpack(parts, limits)
        return int(np.size(arrays.get("indices", ())))
    except ProtocolError:
        return 0


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
