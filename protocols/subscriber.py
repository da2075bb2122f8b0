"""``Subscriber``: iterate the daemon's published events, newest preview first-class.

ZMQ_CONFLATE cannot be used (it breaks multipart messages), so latest-only delivery is done
here: a small receive high-water mark bounds what queues in the socket, and every ``recv``
drains what has already arrived and keeps only the newest ``preview``/``metrics`` per scan,
while scan events, results and errors are all delivered, in order. A slow viewer therefore
skips stale images and never slows the daemon (PUB drops for a subscriber whose queue is full).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence

import zmq

from .client import SocketClient, connect
from .errors import ProtocolError
from .limits import Limits
from .security import ClientCurve
from .topics import CONFLATED_TOPICS, Event, decode_event, topic_of

DEFAULT_PUBLISH = "tcp://127.0.0.1:5601"


class Subscriber(SocketClient):
    """Subscribe to topic prefixes (``""`` = everything) of a daemon's publish socket.

    ``for event in Subscriber(...)`` blocks for ever; ``recv(timeout_s)`` returns None on
    timeout. A malformed message raises :class:`ProtocolError` at its place in the stream
    (pass ``skip_invalid=True`` to drop and count it in ``invalid`` instead).
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
    ) -> None:
        self.endpoint = endpoint
        self.latest_only = latest_only
        self.skip_invalid = skip_invalid
        self.limits = limits or Limits()
        self.invalid = 0
        self.skipped = 0  #: stale previews/metrics dropped by latest_only
        self._pending: deque[Event | ProtocolError] = deque()
        self._socket = connect(zmq.SUB, endpoint, curve=curve, context=context, rcvhwm=rcvhwm)
        for t in topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, t.encode())

    def recv(self, timeout_s: float | None = None) -> Event | None:
        """The next event, or None when nothing arrives within ``timeout_s`` (None = wait)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._socket.poll(None if wait is None else int(wait * 1000)):
                self._drain()
            # skipped invalid messages must not extend the wait beyond the deadline
            if not self._pending and deadline is not None and time.monotonic() >= deadline:
                return None
        item = self._pending.popleft()
        if isinstance(item, ProtocolError):
            raise item
        return item

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.recv()
            if event is not None:
                yield event

    def _drain(self) -> None:
        batch: list[Event | ProtocolError] = []
        while True:
            try:
                parts = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                batch.append(decode_event(parts, self.limits))
            except ProtocolError as exc:
                self.invalid += 1
                if not self.skip_invalid:
                    batch.append(exc)
        if self.latest_only:
            batch = self._conflate(batch)
        self._pending.extend(batch)

    def _conflate(self, batch: list[Event | ProtocolError]) -> list[Event | ProtocolError]:
        newest: dict[tuple[str, str], int] = {}
        for i, item in enumerate(batch):
            if not isinstance(item, ProtocolError) and topic_of(item) in CONFLATED_TOPICS:
                newest[(topic_of(item), item.scan_id)] = i
        keep = []
        for i, item in enumerate(batch):
            if (
                not isinstance(item, ProtocolError)
                and topic_of(item) in CONFLATED_TOPICS
                and newest[(topic_of(item), item.scan_id)] != i
            ):
                self.skipped += 1
                continue
            keep.append(item)
        return keep
