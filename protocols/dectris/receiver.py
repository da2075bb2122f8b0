"""Sockets: PULL from a DECTRIS detector control unit (or our simulator), and series bookkeeping.

The DCU binds PUSH (Stream V2 on port 31001, V1 on 9999) and clients connect PULL. PUSH deals
messages round-robin, so a second client connected to the same DCU silently takes half of the
images: run exactly one receiver per detector stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Hashable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import zmq

from ..client import SocketClient, connect
from ..limits import Limits
from .bounds import DEFAULT_LIMITS
from .decode import V1Parser, decode_v2, is_v2_image
from .decode_v1 import looks_v1
from .schema import (
    DecodeError,
    DectrisError,
    Image,
    Message,
    SeriesEnd,
    SeriesError,
    SeriesStart,
    WrongStreamVersion,
)

log = logging.getLogger(__name__)

DEFAULT_PORTS = {2: 31001, 1: 9999}
#: largest series whose seen image ids are kept as a bitmap (one byte an image)
_MAX_SEEN_MAP = 1 << 27
#: missing image ids a series' summary lists (it counts them all)
MISSING_LISTED = 1000
#: image ids are kept as int64 (batches, the seen ids): a larger one is out of any series' range
_ID_LIMIT = 1 << 63
_SCHEMES = {"dectris2": 2, "dectris1": 1, "dectris": 2}


def parse_source(url: str) -> tuple[int, str]:
    """``dectris2://host[:31001]`` / ``dectris1://host[:9999]`` → (stream version, ZMQ endpoint)."""
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"source {url!r}: scheme must be dectris2:// (Stream V2) or dectris1:// (V1)")
    if not parts.hostname:
        raise ValueError(f"source {url!r} names no host")
    version = _SCHEMES[parts.scheme]
    try:
        port = parts.port or DEFAULT_PORTS[version]
    except ValueError as exc:
        raise ValueError(f"source {url!r}: bad port ({exc})") from exc
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return version, f"tcp://{host}:{port}"


class DectrisReceiver(SocketClient):
    """PULL socket connected to a Stream V1 or V2 sender, yielding decoded messages.

    ``channels`` limits which V2 image channels are decompressed. Undecodable messages go to
    ``on_error`` (default: raise); counting them and carrying on is the caller's choice.
    """

    def __init__(
        self,
        endpoint: str,
        version: int,
        *,
        channels: Collection[str] | None = None,
        context: zmq.Context | None = None,
        rcvhwm: int = 10000,
        on_error: Callable[[DectrisError], None] | None = None,
        limits: Limits | None = None,
    ) -> None:
        if version not in (1, 2):
            raise ValueError(f"stream version must be 1 or 2, got {version!r}")
        self.version = version
        self.endpoint = endpoint
        self.channels = None if channels is None else tuple(channels)
        self._on_error = on_error or _raise
        self.decode_errors = 0
        self._parser = V1Parser(on_error=self._error, endpoint=endpoint)
        self._pending: deque[tuple[bytes, bool]] = deque()  #: drained parts not yet decoded
        self._in_multipart = False
        self._multipart_v1 = False  #: the multipart message under way opened like a V1 one
        #: bounds on a message (max_message_bytes) and a header's values and nesting (.bounds)
        self.limits = DEFAULT_LIMITS if limits is None else limits
        # a message larger than max_message_bytes is refused by ZeroMQ as it arrives (it drops
        # that connection, and reconnects): never held in memory whole
        self._socket = connect(
            zmq.PULL, endpoint, context=context, heartbeat=False, rcvhwm=rcvhwm, linger=0,
            maxmsgsize=self.limits.max_message_bytes,
        )
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)

    @property
    def skipped_parts(self) -> int:
        """V1 parts dropped while looking for the start of a message."""
        return self._parser.skipped_parts

    def _error(self, exc: DectrisError) -> None:
        self.decode_errors += 1
        self._on_error(exc)

    def poll(self, timeout_s: float) -> list[Message]:
        """Messages completed by whatever arrives within ``timeout_s`` (at least one socket read
        when data is waiting; returns early once something decoded)."""
        out: list[Message] = []
        if not self._poller.poll(int(timeout_s * 1000)):
            return out
        while not out:
            try:
                part = self._socket.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            more = bool(self._socket.getsockopt(zmq.RCVMORE))
            if self.version == 2:
                out += self._decode_v2(part, more)
            else:
                out += self._parser.feed(part, more)
        return out

    def _fill_pending(self, timeout_s: float, max_parts: int) -> bool:
        """Receive up to ``max_parts`` parts (and the rest of the message under way) into the
        pending queue when it is empty; False when nothing is pending after ``timeout_s``."""
        if self._pending:
            return True
        if not self._poller.poll(int(timeout_s * 1000)):
            return False
        more = False
        while len(self._pending) < max_parts or more:  # a multipart message arrives whole
            try:
                part = self._socket.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            more = bool(self._socket.getsockopt(zmq.RCVMORE))
            self._pending.append((part, more))
        return True

    def drain(self, timeout_s: float, max_parts: int = 256) -> Iterator[Message]:
        """Like :meth:`poll`, but takes every part already waiting (up to ``max_parts``, and
        then to the end of the message under way) in one go, and decodes them one at a time as
        the caller iterates. A poll per message cost 9 of the 65 µs to receive and decode a
        192×192 image; decoding the whole batch up front was slower still, as every decoded
        frame of the batch then stays in memory at once. Parts not reached (the caller stopped
        iterating, or ``on_error`` raised) are decoded by the next call, and the caller's
        changes to :attr:`channels` apply from the next message on."""
        if not self._fill_pending(timeout_s, max_parts):
            return
        while self._pending:
            part, more = self._pending.popleft()
            if self.version == 1:
                yield from self._parser.feed(part, more)
            elif more or self._in_multipart:  # V2 messages are single-part: report the rest once
                self._multipart_part(part, more)
            else:
                try:
                    msg = decode_v2(part, self.channels, self.limits)
                except DecodeError as exc:
                    self._v2_error(part, exc)
                    continue
                yield msg

    def _multipart_part(self, part: bytes, more: bool) -> None:
        """One part of a multipart message on a V2 socket: the whole message is one error, a
        wrong-version one when its first part opens a V1 message."""
        if not self._in_multipart:
            self._multipart_v1 = looks_v1(part)
        self._in_multipart = more
        if not more:
            self._multipart_error()

    def _multipart_error(self) -> None:
        if self._multipart_v1:
            self._error(WrongStreamVersion(1, self.endpoint, "a Stream V1 (multipart) message"))
        else:
            self._error(DecodeError("multipart message on a Stream V2 socket (is the sender V1?)"))

    def _v2_error(self, part: bytes, exc: DecodeError) -> None:
        """A single part that is no V2 message: a V1 one (a series end, a header sent in
        pieces) says the URL names the wrong version."""
        self._error(WrongStreamVersion(1, self.endpoint, "a Stream V1 message") if looks_v1(part) else exc)

    def drain_split(self, timeout_s: float, max_parts: int = 256) -> list[bytes | Message]:
        """Like :meth:`drain`, but V2 images come back undecoded (their raw message bytes),
        for decoding workers; start and end messages are decoded here, in order. V1 messages
        are all decoded (the V1 parser assembles them from their parts)."""
        if self.version == 1:
            return list(self.drain(timeout_s, max_parts))
        out: list[bytes | Message] = []
        if not self._fill_pending(timeout_s, max_parts):
            return out
        while self._pending:
            part, more = self._pending.popleft()
            if more or self._in_multipart:
                self._multipart_part(part, more)
            elif is_v2_image(part):
                out.append(part)
            else:
                try:
                    out.append(decode_v2(part, self.channels, self.limits))
                except DecodeError as exc:
                    self._v2_error(part, exc)
        return out

    def _decode_v2(self, part: bytes, more: bool) -> list[Message]:
        if more:  # V2 messages are single-part: drain the rest and report it
            self._multipart_v1 = looks_v1(part)
            while self._socket.getsockopt(zmq.RCVMORE):
                self._socket.recv()
            self._multipart_error()
            return []
        try:
            return [decode_v2(part, self.channels, self.limits)]
        except DecodeError as exc:
            self._v2_error(part, exc)
            return []

    def messages(self, stop: threading.Event | None = None, poll_s: float = 0.1) -> Iterator[Message]:
        """Decoded messages until ``stop`` is set."""
        stop = stop or threading.Event()
        while not stop.is_set():
            yield from self.drain(poll_s)


def _raise(exc: DectrisError) -> None:
    raise exc


class ErrorLogLimiter:
    """Logs errors without flooding the log at detector rates (a V1 detector on a
    ``dectris2://`` URL fails every message; a producer that keeps streaming a refused scan has
    every frames message rejected): the first of each kind (``key``; by default type and
    ``field``) in full, then their number, with the last one's text, at most once every
    ``window_s`` (call :meth:`flush` now and then, and with ``force`` at the end). A kind that
    stayed quiet for a window is logged in full again. Counting each one is the caller's.

    With ``max_kinds`` (a key the sender makes up, such as a scan id), a new kind beyond that
    many first forgets those that stayed quiet for a window, and where none did is counted under
    one kind of its own (:data:`OTHER`): a sender inventing keys floods the log no more than
    ``max_kinds`` + 1 lines a window. Without it each kind is remembered for good (``key`` must
    then take few values). Safe to call from several threads."""

    #: the kind of those beyond ``max_kinds``
    OTHER = ("other kinds",)

    def __init__(self, logger: logging.Logger, prefix: str, window_s: float = 30.0, *,
                 level: int = logging.ERROR,
                 key: Callable[[BaseException], Hashable] | None = None,
                 extra: Callable[[BaseException], dict[str, Any]] | None = None,
                 max_kinds: int | None = None) -> None:
        self.logger, self.prefix, self.window_s, self.level = logger, prefix, window_s, level
        self._key = key or (lambda exc: (type(exc).__name__, getattr(exc, "field", None)))
        self._extra = extra or (lambda exc: {})
        self.max_kinds = max_kinds
        #: kind → [start of its window, repeats not logged yet, the last of them]
        self._kinds: dict[Hashable, list] = {}
        # re-entrant: a log handler that reports an error through this limiter again must not hang
        self._lock = threading.RLock()

    def __call__(self, exc: BaseException) -> None:
        key = self._key(exc)
        with self._lock:
            now = time.monotonic()
            state = self._kinds.get(key)
            if state is None and self.max_kinds is not None and len(self._kinds) >= self.max_kinds:
                self._forget_quiet(now)
                if len(self._kinds) >= self.max_kinds:
                    key = self.OTHER
                    state = self._kinds.get(key)
            if state is None or (not state[1] and now - state[0] >= self.window_s):
                self._kinds[key] = [now, 0, exc]
                self.logger.log(self.level, "%s: %s", self.prefix, exc, extra=self._extra(exc))
                return
            state[1] += 1
            state[2] = exc
            self.flush()

    def _forget_quiet(self, now: float) -> None:
        """Drop the kinds with nothing to log whose window is over (logged in full if they come again)."""
        for key in [k for k, (t, n, _) in self._kinds.items() if not n and now - t >= self.window_s]:
            del self._kinds[key]

    def flush(self, force: bool = False) -> None:
        """Log the repeats of every kind whose window is over (``force``: of every kind)."""
        with self._lock:
            now = time.monotonic()
            for state in list(self._kinds.values()):
                if state[1] and (force or now - state[0] >= self.window_s):
                    # counted as logged before the line is written (a handler may call this again)
                    repeats, since = state[1], now - state[0]
                    state[0], state[1] = now, 0
                    self.logger.log(self.level, "%s: %d more like it in the last %.0f s, not logged one by one "
                                    "(the last: %s)", self.prefix, repeats, since, state[2],
                                    extra={**self._extra(state[2]), "repeats": repeats})


@dataclass
class SeriesSummary:
    """What a finished series delivered."""

    start: SeriesStart
    received: int
    missing_image_ids: list[int] = field(default_factory=list)  #: the first MISSING_LISTED of them
    missing_count: int = 0  #: how many images never arrived


class _Rejected(Exception):
    """An image the tracker rejected, as :class:`ErrorLogLimiter` logs it (by ``reason``)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


class SeriesTracker:
    """Pairs images with their series' start and checks the ids.

    Images of another series (wrong ``series_id`` or ``series_unique_id``), duplicates, ids
    beyond the detector's ``number_of_images`` and images before any start are rejected and
    counted in ``rejected``; an end without its start raises :class:`SeriesError`.

    Images past the scan's positions (:meth:`expect`; a detector that took more images than
    the scan has positions), one rule for every path — Stream V1 or V2, with or without a
    ``number_of_images``, a series resumed after a restart: a caller that keeps them (the
    daemon's source) gets each as it comes, without a duplicate check here — the spool keeps
    an image id once, also across a restart, which this tracker's memory does not survive, and
    counts the rest as the scan's duplicates; any other caller has them rejected (``no_position``).
    """

    def __init__(self) -> None:
        self.start: SeriesStart | None = None
        #: the rejections' log, by reason: a bridge takes images one at a time, and the rest of
        #: a series begun before it restarted was a WARNING line per image (thousands a second
        #: at 4D-STEM rates); the first of a reason in full, then how many more (flush_log)
        self._log = ErrorLogLimiter(log, "rejected DECTRIS image", level=logging.WARNING,
                                    key=lambda exc: exc.reason)  # type: ignore[attr-defined]
        self._seen: set[int] = set()
        #: image id → seen, when the series gives its number of images (batches are checked
        #: in one NumPy pass against it; ``_seen`` then stays empty)
        self._seen_map: np.ndarray | None = None
        #: the detector's own number of images (its start's; None: it did not say)
        self._detector_images: int | None = None
        #: the scan's positions (:meth:`expect`): ids from here on have no position
        self._positions: int | None = None
        self._keep_past = False  #: images past the positions are taken (:meth:`expect`)
        self.rejected: dict[str, int] = {}

    def _reject(self, reason: str, text: str, n: int = 1) -> bool:
        self.rejected[reason] = self.rejected.get(reason, 0) + n
        self._log(_Rejected(reason, text))
        return False

    def flush_log(self, force: bool = False) -> None:
        """Log how many rejections of each reason were not logged one by one (``force``: now,
        not once their window is over)."""
        self._log.flush(force)

    def begin(self, start: SeriesStart) -> None:
        if self.start is not None:
            log.warning("DECTRIS series %s never ended; series %s replaces it",
                        self.start.series_id, start.series_id)
        self.start, self._seen = start, set()
        self._detector_images, self._positions, self._keep_past = start.number_of_images, None, False
        n = start.number_of_images
        self._seen_map = np.zeros(n, bool) if n is not None and 0 <= n <= _MAX_SEEN_MAP else None

    def resume(self, start: SeriesStart, seen: np.ndarray, positions: int | None = None,
               keep_past: bool = False) -> None:
        """Take up a series begun before a restart: ``start`` stands for its start message (its
        ids and number of images), ``seen`` are the image ids received before; they count as
        duplicates if they come again. ``positions``, ``keep_past``: as :meth:`expect`."""
        self.begin(start)
        if positions is not None:
            self.expect(positions, keep_past)
        seen = np.asarray(seen, np.int64)
        if self._seen_map is not None:
            self._seen_map[seen[(seen >= 0) & (seen < len(self._seen_map))]] = True
        else:
            self._seen = {int(i) for i in seen}

    def expect(self, n: int, keep_past: bool = False) -> None:
        """The open series' scan has ``n`` positions: images from id ``n`` on have none. With
        ``keep_past`` (a caller that keeps such images) they are taken as they come, else
        rejected (``no_position``); see the class. Where the start did not give its number of
        images, ``n`` stands for it in the count of missing images at the end."""
        if self.start is None or n < 0:
            return
        self._positions, self._keep_past = n, keep_past
        if self.start.number_of_images is None:
            self.start = replace(self.start, number_of_images=n)
            self._seen_map = np.zeros(n, bool) if n <= _MAX_SEEN_MAP else None

    def past(self, image_ids: np.ndarray) -> np.ndarray:
        """Which of ``image_ids`` are past the scan's positions (:meth:`expect`)."""
        image_ids = np.asarray(image_ids, np.int64)
        return np.zeros(len(image_ids), bool) if self._positions is None else image_ids >= self._positions

    def _mark_seen(self, ids: np.ndarray) -> None:
        """Images past the positions arrived: not missing at the series' end."""
        if self._seen_map is not None:
            self._seen_map[ids[ids < len(self._seen_map)]] = True
        else:
            self._seen.update(int(i) for i in ids)

    def _range_text(self) -> str:
        n = self._detector_images
        return f"outside the series' {n} images" if n is not None else "negative or beyond 64 bits"

    def accept_batch(self, series_ids: np.ndarray, unique_ids: Sequence[str | None],
                     image_ids: np.ndarray) -> np.ndarray:
        """:meth:`accept` for a batch of images (arrays of their ids, in arrival order): which
        belong to the open series and are new, with the same rules and counts, one warning per
        rule and batch rather than per image."""
        image_ids = np.asarray(image_ids, np.int64)
        n = len(image_ids)
        s = self.start
        if s is None:
            if n:
                self._reject("no_start", f"{n} images of series {int(series_ids[0])} (image "
                             f"{int(image_ids[0])} first) arrived without a start message", n)
            return np.zeros(n, bool)
        keep = np.asarray(series_ids) == s.series_id
        if s.series_unique_id is not None:
            keep &= np.fromiter((u == s.series_unique_id for u in unique_ids), bool, n)
        self._count(~keep, "unknown_series", image_ids, f"name another series than the open "
                    f"series {s.series_id}/{s.series_unique_id}")
        in_range = image_ids >= 0
        if self._detector_images is not None:
            in_range &= image_ids < self._detector_images
        self._count(keep & ~in_range, "image_id_range", image_ids, f"have ids {self._range_text()}")
        keep &= in_range
        past = keep & self.past(image_ids)
        if past.any():
            self._mark_seen(image_ids[past])
            if not self._keep_past:
                self._count(past, "no_position", image_ids, f"have no position: the scan has {self._positions}; "
                            "not sent (the daemon's own DECTRIS source keeps such images)")
                keep &= ~past
        checked = keep & ~past
        rows = np.flatnonzero(checked)
        ids = image_ids[rows]
        first = np.zeros(len(rows), bool)  # the first of each id within the batch
        first[np.unique(ids, return_index=True)[1]] = True
        if self._seen_map is not None:
            new = first & ~self._seen_map[ids]
            self._seen_map[ids[new]] = True
        else:
            new = first & np.fromiter((int(i) not in self._seen for i in ids), bool, len(ids))
            self._seen.update(int(i) for i in ids[new])
        dup = np.zeros(n, bool)
        dup[rows[~new]] = True
        self._count(dup, "duplicate", image_ids, "arrived twice")
        keep[rows[~new]] = False
        return keep

    def _count(self, which: np.ndarray, reason: str, image_ids: np.ndarray, text: str) -> None:
        k = int(np.count_nonzero(which))
        if k:
            shown = image_ids[which][:10].tolist()
            self._reject(reason, f"{k} images (ids {shown}{' …' if k > 10 else ''}) {text}", k)

    def accept(self, image: Image) -> bool:
        """True when ``image`` belongs to the open series and is new."""
        s = self.start
        if s is None:
            return self._reject("no_start", f"image {image.image_id} of series {image.series_id} "
                                "arrived without a start message")
        if image.series_id != s.series_id or (
            s.series_unique_id is not None and image.series_unique_id != s.series_unique_id
        ):
            return self._reject("unknown_series", f"image {image.image_id} names series "
                                f"{image.series_id}/{image.series_unique_id}, the open series is "
                                f"{s.series_id}/{s.series_unique_id}")
        limit = self._detector_images if self._detector_images is not None else _ID_LIMIT
        if not 0 <= image.image_id < limit:  # (beyond 64 bits: NumPy's ids raised OverflowError below)
            return self._reject("image_id_range", f"image id {image.image_id} {self._range_text()}")
        if self._positions is not None and image.image_id >= self._positions:
            self._mark_seen(np.array([image.image_id], np.int64))
            return self._keep_past or self._reject(
                "no_position", f"image {image.image_id} has no position: the scan has {self._positions}; not "
                "sent (the daemon's own DECTRIS source keeps such images)")
        seen = self._seen_map
        if (seen[image.image_id] if seen is not None else image.image_id in self._seen):
            return self._reject("duplicate", f"image {image.image_id} arrived twice")
        if seen is not None:
            seen[image.image_id] = True
        else:
            self._seen.add(image.image_id)
        return True

    def end(self, end: SeriesEnd) -> SeriesSummary:
        """Close the open series; the summary lists image ids that never arrived."""
        self.flush_log(force=True)  # the series' rejections, before what its end says
        s = self.start
        if s is None:
            raise SeriesError(f"end of series {end.series_id} arrived without its start message")
        if end.series_id != s.series_id or (
            s.series_unique_id is not None and end.series_unique_id not in (None, s.series_unique_id)
        ):
            raise SeriesError(f"end names series {end.series_id}/{end.series_unique_id}, "
                              f"the open series is {s.series_id}/{s.series_unique_id}")
        # only the first MISSING_LISTED missing ids are listed, their number is counted: a
        # detector armed for 2³¹ triggers and stopped early (disarm) made a list of every id
        # never sent, and the daemon ran out of memory. Among the first received + L ids at
        # least L are missing (when that many are), so no more of them need looking at.
        if self._seen_map is not None:
            received = int(np.count_nonzero(self._seen_map))
            count = len(self._seen_map) - received
            missing = np.flatnonzero(~self._seen_map[:received + MISSING_LISTED])[:MISSING_LISTED].tolist()
        else:
            expected = s.number_of_images if s.number_of_images is not None else (
                max(self._seen) + 1 if self._seen else 0)
            received = len(self._seen)
            seen = np.fromiter(self._seen, np.int64, len(self._seen))
            seen = seen[(seen >= 0) & (seen < expected)]
            count = expected - len(seen)
            head = np.arange(min(expected, len(seen) + MISSING_LISTED), dtype=np.int64)
            missing = np.setdiff1d(head, seen)[:MISSING_LISTED].tolist()
        summary = SeriesSummary(s, received, missing, count)
        self.start, self._seen, self._seen_map = None, set(), None
        return summary
