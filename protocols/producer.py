"""The producer side of ingest: ``Producer`` streams scans to the daemon over PUSH → PULL.

Delivery (PROTOCOL.md § Delivery): a PUSH socket cannot say what the daemon received, so
``end_scan()`` and ``flush()`` ask the daemon's control socket (method ``receipt``) until it holds
every frame the producer was given, and raise :class:`~.errors.DeliveryError` naming the frames it
does not hold (or :class:`~.errors.DeliveryTimeout` when it stops acknowledging). Backpressure:
at most ``hwm`` messages wait in the producer; beyond that ``send_frames`` blocks until the
daemon reads, and ``send_timeout_s`` turns a stall into :class:`~.errors.ProducerTimeout`.
Nothing is dropped and nothing queues without bound. Every message is checked with the daemon's
own rules before it leaves.
"""

from __future__ import annotations

import atexit
import math
import re
import time
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import zmq

# pyzmq releases zero-copy buffers through a collector that it stops at interpreter exit; importing
# it here registers its exit hook before ours (below), and exit hooks run last-in first-out: open
# producers are closed (their queues sent, their contexts terminated) while the collector still
# holds the buffers. The other order freed buffers under the I/O thread (SIGSEGV).
import zmq.utils.garbage

from . import validate
from .client import SocketClient, connect
from .control import ControlClient
from .errors import (
    ControlError,
    ControlTimeout,
    DeliveryError,
    DeliveryTimeout,
    ProducerTimeout,
    ProtocolError,
)
from .limits import Limits
from .messages import Abort, Frames, Message, ScanEnd, ScanStart, encode
from .security import ClientCurve
from .wire import wire_dtype

DEFAULT_INGEST = "tcp://127.0.0.1:5600"
#: the daemon's default layout: ingest port, publish port + 1, control port + 2
CONTROL_PORT_OFFSET = 2
_FINAL_STATES = ("finished", "aborted", "failed")
#: seconds a producer waits before it asks again after a ``file_checks_busy`` receipt
BUSY_PAUSE_S = 0.1


def control_endpoint_for(ingest: str) -> str:
    """The control endpoint of a daemon laid out like ``serve``'s defaults (ingest port + 2)."""
    match = re.fullmatch(r"(tcp://.+):(\d+)", ingest)
    if match is None:
        raise ValueError(
            f"cannot derive the daemon's control endpoint from {ingest!r}: give control=... "
            "(or confirm=False to send without a delivery guarantee)"
        )
    return f"{match[1]}:{int(match[2]) + CONTROL_PORT_OFFSET}"


@dataclass(frozen=True)
class Receipt:
    """The daemon's acknowledgement of a scan, as ``end_scan()``/``flush()`` return it."""

    scan_id: str
    sent: int  #: distinct frame indices the producer was given
    acknowledged: int | None  #: frames the daemon holds (spooled); None when not confirmed
    state: str | None = None  #: the scan's state in the daemon
    ended: bool = False  #: the daemon read the scan's end (or ended it itself, see end_reason)
    end_reason: str | None = None
    elapsed_s: float = 0.0  #: from start_scan() to this acknowledgement
    daemon: dict[str, Any] = field(default_factory=dict)  #: the daemon's full ``receipt`` answer

    @property
    def rate(self) -> float:
        """Acknowledged frames per second since start_scan() (0 when not confirmed)."""
        return (self.acknowledged or 0) / max(self.elapsed_s, 1e-9)


class Hook(Protocol):
    """Rewrites the stream on its way out (see :class:`.faults.Faults`)."""

    def process(self, msg: Message, parts: list[Any]) -> Iterable[list[Any]]: ...

    def flush(self) -> Iterable[list[Any]]: ...


class Producer(SocketClient):
    """Send scans to a daemon. Use as a context manager::

        with Producer("tcp://127.0.0.1:5600") as p:
            p.start_scan(scan_id="s1", energy_eV=300e3, frame_shape=(64, 64), frame_dtype="uint16",
                         expected_frames=n, pixel_size_m=1e-10, probe_model=ProbeModelSpec(),
                         positions_m=positions)
            p.send_frames(frames)          # (n, 64, 64) uint16, any batch size
            receipt = p.end_scan()         # returns once the daemon holds every frame

    ``control`` is the daemon's control endpoint, through which ``end_scan()`` and ``flush()``
    confirm delivery; by default it is derived from ``endpoint`` (port + 2, ``serve``'s layout).
    ``confirm=False`` sends without that guarantee (relays, bare PULL sockets): ``end_scan()``
    then returns once the messages are queued, and ``close()`` waits up to its linger for them
    to leave. An exception inside the ``with`` block aborts the open scan. Arrays passed in are
    sent without a copy when large: do not write into them before ``flush()`` or ``end_scan()``
    returned (with ``confirm=False``: before ``close()``); the producer keeps them alive.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_INGEST,
        *,
        control: str | None = None,
        confirm: bool = True,
        limits: Limits | None = None,
        send_timeout_s: float | None = 30.0,
        hwm: int = 64,
        compression: str = "none",
        batch_frames: int = 256,
        checksum: bool = False,
        curve: ClientCurve | None = None,
        context: zmq.Context | None = None,
        hook: Hook | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.limits = limits or Limits()
        if compression not in self.limits.compressions:
            raise ValueError(
                f"compression {compression!r} is not one of {self.limits.compressions}"
            )
        if batch_frames < 1:
            raise ValueError("batch_frames must be ≥ 1")
        self.compression = compression
        self.batch_frames = min(batch_frames, self.limits.max_frames_per_message)
        self.send_timeout_s = send_timeout_s
        self.hook = hook
        self.checksum = checksum
        self.confirm = confirm
        self.control = (control or control_endpoint_for(endpoint)) if confirm else control
        self._curve = curve
        # an own context, terminated by close(): only zmq_ctx_term waits for queued messages
        # (a socket's linger alone does not), and it must run before the interpreter exits
        self._own_context = context is None
        self._ctx = zmq.Context() if context is None else context
        self._socket = connect(
            zmq.PUSH,
            endpoint,
            curve=curve,
            context=self._ctx,
            sndhwm=hwm,
            sndtimeo=-1 if send_timeout_s is None else int(send_timeout_s * 1000),
        )
        self._control: ControlClient | None = None
        self._helpers: list[ControlClient] = []  #: closed before the context is terminated
        self._finalizer = weakref.finalize(
            self, _shutdown, self._socket, self._helpers,
            self._ctx if self._own_context else None, _linger_ms(send_timeout_s),
        )
        self._finalizer.atexit = False  # _close_at_exit does it, in the right order
        _open.add(self)
        self.scan: ScanStart | None = None
        self.scan_start_time_s: float | None = None
        self.frames_sent = 0
        self._next_index = 0
        self._given = np.zeros(0, dtype=bool)  #: frame indices given to this scan (delivery check)
        self._stale_refusal: float | None = None  #: an earlier refusal of the open scan's id
        self._started = 0.0
        self._stalled = False  #: a send or confirmation timed out: close() does not linger
        #: the daemon's last ``file_checks_busy`` answer, until it answers a receipt: a timeout names it
        self._busy: str | None = None
        #: the daemon's max_message_bytes, from its receipt before a scan (None: not told). Its
        #: ingest socket disconnects a sender as soon as a larger part arrives, and the message
        #: is lost: messages are sized below it, and one that cannot be is refused here, by name
        self.daemon_max_message_bytes: int | None = None

    # -- scan lifecycle ------------------------------------------------------------------------

    def start_scan(self, start: ScanStart | None = None, /, **fields: Any) -> ScanStart:
        """Open a scan from a ScanStart or its fields (``scan_id`` defaults to a fresh UUID)."""
        if self.scan is not None:
            raise RuntimeError(
                f"scan {self.scan.scan_id!r} is still open; end_scan() or abort() it first"
            )
        if start is None:
            fields.setdefault("scan_id", f"scan-{uuid.uuid4().hex[:12]}")
            start = ScanStart(**fields)
        elif fields:
            raise TypeError("pass either a ScanStart or its fields, not both")
        validate.check(start, self.limits)
        self._started = time.monotonic()
        if self.confirm:
            self._check_new_scan(start.scan_id)
        self.send(start)
        self.scan, self.frames_sent, self._next_index = start, 0, 0
        #: the time_s this producer stamped its scan_start with (send() sets it): its receipts name it
        self.scan_start_time_s = start.time_s
        self._given = np.zeros(max(int(start.expected_frames), 1), dtype=bool)
        return start

    @property
    def frames_given(self) -> int:
        """Distinct frame indices given to the open (or last) scan: what the daemon must hold."""
        return int(np.count_nonzero(self._given))

    def send_frames(
        self,
        data: np.ndarray,
        indices: Any = None,
        positions_m: Any = None,
        compression: str | None = None,
    ) -> int:
        """Send (n, M, M) frames in the scan's dtype, split into messages of ``batch_frames``.

        ``indices`` default to the next n indices; ``positions_m`` (n, 2) only when the scan
        streams its positions. Returns the number of frames sent.
        """
        scan = self._open()
        data = np.asarray(data)
        if data.ndim == 2:
            data = data[None]
        n = data.shape[0]
        idx = (
            np.arange(self._next_index, self._next_index + n)
            if indices is None
            else np.asarray(indices)
        )
        if idx.shape != (n,):
            raise ValueError(f"indices shape {idx.shape} does not match {n} frames")
        if idx.size and (idx.min() < 0 or idx.max() > np.iinfo(np.uint32).max):
            raise ValueError("frame indices must lie in [0, 2**32)")
        pos = None if positions_m is None else np.asarray(positions_m, dtype=np.float64)
        codec = compression or self.compression
        if data.dtype.kind == "f" and scan.frame_dtype == "float32":
            data = data.astype(np.float32, copy=False)
        elif data.dtype.kind not in "ui" or wire_dtype(data.dtype) != scan.frame_dtype:
            raise ValueError(f"frames are {data.dtype}, the scan declared {scan.frame_dtype}")
        step = self._batch_size(data)
        for lo in range(0, n, step):
            sl = slice(lo, lo + step)
            msg = Frames(
                scan.scan_id,
                idx[sl].astype(np.uint32),
                data[sl],
                None if pos is None else pos[sl],
                codec,
                time.time(),
            )
            validate.check(msg, self.limits, scan)
            self.send(msg)
            self._mark_given(msg.indices)  # after: a message refused here is not the daemon's to hold
            self.frames_sent += len(msg.indices)
        if n:
            self._next_index = max(self._next_index, int(idx.max()) + 1)
        return n

    def end_scan(self, frame_count: int | None = None, timeout_s: float | None = None) -> Receipt:
        """Close the scan and return once the daemon holds every frame it was given.

        ``frame_count`` defaults to the frames sent. Raises :class:`DeliveryError` naming the
        frames the daemon does not hold once it takes no more (e.g. it ended the scan itself),
        or :class:`DeliveryTimeout` when it acknowledged nothing more for ``timeout_s``
        (default: the send timeout; None there = wait as long as it makes progress).
        """
        scan = self._open()
        msg = ScanEnd(
            scan.scan_id, self.frames_sent if frame_count is None else frame_count, time.time()
        )
        validate.check(msg, self.limits, scan)
        self._flush_hook()
        self.send(msg)
        self.scan = None
        if not self.confirm:
            return Receipt(scan.scan_id, self.frames_given, None,
                           elapsed_s=time.monotonic() - self._started)
        return self._confirm(scan.scan_id, closing=True, timeout_s=timeout_s)

    def flush(self, timeout_s: float | None = None) -> Receipt:
        """Return once the daemon holds every frame given so far to the open scan (the scan stays
        open). Raises like :meth:`end_scan`; frames lost on the way (a broken connection) show
        as a :class:`DeliveryTimeout` naming how many are unacknowledged."""
        scan = self._open()
        self._flush_hook()
        if not self.confirm:
            raise RuntimeError("flush() confirms delivery: this producer has confirm=False")
        return self._confirm(scan.scan_id, closing=False, timeout_s=timeout_s)

    def abort(self, reason: str = "") -> Abort:
        """Abort the open scan (the daemon discards it)."""
        scan = self._open()
        msg = Abort(scan.scan_id, reason[:4096], time.time())
        self._flush_hook()
        self.send(msg)
        self.scan = None
        return msg

    # -- transport -----------------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        """Encode and send one message (through the hook, if any)."""
        if msg.time_s is None:
            msg.time_s = time.time()
        parts = encode(msg, self.checksum)
        self._check_size(parts)
        out = [parts] if self.hook is None else self.hook.process(msg, parts)
        for p in out:
            self.send_parts(p)

    def send_parts(self, parts: list[Any]) -> None:
        """Send already-encoded parts as one message (tests use it to send broken messages)."""
        try:
            # copy=False: pyzmq still copies parts below its copy threshold (64 kB), where
            # zero-copy costs more than it saves
            self._socket.send_multipart(parts, copy=False)
        except zmq.Again:
            self._stalled = True
            raise ProducerTimeout(
                f"the daemon at {self.endpoint} took no message for {self.send_timeout_s} s "
                "(not running, unreachable, CURVE key refused, or its queue is full)"
            ) from None

    def close(self, linger_s: float | None = None) -> None:
        """Close the sockets, waiting up to ``linger_s`` (default: the send timeout, or 0 once a
        send or confirmation timed out: the daemon takes nothing) for queued messages to leave,
        and terminate the producer's own context (so the process can exit at once, cleanly).
        Safe to call twice."""
        self._control = None
        _open.discard(self)
        if not self._finalizer.alive:
            return
        self._finalizer.detach()
        if linger_s is None:
            linger_s = 0.0 if self._stalled else self.send_timeout_s
        _shutdown(
            self._socket, self._helpers, self._ctx if self._own_context else None,
            _linger_ms(linger_s),
        )

    def _before_close(self, exc: BaseException | None) -> None:
        if self.scan is not None and exc is not None and not isinstance(exc, ProducerTimeout):
            self.abort(f"producer failed: {type(exc).__name__}: {exc}")

    # -- helpers -------------------------------------------------------------------------------

    def _open(self) -> ScanStart:
        if self.scan is None:
            raise RuntimeError("no open scan: call start_scan() first")
        return self.scan

    def _batch_size(self, data: np.ndarray) -> int:
        per_frame = max(1, data[0].nbytes if data.shape[0] else 1)
        # leave headroom under the message limit for the header, indices and positions
        by_bytes = max(1, (self._max_message_bytes() // 2) // per_frame)
        return max(1, min(self.batch_frames, by_bytes))

    def _max_message_bytes(self) -> int:
        """The smaller of this producer's limit and the daemon's (when it said)."""
        told = self.daemon_max_message_bytes
        return self.limits.max_message_bytes if told is None else min(told, self.limits.max_message_bytes)

    def _check_size(self, parts: list[Any]) -> None:
        told = self.daemon_max_message_bytes
        if told is None:
            return
        size = sum(memoryview(getattr(p, "buffer", p)).nbytes for p in parts)
        if size > told:
            raise ProtocolError(
                "message", "max_message_bytes",
                f"{size} bytes exceed the daemon's max_message_bytes of {told} (its ingest socket "
                "would disconnect this producer and the message would be lost): send smaller frames "
                "or fewer per message (batch_frames), or raise the daemon's limit (`serve --limit "
                "max_message_bytes=...`)",
                self.scan.scan_id if self.scan is not None else None,
            )

    def _mark_given(self, indices: np.ndarray) -> None:
        top = int(indices.max()) + 1 if indices.size else 0
        if top > self._given.size:
            grown = np.zeros(max(top, 2 * self._given.size), dtype=bool)
            grown[: self._given.size] = self._given
            self._given = grown
        self._given[indices] = True

    def _control_client(self) -> ControlClient:
        if self._control is None:
            assert self.control is not None
            # short tries: a busy daemon answers between ingest bursts, and the confirmation
            # loop retries until its own no-progress timeout
            per_try = 2.0 if self.send_timeout_s is None else min(2.0, max(self.send_timeout_s, 0.05))
            self._control = ControlClient(
                self.control, timeout_s=per_try, retries=1, limits=self.limits, curve=self._curve,
                context=self._ctx,
            )
            self._helpers.append(self._control)
        return self._control

    def _ask(self, scan_id: str) -> dict[str, Any] | None:
        """The daemon's ``receipt`` of ``scan_id``: None while it does not answer; ``state``
        ``"unknown"`` while it has not read the scan's start (control and ingest are separate
        sockets, so control may be served first)."""
        try:
            answer = self._control_client().receipt(scan_id)
        except ControlTimeout:
            return None
        except ControlError as exc:
            if exc.busy:
                # the daemon's look at its directories is behind (a hung network file system, or
                # another client flooding receipts): asked again, as when it does not answer
                self._busy = exc.msg
                time.sleep(BUSY_PAUSE_S)  # (answered at once: _check_new_scan asks again at once)
                return None
            raise DeliveryError(
                f"the daemon at {self.control} cannot acknowledge scan {scan_id!r} ({exc.msg}); "
                "an older daemon has no `receipt`: use confirm=False to send unconfirmed",
                scan_id, self.frames_given, 0,
            ) from None
        self._busy = None
        return answer

    def _check_new_scan(self, scan_id: str) -> None:
        """Before a scan starts: the daemon answers, and holds no scan of that id (whose receipt
        would be mistaken for this one's). A refusal of an earlier try is remembered as stale."""
        self._stale_refusal = None
        waited = time.monotonic()
        while (answer := self._ask(scan_id)) is None:
            if self.send_timeout_s is not None and time.monotonic() - waited > self.send_timeout_s:
                # a CURVE daemon drops a client without (or with unknown) keys in the handshake,
                # which looks exactly like no daemon at all from here
                keys = ("a daemon with CURVE on answers only clients with its keys: Producer(curve=...), "
                        "`replay --client-key ... --server-key ...`" if self._curve is None else
                        "or the daemon refused this client's CURVE keys")
                # the first thing to check comes first: a new user replays before `serve` is up
                if self._busy is not None:
                    raise ProducerTimeout(f"the daemon at {self.control} answered no receipt of scan {scan_id!r} for "
                                          f"{self.send_timeout_s} s: {self._busy}")
                raise ProducerTimeout(
                    f"no answer from the daemon's control socket {self.control} for "
                    f"{self.send_timeout_s} s: is a daemon running there (`cryoptycho serve`)? "
                    "Delivery cannot be confirmed (name the daemon's "
                    "control endpoint: Producer(control=...), `replay --control`; or send "
                    f"unconfirmed: confirm=False, `replay --no-confirm`; {keys})"
                )
        told = answer.get("max_message_bytes")  # absent from daemons before it was added
        self.daemon_max_message_bytes = told if isinstance(told, int) and not isinstance(told, bool) else None
        if answer["state"] == "refused":
            self._stale_refusal = answer.get("refused_at")
        elif answer["state"] != "unknown":
            raise ValueError(
                f"the daemon already has a scan {scan_id!r} ({answer['state']}): scan ids must "
                "be unique (give another: start_scan(scan_id=...), `replay --scan-id`)"
            )
        if answer.get("taken"):  # (absent from daemons before it was added)
            # the daemon would refuse the start (unique_scan_id): said before a frame is sent,
            # not after the whole scan was, and with the option that gives another id
            raise ValueError(
                f"the daemon would refuse scan {scan_id!r}: {answer['taken']} (scan ids must be "
                "unique: give another, start_scan(scan_id=...), `replay --scan-id`)"
            )

    def _confirm(self, scan_id: str, closing: bool, timeout_s: float | None) -> Receipt:
        """Poll the daemon's ``receipt`` until it holds every given frame (and, when ``closing``,
        has read the scan's end), or raise naming what it does not hold."""
        sent = self.frames_given
        timeout = self.send_timeout_s if timeout_s is None else timeout_s
        last: dict[str, Any] | None = None
        progress_at = time.monotonic()
        pause = 0.002
        while True:
            answer = self._ask(scan_id)
            if answer is not None and answer["state"] == "refused":
                if answer.get("refused_at") == self._stale_refusal:
                    answer = {**answer, "state": "unknown"}  # an earlier try's refusal
                else:
                    raise DeliveryError(
                        f"the daemon refused scan {scan_id!r}: {answer.get('error')}; none of "
                        f"its {sent} frames is held",
                        scan_id, sent, 0, answer,
                    )
            if answer is not None and "starts_refused" in answer:  # (absent from older daemons)
                answer = self._own_scan(scan_id, sent, answer)
            if answer is not None and answer["state"] != "unknown":
                received = int(answer["frames"]["received"])
                closed = bool(answer["ended"]) or answer["state"] in _FINAL_STATES
                if last is None or received != last["frames"]["received"] or closed != (
                    bool(last["ended"]) or last["state"] in _FINAL_STATES
                ):
                    progress_at = time.monotonic()
                last = answer
                if received >= sent and (closed or not closing):
                    return self._receipt(scan_id, sent, answer)
                if closed:
                    # the daemon takes no more frames for this scan: what it lacks is lost
                    why = answer.get("error") or answer.get("end_reason") or answer["state"]
                    missing = answer.get("missing") or []
                    refused = answer.get("refused") or {}  # absent from daemons before it was added
                    raise DeliveryError(
                        f"scan {scan_id!r}: the daemon holds {received} of the {sent} frames it "
                        f"was given ({sent - received} unacknowledged) and takes no more "
                        f"({answer['state']}: {why})"
                        + (f"; first missing indices {missing[:10]}" if missing else "")
                        + (f"; it refused {refused['frames']} frames, last: {refused['last']}"
                           if refused.get("frames") else ""),
                        scan_id, sent, received, answer,
                    )
            if timeout is not None and time.monotonic() - progress_at > timeout:
                held = 0 if last is None else int(last["frames"]["received"])
                if answer is None:
                    why = (f"no answer from its control socket {self.control}" if self._busy is None
                           else f"its receipts answered busy: {self._busy}")
                elif last is None:
                    why = ("it has not read the scan's start: still queued behind other data, or "
                           "refused before it was recorded (see the published `error` events)")
                else:
                    why = "stalled, or frames were lost on the way"
                self._stalled = True
                raise DeliveryTimeout(
                    f"scan {scan_id!r}: the daemon acknowledged {held} of {sent} frames "
                    f"({sent - held} unacknowledged) and nothing more for {timeout} s ({why})",
                    scan_id, sent, held, last,
                )
            time.sleep(pause)  # a poll interval, not a wait for an event: the daemon has no push
            pause = min(2 * pause, 0.05)

    def _own_scan(self, scan_id: str, sent: int, answer: dict[str, Any]) -> dict[str, Any]:
        """The receipt if it is of this producer's scan. Two senders of one scan id: the
        daemon takes the first scan_start, refuses the next, and files both senders' frames
        under the one scan (of an index it keeps the first), so neither may report success.
        The scan's start time as its sender stamped it tells whose scan the daemon holds; a
        receipt of another sender's scan before this one's start was read is treated as
        "not read yet"."""
        theirs, mine = answer.get("start_time_s"), self.scan_start_time_s
        # a stamp that cannot be compared (none, or a NaN a caller passed in) decides nothing
        comparable = all(isinstance(t, (int, float)) and not math.isnan(t) for t in (theirs, mine))
        ours = theirs == mine if comparable else None
        if answer["starts_refused"]:
            whose = ("another sender's scan of this id, not this producer's"
                     if ours is False else "the frames of both senders under one scan")
            raise DeliveryError(
                f"scan {scan_id!r}: the daemon refused {answer['starts_refused']} more scan_start of this "
                f"id while it held the scan: two senders use the same scan id, and it holds {whose}; "
                f"its {int(answer['frames']['received'])} frames may not be this producer's {sent} "
                "(of one frame index it keeps the first to arrive). Give every scan its own id",
                scan_id, sent, 0, answer,
            )
        return {**answer, "state": "unknown"} if ours is False else answer

    def _receipt(self, scan_id: str, sent: int, answer: dict[str, Any]) -> Receipt:
        return Receipt(
            scan_id, sent, int(answer["frames"]["received"]), answer["state"],
            bool(answer["ended"]), answer.get("end_reason"), time.monotonic() - self._started,
            answer,
        )

    def _flush_hook(self) -> None:
        if self.hook is not None:
            for p in self.hook.flush():
                self.send_parts(p)


#: producers not closed yet: closed at interpreter exit, before pyzmq's collector stops
_open: weakref.WeakSet[Producer] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for producer in list(_open):
        producer.close()


def _linger_ms(seconds: float | None) -> int:
    return -1 if seconds is None else int(seconds * 1000)


def _shutdown(
    sock: zmq.Socket, helpers: list[ControlClient], ctx: zmq.Context | None, linger_ms: int
) -> None:
    """Close ``sock`` (and the ``helpers``) and terminate ``ctx`` when the producer owns it:
    returns once every queued message has left or the linger expired. Also runs at exit for
    producers nobody closed."""
    for helper in helpers:
        helper.close()
    helpers.clear()
    if not sock.closed:
        sock.close(linger=linger_ms)
    if ctx is not None and not ctx.closed:
        ctx.term()
