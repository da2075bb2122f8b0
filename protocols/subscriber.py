"""``Subscriber``: iterate the daemon's published events, newest preview first-class.

ZMQ_CONFLATE cannot be used (it breaks multipart messages), so latest-only delivery is done
here. A reader thread drains the SUB socket all the time, whatever the caller does; of what is
pending it keeps only the newest ``preview``/``metrics`` per scan, while scan events, results
and errors are all kept, in order (up to ``max_backlog`` events and ``max_backlog_bytes``; beyond
them the oldest are dropped and
the next ``recv`` raises :class:`EventsDropped`). Every ``recv`` first has the reader drain what
has already arrived, so it returns the newest image there is.

Why a thread: ZeroMQ answers the daemon's heartbeat PING only once it has read past what was
sent before it. A caller that read one message per half second let that PING wait behind
megabytes of previews queued in the SUB socket and TCP; its PONG came after the daemon's
heartbeat timeout, the daemon dropped a live subscriber, and what was in flight and what was
published until it reconnected (a final result included) was lost. A suspended process
(Ctrl-Z) stops its reader too, and is still disconnected.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from .client import SocketClient, connect
from .errors import ProtocolError
from .limits import Limits
from .security import ClientCurve
from .topics import CONFLATED_TOPICS, Event, decode_event, topic_of

DEFAULT_PUBLISH = "tcp://127.0.0.1:5601"
#: ordered events (everything when ``latest_only=False``) held for a caller that does not read
DEFAULT_MAX_BACKLOG = 10_000
#: and their bytes: with ``latest_only=False`` previews are ordered events too (5 MB each for a
#: 660 x 660 canvas), and a caller that stopped reading must not take the host's memory
DEFAULT_MAX_BACKLOG_BYTES = 1 << 30
#: messages one drain reads before it answers a waiting ``recv``: under a flood faster than
#: decoding, "drain until the socket is empty" would never end
DRAIN_BATCH = 1000

log = logging.getLogger(__name__)


class EventsDropped(RuntimeError):
    """Raised once by ``recv`` where the oldest ``count`` ordered events were dropped because
    more than ``max_backlog`` (or ``max_backlog_bytes``) waited unread; the following ``recv``
    goes on with the rest."""

    def __init__(self, count: int, max_backlog: int, max_backlog_bytes: int) -> None:
        super().__init__(
            f"{count} published events were dropped unread: more than {max_backlog} events or "
            f"{max_backlog_bytes} bytes waited (read faster, raise max_backlog/max_backlog_bytes, "
            "or reconcile through the control socket's list_scans)"
        )
        self.count = count


class SubscriberFailed(RuntimeError):
    """The subscriber's reader thread ended on an exception (its ``__cause__``): nothing more
    can be received."""


class _Reader:
    """The socket, its reader thread and what it has read; holds no reference to the
    ``Subscriber``, so an unclosed one is still collected (and its reader stopped)."""

    def __init__(self, sock: zmq.Socket, monitor: zmq.Socket, latest_only: bool, skip_invalid: bool, limits: Limits,
                 max_backlog: int, max_backlog_bytes: int) -> None:
        self.sock = sock
        self.latest_only = latest_only
        self.skip_invalid = skip_invalid
        self.limits = limits
        self.max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self.invalid = 0
        self.skipped = 0
        self.dropped = 0
        #: connections made: more than one means the daemon dropped or lost this subscriber
        #: once, and what it published meanwhile was not received
        self.connections = 0
        self.monitor = monitor
        self.unreported_drops = 0
        self.cond = threading.Condition()
        # seq → item; a conflated topic's pending item is replaced by deleting its entry and
        # adding the newer one at the end: the newest keeps its place in the stream
        self.pending: OrderedDict[int, Event | ProtocolError] = OrderedDict()
        self.latest: dict[tuple[str, str], int] = {}  # conflated (topic, scan) → its seq in pending
        self.ordered = 0  # pending items that are not conflated
        self.ordered_bytes = 0  # and their message sizes
        self.sizes: dict[int, int] = {}  # seq → message size, of ordered items
        self.seq = 0
        self.requested = 0  # drain requests made by callers
        self.served = 0  # drain requests answered by the reader
        self.stopping = False
        self.failure: BaseException | None = None
        self.finished = False
        # a socket pair, not a ZeroMQ one: any caller thread may write to it
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.thread = threading.Thread(target=self.run, name="cryoptycho-subscriber", daemon=True)

    # --- caller side ----------------------------------------------------------------------
    def wake(self) -> None:
        try:
            self.wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a full pipe already wakes the reader; a closed one means it has stopped

    def request_drain(self) -> int:
        with self.cond:
            self.requested += 1
            ticket = self.requested
        self.wake()
        return ticket

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
        self.wake()

    # --- reader thread --------------------------------------------------------------------
    def run(self) -> None:
        try:
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            poller.register(self.wake_r.fileno(), zmq.POLLIN)
            poller.register(self.monitor, zmq.POLLIN)
            while True:
                ready = dict(poller.poll())
                if self.monitor in ready:
                    self._count_connections()
                if self.wake_r.fileno() in ready:
                    self._clear_wake()
                # read after clearing the wake bytes: a request whose byte was consumed here
                # was counted before, and is answered by this drain
                with self.cond:
                    if self.stopping:
                        break
                    target = self.requested
                self._drain()
                with self.cond:
                    self.served = max(self.served, target)
                    self.cond.notify_all()
        except BaseException as exc:  # surfaced by every later recv, and logged for those not reading
            log.error("subscriber reader thread failed", exc_info=exc)
            with self.cond:
                self.failure = exc
        finally:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass  # the context is terminated: the monitor is going anyway
            self.monitor.close(linger=0)
            self.sock.close(linger=0)
            self.wake_r.close()
            with self.cond:
                self.finished = True
                self.cond.notify_all()

    def _count_connections(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            with self.cond:
                self.connections += event == zmq.EVENT_CONNECTED

    def _clear_wake(self) -> None:
        while True:
            try:
                if not self.wake_r.recv(4096):
                    return
            except BlockingIOError:
                return

    def _drain(self) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                item: Event | ProtocolError = decode_event(parts, self.limits)
            except ProtocolError as exc:
                with self.cond:
                    self.invalid += 1
                if self.skip_invalid:
                    continue
                item = exc
            self._add(item, sum(len(part) for part in parts))

    def _add(self, item: Event | ProtocolError, size: int) -> None:
        with self.cond:
            self.seq += 1
            key = None
            if self.latest_only and not isinstance(item, ProtocolError) and topic_of(item) in CONFLATED_TOPICS:
                key = (topic_of(item), item.scan_id)
                older = self.latest.get(key)
                if older is not None:
                    del self.pending[older]
                    self.skipped += 1
                self.latest[key] = self.seq
            else:
                self.ordered += 1
                self.ordered_bytes += size
                self.sizes[self.seq] = size
            self.pending[self.seq] = item
            # the newest event is kept whatever its size
            while self.ordered > self.max_backlog or (
                self.ordered > 1 and self.ordered_bytes > self.max_backlog_bytes
            ):
                self._drop_oldest_ordered()
            self.cond.notify_all()

    def _drop_oldest_ordered(self) -> None:
        # the conflated items ahead of it are at most two per scan
        for seq, item in self.pending.items():
            if not self._conflated(seq, item):
                del self.pending[seq]
                self.ordered -= 1
                self.ordered_bytes -= self.sizes.pop(seq)
                self.dropped += 1
                self.unreported_drops += 1
                return

    def _conflated(self, seq: int, item: Event | ProtocolError) -> bool:
        return (
            self.latest_only
            and not isinstance(item, ProtocolError)
            and self.latest.get((topic_of(item), item.scan_id)) == seq
        )

    def pop(self) -> Event | ProtocolError | None:
        """The next pending item (caller holds ``cond``), or None."""
        if self.unreported_drops:
            count, self.unreported_drops = self.unreported_drops, 0
            raise EventsDropped(count, self.max_backlog, self.max_backlog_bytes)
        if not self.pending:
            return None
        seq, item = self.pending.popitem(last=False)
        if self._conflated(seq, item):
            del self.latest[(topic_of(item), item.scan_id)]  # type: ignore[union-attr]
        else:
            self.ordered -= 1
            self.ordered_bytes -= self.sizes.pop(seq)
        return item


class Subscriber(SocketClient):
    """Subscribe to topic prefixes (``""`` = everything) of a daemon's publish socket.

    ``for event in Subscriber(...)`` blocks for ever; ``recv(timeout_s)`` returns None on
    timeout. A malformed message raises :class:`ProtocolError` at its place in the stream
    (pass ``skip_invalid=True`` to drop and count it in ``invalid`` instead). A reader thread
    keeps the socket drained, so a caller that reads slowly stays connected; at most
    ``max_backlog`` scan events, results and errors (``max_backlog_bytes`` of them) wait for it
    (the oldest beyond are dropped,
    counted in ``dropped``, and the next ``recv`` raises :class:`EventsDropped`).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_PUBLISH,
        topics: Sequence[str] = ("",),
        *,
        latest_only: bool = True,
        rcvhwm: int = 32,
        skip_invalid: bool = False,
        limits: Limits | None = None,
        curve: ClientCurve | None = None,
        context: zmq.Context | None = None,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        max_backlog_bytes: int = DEFAULT_MAX_BACKLOG_BYTES,
    ) -> None:
        if max_backlog < 1 or max_backlog_bytes < 1:
            raise ValueError(f"max_backlog and max_backlog_bytes must be at least 1, not "
                             f"{max_backlog} and {max_backlog_bytes}")
        self.endpoint = endpoint
        self.latest_only = latest_only
        self.skip_invalid = skip_invalid
        self.limits = limits or Limits()
        monitors: list[zmq.Socket] = []

        def prepare(sock: zmq.Socket) -> None:
            for t in topics:
                sock.setsockopt(zmq.SUBSCRIBE, t.encode())
            # attached before connecting: a connection made first is not told to a monitor
            monitors.append(sock.get_monitor_socket(zmq.EVENT_CONNECTED))

        try:
            sock = connect(zmq.SUB, endpoint, curve=curve, context=context, rcvhwm=rcvhwm,
                           before_connect=prepare)
        except BaseException:
            for monitor in monitors:
                monitor.close(linger=0)
            raise
        self._socket = sock
        self._reader = _Reader(sock, monitors[0], latest_only, skip_invalid, self.limits, max_backlog,
                              max_backlog_bytes)
        self._reader.thread.start()
        # an unclosed subscriber still stops its reader (and closes its socket) when collected
        self._finalizer = weakref.finalize(self, _Reader.stop, self._reader)

    @property
    def invalid(self) -> int:
        """Malformed messages received (raised, or dropped with ``skip_invalid``)."""
        return self._reader.invalid

    @property
    def skipped(self) -> int:
        """Stale previews/metrics dropped by ``latest_only``."""
        return self._reader.skipped

    @property
    def dropped(self) -> int:
        """Ordered events dropped because more than ``max_backlog`` (or ``max_backlog_bytes``)
        waited unread."""
        return self._reader.dropped

    @property
    def connections(self) -> int:
        """Connections made to the daemon so far; more than one means it was lost (or dropped
        this subscriber) and reconnected, and events published meanwhile were missed."""
        return self._reader.connections

    def recv(self, timeout_s: float | None = None) -> Event | None:
        """The next event, or None when nothing arrives within ``timeout_s`` (None = wait).

        What has already arrived is drained first, so a preview returned is the newest one."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        reader = self._reader
        ticket = reader.request_drain()
        with reader.cond:
            while True:
                self._check(reader)
                if reader.served < ticket:
                    # the drain asked for comes first, whatever the timeout (recv(0) drains
                    # too): the reader answers it after at most DRAIN_BATCH messages
                    reader.cond.wait()
                    continue
                item = reader.pop()
                if item is not None:
                    break
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return None
                reader.cond.wait(wait)
        if isinstance(item, ProtocolError):
            raise item
        return item

    @staticmethod
    def _check(reader: _Reader) -> None:
        if reader.failure is not None:
            raise SubscriberFailed(f"the subscriber's reader thread failed: {reader.failure!r}") from reader.failure
        if reader.finished or reader.stopping:
            raise zmq.ZMQError(zmq.ENOTSOCK, "the subscriber is closed")

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.recv()
            if event is not None:
                yield event

    def close(self) -> None:
        self._reader.stop()
        if threading.current_thread() is not self._reader.thread:
            self._reader.thread.join()
        self._reader.wake_w.close()
        self._finalizer.detach()
