"""The DECTRIS bridge: detector stream (+ optional positions side channel) → daemon ingest.

:func:`run_bridge` feeds a daemon elsewhere through its ingest socket (``serve --source
dectris2://HOST:31001`` reads the detector itself: :mod:`.source`); the conversion itself is
:mod:`.convert` (re-exported here).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import zmq

from ..control import ControlClient
from ..errors import ControlError, ControlTimeout, ProducerTimeout, ProtocolError
from ..limits import Limits, ingest_max_part_bytes
from ..messages import Frames, Request, ScanEnd, ScanStart, decode
from ..producer import Producer, control_endpoint_for
from ..security import ClientCurve
from .convert import BridgeConfig, IngestMessage, SeriesConverter, SeriesNotice, bridge_messages
from .receiver import DectrisReceiver, ErrorLogLimiter, parse_source
from .scan import parse_positions
from .schema import DectrisError, SeriesEnd, SeriesStart

__all__ = ["BridgeConfig", "BridgeStats", "IngestMessage", "SeriesConverter", "SeriesNotice", "StartGate",
           "bridge_messages", "dispatch", "run_bridge"]

log = logging.getLogger(__name__)


@dataclass
class BridgeStats:
    series: int = 0
    #: frames the producer took (sent, or queued in its socket); ``converter["frames_sent"]``:
    #: frames made into messages, which on a busy host run ahead of the sends
    frames_sent: int = 0
    decode_errors: int = 0
    rejected_images: dict[str, int] = field(default_factory=dict)
    converter: dict[str, int] = field(default_factory=dict)
    position_errors: int = 0
    series_errors: int = 0
    #: series whose scan_start the daemon refused (logged with its reason): none of their
    #: frames is held by the daemon (also counted in series_errors)
    series_refused: int = 0
    #: series whose scan_start the daemon refused for a full scan queue, held by the bridge and
    #: then accepted
    series_waited: int = 0
    #: series held by the bridge and then dropped: beyond max_held_bytes (a full queue, or a
    #: daemon that does not read its ingest socket), a scan_start the daemon never read (sent
    #: twice), or the bridge stopped first (also counted in series_errors)
    series_lost: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_bridge(
    source_url: str,
    ingest_endpoint: str,
    config: BridgeConfig | dict[str, Any] | None = None,
    stop_event: threading.Event | None = None,
    *,
    max_series: int | None = None,
    context: zmq.Context | None = None,
    producer: Producer | None = None,
    on_notice: Callable[[SeriesNotice], None] | None = None,
    limits: Limits | None = None,
    control: str | None = None,
    confirm: bool = True,
    curve: ClientCurve | None = None,
) -> BridgeStats:
    """Receive a DECTRIS stream from ``source_url`` (``dectris2://host:31001`` or
    ``dectris1://host:9999``) and push each series as a scan to the daemon's ingest endpoint,
    until ``stop_event`` is set or ``max_series`` series have ended (and been taken by the
    daemon). A scan still open then is aborted. Decode errors and rejected images are logged
    and counted, never fatal; a skipped or rejected series and an implausible header value also
    go to ``on_notice``.

    ``confirm``: each scan's frames are sent once the daemon's control socket (``control``;
    default: the ingest port + 2, ``serve``'s layout) says it accepted the scan_start. A refusal
    is logged with the daemon's reason and counted (``series_refused``); a refusal because the
    daemon's scan queue is full holds the series (and those after it) in memory, up to
    ``max_held_bytes``, and sends it again once the daemon has room (``series_waited``).
    ``confirm=False`` sends blindly (a stand-in PULL socket, a relay): a refused series is lost
    unseen. A daemon that takes no message for the producer's send timeout (endless
    back-pressure), or whose control socket does not answer as long, stops the bridge: the
    series not delivered whole are logged by name and counted in ``series_lost``, and the
    counters returned. ``curve``: the daemon runs with CURVE (its sockets reached
    from another host); the producer and control client this makes use these keys (a ``producer``
    passed in brings its own)."""
    version, endpoint = parse_source(source_url)
    if config is not None and not isinstance(config, (BridgeConfig, dict)):
        raise TypeError(f"config must be a BridgeConfig or a dict of its fields, not "
                        f"{type(config).__name__} (pass the daemon configuration's DECTRIS section)")
    cfg = config if isinstance(config, BridgeConfig) else BridgeConfig.model_validate(config or {})
    stop = stop_event or threading.Event()
    ctx = context or zmq.Context.instance()
    stats = BridgeStats()
    converter = SeriesConverter(cfg, side_channel=cfg.positions_endpoint is not None, on_notice=on_notice)

    on_error = ErrorLogLimiter(log, f"DECTRIS stream {source_url}")  # counted in decode_errors
    receiver = DectrisReceiver(endpoint, version, context=ctx, on_error=on_error,
                               channels=[cfg.channel] if cfg.channel else None)
    side = open_side_channel(ctx, cfg)
    own_producer = producer is None
    # confirm=False: the detector's stream has no acknowledgement to pass on, and waiting for
    # the daemon's at each series end would stall the detector's stream behind it
    prod = producer or Producer(ingest_endpoint, context=ctx, limits=limits, confirm=False,  # the daemon's limits
                                curve=curve)
    gate = None
    if confirm:
        ctl = ControlClient(control or prod.control or control_endpoint_for(ingest_endpoint), timeout_s=2.0,
                            retries=1, limits=limits, curve=prod._curve, context=ctx)
        gate = StartGate(prod, ctl, converter, stats, cfg.max_held_bytes, prod.send_timeout_s)
        # as the daemon's own --source does: a series whose name the daemon already holds (a
        # result from before both restarted, the detector's series counter back at 1) is named
        # anew, not refused — the detector cannot send it again
        converter.taken = gate.scan_id_taken
    ended, gave_up = 0, False
    try:
        try:
            while not stop.is_set():
                taking = max_series is None or ended < max_series or converter.closing
                if not taking and (gate is None or not gate.busy):
                    break
                out: list[IngestMessage] = []
                if taking:
                    if side is not None:
                        out += _drain_side_channel(side, converter, stats)
                    for msg in receiver.drain(min(0.05, cfg.flush_interval_s)):
                        if isinstance(msg, SeriesStart) and cfg.channel is None and msg.channels:
                            receiver.channels = (msg.channels[0],)  # decompress only what is used
                        try:
                            out += converter.feed(msg)
                        except (DectrisError, ValueError) as exc:
                            stats.series_errors += 1
                            log.error("DECTRIS stream %s: %s", source_url, exc)
                        else:
                            # (an end refused — of a series begun before this bridge started, or
                            # not the open one — ends no series this run took: counted, --series 2
                            # stopped after it and one series, and the next was never bridged)
                            ended += isinstance(msg, SeriesEnd)
                        if max_series is not None and ended >= max_series and not converter.closing:
                            break  # the rest belongs to series this run does not take
                    out += converter.flush(cfg.flush_interval_s)
                else:
                    stop.wait(0.05)  # the series taken wait for room in the daemon's queue (polled)
                if gate is None:
                    dispatch(prod, out, converter, stats)
                else:
                    gate.put(out)
                on_error.flush()
            last = converter.stop("the DECTRIS bridge stopped before the series ended")
            if gate is None:
                dispatch(prod, last, converter, stats)
            else:
                gate.put(last)
                gate.abandon("the bridge stopped while the daemon's scan queue was full")
        except ProducerTimeout as exc:  # endless back-pressure, or a silent control socket
            _give_up(exc, prod, converter, gate, stats)
            gave_up = True
    finally:
        on_error.flush(force=True)
        receiver.close()
        if side is not None:
            side.close(linger=0)
        if gate is not None:
            gate.control.close()
        if own_producer:
            # after giving up nothing queued will leave (a silent control socket leaves the
            # producer unstalled, and its close would wait out the send timeout again)
            prod.close(linger_s=0.0 if gave_up else None)
    stats.series = converter.stats["series"]
    stats.decode_errors = receiver.decode_errors
    stats.rejected_images = dict(converter.rejected)
    stats.converter = dict(converter.stats)
    return stats


def _give_up(exc: ProducerTimeout, prod: Producer, converter: SeriesConverter, gate: StartGate | None,
             stats: BridgeStats) -> None:
    """The daemon took nothing for the producer's send timeout (it does not read its ingest
    socket: endless back-pressure), or its control socket stayed silent as long: the bridge
    stops as at a stop signal, without a traceback. Every series not delivered whole is lost,
    named and counted (the command's exit status says so); nothing more is sent, since each
    send would wait out the timeout again (a scan the daemon holds in part ends there by its
    acquisition timeout)."""
    reason = f"the bridge stopped: {exc}"
    log.error("%s", reason)
    lost: list[str] = []
    if prod.scan is not None:
        lost.append(prod.scan.scan_id)
        prod.scan = None  # (an abort would wait out the timeout too)
    if gate is not None:
        if gate.pending is not None:
            lost.append(gate.pending.scan_id)
        lost += [m.scan_id for m in gate.held if isinstance(m, ScanStart)]
        gate.pending, gate.held, gate.held_bytes = None, deque(), 0
    plan = converter.plan
    series = {plan.scan_id: plan.start.series_id} if plan is not None else {}
    lost += [m.scan_id for m in converter.stop(reason, keep=False)]  # (nothing more is sent)
    for scan_id in dict.fromkeys(lost):
        stats.series_lost += 1
        stats.series_errors += 1
        converter.report(SeriesNotice("rejected", series.get(scan_id), "ingest", f"series scan {scan_id} lost: "
                                      f"{reason}", scan_id))


def open_side_channel(ctx: zmq.Context, cfg: BridgeConfig) -> zmq.Socket | None:
    """The PULL socket bound at ``cfg.positions_endpoint`` for side-channel positions, if set.
    Its parts are bounded as the ingest socket's are (a peer sending a larger part is cut off as
    its length arrives): unbounded, one message from a buggy scan system could make the daemon
    hold any number of bytes."""
    if cfg.positions_endpoint is None:
        return None
    side = ctx.socket(zmq.PULL)
    side.setsockopt(zmq.LINGER, 0)
    side.setsockopt(zmq.MAXMSGSIZE, ingest_max_part_bytes(Limits()))
    side.bind(cfg.positions_endpoint)
    return side


def _drain_side_channel(sock: zmq.Socket, converter: SeriesConverter, stats: BridgeStats) -> list[IngestMessage]:
    out: list[IngestMessage] = []
    while True:
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return out
        try:
            msg = decode(parts)
            if not isinstance(msg, Request):
                raise TypeError(f"type: expected a request with method 'dectris_positions', got {msg.type!r}")
            series, ids, pos = parse_positions(msg)
        except (ProtocolError, ValueError, TypeError) as exc:
            stats.position_errors += 1
            log.error("positions side channel: %s", exc)
            continue
        out += converter.add_positions(series, ids, pos)


class StartGate:
    """Between the converter and the producer: a scan's frames leave once the daemon accepted
    its scan_start (control ``receipt``). A start refused because the daemon's scan queue is
    full (rule ``max_queued_scans``) is held with everything after it, up to ``max_held_bytes``,
    and sent again when the daemon's ``status`` shows room; any other refusal drops the series,
    logged with the daemon's reason and counted. ``max_held_bytes`` bounds whatever is held,
    also while a verdict is awaited (a daemon in back-pressure answers "unknown" and reads
    nothing). A start the daemon has not read within ``timeout_s`` is sent once more (a daemon
    restarted meanwhile lost it); not read then either, its series is lost. Polled from the
    bridge's loop, never blocking it longer than one control request."""

    QUEUE_FULL = "[rule max_queued_scans]"
    ROOM_POLL_S = 0.2  #: how often a held series asks whether the daemon's queue has room

    def __init__(self, producer: Producer, control: ControlClient, converter: SeriesConverter, stats: BridgeStats,
                 max_held_bytes: int, timeout_s: float | None = 30.0) -> None:
        self.producer, self.control, self.converter, self.stats = producer, control, converter, stats
        self.max_held_bytes = max_held_bytes
        self.timeout_s = timeout_s
        self.held: deque[IngestMessage] = deque()
        self.held_bytes = 0
        self.pending: ScanStart | None = None  #: sent, the daemon's verdict not read yet
        self._pending_since = 0.0  #: when pending was sent (or sent again)
        self._resent = False  #: pending was sent a second time (the daemon had not read it)
        self._stale: float | None = None  #: refused_at of an earlier refusal of the pending id
        self._silent_since: float | None = None  #: when the control socket stopped answering
        self._queue_full_since: float | None = None  #: the head series waits for room since
        self._waiting_id: str | None = None  #: the scan refused for a full queue, until accepted
        self._next_poll = 0.0
        self._dropped: set[str] = set()  #: scans refused or lost: their later messages go nowhere

    @property
    def busy(self) -> bool:
        """Whether a series still waits for the daemon (its verdict, or room in its queue)."""
        return self.pending is not None or bool(self.held)

    def put(self, messages: list[IngestMessage]) -> None:
        for msg in messages:
            if msg.scan_id in self._dropped:
                continue
            self.held.append(msg)
            self.held_bytes += _nbytes(msg)
        self._pump()
        while self.held_bytes > self.max_held_bytes and self.held:
            self._drop_newest()

    def abandon(self, reason: str) -> None:
        """The bridge stops: what still waits for the daemon is lost, said and counted."""
        if self.pending is not None:  # its verdict never came: its scan (if accepted) is aborted
            sid, self.pending = self.pending.scan_id, None
            if self.producer.scan is not None:
                self.producer.abort(reason)
            self._lose(sid, reason)
        while self.held:  # (its head is a start: what an accepted scan had to send is sent)
            head = self.held[0]
            if isinstance(head, ScanStart):
                self._lose(head.scan_id, reason)
            else:
                self._discard(head.scan_id)

    def _pump(self) -> None:
        while True:
            if self.pending is not None and not self._verdict():
                return
            if not self.held:
                return
            msg = self.held[0]
            if isinstance(msg, ScanStart):
                if self._queue_full_since is not None and not self._room():
                    return
                answer = self._ask(msg.scan_id)
                if answer is None:
                    return
                self._stale = answer.get("refused_at") if answer["state"] == "refused" else None
            self.held.popleft()
            self.held_bytes -= _nbytes(msg)
            self._send(msg)
            if isinstance(msg, ScanStart):
                if self.producer.scan is msg:
                    self.pending, self._pending_since, self._resent = msg, time.monotonic(), False
                else:  # refused by our own checks: reported by dispatch; the rest of it goes nowhere
                    self._discard(msg.scan_id)

    def _send(self, msg: IngestMessage) -> None:
        dispatch(self.producer, [msg], self.converter, self.stats)

    def _ask(self, scan_id: str) -> dict[str, Any] | None:
        """The daemon's receipt of ``scan_id``; None while it does not answer (for up to the
        send timeout: then :class:`ProducerTimeout`). A daemon without ``receipt`` (older than
        the delivery receipts) raises :class:`ControlError`: run_bridge(confirm=False) there."""
        try:
            answer = self.control.receipt(scan_id)
        except (ControlTimeout, ControlError) as exc:
            if isinstance(exc, ControlError) and not exc.busy:
                raise
            # (busy: the daemon's look at its directories is behind; asked again as a silence is)
            now = time.monotonic()
            self._silent_since = self._silent_since or now
            if self.timeout_s is not None and now - self._silent_since > self.timeout_s:
                raise ProducerTimeout(
                    f"no answer from the daemon's control socket {self.control.endpoint} for {self.timeout_s} s: "
                    "the bridge cannot learn whether it accepts a series (name its control endpoint: "
                    "run_bridge(control=...); or send blindly: confirm=False)") from None
            return None
        self._silent_since = None
        return answer

    def scan_id_taken(self, scan_id: str) -> bool:
        """Whether the daemon would refuse a scan_start of ``scan_id`` as not unique (its
        ``receipt``: a scan of that id, or ``taken``: its spool or result files). A daemon that
        does not answer now counts as not holding it; a refusal then says so, logged and counted."""
        try:
            answer = self.control.receipt(scan_id)
        except (ControlTimeout, ControlError) as exc:
            log.warning("cannot ask the daemon whether it holds scan %s already (%s): the series is sent "
                        "under that name", scan_id, exc)
            return False
        return answer["state"] not in ("unknown", "refused") or bool(answer.get("taken"))

    def _verdict(self) -> bool:
        """Whether the daemon decided on the pending scan_start (and the gate acted on it)."""
        assert self.pending is not None
        start = self.pending
        answer = self._ask(start.scan_id)
        if answer is None:
            return False
        if answer["state"] == "unknown" or (answer["state"] == "refused" and answer.get("refused_at") == self._stale):
            return self._overdue(start)  # not read yet (its ingest socket is served apart from control)
        if answer["state"] != "refused" and "starts_refused" in answer:  # (absent from older daemons)
            theirs = answer.get("start_time_s")
            if not _same_start(theirs, start.time_s):
                # another sender's scan of this id (a second bridge named its series alike at
                # the same moment): this start is not read yet, or was refused as not unique —
                # the daemon files every sender's frames under the one scan, so none are sent
                if not answer["starts_refused"]:
                    return self._overdue(start)
                return self._taken_by_another(start, answer)
            if answer["starts_refused"] and not self._resent:
                # (this gate's own second start, after a restart, is refused as a duplicate too)
                msg = (f"the daemon refused {answer['starts_refused']} more scan_start of scan {start.scan_id} "
                       "while it held this bridge's: another sender uses the id; frames it sent may be filed "
                       "under this series' scan (of one frame index the daemon keeps the first). Give every "
                       "series its own name")
                log.warning("%s", msg)
                self.converter.report(SeriesNotice("warning", self._series_of(start.scan_id), "scan_start", msg,
                                                   start.scan_id))
        self.pending = None
        if answer["state"] != "refused":
            if self._waiting_id == start.scan_id:
                self.stats.series_waited += 1
                log.info("scan %s accepted by the daemon after %.1f s waiting for room in its queue",
                         start.scan_id, time.monotonic() - (self._queue_full_since or 0.0))
            self._queue_full_since = self._waiting_id = None
            return True
        self.producer.scan = None  # refused: there is nothing to abort
        reason = str(answer.get("error"))
        if self.QUEUE_FULL in reason:
            if self._queue_full_since is None:
                self._queue_full_since = time.monotonic()
            if self._waiting_id != start.scan_id:
                self._waiting_id = start.scan_id
                log.warning("the daemon's scan queue is full (%s): series scan %s waits in the bridge (%.0f MiB held, "
                            "at most %.0f: max_held_bytes) and is sent again when the daemon has room", reason,
                            start.scan_id, self.held_bytes / 2**20, self.max_held_bytes / 2**20)
            self.held.appendleft(start)
            self.held_bytes += _nbytes(start)
            self._next_poll = time.monotonic() + self.ROOM_POLL_S
            return True
        self._queue_full_since = self._waiting_id = None
        self.stats.series_refused += 1
        self.stats.series_errors += 1
        self._refused(start.scan_id, f"the daemon refused scan {start.scan_id}: {reason}; none of its frames is kept")
        return True

    def _taken_by_another(self, start: ScanStart, answer: dict[str, Any]) -> bool:
        """The daemon holds another sender's scan of the pending start's id and refused this
        one (unique_scan): the series is refused, said and counted, and none of its frames sent."""
        self.pending = None
        self.producer.scan = None  # refused: there is nothing to abort (an abort would end theirs)
        self.stats.series_refused += 1
        self.stats.series_errors += 1
        self._refused(start.scan_id, (
            f"the daemon refused scan {start.scan_id}: it holds another sender's scan of this id (started at "
            f"time_s {answer.get('start_time_s')}, this bridge's at {start.time_s}; {answer['starts_refused']} "
            "scan_start of the id refused): two senders named a series alike; none of its frames is sent. "
            "Give every series its own name"))
        return True

    def _overdue(self, start: ScanStart) -> bool:
        """The daemon has not read the pending start: past ``timeout_s`` it is sent once more
        (a daemon restarted since lost it; one that reads both keeps the first, refusing the
        second as a duplicate, and its receipt says accepted), then its series is lost."""
        now = time.monotonic()
        if self.timeout_s is None or now - self._pending_since <= self.timeout_s:
            return False
        if not self._resent:
            self._resent, self._pending_since = True, now
            log.warning("the daemon has not read the scan_start of scan %s for %s s (receipt 'unknown': it restarted, "
                        "or does not read its ingest socket): sent it again", start.scan_id, self.timeout_s)
            self.producer.send(start)
            return False
        reason = (f"the daemon did not read its scan_start, sent twice, within {2 * self.timeout_s} s "
                  "(receipt 'unknown': it does not read its ingest socket)")
        self._forget_pending(reason)
        self._lose(start.scan_id, reason)
        return True

    def _forget_pending(self, reason: str) -> None:
        """Stop waiting for the pending start's verdict; its scan, if the daemon ever reads it, is aborted."""
        self.pending = None
        if self.producer.scan is not None:
            self.producer.abort(reason)

    def _room(self) -> bool:
        """Whether the daemon's queue has room now (polled at most every ROOM_POLL_S)."""
        now = time.monotonic()
        if now < self._next_poll:
            return False
        self._next_poll = now + self.ROOM_POLL_S
        try:
            status = self.control.status()
        except (ControlTimeout, ControlError):
            return False  # asked again at the next poll; the receipt before the start says more
        cap = status.get("max_queued_scans")  # absent from daemons before it was added: just try
        free = max(0, int(status.get("max_concurrent_scans", 1)) - len(status.get("running", [])))
        # waiting_total: the daemon lists only the first of many waiting scans (older ones: all)
        waiting = int(status.get("waiting_total", len(status.get("waiting", []))))
        return cap is None or waiting < int(cap) + free

    def _series_of(self, scan_id: str) -> int | None:
        """The detector series the converter streams as ``scan_id`` (None once it is over)."""
        plan = self.converter.plan
        return plan.start.series_id if plan is not None and plan.scan_id == scan_id else None

    def _refused(self, scan_id: str, message: str) -> None:
        series = self._series_of(scan_id)
        self.converter.report(SeriesNotice("rejected", series, "scan_start", message, scan_id))
        if series is not None:  # still streaming: the converter drops it
            # (what it finishes on the way, a series that waited for positions, still leaves)
            self.held.extend(m for m in self.converter.stop(message, keep=False) if m.scan_id != scan_id)
        self._discard(scan_id)

    def _lose(self, scan_id: str, reason: str) -> None:
        self.stats.series_lost += 1
        self.stats.series_errors += 1
        self._refused(scan_id, f"series scan {scan_id} lost: {reason}")

    def _discard(self, scan_id: str) -> None:
        """Forget every held message of ``scan_id``, and those still to come."""
        self._dropped.add(scan_id)
        if len(self._dropped) > 1024:  # (ids of long-gone series)
            self._dropped = {scan_id}
        kept = deque(m for m in self.held if m.scan_id != scan_id)
        self.held_bytes = sum(_nbytes(m) for m in kept)
        self.held = kept

    def _drop_newest(self) -> None:
        starts = [m for m in self.held if isinstance(m, ScanStart)]
        sid = starts[-1].scan_id if starts else self.held[-1].scan_id
        cause = ("the daemon's scan queue stayed full" if self._queue_full_since is not None else
                 "the daemon gave no verdict on the series (receipt 'unknown': it does not read its "
                 "ingest socket; or its control socket is silent)")
        reason = f"{cause} and the bridge holds at most {self.max_held_bytes} bytes (max_held_bytes)"
        if self.pending is not None and self.pending.scan_id == sid:  # its frames, sent no further
            self._forget_pending(reason)
        self._lose(sid, reason)


def _same_start(theirs: Any, mine: float | None) -> bool:
    """Whether a receipt's ``start_time_s`` is this sender's scan_start stamp (a stamp that
    cannot be compared, nil or NaN, decides nothing: counted as the same, as the SDK does)."""
    comparable = all(isinstance(t, (int, float)) and not math.isnan(t) for t in (theirs, mine))
    return theirs == mine if comparable else True


def _nbytes(msg: IngestMessage) -> int:
    return int(msg.data.nbytes) if isinstance(msg, Frames) else 0


def dispatch(producer: Producer, messages: list[IngestMessage], converter: SeriesConverter,
             stats: BridgeStats) -> None:
    """Send the converter's messages through ``producer``; a message our protocol refuses
    stops (and aborts) its scan, counted in ``stats``."""
    for msg in messages:
        if producer.scan is None and not isinstance(msg, ScanStart):
            continue  # the scan's start was refused; its frames and end go nowhere
        try:
            if isinstance(msg, ScanStart):
                producer.start_scan(msg)
            elif isinstance(msg, Frames):
                producer.send_frames(msg.data, msg.indices, msg.positions_m)
                stats.frames_sent += len(msg.indices)
            elif isinstance(msg, ScanEnd):
                producer.end_scan(msg.frame_count)
            else:
                producer.abort(msg.reason)
        except ProtocolError as exc:
            # Our own checks refused the message (e.g. positions beyond the field limit).
            stats.series_errors += 1
            converter.refused(msg.scan_id, exc.field, str(exc))  # logged, counted and reported there
            if producer.scan is not None:
                producer.abort(f"bridge: {exc}")
